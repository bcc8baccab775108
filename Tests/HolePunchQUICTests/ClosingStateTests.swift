import ProcessTestSupport
import Testing
import HolePunchNet
@testable import HolePunchQUIC

@Suite("QUIC closing state")
struct ClosingStateTests {
    @Test("a lost CONNECTION_CLOSE is sent again when the peer's next packet arrives: the peer learns of the close, not its idle timeout")
    func lostCloseIsRepeated() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let forwarder = try UDPForwarder(to: server.localAddress)
        defer { forwarder.close() }
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: forwarder.address, expecting: TestIdentities.b.nodeID)
        }
        let accepted = try #require(try await withDeadline(.seconds(10)) {
            var iterator = server.incoming.makeAsyncIterator()
            return await iterator.next()
        })
        // The server's close (and whatever it sends just before) never reaches the client: dropping lasts until the
        // forwarder has dropped every datagram the server sent up to and including the close.
        let sentBefore = await server.stats.datagramsSent
        forwarder.dropFromServer(true)
        await accepted.abort(errorCode: 9, reason: "gone")
        let sentWithClose = await server.stats.datagramsSent
        #expect(await eventually { forwarder.droppedFromServer >= sentWithClose - sentBefore })
        forwarder.dropFromServer(false)
        // The client's next packet (an acknowledgement may already be on its way; this write makes sure of one)
        // reaches an endpoint that has freed the connection: it answers with the close.
        if let stream = try? await connection.openStream() { try? await stream.write([1, 2, 3]) }
        // Far below the 30 s idle timeout, the only other way the client could learn of it.
        let seen = try await withDeadline(.seconds(5)) { await connection.waitClosed() }
        #expect(seen.code == .connectionClosed)
        #expect(seen.applicationErrorCode == 9)
        #expect(seen.message.contains("gone"))
        #expect(await server.stats.closesRepeated >= 1)
        await client.close()
        await server.close()
    }

    @Test("the table answers the 1st, 2nd, 4th, 8th… packet for a closed connection, at most 8 times, until it expires")
    func answersAreRateLimited() {
        var table = ClosingTable()
        let close: [UInt8] = [0x40, 1, 2, 3]
        let first = cid(1), second = cid(2)
        table.insert(cids: [first, second], datagram: close, route: Self.path, expiry: 1_000, now: 0)
        var answered: [Int] = []
        for packet in 1...300 where table.answer(to: packet.isMultiple(of: 2) ? first : second, on: Self.path, size: 21, now: 10) == close {
            answered.append(packet)
        }
        // Both connection IDs count toward one connection's limit.
        #expect(answered == [1, 2, 4, 8, 16, 32, 64, 128])
        #expect(table.answer(to: cid(3), on: Self.path, size: 21, now: 10) == nil, "not a closed connection's ID")

        var expiring = ClosingTable()
        expiring.insert(cids: [first], datagram: close, route: Self.path, expiry: 100, now: 0)
        #expect(expiring.answer(to: first, on: Self.path, size: 21, now: 99) == close)
        #expect(expiring.answer(to: first, on: Self.path, size: 21, now: 100) == nil, "expired")
        #expect(expiring.count == 0)
    }

    @Test("the table holds at most its capacity: the oldest closed connection goes first; expired ones go on insert")
    func tableIsBounded() {
        var table = ClosingTable()
        let close: [UInt8] = [0x40, 9]
        for index in 0..<(ClosingTable.capacity + 10) {
            table.insert(cids: [cid(UInt8(truncatingIfNeeded: index), UInt8(truncatingIfNeeded: index >> 8))],
                         datagram: close, route: Self.path, expiry: 1_000, now: 0)
        }
        #expect(table.count == ClosingTable.capacity)
        #expect(table.answer(to: cid(0, 0), on: Self.path, size: 21, now: 1) == nil, "the oldest was dropped")
        #expect(table.answer(to: cid(UInt8(truncatingIfNeeded: ClosingTable.capacity + 9), UInt8((ClosingTable.capacity + 9) >> 8)),
                                 on: Self.path, size: 21, now: 1) == close)
        table.insert(cids: [cid(0xFF, 0xFF)], datagram: close, route: Self.path, expiry: 5_000, now: 2_000)
        #expect(table.count == 1, "every earlier entry had expired")
    }

    @Test("a packet from an address the connection was not on gets the close only within three times its size (no amplification)")
    func answersElsewhereAreAmplificationLimited() {
        var table = ClosingTable()
        let close = [UInt8](repeating: 0x40, count: 90)
        let elsewhere = PathRoute.direct(.loopbackV4(port: 9))
        table.insert(cids: [cid(1)], datagram: close, route: Self.path, expiry: 1_000, now: 0)
        #expect(table.answer(to: cid(1), on: elsewhere, size: 29, now: 1) == nil, "87 bytes received allow no 90-byte reply")
        #expect(table.answer(to: cid(1), on: elsewhere, size: 30, now: 1) == close)
        #expect(table.answer(to: cid(1), on: Self.path, size: 21, now: 1) == close, "the connection's own path")
    }

    private static let path = PathRoute.direct(.loopbackV4(port: 4433))

    private func cid(_ bytes: UInt8...) -> CIDKey {
        let full = bytes + [UInt8](repeating: 0xAB, count: localCIDLength - bytes.count)
        return full.withUnsafeBytes { CIDKey($0) }
    }
}
