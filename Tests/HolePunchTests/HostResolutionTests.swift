import HolePunchNet
import Testing

/// `SocketAddress.resolving`: numeric addresses never reach a resolver, host names are checked by syntax before
/// they do, and the only name looked up here is `localhost` (answered from /etc/hosts, never by DNS).
@Suite("Host names in addresses")
struct HostResolutionTests {
    @Test("numeric addresses parse as they are, IPv6 included")
    func numeric() throws {
        #expect(try SocketAddress.resolving("127.0.0.1:7000") == SocketAddress(parsing: "127.0.0.1:7000"))
        #expect(try SocketAddress.resolving("[::1]:7000") == SocketAddress(parsing: "[::1]:7000"))
    }

    @Test("localhost:PORT resolves to the IPv4 loopback with that port")
    func localhost() throws {
        let address = try SocketAddress.resolving("localhost:7000")
        #expect(address == SocketAddress.loopbackV4(port: 7000), "resolved to \(address)")
    }

    @Test("syntactically invalid names are rejected with a clear reason, before any lookup", arguments: [
        "bad..name:7000", "-bad.example:7000", "bad-.example:7000", "under_score.example:7000", "300.1.1.1:7000",
        "\(String(repeating: "a", count: 64)).example:7000", ":7000", "sp ace:7000",
    ])
    func invalidNames(_ text: String) {
        #expect {
            _ = try SocketAddress.resolving(text)
        } throws: { error in
            guard let error = error as? SocketAddressError else { return false }
            return error.reason.contains("neither a numeric IP address nor a valid host name")
        }
    }

    @Test("a missing or bad port is reported as such", arguments: ["localhost", "localhost:70000", "localhost:x"])
    func badPort(_ text: String) {
        #expect(throws: SocketAddressError.self) { _ = try SocketAddress.resolving(text) }
    }
}
