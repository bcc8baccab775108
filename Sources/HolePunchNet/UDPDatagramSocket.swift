#if canImport(Glibc)
internal import Glibc
#endif
internal import CHolePunchNetShims

/// How a ``UDPDatagramSocket`` is set up before it is bound.
package struct UDPSocketOptions: Hashable, Sendable {
    /// Kernel receive and send buffer sizes to ask for; `nil` keeps the system default.
    package var bufferBytes: Int32?
    /// Whether ICMP errors (port or host unreachable) are queued for ``UDPDatagramSocket/readErrorQueue()``
    /// (`IP_RECVERR` / `IPV6_RECVERR`).
    package var queuesICMPErrors: Bool
    /// Whether an IPv6 socket refuses IPv4-mapped traffic (`IPV6_V6ONLY`), so a v6 and a v4 socket on one port never
    /// steal each other's datagrams; `false` keeps the system default.
    package var ipv6Only: Bool

    /// Creates options.
    package init(bufferBytes: Int32? = nil, queuesICMPErrors: Bool = false, ipv6Only: Bool = false) {
        self.bufferBytes = bufferBytes
        self.queuesICMPErrors = queuesICMPErrors
        self.ipv6Only = ipv6Only
    }

    /// What a QUIC endpoint's socket needs: bursts (a target answering hundreds of punches, bulk transfer) overflow
    /// the default ~200 KiB queue, so 4 MiB each way, and ICMP unreachable reports for the punch logic.
    package static let endpoint = UDPSocketOptions(bufferBytes: 4 << 20, queuesICMPErrors: true)
    /// What a STUN server or client socket needs: defaults, IPv6-only.
    package static let plain = UDPSocketOptions(ipv6Only: true)
}

/// One received datagram's size and source.
package struct ReceivedDatagram: Hashable, Sendable {
    /// How many bytes were written into the caller's buffer.
    package var count: Int
    /// Where the datagram came from.
    package var from: SocketAddress

    /// Creates a record.
    package init(count: Int, from: SocketAddress) {
        self.count = count
        self.from = from
    }
}

/// What a nonblocking send did when it did not fail.
package enum DatagramSendOutcome: Hashable, Sendable {
    /// The kernel took the datagram.
    case sent
    /// The socket buffer is full; the datagram is gone, as it would be on a congested link.
    case wouldBlock
}

/// One entry of a socket's ICMP error queue.
package enum ErrorQueueEntry: Hashable, Sendable {
    /// An ICMP destination-unreachable report about a datagram sent to this address.
    case unreachable(SocketAddress)
    /// Some other queued error (a fragmentation report, a time-exceeded), which nothing here acts on.
    case other
}

/// One nonblocking, close-on-exec UDP socket bound to a concrete address; it owns its file descriptor and closes
/// it in `deinit`.
///
/// Every call is a single system call on a descriptor that never changes while the object lives, so the type is
/// safe to use from any thread (`Sendable` with immutable stored properties). Who reads it is the owner's choice:
/// ``UDPDatagramTransport`` reads it on an ``EventLoop`` when epoll reports it readable.
package final class UDPDatagramSocket: Sendable {
    /// The descriptor; valid until `deinit`.
    package let fd: Int32
    /// The bound address, with the real port when bound to port 0.
    package let localAddress: SocketAddress
    /// The families this socket can send to and hear from: its own, plus IPv4 for an IPv6 socket bound to `::`
    /// with `IPV6_V6ONLY` off (a dual-stack socket, which reaches IPv4 peers as v4-mapped addresses).
    package let reachableFamilies: Set<IPFamily>
    /// Whether the descriptor is `AF_INET6`: IPv4 destinations are then sent as v4-mapped addresses.
    private let isIPv6Socket: Bool

    /// Creates a socket with `options` and binds it to `address` (port 0 picks an ephemeral port).
    ///
    /// - Throws: ``DatagramError`` `.socket` when the socket cannot be created, `.bind` when the address cannot be
    ///   bound or its port read back.
    package init(binding address: SocketAddress, options: UDPSocketOptions = .plain) throws(DatagramError) {
        let family = address.isIPv6 ? AF_INET6 : AF_INET
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw DatagramError(.socket, call: "socket") }
        let intSize = socklen_t(MemoryLayout<Int32>.size)
        if var bytes = options.bufferBytes {
            // The FORCE variants (root only) go past net.core.rmem_max; otherwise the kernel caps the request.
            if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, intSize) != 0 {
                _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, intSize)
            }
            if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, intSize) != 0 {
                _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, intSize)
            }
        }
        var on: Int32 = 1
        if options.queuesICMPErrors {
            if family == AF_INET {
                _ = setsockopt(fd, Int32(IPPROTO_IP), IP_RECVERR, &on, intSize)
            } else {
                _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_RECVERR, &on, intSize)
            }
        }
        if options.ipv6Only && family == AF_INET6 {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &on, intSize)
        }
        guard address.withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else {
            let error = DatagramError(.bind, call: "bind \(address)")
            Glibc.close(fd)
            throw error
        }
        guard let local = SocketAddress(boundTo: fd) else {
            let error = DatagramError(.bind, call: "getsockname")
            Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.localAddress = local
        self.isIPv6Socket = family == AF_INET6
        self.reachableFamilies = family == AF_INET ? [.ipv4] : Self.ipv6Reach(fd: fd, local: local)
    }

    /// An IPv6 socket reaches IPv4 too only when it is bound to `::` and `IPV6_V6ONLY` is off (set by us or by
    /// the `net.ipv6.bindv6only` default): a socket bound to one IPv6 address never hears IPv4.
    private static func ipv6Reach(fd: Int32, local: SocketAddress) -> Set<IPFamily> {
        var only: Int32 = 1
        var size = socklen_t(MemoryLayout<Int32>.size)
        let read = getsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &only, &size) == 0
        let wildcard = local.isIPv6 && local.ipBytes.allSatisfy { $0 == 0 }
        return read && only == 0 && wildcard ? [.ipv4, .ipv6] : [.ipv6]
    }

    deinit {
        Glibc.close(fd)
    }

    /// Sends one datagram without blocking.
    ///
    /// An error the kernel kept from an ICMP report about an *earlier* datagram does not cost this one: with
    /// `IP_RECVERR` on, Linux also leaves the report's error on the socket, and the next `sendto` to any address
    /// fails with it (`ECONNREFUSED` after a probe to a closed port) without sending anything. That call clears it,
    /// so the send is tried again (at most twice more: one report at a time is kept, another may land meanwhile, and
    /// each read of the error queue puts the next queued report's error back on the socket). The report itself stays
    /// in the error queue for ``readErrorQueue()``.
    ///
    /// - Returns: `.wouldBlock` when the socket buffer is full (the datagram is lost, as on the wire).
    /// - Throws: ``DatagramError`` `.send` for a refusal of this datagram (no route, too big) or a report that
    ///   came back on every try.
    @discardableResult
    package func send(_ bytes: UnsafeRawBufferPointer, to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome {
        let wired = wire(destination)
        var code: Int32 = 0
        for _ in 0..<3 {
            let sent = wired.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL), $0, $1) }
            guard sent < 0 else { return .sent }
            code = Glibc.errno
            if code == EAGAIN || code == EWOULDBLOCK { return .wouldBlock }
            guard Self.mayReportAnEarlierDatagram(code) else { break }
        }
        throw DatagramError(.send, call: "sendto \(destination)", errno: code)
    }

    /// Sends one datagram held in an array; see ``send(_:to:)-(UnsafeRawBufferPointer,SocketAddress)``.
    @discardableResult
    package func send(_ bytes: [UInt8], to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(DatagramError) -> DatagramSendOutcome in try send(buffer, to: destination) }
        }
        return try result.get()
    }

    /// The `errno` values an ICMP or ICMPv6 report leaves on a socket (Linux's `icmp_err_convert` and
    /// `icmpv6_err_convert`), and `EINTR`: a failed `sendto` with one of these may not be about this datagram.
    private static func mayReportAnEarlierDatagram(_ code: Int32) -> Bool {
        switch code {
        case ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENONET, EPROTO, ENOPROTOOPT, EMSGSIZE, EACCES, EOPNOTSUPP,
             EINTR:
            true
        default:
            false
        }
    }

    /// `destination` as this socket's family needs it: above the socket every address is normalised (an IPv4 peer
    /// is IPv4 even when a dual-stack socket hears it as `::ffff:a.b.c.d`), so it is mapped again here.
    private func wire(_ destination: SocketAddress) -> SocketAddress {
        guard isIPv6Socket, case let .v4(a, b, c, d) = destination.ip else { return destination }
        return SocketAddress(ip: .v6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, a, b, c, d]), port: destination.port)
    }

    /// Reads one waiting datagram into `buffer`; a longer datagram is cut to the buffer's size (UDP semantics).
    ///
    /// - Returns: `nil` when nothing is waiting.
    /// - Throws: ``DatagramError`` `.receive` for other failures; with ICMP errors queued, a refused earlier send
    ///   surfaces here (`ECONNREFUSED`), and ``readErrorQueue()`` has the detail.
    package func receive(into buffer: UnsafeMutableRawBufferPointer) throws(DatagramError) -> ReceivedDatagram? {
        while true {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let count = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(fd, buffer.baseAddress, buffer.count, 0, $0, &length)
                }
            }
            if count < 0 {
                let code = Glibc.errno
                if code == EAGAIN || code == EWOULDBLOCK { return nil }
                if code == EINTR { continue }
                throw DatagramError(.receive, call: "recvfrom", errno: code)
            }
            let from = withUnsafePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
            }
            // An INET socket only hears INET sources; anything else is not a datagram anyone here could answer.
            guard let from else { continue }
            return ReceivedDatagram(count: count, from: from)
        }
    }

    /// Waits up to `timeoutMilliseconds` for a datagram and returns a copy (tests and simple blocking clients;
    /// never the loops).
    package func receive(timeoutMilliseconds: Int32) -> (bytes: [UInt8], from: SocketAddress)? {
        guard waitReadable(timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        var bytes = [UInt8](repeating: 0, count: 65_536)
        let received = bytes.withUnsafeMutableBytes { buffer in try? receive(into: buffer) }
        guard let received = received ?? nil else { return nil }
        return (Array(bytes.prefix(received.count)), received.from)
    }

    /// Blocks up to `timeoutMilliseconds` until a datagram or a queued error waits (tests and simple blocking
    /// clients; never the loops). Returns whether one does.
    package func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&entry, 1, timeoutMilliseconds) > 0
    }

    /// Reads one entry of the ICMP error queue (``UDPSocketOptions/queuesICMPErrors``); `nil` when it is empty.
    package func readErrorQueue() -> ErrorQueueEntry? {
        var storage = sockaddr_storage()
        let found = withUnsafeMutablePointer(to: &storage) { hp_read_icmp_unreachable(fd, $0) }
        if found < 0 { return nil }
        guard found == 1, let address = withUnsafePointer(to: &storage, { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        }) else { return .other }
        return .unreachable(address)
    }
}
