import ProcessTestSupport
import Synchronization
import Testing
import HolePunchNet
@testable import HolePunchQUIC

/// Keeping a connection when its path changes under it: a NAT that rebinds (the peer's packets arrive from a new
/// port) and an active path that dies while another known path still works (issue 14, item 5).
@Suite("Path layer: rebinding and dead paths", .serialized)
struct PathKeepingTests {
    /// A deterministic payload of `size` bytes.
    private static func payload(_ size: Int) -> [UInt8] {
        (0..<size).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
    }

    /// Sends `payload` on a new stream of `sender` while `receiver` reads it; calls `midway` once a quarter arrived.
    /// Returns what arrived.
    private static func transfer(
        _ payload: [UInt8], from sender: QUICConnection, to receiver: QUICConnection, midway: @escaping @Sendable () throws -> Void
    ) async throws -> [UInt8] {
        let writer = Task {
            let stream = try await sender.openStream()
            for start in stride(from: 0, to: payload.count, by: 32_768) {
                try await stream.write(Array(payload[start..<min(start + 32_768, payload.count)]))
            }
            try await stream.finish()
        }
        defer { writer.cancel() }
        return try await withDeadline(.seconds(20)) {
            guard let stream = try await receiver.acceptStream() else { return [] }
            var received: [UInt8] = []
            var calledMidway = false
            while let chunk = try await stream.read() {
                received += chunk
                if !calledMidway && received.count >= payload.count / 4 {
                    calledMidway = true
                    try midway()
                }
            }
            return received
        }
    }

    /// The next change of the active path, or nil if none comes within five seconds.
    private static func nextChange(_ changes: AsyncStream<PathChange>) async throws -> PathChange? {
        try await withDeadline(.seconds(5)) {
            var iterator = changes.makeAsyncIterator()
            return await iterator.next()
        }
    }

    private static func connect(
        _ client: Endpoint, _ server: Endpoint, via address: SocketAddress
    ) async throws -> (QUICConnection, QUICConnection) {
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: address, expecting: TestIdentities.b.nodeID)
        }
        let accepted = try await withDeadline(.seconds(10)) {
            var incoming = server.incoming.makeAsyncIterator()
            return await incoming.next()
        }
        return (connection, try #require(accepted))
    }

    @Test("the client's NAT rebinds mid-transfer: the server learns the new port, validates it and moves; every byte arrives")
    func clientRebindingIsFollowed() async throws {
        try await rebindMidTransfer(serverSide: false)
    }

    @Test("the server's NAT rebinds mid-transfer: the client learns the new port, validates it and moves; every byte arrives")
    func serverRebindingIsFollowed() async throws {
        try await rebindMidTransfer(serverSide: true)
    }

    /// Dials through a ``RebindingForwarder``; the rebinding side's peer sends 4 MiB, and a quarter of the way the
    /// forwarder gives the rebinding side's flow a new port. The receiver must follow it (`rebinding`), byte-exact.
    private func rebindMidTransfer(serverSide: Bool) async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let nat = try RebindingForwarder(to: server.localAddress)
        defer { nat.close() }
        let (connection, serverConnection) = try await Self.connect(client, server, via: nat.frontAddress)
        // The server's NAT rebinding is seen by the client (which receives), the client's by the server.
        let (sender, receiver) = serverSide ? (serverConnection, connection) : (connection, serverConnection)
        let address = { serverSide ? nat.frontAddress : nat.backAddress }
        let changes = await receiver.pathChanges()
        let old = PathRoute.direct(address())
        let payload = Self.payload(4 << 20)
        let received = try await Self.transfer(payload, from: sender, to: receiver) {
            if serverSide { try nat.rebindFront() } else { try nat.rebindBack() }
        }
        #expect(received.count == payload.count)
        #expect(received == payload)
        let change = try await Self.nextChange(changes)
        #expect(change == PathChange(from: old, to: .direct(address()), reason: .rebinding))
        await connection.abort()
        await client.close()
        await server.close()
    }

    @Test("the active path dies mid-transfer while a second validated path works: the connection moves there by itself")
    func deadActivePathMoves() async throws {
        let pair = try await PathReviewTests.Pair()
        let clientChanges = await pair.connection.pathChanges()
        let serverChanges = await pair.serverConnection.pathChanges()
        // The second path is known and validated, but nobody switches to it.
        let spare = PathRoute.direct(pair.second.address)
        try await pair.connection.addPath(spare)
        try await pair.connection.validatePath(spare)

        let dead = pair.first.address
        let network = pair.network
        let payload = Self.payload(2 << 20)
        let received = try await Self.transfer(payload, from: pair.connection, to: pair.serverConnection) {
            network.setCondition { $0.from == dead || $0.to == dead ? .drop : .deliver }
        }
        #expect(received == payload)
        // Either side may notice the silence first (the server has flow-control updates in flight too): that side
        // moves, the other follows it.
        let clientChange = try #require(try await Self.nextChange(clientChanges))
        let serverChange = try #require(try await Self.nextChange(serverChanges))
        #expect(clientChange.from == .direct(dead) && clientChange.to == spare)
        #expect(serverChange.from == .direct(dead) && serverChange.to == spare)
        #expect(Set([clientChange.reason, serverChange.reason]) == [.pathFailed, .peerMoved])
        await pair.close()
    }

    @Test("a side that switches with nothing to send is followed at once: the switch is announced, not inferred from its next packet")
    func idleSwitchIsFollowed() async throws {
        let pair = try await PathReviewTests.Pair()
        let serverChanges = await pair.serverConnection.pathChanges()
        let route = PathRoute.direct(pair.second.address)
        try await pair.connection.addPath(route)
        try await pair.connection.validatePath(route)
        // No stream, no data: the client's next QUIC packet would be a keep-alive 25 s away.
        try await pair.connection.switchPath(to: route)
        let followed = try await Self.nextChange(serverChanges)
        #expect(followed == PathChange(from: .direct(pair.first.address), to: route, reason: .peerMoved))
        await pair.close()
    }

    @Test("keep-alives default to 25 s, below common NAT UDP timeouts, when nothing measured the NAT")
    func keepAliveDefault() {
        #expect(EndpointConfiguration(identity: TestIdentities.a).keepAliveInterval == .seconds(25))
    }

    @Test("the path table records an address the peer's packets come from unannounced, challenges it, and follows once it answers")
    func tableFollowsRebinding() {
        let a = PathRoute.direct(.loopbackV4(port: 1000))
        let rebound = PathRoute.direct(.loopbackV4(port: 3000))
        var table = PathTable(stable: a)
        let onActive = table.packetReceived(on: a, now: 1_000_000_000)
        let first = table.packetReceived(on: rebound, now: 1_000_000_000)
        #expect(onActive == .heardOnActive && first == .challenge)
        #expect(table.statuses.map(\.route) == [a, rebound])
        table.challengeSent(on: rebound, challenge: 9, now: 1_000_000_000)
        // Not validated yet: nothing moves, and the next packet does not challenge again within 50 ms.
        let second = table.packetReceived(on: rebound, now: 1_010_000_000)
        #expect(second == PathTable.PacketAction.none)
        table.challengeSent(on: rebound, challenge: 10, now: 1_060_000_000)
        // An answer to the earlier of two outstanding challenges still validates.
        let answered = table.responseReceived(on: rebound, challenge: 9)
        #expect(answered == true)
        let change = table.followAnnounced(rebound)
        #expect(change == PathChange(from: a, to: rebound, reason: .rebinding))
        #expect(table.active == rebound)
    }

    @Test("silence on the active path starts one re-check after three PTOs (at least six initial RTTs); hearing the peer ends it")
    func livenessDetectsSilence() {
        let ms: UInt64 = 1_000_000
        #expect(PathLiveness.silenceLimit(pto: 50 * ms, initialRTT: 100 * ms) == 600 * ms)
        #expect(PathLiveness.silenceLimit(pto: 300 * ms, initialRTT: 100 * ms) == 900 * ms)
        var liveness = PathLiveness()
        // (in flight, now in ms) → whether a re-check starts. Nothing outstanding: however long the quiet, none.
        let steps: [(Bool, UInt64, Bool)] = [
            (false, 0, false), (false, 5_000, false), (true, 6_000, false), (true, 6_599, false), (true, 6_600, true),
            // One re-check at a time.
            (true, 8_000, false),
        ]
        for (inFlight, now, expected) in steps {
            let started = liveness.check(inFlight: inFlight, now: now * ms, limit: 600 * ms)
            #expect(started == expected, "at \(now) ms")
        }
        #expect(liveness.isRechecking)
        liveness.heardOnActive()
        #expect(!liveness.isRechecking)
        let again = liveness.check(inFlight: true, now: 8_100 * ms, limit: 600 * ms)
        #expect(!again)
    }
}
