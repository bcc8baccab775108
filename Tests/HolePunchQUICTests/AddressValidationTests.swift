import Foundation
import Testing
import HolePunchNet
@testable import HolePunchQUIC
#if canImport(Glibc)
import Glibc
#endif

/// Sends `datagram` once from a fresh UDP socket bound to `host` (any port), then closes it: on loopback, where every
/// 127.0.0.0/8 address is ours, this stands in for a spoofed source that never answers.
func sendFromFreshSocket(_ datagram: [UInt8], host: String, to destination: SocketAddress) throws {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    guard fd >= 0 else { throw TimeoutError() }
    defer { close(fd) }
    let local = try SocketAddress(host: host, port: 0)
    guard local.withSockAddr({ bind(fd, $0, $1) }) == 0 else { throw TimeoutError() }
    let sent = datagram.withUnsafeBytes { bytes in
        destination.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, $1) }
    }
    guard sent == datagram.count else { throw TimeoutError() }
}

/// Waits (bounded) until the endpoint has received at least `count` datagrams.
func waitForReceived(_ endpoint: Endpoint, atLeast count: Int) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now + .seconds(10)
    while await endpoint.stats.datagramsReceived < count {
        guard clock.now < deadline else { throw TimeoutError() }
        try await Task.sleep(for: .milliseconds(5))
    }
}

@Suite("QUIC address validation", .serialized)
struct AddressValidationTests {
    /// Client Initials that no client will follow up, from 30 source IPs × 10 ports.
    static let floodHosts = (10..<40).map { "127.0.0.\($0)" }

    @Test("a flood of unanswered Initials from many sources costs few TLS sessions and a real client still connects")
    func floodDoesNotBlockRealClient() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.maxConnections = 64 }
        let forge = try InitialForge(identity: TestIdentities.c)
        var sent = 0
        for port in 0..<10 {
            for host in Self.floodHosts {
                let initial = try forge.make(from: try SocketAddress(host: host, port: UInt16(40_000 + port)), to: server.localAddress)
                try sendFromFreshSocket(initial, host: host, to: server.localAddress)
                sent += 1
            }
        }
        try await waitForReceived(server, atLeast: sent)
        // Before address validation every Initial took a connection slot (and a TLS session) until maxConnections.
        #expect(await server.connectionCount <= 16)
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(
                to: server.localAddress, expecting: TestIdentities.b.nodeID,
                options: ConnectOptions(handshakeTimeout: .seconds(3))
            )
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        await connection.close()
        await client.close()
        await server.close()
    }

    @Test("one source IP holds at most the per-host number of unvalidated handshakes, whatever its ports")
    func perHostCap() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let forge = try InitialForge(identity: TestIdentities.c)
        for port in 0..<20 {
            let initial = try forge.make(from: try SocketAddress(host: "127.0.0.1", port: UInt16(41_000 + port)), to: server.localAddress)
            try sendFromFreshSocket(initial, host: "127.0.0.1", to: server.localAddress)
        }
        try await waitForReceived(server, atLeast: 20)
        #expect(await server.connectionCount == 8)
        for port in 0..<3 {
            let initial = try forge.make(from: try SocketAddress(host: "127.0.0.2", port: UInt16(41_000 + port)), to: server.localAddress)
            try sendFromFreshSocket(initial, host: "127.0.0.2", to: server.localAddress)
        }
        try await waitForReceived(server, atLeast: 23)
        #expect(await server.connectionCount == 11)
        await server.close()
    }
}
