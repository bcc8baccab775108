import ProcessTestSupport
import Foundation
import Testing
@testable import HolePunchQUIC
import HolePunchNet

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

extension LoopbackTests {
    @Test("1 MiB echo arrives intact (SHA-256 match)")
    func megabyteEcho() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        var generator = SystemRandomNumberGenerator()
        let payload = (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let reply = try await withDeadline(.seconds(30)) {
            let connection = try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
            let stream = try await connection.openStream()
            // Write and read concurrently: the echo comes back while we are still sending.
            async let received = stream.readToEnd()
            var offset = 0
            while offset < payload.count {
                let end = min(payload.count, offset + 50_000)
                try await stream.write(Array(payload[offset..<end]))
                offset = end
            }
            try await stream.finish()
            return try await received
        }
        #expect(reply.count == payload.count)
        #expect(SHA256.hash(reply) == SHA256.hash(payload))
        await client.close()
        await server.close()
    }

    @Test("simultaneous open: A dials B while B dials A on the same two sockets")
    func simultaneousOpen() async throws {
        let a = try await makeEndpoint(TestIdentities.a)
        let b = try await makeEndpoint(TestIdentities.b)
        let echoA = startEchoServer(a)
        let echoB = startEchoServer(b)
        defer { echoA.cancel(); echoB.cancel() }
        let (fromA, fromB) = try await withDeadline(.seconds(10)) {
            async let ab = a.connect(to: b.localAddress, expecting: TestIdentities.b.nodeID)
            async let ba = b.connect(to: a.localAddress, expecting: TestIdentities.a.nodeID)
            return try await (ab, ba)
        }
        #expect(fromA.peerNodeID == TestIdentities.b.nodeID)
        #expect(fromB.peerNodeID == TestIdentities.a.nodeID)
        // Each side holds its client connection plus the server side of the other's dial.
        #expect(await a.connectionCount == 2)
        #expect(await b.connectionCount == 2)
        for (connection, text) in [(fromA, "from a"), (fromB, "from b")] {
            let stream = try await connection.openStream()
            try await stream.write(Array(text.utf8))
            try await stream.finish()
            let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
            #expect(String(decoding: reply, as: UTF8.self) == text)
        }
        await a.close()
        await b.close()
    }

    @Test("100 concurrent connections into one endpoint")
    func hundredConcurrent() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let client = try await makeEndpoint(TestIdentities.a)
        let target = server.localAddress
        let replies = try await withDeadline(.seconds(60)) {
            try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<100 {
                    group.addTask {
                        let connection = try await client.connect(to: target, expecting: TestIdentities.b.nodeID)
                        let stream = try await connection.openStream()
                        let text = Array("connection \(index)".utf8)
                        try await stream.write(text)
                        try await stream.finish()
                        let reply = try await stream.readToEnd()
                        await connection.close()
                        return reply == text
                    }
                }
                var ok = 0
                for try await matched in group where matched { ok += 1 }
                return ok
            }
        }
        #expect(replies == 100)
        #expect(await server.stats.connectionsAccepted == 100)
        await client.close()
        await server.close()
    }
}

@Suite("QUIC authentication")
struct AuthenticationTests {
    @Test("a wrong expected NodeID fails on both sides, naming expected and received")
    func wrongExpectedNodeID() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) {
                try await client.connect(to: server.localAddress, expecting: TestIdentities.c.nodeID)
            }
        }
        #expect(error?.code == .peerAuthenticationFailed)
        #expect(error?.expectedNodeID == TestIdentities.c.nodeID)
        #expect(error?.receivedNodeID == TestIdentities.b.nodeID)
        // The server saw its handshake fail too (the client's alert), and accepted nothing.
        let serverFailure = try await waitForFailure(server)
        #expect(serverFailure.code == .handshakeFailed)
        #expect(serverFailure.message.contains(TestIdentities.c.nodeID.description))
        #expect(await server.stats.connectionsAccepted == 0)
        #expect(await server.connectionCount == 0)
        await client.close()
        await server.close()
    }

    @Test("a server's allow-list rejects a NodeID it does not name, on both sides")
    func allowListRejects() async throws {
        let server = try await makeEndpoint(TestIdentities.b, policy: .allow([TestIdentities.c.nodeID]))
        let client = try await makeEndpoint(TestIdentities.a)
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) {
                try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
            }
        }
        #expect(error?.code == .handshakeFailed)
        let serverFailure = try await waitForFailure(server)
        #expect(serverFailure.code == .peerAuthenticationFailed)
        #expect(serverFailure.expectedNodeID == TestIdentities.c.nodeID)
        #expect(serverFailure.receivedNodeID == TestIdentities.a.nodeID)
        await client.close()
        await server.close()
    }

    @Test("returnsBeforeConfirmation: the dial returns once we verified the server, before it confirms; data written at once comes back")
    func returnsBeforeConfirmation() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        // Only the client's Initial gets through: the server answers with its whole flight, so the client can
        // complete, but never sees the client's Finished, so it never confirms (HANDSHAKE_DONE).
        let relay = try AlternateDropRelay(to: server.localAddress, clientDatagrams: 1)
        defer { relay.stop() }
        let early = ConnectOptions(handshakeTimeout: .seconds(5), returnsBeforeConfirmation: true)
        let connection: QUICConnection
        do {
            connection = try await withDeadline(.seconds(10)) {
                try await client.connect(to: relay.address, expecting: TestIdentities.b.nodeID, options: early)
            }
        } catch {
            let (c, s) = (await client.stats, await server.stats)
            print("DIAG relay fwd=\(relay.forwarded) drop=\(relay.dropped) client sent=\(c.datagramsSent) recv=\(c.datagramsReceived) dropped=\(c.datagramsDropped) failures=\(await client.recentHandshakeFailures) server recv=\(s.datagramsReceived) sent=\(s.datagramsSent) started=\(s.incomingHandshakesStarted) retries=\(s.retriesSent) refused=\(s.initialsRefused) dropped=\(s.datagramsDropped) sfail=\(await server.recentHandshakeFailures)")
            throw error
        }
        #expect(connection.peerNodeID == TestIdentities.b.nodeID)
        await connection.close()

        // (Without the option the same dial waits for a confirmation that never comes, and fails.)

        // On a clean path, data written at once goes with our Finished and comes back.
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let direct = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID, options: early)
        }
        let stream = try await direct.openStream()
        try await stream.write(Array("early".utf8))
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(String(decoding: reply, as: UTF8.self) == "early")
        await direct.close()
        await client.close()
        await server.close()
    }

    @Test("returnsBeforeConfirmation: a server that rejects our certificate after the dial returned fails the first stream operation with handshakeFailed")
    func earlyReturnThenRejected() async throws {
        let server = try await makeEndpoint(TestIdentities.b, policy: .allow([TestIdentities.c.nodeID]))
        let client = try await makeEndpoint(TestIdentities.a)
        let early = ConnectOptions(handshakeTimeout: .seconds(5), returnsBeforeConfirmation: true)
        // The server decides on our certificate only when our Finished arrives, after its own flight completed our
        // side: the dial returns a connection the server never accepts, and no operation on it may succeed.
        // Usually the dial returns first; under load the server's refusal can arrive before it does, and then the
        // dial itself fails the same way. Either way nothing on this connection succeeds.
        let error = await #expect(throws: QUICError.self) {
            try await withDeadline(.seconds(10)) {
                let connection = try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID,
                                                          options: early)
                let stream = try await connection.openStream()
                try await stream.write(Array("never accepted".utf8))
                try await stream.finish()
                _ = try await stream.readToEnd()
            }
        }
        #expect(error?.code == .handshakeFailed)
        #expect(await server.stats.connectionsAccepted == 0)
        await client.close()
        await server.close()
    }

    @Test("a peer with no certificate is rejected")
    func noCertificate() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a) { $0.presentsCertificate = false }
        await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) {
                try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
            }
        }
        let serverFailure = try await waitForFailure(server)
        #expect(serverFailure.code == .peerAuthenticationFailed)
        #expect(serverFailure.receivedNodeID == nil)
        #expect(await server.stats.connectionsAccepted == 0)
        await client.close()
        await server.close()
    }

    @Test("a decide-callback policy sees the authenticated NodeID")
    func decideCallback() async throws {
        let expected = TestIdentities.a.nodeID
        let server = try await makeEndpoint(TestIdentities.b, policy: .decide { $0.nodeID == expected && $0.serverName == "session-7" })
        let client = try await makeEndpoint(TestIdentities.a)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(
                to: server.localAddress, expecting: TestIdentities.b.nodeID, options: ConnectOptions(serverName: "session-7")
            )
        }
        var iterator = server.incoming.makeAsyncIterator()
        let accepted = try #require(await iterator.next())
        #expect(accepted.peerNodeID == expected)
        #expect(accepted.serverName == "session-7")
        // Without the server name the same peer is refused.
        await #expect(throws: QUICError.self) {
            _ = try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        await connection.close()
        await client.close()
        await server.close()
    }

    /// Waits (bounded) until the endpoint has recorded a handshake failure.
    private func waitForFailure(_ endpoint: Endpoint) async throws -> QUICError {
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        while clock.now < deadline {
            if let failure = await endpoint.recentHandshakeFailures.last { return failure }
            try await Task.sleep(for: .milliseconds(5))
        }
        throw TimeoutError()
    }
}

extension LoopbackTests {
    /// With a 2 s initial RTT the first probe timeout is ~6 s, past the 3 s handshake timeout: a handshake whose
    /// first datagram is lost cannot recover in time, so only the copies can carry it.
    @Test("handshake copies (client and server) carry a handshake across a path that drops every other datagram; one copy times out",
          arguments: [1, 2])
    func handshakeCopiesSurviveAlternateLoss(copies: Int) async throws {
        let server = try await makeEndpoint(TestIdentities.b) { $0.initialRTT = .seconds(2) }
        let relay = try AlternateDropRelay(to: server.localAddress)
        defer { relay.stop() }
        let relayAddress = relay.address
        await server.setHandshakeHintProvider { from in
            from == relayAddress ? HandshakeHints(packetCopies: copies, initialRTT: .seconds(2)) : nil
        }
        let client = try await makeEndpoint(TestIdentities.a)
        let options = ConnectOptions(initialRTT: .seconds(2), handshakeTimeout: .seconds(3), handshakePacketCopies: copies)
        let result: Result<QUICConnection, QUICError>
        do {
            result = .success(try await withDeadline(.seconds(20)) {
                try await client.connect(to: relayAddress, expecting: TestIdentities.b.nodeID, options: options)
            })
        } catch let error as QUICError {
            result = .failure(error)
        }
        switch (copies, result) {
        case (1, .failure(let error)):
            #expect(error.code == .handshakeTimeout)
        case (2, .success(let connection)):
            #expect(connection.peerNodeID == TestIdentities.b.nodeID)
            await connection.close()
        default:
            Issue.record("copies \(copies): unexpected \(result)")
        }
        #expect(relay.dropped > 0)
        await client.close()
        await server.close()
    }
}

extension LoopbackTests {
    @Test("a dual-stack endpoint on :: dials an IPv4 endpoint and echoes; it reaches both families")
    func dualStackDialsIPv4() async throws {
        let wildcard6 = SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0)
        guard let client = try? await Endpoint.bind(wildcard6, configuration: EndpointConfiguration(identity: TestIdentities.a)) else {
            return  // no IPv6 on this host
        }
        guard client.reachableFamilies == [.ipv4, .ipv6] else {
            await client.close()
            return  // net.ipv6.bindv6only=1: the socket is IPv6-only
        }
        let server = try await makeEndpoint(TestIdentities.b)
        #expect(server.reachableFamilies == [.ipv4])
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let stream = try await connection.openStream()
        try await stream.write(Array("mapped".utf8))
        try await stream.finish()
        let reply = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(String(decoding: reply, as: UTF8.self) == "mapped")
        #expect(connection.remoteAddress == server.localAddress, "IPv4 above the socket")
        await connection.close()
        await client.close()
        await server.close()
    }
}
