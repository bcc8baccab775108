import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

/// A punch endpoint on `[::]:0` that reaches both families; nil (the test then has nothing to check) when the host
/// has no IPv6 or `net.ipv6.bindv6only=1` makes the socket IPv6-only.
func dualStackEndpoint() async -> Endpoint? {
    let wildcard6 = SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0)
    guard let endpoint = try? await Endpoint.bind(wildcard6, configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none)) else {
        return nil
    }
    guard endpoint.reachableFamilies == [.ipv4, .ipv6] else {
        await endpoint.close()
        return nil
    }
    return endpoint
}

@Suite("NAT discovery from a dual-stack punch socket", .serialized)
struct DualStackDiscoveryTests {
    @Test("a punch socket on :: measures against an IPv4 STUN server: its extra sockets bind that server's family")
    func extraSocketsFollowTheServer() async throws {
        guard let endpoint = await dualStackEndpoint() else { return }
        let stun = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0))
        try stun.start()
        defer { stun.stop() }
        let client = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: .loopbackV4(port: 9), serverNodeID: node(9)))
        let behaviour: NATBehaviour
        do {
            behaviour = try await client.discoverNAT(server: stun.localAddresses[0], configuration: .init(allocationSamples: 3))
        } catch {
            await endpoint.close()
            throw error
        }
        await endpoint.close()
        let allocation = behaviour.evidence.tests.filter { $0.name.hasPrefix("allocation") }
        #expect(!allocation.isEmpty)
        #expect(allocation.allSatisfy { $0.outcome == "answered" }, "\(allocation.map { $0.outcome })")
        #expect(behaviour.evidence.lastAllocatedPort != nil)
    }
}

@Suite("The other family's reflexive address", .serialized)
struct OtherFamilyReflexiveTests {
    @Test("a dual-stack peer registered over IPv4 learns its IPv6 reflexive address from the advertised responder and publishes it as srflx")
    func learnsAndPublishes() async throws {
        let loopback6 = SocketAddress(ip: .v6([UInt8](repeating: 0, count: 15) + [1]), port: 0)
        guard let endpoint = await dualStackEndpoint() else { return }
        var configuration = RendezvousServerConfiguration(
            listen: .loopbackV4(port: 0), identity: Identities.server,
            stun: STUNResponderConfiguration(primary: .loopbackV4(port: 0)), housekeepingInterval: .milliseconds(100))
        configuration.otherFamilySTUN = STUNResponderConfiguration(primary: loopback6)
        let server = try await RendezvousServer.bind(configuration: configuration)
        let task = Task { try await server.run() }
        #expect(server.advertisedSTUN.map(\.family) == [.ipv4, .ipv6])
        let client = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: server.address, serverNodeID: server.nodeID, requestTimeout: .seconds(5)))
        let confirmed = try await client.connect(Registration())
        #expect(confirmed.stunServers == server.advertisedSTUN)
        let published = await eventually(.seconds(10)) {
            await client.lastRegistration.candidates.contains { $0.kind == .serverReflexive && $0.family == .ipv6 }
        }
        #expect(published, "no IPv6 srflx candidate was registered")
        let srflx = await client.lastRegistration.candidates.first { $0.kind == .serverReflexive }
        #expect(srflx?.address == SocketAddress(ip: loopback6.ip, port: endpoint.localAddress.port))
        await client.close()
        await endpoint.close()
        await server.shutdown()
        _ = await task.result
    }
}
