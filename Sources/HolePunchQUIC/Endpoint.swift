public import HolePunchNet
public import Logging
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchShims
#if canImport(Glibc)
import Glibc
#endif

/// One UDP socket that dials and accepts QUIC connections, and carries raw datagrams (STUN, punch probes) too.
///
/// A NAT mapping belongs to one local address and port, so everything a peer sends for a punch leaves from this
/// one socket. Datagrams are sorted by their first byte (RFC 9443): `0x00–0x03` go to the datagram handler (STUN and
/// probes), those with the QUIC fixed bit are routed by destination connection ID, and the rest are dropped and
/// counted.
///
/// The actor's executor is the event loop that owns the socket, so all ngtcp2 and GnuTLS state stays on one thread.
public actor Endpoint {
    nonisolated let loop: EventLoop

    /// The executor: the endpoint's event loop.
    public nonisolated var unownedExecutor: UnownedSerialExecutor { loop.asUnownedSerialExecutor() }

    /// The address the socket is bound to, with the real port when bound to port 0.
    public nonisolated let localAddress: SocketAddress
    /// This endpoint's NodeID, from its identity.
    public nonisolated let nodeID: NodeID
    /// Accepted connections, each already authenticated: its ``QUICConnection/peerNodeID`` passed the accept policy.
    public nonisolated let incoming: AsyncStream<QUICConnection>

    private let incomingContinuation: AsyncStream<QUICConnection>.Continuation
    private let fd: Int32
    private var configuration: EndpointConfiguration
    private let logger: Logger
    /// This identity's credentials, shared with every endpoint of the same identity (internal so a test can check).
    let credentials: TLSCredentials
    private let router: ConnectionRouter
    private var connections: [UInt64: ConnectionCore] = [:]
    private var nextKey: UInt64 = 1
    private var datagramHandler: (@Sendable ([UInt8], SocketAddress) -> Void)?
    private var unreachableHandler: (@Sendable (SocketAddress) -> Void)?
    private var counters = EndpointStats()
    /// What new client Initials get (a connection, a Retry, nothing), and the server handshakes pending per source.
    private var gate: HandshakeGate
    private let retryKey = RetryTokenKey()
    /// Handshake hints for connections a peer address opens (``setHandshakeHintProvider(_:)``).
    private var handshakeHintProvider: (@Sendable (SocketAddress) -> HandshakeHints?)?
    private var isClosed = false
    private var failures: [QUICError] = []
    /// Why recently ended connections ended, and which of their streams were not fully acknowledged, so a handle
    /// asking after the fact gets the real answer. Bounded: the oldest entries go first.
    private var ended: [UInt64: EndedConnection] = [:]
    /// Every suspended caller of a connection or stream operation.
    private let waiters = Waiters()
    private var endedOrder: [UInt64] = []
    /// Ended connections that still hold received stream data (or streams not yet accepted): a peer that sends and
    /// closes at once must not lose what already arrived. Bounded: the oldest go first.
    private var drainable: [UInt64: ConnectionCore] = [:]
    private var drainableOrder: [UInt64] = []
    private var touched: [ConnectionCore] = []
    private var touchedKeys: Set<UInt64> = []
    private let io: SocketBuffers
    /// In-memory transport for tests: packets go straight to this peer's dispatch, no socket involved.
    private weak var memoryPeer: Endpoint?

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
        let endpoint = try Endpoint(address: address, configuration: configuration, logger: logger)
        try await endpoint.start()
        return endpoint
    }

    private init(address: SocketAddress, configuration: EndpointConfiguration, logger: Logger) throws {
        if let problem = EndpointConfiguration.alpnProblem([configuration.alpn] + configuration.additionalALPNs) {
            throw QUICError(.invalidArgument, problem)
        }
        let family = address.isIPv6 ? AF_INET6 : AF_INET
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw QUICError(.socket, "socket(): \(String(cString: strerror(errno)))") }
        // Bursts (a target answering hundreds of punches, bulk transfer) overflow the default ~200 KiB queue.
        // The FORCE variants (root only) go past net.core.rmem_max; otherwise the kernel caps the request.
        var bufferSize: Int32 = 4 << 20
        let size = socklen_t(MemoryLayout<Int32>.size)
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bufferSize, size) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufferSize, size)
        }
        if setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bufferSize, size) != 0 {
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufferSize, size)
        }
        // ICMP errors (port or host unreachable) are queued for us to read, with the address they concern.
        var on: Int32 = 1
        if family == AF_INET {
            _ = setsockopt(fd, Int32(IPPROTO_IP), IP_RECVERR, &on, socklen_t(MemoryLayout<Int32>.size))
        } else {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_RECVERR, &on, socklen_t(MemoryLayout<Int32>.size))
        }
        let bound = address.withSockAddr { Glibc.bind(fd, $0, $1) }
        guard bound == 0 else {
            let message = String(cString: strerror(errno))
            Glibc.close(fd)
            throw QUICError(.socket, "bind(\(address)): \(message)")
        }
        guard let local = SocketAddress(boundTo: fd) else {
            Glibc.close(fd)
            throw QUICError(.socket, "getsockname failed")
        }
        do {
            credentials = try configuration.identity.tlsCredentials(presentCertificate: configuration.presentsCertificate)
        } catch {
            Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.localAddress = local
        self.nodeID = configuration.identity.nodeID
        self.configuration = configuration
        self.logger = logger
        self.router = ConnectionRouter(policy: configuration.acceptPolicy)
        self.gate = HandshakeGate(configuration)
        self.loop = EventLoopGroup.shared.next()
        self.io = SocketBuffers(local: local, loop: loop)
        (incoming, incomingContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
    }

    /// Creates an endpoint with no socket, for in-memory tests; `link(to:)` connects two of them.
    init(inMemoryAt address: SocketAddress, configuration: EndpointConfiguration) throws {
        credentials = try configuration.identity.tlsCredentials(presentCertificate: configuration.presentsCertificate)
        self.fd = -1
        self.localAddress = address
        self.nodeID = configuration.identity.nodeID
        self.configuration = configuration
        self.logger = Logger(label: "holepunch.quic.memory", factory: { _ in SwiftLogNoOpLogHandler() })
        self.router = ConnectionRouter(policy: configuration.acceptPolicy)
        self.gate = HandshakeGate(configuration)
        self.loop = EventLoopGroup.shared.next()
        self.io = SocketBuffers(local: address, loop: loop)
        (incoming, incomingContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
    }

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

    deinit {
        // Normally `close()` has run. If not, unregister and close on the loop thread that owns the handler table.
        if !isClosed && fd >= 0 {
            let fd = self.fd
            let loop = self.loop
            loop.execute {
                loop.unregister(fd: fd)
                Glibc.close(fd)
            }
            incomingContinuation.finish()
        }
    }

    private func start() throws {
        try loop.register(fd: fd) { [weak self] events in
            guard let self else { return }
            self.assumeIsolated { $0.handleSocketEvents(events) }
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
        guard !isClosed else { throw QUICError(.endpointClosed, "the endpoint is closed") }
        guard remote.isIPv6 == localAddress.isIPv6 else {
            throw QUICError(.invalidArgument, "cannot dial \(remote) from a socket bound to \(localAddress)")
        }
        // The documented error type, not `CancellationError`: callers switch on `QUICError.code`.
        guard !Task.isCancelled else { throw QUICError(.cancelled, "the dial to \(remote) was cancelled") }
        let core = try makeClientConnection(to: remote, expecting: peer, options: options)
        let key = core.key
        flush(core)
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                switch core.phase {
                case .closed(let error): continuation.resume(throwing: error)
                case .established: continuation.resume()
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
        if fd < 0 {
            deliverInMemory(datagram)
            return
        }
        let sent = datagram.withUnsafeBytes { bytes in
            address.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, $1) }
        }
        guard sent >= 0 else {
            counters.sendErrors += 1
            throw QUICError(.socket, "sendto(\(address)): \(String(cString: strerror(errno)))")
        }
        counters.datagramsSent += 1
    }

    /// Sets the receiver of datagrams whose first byte is 0x00–0x03 (STUN and punch probes).
    ///
    /// It runs on the endpoint's event loop for each datagram: keep it short and hand work off.
    public func setDatagramHandler(_ handler: (@Sendable ([UInt8], SocketAddress) -> Void)?) {
        datagramHandler = handler
    }

    /// Sets the receiver of ICMP unreachable reports: the address that a datagram from this socket could not reach.
    public func setUnreachableHandler(_ handler: (@Sendable (SocketAddress) -> Void)?) {
        unreachableHandler = handler
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
        if fd >= 0 {
            loop.unregister(fd: fd)
            Glibc.close(fd)
        }
        incomingContinuation.finish()
    }

    // MARK: Connection setup

    private func allocateKey() -> UInt64 {
        defer { nextKey += 1 }
        return nextKey
    }

    private func settings(initialRTT: Duration, handshakeTimeout: Duration) -> ngtcp2_settings {
        var settings = ngtcp2_settings()
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION, &settings)
        settings.initial_ts = hp_now_ns()
        settings.initial_rtt = nanoseconds(initialRTT)
        settings.handshake_timeout = nanoseconds(handshakeTimeout)
        settings.max_window = UInt64(configuration.connectionReceiveWindow) * 2
        settings.max_stream_window = UInt64(configuration.streamReceiveWindow) * 2
        return settings
    }

    private func transportParams() -> ngtcp2_transport_params {
        var params = ngtcp2_transport_params()
        ngtcp2_transport_params_default_versioned(NGTCP2_TRANSPORT_PARAMS_VERSION, &params)
        params.initial_max_streams_bidi = UInt64(configuration.maxIncomingStreams)
        params.initial_max_streams_uni = 0
        params.initial_max_stream_data_bidi_local = UInt64(configuration.streamReceiveWindow)
        params.initial_max_stream_data_bidi_remote = UInt64(configuration.streamReceiveWindow)
        params.initial_max_data = UInt64(configuration.connectionReceiveWindow)
        params.max_idle_timeout = nanoseconds(configuration.idleTimeout)
        // We would rather not invite RFC 9287 greasing (the socket is shared with STUN), but ngtcp2 0.12 advertises
        // it regardless of this field; `dispatch` copes with greased packets.
        params.grease_quic_bit = 0
        return params
    }

    private func makeClientConnection(
        to remote: SocketAddress, expecting peer: NodeID, options: ConnectOptions
    ) throws -> ConnectionCore {
        let core = ConnectionCore(key: allocateKey(), isClient: true, remote: remote, expectedNodeID: peer)
        core.router = router
        core.waiters = waiters
        core.serverName = options.serverName
        core.handshakeCopies = min(max(options.handshakePacketCopies, 1), HandshakeHints.maxPacketCopies)
        core.returnsOnCompletion = options.returnsBeforeConfirmation
        var dcid = randomConnectionID(length: 18)
        var scid = randomConnectionID(length: localCIDLength)
        var callbacks = ConnectionCore.makeCallbacks(client: true)
        var settings = settings(
            initialRTT: options.initialRTT ?? configuration.initialRTT,
            handshakeTimeout: options.handshakeTimeout ?? configuration.handshakeTimeout
        )
        var params = transportParams()
        try core.makeSession(credentials: credentials, alpns: [options.alpn ?? configuration.alpn])
        var conn: OpaquePointer?
        let rv = io.withPath(remote: remote) { path in
            ngtcp2_conn_client_new_versioned(
                &conn, &dcid, &scid, path, NGTCP2_PROTO_VER_V1,
                NGTCP2_CALLBACKS_VERSION, &callbacks, NGTCP2_SETTINGS_VERSION, &settings,
                NGTCP2_TRANSPORT_PARAMS_VERSION, &params, nil, Unmanaged.passUnretained(core).toOpaque()
            )
        }
        guard rv == 0, let conn else {
            throw QUICError(.invalidArgument, "ngtcp2_conn_client_new: \(String(cString: ngtcp2_strerror(rv)))")
        }
        core.conn = conn
        ngtcp2_conn_set_tls_native_handle(conn, UnsafeMutableRawPointer(core.session))
        configureKeepAlive(conn)
        let key = CIDKey(scid)
        core.localCIDs.insert(key)
        router.routes[key] = core
        connections[core.key] = core
        return core
    }

    /// A server connection for a client Initial. `originalDCID` is set when the Initial carried a valid Retry
    /// token: the DCID of the client's first Initial, which the transport parameters must name.
    private func makeServerConnection(
        header: inout ngtcp2_pkt_hd, from remote: SocketAddress, hints: HandshakeHints?, originalDCID: ngtcp2_cid?
    ) -> ConnectionCore? {
        let core = ConnectionCore(key: allocateKey(), isClient: false, remote: remote, expectedNodeID: nil)
        core.router = router
        core.waiters = waiters
        core.handshakeCopies = min(max(hints?.packetCopies ?? 1, 1), HandshakeHints.maxPacketCopies)
        var scid = randomConnectionID(length: localCIDLength)
        var callbacks = ConnectionCore.makeCallbacks(client: false)
        var settings = settings(
            initialRTT: hints?.initialRTT ?? configuration.initialRTT, handshakeTimeout: configuration.handshakeTimeout
        )
        var params = transportParams()
        if let originalDCID {
            // After a Retry the client checks both IDs (RFC 9000 §7.3): the first DCID it used and our Retry's SCID,
            // which it now sends to.
            params.original_dcid = originalDCID
            params.retry_scid = header.dcid
            params.retry_scid_present = 1
            // ngtcp2 copies the token; with it the path counts as validated (no anti-amplification wait).
            settings.token = header.token
        } else {
            params.original_dcid = header.dcid
        }
        params.stateless_reset_token_present = 1
        withUnsafeMutableBytes(of: &params.stateless_reset_token) { raw in
            _ = gnutls_rnd(GNUTLS_RND_RANDOM, raw.baseAddress, raw.count)
        }
        do {
            try core.makeSession(credentials: credentials, alpns: [configuration.alpn] + configuration.additionalALPNs)
        } catch {
            logger.debug("tls session setup failed", metadata: ["error": "\(error)"])
            return nil
        }
        var conn: OpaquePointer?
        let rv = io.withPath(remote: remote) { path in
            ngtcp2_conn_server_new_versioned(
                &conn, &header.scid, &scid, path, header.version,
                NGTCP2_CALLBACKS_VERSION, &callbacks, NGTCP2_SETTINGS_VERSION, &settings,
                NGTCP2_TRANSPORT_PARAMS_VERSION, &params, nil, Unmanaged.passUnretained(core).toOpaque()
            )
        }
        guard rv == 0, let conn else { return nil }
        counters.incomingHandshakesStarted += 1
        core.conn = conn
        ngtcp2_conn_set_tls_native_handle(conn, UnsafeMutableRawPointer(core.session))
        configureKeepAlive(conn)
        for key in [CIDKey(scid), CIDKey(header.dcid)] {
            core.localCIDs.insert(key)
            router.routes[key] = core
        }
        connections[core.key] = core
        return core
    }

    private func configureKeepAlive(_ conn: OpaquePointer) {
        if let interval = configuration.keepAliveInterval {
            ngtcp2_conn_set_keep_alive_timeout(conn, nanoseconds(interval))
        }
    }

    // MARK: Receiving

    private func handleSocketEvents(_ events: UInt32) {
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

    private func drainErrorQueue() {
        var storage = sockaddr_storage()
        while true {
            let found = withUnsafeMutablePointer(to: &storage) { hp_read_icmp_unreachable(fd, $0) }
            if found < 0 { break }
            if found == 1 {
                let address = withUnsafePointer(to: &storage) { pointer in
                    pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
                }
                if let address { unreachableHandler?(address) }
            }
        }
    }

    /// Sorts one datagram: QUIC for a known connection, STUN range, a new client Initial, or junk.
    ///
    /// ngtcp2 0.12 always advertises RFC 9287 ("greasing the QUIC bit"), so a peer built on it may clear the fixed
    /// bit on any packet after the handshake starts, and a greased short header can even start with 0x00–0x03.
    /// So the connection-ID lookup comes first: a datagram whose DCID routes to a live connection is QUIC whatever
    /// its first byte. Only then does the RFC 9443 first-byte rule apply, to everything else.
    private func dispatch(count: Int, from: SocketAddress) {
        guard count > 0 else {
            counters.datagramsDropped += 1
            return
        }
        let packet = UnsafeRawBufferPointer(rebasing: io.receiveBuffer[0..<count])
        let bytes = packet.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let first = packet[0]
        var versionCID = ngtcp2_version_cid()
        let decoded = ngtcp2_pkt_decode_version_cid(&versionCID, bytes, count, localCIDLength) == 0
        if decoded, let dcid = versionCID.dcid,
           let core = router.routes[CIDKey(UnsafeRawBufferPointer(start: dcid, count: versionCID.dcidlen))] {
            read(core, packet: bytes, count: count, from: from)
            return
        }
        if first <= 3 {
            counters.stunDatagrams += 1
            datagramHandler?(Array(packet), from)
            return
        }
        // Unknown DCID: only a client Initial (long header, fixed bit set: a client cannot grease before it has
        // seen our transport parameters) may start a new server connection.
        var header = ngtcp2_pkt_hd()
        guard decoded, first & 0xc0 == 0xc0, !isAcceptDisabled, ngtcp2_accept(&header, bytes, count) == 0 else {
            counters.datagramsDropped += 1
            return
        }
        acceptInitial(&header, packet: bytes, count: count, from: from)
    }

    /// A client Initial for a new connection: validates the source's address (``AddressValidation``), then starts
    /// a server connection, sends a Retry, or drops it.
    private func acceptInitial(_ header: inout ngtcp2_pkt_hd, packet: UnsafePointer<UInt8>, count: Int, from: SocketAddress) {
        let hints = handshakeHintProvider?(from)
        var proof: HandshakeGate.Proof = hints == nil ? .none : .vouched
        var originalDCID: ngtcp2_cid?
        if header.token.len > 0, let base = header.token.base, base[0] == RetryTokenKey.magic {
            guard let original = retryKey.verify(
                UnsafeBufferPointer(start: base, count: header.token.len), version: header.version, remote: from,
                dcid: header.dcid, now: hp_now_ns()
            ) else {
                // RFC 9000 §8.1.3: the client will not take another Retry, so tell it at once rather than let it time out.
                counters.invalidRetryTokens += 1
                sendInvalidTokenClose(header, to: from)
                return
            }
            originalDCID = original
            proof = .retryToken
        }
        switch gate.decide(from: from, proof: proof, connections: connections.count) {
        case .refuse:
            counters.initialsRefused += 1
            counters.datagramsDropped += 1
        case .retry:
            sendRetry(header, to: from)
        case .accept(let validated):
            guard let core = makeServerConnection(header: &header, from: from, hints: hints, originalDCID: originalDCID) else {
                counters.datagramsDropped += 1
                return
            }
            core.hintsAsked = hints != nil
            gate.started(core.key, from: from, validated: validated)
            read(core, packet: packet, count: count, from: from)
        }
    }

    /// Answers an Initial with a Retry carrying a token for its source address; keeps no state.
    private func sendRetry(_ header: ngtcp2_pkt_hd, to remote: SocketAddress) {
        var retrySCID = randomConnectionID(length: localCIDLength)
        var clientSCID = header.scid
        var originalDCID = header.dcid
        guard var token = retryKey.make(
            version: header.version, remote: remote, retrySCID: retrySCID, originalDCID: originalDCID, now: hp_now_ns()
        ) else { return }
        let written = ngtcp2_crypto_write_retry(
            io.sendBuffer.baseAddress!.assumingMemoryBound(to: UInt8.self), io.sendBuffer.count, header.version,
            &clientSCID, &retrySCID, &originalDCID, &token, token.count
        )
        guard written > 0 else { return }
        counters.retriesSent += 1
        sendStateless(count: Int(written), to: remote)
    }

    /// Closes, without any connection state, the handshake of an Initial whose Retry token failed verification.
    private func sendInvalidTokenClose(_ header: ngtcp2_pkt_hd, to remote: SocketAddress) {
        var clientSCID = header.scid
        var dcid = header.dcid
        let written = ngtcp2_crypto_write_connection_close(
            io.sendBuffer.baseAddress!.assumingMemoryBound(to: UInt8.self), io.sendBuffer.count, header.version,
            &clientSCID, &dcid, UInt64(NGTCP2_INVALID_TOKEN), nil, 0
        )
        guard written > 0 else { return }
        sendStateless(count: Int(written), to: remote)
    }

    /// Sends the first `count` bytes of the send buffer to `remote`: a packet that belongs to no connection.
    private func sendStateless(count: Int, to remote: SocketAddress) {
        if fd < 0 {
            deliverInMemory(Array(UnsafeRawBufferPointer(rebasing: io.sendBuffer[0..<count])))
            return
        }
        let sent = remote.withSockAddr { sendto(fd, io.sendBuffer.baseAddress, count, 0, $0, $1) }
        if sent < 0 { counters.sendErrors += 1 } else { counters.datagramsSent += 1 }
    }

    private var isAcceptDisabled: Bool {
        if case .none = router.policy { return true }
        return false
    }

    private func read(_ core: ConnectionCore, packet: UnsafePointer<UInt8>, count: Int, from: SocketAddress) {
        guard let conn = core.conn else { return }
        core.bytesReceived += count
        core.packetsReceived += 1
        // Only datagrams from the handshake's own address may earn it copies: the copies go to `core.remote`, and a
        // packet from a vouched-for address must not buy amplification towards an address someone spoofed.
        if !core.hintsAsked, from == core.remote, gate.isPending(core.key), let hints = handshakeHintProvider?(from) {
            // A probe may prove the path just after the first Initial arrived: later handshake datagrams get copies.
            core.hintsAsked = true
            core.handshakeCopies = min(max(hints.packetCopies, 1), HandshakeHints.maxPacketCopies)
        }
        var info = ngtcp2_pkt_info()
        let rv = io.withPath(remote: from) { path in
            ngtcp2_conn_read_pkt_versioned(conn, path, NGTCP2_PKT_INFO_VERSION, &info, packet, count, hp_now_ns())
        }
        if rv != 0 {
            fail(core, rv: rv)
            return
        }
        if core.announceAccepted {
            core.announceAccepted = false
            gate.ended(core.key)
            counters.connectionsAccepted += 1
            if let peer = core.peerNodeID {
                incomingContinuation.yield(
                    QUICConnection(
                        endpoint: self, key: core.key, peerNodeID: peer, remoteAddress: core.remote, isClient: false,
                        serverName: core.serverName, alpn: core.alpn ?? configuration.alpn
                    )
                )
            }
        }
        touch(core)
    }

    private func touch(_ core: ConnectionCore) {
        if touchedKeys.insert(core.key).inserted { touched.append(core) }
    }

    private func flushTouched() {
        let batch = touched
        touched.removeAll(keepingCapacity: true)
        touchedKeys.removeAll(keepingCapacity: true)
        for core in batch where !core.isClosed {
            wakeWriters(core)
            flush(core)
        }
    }

    // MARK: Sending

    /// Writes every packet ngtcp2 has ready for `core` (stream data, ACKs, retransmissions), then re-arms its timer.
    func flush(_ core: ConnectionCore) {
        guard let conn = core.conn, !isClosed else { return }
        let now = hp_now_ns()
        let pending = core.streams.values.filter { $0.hasUnsent && $0.writeClosedError == nil }.sorted { $0.id < $1.id }
        var index = 0
        var packets = 0
        var vectors = [ngtcp2_vec](repeating: ngtcp2_vec(), count: 16)
        while packets < 128 {
            let stream: StreamState? = index < pending.count ? pending[index] : nil
            var flags = UInt32(NGTCP2_WRITE_STREAM_FLAG_MORE)
            var vectorCount = 0
            var offered: UInt64 = 0
            if let stream {
                (vectorCount, offered) = fillVectors(stream, into: &vectors)
                // The FIN goes in a STREAM frame of its own, after the data: ngtcp2 then reports its
                // acknowledgement distinctly (a zero-length ack), which is how `delivered()` knows the end arrived.
                if stream.finRequested && offered == 0 && stream.sentOffset == stream.queuedEnd {
                    flags |= UInt32(NGTCP2_WRITE_STREAM_FLAG_FIN)
                }
            }
            var consumed: ngtcp2_ssize = -1
            let written = vectors.withUnsafeBufferPointer { vecs in
                ngtcp2_conn_writev_stream_versioned(
                    conn, &core.writePath.pointee.path, NGTCP2_PKT_INFO_VERSION, nil,
                    io.sendBuffer.baseAddress!.assumingMemoryBound(to: UInt8.self), io.sendBuffer.count,
                    &consumed, flags, stream?.id ?? -1, vecs.baseAddress, vectorCount, now
                )
            }
            if let stream, consumed >= 0 {
                stream.sentOffset += UInt64(consumed)
                if flags & UInt32(NGTCP2_WRITE_STREAM_FLAG_FIN) != 0 && UInt64(consumed) == offered {
                    stream.finSent = true
                }
                if !stream.hasUnsent { index += 1 }
            }
            if written < 0 {
                switch Int32(written) {
                case NGTCP2_ERR_WRITE_MORE:
                    continue
                case NGTCP2_ERR_STREAM_DATA_BLOCKED, NGTCP2_ERR_STREAM_SHUT_WR, NGTCP2_ERR_STREAM_NOT_FOUND:
                    index += 1
                    continue
                default:
                    fail(core, rv: Int32(written))
                    return
                }
            }
            if written == 0 { break }
            sendPacket(core, count: Int(written))
            packets += 1
        }
        ngtcp2_conn_update_pkt_tx_time(conn, now)
        if packets >= 128 {
            // More may be ready: come back after other sockets and jobs had a turn.
            let key = core.key
            loop.execute { self.assumeIsolated { $0.flushIfOpen(key) } }
        }
        rearm(core)
    }

    private func flushIfOpen(_ key: UInt64) {
        if let core = connections[key] { flush(core) }
    }

    private func fillVectors(_ stream: StreamState, into vectors: inout [ngtcp2_vec]) -> (Int, UInt64) {
        var count = 0
        var total: UInt64 = 0
        var chunkStart = stream.chunksBaseOffset
        for chunk in stream.chunks {
            let chunkEnd = chunkStart + UInt64(chunk.count)
            defer { chunkStart = chunkEnd }
            guard chunkEnd > stream.sentOffset else { continue }
            let skip = stream.sentOffset > chunkStart ? Int(stream.sentOffset - chunkStart) : 0
            vectors[count] = ngtcp2_vec(
                base: chunk.baseAddress!.advanced(by: skip).assumingMemoryBound(to: UInt8.self),
                len: chunk.count - skip
            )
            total += UInt64(chunk.count - skip)
            count += 1
            if count == vectors.count { break }
        }
        return (count, total)
    }

    private func deliverInMemory(_ datagram: [UInt8]) {
        counters.datagramsSent += 1
        guard let peer = memoryPeer else { return }
        let from = localAddress
        peer.loop.execute { peer.assumeIsolated { $0.receiveInMemory(datagram, from: from) } }
    }

    private func sendPacket(_ core: ConnectionCore, count: Int) {
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
        for _ in 0..<copies {
            let sent = sendto(fd, io.sendBuffer.baseAddress, count, 0, remote.addr, remote.addrlen)
            if sent < 0 {
                counters.sendErrors += 1
            } else {
                counters.datagramsSent += 1
                core.bytesSent += count
                core.packetsSent += 1
            }
        }
    }

    private func sendClose(_ core: ConnectionCore, applicationCode: UInt64?, reason: String, rv: Int32 = 0) {
        guard let conn = core.conn, !isClosed else { return }
        core.closeReason = Array(reason.utf8.prefix(256))
        var ccerr = ngtcp2_connection_close_error()
        core.closeReason.withUnsafeMutableBufferPointer { reasonBytes in
            if let applicationCode {
                ngtcp2_connection_close_error_set_application_error(
                    &ccerr, applicationCode, reasonBytes.baseAddress, reasonBytes.count
                )
            } else if rv == NGTCP2_ERR_CRYPTO {
                ngtcp2_connection_close_error_set_transport_error_tls_alert(
                    &ccerr, ngtcp2_conn_get_tls_alert(conn), reasonBytes.baseAddress, reasonBytes.count
                )
            } else {
                ngtcp2_connection_close_error_set_transport_error_liberr(
                    &ccerr, rv, reasonBytes.baseAddress, reasonBytes.count
                )
            }
            let written = ngtcp2_conn_write_connection_close_versioned(
                conn, &core.writePath.pointee.path, NGTCP2_PKT_INFO_VERSION, nil,
                io.sendBuffer.baseAddress!.assumingMemoryBound(to: UInt8.self), io.sendBuffer.count, &ccerr, hp_now_ns()
            )
            if written > 0 { sendPacket(core, count: Int(written)) }
        }
    }

    // MARK: Timers

    private func rearm(_ core: ConnectionCore) {
        guard let conn = core.conn, !core.isClosed else { return }
        let expiry = ngtcp2_conn_get_expiry(conn)
        if expiry == .max {
            if let timer = core.timerID { loop.cancelTimer(timer) }
            core.timerID = nil
            core.armedDeadline = .max
            return
        }
        // An earlier timer is kept: when it fires, the real expiry is checked and the timer re-armed. This keeps
        // the heap small under bulk traffic, where the expiry moves with every packet.
        if core.timerID != nil && core.armedDeadline <= expiry { return }
        if let timer = core.timerID { loop.cancelTimer(timer) }
        core.armedDeadline = expiry
        let key = core.key
        core.timerID = loop.schedule(at: expiry) { [weak self] in
            self?.assumeIsolated { $0.timerFired(key) }
        }
    }

    private func timerFired(_ key: UInt64) {
        guard let core = connections[key], let conn = core.conn else { return }
        core.timerID = nil
        core.armedDeadline = .max
        let now = hp_now_ns()
        if now >= ngtcp2_conn_get_expiry(conn) {
            let rv = ngtcp2_conn_handle_expiry(conn, now)
            if rv != 0 {
                fail(core, rv: rv)
                return
            }
        }
        flush(core)
    }

    // MARK: Failure and teardown

    /// Ends a connection after ngtcp2 reported `rv`: tells the peer when that is still useful, then cleans up.
    private func fail(_ core: ConnectionCore, rv: Int32) {
        let error: QUICError
        switch rv {
        case NGTCP2_ERR_IDLE_CLOSE:
            error = QUICError(.idleTimeout, "no traffic for \(configuration.idleTimeout.humanDescription)")
        case NGTCP2_ERR_HANDSHAKE_TIMEOUT:
            error = QUICError(.handshakeTimeout, "the handshake with \(core.remote) did not complete in time")
        case NGTCP2_ERR_DRAINING, NGTCP2_ERR_DROP_CONN, NGTCP2_ERR_CLOSING:
            error = core.error(forReadFailure: rv)
        default:
            error = core.error(forReadFailure: rv)
            sendClose(core, applicationCode: nil, reason: error.description, rv: rv)
        }
        finish(core, error)
    }

    /// Abandons a dial whose task was cancelled.
    private func abandon(_ key: UInt64) {
        guard let core = connections[key], case .handshaking = core.phase else { return }
        sendClose(core, applicationCode: 0, reason: "dial cancelled")
        finish(core, QUICError(.cancelled, "the dial to \(core.remote) was cancelled"))
    }

    /// Removes a connection: routes, timer, waiters, native state. Every exit path ends here exactly once.
    private func finish(_ core: ConnectionCore, _ error: QUICError) {
        guard !core.isClosed else { return }
        let wasHandshaking: Bool
        if case .handshaking = core.phase { wasHandshaking = true } else { wasHandshaking = false }
        core.phase = .closed(error)
        gate.ended(core.key)
        if wasHandshaking && error.code != .cancelled && error.code != .endpointClosed {
            counters.handshakeFailures += 1
            failures.append(error)
            if failures.count > 32 { failures.removeFirst() }
            logger.debug("handshake failed", metadata: ["peer.address": "\(core.remote)", "error": "\(error)"])
        }
        for key in core.localCIDs where router.routes[key] === core {
            router.routes[key] = nil
        }
        core.localCIDs.removeAll()
        if let timer = core.timerID { loop.cancelTimer(timer) }
        core.timerID = nil
        core.handshakeWaiter?.resume(throwing: error)
        core.handshakeWaiter = nil
        // Every waiter wakes, re-checks and finds the connection closed (or the data it still may read).
        waiters.wake(core.acceptWaiters)
        for stream in core.streams.values { core.wakeStream(stream) }
        waiters.wake(core.deliveryWaiters)
        waiters.wake(core.closeWaiters)
        connections[core.key] = nil
        let unread = !core.pendingIncomingStreams.isEmpty || core.streams.values.contains {
            $0.receivedStart < $0.received.count || $0.finReceived || $0.resetError != nil
        }
        if unread {
            drainable[core.key] = core
            drainableOrder.append(core.key)
            if drainableOrder.count > 64 { drainable[drainableOrder.removeFirst()] = nil }
        }
        ended[core.key] = EndedConnection(reason: error, undelivered: core.undeliveredStreamIDs)
        endedOrder.append(core.key)
        if endedOrder.count > 4096 {
            ended[endedOrder.removeFirst()] = nil
        }
        core.freeNative()
    }

    private func endedError(_ key: UInt64) -> QUICError {
        ended[key]?.reason ?? QUICError(.closedLocally, "the connection is closed")
    }

    private func wakeWriters(_ core: ConnectionCore) {
        let limit = UInt64(configuration.streamSendBuffer)
        for stream in core.streams.values where !stream.writeWaiters.isEmpty && stream.unacked < limit {
            waiters.wake(stream.writeWaiters)
        }
    }

    // MARK: Operations for connection and stream handles

    private func established(_ key: UInt64) throws -> ConnectionCore {
        guard let core = connections[key] else { throw endedError(key) }
        if case .closed(let error) = core.phase { throw error }
        return core
    }

    /// A connection that still takes new data: established and not closing.
    private func writable(_ key: UInt64) throws -> ConnectionCore {
        let core = try established(key)
        guard !core.isClosing else { throw QUICError(.closedLocally, "the connection is closing") }
        return core
    }

    /// Suspends the caller on `list` until an event wakes it (it then re-checks its condition), or its task is
    /// cancelled (it throws ``QUICError/Code/cancelled`` and leaves nothing behind).
    private func suspend(on list: WaitList) async throws {
        let ticket = waiters.makeTicket()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                // A task cancelled before it got here would never be woken by the handler, which already ran.
                if Task.isCancelled {
                    continuation.resume(throwing: QUICError(.cancelled, "the waiting task was cancelled"))
                } else {
                    waiters.park(ticket, continuation, on: list)
                }
            }
        } onCancel: { [loop] in
            loop.execute { self.assumeIsolated { $0.waiters.cancel(ticket) } }
        }
    }

    func openStream(_ key: UInt64) throws -> Int64 {
        let core = try writable(key)
        var id: Int64 = -1
        let rv = ngtcp2_conn_open_bidi_stream(core.conn, &id, nil)
        guard rv == 0 else {
            throw QUICError(.limitExceeded, "cannot open a stream: \(String(cString: ngtcp2_strerror(rv)))")
        }
        core.streams[id] = StreamState(id: id)
        return id
    }

    func acceptStream(_ key: UInt64) async throws -> Int64? {
        while true {
            guard let core = connections[key] ?? drainable[key] else {
                let error = endedError(key)
                if error.isOrderlyPeerClose { return nil }
                throw error
            }
            if !core.pendingIncomingStreams.isEmpty { return core.pendingIncomingStreams.removeFirst() }
            if case .closed(let error) = core.phase {
                // Only the peer's own orderly close means "no more streams"; anything else is an error to report.
                if error.isOrderlyPeerClose { return nil }
                throw error
            }
            try await suspend(on: core.acceptWaiters)
        }
    }

    func write(_ key: UInt64, stream id: Int64, bytes: [UInt8]) async throws {
        let limit = UInt64(configuration.streamSendBuffer)
        while true {
            let core = try writable(key)
            guard let stream = core.streams[id] else { throw QUICError(.invalidArgument, "stream \(id) is closed") }
            if let error = stream.writeClosedError { throw error }
            guard !stream.finRequested else { throw QUICError(.invalidArgument, "stream \(id) is already finished") }
            guard bytes.count > 0 else { return }
            // Wait for room before queueing, so a write that throws (cancelled, closed) queued nothing.
            if stream.unacked < limit {
                let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 1)
                bytes.withUnsafeBytes { chunk.copyMemory(from: $0) }
                stream.chunks.append(chunk)
                stream.queuedEnd += UInt64(bytes.count)
                flush(core)
                return
            }
            try await suspend(on: stream.writeWaiters)
        }
    }

    func finish(_ key: UInt64, stream id: Int64) throws {
        let core = try established(key)
        guard let stream = core.streams[id] else { throw QUICError(.invalidArgument, "stream \(id) is closed") }
        if let error = stream.writeClosedError { throw error }
        stream.finRequested = true
        flush(core)
    }

    func delivered(_ key: UInt64, stream id: Int64) async throws {
        while true {
            guard let core = connections[key] ?? drainable[key] else {
                if let ended = ended[key], !ended.undelivered.contains(id) { return }
                throw endedError(key)
            }
            guard let stream = core.streams[id] else {
                // Retired: both sides ended; only a failed send side is remembered.
                if let error = core.undeliveredStreams[id] { throw error }
                return
            }
            if stream.isDelivered { return }
            if let error = stream.writeClosedError { throw error }
            if case .closed(let error) = core.phase { throw error }
            try await waitForAcknowledgements(core)
        }
    }

    /// Waits for the next acknowledgement progress on `core`, at most one PTO: a FIN whose acknowledgement ngtcp2
    /// reported without saying so is settled by ``settleFins(_:)`` when a PTO passes with nothing in flight.
    private func waitForAcknowledgements(_ core: ConnectionCore, until deadline: UInt64? = nil) async throws {
        guard let conn = core.conn else { return }
        let key = core.key
        let timer = loop.schedule(at: deadline ?? hp_now_ns() + ngtcp2_conn_get_pto(conn)) { [weak self] in
            self?.assumeIsolated { $0.deliveryTick(key) }
        }
        defer { loop.cancelTimer(timer) }
        try await suspend(on: core.deliveryWaiters)
    }

    private func deliveryTick(_ key: UInt64) {
        guard let core = connections[key] else { return }
        settleFins(core)
        waiters.wake(core.deliveryWaiters)
    }

    /// Marks as acknowledged each FIN that went out before the last of its stream's data was acknowledged, once a
    /// PTO has passed since then with nothing in flight: a lost FIN would have been retransmitted (and be in flight)
    /// within that time, so it was acknowledged inside a retransmission that merged it with data.
    private func settleFins(_ core: ConnectionCore) {
        guard let conn = core.conn else { return }
        let candidates = core.streams.values.filter { $0.unconfirmedFinSince != nil && !$0.finAcked }
        guard !candidates.isEmpty else { return }
        var stat = ngtcp2_conn_stat()
        ngtcp2_conn_get_conn_stat_versioned(conn, NGTCP2_CONN_STAT_VERSION, &stat)
        guard stat.bytes_in_flight == 0 else { return }
        let now = hp_now_ns()
        let pto = ngtcp2_conn_get_pto(conn)
        for stream in candidates where now >= stream.unconfirmedFinSince! + pto {
            stream.finAcked = true
        }
    }

    func read(_ key: UInt64, stream id: Int64, maxBytes: Int) async throws -> [UInt8]? {
        while true {
            guard let core = connections[key] ?? drainable[key] else { throw endedError(key) }
            // A stream leaves the table only after its reader saw the clean end and both sides closed.
            guard let stream = core.streams[id] else { return nil }
            if stream.receivedStart < stream.received.count {
                let end = min(stream.received.count, stream.receivedStart + maxBytes)
                let chunk = Array(stream.received[stream.receivedStart..<end])
                stream.receivedStart = end
                if stream.receivedStart == stream.received.count {
                    stream.received.removeAll(keepingCapacity: true)
                    stream.receivedStart = 0
                } else if stream.receivedStart > 1 << 20 {
                    stream.received.removeFirst(stream.receivedStart)
                    stream.receivedStart = 0
                }
                if let conn = core.conn {
                    // Flow control follows consumption: the peer may send as much again as the app just took.
                    ngtcp2_conn_extend_max_stream_offset(conn, id, UInt64(chunk.count))
                    ngtcp2_conn_extend_max_offset(conn, UInt64(chunk.count))
                    flush(core)
                }
                return chunk
            }
            // ngtcp2 hands data over in order, so a FIN means every byte before it has been returned above.
            if stream.finReceived {
                stream.endReported = true
                core.retireIfDone(stream)
                return nil
            }
            if let error = stream.resetError {
                // Kept: every later read reports the same error rather than a clean end.
                stream.endReported = true
                throw error
            }
            if case .closed(let error) = core.phase { throw error }
            try await suspend(on: stream.readWaiters)
        }
    }

    func reset(_ key: UInt64, stream id: Int64, code: UInt64) {
        guard let core = connections[key], let conn = core.conn, let stream = core.streams[id] else { return }
        _ = ngtcp2_conn_shutdown_stream(conn, id, code)
        var error = QUICError(.streamReset, "stream \(id) was reset locally with code \(code)")
        error.applicationErrorCode = code
        // Writes after a reset must fail even when everything before it was delivered: they would never be sent.
        if stream.writeClosedError == nil { stream.writeClosedError = error }
        if !stream.finReceived && stream.resetError == nil { stream.resetError = error }
        core.wakeStream(stream)
        flush(core)
    }

    /// The graceful close: waits (bounded) until every stream's written data and FIN are acknowledged, then closes.
    func closeConnection(_ key: UInt64, code: UInt64, reason: String, timeout: Duration?) async -> Bool {
        guard let core = connections[key] else { return ended[key]?.undelivered.isEmpty ?? true }
        core.isClosing = true
        let limit = timeout ?? defaultCloseTimeout(core)
        // One deadline for the whole close, and no single wait past it: a PTO can be longer than the bound asked for
        // (and a peer that delays its ACKs inflates it).
        let deadline = hp_now_ns() &+ UInt64(clamping: max(0, limit.components.seconds) * 1_000_000_000
            + max(0, limit.components.attoseconds) / 1_000_000_000)
        while !core.isClosed, !core.everythingSettled, hp_now_ns() < deadline {
            settleFins(core)
            if core.everythingSettled { break }
            let pto = core.conn.map { ngtcp2_conn_get_pto($0) } ?? 0
            // Cancellation ends the wait: the caller wants out, so close at once.
            do { try await waitForAcknowledgements(core, until: min(hp_now_ns() &+ pto, deadline)) } catch { break }
        }
        if !core.isClosed {
            // Acknowledgements of what we just received may still wait out their delay (up to max_ack_delay, 25 ms
            // by default), and CONNECTION_CLOSE carries none: without them the peer, whose own graceful close
            // waits for exactly those acknowledgements, would see our close first and report its data undelivered.
            // The connection's timer sends them when due; wait until then.
            // Only stream data matters: a peer's graceful close waits for nothing else (a connection that carried
            // no stream data, a bare handshake, closes at once).
            let ackDue = core.lastStreamDataAt + ackDelayAllowance
            let now = hp_now_ns()
            if ackDue > now && core.lastStreamDataAt > 0 {
                // Other events wake delivery waiters too: keep waiting until the acknowledgements are due.
                while !core.isClosed, hp_now_ns() < ackDue {
                    do { try await waitForAcknowledgements(core, until: ackDue) } catch { break }
                }
            }
        }
        if core.isClosed { return ended[key]?.undelivered.isEmpty ?? false }
        let delivered = core.undeliveredStreamIDs.isEmpty
        abortConnection(key, code: code, reason: reason)
        return delivered
    }

    /// How long after a packet arrives its acknowledgement may still be pending: ngtcp2's default max_ack_delay
    /// (25 ms) and a margin for the timer.
    private var ackDelayAllowance: UInt64 { 30_000_000 }

    /// The default bound of a graceful close: 16 PTOs (enough for four retransmissions with backoff), at least
    /// one second, at most ``EndpointConfiguration/closeTimeout``.
    private func defaultCloseTimeout(_ core: ConnectionCore) -> Duration {
        let pto = core.conn.map { Duration.nanoseconds(Int64(ngtcp2_conn_get_pto($0))) } ?? .zero
        return min(max(pto * 16, .seconds(1)), configuration.closeTimeout)
    }

    /// The immediate close: CONNECTION_CLOSE now; unacknowledged data is discarded.
    func abortConnection(_ key: UInt64, code: UInt64, reason: String) {
        guard let core = connections[key] else { return }
        sendClose(core, applicationCode: code, reason: reason)
        var error = QUICError(.closedLocally, "closed locally with code \(code)")
        error.applicationErrorCode = code
        finish(core, error)
    }

    func waitClosed(_ key: UInt64) async -> QUICError {
        while true {
            guard let core = connections[key] else { return endedError(key) }
            if case .closed(let error) = core.phase { return error }
            do { try await suspend(on: core.closeWaiters) } catch {
                return error as? QUICError ?? QUICError(.cancelled, "the waiting task was cancelled")
            }
        }
    }

    func connectionStats(_ key: UInt64) -> ConnectionStats? {
        guard let core = connections[key], let conn = core.conn else { return nil }
        var stat = ngtcp2_conn_stat()
        ngtcp2_conn_get_conn_stat_versioned(conn, NGTCP2_CONN_STAT_VERSION, &stat)
        return ConnectionStats(
            smoothedRTT: .nanoseconds(Int64(stat.smoothed_rtt)),
            minRTT: .nanoseconds(Int64(min(stat.min_rtt, UInt64(Int64.max)))),
            latestRTT: .nanoseconds(Int64(stat.latest_rtt)),
            bytesSent: core.bytesSent,
            bytesReceived: core.bytesReceived,
            packetsSent: core.packetsSent,
            packetsReceived: core.packetsReceived,
            probeTimeouts: stat.pto_count,
            congestionWindow: Int(stat.cwnd)
        )
    }

    func isOpen(_ key: UInt64) -> Bool {
        guard let core = connections[key] else { return false }
        return !core.isClosed
    }
}

/// How a connection ended, kept a while for handles that ask afterwards.
struct EndedConnection {
    var reason: QUICError
    /// Streams whose written data or FIN the peer had not acknowledged when the connection ended.
    var undelivered: Set<Int64>
}

/// Converts a duration to ngtcp2's nanosecond ticks.
func nanoseconds(_ duration: Duration) -> UInt64 {
    let (seconds, attoseconds) = duration.components
    return UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000)
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
