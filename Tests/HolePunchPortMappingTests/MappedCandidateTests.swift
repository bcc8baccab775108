import HolePunchNet
import HolePunchPortMapping
import HolePunchQUIC
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

extension RendezvousServer {
    /// The candidates `node` registered, as the rendezvous holds them.
    func candidates(of node: NodeID) -> [Candidate]? { state.peer(node)?.registration.candidates }
}

/// The port-mapped candidate end to end on loopback: a fake PCP router, a real rendezvous and a node.
@Suite("Mapped candidate: a node maps its punch port and publishes it", .serialized)
struct MappedCandidateTests {
    static let identity = try! Identity.generate(commonName: "mapped-node")
    static let otherIdentity = try! Identity.generate(commonName: "mapped-initiator")
    static let serverIdentity = try! Identity.generate(commonName: "mapped-rdv")

    /// A rendezvous on loopback, run until the returned task is cancelled (``RendezvousServer/shutdown()``).
    static func rendezvous() async throws -> (RendezvousServer, Task<Void, any Error>) {
        let server = try await RendezvousServer.bind(configuration: RendezvousServerConfiguration(
            listen: .loopbackV4(port: 0), identity: serverIdentity))
        return (server, Task { try await server.run() })
    }

    /// Node options that map through the fake router at `gateway` (PCP only: tests send nothing past loopback).
    static func options(gateway: SocketAddress.IP, mapping: Bool = true) -> HolePunchNode.Options {
        var options = HolePunchNode.Options(bind: .loopbackV4(port: 0), discoversNAT: false)
        options.portMapping = mapping
        options.portMapper.protocols = [.pcp]
        options.portMapper.route = GatewayRoute(gateway: gateway, client: .v4(127, 0, 0, 1))
        return options
    }

    /// A node registered at `server`.
    static func node(_ identity: Identity, at server: RendezvousServer, _ options: HolePunchNode.Options) async throws
        -> HolePunchNode
    {
        try await HolePunchNode.start(identity: identity, rendezvous: server.address, rendezvousID: server.nodeID,
                                      options: options)
    }

    @Test("a node maps beside registering, publishes the mapped candidate with protocol and lease, and deletes it on stop")
    func publishedAndDeleted() async throws {
        let router = try FakePCPServer(ip: .v4(127, 0, 0, 21), external: .v4(127, 0, 0, 1))
        defer { router.stop() }
        let (server, running) = try await Self.rendezvous()
        let node = try await Self.node(Self.identity, at: server, Self.options(gateway: .v4(127, 0, 0, 21)))
        let expected = Candidate(kind: .portMapped, address: node.endpoint.localAddress,
                                 mapping: Candidate.Mapping(protocolName: "pcp", lifetimeSeconds: 7200))
        let published = await eventually(.seconds(5)) {
            await server.candidates(of: node.nodeID)?.contains(expected) == true
        }
        let registered = await server.candidates(of: node.nodeID)
        #expect(published, "registered: \(String(describing: registered))")
        await node.stop()
        #expect(router.requests == [7200, 0], "mapped once, deleted on stop")
        await server.shutdown()
        _ = await running.result
    }

    @Test("a start that fails while the router is still granting the mapping deletes it before it throws")
    func failedStartDeletesTheMapping() async throws {
        // A slow router (300 ms) and a start that fails at once: the rendezvous proves another NodeID.
        let router = try FakePCPServer(ip: .v4(127, 0, 0, 27), answerDelay: .milliseconds(300))
        defer { router.stop() }
        let (server, running) = try await Self.rendezvous()
        await #expect(throws: NodeError.self) {
            try await HolePunchNode.start(identity: Self.identity, rendezvous: server.address,
                                          rendezvousID: Self.otherIdentity.nodeID,
                                          options: Self.options(gateway: .v4(127, 0, 0, 27)))
        }
        #expect(router.requests == [7200, 0], "the mapping outlived the failed start")
        await server.shutdown()
        _ = await running.result
    }

    @Test("the initiator's coordinate carries the target's mapped candidate, protocol and lease included")
    func coordinateCarriesIt() async throws {
        // Another port than the socket's, as behind a NAT that does not preserve ports: the rendezvous drops a
        // published copy of the observed address.
        let router = try FakePCPServer(ip: .v4(127, 0, 0, 24), external: .v4(127, 0, 0, 1), portShift: 1)
        defer { router.stop() }
        let (server, running) = try await Self.rendezvous()
        var options = Self.options(gateway: .v4(127, 0, 0, 24))
        options.portMapper.requestedLifetime = 600
        let target = try await Self.node(Self.identity, at: server, options)
        let initiator = try await Self.node(Self.otherIdentity, at: server, Self.options(gateway: .v4(127, 0, 0, 24), mapping: false))
        let local = target.endpoint.localAddress
        let expected = Candidate(kind: .portMapped, address: SocketAddress(ip: local.ip, port: local.port + 1),
                                 mapping: Candidate.Mapping(protocolName: "pcp", lifetimeSeconds: 600))
        #expect(await eventually(.seconds(5)) { await server.candidates(of: target.nodeID)?.contains(expected) == true })
        let received = try await initiator.rendezvousClient.coordinate(to: target.nodeID)
        #expect(received.coordinate.candidates.contains(expected), "\(received.coordinate.candidates)")
        await initiator.stop()
        await target.stop()
        await server.shutdown()
        _ = await running.result
    }

    @Test("a mapping the router stops refreshing is withdrawn from the registration (PortMapper.keep's change)")
    func lostMappingWithdrawn() async throws {
        let router = try FakePCPServer(ip: .v4(127, 0, 0, 25), external: .v4(127, 0, 0, 1), portShift: 1)
        let (server, running) = try await Self.rendezvous()
        var options = Self.options(gateway: .v4(127, 0, 0, 25))
        options.portMapper.requestedLifetime = 2
        let node = try await Self.node(Self.identity, at: server, options)
        func mapped() async -> Bool { await server.candidates(of: node.nodeID)?.contains { $0.kind == .portMapped } == true }
        #expect(await eventually(.seconds(5)) { await mapped() })
        router.stop()
        // The refresh at 1 s goes unanswered until the 2 s lease ends: the mapping is lost and withdrawn.
        #expect(await eventually(.seconds(10)) { await !mapped() })
        await node.stop()
        await server.shutdown()
        _ = await running.result
    }

    @Test("Options.portMapping = false asks the router nothing")
    func disabled() async throws {
        let router = try FakePCPServer(ip: .v4(127, 0, 0, 22), external: .v4(127, 0, 0, 1))
        defer { router.stop() }
        let (server, running) = try await Self.rendezvous()
        let node = try await Self.node(Self.identity, at: server, Self.options(gateway: .v4(127, 0, 0, 22), mapping: false))
        // With mapping on, stop() would wait for the first grant and delete it: the router would have heard both.
        await node.stop()
        #expect(router.requests.isEmpty)
        #expect(await server.candidates(of: node.nodeID)?.contains { $0.kind == .portMapped } != true)
        await server.shutdown()
        _ = await running.result
    }

    @Test("a mapping whose external IP is not the observed one (a router behind another NAT) is not published")
    func foreignExternalNotPublished() async throws {
        let (server, running) = try await Self.rendezvous()
        let node = try await Self.node(Self.identity, at: server, Self.options(gateway: .v4(127, 0, 0, 23), mapping: false))
        let port = node.endpoint.localAddress.port
        let foreign = PortMapping(mappingProtocol: .pcp, external: SocketAddress(ip: .v4(203, 0, 113, 10), port: port),
                                  internalPort: port, lifetimeSeconds: 7200, grantedAt: .now)
        #expect(try await node.rendezvousClient.publishPortMapping(foreign) == false)
        let own = PortMapping(mappingProtocol: .natpmp, external: node.endpoint.localAddress, internalPort: port,
                              lifetimeSeconds: 0, grantedAt: .now)
        #expect(try await node.rendezvousClient.publishPortMapping(own))
        // A lifetime of 0 is clamped to what a rendezvous accepts, not refused.
        #expect(await server.candidates(of: node.nodeID)?.last?.mapping?.lifetimeSeconds == 1)
        #expect(try await node.rendezvousClient.publishPortMapping(nil))
        #expect(await server.candidates(of: node.nodeID)?.contains { $0.kind == .portMapped } == false)
        await node.stop()
        await server.shutdown()
        _ = await running.result
    }
}
