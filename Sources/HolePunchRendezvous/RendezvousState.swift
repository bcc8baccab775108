import HolePunch
import HolePunchStrategy
public import HolePunchQUIC
public import HolePunchNet

/// The rendezvous's registrations, sessions and rate limits: a value-type state machine with no I/O.
///
/// The driver (``RendezvousServer``) feeds it events: one `mutating func` per event, each returning the
/// ``Action``s to carry out. Time is a `Duration` since the driver's origin, so tests drive it on virtual time.
///
/// Clock-free start: ``requestPunch(from:requestID:target:secret:now:)`` sends the coordinate message to the
/// peer with the larger RTT at once and delays the nearer peer's by (RTT_far − RTT_near)/2, so that both copies
/// arrive together; both are told to start the same delay after receipt (the session's start delay: see
/// ``Configuration/minStartDelay``). Acks of the coordinate messages give a measured skew
/// (``Action/skewMeasured(sessionID:skew:planned:)``).
public struct RendezvousState: Sendable {
    /// The configuration.
    public let configuration: Configuration
    var peers: [NodeID: Peer] = [:]
    var sessions: [String: Session] = [:]

    /// Creates an empty state.
    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
    }

    /// How many peers are registered.
    public var registrationCount: Int { peers.count }
    /// How many sessions are live.
    public var sessionCount: Int { sessions.count }
    /// A registered peer, if any.
    public func peer(_ node: NodeID) -> Peer? { peers[node] }

    // MARK: Events

    /// A peer registers (or updates its registration) on `connection`, seen from `observed`.
    ///
    /// A registration from a new connection replaces the old one, whose connection is closed.
    ///
    /// A registration out of `RendezvousMessageLimits`, or with a candidate other peers must not be sent to
    /// (`CandidateFilter.isPublishable(_:observed:)`: multicast, broadcast, unspecified, a loopback or
    /// link-local address of a peer not observed in that scope, a public address of the observed family that is
    /// not the peer's, a `srflx` of the observed family), is refused with `protocolViolation` and changes nothing.
    /// A `relay` candidate is accepted only on the IP of one of `relayServers` (this rendezvous's TURN servers, whose
    /// credentials it grants), at most one per server: otherwise a peer could make others send to any address
    /// (``relayCandidatesProblem(_:relayServers:)``).
    public mutating func register(
        node: NodeID, connection: UInt64, observed: SocketAddress, registration: Registration,
        stunServer: SocketAddress? = nil, stunServers: [SocketAddress] = [], relayServers: [SocketAddress] = [],
        now: Duration
    ) -> [Action] {
        func refuse(_ message: String) -> [Action] {
            [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.protocolViolation.name, message: message)),
                   to: node, after: .zero)]
        }
        do { try registration.validate() } catch { return refuse(error.message) }
        if let problem = Self.relayCandidatesProblem(registration.candidates, relayServers: relayServers) {
            return refuse(problem)
        }
        if let bad = registration.candidates.first(where: {
            $0.kind != .relayed && !CandidateFilter.isPublishable($0, observed: observed)
        }) {
            return refuse("candidate \(bad) (\(bad.address.scope)) may not be published by a peer observed at \(observed)")
        }
        var actions: [Action] = []
        if var existing = peers[node] {
            guard take(&existing, now: now) else {
                peers[node] = existing
                return [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.rateLimited.name,
                                                message: "too many registrations; slow down")), to: node, after: .zero)]
            }
            if existing.connection != connection {
                actions.append(.close(node, connection: existing.connection, reason: "replaced by a newer connection"))
                existing.rttWindow = RTTWindow()
                existing.provisionalRTT = nil
            }
            existing.connection = connection
            existing.observed = observed
            existing.registration = registration
            existing.expires = now + configuration.registrationTTL
            peers[node] = existing
        } else {
            guard peers.count < configuration.maxRegistrations else {
                return [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.capacity.name,
                                                message: "the rendezvous holds its maximum of registrations")),
                              to: node, after: .zero)]
            }
            var peer = Peer(connection: connection, observed: observed, registration: registration,
                            expires: now + configuration.registrationTTL, tokens: configuration.rateBurst, refilled: now,
                            targetTokens: configuration.targetRateBurst, targetRefilled: now)
            _ = take(&peer, now: now)
            peers[node] = peer
        }
        let ttl = configuration.registrationTTL
        actions.append(.send(.registered(Registered(
            observedAddress: observed, ttlMilliseconds: Int(ttl / .milliseconds(1)),
            keepAliveMilliseconds: Int(ttl / .milliseconds(3)), stunServer: stunServer,
            stunServers: Array(stunServers.prefix(RendezvousMessageLimits.maxSTUNServers))
        )), to: node, after: .zero))
        return actions
    }

    /// Why the `relay` candidates among `candidates` may not be published, or nil when they may: each must be on
    /// the IP of one of `relayServers` with a non-zero port, no address twice, and no more of them on an IP than
    /// servers there (one allocation per peer per server).
    public static func relayCandidatesProblem(_ candidates: [Candidate], relayServers: [SocketAddress]) -> String? {
        let relayed = candidates.filter { $0.kind == .relayed }.map(\.address)
        var room: [SocketAddress.IP: Int] = [:]
        for server in relayServers { room[server.ip, default: 0] += 1 }
        for (index, address) in relayed.enumerated() {
            guard address.port != 0, let left = room[address.ip], left > 0 else {
                return "relay candidate \(address) is not on one of this rendezvous's TURN servers"
            }
            guard !relayed[..<index].contains(address) else { return "relay candidate \(address) is listed twice" }
            room[address.ip] = left - 1
        }
        return nil
    }

    /// A keep-alive: refreshes the registration. Unregistered peers are told so.
    ///
    /// Keep-alives take a token from the peer's bucket like registers and punch requests (an honest peer sends
    /// one every third of the TTL): each accepted one costs the driver an ack and an RTT ping, so a flood of them
    /// is refused with `rateLimited` and refreshes nothing.
    public mutating func keepAlive(node: NodeID, connection: UInt64, now: Duration) -> [Action] {
        guard var peer = peers[node], peer.connection == connection else {
            return [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.notRegistered.name,
                                            message: "keep-alive without a registration; register again")),
                          to: node, after: .zero)]
        }
        guard take(&peer, now: now) else {
            peers[node] = peer
            return [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.rateLimited.name,
                                            message: "keep-alives faster than \(configuration.ratePerSecond)/s; slow down")),
                          to: node, after: .zero)]
        }
        peer.expires = now + configuration.registrationTTL
        peers[node] = peer
        return [.send(.keepAliveAck, to: node, after: .zero)]
    }

    /// An RTT sample for `node` (from a ping/pong or the QUIC stack).
    public mutating func rttSample(node: NodeID, rtt: Duration) {
        peers[node]?.rttWindow.add(rtt)
    }

    /// The RTT the QUIC handshake of `node`'s registration connection measured: used until the first sample
    /// from ``rttSample(node:rtt:)`` arrives, so that a punch request pipelined behind the register is scheduled
    /// with the requester's distance rather than none. It includes the peer's handshake processing, so the pings
    /// (whose minimum is taken) replace it.
    public mutating func provisionalRTT(node: NodeID, rtt: Duration) {
        guard rtt > .zero else { return }
        peers[node]?.provisionalRTT = rtt
    }

    /// `from` asks for a punch to `target`.
    ///
    /// Refusals (`notRegistered`, `rateLimited`, `selfTarget`, `unknownTarget`, `capacity`) go to the requester
    /// only. Otherwise a session starts and both peers get a ``Coordinate``: the farther peer at once, the
    /// nearer one after (RTT_far − RTT_near)/2 (capped by ``Configuration/maxCompensation``).
    public mutating func requestPunch(
        from node: NodeID, requestID: UInt64, target: NodeID, secret: SessionSecret, now: Duration
    ) -> [Action] {
        if let refusal = admitRequester(node, requestID: requestID, target: target, now: now) { return refusal }
        guard let requester = peers[node], peers[target] != nil else {
            return [refusal(node, requestID, .unknownTarget, "no peer \(target) is registered at this rendezvous")]
        }
        if let refusal = admitTarget(target, requestID: requestID, to: node, now: now) { return refusal }
        var plan = schedule(rttI: requester.rtt, rttT: peers[target]?.rtt)
        plan.startDelay = startDelay(requester, peers[target]!)
        let toInitiator = coordinate(requestID: requestID, secret: secret, peer: target, candidates: peers[target]!.candidates,
                                     nat: peers[target]!.registration.nat,
                                     lastAllocatedPort: peers[target]!.registration.lastAllocatedPort, role: .initiator, plan: plan)
        let toTarget = coordinate(requestID: nil, secret: secret, peer: node, candidates: requester.candidates,
                                  nat: requester.registration.nat, lastAllocatedPort: requester.registration.lastAllocatedPort,
                                  role: .target, plan: plan)
        sessions[secret.id] = Session(initiator: node, target: target, expires: now + configuration.sessionTTL,
                                      planned: plan.planned)
        let toI = Action.send(.coordinate(toInitiator), to: node, after: plan.initiatorDelay)
        let toT = Action.send(.coordinate(toTarget), to: target, after: plan.targetDelay)
        // The farther peer's message first, so that a driver that sends in order never delays it behind the nearer.
        return [.sessionStarted(sessionID: secret.id, initiator: node, target: target, nearDelay: plan.compensation)]
            + (plan.initiatorIsFar ? [toI, toT] : [toT, toI])
    }

    /// What to do with a punch request whose target another instance may hold (see ``RendezvousDirectory``).
    public enum RemoteLookup: Sendable, Hashable {
        /// Refused here (the requester's own checks failed): carry out these actions.
        case refused([Action])
        /// Ask the directory; the request carries this requester's candidates, NAT profile and RTT.
        case forward(RemotePunchRequest)
    }

    /// `from` asks for a punch to `target`, which this instance does not hold: the requester's checks
    /// (registered, its rate limit, not itself) run here; the target's run at the instance that holds it
    /// (``acceptRemotePunch(_:now:)``). No session is recorded here: the skew needs both acks, which arrive at
    /// two instances.
    public mutating func prepareRemotePunch(
        from node: NodeID, requestID: UInt64, target: NodeID, secret: SessionSecret, directoryRTT: Duration, now: Duration
    ) -> RemoteLookup {
        if let refusal = admitRequester(node, requestID: requestID, target: target, now: now) { return .refused(refusal) }
        guard let requester = peers[node] else { return .refused([]) }
        // Capped at the limit the holding instance checks: a round trip measured across a suspended process, or a
        // peer that holds back its pong, must not make this request (and, for the directory's, every later one) invalid.
        func microseconds(_ rtt: Duration) -> Int64 {
            min(Int64(rtt / .microseconds(1)), RendezvousMessageLimits.maxRTTMicroseconds)
        }
        return .forward(RemotePunchRequest(
            requestID: requestID, sessionID: secret.id, sessionKey: secret.key, initiator: node, target: target,
            candidates: requester.candidates, nat: requester.registration.nat ?? .unknown,
            initiatorRTTMicroseconds: requester.rtt.map(microseconds), directoryRTTMicroseconds: microseconds(directoryRTT),
            lastAllocatedPort: requester.registration.lastAllocatedPort))
    }

    /// Another instance forwards a punch request for a peer held here (the request was validated on decoding).
    ///
    /// The target's rate limit and the session capacity apply as for a local request. The schedule treats the
    /// initiator as `initiatorRTT + directoryRTT` away (its coordinate travels back through the directory first);
    /// the reply tells the requesting instance how long to hold the initiator's coordinate. Returns the actions for
    /// this instance (the target's coordinate) and the reply; a refusal has no actions.
    public mutating func acceptRemotePunch(_ request: RemotePunchRequest, now: Duration) -> (actions: [Action], reply: RemotePunchReply) {
        let target = request.target
        func refused(_ actions: [Action]) -> (actions: [Action], reply: RemotePunchReply) {
            guard case .send(.error(let reply), _, _)? = actions.first else {
                return ([], .refused(ErrorReply(requestID: request.requestID, code: RendezvousError.Code.unknownTarget.name,
                                                message: "refused")))
            }
            return ([], .refused(reply))
        }
        guard let held = peers[target] else {
            return refused([refusal(request.initiator, request.requestID, .unknownTarget,
                                    "no peer \(target) is registered at this rendezvous")])
        }
        if let refusal = admitTarget(target, requestID: request.requestID, to: request.initiator, now: now) {
            return refused(refusal)
        }
        let initiatorRTT = request.initiatorRTTMicroseconds.map { Duration.microseconds($0 + request.directoryRTTMicroseconds) }
        var plan = schedule(rttI: initiatorRTT, rttT: held.rtt)
        plan.startDelay = startDelay(initiatorRTT: initiatorRTT, initiatorSpread: .zero, initiatorNAT: request.nat, target: held)
        let secret = SessionSecret(id: request.sessionID, key: request.sessionKey)
        let toInitiator = coordinate(requestID: request.requestID, secret: secret, peer: target, candidates: held.candidates,
                                     nat: held.registration.nat, lastAllocatedPort: held.registration.lastAllocatedPort,
                                     role: .initiator, plan: plan)
        let toTarget = coordinate(requestID: nil, secret: secret, peer: request.initiator, candidates: request.candidates,
                                  nat: request.nat, lastAllocatedPort: request.lastAllocatedPort, role: .target, plan: plan)
        return ([
            .sessionStarted(sessionID: secret.id, initiator: request.initiator, target: target, nearDelay: plan.compensation),
            .send(.coordinate(toTarget), to: target, after: plan.targetDelay),
        ], .coordinate(toInitiator, delayMicroseconds: Int64(plan.initiatorDelay / .microseconds(1))))
    }

    /// The holding instance moved `node` away: another instance has a newer registration of it. The registration
    /// goes, and its connection is closed, so that the peer is reachable at the newer instance only.
    public mutating func moved(_ node: NodeID) -> [Action] {
        guard let peer = peers.removeValue(forKey: node) else { return [] }
        return [.close(node, connection: peer.connection, reason: "registered at another instance")]
    }

    public mutating func coordinateSent(node: NodeID, sessionID: String, now: Duration) {
        guard var session = sessions[sessionID], let side = side(of: node, in: session) else { return }
        session.sent[side] = now
        sessions[sessionID] = session
    }

    /// `node` acknowledged the coordinate message. Once both have, the skew is measured: each arrival is taken
    /// as the midpoint of the send and the ack (the RTT/2 assumption of a symmetric path).
    public mutating func coordinateAcked(node: NodeID, sessionID: String, now: Duration) -> [Action] {
        guard var session = sessions[sessionID], let side = side(of: node, in: session),
              session.acked[side] == nil, session.sent[side] != nil else { return [] }
        session.acked[side] = now
        sessions[sessionID] = session
        guard let s0 = session.sent[0], let s1 = session.sent[1], let a0 = session.acked[0], let a1 = session.acked[1] else {
            return []
        }
        let arrival0 = s0 + (a0 - s0) / 2
        let arrival1 = s1 + (a1 - s1) / 2
        let skew = arrival0 > arrival1 ? arrival0 - arrival1 : arrival1 - arrival0
        if session.ended { sessions[sessionID] = nil }
        return [.skewMeasured(sessionID: sessionID, skew: skew, planned: session.planned)]
    }

    /// A peer of the session reports its outcome; the session ends (its record stays until both coordinate
    /// acks are in, so a fast result from the near peer does not lose the far peer's skew sample).
    public mutating func punchResult(node: NodeID, sessionID: String, outcome: String) -> [Action] {
        guard var session = sessions[sessionID], side(of: node, in: session) != nil, !session.ended else { return [] }
        session.ended = true
        sessions[sessionID] = session.bothAcked ? nil : session
        return [.sessionEnded(sessionID: sessionID, reason: outcome)]
    }

    /// A connection ended: the registration made on it (if still current) goes away.
    public mutating func disconnected(node: NodeID, connection: UInt64) -> [Action] {
        if let peer = peers[node], peer.connection == connection {
            peers[node] = nil
        }
        return []
    }

    /// Housekeeping: expires registrations (closing their connections) and sessions.
    public mutating func tick(now: Duration) -> [Action] {
        var actions: [Action] = []
        for (node, peer) in peers where peer.expires <= now {
            peers[node] = nil
            actions.append(.close(node, connection: peer.connection, reason: "registration expired"))
        }
        for (id, session) in sessions where session.expires <= now {
            sessions[id] = nil
            if !session.ended { actions.append(.sessionEnded(sessionID: id, reason: "expired")) }
        }
        return actions
    }
}
