import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchNetShims
#if canImport(Glibc)
import Glibc
#endif

// Connection setup: ngtcp2 settings, transport parameters, and the client and server connections built from them.
extension Endpoint {
    // MARK: Connection setup

    func allocateKey() -> UInt64 {
        defer { nextKey += 1 }
        return nextKey
    }

    func settings(initialRTT: Duration, handshakeTimeout: Duration) -> ngtcp2_settings {
        var settings = ngtcp2_settings()
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION, &settings)
        settings.initial_ts = hp_now_ns()
        settings.initial_rtt = nanoseconds(initialRTT)
        settings.handshake_timeout = nanoseconds(handshakeTimeout)
        settings.max_window = UInt64(configuration.connectionReceiveWindow) * 2
        settings.max_stream_window = UInt64(configuration.streamReceiveWindow) * 2
        return settings
    }

    func transportParams() -> ngtcp2_transport_params {
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

    func makeClientConnection(
        to route: PathRoute, expecting peer: NodeID, options: ConnectOptions
    ) throws -> ConnectionCore {
        let core = ConnectionCore(key: allocateKey(), isClient: true, route: route, expectedNodeID: peer)
        let remote = route.peer
        core.router = router
        core.waiters = waiters
        core.serverName = options.serverName
        core.handshakeCopies = min(max(options.handshakePacketCopies, 1), HandshakeHints.maxPacketCopies)
        core.returnsOnCompletion = options.returnsBeforeConfirmation
        var settings = settings(
            initialRTT: options.initialRTT ?? configuration.initialRTT,
            handshakeTimeout: options.handshakeTimeout ?? configuration.handshakeTimeout
        )
        var params = transportParams()
        try core.makeSession(credentials: credentials, alpns: [options.alpn ?? configuration.alpn])
        let opened = io.withPath(remote: remote) { path in
            Result { try Self.openClientConnection(core, path: path, settings: &settings, params: &params) }
        }
        let (conn, scid) = try opened.get()
        configureKeepAlive(conn)
        let key = CIDKey(scid)
        core.localCIDs.insert(key)
        router.routes[key] = core
        connections[core.key] = core
        return core
    }

    /// Creates `core`'s client `ngtcp2_conn` on `path` with fresh connection IDs and hands it `core`'s TLS session
    /// (made beforehand). Shared with ``InitialForge``, whose Initials must be built the way a real dial builds them.
    ///
    /// - Returns: the connection and the source connection ID it uses.
    /// - Throws: ``QUICError`` (`invalidArgument`) when ngtcp2 refuses the connection.
    static func openClientConnection(
        _ core: ConnectionCore, path: UnsafePointer<ngtcp2_path>,
        settings: inout ngtcp2_settings, params: inout ngtcp2_transport_params
    ) throws -> (conn: OpaquePointer, scid: ngtcp2_cid) {
        var dcid = randomConnectionID(length: 18)
        var scid = randomConnectionID(length: localCIDLength)
        var callbacks = ConnectionCore.makeCallbacks(client: true)
        var conn: OpaquePointer?
        let rv = ngtcp2_conn_client_new_versioned(
            &conn, &dcid, &scid, path, NGTCP2_PROTO_VER_V1,
            NGTCP2_CALLBACKS_VERSION, &callbacks, NGTCP2_SETTINGS_VERSION, &settings,
            NGTCP2_TRANSPORT_PARAMS_VERSION, &params, nil, Unmanaged.passUnretained(core).toOpaque()
        )
        guard rv == 0, let conn else {
            throw QUICError(.invalidArgument, "ngtcp2_conn_client_new: \(String(cString: ngtcp2_strerror(rv)))")
        }
        core.conn = conn
        ngtcp2_conn_set_tls_native_handle(conn, UnsafeMutableRawPointer(core.session))
        return (conn, scid)
    }

    /// A server connection for a client Initial. `originalDCID` is set when the Initial carried a valid Retry
    /// token: the DCID of the client's first Initial, which the transport parameters must name.
    func makeServerConnection(
        header: inout ngtcp2_pkt_hd, from route: PathRoute, hints: HandshakeHints?, originalDCID: ngtcp2_cid?
    ) -> ConnectionCore? {
        let core = ConnectionCore(key: allocateKey(), isClient: false, route: route, expectedNodeID: nil)
        let remote = route.peer
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

    func configureKeepAlive(_ conn: OpaquePointer) {
        if let interval = configuration.keepAliveInterval {
            ngtcp2_conn_set_keep_alive_timeout(conn, nanoseconds(interval))
        }
    }

}
