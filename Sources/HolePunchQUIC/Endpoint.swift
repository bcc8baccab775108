public import HolePunchNet
public import Logging

/// One UDP socket that dials and accepts QUIC connections, and carries raw datagrams (STUN, punch probes) too.
///
/// A NAT mapping belongs to one local address and port, so everything a peer sends for a punch leaves from this
/// one socket. Datagrams are sorted by their first byte (RFC 9443): `0x00–0x03` (STUN and probes) are queued for the
/// owner to read from ``nonQUICDatagrams``, those with the QUIC fixed bit are routed by destination connection ID,
/// and the rest are dropped and counted.
///
/// The actor's executor is the event loop that owns the socket, so all ngtcp2 and GnuTLS state stays on one thread.
public actor Endpoint {
    nonisolated let loop: EventLoop

    /// The executor: the endpoint's event loop.
    public nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    /// The address the socket is bound to, with the real port when bound to port 0.
    public nonisolated let localAddress: SocketAddress
    /// The IP families this endpoint can dial and punch: its socket's family, plus IPv4 for a dual-stack socket
    /// bound to `::` (IPv4 peers appear as plain IPv4 addresses; the socket maps them on send).
    public nonisolated let reachableFamilies: Set<IPFamily>
    /// This endpoint's NodeID, from its identity.
    public nonisolated let nodeID: NodeID
    /// Accepted connections, each already authenticated: its ``QUICConnection/peerNodeID`` passed the accept policy.
    public nonisolated let incoming: AsyncStream<QUICConnection>
    /// The datagrams that are not QUIC (first byte 0x00–0x03: STUN, punch probes) and the ICMP unreachable reports,
    /// in arrival order, for one reader (like quic-go's `Transport.ReadNonQUICPacket`).
    ///
    /// Iterate it from one task at a time. It holds at most ``EndpointConfiguration/nonQUICBufferLimit`` items
    /// while the reader is behind; what arrives beyond that is dropped and counted in
    /// ``EndpointStats/nonQUICDropped``, as a full socket queue would. It ends when the endpoint closes.
    public nonisolated let nonQUICDatagrams: AsyncStream<NonQUICDatagram>

    let incomingContinuation: AsyncStream<QUICConnection>.Continuation
    let nonQUICContinuation: AsyncStream<NonQUICDatagram>.Continuation
    /// The datagram transport under the endpoint: a UDP socket, or an in-memory one in tests.
    let transport: any DatagramTransport
    var configuration: EndpointConfiguration
    let logger: Logger
    /// This identity's credentials, shared with every endpoint of the same identity.
    let credentials: TLSCredentials
    let router: ConnectionRouter
    var connections: [UInt64: ConnectionCore] = [:]
    var nextKey: UInt64 = 1
    var counters = EndpointStats()
    /// What new client Initials get (a connection, a Retry, nothing), and the server handshakes pending per source.
    var gate: HandshakeGate
    let retryKey = RetryTokenKey()
    /// Handshake hints for connections a peer address opens (``setHandshakeHintProvider(_:)``).
    var handshakeHintProvider: (@Sendable (SocketAddress) -> HandshakeHints?)?
    var isClosed = false
    var failures: [QUICError] = []
    /// Why recently ended connections ended, and which of their streams were not fully acknowledged, so a handle
    /// asking after the fact gets the real answer. Bounded: the oldest entries go first.
    var ended: [UInt64: EndedConnection] = [:]
    /// Every suspended caller of a connection or stream operation.
    let waiters = Waiters()
    var endedOrder: [UInt64] = []
    /// Connections this side closed, answered with their close again while their peers still send (``ClosingTable``).
    var closing = ClosingTable()
    /// Ended connections that still hold received stream data (or streams not yet accepted): a peer that sends and
    /// closes at once must not lose what already arrived. Bounded: the oldest go first.
    var drainable: [UInt64: ConnectionCore] = [:]
    var drainableOrder: [UInt64] = []
    var touched: [ConnectionCore] = []
    var touchedKeys: Set<UInt64> = []
    /// The relay allocations attached (``attachRelay(_:)``), by server address: datagrams from a key are relay
    /// traffic, and sends on a relayed path go through its framing.
    var relays: [SocketAddress: any RelayFraming] = [:]
    let io: SocketBuffers

    /// Binds a UDP socket and starts serving it.
    ///
    /// - Parameters:
    ///   - address: where to bind; port 0 picks a free port (see ``localAddress``).
    ///   - configuration: identity, accept policy and transport settings.
    ///   - logger: where the endpoint logs (at debug level and below, never above info).
    /// - Throws: ``QUICError`` (`socket`) when the socket cannot be bound, (`tls`) when the identity is unusable, or
    ///   (`invalidArgument`) when the protocol list breaks ``EndpointConfiguration/maxALPNs`` or
    ///   ``EndpointConfiguration/maxALPNLength``.
    public static func bind(
        _ address: SocketAddress,
        configuration: EndpointConfiguration,
        logger: Logger = Logger(label: "holepunch.quic", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws -> Endpoint {
        if let problem = EndpointConfiguration.alpnProblem([configuration.alpn] + configuration.additionalALPNs) {
            throw QUICError(.invalidArgument, problem)
        }
        let transport: UDPDatagramTransport
        do {
            // Bursts (a target answering hundreds of punches, bulk transfer) overflow the default socket queues,
            // and ICMP errors are queued for us: the endpoint options.
            transport = try UDPDatagramTransport(binding: address, options: .endpoint)
        } catch {
            throw QUICError(.socket, error.description)
        }
        return try await open(on: transport, configuration: configuration, logger: logger)
    }

    /// Serves an endpoint on a transport the caller made (tests: an in-memory one); the endpoint closes it.
    ///
    /// - Throws: as ``bind(_:configuration:logger:)``, minus the binding.
    package static func open(
        on transport: any DatagramTransport,
        configuration: EndpointConfiguration,
        logger: Logger = Logger(label: "holepunch.quic", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws -> Endpoint {
        let endpoint: Endpoint
        do {
            endpoint = try Endpoint(transport: transport, configuration: configuration, logger: logger)
        } catch {
            transport.close()
            throw error
        }
        try await endpoint.start()
        return endpoint
    }

    private init(transport: any DatagramTransport, configuration: EndpointConfiguration, logger: Logger) throws {
        if let problem = EndpointConfiguration.alpnProblem([configuration.alpn] + configuration.additionalALPNs) {
            throw QUICError(.invalidArgument, problem)
        }
        credentials = try configuration.identity.tlsCredentials(presentCertificate: configuration.presentsCertificate)
        self.transport = transport
        self.localAddress = transport.localAddress
        self.reachableFamilies = transport.reachableFamilies
        self.nodeID = configuration.identity.nodeID
        self.configuration = configuration
        self.logger = logger
        self.router = ConnectionRouter(policy: configuration.acceptPolicy)
        self.gate = HandshakeGate(configuration)
        self.loop = transport.loop
        self.io = SocketBuffers(local: transport.localAddress, loop: loop)
        (incoming, incomingContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
        (nonQUICDatagrams, nonQUICContinuation) = AsyncStream.makeStream(
            of: NonQUICDatagram.self, bufferingPolicy: .bufferingOldest(max(1, configuration.nonQUICBufferLimit))
        )
    }

    deinit {
        // Normally `close()` has run. If not, the transport stops watching its socket (on the loop) and closes it.
        if !isClosed {
            transport.close()
            incomingContinuation.finish()
            nonQUICContinuation.finish()
        }
    }

    // MARK: Public API

    /// Dials a peer and completes a mutually authenticated handshake.
    ///
    /// Returns once the handshake is *confirmed*: the peer has also verified our certificate (or, with
    /// ``ConnectOptions/returnsBeforeConfirmation``, once we verified the peer).
    /// Cancelling the calling task abandons the attempt at once and frees its state.
    ///
    /// - Throws: ``QUICError`` with `peerAuthenticationFailed` (the peer is not `expecting`), `handshakeFailed`
    ///   (the peer rejected us), `handshakeTimeout`, `cancelled`, or `endpointClosed`.
    public func connect(
        to remote: SocketAddress, expecting peer: NodeID, options: ConnectOptions = ConnectOptions()
    ) async throws -> QUICConnection {
        try await connect(via: .direct(remote), expecting: peer, options: options)
    }

    /// Dials a peer on a path: ``PathRoute/direct(_:)`` is ``connect(to:expecting:options:)``;
    /// ``PathRoute/relay(server:peer:)`` dials through a relay attached with ``attachRelay(_:)`` (the peer
    /// answers our relayed address as a plain UDP address). The connection keeps `route` as its first path and
    /// may move off it later (``QUICConnection/switchPath(to:)``); QUIC sees the route's peer address throughout.
    ///
    /// - Throws: as ``connect(to:expecting:options:)``, and `invalidArgument` when no relay
    ///   is attached for the route's server.
    public func connect(
        via route: PathRoute, expecting peer: NodeID, options: ConnectOptions = ConnectOptions()
    ) async throws -> QUICConnection {
        guard !isClosed else { throw QUICError(.endpointClosed, "the endpoint is closed") }
        guard reachableFamilies.contains(route.address.family) else {
            throw QUICError(.invalidArgument, "cannot dial \(route) from a socket bound to \(localAddress)")
        }
        if case .relay(let server, _) = route, relays[server] == nil {
            throw QUICError(.invalidArgument, "no relay is attached for \(server)")
        }
        let remote = route.peer
        // The documented error type, not `CancellationError`: callers switch on `QUICError.code`.
        guard !Task.isCancelled else { throw QUICError(.cancelled, "the dial to \(remote) was cancelled") }
        let core = try makeClientConnection(to: route, expecting: peer, options: options)
        let key = core.key
        flush(core)
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                switch core.phase {
                case .closed(let error): continuation.resume(throwing: error)
                case .established: continuation.resume()
                case .handshaking where core.returnsOnCompletion && core.isHandshakeCompleted:
                    // Completed before this waiter was in place (socket events ran between the first flush and
                    // here); waiting for its resume would wait for a confirmation the caller did not ask for.
                    continuation.resume()
                case .handshaking: core.handshakeWaiter = continuation
                }
            }
        } onCancel: { [loop] in
            loop.execute { self.assumeIsolated { $0.abandon(key) } }
        }
        return QUICConnection(
            endpoint: self, key: key, peerNodeID: peer, remoteAddress: remote, isClient: true, serverName: options.serverName,
            alpn: core.alpn ?? options.alpn ?? configuration.alpn
        )
    }

    /// Sends raw bytes from the endpoint's socket (punch probes, STUN).
    ///
    /// - Throws: ``QUICError`` (`socket`) when the kernel refuses the datagram.
    public func send(datagram: [UInt8], to address: SocketAddress) throws {
        guard !isClosed else { throw QUICError(.endpointClosed, "the endpoint is closed") }
        let outcome: DatagramSendOutcome
        do {
            outcome = try transport.send(datagram, to: address)
        } catch {
            counters.sendErrors += 1
            throw QUICError(.socket, "sending to \(address): \(error.message)")
        }
        guard outcome == .sent else {
            counters.sendErrors += 1
            throw QUICError(.socket, "sending to \(address): the socket buffer is full")
        }
        counters.datagramsSent += 1
    }

    /// Sets what decides the handshake hints of connections that peers open to this endpoint from now on: asked
    /// on the event loop with the peer's address, for each new client Initial and again on the packets of a
    /// handshake that got none yet; nil hints mean the defaults. Keep it short (a lock and a lookup).
    ///
    /// Answering for an address vouches for it: its Initials skip address validation (no Retry round trip) and
    /// its handshake datagrams may be copied, beyond QUIC's anti-amplification limit. So answer only for addresses
    /// shown to be the peer's: a target punch answers for the exact addresses its peer's probes came from.
    public func setHandshakeHintProvider(_ provider: (@Sendable (SocketAddress) -> HandshakeHints?)?) {
        handshakeHintProvider = provider
    }

    /// Replaces the accept policy for connections that arrive from now on.
    public func setAcceptPolicy(_ policy: AcceptPolicy) {
        router.policy = policy
        configuration.acceptPolicy = policy
    }

    /// The socket's counters.
    public var stats: EndpointStats { counters }

    /// The identity this endpoint presents.
    public var identity: Identity { configuration.identity }

    /// The application protocols this endpoint accepts, its ``EndpointConfiguration/alpn`` first.
    public var alpns: [String] { [configuration.alpn] + configuration.additionalALPNs }

    /// How many connections the endpoint holds, in any state; zero once all are closed or abandoned.
    public var connectionCount: Int { connections.count }

    /// How many server handshakes are in progress from sources not yet validated (see ``AddressValidation``).
    public var unvalidatedHandshakes: Int { gate.unvalidatedCount }

    /// How many connection IDs route to a connection; zero once all are closed.
    public var routeCount: Int { router.routes.count }

    /// How many callers are suspended in a connection or stream wait (tests: a cancelled wait leaves none).
    var suspendedWaiterCount: Int { waiters.count }

    /// The most recent handshake failures (newest last, at most 32), on either side.
    public var recentHandshakeFailures: [QUICError] { failures }

    /// Closes every connection (application code 0) and the socket, at once: like ``QUICConnection/abort(errorCode:reason:)``,
    /// it does not wait for acknowledgements, so close connections gracefully first. Idempotent.
    public func close() {
        guard !isClosed else { return }
        for core in Array(connections.values) {
            sendClose(core, applicationCode: 0, reason: "endpoint closed")
            finish(core, QUICError(.endpointClosed, "the endpoint was closed"))
        }
        isClosed = true
        transport.close()
        incomingContinuation.finish()
        nonQUICContinuation.finish()
    }
}

/// What an endpoint hands its owner besides QUIC: read from ``Endpoint/nonQUICDatagrams``.
public enum NonQUICDatagram: Sendable, Hashable {
    /// A datagram whose first byte is 0x00–0x03 (STUN, punch probes), and where it came from.
    case datagram([UInt8], from: SocketAddress)
    /// An ICMP unreachable report: a datagram from this socket could not reach this address.
    case unreachable(SocketAddress)
}
