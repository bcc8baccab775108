import ProcessTestSupport
import Foundation
import Testing
import HolePunchNet
@testable import HolePunchQUIC

/// How one side's read of a whole stream ended.
enum ReadOutcome: Sendable, Equatable {
    /// A clean end of stream after every byte the other side wrote.
    case delivered
    /// A clean end of stream (or no stream at all) with bytes missing: the silent loss these tests hunt.
    case silentLoss(Int)
    /// An error (typed): the application learns that something was lost.
    case failed(QUICError.Code)
    /// Neither an end nor an error within the test's deadline.
    case hung
    /// The connection was never made (the handshake lost too much): no data was at stake.
    case notConnected
}

@Suite("QUIC delivery at the end of a connection")
struct DeliveryTests {
    /// The issue-18 scenario on loopback: through a relay that drops 20 % of datagrams each way, a client writes N
    /// bytes, finishes; an echo server reads to the end, writes them back, finishes and closes at once, as
    /// `holepunch peer --echo` does. Neither side may see a clean end with fewer bytes; with the graceful close,
    /// both must see everything.
    @Test("write, finish, close through 20 % loss: 120 runs, no clean end with missing bytes, everything delivered")
    func lossyEchoDeliversOrFails() async throws {
        let runs = 120
        let outcomes = try await withThrowingTaskGroup(of: (ReadOutcome, ReadOutcome).self) { group in
            var results: [(ReadOutcome, ReadOutcome)] = []
            for seed in 0..<runs {
                // At most 12 runs at a time: two cores are shared with other work.
                if seed >= 12, let result = try await group.next() { results.append(result) }
                group.addTask { try await lossyEchoRun(seed: UInt64(seed + 1), size: 3_000) }
            }
            for try await result in group { results.append(result) }
            return results
        }
        let connected = outcomes.filter { $0.0 != .notConnected }
        let silent = outcomes.flatMap { [$0.0, $0.1] }.filter { if case .silentLoss = $0 { return true } else { return false } }
        let failed = outcomes.flatMap { [$0.0, $0.1] }.filter {
            switch $0 {
            case .failed, .hung: return true
            default: return false
            }
        }
        let delivered = connected.filter { $0 == (.delivered, .delivered) }.count
        print("lossy echo: runs=\(runs) connected=\(connected.count) delivered=\(delivered) silentLoss=\(silent.count) failed=\(failed.count) \(failed)")
        #expect(silent.isEmpty, "clean end with missing bytes: \(silent)")
        #expect(connected.count >= runs * 9 / 10)
        #expect(delivered == connected.count, "errors: \(failed)")
    }
}

/// One run: returns (what the echo server read, what the client read back).
private func lossyEchoRun(seed: UInt64, size: Int) async throws -> (ReadOutcome, ReadOutcome) {
    let configure: (inout EndpointConfiguration) -> Void = { $0.idleTimeout = .seconds(5) }
    let server = try await makeEndpoint(TestIdentities.b, configure: configure)
    let relay = try AlternateDropRelay(to: server.localAddress, lossRate: 0.2, seed: seed)
    let client = try await makeEndpoint(TestIdentities.a, configure: configure)
    defer { relay.stop() }
    let relayAddress = relay.address
    await server.setHandshakeHintProvider { $0 == relayAddress ? HandshakeHints(packetCopies: 2) : nil }
    let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }

    let serverSide = Task { () -> ReadOutcome in
        var iterator = server.incoming.makeAsyncIterator()
        guard let connection = await iterator.next() else { return .notConnected }
        return await classify(expected: payload) {
            guard let stream = try await connection.acceptStream() else { return nil }
            let received = try await stream.readToEnd()
            try await stream.write(received)
            try await stream.finish()
            await connection.close()
            return received
        }
    }
    let clientOutcome: ReadOutcome
    do {
        let connection = try await client.connect(
            to: relayAddress, expecting: TestIdentities.b.nodeID,
            options: ConnectOptions(handshakeTimeout: .seconds(10), handshakePacketCopies: 2)
        )
        clientOutcome = await classify(expected: payload) {
            let stream = try await connection.openStream()
            try await stream.write(payload)
            try await stream.finish()
            let reply = try await stream.readToEnd()
            await connection.close()
            return reply
        }
    } catch {
        clientOutcome = .notConnected
    }
    let serverOutcome: ReadOutcome
    if clientOutcome == .notConnected {
        serverSide.cancel()
        serverOutcome = .notConnected
    } else {
        serverOutcome = try await withDeadline(.seconds(30)) { await serverSide.value }
    }
    await client.close()
    await server.close()
    return (serverOutcome, clientOutcome)
}

/// Runs a read of a whole stream (nil: no stream came) with a deadline and names how it ended.
private func classify(expected: [UInt8], _ body: @escaping @Sendable () async throws -> [UInt8]?) async -> ReadOutcome {
    do {
        guard let received = try await withDeadline(.seconds(30), body) else { return .silentLoss(0) }
        return received == expected ? .delivered : .silentLoss(received.count)
    } catch let error as QUICError {
        return .failed(error.code)
    } catch {
        return .hung
    }
}
