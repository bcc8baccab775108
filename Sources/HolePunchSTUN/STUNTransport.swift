internal import Foundation
public import HolePunchNet

/// One received datagram.
public struct STUNDatagram: Hashable, Sendable {
    /// The payload.
    public var bytes: [UInt8]
    /// Where it came from.
    public var from: SocketAddress

    /// Creates a datagram.
    public init(bytes: [UInt8], from: SocketAddress) {
        self.bytes = bytes
        self.from = from
    }
}

/// A datagram path that STUN clients run over.
///
/// Kept small on purpose: the QUIC endpoint's shared socket implements it by handing over the datagrams its
/// first-byte demultiplexer classifies as STUN, and ``UDPSTUNTransport`` implements it with a plain socket.
public protocol STUNTransport: Sendable {
    /// The local address datagrams leave from (the address a NAT maps).
    var localAddress: SocketAddress { get }
    /// Sends one datagram. Failures may be thrown; callers treat them like loss.
    func send(_ bytes: [UInt8], to destination: SocketAddress) async throws
    /// Starts a new subscription to incoming datagrams, ending any previous one.
    ///
    /// The stream ends when the transport closes or the consuming task is cancelled.
    func incoming() -> AsyncStream<STUNDatagram>
    /// Releases the transport. Whoever opened a transport closes it; a shared endpoint socket implements this
    /// as "stop delivering datagrams to this subscriber", never by closing the endpoint.
    func close() async
}

/// A ``STUNTransport`` over one plain, non-blocking POSIX UDP socket, read by a background poll thread.
public final class UDPSTUNTransport: STUNTransport {
    /// The bound local address (with the real port when bound to port 0).
    public let localAddress: SocketAddress
    private let socket: UDPSocket
    private let loop: PollLoop
    private let subscriber: Subscriber

    /// Binds a socket to `address`; port 0 picks an ephemeral port.
    ///
    /// - Throws: ``STUNError`` `.socket` when the address cannot be bound.
    public init(binding address: SocketAddress) throws(STUNError) {
        let socket = try UDPSocket(binding: address)
        let subscriber = Subscriber()
        self.socket = socket
        self.subscriber = subscriber
        self.localAddress = socket.localAddress
        self.loop = PollLoop(sockets: [socket]) { _, bytes, from in
            subscriber.yield(STUNDatagram(bytes: bytes, from: from))
        }
    }

    deinit {
        loop.stop()
        socket.close()
        subscriber.finish()
    }

    /// Sends one datagram without blocking; a full socket buffer drops it silently, like the network would.
    public func send(_ bytes: [UInt8], to destination: SocketAddress) async throws {
        try socket.send(bytes, to: destination)
    }

    /// Starts a new subscription (ending the previous one); the poll thread starts with the first.
    public func incoming() -> AsyncStream<STUNDatagram> {
        let (stream, continuation) = AsyncStream.makeStream(of: STUNDatagram.self, bufferingPolicy: .bufferingNewest(256))
        subscriber.replace(continuation)
        // The poll thread starts with the first subscriber: nothing is read before anyone listens.
        do { try loop.start() } catch { subscriber.finish() }
        return stream
    }

    /// Stops the poll thread, closes the socket and ends the stream; idempotent.
    public func close() async {
        closeNow()
    }

    /// Synchronous ``close()``: stops the poll thread, closes the socket, ends the stream.
    public func closeNow() {
        loop.stop()
        socket.close()
        subscriber.finish()
    }

    /// The current stream's continuation. `@unchecked Sendable`: every access holds `lock`.
    private final class Subscriber: @unchecked Sendable {
        private let lock = NSLock()
        private var continuation: AsyncStream<STUNDatagram>.Continuation?
        private var finished = false

        func replace(_ next: AsyncStream<STUNDatagram>.Continuation) {
            let previous: AsyncStream<STUNDatagram>.Continuation? = lock.withLock {
                defer { continuation = finished ? nil : next }
                return continuation
            }
            previous?.finish()
            if lock.withLock({ finished }) { next.finish() }
        }

        func yield(_ datagram: STUNDatagram) {
            let current = lock.withLock { continuation }
            current?.yield(datagram)
        }

        func finish() {
            let current: AsyncStream<STUNDatagram>.Continuation? = lock.withLock {
                finished = true
                defer { continuation = nil }
                return continuation
            }
            current?.finish()
        }
    }
}
