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

/// A ``STUNTransport`` over one plain, non-blocking UDP socket, read on one of the process's shared event loops
/// (the loops the QUIC endpoints run on: a process has one I/O stack, not a thread per STUN socket).
public final class UDPSTUNTransport: STUNTransport {
    /// The bound local address (with the real port when bound to port 0).
    public let localAddress: SocketAddress
    private let transport: any DatagramTransport
    private let subscriber: Subscriber

    /// Binds a socket to `address`; port 0 picks an ephemeral port.
    ///
    /// - Throws: ``STUNError`` `.socket` when the address cannot be bound.
    public convenience init(binding address: SocketAddress) throws(STUNError) {
        self.init(over: try UDPDatagramTransport.forSTUN(binding: address))
    }

    /// Runs STUN over `transport` (a UDP socket, or an in-memory transport in tests), which this object now owns
    /// and closes.
    package init(over transport: any DatagramTransport) {
        self.transport = transport
        self.localAddress = transport.localAddress
        self.subscriber = Subscriber()
    }

    deinit {
        transport.close()
        subscriber.finish()
    }

    /// Sends one datagram without blocking; a full socket buffer drops it silently, like the network would.
    public func send(_ bytes: [UInt8], to destination: SocketAddress) async throws {
        do throws(DatagramError) {
            try transport.send(bytes, to: destination)
        } catch {
            throw STUNError(.socket, error.message)
        }
    }

    /// Starts a new subscription (ending the previous one); the socket is watched from the first on.
    public func incoming() -> AsyncStream<STUNDatagram> {
        let (stream, continuation) = AsyncStream.makeStream(of: STUNDatagram.self, bufferingPolicy: .bufferingNewest(256))
        subscriber.replace(continuation)
        // Reading starts with the first subscriber: nothing is read before anyone listens.
        let subscriber = self.subscriber
        do {
            try transport.start { [weak transport] in
                guard let transport else { return }
                subscriber.drain(transport)
            }
        } catch {
            subscriber.finish()
        }
        return stream
    }

    /// Stops reading, closes the socket and ends the stream; idempotent.
    public func close() async {
        closeNow()
    }

    /// Synchronous ``close()``: stops reading, closes the socket, ends the stream.
    public func closeNow() {
        transport.close()
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

        /// Reads what is waiting, on the loop, into the subscriber's stream. Bounded, so one busy socket cannot
        /// starve the others on its loop (the loop calls again while datagrams are left). Unreachable reports mean
        /// nothing to STUN: its timeouts already handle a server that does not answer.
        func drain(_ transport: any DatagramTransport) {
            let buffer = transport.loop.receiveBuffer
            for _ in 0..<64 {
                guard let input = transport.receive(into: buffer) else { return }
                if case let .datagram(received) = input {
                    yield(STUNDatagram(bytes: Array(buffer.prefix(received.count)), from: received.from))
                }
            }
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

extension UDPDatagramTransport {
    /// A plain STUN socket on the next shared loop (or `loop`), with a bind failure as ``STUNError`` `.socket`.
    static func forSTUN(binding address: SocketAddress, loop: EventLoop = EventLoopGroup.shared.next()) throws(STUNError) -> UDPDatagramTransport {
        do throws(DatagramError) {
            return try UDPDatagramTransport(binding: address, options: .plain, loop: loop)
        } catch {
            throw STUNError(.socket, error.message)
        }
    }
}
