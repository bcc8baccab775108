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

    /// Protocol lists GnuTLS cannot carry: it takes at most 8 names of 1 to 31 bytes, and fails every handshake's
    /// setup otherwise, so an endpoint bound with one would silently accept nothing.
    static let unusableLists: [(alpn: String, additional: [String])] = [
        ("a/1", (2...9).map { "a/\($0)" }),
        ("", []),
        (String(repeating: "p", count: 32), []),
    ]

    @Test("an endpoint whose protocols GnuTLS cannot carry (9 names, an empty or a 32-byte name) is refused at bind",
          arguments: unusableLists)
    func unusableListRefused(_ list: (alpn: String, additional: [String])) async throws {
        let error = await #expect(throws: QUICError.self) {
            let endpoint = try await makeEndpoint(TestIdentities.b) { configuration in
                configuration.alpn = list.alpn
                configuration.additionalALPNs = list.additional
            }
            await endpoint.close()
        }
        #expect(error?.code == .invalidArgument, "\(String(describing: error))")
    }

    @Test("the longest list GnuTLS carries (8 names, 31 bytes each) binds and a dial with the last one connects")
    func longestUsableList() async throws {
        let names = (1...8).map { String(repeating: "\($0)", count: 31) }
        let server = try await makeEndpoint(TestIdentities.b) { configuration in
            configuration.alpn = names[0]
            configuration.additionalALPNs = Array(names.dropFirst())
        }
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID,
                                     options: ConnectOptions(alpn: names[7]))
        }
        #expect(connection.alpn == names[7])
        await connection.close()
        await client.close()
        await server.close()
    }
}
