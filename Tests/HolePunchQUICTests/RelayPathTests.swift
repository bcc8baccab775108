import ProcessTestSupport
import Testing
import HolePunchNet
import CGnuTLS
@testable import HolePunchQUIC

/// The relayed route of the path layer against ``TestRelay`` (a loopback stand-in for a TURN server).
@Suite("Relayed path below QUIC", .serialized)
struct RelayPathTests {
    /// Endpoint `a` owns a relay allocation; `b` is its peer, which sees only the relayed address.
    struct Setup {
        let a: Endpoint
        let b: Endpoint
        let relay: TestRelay

        init(idleTimeout: Duration = .seconds(30)) async throws {
            a = try await makeEndpoint(TestIdentities.a) { $0.idleTimeout = idleTimeout }
            b = try await makeEndpoint(TestIdentities.b) { $0.idleTimeout = idleTimeout }
            relay = try TestRelay(client: a.localAddress)
            try await a.attachRelay(relay.framing())
        }

        /// The route `a` reaches `b` on through the relay.
        var route: PathRoute { .relay(server: relay.server, peer: b.localAddress) }

        /// `b` dials the relayed address as a plain UDP address; `a` accepts through the allocation.
        func acceptOverRelay() async throws -> (a: QUICConnection, b: QUICConnection) {
            let dialled = try await withDeadline(.seconds(10)) {
                try await b.connect(to: relay.relayed, expecting: TestIdentities.a.nodeID)
            }
            let accepted = try await withDeadline(.seconds(10)) {
                var incoming = a.incoming.makeAsyncIterator()
                return await incoming.next()
            }
            return (try #require(accepted), dialled)
        }

        func close() async {
            relay.close()
            await a.close()
            await b.close()
        }
    }

    @Test("a dial through the relay completes; the peer sees the relayed address and a stream echoes through it")
    func dialOverRelay() async throws {
        let setup = try await Setup()
        let echo = startEchoServer(setup.b)
        defer { echo.cancel() }
        let connection = try await withDeadline(.seconds(10)) {
            try await setup.a.connect(via: setup.route, expecting: TestIdentities.b.nodeID)
        }
        #expect(connection.remoteAddress == setup.b.localAddress)
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let stream = try await connection.openStream()
        try await stream.write(payload)
        try await stream.finish()
        let echoed = try await withDeadline(.seconds(10)) { try await stream.readToEnd() }
        #expect(echoed == payload)
        #expect(await connection.paths() == [PathStatus(route: setup.route, isValidated: true, isActive: true)])
        let stats = await setup.a.stats
        #expect(stats.relayedDatagramsSent > 0 && stats.relayedDatagramsReceived > 0)
        await connection.close()
        await setup.close()
    }

    @Test("a peer dialling the relayed address gets a connection accepted through the allocation")
    func acceptOverRelay() async throws {
        let setup = try await Setup()
        let (accepted, dialled) = try await setup.acceptOverRelay()
        #expect(accepted.remoteAddress == setup.b.localAddress)
        #expect(dialled.remoteAddress == setup.relay.relayed)
        #expect(await accepted.paths().map(\.route) == [setup.route])
        let reader = Task { try await accepted.acceptStream()?.readToEnd() }
        let stream = try await dialled.openStream()
        try await stream.write(Array("through the relay".utf8))
        try await stream.finish()
        let received = try await withDeadline(.seconds(10)) { try await reader.value }
        #expect(received == Array("through the relay".utf8))
        await dialled.close()
        await setup.close()
    }

    @Test("a relayed connection moves to a direct path mid-stream and back when it dies; no byte is lost or reordered")
    func relayToDirectAndBack() async throws {
        let setup = try await Setup()
        // The direct path runs through a forwarder, so the test can kill it.
        let direct = try UDPForwarder(to: setup.b.localAddress)
        defer { direct.close() }
        let (connection, peer) = try await setup.acceptOverRelay()
        try await RelayMoves.relayToDirectAndBack(
            connection: connection, peer: peer, relayRoute: setup.route, relayed: setup.relay.relayed,
            direct: direct, size: 3 << 20
        )
        let stats = await setup.a.stats
        #expect(stats.relayToDirectMoves == 1 && stats.directToRelayMoves == 1 && stats.pathSwitches == 2)
        await peer.close()
        await setup.close()
    }

    @Test("a direct connection adds the relay as a path, validates it and moves onto it; the peer follows")
    func directToRelay() async throws {
        let setup = try await Setup()
        let reader = Task { () -> [UInt8]? in
            var incoming = setup.b.incoming.makeAsyncIterator()
            return try await incoming.next()?.acceptStream()?.readToEnd()
        }
        let connection = try await withDeadline(.seconds(10)) {
            try await setup.a.connect(to: setup.b.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        try await connection.addPath(setup.route)
        try await connection.validatePath(setup.route)
        try await connection.switchPath(to: setup.route)
        let forwardedBefore = setup.relay.forwarded
        try await stream.write([4, 5, 6])
        try await stream.finish()
        let received = try await withDeadline(.seconds(10)) { try await reader.value }
        #expect(received == [1, 2, 3, 4, 5, 6])
        #expect(setup.relay.forwarded > forwardedBefore)
        let stats = await setup.a.stats
        #expect(stats.directToRelayMoves == 1 && stats.relayToDirectMoves == 0)
        // The peer sees our relayed address as one more direct address of ours, and follows there.
        #expect(await eventually { await setup.b.stats.pathSwitches == 1 })
        await connection.close()
        await setup.close()
    }

    @Test("the relay dies while the connection is on the direct path: the connection carries on")
    func relayDiesWhileDirect() async throws {
        let setup = try await Setup()
        let (connection, peer) = try await setup.acceptOverRelay()
        try await RelayMoves.relayDiesWhileDirect(
            connection: connection, peer: peer, direct: .direct(setup.b.localAddress), kill: setup.relay.kill
        )
        await peer.close()
        await setup.close()
    }

    @Test("the relay dies while the connection is relayed: it ends with an idle-timeout error, within the timeout")
    func relayDiesWhileRelayed() async throws {
        // 5 s: on a loaded machine (CI) a 1 s and then a 2 s idle timeout ran out between the accept and the write.
        let setup = try await Setup(idleTimeout: .seconds(5))
        let (connection, peer) = try await setup.acceptOverRelay()
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        setup.relay.kill()
        // A margin over the timeout: ngtcp2 ends an idle connection at max(idle timeout, 3 PTO).
        let error = try await withDeadline(.seconds(12)) { await connection.waitClosed() }
        #expect(error.code == .idleTimeout)
        _ = try await withDeadline(.seconds(12)) { await peer.waitClosed() }
        await setup.close()
    }

    @Test("the relay server's own messages go to nonQUICDatagrams; a STUN-range payload a peer relays is dropped")
    func controlMessagesAndRelayedSTUN() async throws {
        let setup = try await Setup()
        let droppedBefore = await setup.a.stats.datagramsDropped
        // A peer's probe through the relay would pass for a direct one: the endpoint does not hand it on.
        try await setup.b.send(datagram: [0x00, 0x01, 0x00, 0x00], to: setup.relay.relayed)
        #expect(await eventually(.seconds(5)) { await setup.a.stats.datagramsDropped > droppedBefore })
        setup.relay.sendFromServer([0x01, 0x01, 0x00, 0x00])
        let first = try await withDeadline(.seconds(5)) {
            var iterator = setup.a.nonQUICDatagrams.makeAsyncIterator()
            return await iterator.next()
        }
        #expect(first == .datagram([0x01, 0x01, 0x00, 0x00], from: setup.relay.server))
        await setup.close()
    }

    @Test("a QUIC packet of a connection forwarded from a peer address the connection does not know is dropped before QUIC")
    func unknownRelayedSourceIsDropped() async throws {
        let setup = try await Setup()
        let echo = startEchoServer(setup.b)
        defer { echo.cancel() }
        let connection = try await withDeadline(.seconds(10)) {
            try await setup.a.connect(to: setup.b.localAddress, expecting: TestIdentities.b.nodeID)
        }
        // A short-header packet to one of the connection's IDs, as if a peer the connection never saw sent it.
        let cid = try #require(await setup.a.someConnectionID())
        let packet = [0x40] + cid + [UInt8](repeating: 0x5a, count: 40)
        let stranger = SocketAddress.loopbackV4(port: 9)
        let droppedBefore = await setup.a.stats.datagramsDropped
        setup.relay.sendFromServer(TestRelay.header(stranger) + packet)
        #expect(await eventually { await setup.a.stats.datagramsDropped > droppedBefore })
        #expect(await connection.paths().map(\.route) == [.direct(setup.b.localAddress)])
        #expect(await setup.a.stats.relayedDatagramsReceived == 1)
        await connection.abort()
        await setup.close()
    }

    @Test("a relayed dial needs an attached relay; after detaching, sends on the route are refused and counted")
    func detachedRelayRefusesSends() async throws {
        let setup = try await Setup()
        let echo = startEchoServer(setup.b)
        defer { echo.cancel() }
        let elsewhere = PathRoute.relay(server: .loopbackV4(port: 9), peer: setup.b.localAddress)
        await #expect(throws: QUICError.self) {
            try await setup.a.connect(via: elsewhere, expecting: TestIdentities.b.nodeID)
        }
        let connection = try await withDeadline(.seconds(10)) {
            try await setup.a.connect(via: setup.route, expecting: TestIdentities.b.nodeID)
        }
        await setup.a.detachRelay(server: setup.relay.server)
        let stream = try await connection.openStream()
        try await stream.write([1])
        #expect(await eventually(.seconds(5)) { await setup.a.stats.relaySendsRefused > 0 })
        await connection.abort()
        await setup.close()
    }

    @Test("a relayed path and a direct path to the same peer address are two paths of the table")
    func relayAndDirectAreDistinct() {
        let peer = SocketAddress.loopbackV4(port: 4000)
        let relayed = PathRoute.relay(server: .loopbackV4(port: 3478), peer: peer)
        var table = PathTable(stable: relayed)
        let added = table.add(.direct(peer))
        #expect(added)
        #expect(table.statuses.map(\.route) == [relayed, .direct(peer)])
        #expect(relayed.address == .loopbackV4(port: 3478) && relayed.peer == peer && relayed.isRelayed)
        #expect(!table.carries(.direct(peer)))
        let switched = table.activate(.direct(peer))
        #expect(switched == nil)
    }
}

/// The move sequence both relay suites run (the stand-in relay here, coturn in `RelayCoturnTests`).
enum RelayMoves {
    /// On a connection accepted over a relay: writes a third of `size` bytes, validates and switches to the direct
    /// path through `direct` (the peer follows), writes a third, kills `direct` and switches back to the relay (the
    /// peer follows), writes the rest; checks that every byte arrived in order and that each move was one
    /// `PathChange` on both sides. Returns the SHA-256 of what was sent and of what arrived.
    @discardableResult
    static func relayToDirectAndBack(
        connection: QUICConnection, peer: QUICConnection, relayRoute: PathRoute, relayed: SocketAddress,
        direct: UDPForwarder, size: Int
    ) async throws -> (sentDigest: [UInt8], receivedDigest: [UInt8]) {
        let changes = await connection.pathChanges()
        let peerChanges = await peer.pathChanges()
        let payload = (0..<size).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        let reader = Task { try await peer.acceptStream()?.readToEnd(limit: 8 << 20) }
        let stream = try await connection.openStream()
        let third = payload.count / 3
        try await write(stream, payload[0..<third])

        let directRoute = PathRoute.direct(direct.address)
        try await connection.addPath(directRoute)
        try await connection.validatePath(directRoute)
        try await connection.switchPath(to: directRoute)
        let toDirect = try await nextChange(peerChanges)
        #expect(toDirect == PathChange(from: .direct(relayed), to: directRoute, isLocal: false))
        try await write(stream, payload[third..<(2 * third)])

        direct.kill()
        try await connection.switchPath(to: relayRoute)
        try await write(stream, payload[(2 * third)...])
        try await stream.finish()
        let toRelay = try await nextChange(peerChanges)
        #expect(toRelay == PathChange(from: directRoute, to: .direct(relayed), isLocal: false))
        let received = try #require(try await withDeadline(.seconds(30)) { try await reader.value })
        #expect(received.count == payload.count)
        #expect(received == payload)
        let moves = [try await nextChange(changes), try await nextChange(changes)]
        #expect(moves == [
            PathChange(from: relayRoute, to: directRoute, isLocal: true),
            PathChange(from: directRoute, to: relayRoute, isLocal: true),
        ])
        return (sha256(payload), sha256(received))
    }

    /// Moves a connection accepted over a relay to `direct`, calls `kill` (the relay dies), and checks that a
    /// transfer after that arrives whole.
    static func relayDiesWhileDirect(
        connection: QUICConnection, peer: QUICConnection, direct: PathRoute, kill: () -> Void
    ) async throws {
        try await connection.addPath(direct)
        try await connection.validatePath(direct)
        try await connection.switchPath(to: direct)
        kill()
        let reader = Task { try await peer.acceptStream()?.readToEnd() }
        let stream = try await connection.openStream()
        let payload = (0..<1_000_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try await stream.write(payload)
        try await stream.finish()
        let received = try await withDeadline(.seconds(10)) { try await reader.value }
        #expect(received == payload)
    }

    /// The next change on `changes` (iterated by one caller at a time), within ten seconds.
    static func nextChange(_ changes: AsyncStream<PathChange>) async throws -> PathChange? {
        try await withDeadline(.seconds(10)) {
            var iterator = changes.makeAsyncIterator()
            return await iterator.next()
        }
    }

    static func write(_ stream: QUICStream, _ bytes: ArraySlice<UInt8>) async throws {
        for start in stride(from: bytes.startIndex, to: bytes.endIndex, by: 65_536) {
            try await stream.write(Array(bytes[start..<min(start + 65_536, bytes.endIndex)]))
        }
    }

    static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        _ = gnutls_hash_fast(GNUTLS_DIG_SHA256, bytes, bytes.count, &digest)
        return digest
    }
}

extension Endpoint {
    /// One connection ID this endpoint routes by (the bytes of a `CIDKey`, which keeps them in its words in order).
    func someConnectionID() -> [UInt8]? {
        router.routes.keys.first.map { key in withUnsafeBytes(of: (key.a, key.b, key.c)) { Array($0.prefix(Int(key.length))) } }
    }
}
