import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import Testing
@testable import HolePunchRendezvous

@Suite("NAT discovery from a dual-stack punch socket", .serialized)
struct DualStackDiscoveryTests {
    @Test("a punch socket on :: measures against an IPv4 STUN server: its extra sockets bind that server's family")
    func extraSocketsFollowTheServer() async throws {
        let wildcard6 = SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0)
        guard let endpoint = try? await Endpoint.bind(wildcard6, configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none)) else {
            return  // no IPv6 on this host
        }
        guard endpoint.reachableFamilies == [.ipv4, .ipv6] else {
            await endpoint.close()
            return  // net.ipv6.bindv6only=1
        }
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
