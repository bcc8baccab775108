import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchShims
#if canImport(Glibc)
import Glibc
#endif

// Transport I/O: the socket (or in-memory link) under the endpoint: reading datagrams, ICMP reports, sending.
extension Endpoint {
    /// Joins an in-memory endpoint to its peer (one direction; call on both).
    func link(to peer: Endpoint) {
        memoryPeer = peer
    }

    /// Delivers a datagram from the in-memory peer, through the same dispatch as the socket path.
    func receiveInMemory(_ datagram: [UInt8], from: SocketAddress) {
        guard !isClosed, datagram.count <= io.receiveBuffer.count else { return }
        counters.datagramsReceived += 1
        datagram.withUnsafeBytes { io.receiveBuffer.copyMemory(from: $0) }
        dispatch(count: datagram.count, from: from)
        flushTouched()
    }

    func start() throws {
        try loop.register(fd: fd) { [weak self] events in
            guard let self else { return }
            self.assumeIsolated { $0.handleSocketEvents(events) }
        }
    }

    /// Queues what the owner reads from ``nonQUICDatagrams``; past the bound it is dropped and counted.
    func deliverNonQUIC(_ item: NonQUICDatagram) {
        if case .dropped = nonQUICContinuation.yield(item) { counters.nonQUICDropped += 1 }
    }

    // MARK: Socket

    func handleSocketEvents(_ events: UInt32) {
        guard !isClosed else { return }
        if events & EPOLLERR.rawValue != 0 {
            drainErrorQueue()
        }
        for _ in 0..<256 {
            let (count, from) = io.receive(fd: fd)
            if count < 0 {
                let error = errno
                if error == EAGAIN || error == EWOULDBLOCK { break }
                // A queued ICMP error surfaces here as ECONNREFUSED and the like; the error queue has the detail.
                drainErrorQueue()
                continue
            }
            counters.datagramsReceived += 1
            guard let from else { counters.datagramsDropped += 1; continue }
            dispatch(count: count, from: from)
        }
        flushTouched()
    }

    func drainErrorQueue() {
        var storage = sockaddr_storage()
        while true {
            let found = withUnsafeMutablePointer(to: &storage) { hp_read_icmp_unreachable(fd, $0) }
            if found < 0 { break }
            if found == 1 {
                let address = withUnsafePointer(to: &storage) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
                }
                if let address { deliverNonQUIC(.unreachable(address)) }
            }
        }
    }

    /// Sorts one datagram: QUIC for a known connection, STUN range, a new client Initial, or junk.
    ///
    /// ngtcp2 0.12 always advertises RFC 9287 ("greasing the QUIC bit"), so a peer built on it may clear the fixed
    /// bit on any packet after the handshake starts, and a greased short header can even start with 0x00–0x03.
    /// So the connection-ID lookup comes first: a datagram whose DCID routes to a live connection is QUIC whatever
    /// its first byte. Only then does the RFC 9443 first-byte rule apply, to everything else.
    /// Sends the first `count` bytes of the send buffer to `remote`: a packet that belongs to no connection.
    func sendStateless(count: Int, to remote: SocketAddress) {
        if fd < 0 {
            deliverInMemory(Array(UnsafeRawBufferPointer(rebasing: io.sendBuffer[0..<count])))
            return
        }
        let sent = remote.withSockAddr { sendto(fd, io.sendBuffer.baseAddress, count, 0, $0, $1) }
        if sent < 0 { counters.sendErrors += 1 } else { counters.datagramsSent += 1 }
    }

    func deliverInMemory(_ datagram: [UInt8]) {
        counters.datagramsSent += 1
        guard let peer = memoryPeer else { return }
        let from = localAddress
        peer.loop.execute { peer.assumeIsolated { $0.receiveInMemory(datagram, from: from) } }
    }

    func sendPacket(_ core: ConnectionCore, count: Int) {
        // Until the handshake is done, a lossy punched path may ask for copies of every datagram (HandshakeHints).
        var copies = 1
        if case .handshaking = core.phase {
            copies = core.handshakeCopies
        } else if !core.isClient, core.handshakeCopies > 1, core.copiesAfterHandshake > 0, case .established = core.phase {
            core.copiesAfterHandshake -= 1
            copies = core.handshakeCopies
        }
        if fd < 0 {
            let datagram = Array(UnsafeRawBufferPointer(rebasing: io.sendBuffer[0..<count]))
            for _ in 0..<copies {
                deliverInMemory(datagram)
                core.bytesSent += count
                core.packetsSent += 1
            }
            return
        }
        let remote = core.writePath.pointee.path.remote
        // QUIC addresses the stable peer address; the path table says which path carries it now. (A path ngtcp2
        // moved to on its own, after a peer's NAT rebinding, is used as ngtcp2 says.)
        var redirect: SocketAddress?
        if core.paths.active != core.paths.stable, SocketAddress(remote.addr) == core.paths.stable.address {
            redirect = core.paths.active.address
        }
        for _ in 0..<copies {
            let sent = redirect.map { active in
                active.withSockAddr { sendto(fd, io.sendBuffer.baseAddress, count, 0, $0, $1) }
            } ?? sendto(fd, io.sendBuffer.baseAddress, count, 0, remote.addr, remote.addrlen)
            if sent < 0 {
                counters.sendErrors += 1
            } else {
                counters.datagramsSent += 1
                core.bytesSent += count
                core.packetsSent += 1
            }
        }
    }

    /// Sends a datagram that belongs to no QUIC packet (a path probe); a refusal counts as a send error.
    func sendDatagram(_ datagram: [UInt8], to address: SocketAddress) {
        if fd < 0 {
            deliverInMemory(datagram)
            return
        }
        let sent = datagram.withUnsafeBytes { bytes in
            address.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, $1) }
        }
        if sent < 0 { counters.sendErrors += 1 } else { counters.datagramsSent += 1 }
    }
}

/// The endpoint's view of its loop's scratch buffers, and the path storage ngtcp2 reads addresses from (owned:
/// freed in deinit). `ngtcp2_path_storage` points into itself, so it lives on the heap and is never copied.
final class SocketBuffers {
    let receiveBuffer: UnsafeMutableRawBufferPointer
    let sendBuffer: UnsafeMutableRawBufferPointer
    private let path: UnsafeMutablePointer<ngtcp2_path_storage>
    private let localStorage: UnsafeMutablePointer<sockaddr_storage>
    private let localLength: socklen_t
    private let fromStorage: UnsafeMutablePointer<sockaddr_storage>

    init(local: SocketAddress, loop: EventLoop) {
        receiveBuffer = loop.receiveBuffer
        sendBuffer = loop.sendBuffer
        path = .allocate(capacity: 1)
        ngtcp2_path_storage_zero(path)
        localStorage = .allocate(capacity: 1)
        localStorage.initialize(to: sockaddr_storage())
        localLength = local.fill(&localStorage.pointee)
        fromStorage = .allocate(capacity: 1)
        fromStorage.initialize(to: sockaddr_storage())
    }

    deinit {
        path.deallocate()
        localStorage.deallocate()
        fromStorage.deallocate()
    }

    /// Calls `body` with a path from the local address to `remote`.
    func withPath<R>(remote: SocketAddress, _ body: (UnsafePointer<ngtcp2_path>) -> R) -> R {
        var remoteStorage = sockaddr_storage()
        let remoteLength = remote.fill(&remoteStorage)
        return withUnsafePointer(to: &remoteStorage) { remotePointer in
            remotePointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { remoteAddress in
                localStorage.withMemoryRebound(to: sockaddr.self, capacity: 1) { localAddress in
                    ngtcp2_path_storage_init(path, localAddress, localLength, remoteAddress, remoteLength, nil)
                }
                return body(&path.pointee.path)
            }
        }
    }

    /// Receives one datagram into `receiveBuffer`; returns its size (or -1 with errno set) and its source.
    func receive(fd: Int32) -> (Int, SocketAddress?) {
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let count = fromStorage.withMemoryRebound(to: sockaddr.self, capacity: 1) { from in
            recvfrom(fd, receiveBuffer.baseAddress, receiveBuffer.count, 0, from, &length)
        }
        guard count >= 0 else { return (-1, nil) }
        let from = fromStorage.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        return (count, from)
    }
}
