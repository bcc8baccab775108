internal import Foundation
public import HolePunchNet

/// A standalone UDP STUN server: binds the responder's local addresses with plain UDP sockets and answers on one
/// of the process's shared event loops (in a rendezvous process, the loops its QUIC endpoint runs on).
///
/// ```swift
/// let server = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0,
///                                                  alternateIP: .v4(127, 0, 0, 2)))
/// try server.start()
/// defer { server.stop() }
/// ```
///
/// Ports given as 0 are chosen by the kernel; the alternate IP then gets the same port numbers, retrying a few
/// times if another process holds them. `stop()` (or `deinit`) stops reading and closes every socket.
public final class STUNServer: Sendable {
    /// The configuration with real port numbers filled in.
    public let configuration: STUNResponderConfiguration
    /// The bound addresses: (A1,P1), then (A1,P2), (A2,P1), (A2,P2) as configured.
    public var localAddresses: [SocketAddress] { sockets.map(\.localAddress) }
    /// The primary address clients should use.
    public var primaryAddress: SocketAddress { configuration.primary }

    private let sockets: [any DatagramTransport]
    private let responder: STUNResponder
    private let counters = Counters()

    /// What the server has seen so far.
    public struct Statistics: Hashable, Sendable {
        /// Datagrams received.
        public var received = 0
        /// Replies sent.
        public var sent = 0
        /// Datagrams not answered (not STUN, not requests, bad fingerprint, amplification bound).
        public var ignored = 0
    }

    /// Binds every socket the configuration needs.
    ///
    /// - Throws: ``STUNError`` `.socket` when an address cannot be bound, `.invalidConfiguration` when the
    ///   alternate IP's family differs from the primary's.
    public convenience init(configuration requested: STUNResponderConfiguration) throws(STUNError) {
        // One loop for all four sockets: a reply often leaves from another socket than the request came in on.
        let loop = EventLoopGroup.shared.next()
        try self.init(configuration: requested) { address throws(STUNError) in
            try UDPDatagramTransport.forSTUN(binding: address, loop: loop)
        }
    }

    /// Binds every socket the configuration needs with `bind` (UDP sockets, or in-memory transports in tests).
    ///
    /// - Throws: as ``init(configuration:)``.
    package init(
        configuration requested: STUNResponderConfiguration,
        bind: (SocketAddress) throws(STUNError) -> any DatagramTransport
    ) throws(STUNError) {
        if let alt = requested.alternateIP, SocketAddress(ip: alt, port: 0).isIPv6 != requested.primary.isIPv6 {
            throw STUNError(.invalidConfiguration, "alternate IP and primary address must be the same family")
        }
        var lastError = STUNError(.socket, "could not bind the STUN sockets")
        for _ in 0..<10 {
            do throws(STUNError) {
                let (resolved, sockets) = try STUNServer.bindAll(requested, bind)
                self.configuration = resolved
                self.sockets = sockets
                self.responder = STUNResponder(configuration: resolved)
                return
            } catch {
                lastError = error
                // Only ephemeral choices are worth retrying; fixed ports fail the same way again.
                if requested.primary.port != 0 && requested.alternatePort != 0 { break }
            }
        }
        throw lastError
    }

    deinit { stop() }

    /// Starts answering on the event loop.
    ///
    /// - Throws: ``STUNError`` `.socket` when the server was stopped or a socket cannot be watched.
    public func start() throws(STUNError) {
        for socket in sockets {
            let (sockets, responder, counters) = (self.sockets, self.responder, self.counters)
            do throws(DatagramError) {
                try socket.start { [weak socket] in
                    guard let socket else { return }
                    STUNServer.answer(socket, all: sockets, responder: responder, counters: counters)
                }
            } catch {
                throw STUNError(.socket, error.message)
            }
        }
    }

    /// Stops reading and closes every socket; idempotent. The server cannot be restarted.
    public func stop() {
        for socket in sockets { socket.close() }
    }

    /// Answers what waits on `socket`, on the loop. Bounded, so one busy socket cannot starve the wake-ups or the
    /// other sockets on the loop (the loop calls again while datagrams are left).
    private static func answer(
        _ socket: any DatagramTransport, all sockets: [any DatagramTransport], responder: STUNResponder, counters: Counters
    ) {
        let buffer = socket.loop.receiveBuffer
        for _ in 0..<64 {
            guard let input = socket.receive(into: buffer) else { return }
            guard case let .datagram(received) = input else { continue }
            let bytes = Array(buffer.prefix(received.count))
            let replies = responder.replies(to: bytes, from: received.from, receivedOn: socket.localAddress)
            var sent = 0
            for reply in replies {
                guard let from = sockets.first(where: { $0.localAddress == reply.from }) else { continue }
                if (try? from.send(reply.bytes, to: reply.to)) != nil { sent += 1 }
            }
            counters.record(sent: sent)
        }
    }

    /// A snapshot of the counters.
    public var statistics: Statistics { counters.snapshot() }

    private static func bindAll(
        _ requested: STUNResponderConfiguration, _ bind: (SocketAddress) throws(STUNError) -> any DatagramTransport
    ) throws(STUNError) -> (STUNResponderConfiguration, [any DatagramTransport]) {
        var resolved = requested
        var sockets: [any DatagramTransport] = []
        do throws(STUNError) {
            let primary = try bind(requested.primary)
            sockets.append(primary)
            resolved.primary = primary.localAddress
            if let altPort = requested.alternatePort {
                let socket = try bind(SocketAddress(ip: requested.primary.ip, port: altPort))
                sockets.append(socket)
                resolved.alternatePort = socket.localAddress.port
            }
            if let altIP = requested.alternateIP {
                sockets.append(try bind(SocketAddress(ip: altIP, port: resolved.primary.port)))
                if let altPort = resolved.alternatePort {
                    sockets.append(try bind(SocketAddress(ip: altIP, port: altPort)))
                }
            }
        } catch {
            for socket in sockets { socket.close() }
            throw error
        }
        return (resolved, sockets)
    }

    /// Counters shared with the loop. `@unchecked Sendable`: every access holds `lock`.
    private final class Counters: @unchecked Sendable {
        private let lock = NSLock()
        private var value = Statistics()

        func record(sent: Int) {
            lock.withLock {
                value.received += 1
                value.sent += sent
                if sent == 0 { value.ignored += 1 }
            }
        }

        func snapshot() -> Statistics { lock.withLock { value } }
    }
}
