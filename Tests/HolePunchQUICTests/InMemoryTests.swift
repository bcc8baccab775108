import ProcessTestSupport
import Testing
import HolePunchNet
@testable import HolePunchQUIC

@Suite("QUIC in memory (no socket)")
struct InMemoryTests {
    @Test("handshake pump between a client and a server connection, then stream echo")
    func handshakeAndEcho() async throws {
        let addressA = SocketAddress.loopbackV4(port: 1)
        let addressB = SocketAddress.loopbackV4(port: 2)
        let network = InMemoryDatagramNetwork()
        let a = try await Endpoint.open(
            on: network.bind(addressA), configuration: EndpointConfiguration(identity: TestIdentities.a)
        )
        let b = try await Endpoint.open(
            on: network.bind(addressB), configuration: EndpointConfiguration(identity: TestIdentities.b)
        )
        let echo = startEchoServer(b)
        defer { echo.cancel() }
        let connection = try await withDeadline(.seconds(10)) {
            try await a.connect(to: addressB, expecting: TestIdentities.b.nodeID)
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        let stream = try await connection.openStream()
        let message = Array("in memory".utf8)
        try await stream.write(message)
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(reply == message)
        let stats = try #require(await connection.stats())
        #expect(stats.packetsSent > 0 && stats.packetsReceived > 0)
        #expect(await a.stats.datagramsReceived > 0)
        await a.close()
        await b.close()
    }
}
