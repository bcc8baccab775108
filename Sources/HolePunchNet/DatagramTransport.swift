#if canImport(Glibc)
internal import Glibc
#endif
import Synchronization
internal import CHolePunchNetShims

/// One thing a transport has for its owner.
package enum DatagramInput: Hashable, Sendable {
    /// A datagram, now in the caller's buffer.
    case datagram(ReceivedDatagram)
    /// An ICMP destination-unreachable report (or the in-memory equivalent) about a datagram sent to this address.
    case unreachable(SocketAddress)
}

/// What an endpoint needs from a socket: a local address, nonblocking sends, and received datagrams and
/// unreachable notices that its owner pulls on the event loop.
///
/// Reading is pull-based and level-triggered, like the socket underneath: ``start(onReadable:)`` registers a
/// callback that the loop runs whenever input may be waiting; the owner then calls ``receive(into:)`` until it
/// returns `nil` or the owner's budget runs out (the callback comes again while anything is left). So a batch of
/// datagrams lands in one buffer the owner chose (the loop's scratch buffer) with no copy and no Task per datagram,
/// and the owner can do its per-batch work (flushing connections) once after the batch.
///
/// `package`, not public: only the modules of this package implement or drive it, and the public types built on
/// it (`Endpoint`, `UDPSTUNTransport`, `STUNServer`) keep their own API.
package protocol DatagramTransport: AnyObject, Sendable {
    /// The loop that runs ``start(onReadable:)``'s callback; owners that are actors use it as their executor.
    var loop: EventLoop { get }
    /// The local address datagrams leave from, with the real port when bound to port 0.
    var localAddress: SocketAddress { get }
    /// The IP families this transport can send to (a dual-stack socket reaches both); by default the local
    /// address's family.
    var reachableFamilies: Set<IPFamily> { get }
    /// Sends one datagram without blocking; callable from any thread.
    ///
    /// - Returns: `.wouldBlock` when the datagram was dropped for lack of buffer space.
    /// - Throws: ``DatagramError`` `.closed` after ``close()``, `.send` when the datagram was refused.
    @discardableResult
    func send(_ bytes: UnsafeRawBufferPointer, to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome
    /// Starts delivery: `onReadable` runs on ``loop`` whenever input may be waiting. A second call does nothing.
    ///
    /// - Throws: ``DatagramError`` `.closed` after ``close()``, `.socket` when the loop cannot watch the socket.
    func start(onReadable: @escaping @Sendable () -> Void) throws(DatagramError)
    /// Takes the next input, writing a datagram's bytes into `buffer` (cut to its size, as UDP does); `nil` when
    /// nothing is waiting. Call it on ``loop``.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> DatagramInput?
    /// Stops delivery and releases the socket; idempotent. When it returns, `onReadable` will not run again.
    func close()
}

extension DatagramTransport {
    /// The local address's family only: what any transport that is not a dual-stack socket reaches.
    package var reachableFamilies: Set<IPFamily> { [localAddress.family] }

    /// Sends one datagram held in an array; see ``DatagramTransport/send(_:to:)``.
    @discardableResult
    package func send(_ bytes: [UInt8], to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(DatagramError) -> DatagramSendOutcome in try send(buffer, to: destination) }
        }
        return try result.get()
    }
}

/// A ``DatagramTransport`` over one ``UDPDatagramSocket``, read on an ``EventLoop`` when epoll reports it readable.
package final class UDPDatagramTransport: DatagramTransport {
    /// The loop that watches the socket.
    package let loop: EventLoop
    /// The socket's bound address.
    package let localAddress: SocketAddress
    /// The families the socket reaches (`UDPDatagramSocket/reachableFamilies`).
    package let reachableFamilies: Set<IPFamily>

    private struct State {
        /// `nil` once closed: dropping the last reference closes the descriptor.
        var socket: UDPDatagramSocket?
        var registered = false
        /// Epoll reported `EPOLLERR`: the ICMP error queue has entries to read before more datagrams.
        var errorPending = false
    }

    private let state: Mutex<State>

    /// Binds a socket with `options` and puts it on `loop` (by default the next loop of the shared group).
    ///
    /// - Throws: ``DatagramError`` `.socket` or `.bind`, as ``UDPDatagramSocket/init(binding:options:)``.
    package init(
        binding address: SocketAddress, options: UDPSocketOptions = .plain, loop: EventLoop = EventLoopGroup.shared.next()
    ) throws(DatagramError) {
        let socket = try UDPDatagramSocket(binding: address, options: options)
        self.loop = loop
        self.localAddress = socket.localAddress
        self.reachableFamilies = socket.reachableFamilies
        self.state = Mutex(State(socket: socket))
    }

    deinit {
        close()
    }

    /// Sends without blocking; see ``DatagramTransport/send(_:to:)``.
    @discardableResult
    package func send(_ bytes: UnsafeRawBufferPointer, to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome {
        // The reference keeps the descriptor open for this call even if another thread closes the transport now.
        guard let socket = state.withLock({ $0.socket }) else {
            throw DatagramError(.closed, "send on a closed transport")
        }
        return try socket.send(bytes, to: destination)
    }

    /// Watches the socket on ``loop``; blocks until the loop has registered it.
    package func start(onReadable: @escaping @Sendable () -> Void) throws(DatagramError) {
        let result = loop.executeAndWait { [weak self, loop] () -> Result<Void, DatagramError> in
            guard let self else { return .failure(DatagramError(.closed, "the transport is gone")) }
            return self.state.withLock { state -> Result<Void, DatagramError> in
                guard let socket = state.socket else { return .failure(DatagramError(.closed, "start on a closed transport")) }
                if state.registered { return .success(()) }
                do throws(DatagramError) {
                    try loop.register(fd: socket.fd) { [weak self] events in
                        guard let self else { return }
                        if events & EPOLLERR.rawValue != 0 { self.state.withLock { $0.errorPending = true } }
                        onReadable()
                    }
                } catch {
                    return .failure(error)
                }
                state.registered = true
                return .success(())
            }
        }
        try result.get()
    }

    /// Takes the next datagram or unreachable report; see ``DatagramTransport/receive(into:)``.
    package func receive(into buffer: UnsafeMutableRawBufferPointer) -> DatagramInput? {
        guard let (socket, errorPending) = state.withLock({ state in state.socket.map { ($0, state.errorPending) } }) else {
            return nil
        }
        if errorPending {
            if let report = nextUnreachable(socket) { return .unreachable(report) }
            state.withLock { $0.errorPending = false }
        }
        // A bounded number of tries: each failed read is a queued error the error queue explains.
        for _ in 0..<8 {
            do {
                guard let received = try socket.receive(into: buffer) else { return nil }
                return .datagram(received)
            } catch {
                if let report = nextUnreachable(socket) { return .unreachable(report) }
            }
        }
        return nil
    }

    /// Reads the error queue up to its first unreachable report, skipping other entries.
    private func nextUnreachable(_ socket: UDPDatagramSocket) -> SocketAddress? {
        while let entry = socket.readErrorQueue() {
            if case let .unreachable(address) = entry { return address }
        }
        return nil
    }

    /// Unregisters the socket from the loop and releases it. Called off the loops, it waits for the loop, so the
    /// descriptor is closed (and the port free) when it returns.
    package func close() {
        let (socket, registered) = state.withLock { state in
            defer { state.socket = nil }
            return (state.socket, state.registered)
        }
        guard let socket, registered else { return }
        // The socket (and so its descriptor) lives until the loop has stopped watching it: a closed descriptor's
        // number may be reused at once by another socket on the same loop.
        let loop = self.loop
        if loop.inLoop || !EventLoop.onAnyLoop {
            loop.executeAndWait { loop.unregister(fd: socket.fd) }
        } else {
            // On another loop's thread, waiting could deadlock two loops that close each other's sockets at once:
            // the descriptor closes a moment later instead.
            loop.execute { withExtendedLifetime(socket) { loop.unregister(fd: socket.fd) } }
        }
    }
}
