import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

/// Issue 12 item 8: NAT discovery runs beside registration and punches, and refines the registration when it ends.
@Suite("Background NAT discovery", .serialized)
struct BackgroundDiscoveryTests {
    /// A client like the harness's, with background discovery configured.
    func client(_ harness: Harness, _ identity: Identity, discovery: NATDiscovery.Configuration?,
                stun: SocketAddress? = nil, acceptsPunches: Bool = true) async throws -> RendezvousClient {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
        var configuration = RendezvousClientConfiguration(server: harness.server.address, serverNodeID: harness.server.nodeID,
                                                          requestTimeout: .seconds(5), punchTimeout: .seconds(10))
        configuration.backgroundNATDiscovery = discovery
        configuration.natDiscoveryServer = stun
        configuration.acceptsPunches = acceptsPunches
        return RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration)
    }

    @Test("a STUN server that never answers does not delay registration, and a punch coordinated meanwhile connects with an unknown profile")
    func registersBeforeDiscovery() async throws {
        let harness = try await Harness.start()
        // Bound but never read: every discovery request to it goes unanswered.
        let silent = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { silent.closeNow() }
        // Retransmissions alone take minutes here, so discovery cannot have ended during the test.
        let slow = NATDiscovery.Configuration(initialRTO: .seconds(30), maxTransmissions: 7, overallTimeout: .seconds(600))
        let a = try await client(harness, Identities.a, discovery: slow, stun: silent.localAddress)
        let b = try await harness.client(Identities.b)
        // Discovery's first retransmission alone is 30 s away: a registration that waited for it could not return
        // within 15 s. (The bound leaves room for the parallel suite, which can hold a test up for seconds.)
        _ = try await withDeadline(.seconds(15)) { try await a.connect() }
        _ = try await b.connect()
        #expect(await harness.server.isRegistered(Identities.a.nodeID))
        #expect(await a.natProfile == .unknown)

        let accepted = Task { () -> QUICConnection? in
            for await connection in a.incoming { return connection }
            return nil
        }
        let received = try await b.coordinate(to: Identities.a.nodeID)
        #expect(received.coordinate.peerNAT == .unknown)
        let connection = try await withDeadline(.seconds(20)) { try await b.startPunch(received).value() }
        #expect(connection.peerNodeID == Identities.a.nodeID)
        let inbound = try #require(try await withDeadline(.seconds(20)) { await accepted.value })
        #expect(inbound.peerNodeID == Identities.b.nodeID)
        await connection.close()
        await harness.stop(a, b)
        // Closing the client stops the discovery it started.
        let outcome = try await withDeadline(.seconds(5)) { await a.natDiscoveryResult() }
        #expect(outcome.map { (try? $0.get()) == nil } == true)
    }

    @Test("when discovery ends, the client registers again with the measured profile, and the other side's coordinate carries it")
    func profileUpdateReachesCoordinate() async throws {
        let harness = try await Harness.start(stun: true)
        // A only counts target coordinates: the test looks at what B is told, no punch is needed.
        let a = try await client(harness, Identities.a, discovery: NATDiscovery.Configuration(), acceptsPunches: false)
        let b = try await harness.client(Identities.b)
        let lan = try SocketAddress(parsing: "127.0.0.1:4999")
        _ = try await a.connect(Registration(lanAddresses: [lan]))
        _ = try await b.connect()
        let outcome = try #require(try await withDeadline(.seconds(15)) { await a.natDiscoveryResult() })
        let profile = NATProfile(try outcome.get())
        #expect(profile != .unknown)
        #expect(await a.natProfile == profile)
        let received = try await b.coordinate(to: Identities.a.nodeID)
        #expect(received.coordinate.peerNAT == profile)
        // The refinement kept the LAN address of the first registration.
        #expect(received.coordinate.candidates.map(\.address).contains(lan))
        // A punch planned with the unknown profile and failed for want of a path is worth one more attempt now;
        // one that already knew, or failed for another reason, is not.
        let noPath = PunchError(code: .allPortsFailed, message: "no planned port answered a probe")
        #expect(await a.profileRefined(since: .unknown, after: noPath))
        #expect(await !a.profileRefined(since: profile, after: noPath))
        #expect(await !a.profileRefined(since: .unknown, after: PunchError(code: .refused, message: "not admitted")))
        #expect(await !b.profileRefined(since: .unknown, after: noPath))  // b started no discovery
        await harness.stop(a, b)
    }

    @Test("state: a profile update on the same connection reaches later coordinates, keeps the RTT estimate; an invalid one changes nothing")
    func stateProfileUpdate() {
        var state = RendezvousState()
        _ = state.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        _ = state.register(node: node(2), connection: 2, observed: addrB, registration: Registration(), now: .zero)
        state.rttSample(node: node(1), rtt: .milliseconds(40))
        let before = coordinates(state.requestPunch(from: node(2), requestID: 1, target: node(1), secret: secret("s1"), now: .seconds(1)))
        #expect(before.first { $0.1 == node(2) }?.0.peerNAT == .unknown)

        let update = state.register(node: node(1), connection: 1, observed: addrA,
                                    registration: Registration(nat: .portRestricted), now: .seconds(2))
        #expect(update.count == 1)  // confirmed, no connection closed
        #expect(state.peer(node(1))?.rtt == .milliseconds(40))
        #expect(state.peer(node(1))?.observed == addrA)
        let after = coordinates(state.requestPunch(from: node(2), requestID: 2, target: node(1), secret: secret("s2"), now: .seconds(3)))
        #expect(after.first { $0.1 == node(2) }?.0.peerNAT == .portRestricted)

        // Validated like any registration: too many candidates is refused, and the profile stays.
        let lan = (1...(RendezvousMessageLimits.maxPublishedCandidates + 1)).map { try! SocketAddress(parsing: "127.0.0.\($0):1") }
        let refused = state.register(node: node(1), connection: 1, observed: addrA,
                                     registration: Registration(lanAddresses: lan, nat: .symmetricRandom), now: .seconds(4))
        #expect(errorCode(refused) == RendezvousError.Code.protocolViolation.name)
        #expect(state.peer(node(1))?.registration.nat == .portRestricted)
    }
}
