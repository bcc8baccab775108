import ProcessTestSupport
import Testing
import HolePunchNet
@testable import HolePunchQUIC
#if canImport(Glibc)
import Glibc
#endif

@Suite("Non-QUIC datagrams are pulled by one reader")
struct NonQUICDatagramTests {
    @Test("a reader that falls behind loses the datagrams past the bound, counted, and keeps the oldest")
    func boundedBuffer() async throws {
        let endpoint = try await makeEndpoint(TestIdentities.a) { $0.nonQUICBufferLimit = 8 }
        let sender = try await makeEndpoint(TestIdentities.b)
        // Nobody reads while 50 STUN-range datagrams arrive.
        for index in 0..<50 {
            try await sender.send(datagram: [0x01, UInt8(index)], to: endpoint.localAddress)
        }
        #expect(await eventually { await endpoint.stats.datagramsReceived == 50 })
        let stats = await endpoint.stats
        #expect(stats.stunDatagrams == 50)
        #expect(stats.nonQUICDropped == 42)
        // The buffer kept the first 8 (as a full socket queue would), and nothing else: the next datagram sent
        // after draining them is the next one read.
        let (kept, marker) = try await withDeadline(.seconds(5)) {
            var iterator = endpoint.nonQUICDatagrams.makeAsyncIterator()
            var kept: [NonQUICDatagram?] = []
            for _ in 0..<8 { kept.append(await iterator.next()) }
            try await sender.send(datagram: [0x02, 0xff], to: endpoint.localAddress)
            return (kept, await iterator.next())
        }
        #expect(kept == (0..<8).map { .datagram([0x01, UInt8($0)], from: sender.localAddress) })
        #expect(marker == .datagram([0x02, 0xff], from: sender.localAddress))
        #expect(await endpoint.stats.nonQUICDropped == 42)
        await endpoint.close()
        await sender.close()
    }

    @Test("an ICMP port-unreachable report is read as a notice naming the address")
    func unreachableNotice() async throws {
        let endpoint = try await makeEndpoint(TestIdentities.a)
        // A port that was just free: loopback answers a datagram to it with ICMP port unreachable.
        let closed = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        let address = SocketAddress.loopbackV4(port: 0).withSockAddr { Glibc.bind(closed, $0, $1) } == 0
            ? SocketAddress(boundTo: closed) : nil
        close(closed)
        let target = try #require(address)
        try await endpoint.send(datagram: [0x00, 0x01], to: target)
        let notice = try await withDeadline(.seconds(5)) {
            var iterator = endpoint.nonQUICDatagrams.makeAsyncIterator()
            return await iterator.next()
        }
        #expect(notice == .unreachable(target))
        await endpoint.close()
    }

    @Test("the stream ends when the endpoint closes")
    func endsOnClose() async throws {
        let endpoint = try await makeEndpoint(TestIdentities.a)
        await endpoint.close()
        let next = try await withDeadline(.seconds(5)) {
            var iterator = endpoint.nonQUICDatagrams.makeAsyncIterator()
            return await iterator.next()
        }
        #expect(next == nil)
    }
}
