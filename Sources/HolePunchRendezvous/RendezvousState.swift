import HolePunch
import HolePunchStrategy
public import HolePunchQUIC
public import HolePunchNet

/// A session's id and probe key, drawn by the driver (the state machine itself draws no randomness, so tests
/// can script it).
public struct SessionSecret: Sendable, Hashable {
    /// The session id: lowercase hex, usable in a TLS server name and in a probe's USERNAME.
    public var id: String
    /// 32 random bytes that authenticate the session's probes.
    public var key: [UInt8]

    /// Creates a secret.
    public init(id: String, key: [UInt8]) {
        self.id = id
        self.key = key
    }

    /// A fresh random secret: a 128-bit id and a 256-bit key from the system generator.
    public static func random() -> SessionSecret {
        var generator = SystemRandomNumberGenerator()
        return random(using: &generator)
    }

    /// A fresh secret from `generator`.
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> SessionSecret {
        let digits: [Character] = Array("0123456789abcdef")
        var id = ""
        id.reserveCapacity(32)
        for _ in 0..<2 {
            var word = generator.next()
            for _ in 0..<16 {
                id.append(digits[Int(word & 0xF)])
                word >>= 4
            }
        }
        var key: [UInt8] = []
        key.reserveCapacity(32)
        for _ in 0..<4 {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { key.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return SessionSecret(id: id, key: key)
    }
}

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
    /// Timers and limits.
    public struct Configuration: Sendable, Hashable {
        /// A registration lives this long after its last register or keep-alive.
        public var registrationTTL: Duration
        /// A session is forgotten this long after it was created (or earlier, once a result arrives).
        public var sessionTTL: Duration
        /// The start delay of a session the measurements cannot vouch for: a peer without an RTT estimate, or a
        /// peer whose NAT allocates ports at random (its side of a birthday punch opens many sockets before its
        /// first probe). It is also the most any session gets.
        public var startDelay: Duration
        /// The floor of a session's start delay. Both peers start the same delay after *their own* receipt of the
        /// coordinate message, so the delay does not change the skew (the compensation does); it only has to
        /// cover what each peer does between receipt and first probe (planning with its strategy, arming timers).
        /// A session between peers with RTT estimates whose NATs do not allocate at random gets this floor plus
        /// both peers' RTT spread (the RTT pings are answered by the peer's process, so their spread is how late
        /// that process may run), at most ``startDelay``.
        public var minStartDelay: Duration
        /// The most a nearer peer's coordinate message is held back, whatever the RTTs say.
        public var maxCompensation: Duration
        /// The most registrations held; further new NodeIDs are refused with `capacity`.
        public var maxRegistrations: Int
        /// The most live sessions; further requests are refused with `capacity`.
        public var maxSessions: Int
        /// Token bucket per peer for registers and punch requests: this many at once…
        public var rateBurst: Double
        /// …refilled at this many per second.
        public var ratePerSecond: Double
        /// Token bucket per *target* for punch requests, whoever sends them: this many at once…
        ///
        /// The per-requester bucket alone lets many (or many fake) requesters make one peer punch without pause;
        /// this one bounds the probes any single peer can be made to send. Its defaults (30, 5/s) are larger than
        /// the requester's (10, 2/s), so that one requester alone cannot use up a target's bucket and lock honest
        /// peers out of it.
        public var targetRateBurst: Double
        /// …refilled at this many per second.
        public var targetRatePerSecond: Double

        /// Creates a configuration.
        public init(
            registrationTTL: Duration = .seconds(30),
            sessionTTL: Duration = .seconds(30),
            startDelay: Duration = .milliseconds(150),
            minStartDelay: Duration = .milliseconds(20),
            maxCompensation: Duration = .seconds(2),
            maxRegistrations: Int = 100_000,
            maxSessions: Int = 100_000,
            rateBurst: Double = 10,
            ratePerSecond: Double = 2,
            targetRateBurst: Double = 30,
            targetRatePerSecond: Double = 5
        ) {
            self.registrationTTL = registrationTTL
            self.sessionTTL = sessionTTL
            self.startDelay = startDelay
            self.minStartDelay = minStartDelay
            self.maxCompensation = maxCompensation
            self.maxRegistrations = maxRegistrations
            self.maxSessions = maxSessions
            self.rateBurst = rateBurst
            self.ratePerSecond = ratePerSecond
            self.targetRateBurst = targetRateBurst
            self.targetRatePerSecond = targetRatePerSecond
        }
    }

    /// What the driver must do.
    public enum Action: Sendable, Hashable {
        /// Send `message` to `node`'s current connection after `after` (zero: at once).
        case send(ServerMessage, to: NodeID, after: Duration)
        /// Close `node`'s connection `connection` (its registration expired or was replaced).
        case close(NodeID, connection: UInt64, reason: String)
        /// A session was created: both coordinate messages are among the actions returned with it.
        case sessionStarted(sessionID: String, initiator: NodeID, target: NodeID, nearDelay: Duration)
        /// Both peers acknowledged: `skew` is the measured difference of their arrival times, `planned` the
        /// difference the RTT estimates predicted.
        case skewMeasured(sessionID: String, skew: Duration, planned: Duration)
        /// A session ended (`expired`, or the outcome a peer reported).
        case sessionEnded(sessionID: String, reason: String)
    }

    /// A registered peer, as the state machine holds it.
    public struct Peer: Sendable, Hashable {
        /// The connection the registration arrived on.
        public var connection: UInt64
        /// The observed (public) address.
        public var observed: SocketAddress
        /// Published LAN addresses and NAT profile.
        public var registration: Registration
        /// When it expires unless refreshed.
        public var expires: Duration
        /// The RTT estimate: the minimum of the last four samples (scheduling noise only ever adds delay), or
        /// the provisional one (``RendezvousState/provisionalRTT(node:rtt:)``) until the first sample arrives.
        public var rtt: Duration? { rttWindow.minimum ?? provisionalRTT }
        /// How much the RTT samples vary (largest minus smallest of the window; zero with fewer than two).
        public var rttSpread: Duration { rttWindow.spread }
        /// Observed address first, then the LAN addresses that differ from it.
        public var candidates: [SocketAddress] {
            [observed] + registration.lanAddresses.filter { $0 != observed }
        }
        /// How many RTT samples have arrived.
        public var rttSamples: Int { rttWindow.next }
        var rttWindow = RTTWindow()
        /// The QUIC handshake's RTT of the registration's connection: a peer that asks for a punch right behind
        /// its register has answered no ping yet, and scheduling it as 0 ms away would hold its message back.
        var provisionalRTT: Duration?
        var tokens: Double
        var refilled: Duration
        /// The bucket for punch requests *to* this peer.
        var targetTokens: Double
        var targetRefilled: Duration
    }

    /// The last four RTT samples, inline (no allocation per peer).
    struct RTTWindow: Sendable, Hashable {
        var samples: (Int64, Int64, Int64, Int64) = (.max, .max, .max, .max)
        var next = 0

        mutating func add(_ sample: Duration) {
            let nanos = Int64(sample.components.seconds) * 1_000_000_000 + sample.components.attoseconds / 1_000_000_000
            switch next & 3 {
            case 0: samples.0 = nanos
            case 1: samples.1 = nanos
            case 2: samples.2 = nanos
            default: samples.3 = nanos
            }
            next += 1
        }

        var minimum: Duration? {
            let low = min(min(samples.0, samples.1), min(samples.2, samples.3))
            return low == .max ? nil : .nanoseconds(low)
        }

        var spread: Duration {
            let taken = [samples.0, samples.1, samples.2, samples.3].filter { $0 != .max }
            guard let low = taken.min(), let high = taken.max() else { return .zero }
            return .nanoseconds(high - low)
        }

        static func == (a: RTTWindow, b: RTTWindow) -> Bool {
            a.next == b.next && a.samples == b.samples
        }

        func hash(into hasher: inout Hasher) {
            hasher.combine(next)
            hasher.combine(samples.0)
            hasher.combine(samples.1)
            hasher.combine(samples.2)
            hasher.combine(samples.3)
        }
    }

    struct Session: Sendable {
        var initiator: NodeID
        var target: NodeID
        var expires: Duration
        var planned: Duration
        var sent: [Duration?] = [nil, nil]
        var acked: [Duration?] = [nil, nil]
        /// Set once a peer reported an outcome; the record stays until both acks are in (for the skew).
        var ended = false
        var bothAcked: Bool { acked[0] != nil && acked[1] != nil }
    }

    /// The configuration.
    public let configuration: Configuration
    private(set) var peers: [NodeID: Peer] = [:]
    private var sessions: [String: Session] = [:]

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
    /// A registration out of `RendezvousMessageLimits`, or with a LAN address other peers must not be sent to
    /// (`CandidateFilter.isPublishable(lan:observed:)`: multicast, broadcast, unspecified, a loopback or
    /// link-local address of a peer not observed in that scope, a public address that is not the peer's), is
    /// refused with `protocolViolation` and changes nothing.
    public mutating func register(
        node: NodeID, connection: UInt64, observed: SocketAddress, registration: Registration,
        stunServer: SocketAddress? = nil, now: Duration
    ) -> [Action] {
        func refuse(_ message: String) -> [Action] {
            [.send(.error(ErrorReply(requestID: nil, code: RendezvousError.Code.protocolViolation.name, message: message)),
                   to: node, after: .zero)]
        }
        do { try registration.validate() } catch { return refuse(error.message) }
        if let bad = registration.lanAddresses.first(where: { !CandidateFilter.isPublishable(lan: $0, observed: observed) }) {
            return refuse("LAN address \(bad) (\(bad.scope)) may not be published by a peer observed at \(observed)")
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
            keepAliveMilliseconds: Int(ttl / .milliseconds(3)), stunServer: stunServer
        )), to: node, after: .zero))
        return actions
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
                                     nat: peers[target]!.registration.nat, role: .initiator, plan: plan)
        let toTarget = coordinate(requestID: nil, secret: secret, peer: node, candidates: requester.candidates,
                                  nat: requester.registration.nat, role: .target, plan: plan)
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
            initiatorRTTMicroseconds: requester.rtt.map(microseconds), directoryRTTMicroseconds: microseconds(directoryRTT)))
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
                                     nat: held.registration.nat, role: .initiator, plan: plan)
        let toTarget = coordinate(requestID: nil, secret: secret, peer: request.initiator, candidates: request.candidates,
                                  nat: request.nat, role: .target, plan: plan)
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

    private func refusal(_ node: NodeID, _ requestID: UInt64, _ code: RendezvousError.Code, _ message: String) -> Action {
        .send(.error(ErrorReply(requestID: requestID, code: code.name, message: message)), to: node, after: .zero)
    }

    /// The requester's checks: registered, within its rate limit, not asking for itself. Nil when admitted.
    private mutating func admitRequester(_ node: NodeID, requestID: UInt64, target: NodeID, now: Duration) -> [Action]? {
        guard var requester = peers[node] else {
            return [refusal(node, requestID, .notRegistered, "register before asking for a punch")]
        }
        guard take(&requester, now: now) else {
            peers[node] = requester
            return [refusal(node, requestID, .rateLimited, "more than \(Int(configuration.rateBurst)) requests at once or "
                            + "\(configuration.ratePerSecond)/s; retry later")]
        }
        peers[node] = requester
        guard target != node else { return [refusal(node, requestID, .selfTarget, "cannot punch to yourself")] }
        return nil
    }

    /// The target's checks (it is held here): its punch-request bucket and the session capacity. Nil when admitted.
    private mutating func admitTarget(_ target: NodeID, requestID: UInt64, to node: NodeID, now: Duration) -> [Action]? {
        guard var other = peers[target] else { return nil }
        guard Self.take(&other.targetTokens, &other.targetRefilled, burst: configuration.targetRateBurst,
                        rate: configuration.targetRatePerSecond, now: now) else {
            peers[target] = other
            return [refusal(node, requestID, .rateLimited, "peer \(target.short) receives more than "
                            + "\(Int(configuration.targetRateBurst)) punch requests at once or "
                            + "\(configuration.targetRatePerSecond)/s; retry later")]
        }
        peers[target] = other
        guard sessions.count < configuration.maxSessions else {
            return [refusal(node, requestID, .capacity, "the rendezvous holds its maximum of sessions; retry later")]
        }
        return nil
    }

    /// When each peer's coordinate goes out: the farther at once, the nearer after half the RTT difference (capped).
    private struct Plan {
        var initiatorDelay: Duration
        var targetDelay: Duration
        var compensation: Duration
        /// Residual skew the estimates predict once compensation is capped (zero unless the cap bites).
        var planned: Duration
        var hint: Int64?
        var initiatorIsFar: Bool
        /// Both peers start this long after receipt.
        var startDelay: Duration = .zero
    }

    /// The session's start delay (``Configuration/minStartDelay``).
    private func startDelay(_ initiator: Peer, _ target: Peer) -> Duration {
        startDelay(initiatorRTT: initiator.rtt, initiatorSpread: initiator.rttSpread, initiatorNAT: initiator.registration.nat,
                   target: target)
    }

    private func startDelay(initiatorRTT: Duration?, initiatorSpread: Duration, initiatorNAT: NATProfile?,
                            target: Peer) -> Duration {
        let ceiling = configuration.startDelay
        guard initiatorRTT != nil, target.rtt != nil,
              initiatorNAT?.allocation != .random, target.registration.nat?.allocation != .random else { return ceiling }
        return min(ceiling, configuration.minStartDelay + initiatorSpread + target.rttSpread)
    }

    private func schedule(rttI measuredI: Duration?, rttT measuredT: Duration?) -> Plan {
        let rttI = measuredI ?? .zero
        let rttT = measuredT ?? .zero
        let half = (rttI > rttT ? rttI - rttT : rttT - rttI) / 2
        let compensation = min(half, configuration.maxCompensation)
        let hint: Int64? = (measuredI != nil && measuredT != nil) ? Int64((rttI + rttT) / 2 / .microseconds(1)) : nil
        let initiatorIsFar = rttI >= rttT
        return Plan(initiatorDelay: initiatorIsFar ? .zero : compensation, targetDelay: initiatorIsFar ? compensation : .zero,
                    compensation: compensation, planned: half - compensation, hint: hint, initiatorIsFar: initiatorIsFar)
    }

    private func coordinate(requestID: UInt64?, secret: SessionSecret, peer: NodeID, candidates: [SocketAddress],
                            nat: NATProfile?, role: PunchRole, plan: Plan) -> Coordinate {
        Coordinate(requestID: requestID, sessionID: secret.id, sessionKey: secret.key, peer: peer, candidates: candidates,
                   peerNAT: nat ?? .unknown, role: role,
                   startDelayMicroseconds: Int64(plan.startDelay / .microseconds(1)), peerRTTMicroseconds: plan.hint)
    }

    /// The driver actually wrote a session's coordinate message to `node` at `now`.
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

    // MARK: Helpers

    private func side(of node: NodeID, in session: Session) -> Int? {
        if session.initiator == node { return 0 }
        if session.target == node { return 1 }
        return nil
    }

    /// Refills the peer's own bucket and takes a token; false when empty.
    private func take(_ peer: inout Peer, now: Duration) -> Bool {
        Self.take(&peer.tokens, &peer.refilled, burst: configuration.rateBurst, rate: configuration.ratePerSecond, now: now)
    }

    /// Refills a token bucket and takes a token; false when empty.
    private static func take(_ tokens: inout Double, _ refilled: inout Duration, burst: Double, rate: Double,
                             now: Duration) -> Bool {
        let elapsed = Double((now - refilled) / .microseconds(1)) / 1_000_000
        tokens = min(burst, tokens + max(0, elapsed) * rate)
        refilled = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
