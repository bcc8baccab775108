import ProcessTestSupport
import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// A NAT model with configurable mapping, filtering and allocation, for driving ``NATDiscovery`` offline.
struct SimulatedNAT {
    enum Allocation { case preserving, sequential(Int), random }

    var mapping: NATMapping
    var filtering: NATFiltering
    var allocation: Allocation
    let publicIP = SocketAddress.IP.v4(203, 0, 113, 5)
    private var nextPort = 40_000
    private var mappings: [String: UInt16] = [:]
    private var owners: [UInt16: SocketAddress] = [:]
    private var permissions: [UInt16: Set<SocketAddress>] = [:]
    private var rng = SplitMix64(seed: 7)

    init(mapping: NATMapping, filtering: NATFiltering, allocation: Allocation = .sequential(1)) {
        self.mapping = mapping
        self.filtering = filtering
        self.allocation = allocation
    }

    mutating func outbound(from local: SocketAddress, to destination: SocketAddress) -> SocketAddress {
        let key: String
        switch mapping {
        case .addressDependent: key = "\(local)>\(destination.host)"
        case .addressAndPortDependent: key = "\(local)>\(destination)"
        default: key = "\(local)"
        }
        let port: UInt16
        if let existing = mappings[key] {
            port = existing
        } else {
            switch allocation {
            case .preserving where owners[local.port] == nil:
                port = local.port
            case let .sequential(delta):
                port = UInt16(nextPort)
                nextPort += delta
            default:
                var candidate: UInt16
                repeat { candidate = UInt16.random(in: 1024...65535, using: &rng) } while owners[candidate] != nil
                port = candidate
            }
            mappings[key] = port
            owners[port] = local
        }
        permissions[port, default: []].insert(destination)
        return SocketAddress(ip: publicIP, port: port)
    }

    func inbound(to publicAddress: SocketAddress, from remote: SocketAddress) -> SocketAddress? {
        guard publicAddress.ip == publicIP, let local = owners[publicAddress.port] else { return nil }
        let allowed = permissions[publicAddress.port] ?? []
        switch filtering {
        case .addressDependent: return allowed.contains { $0.ip == remote.ip } ? local : nil
        case .addressAndPortDependent: return allowed.contains(remote) ? local : nil
        default: return local
        }
    }
}

/// Runs discovery on virtual time against a pure ``STUNResponder`` behind an optional ``SimulatedNAT``.
struct DiscoveryHarness {
    var nat: SimulatedNAT?
    var server = STUNResponderConfiguration(
        primary: addr("198.51.100.1:3478"), alternatePort: 3479, alternateIP: .v4(198, 51, 100, 2)
    )
    var locals = [addr("10.0.0.2:5000"), addr("10.0.0.2:5011"), addr("10.0.0.2:5023"), addr("10.0.0.2:5038")]
    var configuration = NATDiscovery.Configuration()
    /// Return true to lose a reply: (transmission number of that request so far, reply source, socket).
    var drop: (_ reply: STUNReply, _ socket: Int) -> Bool = { _, _ in false }
    var sends = 0

    mutating func run() -> NATBehaviour {
        var machine = NATDiscovery(server: server.primary, localAddresses: locals, configuration: configuration)
        let responder = STUNResponder(configuration: server)
        var now = Duration.zero
        var timer: Duration?
        var deliveries: [(at: Duration, bytes: [UInt8], from: SocketAddress, socket: Int)] = []
        var actions = machine.start(now: now)
        for _ in 0..<10_000 {
            for action in actions {
                switch action {
                case let .done(result):
                    return result
                case let .armTimer(at):
                    timer = at
                case let .send(bytes, to, socket):
                    sends += 1
                    let source = nat?.outbound(from: locals[socket], to: to) ?? locals[socket]
                    guard server.localAddresses.contains(to) else { continue }
                    for reply in responder.replies(to: bytes, from: source, receivedOn: to) where !drop(reply, socket) {
                        let target: SocketAddress?
                        if let nat { target = nat.inbound(to: reply.to, from: reply.from) } else { target = reply.to }
                        guard let target, let index = locals.firstIndex(of: target) else { continue }
                        deliveries.append((now + .milliseconds(10), reply.bytes, reply.from, index))
                    }
                }
            }
            deliveries.sort { $0.at < $1.at }
            if let first = deliveries.first, timer == nil || first.at <= timer! {
                deliveries.removeFirst()
                now = first.at
                actions = machine.receive(first.bytes, from: first.from, socket: first.socket, now: now)
            } else if let at = timer {
                timer = nil
                now = max(now, at)
                actions = machine.timerFired(now: now)
            } else {
                Issue.record("discovery stalled with no timer and nothing in flight")
                break
            }
        }
        Issue.record("discovery did not finish")
        return NATBehaviour(mapping: .unknown, filtering: .unknown, allocation: .unknown, portDelta: nil, confidence: 0,
                            evidence: NATEvidence(server: server.primary, localAddress: locals[0], tests: [], notes: [],
                                                  mappingConfidence: 0, filteringConfidence: 0, allocationConfidence: 0))
    }
}

@Suite struct NATDiscoveryMappingTests {
    @Test(arguments: [NATMapping.endpointIndependent, .addressDependent, .addressAndPortDependent])
    func mappingVerdict(_ mapping: NATMapping) {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: mapping, filtering: .endpointIndependent))
        let result = harness.run()
        #expect(result.mapping == mapping)
        #expect(result.evidence.natDetected == true)
        #expect(result.evidence.mappingConfidence == 1)
        #expect(result.legacyLabel == (mapping == .endpointIndependent ? "full_cone" : "symmetric"))
        let distinct = result.evidence.mappedAddresses.count
        #expect(distinct == (mapping == .endpointIndependent ? 4 : mapping == .addressDependent ? 5 : 6))
    }
}

@Suite struct NATDiscoveryFilteringTests {
    @Test(arguments: [NATFiltering.endpointIndependent, .addressDependent, .addressAndPortDependent])
    func filteringVerdict(_ filtering: NATFiltering) {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: filtering))
        let result = harness.run()
        #expect(result.filtering == filtering)
        #expect(result.mapping == .endpointIndependent)
        let labels: [NATFiltering: String] = [
            .endpointIndependent: "full_cone", .addressDependent: "restricted", .addressAndPortDependent: "port_restricted",
        ]
        #expect(result.legacyLabel == labels[filtering])
        #expect(result.confidence > 0.8)
    }

    @Test func symmetricNATWithPortRestrictedFiltering() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .addressAndPortDependent, filtering: .addressAndPortDependent))
        let result = harness.run()
        #expect(result.mapping == .addressAndPortDependent)
        #expect(result.filtering == .addressAndPortDependent)
        #expect(result.legacyLabel == "symmetric")
    }
}

@Suite struct NATDiscoveryAllocationTests {
    @Test func portPreserving() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .endpointIndependent, allocation: .preserving))
        let result = harness.run()
        #expect(result.allocation == .portPreserving)
        #expect(result.portDelta == nil)
        #expect(result.reflexiveAddress == addr("203.0.113.5:5000"))
    }

    @Test(arguments: [1, 2, -1, 7])
    func sequential(delta: Int) {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .addressAndPortDependent, filtering: .addressAndPortDependent, allocation: .sequential(delta)))
        let result = harness.run()
        #expect(result.allocation == .sequential)
        #expect(result.portDelta == delta)
        #expect(result.evidence.allocationConfidence == 1)
    }

    @Test func random() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .addressAndPortDependent, filtering: .endpointIndependent, allocation: .random))
        let result = harness.run()
        #expect(result.allocation == .random)
        #expect(result.portDelta == nil)
    }

    @Test func noExtraSocketsMeansUnknownAllocation() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .endpointIndependent, allocation: .sequential(1)))
        harness.locals = [harness.locals[0]]
        let result = harness.run()
        #expect(result.allocation == .unknown)
        #expect(result.mapping == .endpointIndependent)
    }
}

@Suite struct NATDiscoveryHonestyTests {
    @Test func allRepliesLostMeansUnknownEverything() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .endpointIndependent))
        harness.drop = { _, _ in true }
        let result = harness.run()
        #expect(result.mapping == .unknown)
        #expect(result.filtering == .unknown)
        #expect(result.allocation == .unknown)
        #expect(result.confidence == 0)
        #expect(result.legacyLabel == "unknown")
        // Bounded retransmission: the basic request went out exactly maxTransmissions times.
        #expect(result.evidence.tests.map(\.transmissions) == [4])
        #expect(harness.sends == 4)
    }

    @Test func repliesLostAfterTheBasicTestMakeFilteringUnknownNotRestricted() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .endpointIndependent))
        var answered = 0
        harness.drop = { _, _ in
            answered += 1
            return answered > 1
        }
        let result = harness.run()
        #expect(result.filtering == .unknown)
        #expect(result.mapping == .unknown)
        #expect(result.evidence.notes.contains { $0.contains("control") })
    }

    @Test func lostFirstTransmissionIsRetransmitted() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .addressAndPortDependent))
        var first = true
        harness.drop = { _, _ in
            defer { first = false }
            return first
        }
        let result = harness.run()
        #expect(result.evidence.tests[0].transmissions == 2)
        #expect(result.mapping == .endpointIndependent)
        #expect(result.filtering == .addressAndPortDependent)
    }

    @Test func noAlternateAddressMeansUnknownMappingAndFiltering() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .addressAndPortDependent, filtering: .endpointIndependent))
        harness.server = STUNResponderConfiguration(primary: addr("198.51.100.1:3478"))
        let result = harness.run()
        #expect(result.mapping == .unknown)
        #expect(result.filtering == .unknown)
        #expect(result.allocation == .sequential)
        #expect(result.evidence.otherAddress == nil)
        #expect(result.legacyLabel == "unknown")
    }

    @Test func alternatePortOnly() {
        // A symmetric NAT is caught by the port change alone; filtering can tell port-dependence only.
        var symmetric = DiscoveryHarness(nat: SimulatedNAT(mapping: .addressAndPortDependent, filtering: .addressAndPortDependent))
        symmetric.server = STUNResponderConfiguration(primary: addr("198.51.100.1:3478"), alternatePort: 3479)
        let s = symmetric.run()
        #expect(s.mapping == .addressAndPortDependent)
        #expect(s.filtering == .addressAndPortDependent)
        // An endpoint-independent NAT cannot be told from an address-dependent one without a second IP.
        var cone = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .endpointIndependent))
        cone.server = STUNResponderConfiguration(primary: addr("198.51.100.1:3478"), alternatePort: 3479)
        let c = cone.run()
        #expect(c.mapping == .unknown)
        #expect(c.filtering == .unknown)
    }

    @Test func noNATOnThePath() {
        var harness = DiscoveryHarness(nat: nil)
        let result = harness.run()
        #expect(result.evidence.natDetected == false)
        #expect(result.mapping == .endpointIndependent)
        #expect(result.filtering == .endpointIndependent)
        #expect(result.allocation == .portPreserving)
        #expect(result.legacyLabel == "full_cone")
        #expect(result.confidence == 1)
    }

    @Test func overallTimeoutEndsDiscovery() {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .addressAndPortDependent))
        harness.configuration = NATDiscovery.Configuration(initialRTO: .seconds(1), maxTransmissions: 7, overallTimeout: .seconds(2))
        let result = harness.run()
        #expect(result.filtering == .unknown)
        #expect(result.evidence.notes.contains { $0.contains("overall timeout") })
    }

    @Test func verdictEncodesAsJSONWithLegacyLabel() throws {
        var harness = DiscoveryHarness(nat: SimulatedNAT(mapping: .endpointIndependent, filtering: .addressDependent))
        let result = harness.run()
        let json = try JSONEncoderShim.encode(result)
        #expect(json.contains("\"legacyLabel\":\"restricted\""))
        #expect(json.contains("\"filtering\":\"addressDependent\""))
    }
}
