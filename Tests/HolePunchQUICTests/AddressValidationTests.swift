import ProcessTestSupport
import Foundation
import Synchronization
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
    /// Client Initials that no client will follow up come from 20 source IPs × 4 ports: 80, more than the
    /// flooded server's 64 connection slots.
    static let floodHosts = (10..<30).map { "127.0.0.\($0)" }

    @Test("a flood of unanswered Initials from many sources costs few TLS sessions and a real client still connects")
    func floodDoesNotBlockRealClient() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.maxConnections = 64 }
        let forge = try InitialForge(identity: TestIdentities.c)
        var sent = 0
        for port in 0..<4 {
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
        let stats = await server.stats
        // At most 16 unvalidated handshakes (the default load threshold) plus the real client's.
        #expect(stats.incomingHandshakesStarted <= 17)
        #expect(stats.retriesSent >= sent - 16)
        #expect(await server.unvalidatedHandshakes <= 16)
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
        let stats = await server.stats
        #expect(stats.incomingHandshakesStarted == 11)
        #expect(stats.retriesSent == 12)
        await server.close()
    }

    @Test("always validating: unanswered Initials cost no TLS session; a real client connects through the Retry and echoes")
    func alwaysValidate() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.addressValidation = .always }
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let forge = try InitialForge(identity: TestIdentities.c)
        for port in 0..<50 {
            let host = "127.0.0.\(10 + port % 5)"
            let initial = try forge.make(from: try SocketAddress(host: host, port: UInt16(42_000 + port)), to: server.localAddress)
            try sendFromFreshSocket(initial, host: host, to: server.localAddress)
        }
        try await waitForReceived(server, atLeast: 50)
        #expect(await server.stats.incomingHandshakesStarted == 0)
        #expect(await server.stats.retriesSent == 50)
        #expect(await server.connectionCount == 0)
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let stream = try await connection.openStream()
        try await stream.write(Array("through a retry".utf8))
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(String(decoding: reply, as: UTF8.self) == "through a retry")
        let stats = await server.stats
        #expect(stats.retriesSent == 51)
        #expect(stats.incomingHandshakesStarted == 1)
        #expect(stats.connectionsAccepted == 1)
        await connection.close()
        await client.close()
        await server.close()
    }

    @Test("a dial that copies its handshake datagrams gets through a Retry: one server handshake, not one per copy")
    func retryWithCopies() async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.addressValidation = .always }
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(
                to: server.localAddress, expecting: TestIdentities.b.nodeID, options: ConnectOptions(handshakePacketCopies: 3)
            )
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        let stats = await server.stats
        #expect(stats.retriesSent >= 1)
        #expect(stats.incomingHandshakesStarted == 1)
        #expect(await server.connectionCount == 1)
        await connection.close()
        await client.close()
        await server.close()
    }

    /// A punch's probe can prove the peer's address a moment after its first Initial arrived.
    @Test("a handshake whose first Initial got no hints asks again on its next datagrams, and stops once answered")
    func hintsAskedAgain() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let calls = Mutex(0)
        await server.setHandshakeHintProvider { _ in
            let call = calls.withLock { count in
                count += 1
                return count
            }
            return call == 1 ? nil : HandshakeHints(packetCopies: 2)
        }
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        #expect(calls.withLock { $0 } == 2)
        #expect(await server.stats.retriesSent == 0)
        await connection.close()
        await client.close()
        await server.close()
    }

    @Test("a forged Retry token gets a stateless INVALID_TOKEN close and no TLS session")
    func forgedToken() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let forge = try InitialForge(identity: TestIdentities.c)
        let forgedToken = [RetryTokenKey.magic] + [UInt8](repeating: 0x5a, count: 70)
        let initial = try forge.make(from: try SocketAddress(host: "127.0.0.1", port: 43_000), to: server.localAddress, token: forgedToken)
        try sendFromFreshSocket(initial, host: "127.0.0.1", to: server.localAddress)
        try await waitForReceived(server, atLeast: 1)
        let stats = await server.stats
        #expect(stats.invalidRetryTokens == 1)
        #expect(stats.incomingHandshakesStarted == 0)
        #expect(stats.datagramsSent == 1)
        await server.close()
    }

    /// The Retry is one datagram, never copied: on a path that drops every other datagram it would be lost. An
    /// address the application vouches for (a probe proved it) skips validation, so only the copies matter.
    @Test("an address the hint provider vouches for skips the Retry even when validating always, and gets its copies")
    func vouchedAddressSkipsRetry() async throws {
        let server = try await makeEndpoint(TestIdentities.b) {
            $0.initialRTT = .seconds(2)
            $0.addressValidation = .always
        }
        let relay = try AlternateDropRelay(to: server.localAddress)
        defer { relay.stop() }
        let relayAddress = relay.address
        await server.setHandshakeHintProvider { from in
            from == relayAddress ? HandshakeHints(packetCopies: 2, initialRTT: .seconds(2)) : nil
        }
        let client = try await makeEndpoint(TestIdentities.a)
        let options = ConnectOptions(initialRTT: .seconds(2), handshakeTimeout: .seconds(3), handshakePacketCopies: 2)
        let connection = try await withDeadline(.seconds(20)) {
            try await client.connect(to: relayAddress, expecting: TestIdentities.b.nodeID, options: options)
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        #expect(await server.stats.retriesSent == 0)
        await connection.close()
        await client.close()
        await server.close()
    }
}

@Suite("Handshake gate")
struct HandshakeGateTests {
    static func address(_ host: String, _ port: UInt16) -> SocketAddress { try! SocketAddress(host: host, port: port) }

    @Test("under load: accept until the threshold, then Retry; a finished handshake frees its place")
    func threshold() {
        var gate = HandshakeGate(validation: .underLoad(pendingHandshakes: 2), unvalidatedPerHost: 8, validatedPerHost: 8, maxConnections: 100)
        let a = Self.address("10.0.0.1", 1), b = Self.address("10.0.0.2", 1), c = Self.address("10.0.0.3", 1)
        #expect(gate.decide(from: a, proof: .none, connections: 0) == .accept(validated: false))
        gate.started(1, from: a, validated: false)
        gate.started(2, from: b, validated: false)
        #expect(gate.decide(from: c, proof: .none, connections: 2) == .retry)
        #expect(gate.decide(from: c, proof: .retryToken, connections: 2) == .accept(validated: true))
        #expect(gate.decide(from: c, proof: .vouched, connections: 2) == .accept(validated: true))
        gate.ended(1)
        gate.ended(1)  // idempotent
        #expect(gate.unvalidatedCount == 1)
        #expect(gate.decide(from: c, proof: .none, connections: 1) == .accept(validated: false))
    }

    @Test("per host: unvalidated beyond the cap get a Retry, validated beyond it are refused, whatever the port")
    func perHost() {
        var gate = HandshakeGate(validation: .underLoad(pendingHandshakes: 100), unvalidatedPerHost: 2, validatedPerHost: 2, maxConnections: 100)
        for key in 1...2 { gate.started(UInt64(key), from: Self.address("10.0.0.1", UInt16(key)), validated: false) }
        #expect(gate.decide(from: Self.address("10.0.0.1", 9), proof: .none, connections: 2) == .retry)
        #expect(gate.decide(from: Self.address("10.0.0.2", 9), proof: .none, connections: 2) == .accept(validated: false))
        for key in 3...4 { gate.started(UInt64(key), from: Self.address("10.0.0.1", UInt16(key)), validated: true) }
        #expect(gate.decide(from: Self.address("10.0.0.1", 9), proof: .retryToken, connections: 4) == .refuse)
        #expect(gate.decide(from: Self.address("10.0.0.2", 9), proof: .retryToken, connections: 4) == .accept(validated: true))
    }

    @Test("unvalidated handshakes never take a validated client's connection slot")
    func connectionLimit() {
        var gate = HandshakeGate(validation: .underLoad(pendingHandshakes: 4), unvalidatedPerHost: 8, validatedPerHost: 8, maxConnections: 3)
        for key in 1...3 { gate.started(UInt64(key), from: Self.address("10.0.0.\(key)", 1), validated: false) }
        // Three connections, all unvalidated: a new unvalidated one is sent to validate, a validated one gets in.
        #expect(gate.decide(from: Self.address("10.0.1.1", 1), proof: .none, connections: 3) == .retry)
        #expect(gate.decide(from: Self.address("10.0.1.1", 1), proof: .retryToken, connections: 3) == .accept(validated: true))
        #expect(gate.decide(from: Self.address("10.0.1.1", 1), proof: .retryToken, connections: 6) == .refuse)
    }

    @Test("always: every unproven source gets a Retry")
    func always() {
        let gate = HandshakeGate(validation: .always, unvalidatedPerHost: 8, validatedPerHost: 8, maxConnections: 100)
        #expect(gate.decide(from: Self.address("10.0.0.1", 1), proof: .none, connections: 0) == .retry)
        #expect(gate.decide(from: Self.address("10.0.0.1", 1), proof: .vouched, connections: 0) == .accept(validated: true))
    }
}
