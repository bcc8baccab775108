import ProcessTestSupport
import Foundation
import Testing
import HolePunchNet
@testable import HolePunchQUIC
#if canImport(Glibc)
import Glibc
#endif

@Suite("QUIC robustness", .serialized)
struct RobustnessTests {
    @Test("hostile datagrams never crash the endpoint and the live connection keeps working")
    func hostileDatagrams() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let attacker = try await makeEndpoint(TestIdentities.c)
        var generator = SystemRandomNumberGenerator()
        func random(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) } }

        var hostile: [[UInt8]] = []
        for _ in 0..<200 { hostile.append(random(Int.random(in: 1...1500, using: &generator))) }
        // A truncated client Initial: long header, version 1, then cut short at various points.
        let initialPrefix: [UInt8] = [0xc3, 0x00, 0x00, 0x00, 0x01, 0x08] + random(8) + [0x08] + random(8)
        for cut in stride(from: 1, through: initialPrefix.count, by: 3) { hostile.append(Array(initialPrefix.prefix(cut))) }
        hostile.append(initialPrefix + random(1200 - initialPrefix.count))  // right size, garbage payload
        // An unknown QUIC version.
        hostile.append([0xc0, 0x1a, 0x2a, 0x3a, 0x4a, 0x08] + random(8) + [0x08] + random(8) + random(1200))
        // A short header with an unknown 16-byte connection ID.
        hostile.append([0x40] + random(16) + random(100))
        // Oversize (a full 64 KiB minus headers) and zero-length datagrams.
        hostile.append(random(65_000))
        hostile.append([])
        // Something in the STUN range, with no handler installed.
        hostile.append([0x00, 0x01, 0x00, 0x00] + random(16))

        for datagram in hostile {
            try await attacker.send(datagram: datagram, to: server.localAddress)
            try await attacker.send(datagram: datagram, to: client.localAddress)
        }
        // The live connection still echoes.
        let stream = try await connection.openStream()
        try await stream.write(Array("still alive".utf8))
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(String(decoding: reply, as: UTF8.self) == "still alive")
        // Every hostile datagram was dropped or handed to the (absent) STUN handler, and none made a connection.
        let stats = await server.stats
        #expect(stats.datagramsDropped + stats.stunDatagrams > hostile.count / 2)
        #expect(stats.connectionsAccepted == 1)
        await attacker.close()
        await client.close()
        await server.close()
    }

    @Test("non-QUIC datagrams in the STUN range reach the reader with their source")
    func stunRangeHandler() async throws {
        let endpoint = try await makeEndpoint(TestIdentities.a)
        let sender = try await makeEndpoint(TestIdentities.b)
        let stream = endpoint.nonQUICDatagrams
        let probe: [UInt8] = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42] + Array(repeating: 7, count: 12)
        try await sender.send(datagram: probe, to: endpoint.localAddress)
        try await sender.send(datagram: [0x30, 0x31], to: endpoint.localAddress)  // neither STUN nor QUIC
        let received = try await withDeadline(.seconds(5)) {
            var iterator = stream.makeAsyncIterator()
            return await iterator.next()
        }
        #expect(received == .datagram(probe, from: sender.localAddress))
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while await endpoint.stats.datagramsDropped < 1 && clock.now < deadline {
            try await Task.sleep(for: .milliseconds(2))
        }
        #expect(await endpoint.stats.datagramsDropped == 1)
        #expect(await endpoint.stats.stunDatagrams == 1)
        await endpoint.close()
        await sender.close()
    }

    @Test("cancelling a connect to a silent port returns cancelled promptly and empties the table")
    func cancelSilentDial() async throws {
        // A bound socket that never answers: the dial can only end by cancellation.
        let silent = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(silent) }
        let bound = SocketAddress.loopbackV4(port: 0).withSockAddr { bind(silent, $0, $1) }
        #expect(bound == 0)
        let target = try #require(SocketAddress(boundTo: silent))

        let client = try await makeEndpoint(TestIdentities.a)
        let dial = Task { try await client.connect(to: target, expecting: TestIdentities.b.nodeID) }
        // Wait until the dial is really in flight (its connection exists), then cancel.
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while await client.connectionCount == 0 && clock.now < deadline { await Task.yield() }
        #expect(await client.connectionCount == 1)
        let cancelledAt = clock.now
        dial.cancel()
        let result = await dial.result
        let latency = clock.now - cancelledAt
        guard case .failure(let error as QUICError) = result else {
            Issue.record("expected a QUICError, got \(result)")
            return
        }
        #expect(error.code == .cancelled)
        #expect(latency < .seconds(1), "cancellation took \(latency)")
        #expect(await client.connectionCount == 0)
        #expect(await client.routeCount == 0)
        await client.close()
    }

    @Test("connect from a task already cancelled fails with QUICError cancelled, the documented type, and dials nothing")
    func connectFromCancelledTask() async throws {
        let client = try await makeEndpoint(TestIdentities.a)
        let server = try await makeEndpoint(TestIdentities.b)
        let dial = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let result = await dial.result
        guard case .failure(let failure) = result else { Issue.record("expected a failure, got a connection"); return }
        #expect((failure as? QUICError)?.code == .cancelled, "\(type(of: failure)): \(failure)")
        #expect(await client.connectionCount == 0)
        await client.close()
        await server.close()
    }

    @Test("connect on a closed endpoint and to the wrong address family fails with a typed error")
    func badDials() async throws {
        let client = try await makeEndpoint(TestIdentities.a)
        let v6 = try SocketAddress(parsing: "[::1]:4433")
        let familyError = await #expect(throws: QUICError.self) {
            _ = try await client.connect(to: v6, expecting: TestIdentities.b.nodeID)
        }
        #expect(familyError?.code == .invalidArgument)
        await client.close()
        let closedError = await #expect(throws: QUICError.self) {
            _ = try await client.connect(to: .loopbackV4(port: 9), expecting: TestIdentities.b.nodeID)
        }
        #expect(closedError?.code == .endpointClosed)
    }

    @Test("binding a port that is in use fails with a socket error")
    func bindInUse() async throws {
        let first = try await makeEndpoint(TestIdentities.a)
        let error = await #expect(throws: QUICError.self) {
            _ = try await Endpoint.bind(first.localAddress, configuration: EndpointConfiguration(identity: TestIdentities.b))
        }
        #expect(error?.code == .socket)
        await first.close()
    }

    @Test("no file descriptors leak across endpoints, connections and a cancelled dial")
    func noDescriptorLeak() async throws {
        // Warm up once so lazily created process-wide descriptors (event loops, identities) exist before counting.
        try await exerciseOnce()
        let before = openFileDescriptorCount()
        for _ in 0..<20 { try await exerciseOnce() }
        // Twenty rounds that each leaked even one descriptor would show as before + 20. Suites running in parallel
        // open and close a few descriptors of their own meanwhile, hence the small allowance.
        let after = openFileDescriptorCount()
        #expect(after <= before + 8, "descriptors before \(before), after \(after)")
    }

    private func exerciseOnce() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let echo = startEchoServer(server)
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        try await stream.finish()
        _ = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        await connection.close()
        await client.close()
        await server.close()
        echo.cancel()
        _ = await echo.value
    }
}
