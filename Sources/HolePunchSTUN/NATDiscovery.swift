public import HolePunchNet

/// RFC 5780 NAT behaviour discovery as a value-type state machine: events in, actions out, no I/O.
///
/// The driver (``NATDiscoveryClient``, or a test) opens the primary socket plus
/// ``Configuration/allocationSamples`` fresh extra sockets, passes their local addresses to `init`, and then
/// feeds three kinds of event — ``start(now:)``, ``receive(_:from:socket:now:)`` and ``timerFired(now:)`` —
/// performing the returned actions. Time is a `Duration` since an origin of the driver's choosing, so tests
/// run on virtual time.
///
/// The procedure runs in three phases, ordered so that no test opens a filter another test relies on:
/// 1. **basic**: Binding to the server's primary address from socket 0: learns the reflexive address and
///    OTHER-ADDRESS.
/// 2. **filtering + allocation**, concurrently: from socket 0 to the primary address, CHANGE-REQUEST
///    (IP and port) and CHANGE-REQUEST (port), plus a plain control request that tells "replies are being
///    lost" apart from "the NAT filters". Meanwhile the extra sockets each send one Binding to the primary
///    address, one after the other, so their fresh mappings are created in a known order.
/// 3. **mapping**: from socket 0 to (alternate IP, primary port) and (alternate IP, alternate port), or to
///    (primary IP, alternate port) when the server has no alternate IP. This comes last because sending to
///    the alternate addresses would open the very filters phase 2 measures.
///
/// Every request is retransmitted with RFC 8489 back-off (scaled down, see ``Configuration``); an overall
/// timeout ends discovery with whatever was learned, and anything not measured is reported as `unknown`.
public struct NATDiscovery: Sendable {
    /// Timers and sample counts.
    public struct Configuration: Hashable, Sendable {
        /// The first retransmission timeout; it doubles after each transmission (RFC 8489 uses 500 ms).
        public var initialRTO: Duration
        /// Transmissions per request, the first included (RFC 8489's Rc uses 7).
        public var maxTransmissions: Int
        /// After the last transmission, wait this many initial RTOs for an answer (RFC 8489's Rm is 16).
        public var finalWaitMultiplier: Int
        /// Discovery ends after this long, whatever is still pending.
        public var overallTimeout: Duration
        /// Extra fresh sockets used to judge port allocation (0 disables the allocation test).
        public var allocationSamples: Int

        /// Creates a configuration; the defaults suit a LAN or a nearby server and finish within a few seconds.
        public init(
            initialRTO: Duration = .milliseconds(100),
            maxTransmissions: Int = 4,
            finalWaitMultiplier: Int = 4,
            overallTimeout: Duration = .seconds(8),
            allocationSamples: Int = 3
        ) {
            self.initialRTO = initialRTO
            self.maxTransmissions = max(1, maxTransmissions)
            self.finalWaitMultiplier = max(1, finalWaitMultiplier)
            self.overallTimeout = overallTimeout
            self.allocationSamples = max(0, allocationSamples)
        }
    }

    /// What the driver must do.
    public enum Action: Hashable, Sendable {
        /// Send `bytes` to `to` from local socket number `socket` (0 is the primary socket).
        case send(bytes: [UInt8], to: SocketAddress, socket: Int)
        /// Call ``NATDiscovery/timerFired(now:)`` at `at` (replaces any earlier timer).
        case armTimer(at: Duration)
        /// Discovery is over.
        case done(NATBehaviour)
    }

    private enum Test: Hashable {
        case basic
        case filterChangeBoth
        case filterChangePort
        case filterControl
        case mappingAltIP
        case mappingAltBoth
        case mappingAltPort
        case allocation(Int)

        var name: String {
            switch self {
            case .basic: "basic"
            case .filterChangeBoth: "filtering.changeIPAndPort"
            case .filterChangePort: "filtering.changePort"
            case .filterControl: "filtering.control"
            case .mappingAltIP: "mapping.alternateIP"
            case .mappingAltBoth: "mapping.alternateIPAndPort"
            case .mappingAltPort: "mapping.alternatePort"
            case let .allocation(n): "allocation.\(n)"
            }
        }
    }

    private enum Outcome: String {
        case pending, answered, error, noResponse, abandoned, wrongSource
    }

    private struct Transaction {
        var test: Test
        var id: STUNTransactionID
        var socket: Int
        var destination: SocketAddress
        var changeIP: Bool
        var changePort: Bool
        var bytes: [UInt8]
        var transmissions = 0
        var deadline: Duration = .zero
        var outcome = Outcome.pending
        var mapped: SocketAddress?
        var from: SocketAddress?
        var other: SocketAddress?
        var errorCode: Int?
        /// Where a correct answer must come from (CHANGE-REQUEST tests), when known.
        var expectedFrom: SocketAddress?
    }

    private enum Phase {
        case idle, basic, filtering, mapping, done
    }

    /// The server's primary address.
    public let server: SocketAddress
    /// Local addresses of the sockets: index 0 is the primary socket, the rest are fresh allocation sockets.
    public let localAddresses: [SocketAddress]
    /// The configuration.
    public let configuration: Configuration

    private var phase = Phase.idle
    private var transactions: [Transaction] = []
    private var startedAt: Duration = .zero
    private var nextAllocation = 1
    private var notes: [String] = []

    /// Creates the machine.
    ///
    /// - Parameters:
    ///   - server: the STUN server's primary address.
    ///   - localAddresses: local address of each socket the driver opened; index 0 is the primary socket.
    ///     Extra entries are used for the allocation test, up to `configuration.allocationSamples`.
    ///   - configuration: timeouts, retransmissions and the number of allocation samples.
    public init(server: SocketAddress, localAddresses: [SocketAddress], configuration: Configuration = Configuration()) {
        precondition(!localAddresses.isEmpty, "NATDiscovery needs at least the primary socket")
        self.server = server
        self.localAddresses = localAddresses
        self.configuration = configuration
    }

    /// Whether discovery has finished.
    public var isDone: Bool { phase == .done }

    // MARK: Events

    /// Starts discovery.
    public mutating func start(now: Duration) -> [Action] {
        guard phase == .idle else { return [] }
        startedAt = now
        phase = .basic
        var actions = begin(.basic, socket: 0, to: server, now: now)
        actions += timer()
        return actions
    }

    /// A datagram arrived on local socket `socket` from `from`.
    ///
    /// Anything that is not a STUN response to one of our pending transactions on that socket is ignored.
    public mutating func receive(_ bytes: [UInt8], from: SocketAddress, socket: Int, now: Duration) -> [Action] {
        guard phase != .idle, phase != .done else { return [] }
        guard let message = try? STUNMessage.decode(bytes),
              message.messageClass == .successResponse || message.messageClass == .errorResponse,
              let index = transactions.firstIndex(where: {
                  $0.id == message.transactionID && $0.socket == socket && $0.outcome == .pending
              })
        else { return [] }
        if message.messageClass == .errorResponse {
            transactions[index].outcome = .error
            transactions[index].errorCode = message.errorCode?.code
        } else {
            guard let mapped = message.mappedAddress else { return [] }
            transactions[index].mapped = mapped
            transactions[index].other = message.otherAddress
            if let expected = transactions[index].expectedFrom, expected != from {
                transactions[index].outcome = .wrongSource
            } else {
                transactions[index].outcome = .answered
            }
        }
        transactions[index].from = from
        return advance(now: now)
    }

    /// The armed timer fired.
    public mutating func timerFired(now: Duration) -> [Action] {
        guard phase != .idle, phase != .done else { return [] }
        if now >= startedAt + configuration.overallTimeout {
            for i in transactions.indices where transactions[i].outcome == .pending {
                transactions[i].outcome = .abandoned
            }
            notes.append("overall timeout reached; unfinished tests count as unknown")
            return finish()
        }
        var actions: [Action] = []
        for i in transactions.indices where transactions[i].outcome == .pending && transactions[i].deadline <= now {
            if transactions[i].transmissions < configuration.maxTransmissions {
                actions += transmit(i, now: now)
            } else {
                transactions[i].outcome = .noResponse
            }
        }
        return actions + advance(now: now)
    }

    // MARK: Phases

    /// Moves through the phases as far as finished transactions allow; a phase with nothing to wait for
    /// falls straight through to the next.
    private mutating func advance(now: Duration) -> [Action] {
        var actions: [Action] = []
        phases: while true {
            switch phase {
            case .basic:
                guard let basic = record(.basic), basic.outcome != .pending else { break phases }
                guard basic.outcome == .answered else {
                    notes.append("the server never answered the basic Binding request: UDP blocked, server down, or replies lost")
                    return actions + finish()
                }
                phase = .filtering
                let other = basic.other
                if let other, other.ip != server.ip, other.port != server.port {
                    actions += begin(.filterChangeBoth, socket: 0, to: server, changeIP: true, changePort: true, expectedFrom: other, now: now)
                }
                if let other, other.port != server.port {
                    actions += begin(.filterChangePort, socket: 0, to: server, changePort: true,
                                     expectedFrom: SocketAddress(ip: server.ip, port: other.port), now: now)
                }
                if other != nil {
                    actions += begin(.filterControl, socket: 0, to: server, now: now)
                } else {
                    notes.append("the server announced no OTHER-ADDRESS: it cannot run RFC 5780 tests")
                }
                actions += startNextAllocation(now: now)
            case .filtering:
                if let last = record(.allocation(nextAllocation - 1)), last.outcome != .pending {
                    actions += startNextAllocation(now: now)
                }
                guard transactions.allSatisfy({ $0.outcome != .pending }) else { break phases }
                phase = .mapping
                let other = record(.basic)?.other
                if let other, other.ip != server.ip {
                    actions += begin(.mappingAltIP, socket: 0, to: SocketAddress(ip: other.ip, port: server.port), now: now)
                    if other.port != server.port {
                        actions += begin(.mappingAltBoth, socket: 0, to: other, now: now)
                    }
                } else if let other, other.port != server.port {
                    actions += begin(.mappingAltPort, socket: 0, to: SocketAddress(ip: server.ip, port: other.port), now: now)
                }
            case .mapping:
                guard transactions.allSatisfy({ $0.outcome != .pending }) else { break phases }
                return actions + finish()
            case .idle, .done:
                return actions
            }
        }
        return actions + timer()
    }

    private mutating func startNextAllocation(now: Duration) -> [Action] {
        let limit = min(configuration.allocationSamples, localAddresses.count - 1)
        guard nextAllocation <= limit else { return [] }
        let n = nextAllocation
        nextAllocation += 1
        return begin(.allocation(n), socket: n, to: server, now: now)
    }

    private mutating func begin(
        _ test: Test, socket: Int, to destination: SocketAddress, changeIP: Bool = false, changePort: Bool = false,
        expectedFrom: SocketAddress? = nil, now: Duration
    ) -> [Action] {
        var attributes: [STUNAttribute] = []
        if changeIP || changePort { attributes.append(.changeRequest(changeIP: changeIP, changePort: changePort)) }
        let message = STUNMessage(.request, attributes: attributes)
        // FINGERPRINT makes the request 28+ bytes, which leaves responders room under their amplification bound.
        guard let bytes = try? message.encoded(fingerprint: true) else { return [] }
        transactions.append(Transaction(
            test: test, id: message.transactionID, socket: socket, destination: destination,
            changeIP: changeIP, changePort: changePort, bytes: bytes, expectedFrom: expectedFrom
        ))
        return transmit(transactions.count - 1, now: now)
    }

    private mutating func transmit(_ index: Int, now: Duration) -> [Action] {
        transactions[index].transmissions += 1
        let n = transactions[index].transmissions
        let wait = n < configuration.maxTransmissions
            ? configuration.initialRTO * (1 << min(n - 1, 16))
            : configuration.initialRTO * configuration.finalWaitMultiplier
        transactions[index].deadline = now + wait
        let t = transactions[index]
        return [.send(bytes: t.bytes, to: t.destination, socket: t.socket)]
    }

    private func timer() -> [Action] {
        let pending = transactions.filter { $0.outcome == .pending }.map(\.deadline)
        let overall = startedAt + configuration.overallTimeout
        return [.armTimer(at: min(pending.min() ?? overall, overall))]
    }

    private func record(_ test: Test) -> Transaction? {
        transactions.first { $0.test == test }
    }

    // MARK: Verdicts

    private mutating func finish() -> [Action] {
        phase = .done
        var notes = self.notes
        let basic = record(.basic)
        let m1 = basic?.outcome == .answered ? basic?.mapped : nil
        let local0 = localAddresses[0]

        var natDetected: Bool?
        if let m1 {
            if m1.port != local0.port {
                natDetected = true
            } else if local0.ipBytes.allSatisfy({ $0 == 0 }) {
                natDetected = nil
                notes.append("primary socket is bound to a wildcard IP; only the port could be compared")
            } else {
                natDetected = m1.ip != local0.ip
            }
        }

        let (mapping, mappingConfidence) = mappingVerdict(m1: m1, natDetected: natDetected, notes: &notes)
        let (filtering, filteringConfidence) = filteringVerdict(notes: &notes)
        let (allocation, delta, allocationConfidence) = allocationVerdict(m1: m1, notes: &notes)

        let tests = transactions.map { t in
            NATTestRecord(
                name: t.test.name, socket: t.socket, localAddress: localAddresses[t.socket], destination: t.destination,
                changeIP: t.changeIP, changePort: t.changePort, transmissions: t.transmissions,
                outcome: t.outcome.rawValue, mappedAddress: t.mapped, responseFrom: t.from, errorCode: t.errorCode
            )
        }
        let evidence = NATEvidence(
            server: server, otherAddress: basic?.other, localAddress: local0, natDetected: natDetected, tests: tests,
            notes: notes, mappingConfidence: mappingConfidence, filteringConfidence: filteringConfidence,
            allocationConfidence: allocationConfidence
        )
        let behaviour = NATBehaviour(
            mapping: mapping, filtering: filtering, allocation: allocation, portDelta: delta,
            confidence: (mappingConfidence + filteringConfidence + allocationConfidence) / 3, evidence: evidence
        )
        return [.done(behaviour)]
    }

    private func mappingVerdict(m1: SocketAddress?, natDetected: Bool?, notes: inout [String]) -> (NATMapping, Double) {
        guard let m1 else { return (.unknown, 0) }
        let altIP = record(.mappingAltIP)
        let altBoth = record(.mappingAltBoth)
        let altPort = record(.mappingAltPort)
        if let altIP {
            guard altIP.outcome == .answered, let m2 = altIP.mapped else {
                notes.append("no answer from the alternate IP: mapping unknown")
                return natDetected == false ? (.endpointIndependent, 0.5) : (.unknown, 0)
            }
            if m2 == m1 { return (.endpointIndependent, 1) }
            guard let altBoth, altBoth.outcome == .answered, let m3 = altBoth.mapped else {
                notes.append("mapping changes with the destination IP, but the alternate IP and port test was not answered")
                return (.unknown, 0)
            }
            return m3 == m2 ? (.addressDependent, 1) : (.addressAndPortDependent, 1)
        }
        if let altPort {
            if altPort.outcome == .answered, let m3 = altPort.mapped {
                if m3 != m1 { return (.addressAndPortDependent, 1) }
                notes.append("same mapping for another port, but no alternate IP to tell endpoint-independent from address-dependent")
                return natDetected == false ? (.endpointIndependent, 0.8) : (.unknown, 0)
            }
            notes.append("no answer from the alternate port: mapping unknown")
            return (.unknown, 0)
        }
        if natDetected == false {
            notes.append("no NAT between us and the server: mapping is trivially endpoint-independent")
            return (.endpointIndependent, 0.6)
        }
        notes.append("the server has no alternate address: mapping cannot be measured")
        return (.unknown, 0)
    }

    private func filteringVerdict(notes: inout [String]) -> (NATFiltering, Double) {
        let both = record(.filterChangeBoth)
        let port = record(.filterChangePort)
        guard let control = record(.filterControl) else {
            return (.unknown, 0)
        }
        let tests = [both, port].compactMap { $0 }
        if tests.contains(where: { $0.outcome == .wrongSource }) {
            notes.append("the server answered CHANGE-REQUEST from its primary address: filtering unknown")
            return (.unknown, 0)
        }
        if let both, both.outcome == .answered { return (.endpointIndependent, 1) }
        if tests.contains(where: { $0.outcome == .abandoned }) {
            notes.append("filtering tests were cut short by the overall timeout")
            return (.unknown, 0)
        }
        if control.outcome != .answered {
            notes.append("the control request went unanswered too: replies are being lost, filtering unknown")
            return (.unknown, 0)
        }
        let bothRefused = both == nil || both?.outcome == .error
        if let port, port.outcome == .answered {
            if bothRefused {
                notes.append("the server cannot change its IP: endpoint-independent and address-dependent filtering look alike")
                return (.unknown, 0)
            }
            return (.addressDependent, 0.8)
        }
        if let port, port.outcome == .noResponse {
            // Silence from another port of the same IP is port-dependent filtering, whatever the IP test said.
            return (.addressAndPortDependent, 0.8)
        }
        notes.append("the server could not run the filtering tests")
        return (.unknown, 0)
    }

    private func allocationVerdict(m1: SocketAddress?, notes: inout [String]) -> (NATAllocation, Int?, Double) {
        // Fresh mappings in creation order: socket 0's first mapping, then each allocation socket's.
        var samples: [(local: UInt16, mapped: UInt16)] = []
        if let m1 { samples.append((localAddresses[0].port, m1.port)) }
        for n in 1..<max(nextAllocation, 1) {
            if let t = record(.allocation(n)), t.outcome == .answered, let mapped = t.mapped {
                samples.append((localAddresses[n].port, mapped.port))
            }
        }
        guard samples.count >= 2 else {
            notes.append("fewer than two fresh mappings observed: allocation unknown")
            return (.unknown, nil, 0)
        }
        if samples.allSatisfy({ $0.local == $0.mapped }) {
            return (.portPreserving, nil, samples.count >= 3 ? 1 : 0.7)
        }
        guard samples.count >= 3 else {
            notes.append("only two fresh mappings: too few to tell sequential from random")
            return (.unknown, nil, 0)
        }
        var deltas: [Int] = []
        for i in 1..<samples.count {
            var d = Int(samples[i].mapped) - Int(samples[i - 1].mapped)
            // Allocation wrapping around the top of the port range still counts as a small step.
            if d > 32768 { d -= 65536 } else if d < -32768 { d += 65536 }
            deltas.append(d)
        }
        var counts: [Int: Int] = [:]
        for d in deltas where d != 0 && abs(d) <= 16 { counts[d, default: 0] += 1 }
        if let (delta, count) = counts.max(by: { $0.value < $1.value || ($0.value == $1.value && abs($0.key) > abs($1.key)) }) {
            if count == deltas.count { return (.sequential, delta, 1) }
            if count * 3 >= deltas.count * 2 {
                notes.append("most but not all consecutive mappings differ by \(delta)")
                return (.sequential, delta, 0.6)
            }
        }
        return (.random, nil, deltas.count >= 3 ? 0.9 : 0.7)
    }
}
