internal import Foundation
import HolePunch
import HolePunchSTUN
public import Logging
public import ServiceLifecycle
public import HolePunchQUIC
public import HolePunchNet

/// The rendezvous: a QUIC server on our stack that registers peers and coordinates their punches.
///
/// Peers dial it from their punch socket, so `QUICConnection.remoteAddress` is the punch mapping, and the
/// TLS handshake proves their NodeID. Each peer opens one bidirectional control stream carrying
/// length-prefixed JSON (`ClientMessage` in, ``ServerMessage`` out). The protocol logic lives in
/// ``RendezvousState``; this actor only does I/O, timers and RTT pings.
///
/// Lifecycle: ``bind(configuration:logger:)`` binds the sockets (so callers learn the real ports), ``run()``
/// serves until ``shutdown()``, task cancellation or a ServiceLifecycle graceful shutdown.
public actor RendezvousServer: Service {
    enum Phase { case bound, running, stopped }

    /// The QUIC endpoint peers connect to.
    public nonisolated let endpoint: Endpoint
    /// The server's NodeID.
    public nonisolated let nodeID: NodeID
    /// The QUIC listen address (with the real port).
    public nonisolated let address: SocketAddress
    /// The STUN responders' bound addresses (the main responder's primary first, then the other family's),
    /// empty when none runs.
    public nonisolated let stunAddresses: [SocketAddress]
    /// The STUN addresses advertised to peers (`Registered.stunServers`): each responder's primary address, unless
    /// it is a wildcard (not a destination a peer can use).
    public nonisolated let advertisedSTUN: [SocketAddress]

    let configuration: RendezvousServerConfiguration
    let stunServer: STUNServer?
    let otherSTUN: STUNServer?
    let logger: Logger
    let clock = ContinuousClock()
    let origin: ContinuousClock.Instant
    var phase = Phase.bound
    var state: RendezvousState
    var links: [UInt64: Link] = [:]
    var linkByNode: [NodeID: UInt64] = [:]
    var nextConnection: UInt64 = 1
    var nextPing: UInt64 = 1
    var stats = RendezvousStatistics()
    var stopWaiters: [CheckedContinuation<Void, Never>] = []
    /// The cluster's directory, if this instance is one of several (see ``use(directory:)``).
    var directory: (any RendezvousDirectory)?
    /// NodeIDs announced to the directory, with their registration's wall-clock time in milliseconds.
    var announced: [NodeID: Int64] = [:]
    /// The latest round trip of a routed request (sent with the next one, so the holder can plan for it).
    var directoryRTT = Duration.zero
    var routedInFlight = 0

    /// One peer connection, the queue its writer drains and everything else it may cost (each bounded by
    /// ``RendezvousLimits``).
    struct Link {
        var node: NodeID
        var connection: QUICConnection
        var outbox: AsyncStream<Outgoing>.Continuation
        /// Frames in `outbox` the writer has not taken yet.
        var queued = 0
        /// Every message the peer sends takes a token.
        var messages: TokenBucket
        /// RTT pings sent on this connection and not answered yet, by ping id.
        var pings: [UInt64: Ping] = [:]
        /// Set once the server decided to close it: nothing more is read, handled or queued.
        var closing = false
        /// The QUIC handshake's RTT (plus any injected path delay both ways), the registration's provisional RTT.
        var handshakeRTT: Duration?
    }

    /// An RTT ping in flight: `sentAt` is nil until the writer hands it to QUIC.
    struct Ping {
        var queuedAt: Duration
        var sentAt: Duration?
        var samplesLeft: Int
    }

    /// A frame to write once `notBefore` has passed; the session id marks coordinate messages.
    struct Outgoing: Sendable {
        var frame: [UInt8]
        var notBefore: ContinuousClock.Instant
        var sessionID: String?
        var pingID: UInt64?
    }

    /// Binds the QUIC endpoint and the STUN sockets; nothing runs until ``run()``.
    ///
    /// - Throws: ``RendezvousError`` `connectionFailed` when a socket cannot be bound.
    public static func bind(
        configuration: RendezvousServerConfiguration,
        logger: Logger = Logger(label: "holepunch.rendezvous", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(RendezvousError) -> RendezvousServer {
        let endpoint: Endpoint
        do {
            let limits = configuration.limits
            endpoint = try await Endpoint.bind(
                configuration.listen,
                configuration: EndpointConfiguration(
                    identity: configuration.identity, acceptPolicy: .any, keepAliveInterval: nil,
                    streamReceiveWindow: limits.streamReceiveWindow, connectionReceiveWindow: limits.connectionReceiveWindow,
                    maxIncomingStreams: max(1, limits.streamsPerConnection), streamSendBuffer: limits.streamSendBuffer,
                    maxConnections: limits.maxConnections),
                logger: logger
            )
        } catch {
            throw RendezvousError(.connectionFailed, "cannot listen on \(configuration.listen): \(error)")
        }
        let stun: STUNServer?
        let other: STUNServer?
        do {
            stun = try configuration.stun.map { configuration throws(STUNError) in try STUNServer(configuration: configuration) }
            other = try configuration.otherFamilySTUN.map { configuration throws(STUNError) in try STUNServer(configuration: configuration) }
        } catch {
            await endpoint.close()
            throw RendezvousError(.connectionFailed, "cannot bind the STUN responder: \(error)")
        }
        return RendezvousServer(endpoint: endpoint, stun: stun, otherSTUN: other, configuration: configuration, logger: logger)
    }

    private init(endpoint: Endpoint, stun: STUNServer?, otherSTUN: STUNServer?, configuration: RendezvousServerConfiguration,
                 logger: Logger) {
        self.endpoint = endpoint
        self.nodeID = endpoint.nodeID
        self.address = endpoint.localAddress
        self.stunServer = stun
        self.otherSTUN = otherSTUN
        self.stunAddresses = (stun?.localAddresses ?? []) + (otherSTUN?.localAddresses ?? [])
        self.advertisedSTUN = [stun, otherSTUN].compactMap { $0?.localAddresses.first }
            .filter { !$0.ipBytes.allSatisfy { $0 == 0 } }
        self.configuration = configuration
        self.logger = logger
        self.state = RendezvousState(configuration: configuration.state)
        self.origin = ContinuousClock.now
    }

    /// Serves until ``shutdown()``, cancellation, or graceful shutdown; then closes every connection and socket.
    ///
    /// - Throws: ``RendezvousError`` `shuttingDown` when the server already ran.
    public func run() async throws {
        guard phase == .bound else { throw RendezvousError(.shuttingDown, "the server has already run") }
        phase = .running
        for responder in [stunServer, otherSTUN].compactMap({ $0 }) {
            do { try responder.start() } catch {
                logger.info("stun responder failed to start", metadata: ["error": "\(error)"])
            }
        }
        logger.info("rendezvous listening", metadata: ["rendezvous.address": "\(address)", "rendezvous.node": "\(nodeID)"])
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await withDiscardingTaskGroup { group in
                    group.addTask { await self.housekeeping() }
                    for await connection in self.endpoint.incoming {
                        group.addTask { await self.serve(connection) }
                    }
                    // The endpoint closed: stop the timers and any connection still being served.
                    group.cancelAll()
                }
            } onCancel: {
                Task { await self.shutdown() }
            }
        } onGracefulShutdown: {
            Task { await self.shutdown() }
        }
        await shutdown()
    }

    /// Stops serving: closes every connection, the endpoint and the STUN sockets. Idempotent.
    public func shutdown() async {
        guard phase != .stopped else { return }
        phase = .stopped
        await directory?.close()
        for link in links.values { link.outbox.finish() }
        await endpoint.close()
        stunServer?.stop()
        otherSTUN?.stop()
        for waiter in stopWaiters { waiter.resume() }
        stopWaiters.removeAll()
    }

    /// Current counters.
    public func statistics() -> RendezvousStatistics {
        var snapshot = stats
        snapshot.registrations = state.registrationCount
        snapshot.sessions = state.sessionCount
        snapshot.connections = links.count
        snapshot.pendingPings = links.values.reduce(0) { $0 + $1.pings.count }
        snapshot.queuedFrames = links.values.reduce(0) { $0 + $1.queued }
        for stun in [stunServer?.statistics, otherSTUN?.statistics].compactMap({ $0 }) {
            snapshot.stunReceived += stun.received
            snapshot.stunSent += stun.sent
        }
        return snapshot
    }

    /// The server's RTT estimate for a registered peer (for tests and monitoring).
    public func rtt(of node: NodeID) -> Duration? { state.peer(node)?.rtt }

    /// How many RTT samples the server has for `node` (0 when unregistered).
    public func rttSamples(of node: NodeID) -> Int { state.peer(node)?.rttSamples ?? 0 }

    /// Whether `node` is registered.
    public func isRegistered(_ node: NodeID) -> Bool { state.peer(node) != nil }

    var now: Duration { origin.duration(to: clock.now) }

    /// Why the server ends a connection: the QUIC application code and reason it closes with.
    struct Ending {
        var code: UInt64
        var reason: String
        static let normal = Ending(code: 0, reason: "")
    }

}

extension RendezvousServer {
    /// Runs the server in a ServiceLifecycle `ServiceGroup` that shuts it down gracefully on SIGTERM or SIGINT
    /// (what `holepunch rendezvous` does), and returns once it has stopped.
    ///
    /// - Throws: whatever ``run()`` or the group throws.
    public func runUntilSignalled(logger: Logger) async throws {
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: [.init(service: self)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
