import ProcessTestSupport
import Testing
@testable import HolePunchQUIC
import HolePunchNet

@Suite("ALPN per connection")
struct ALPNTests {
    @Test("a server listing two protocols accepts a dial with either, and both sides report the one chosen")
    func twoProtocols() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { configuration in
            configuration.alpn = "chat/1"
            configuration.additionalALPNs = ["file/1"]
        }
        let client = try await makeEndpoint(TestIdentities.a)
        for protocolName in ["file/1", "chat/1"] {
            let connection = try await withDeadline(.seconds(10)) {
                try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID,
                                         options: ConnectOptions(alpn: protocolName))
            }
            let accepted = try #require(try await withDeadline(.seconds(10)) { () -> QUICConnection? in
                for await inbound in server.incoming { return inbound }
                return nil
            })
            #expect(connection.alpn == protocolName)
            #expect(accepted.alpn == protocolName)
            await connection.close()
        }
        await client.close()
        await server.close()
    }

    @Test("a dial offering a protocol the server does not list fails the handshake")
    func unlisted() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.alpn = "chat/1" }
        let client = try await makeEndpoint(TestIdentities.a)
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) {
                try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID,
                                         options: ConnectOptions(alpn: "other/1"))
            }
        }
        #expect(error?.code == .handshakeFailed, "\(String(describing: error))")
        await client.close()
        await server.close()
    }
}
