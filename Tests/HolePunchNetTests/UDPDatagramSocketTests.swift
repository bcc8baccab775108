import Foundation
import HolePunchNet
import ProcessTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("UDP datagram socket")
struct UDPDatagramSocketTests {
    @Test("binding port 0 reports the real port the kernel chose")
    func portZeroGetsTheRealPort() throws {
        let socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        #expect(socket.localAddress.port != 0)
        #expect(socket.localAddress == SocketAddress(boundTo: socket.fd))
    }

    @Test("binding an address that is taken throws a bind error with errno")
    func bindConflictIsTyped() throws {
        let first = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let error = #expect(throws: DatagramError.self) {
            _ = try UDPDatagramSocket(binding: first.localAddress)
        }
        #expect(error?.code == .bind)
        #expect(error?.errno == EADDRINUSE)
    }

    @Test("releasing the socket closes its descriptor: the address can be bound again")
    func deinitClosesTheDescriptor() throws {
        var socket: UDPDatagramSocket? = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let address = try #require(socket?.localAddress)
        socket = nil
        _ = try UDPDatagramSocket(binding: address)
    }

    @Test("the socket is nonblocking and close-on-exec, with the endpoint's buffers and RECVERR")
    func endpointOptionsAreApplied() throws {
        let plain = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let endpoint = try UDPDatagramSocket(binding: .loopbackV4(port: 0), options: .endpoint)
        for socket in [plain, endpoint] {
            #expect(fcntl(socket.fd, F_GETFL) & O_NONBLOCK != 0)
            #expect(fcntl(socket.fd, F_GETFD) & FD_CLOEXEC != 0)
        }
        #expect(intOption(endpoint.fd, SOL_SOCKET, SO_RCVBUF) > intOption(plain.fd, SOL_SOCKET, SO_RCVBUF))
        #expect(intOption(endpoint.fd, SOL_SOCKET, SO_SNDBUF) > intOption(plain.fd, SOL_SOCKET, SO_SNDBUF))
        #expect(intOption(endpoint.fd, Int32(IPPROTO_IP), IP_RECVERR) == 1)
        #expect(intOption(plain.fd, Int32(IPPROTO_IP), IP_RECVERR) == 0)
        let v6 = try UDPDatagramSocket(binding: try SocketAddress(parsing: "[::1]:0"))
        #expect(intOption(v6.fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY) == 1)
    }

    @Test("receive reads into the caller's buffer, returns nil at once when nothing waits, and cuts long datagrams")
    func sendAndReceive() throws {
        let a = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let b = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4, alignment: 1)
        defer { buffer.deallocate() }
        #expect(try b.receive(into: buffer) == nil)

        #expect(try a.send([1, 2, 3], to: b.localAddress) == .sent)
        #expect(b.waitReadable(timeoutMilliseconds: 5000))
        #expect(try b.receive(into: buffer) == ReceivedDatagram(count: 3, from: a.localAddress))
        #expect(Array(buffer.prefix(3)) == [1, 2, 3])

        #expect(try a.send([9, 8, 7, 6, 5, 4], to: b.localAddress) == .sent)
        #expect(b.waitReadable(timeoutMilliseconds: 5000))
        #expect(try b.receive(into: buffer) == ReceivedDatagram(count: 4, from: a.localAddress))
        #expect(Array(buffer) == [9, 8, 7, 6])
        #expect(try b.receive(into: buffer) == nil)
    }

    @Test("a datagram to a closed port comes back as an unreachable report in the error queue")
    func icmpUnreachableIsQueued() throws {
        let closed = try UDPDatagramSocket(binding: .loopbackV4(port: 0)).localAddress
        let socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0), options: .endpoint)
        #expect(socket.readErrorQueue() == nil)
        try socket.send([0], to: closed)
        #expect(socket.waitReadable(timeoutMilliseconds: 5000))
        #expect(socket.readErrorQueue() == .unreachable(closed))
        #expect(socket.readErrorQueue() == nil)
    }

    @Test("an unreachable report about an earlier datagram does not cost the next one: it is sent, and the report stays queued")
    func pendingUnreachableReportDoesNotDropTheNextSend() throws {
        // With IP_RECVERR the kernel also keeps the report's error on the socket, and the next sendto to any
        // address fails with it (ECONNREFUSED) without sending: a punch's probes to closed ports then cost the
        // connection's next packet, a CONNECTION_CLOSE among them.
        let closed = try UDPDatagramSocket(binding: .loopbackV4(port: 0)).localAddress
        let socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0), options: .endpoint)
        let receiver = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 1)
        defer { buffer.deallocate() }
        for round in 1...3 {
            try socket.send([0], to: closed)
            #expect(socket.waitReadable(timeoutMilliseconds: 5000), "round \(round): the report arrived")
            #expect(try socket.send([UInt8(round)], to: receiver.localAddress) == .sent, "round \(round)")
            #expect(receiver.waitReadable(timeoutMilliseconds: 5000), "round \(round): the datagram arrived")
            #expect(try receiver.receive(into: buffer) == ReceivedDatagram(count: 1, from: socket.localAddress))
            #expect(buffer[0] == UInt8(round))
            #expect(socket.readErrorQueue() == .unreachable(closed), "round \(round): the report is still there to read")
            #expect(socket.readErrorQueue() == nil)
        }
    }

    private func intOption(_ fd: Int32, _ level: Int32, _ name: Int32) -> Int32 {
        var value: Int32 = -1
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = getsockopt(fd, level, name, &value, &length)
        return value
    }
}

@Suite("UDP datagram socket: families")
struct UDPDatagramSocketFamilyTests {
    /// Whether this host can bind IPv6 at all (some CI containers have it disabled).
    static var hasIPv6: Bool { (try? UDPDatagramSocket(binding: SocketAddress(ip: .v6([UInt8](repeating: 0, count: 15) + [1]), port: 0))) != nil }

    @Test("an IPv4 socket reaches IPv4; a socket bound to one IPv6 address reaches IPv6 only")
    func singleFamily() throws {
        #expect(try UDPDatagramSocket(binding: .loopbackV4(port: 0)).reachableFamilies == [.ipv4])
        guard Self.hasIPv6 else { return }
        #expect(try UDPDatagramSocket(binding: SocketAddress(parsing: "[::1]:0"), options: .endpoint).reachableFamilies == [.ipv6])
        #expect(try UDPDatagramSocket(binding: SocketAddress(parsing: "[::]:0"), options: .plain).reachableFamilies == [.ipv6],
                "IPV6_V6ONLY on")
    }

    @Test("a dual-stack socket on :: reaches an IPv4 peer: it sends to the plain IPv4 address and hears it as IPv4")
    func dualStack() throws {
        guard Self.hasIPv6 else { return }
        let dual = try UDPDatagramSocket(binding: SocketAddress(parsing: "[::]:0"), options: .endpoint)
        guard dual.reachableFamilies == [.ipv4, .ipv6] else { return }  // net.ipv6.bindv6only=1 on this host
        let peer = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        try dual.send([1, 2, 3], to: peer.localAddress)
        let got = try #require(peer.receive(timeoutMilliseconds: 5000))
        #expect(got.bytes == [1, 2, 3])
        #expect(got.from.port == dual.localAddress.port)
        try peer.send([4], to: got.from)
        let back = try #require(dual.receive(timeoutMilliseconds: 5000))
        #expect(back.from == peer.localAddress, "normalised: \(back.from)")
    }
}
