internal import Foundation
public import HolePunchNet

/// A standalone UDP STUN server: binds the responder's local addresses with plain POSIX sockets and answers
/// on a background thread.
///
/// ```swift
/// let server = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0,
///                                                  alternateIP: .v4(127, 0, 0, 2)))
/// try server.start()
/// defer { server.stop() }
/// ```
///
/// Ports given as 0 are chosen by the kernel; the alternate IP then gets the same port numbers, retrying a few
/// times if another process holds them. `stop()` (or `deinit`) stops the thread and closes every socket.
public final class STUNServer: Sendable {
    /// The configuration with real port numbers filled in.
    public let configuration: STUNResponderConfiguration
    /// The bound addresses: (A1,P1), then (A1,P2), (A2,P1), (A2,P2) as configured.
    public var localAddresses: [SocketAddress] { sockets.map(\.localAddress) }
    /// The primary address clients should use.
    public var primaryAddress: SocketAddress { configuration.primary }

    private let sockets: [UDPSocket]
    private let loop: PollLoop
    private let counters: Counters

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
    public init(configuration requested: STUNResponderConfiguration) throws(STUNError) {
        if let alt = requested.alternateIP, SocketAddress(ip: alt, port: 0).isIPv6 != requested.primary.isIPv6 {
            throw STUNError(.invalidConfiguration, "alternate IP and primary address must be the same family")
        }
        var lastError = STUNError(.socket, "could not bind the STUN sockets")
        for _ in 0..<10 {
            do {
                let (resolved, sockets) = try STUNServer.bindAll(requested)
                self.configuration = resolved
                self.sockets = sockets
                let counters = Counters()
                self.counters = counters
                let responder = STUNResponder(configuration: resolved)
                self.loop = PollLoop(sockets: sockets) { index, bytes, from in
                    let local = sockets[index].localAddress
                    let replies = responder.replies(to: bytes, from: from, receivedOn: local)
                    var sent = 0
                    for reply in replies {
                        guard let socket = sockets.first(where: { $0.localAddress == reply.from }) else { continue }
                        if (try? socket.send(reply.bytes, to: reply.to)) != nil { sent += 1 }
                    }
                    counters.record(sent: sent)
                }
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

    /// Starts answering on the background thread.
    public func start() throws(STUNError) {
        try loop.start()
    }

    /// Stops the thread and closes every socket; idempotent. The server cannot be restarted.
    public func stop() {
        loop.stop()
        for socket in sockets { socket.close() }
    }

    /// A snapshot of the counters.
    public var statistics: Statistics { counters.snapshot() }

    private static func bindAll(_ requested: STUNResponderConfiguration) throws(STUNError) -> (STUNResponderConfiguration, [UDPSocket]) {
        var resolved = requested
        var sockets: [UDPSocket] = []
        do {
            let primary = try UDPSocket(binding: requested.primary)
            sockets.append(primary)
            resolved.primary = primary.localAddress
            if let altPort = requested.alternatePort {
                let socket = try UDPSocket(binding: SocketAddress(ip: requested.primary.ip, port: altPort))
                sockets.append(socket)
                resolved.alternatePort = socket.localAddress.port
            }
            if let altIP = requested.alternateIP {
                sockets.append(try UDPSocket(binding: SocketAddress(ip: altIP, port: resolved.primary.port)))
                if let altPort = resolved.alternatePort {
                    sockets.append(try UDPSocket(binding: SocketAddress(ip: altIP, port: altPort)))
                }
            }
        } catch {
            for socket in sockets { socket.close() }
            throw error
        }
        return (resolved, sockets)
    }

    /// Counters shared with the poll thread. `@unchecked Sendable`: every access holds `lock`.
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
