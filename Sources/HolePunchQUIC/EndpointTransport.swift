import HolePunchNet
internal import CNgtcp2
#if canImport(Glibc)
import Glibc
#endif

// Transport I/O: reading datagrams and unreachable reports from the endpoint's transport, and sending on it.
extension Endpoint {
    /// Starts reading the transport: the loop calls back while input waits, and each call takes a batch.
    func start() throws {
        do {
            try transport.start { [weak self] in
                self?.assumeIsolated { $0.receiveBatch() }
            }
        } catch {
            throw QUICError(.socket, error.description)
        }
    }

    // MARK: Receiving

    /// Takes up to 256 inputs from the transport into the loop's buffer, dispatching each, then flushes the
    /// connections they touched once. The transport calls again while more waits (it is level-triggered).
    func receiveBatch() {
        guard !isClosed else { return }
        for _ in 0..<256 {
            guard let input = transport.receive(into: io.receiveBuffer) else { break }
            switch input {
            case .datagram(let datagram):
                counters.datagramsReceived += 1
                let packet = UnsafeRawBufferPointer(rebasing: io.receiveBuffer[0..<datagram.count])
                if let relay = relays[datagram.from] {
                    receiveFromRelay(packet, relay: relay)
                } else {
                    dispatch(packet, on: .direct(datagram.from))
                }
            case .unreachable(let address):
                deliverNonQUIC(.unreachable(address))
            }
        }
        flushTouched()
    }

    /// Queues what the owner reads from ``nonQUICDatagrams``; past the bound it is dropped and counted.
    func deliverNonQUIC(_ item: NonQUICDatagram) {
        if case .dropped = nonQUICContinuation.yield(item) { counters.nonQUICDropped += 1 }
    }

    // MARK: Sending

    /// Sends the first `count` bytes of the send buffer on `route`; false when the transport (or the relay's
    /// framing) refused them.
    @discardableResult
    func transmit(count: Int, on route: PathRoute) -> Bool {
        send(UnsafeRawBufferPointer(rebasing: io.sendBuffer[0..<count]), on: route)
    }

    /// Sends the first `count` bytes of the send buffer on `route`: a packet that belongs to no connection.
    func sendStateless(count: Int, to route: PathRoute) {
        transmit(count: count, on: route)
    }

    /// Sends one packet of `core` from the send buffer, as many times as its handshake asks for.
    func sendPacket(_ core: ConnectionCore, count: Int) {
        // Until the handshake is done, a lossy punched path may ask for copies of every datagram (HandshakeHints).
        var copies = 1
        if case .handshaking = core.phase {
            copies = core.handshakeCopies
        } else if !core.isClient, core.handshakeCopies > 1, core.copiesAfterHandshake > 0, case .established = core.phase {
            core.copiesAfterHandshake -= 1
            copies = core.handshakeCopies
        }
        // QUIC addresses the stable peer address; the path table says which path carries it now. (A path ngtcp2
        // moved to on its own, after a peer's NAT rebinding, is used as ngtcp2 says.)
        guard let remote = SocketAddress(core.writePath.pointee.path.remote.addr) else {
            counters.sendErrors += 1
            return
        }
        let route = remote == core.paths.stable.peer ? core.paths.active : .direct(remote)
        for _ in 0..<copies {
            if transmit(count: count, on: route) {
                core.bytesSent += count
                core.packetsSent += 1
            }
        }
    }

    /// Sends a datagram that belongs to no QUIC packet (a path probe); a refusal counts as a send error.
    func sendDatagram(_ datagram: [UInt8], on route: PathRoute) {
        datagram.withUnsafeBytes { _ = send($0, on: route) }
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

    init(local: SocketAddress, loop: EventLoop) {
        receiveBuffer = loop.receiveBuffer
        sendBuffer = loop.sendBuffer
        path = .allocate(capacity: 1)
        ngtcp2_path_storage_zero(path)
        localStorage = .allocate(capacity: 1)
        localStorage.initialize(to: sockaddr_storage())
        localLength = local.fill(&localStorage.pointee)
    }

    deinit {
        path.deallocate()
        localStorage.deallocate()
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
}
