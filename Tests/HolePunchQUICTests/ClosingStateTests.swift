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
        // The server's close (and whatever it sends just before) never reaches the client.
        forwarder.dropFromServer(true)
        await accepted.abort(errorCode: 9, reason: "gone")
        #expect(await eventually { forwarder.droppedFromServer >= 1 })
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
        table.insert(cids: [first, second], datagram: close, expiry: 1_000, now: 0)
        var answered: [Int] = []
        for packet in 1...300 where table.answer(to: packet.isMultiple(of: 2) ? first : second, now: 10) == close {
            answered.append(packet)
        }
        // Both connection IDs count toward one connection's limit.
        #expect(answered == [1, 2, 4, 8, 16, 32, 64, 128])
        #expect(table.answer(to: cid(3), now: 10) == nil, "not a closed connection's ID")

        var expiring = ClosingTable()
        expiring.insert(cids: [first], datagram: close, expiry: 100, now: 0)
        #expect(expiring.answer(to: first, now: 99) == close)
        #expect(expiring.answer(to: first, now: 100) == nil, "expired")
        #expect(expiring.count == 0)
    }

    @Test("the table holds at most its capacity: the oldest closed connection goes first; expired ones go on insert")
    func tableIsBounded() {
        var table = ClosingTable()
        let close: [UInt8] = [0x40, 9]
        for index in 0..<(ClosingTable.capacity + 10) {
            table.insert(cids: [cid(UInt8(truncatingIfNeeded: index), UInt8(truncatingIfNeeded: index >> 8))],
                         datagram: close, expiry: 1_000, now: 0)
        }
        #expect(table.count == ClosingTable.capacity)
        #expect(table.answer(to: cid(0, 0), now: 1) == nil, "the oldest was dropped")
        #expect(table.answer(to: cid(UInt8(truncatingIfNeeded: ClosingTable.capacity + 9), UInt8((ClosingTable.capacity + 9) >> 8)),
                                 now: 1) == close)
        table.insert(cids: [cid(0xFF, 0xFF)], datagram: close, expiry: 5_000, now: 2_000)
        #expect(table.count == 1, "every earlier entry had expired")
    }

    private func cid(_ bytes: UInt8...) -> CIDKey {
        let full = bytes + [UInt8](repeating: 0xAB, count: localCIDLength - bytes.count)
        return full.withUnsafeBytes { CIDKey($0) }
    }
}
