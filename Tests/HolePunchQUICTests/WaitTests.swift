import ProcessTestSupport
import Foundation
import Testing
import HolePunchNet
@testable import HolePunchQUIC

/// Every wait honours cancellation and serves concurrent waiters; reads tell an end from an error.
@Suite("QUIC waits and ends")
struct WaitTests {
    @Test("a cancelled read returns promptly with cancelled, and a later read still gets the data")
    func cancelledRead() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let (stream, incoming) = try await streamPair(connection, serverSide, carrying: [1])
        let reader = Task { try await incoming.read() }
        try await waitForSuspended(server, count: 1)
        await expectCancelled(reader)
        #expect(await server.suspendedWaiterCount == 0)
        try await stream.write([2])
        #expect(try await withDeadline(.seconds(10)) { try await incoming.read() } == [2])
        await client.close()
        await server.close()
    }

    @Test("a cancelled acceptStream returns promptly, and a later one gets the stream")
    func cancelledAccept() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let acceptor = Task { try await serverSide.acceptStream() }
        try await waitForSuspended(server, count: 1)
        await expectCancelled(acceptor)
        let stream = try await connection.openStream()
        try await stream.write([7])
        let incoming = try #require(try await withDeadline(.seconds(10)) { try await serverSide.acceptStream() })
        #expect(try await incoming.read() == [7])
        await client.close()
        await server.close()
    }

    @Test("a cancelled waitClosed returns promptly with cancelled; the connection stays open")
    func cancelledWaitClosed() async throws {
        let (client, server, connection, _) = try await connectedPair()
        let waiter = Task { await connection.waitClosed() }
        try await waitForSuspended(client, count: 1)
        waiter.cancel()
        let reason = try await withDeadline(.seconds(5)) { await waiter.value }
        #expect(reason.code == .cancelled)
        #expect(await connection.isOpen)
        await client.close()
        await server.close()
    }

    @Test("a write waiting for send-buffer room returns promptly when cancelled, having queued nothing")
    func cancelledWrite() async throws {
        let (client, server, connection, _) = try await connectedPair(
            server: { $0.streamReceiveWindow = 16 << 10 }, client: { $0.streamSendBuffer = 32 << 10 })
        let stream = try await connection.openStream()
        // The peer never reads: 16 KiB of window, so 64 KiB stay unacknowledged, past the 32 KiB buffer.
        try await stream.write([UInt8](repeating: 1, count: 64 << 10))
        let writer = Task { try await stream.write([UInt8](repeating: 2, count: 1024)) }
        try await waitForSuspended(client, count: 1)
        await expectCancelled(writer)
        await client.close()
        await server.close()
    }

    @Test("two concurrent readers of one stream both get bytes; neither is lost")
    func twoReaders() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let (stream, incoming) = try await streamPair(connection, serverSide, carrying: [0])
        let first = Task { try await incoming.read() }
        let second = Task { try await incoming.read() }
        try await waitForSuspended(server, count: 2)
        try await stream.write([1])
        try await stream.finish()
        let results = try await withDeadline(.seconds(10)) { [try await first.value, try await second.value] }
        // One reader gets the byte, the other the end of the stream (or a byte if they arrived apart).
        #expect(results.compactMap { $0 }.flatMap { $0 } == [1])
        await client.close()
        await server.close()
    }

    @Test("two concurrent acceptors each get a different stream")
    func twoAcceptors() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let first = Task { try await serverSide.acceptStream()?.id }
        let second = Task { try await serverSide.acceptStream()?.id }
        try await waitForSuspended(server, count: 2)
        for byte: UInt8 in [1, 2] {
            let stream = try await connection.openStream()
            try await stream.write([byte])
        }
        let ids = try await withDeadline(.seconds(10)) { [try await first.value, try await second.value] }
        #expect(Set(ids.compactMap { $0 }).count == 2)
        await client.close()
        await server.close()
    }

    @Test("a reset stream reports the reset on every read, never a clean end afterwards")
    func resetIsSticky() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let (stream, incoming) = try await streamPair(connection, serverSide, carrying: [1])
        await stream.reset(errorCode: 9)
        for _ in 0..<2 {
            let error = await #expect(throws: QUICError.self) { _ = try await withDeadline(.seconds(10)) { try await incoming.read() } }
            #expect(error?.code == .streamReset)
        }
        await client.close()
        await server.close()
    }

    @Test("writing after a reset fails even when everything written before it was delivered")
    func writeAfterResetFails() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let (stream, _) = try await streamPair(connection, serverSide, carrying: [1, 2, 3])
        try await withDeadline(.seconds(10)) { try await stream.delivered() }
        await stream.reset(errorCode: 7)
        let writeError = await #expect(throws: QUICError.self) { try await stream.write([4]) }
        #expect(writeError?.code == .streamReset)
        let finishError = await #expect(throws: QUICError.self) { try await stream.finish() }
        #expect(finishError?.code == .streamReset)
        await client.close()
        await server.close()
    }

    @Test("after a local close, reads and acceptStream throw closedLocally instead of ending cleanly")
    func localCloseIsAnError() async throws {
        let (client, server, connection, _) = try await connectedPair()
        let stream = try await connection.openStream()
        await connection.abort()
        let readError = await #expect(throws: QUICError.self) { _ = try await stream.read() }
        #expect(readError?.code == .closedLocally)
        let acceptError = await #expect(throws: QUICError.self) { _ = try await connection.acceptStream() }
        #expect(acceptError?.code == .closedLocally)
        await client.close()
        await server.close()
    }

    @Test("a peer's close with code 0 before the FIN is an error for the reader; with no stream, acceptStream ends")
    func peerCloseBeforeFin() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        let incoming = try #require(try await withDeadline(.seconds(10)) { try await serverSide.acceptStream() })
        await connection.abort(errorCode: 0)
        _ = try await withDeadline(.seconds(10)) { await serverSide.waitClosed() }
        #expect(try await incoming.read() == [1, 2, 3])
        let error = await #expect(throws: QUICError.self) { _ = try await incoming.read() }
        #expect(error?.code == .connectionClosed)
        #expect(error?.applicationErrorCode == 0)
        #expect(try await serverSide.acceptStream() == nil)
        await client.close()
        await server.close()
    }
}

@Suite("QUIC delivery and graceful close")
struct GracefulCloseTests {
    @Test("delivered() returns once the peer acknowledged the data and the FIN; the peer reads it all after the close")
    func deliveredThenClose() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let stream = try await connection.openStream()
        let payload = [UInt8](repeating: 5, count: 200_000)
        try await stream.write(payload)
        try await stream.finish()
        try await withDeadline(.seconds(10)) { try await stream.delivered() }
        #expect(await connection.close())
        let incoming = try #require(try await withDeadline(.seconds(10)) { try await serverSide.acceptStream() })
        #expect(try await withDeadline(.seconds(10)) { try await incoming.readToEnd() } == payload)
        await client.close()
        await server.close()
    }

    @Test("delivered() throws streamReset when the peer stops reading before everything was acknowledged")
    func deliveredAfterStopSending() async throws {
        let (client, server, connection, serverSide) = try await connectedPair(server: { $0.streamReceiveWindow = 16 << 10 })
        let stream = try await connection.openStream()
        try await stream.write([UInt8](repeating: 1, count: 64 << 10))
        let incoming = try #require(try await withDeadline(.seconds(10)) { try await serverSide.acceptStream() })
        await incoming.reset(errorCode: 3)
        let error = await #expect(throws: QUICError.self) { try await withDeadline(.seconds(10)) { try await stream.delivered() } }
        #expect(error?.code == .streamReset)
        await client.close()
        await server.close()
    }

    @Test("a graceful close towards a silent peer gives up after its timeout and reports the data undelivered")
    func closeTimesOut() async throws {
        let (client, server, connection) = try await connectionToASilentPeer()
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        try await stream.finish()
        let delivered = try await withDeadline(.seconds(10)) { await connection.close(timeout: .milliseconds(300)) }
        #expect(!delivered)
        #expect(!(await connection.isOpen))
        await client.close()
        await server.close()
    }

    @Test("a cancelled delivered() returns promptly with cancelled")
    func cancelledDelivered() async throws {
        let (client, server, connection) = try await connectionToASilentPeer()
        let stream = try await connection.openStream()
        try await stream.write([1])
        let waiter = Task { try await stream.delivered() }
        try await waitForSuspended(client, count: 1)
        await expectCancelled(waiter)
        await client.close()
        await server.close()
    }
}

/// A connection through a relay that is stopped at once: from then on nothing reaches the peer, and nothing
/// comes back.
private func connectionToASilentPeer() async throws -> (client: Endpoint, server: Endpoint, connection: QUICConnection) {
    let server = try await makeEndpoint(TestIdentities.b)
    let relay = try AlternateDropRelay(to: server.localAddress, lossRate: 0, seed: 1)
    let client = try await makeEndpoint(TestIdentities.a)
    let connection = try await withDeadline(.seconds(10)) {
        try await client.connect(to: relay.address, expecting: TestIdentities.b.nodeID)
    }
    relay.stop()
    return (client, server, connection)
}

/// Cancels `task`, suspended in a wait, and expects it to end within 5 s with `cancelled`.
func expectCancelled<T: Sendable>(_ task: Task<T, any Error>, sourceLocation: SourceLocation = #_sourceLocation) async {
    task.cancel()
    let error = await #expect(throws: QUICError.self, sourceLocation: sourceLocation) {
        _ = try await withDeadline(.seconds(5)) { try await task.value }
    }
    #expect(error?.code == .cancelled, sourceLocation: sourceLocation)
}

/// Waits (bounded) until `count` callers are suspended in the endpoint's waits.
func waitForSuspended(_ endpoint: Endpoint, count: Int) async throws {
    let clock = ContinuousClock()
    let deadline = clock.now + .seconds(10)
    while clock.now < deadline {
        if await endpoint.suspendedWaiterCount >= count { return }
        await Task.yield()
        try await Task.sleep(for: .milliseconds(1))
    }
    throw TimeoutError()
}
