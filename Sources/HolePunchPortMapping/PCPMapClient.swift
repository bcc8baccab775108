public import HolePunchNet

/// The client side of one PCP MAP mapping (RFC 6887) as a value-type state machine: events in, actions out, no I/O.
///
/// It sends MAP, retransmits with the back-off of §8.1.1 (bounded), accepts only a response from the gateway's PCP
/// port that echoes our nonce, protocol and internal port, refreshes at half the lifetime, deletes with lifetime 0,
/// and maps again when the gateway announces a restart (ANNOUNCE, or an epoch that went back, §8.5). Everything else
/// is ignored and counted; a response that matches but lies (port 0, lifetime 0, another family) is a typed error.
public struct PCPMapClient: Sendable {
    /// Bounds and choices; the defaults are the RFC's.
    public struct Configuration: Sendable {
        /// Initial retransmission time (IRT, §8.1.1: 3 s).
        public var initialRetransmit: Duration = .seconds(3)
        /// Maximum retransmission time (MRT, §8.1.1: 1024 s).
        public var maximumRetransmit: Duration = .seconds(1024)
        /// How long a first request may go unanswered before it fails (the RFC's MRD is 0, unbounded; ours is not).
        public var requestBound: Duration = .seconds(10)
        /// How long a delete may go unanswered before it counts as done (the router forgets on its own).
        public var deleteBound: Duration = .seconds(2)
        /// The lifetime asked for, in seconds.
        public var requestedLifetime: UInt32 = 7200
        /// The longest lifetime believed: a grant above it (2^32−1 from a liar) is treated as this, so refreshes
        /// keep happening.
        public var maximumLifetime: UInt32 = 86_400
        /// RAND of §8.1.1, a value in −0.1…0.1 per (re)transmission; tests pass a constant.
        public var jitter: @Sendable () -> Double = { Double.random(in: -0.1...0.1) }

        /// The RFC's defaults.
        public init() {}
    }

    /// What the owner must do after an event.
    public enum Action: Sendable {
        /// Send `bytes` to the gateway's PCP port, then call ``timerFired(now:)`` at `wakeAt`.
        case send(bytes: [UInt8], wakeAt: ContinuousClock.Instant)
        /// The mapping was granted or refreshed (`restarted`: the router lost its state first); call
        /// ``timerFired(now:)`` at `wakeAt` (the refresh time).
        case mapped(PortMapping, restarted: Bool, wakeAt: ContinuousClock.Instant)
        /// Nothing to do; if `wakeAt` is set, call ``timerFired(now:)`` then.
        case wait(wakeAt: ContinuousClock.Instant?)
        /// The datagram was not for us, or not believable; nothing changed.
        case ignored(String)
        /// The mapping failed or was lost; the machine is finished.
        case failed(PortMappingError)
        /// The delete was answered (or its bound passed); the machine is finished.
        case deleted
    }

    private enum Phase: Sendable {
        case idle
        /// A MAP (first, refresh, or after a restart) is in flight. `giveUpAt` bounds it.
        case requesting(lastSent: ContinuousClock.Instant, retransmit: Duration, giveUpAt: ContinuousClock.Instant,
                        current: PortMapping?, restarted: Bool)
        case mapped(PortMapping)
        case deleting(retransmit: Duration, giveUpAt: ContinuousClock.Instant)
        case finished
    }

    /// The gateway: responses must come from its IP and PCP port; ANNOUNCEs from its IP.
    public let gateway: SocketAddress.IP
    /// Our address as the gateway sees it (the source of our requests): the only host we map for.
    public let client: SocketAddress.IP
    /// Our socket's port, the one mapped.
    public let internalPort: UInt16
    /// The 12-byte nonce of this mapping (§11.1).
    public let nonce: [UInt8]
    /// The configuration.
    public let configuration: Configuration

    private var phase: Phase = .idle
    /// The last epoch the server reported, and when (our clock), for the §8.5 check.
    private var lastEpoch: (server: UInt32, at: ContinuousClock.Instant)?
    /// Datagrams ignored so far (wrong source, nonce, port, protocol, undecodable).
    public private(set) var ignoredCount = 0
    /// How many times the router was seen to lose its state (ANNOUNCE or epoch).
    public private(set) var restartCount = 0

    /// Creates the machine for mapping `internalPort` of `client` through `gateway`; `nonce` must be 12 random
    /// bytes (the default draws them from the system generator).
    public init(gateway: SocketAddress.IP, client: SocketAddress.IP, internalPort: UInt16, nonce: [UInt8]? = nil,
                configuration: Configuration = Configuration()) {
        self.gateway = gateway
        self.client = client
        self.internalPort = internalPort
        var generator = SystemRandomNumberGenerator()
        self.nonce = nonce ?? (0..<12).map { _ in UInt8.random(in: 0...255, using: &generator) }
        self.configuration = configuration
    }

    /// The mapping currently held, if any.
    public var mapping: PortMapping? {
        switch phase {
        case let .mapped(mapping): mapping
        case let .requesting(_, _, _, current, _): current
        default: nil
        }
    }

    /// Whether the machine is finished (failed or deleted).
    public var isFinished: Bool {
        if case .finished = phase { return true }
        return false
    }

    /// The gateway's PCP server address.
    public var server: SocketAddress { SocketAddress(ip: gateway, port: PCP.serverPort) }

    /// Starts mapping: the first MAP request.
    public mutating func start(now: ContinuousClock.Instant) -> Action {
        guard case .idle = phase else { return .wait(wakeAt: nil) }
        return request(now: now, current: nil, restarted: false, giveUpAt: now + configuration.requestBound)
    }

    /// Deletes the mapping (MAP with lifetime 0), bounded by ``Configuration/deleteBound``.
    public mutating func delete(now: ContinuousClock.Instant) -> Action {
        switch phase {
        case .idle, .finished:
            phase = .finished
            return .deleted
        default:
            let retransmit = jittered(configuration.initialRetransmit)
            phase = .deleting(retransmit: retransmit, giveUpAt: now + configuration.deleteBound)
            return .send(bytes: requestBytes(lifetime: 0), wakeAt: min(now + retransmit, now + configuration.deleteBound))
        }
    }

    /// A timer the machine asked for has fired (early or spurious calls are harmless).
    public mutating func timerFired(now: ContinuousClock.Instant) -> Action {
        switch phase {
        case .idle, .finished:
            return .wait(wakeAt: nil)
        case let .mapped(mapping):
            guard now >= mapping.refreshAt else { return .wait(wakeAt: mapping.refreshAt) }
            // Refresh: retransmit until the lease ends (§11.2.1), then the mapping is gone.
            return request(now: now, current: mapping, restarted: false, giveUpAt: mapping.expiresAt)
        case let .requesting(lastSent, retransmit, giveUpAt, current, restarted):
            if now >= giveUpAt {
                phase = .finished
                let what = current == nil ? "no PCP answer from \(server)" : "the PCP lease ended without a refresh answer"
                return .failed(PortMappingError(.timeout, what, protocol: .pcp))
            }
            guard now >= lastSent + retransmit else { return .wait(wakeAt: min(lastSent + retransmit, giveUpAt)) }
            // §8.1.1: RT = (1 + RAND) * MIN(2 * RTprev, MRT).
            let next = jittered(min(retransmit * 2, configuration.maximumRetransmit))
            phase = .requesting(lastSent: now, retransmit: next, giveUpAt: giveUpAt, current: current, restarted: restarted)
            return .send(bytes: requestBytes(lifetime: configuration.requestedLifetime), wakeAt: min(now + next, giveUpAt))
        case let .deleting(retransmit, giveUpAt):
            if now >= giveUpAt {
                phase = .finished
                return .deleted
            }
            let next = jittered(min(retransmit * 2, configuration.maximumRetransmit))
            phase = .deleting(retransmit: next, giveUpAt: giveUpAt)
            return .send(bytes: requestBytes(lifetime: 0), wakeAt: min(now + next, giveUpAt))
        }
    }

    /// A datagram arrived on the client's socket (its response port or the ANNOUNCE port 5350).
    public mutating func received(_ bytes: [UInt8], from source: SocketAddress, now: ContinuousClock.Instant) -> Action {
        guard source.ip == gateway else { return ignore("from \(source), not the gateway") }
        let response: PCP.Response
        do { response = try PCP.decodeResponse(bytes) } catch {
            if case .version = error, case .requesting(_, _, _, nil, _) = phase, bytes.count >= 2 {
                // A NAT-PMP-only router answers with its own version (RFC 6887 §9): no PCP here.
                phase = .finished
                return .failed(PortMappingError(.unsupported, "the gateway answered version \(bytes[0])", protocol: .pcp))
            }
            return ignore("undecodable: \(error)")
        }
        switch response.opcode {
        case .announce:
            return announced(response, now: now)
        case .map:
            guard source.port == PCP.serverPort else { return ignore("MAP response from port \(source.port)") }
            return mapResponse(response, now: now)
        }
    }

    // MARK: - Steps

    private mutating func request(now: ContinuousClock.Instant, current: PortMapping?, restarted: Bool,
                                  giveUpAt: ContinuousClock.Instant) -> Action {
        let retransmit = jittered(configuration.initialRetransmit)
        phase = .requesting(lastSent: now, retransmit: retransmit, giveUpAt: giveUpAt, current: current, restarted: restarted)
        return .send(bytes: requestBytes(lifetime: configuration.requestedLifetime), wakeAt: min(now + retransmit, giveUpAt))
    }

    private mutating func announced(_ response: PCP.Response, now: ContinuousClock.Instant) -> Action {
        guard response.result == .success else { return ignore("ANNOUNCE with \(response.result)") }
        lastEpoch = (response.epoch, now)
        guard case let .mapped(mapping) = phase else {
            // While a request is in flight it will recreate the mapping anyway; when idle or done there is nothing.
            return .wait(wakeAt: nil)
        }
        restartCount += 1
        return request(now: now, current: mapping, restarted: true, giveUpAt: now + configuration.requestBound)
    }

    private mutating func mapResponse(_ response: PCP.Response, now: ContinuousClock.Instant) -> Action {
        guard let map = response.map, map.nonce == nonce else { return ignore("MAP response with another nonce") }
        guard map.protocolNumber == PCP.udp, map.internalPort == internalPort else {
            return ignore("MAP response for protocol \(map.protocolNumber) port \(map.internalPort)")
        }
        let lostState = epochWentBack(response.epoch, now: now)
        lastEpoch = (response.epoch, now)
        switch phase {
        case .deleting:
            phase = .finished
            return .deleted
        case let .requesting(_, _, _, current, restarted):
            guard response.result == .success else {
                phase = .finished
                let code: PortMappingError.Code = response.result == .unsupportedVersion ? .unsupported : .refused
                return .failed(PortMappingError(code, "\(response.result) (lifetime \(response.lifetime)s)", protocol: .pcp))
            }
            if let problem = lie(in: response, map: map) {
                phase = .finished
                return .failed(PortMappingError(.malformed, problem, protocol: .pcp))
            }
            let mapping = PortMapping(
                mappingProtocol: .pcp, external: SocketAddress(ip: map.externalIP, port: map.externalPort),
                internalPort: internalPort, lifetimeSeconds: min(response.lifetime, configuration.maximumLifetime),
                grantedAt: now
            )
            phase = .mapped(mapping)
            let wasRestart = restarted || (lostState && current != nil)
            if lostState && current != nil && !restarted { restartCount += 1 }
            return .mapped(mapping, restarted: wasRestart, wakeAt: mapping.refreshAt)
        case .mapped:
            // A duplicate of an answer already taken (our retransmission crossed it): harmless.
            if lostState {
                restartCount += 1
                let current = mapping
                return request(now: now, current: current, restarted: true, giveUpAt: now + configuration.requestBound)
            }
            return ignore("duplicate MAP response")
        case .idle, .finished:
            return ignore("MAP response with nothing in flight")
        }
    }

    /// What is wrong with a SUCCESS response, if anything.
    private func lie(in response: PCP.Response, map: PCP.MapData) -> String? {
        if response.lifetime == 0 { return "SUCCESS with lifetime 0 for a mapping we asked to keep" }
        if map.externalPort == 0 { return "external port 0" }
        if map.externalIP.isV4 != client.isV4 { return "external address \(map.externalIP) is not of our family" }
        return nil
    }

    /// §8.5: the server lost state when its epoch went back, or advanced much less than our own clock did.
    private func epochWentBack(_ epoch: UInt32, now: ContinuousClock.Instant) -> Bool {
        guard let last = lastEpoch else { return false }
        // The epoch is the router's number: widen before adding, and subtract as Double (it may be one below the
        // last, which the first check tolerates), so no value it sends can trap.
        if UInt64(epoch) + 1 < UInt64(last.server) { return true }
        let clientDelta = Double((now - last.at).components.seconds)
        let serverDelta = Double(epoch) - Double(last.server)
        return clientDelta + 2 < serverDelta - serverDelta / 16 || serverDelta + 2 < clientDelta - clientDelta / 16
    }

    private mutating func ignore(_ why: String) -> Action {
        ignoredCount += 1
        return .ignored(why)
    }

    private func requestBytes(lifetime: UInt32) -> [UInt8] {
        PCP.MapRequest(nonce: nonce, client: client, internalPort: internalPort, lifetime: lifetime).bytes
    }

    private func jittered(_ duration: Duration) -> Duration {
        duration * (1 + max(-0.1, min(0.1, configuration.jitter())))
    }
}
