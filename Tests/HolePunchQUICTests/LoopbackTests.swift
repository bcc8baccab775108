import Foundation
import Testing
@testable import HolePunchQUIC
import HolePunchNet
@testable import HolePunchQUIC

@Suite("QUIC over loopback")
struct LoopbackTests {
    @Test("dial, accept, echo a line")
    func dialAndEcho() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        let stream = try await connection.openStream()
        try await stream.write(Array("hello".utf8))
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(String(decoding: reply, as: UTF8.self) == "hello")
        await connection.close()
        await client.close()
        await server.close()
    }
}
