import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchShims
internal import CHolePunchNetShims
#if canImport(Glibc)
import Glibc
#endif

/// What a connection is doing.
enum ConnectionPhase {
    case handshaking
    case established
    case closed(QUICError)
}

/// One QUIC connection: the single owner of an `ngtcp2_conn`, its GnuTLS session and the memory ngtcp2 points at.
///
/// Confined to its endpoint's event loop; never handed out. Public handles refer to it by ``key``.
final class ConnectionCore {
    let key: UInt64
    let isClient: Bool
    var conn: OpaquePointer?
    var session: OpaquePointer?
    /// The stable conn_ref GnuTLS's session pointer refers to (ngtcp2's GnuTLS glue expects exactly this type).
    let connRef: UnsafeMutablePointer<ngtcp2_crypto_conn_ref>
    /// Path storage for writes: self-referential, so it lives on the heap and is never copied.
    let writePath: UnsafeMutablePointer<ngtcp2_path_storage>
    var remote: SocketAddress
    var phase: ConnectionPhase = .handshaking
    /// Who we expect on the other side (the dialled NodeID); nil on the accepting side.
    let expectedNodeID: NodeID?
    var peerNodeID: NodeID?
    /// The SNI: sent by a client, received by a server.
    var serverName: String?
    /// The application protocol negotiated, once the handshake completed.
    var alpn: String?
    var verifyError: QUICError?
    var streams: [Int64: StreamState] = [:]
    var pendingIncomingStreams: [Int64] = []
    let acceptWaiters = WaitList()
    var handshakeWaiter: CheckedContinuation<Void, any Error>?
    /// A client dial that returns at handshake completion (``ConnectOptions/returnsBeforeConfirmation``); the
    /// phase stays `handshaking` until confirmation, so handshake copies and failure accounting are unchanged.
    var returnsOnCompletion = false
    /// The TLS handshake completed here (we verified the peer). A dial that returns at completion checks it when it
    /// starts waiting: the completion may have been handled before the dial's waiter was in place.
    var isHandshakeCompleted = false
    /// Whether ngtcp2's pacing counts this connection's packets yet: from the flush after the one in which its
    /// handshake completed (see `Endpoint.flush`).
    var isPaced = false
    let closeWaiters = WaitList()
    /// Woken by every acknowledgement, stream end and connection end: `delivered()` and the graceful close wait here.
    let deliveryWaiters = WaitList()
    /// The endpoint's table of suspended callers, so callbacks can wake them.
    var waiters: Waiters?
    /// A graceful close is waiting for acknowledgements: no new streams or data.
    var isClosing = false
    /// Streams retired from ``streams`` whose send side was not fully acknowledged (reset or stopped).
    var undeliveredStreams: [Int64: QUICError] = [:]
    var localCIDs: Set<CIDKey> = []
    var timerID: UInt64?
    var armedDeadline: UInt64 = .max
    var closeReason: [UInt8] = []
    /// The CONNECTION_CLOSE datagram this side sent, kept for the closing state (``ClosingTable``).
    var closeDatagram: [UInt8]?
    weak var router: ConnectionRouter?
    // Statistics.
    /// Times each datagram is sent while the handshake runs (``HandshakeHints/packetCopies``).
    var handshakeCopies = 1
    /// Whether the handshake hint provider answered for this server connection's peer (asked until it does).
    var hintsAsked = false
    /// Datagrams a server still copies after its handshake completed: the first of them carries HANDSHAKE_DONE,
    /// which the client's dial waits for, so losing it would cost the client a whole probe timeout.
    var copiesAfterHandshake = 2
    var bytesSent = 0
    var bytesReceived = 0
    var packetsSent = 0
    var packetsReceived = 0
    /// When stream data or a FIN last arrived (monotonic ns); 0 if never. A graceful close lingers for the
    /// acknowledgements of these only.
    var lastStreamDataAt: UInt64 = 0
    /// Set when a callback asked the endpoint to announce a newly established server connection.
    var announceAccepted = false
    /// The paths to the peer below QUIC, and the active one (``PathTable``).
    var paths: PathTable
    /// The key of this connection's path probes, derived once the handshake completed.
    var pathKey: [UInt8]?
    /// Woken when a path is validated: ``Endpoint/validatePath(_:_:timeout:)`` waits here.
    let pathWaiters = WaitList()
    /// Where changes of the active path go (``QUICConnection/pathChanges()``).
    var pathChangeSink: AsyncStream<PathChange>.Continuation?
    /// Whether the active path still answers, and the re-check of all paths when it does not (``PathLiveness``).
    var liveness = PathLiveness()
    /// The timer that repeats a running re-check's challenges.
    var recheckTimer: UInt64?

    /// `route` is the path the connection starts on; QUIC sees its peer address (``remote``) for good.
    init(key: UInt64, isClient: Bool, route: PathRoute, expectedNodeID: NodeID?) {
        self.key = key
        self.isClient = isClient
        self.remote = route.peer
        self.expectedNodeID = expectedNodeID
        paths = PathTable(stable: route)
        connRef = .allocate(capacity: 1)
        connRef.initialize(to: ngtcp2_crypto_conn_ref())
        writePath = .allocate(capacity: 1)
        ngtcp2_path_storage_zero(writePath)
    }

    deinit {
        freeNative()
        connRef.deallocate()
        writePath.deallocate()
    }

    /// Frees the ngtcp2 connection and the TLS session; idempotent.
    func freeNative() {
        if let conn {
            ngtcp2_conn_del(conn)
            self.conn = nil
        }
        if let session {
            gnutls_deinit(session)
            self.session = nil
        }
        for stream in streams.values { stream.freeAll() }
    }

    var isClosed: Bool {
        if case .closed = phase { return true }
        return false
    }

    /// Streams whose written data (or FIN) the peer has not acknowledged, including retired ones.
    var undeliveredStreamIDs: Set<Int64> {
        Set(streams.values.filter { !$0.isDelivered }.map(\.id)).union(undeliveredStreams.keys)
    }

    /// Nothing left for a graceful close to wait for: every stream is delivered or can no longer be.
    var everythingSettled: Bool {
        streams.values.allSatisfy { $0.isDelivered || $0.writeClosedError != nil }
    }

    func wake(_ list: WaitList) { waiters?.wake(list) }

    /// Wakes everyone who waits on something `stream` may have changed.
    func wakeStream(_ stream: StreamState) {
        wake(stream.readWaiters)
        wake(stream.writeWaiters)
        wake(deliveryWaiters)
    }

    /// Drops a stream's state once its reader saw the end and ngtcp2 closed it: nothing can change any more.
    func retireIfDone(_ stream: StreamState) {
        // A reset stream stays, so every later read reports the reset again (the peer's stream limit bounds them).
        guard stream.endReported, stream.finReceived, stream.closedByStack else { return }
        if !stream.isDelivered {
            undeliveredStreams[stream.id] = stream.writeClosedError
                ?? QUICError(.streamReset, "stream \(stream.id) closed before the peer acknowledged everything written")
        }
        streams[stream.id] = nil
    }

    // MARK: Setup

    /// Creates the GnuTLS session: the shared priorities (`TLSSessionSetup`), mandatory ALPN, mutual auth.
    /// A client offers one protocol; a server accepts any of `alpns` (mandatory: a client offering none of them
    /// fails the handshake).
    func makeSession(credentials: TLSCredentials, alpns: [String]) throws {
        var session: gnutls_session_t?
        let flags: UInt32 = isClient
            ? TLSSessionSetup.clientFlags
            : UInt32(GNUTLS_SERVER) | GNUTLS_NO_AUTO_SEND_TICKET.rawValue
        try check(gnutls_init(&session, flags), .tls, "gnutls_init")
        self.session = session
        let configured = isClient
            ? ngtcp2_crypto_gnutls_configure_client_session(session)
            : ngtcp2_crypto_gnutls_configure_server_session(session)
        guard configured == 0 else { throw QUICError(.tls, "configuring the QUIC TLS session failed") }
        try TLSSessionSetup.applyPriority(to: session)
        connRef.pointee.get_conn = { ref in
            guard let ref, let userData = ref.pointee.user_data else { return nil }
            return Unmanaged<ConnectionCore>.fromOpaque(userData).takeUnretainedValue().conn
        }
        connRef.pointee.user_data = Unmanaged.passUnretained(self).toOpaque()
        gnutls_session_set_ptr(session, connRef)
        try check(
            gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(credentials.handle)),
            .tls, "attaching credentials"
        )
        // GnuTLS copies the protocol names, so the buffers need only outlive the call.
        var names = alpns.map { Array($0.utf8) }
        var data: [gnutls_datum_t] = []
        for index in names.indices {
            names[index].withUnsafeMutableBufferPointer { buffer in
                data.append(gnutls_datum_t(data: buffer.baseAddress, size: UInt32(buffer.count)))
            }
        }
        try withExtendedLifetime(names) {
            try check(
                gnutls_alpn_set_protocols(session, &data, UInt32(data.count), UInt32(GNUTLS_ALPN_MANDATORY.rawValue)),
                .tls, "setting ALPN"
            )
        }
        if !isClient {
            gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE)
        } else if let serverName {
            let name = Array(serverName.utf8)
            try check(gnutls_server_name_set(session, GNUTLS_NAME_DNS, name, name.count), .invalidArgument, "setting the server name")
        }
    }

    /// The SNI the client sent, read on the server during the handshake.
    private func receivedServerName() -> String? {
        guard let session else { return nil }
        var buffer = [UInt8](repeating: 0, count: 256)
        var length = buffer.count
        var type: UInt32 = 0
        guard gnutls_server_name_get(session, &buffer, &length, &type, 0) == 0 else { return nil }
        return String(decoding: buffer.prefix(min(length, buffer.count)).prefix { $0 != 0 }, as: UTF8.self)
    }

    // MARK: Peer verification (called by GnuTLS during the handshake)

    /// Checks the peer's certificate against the expected NodeID or the accept policy. Returns false to abort.
    func verifyPeer(policy: AcceptPolicy) -> Bool {
        guard let session else { return false }
        // QUIC requires ALPN (RFC 9001 section 8.1) and `QUICConnection.alpn` must name a protocol both sides
        // agreed on. GnuTLS's mandatory flag refuses a mismatch, but not a peer that sends no ALPN at all; both
        // sides have sent theirs by the time the peer's certificate is verified.
        var selected = gnutls_datum_t()
        guard gnutls_alpn_get_selected_protocol(session, &selected) == 0, let name = selected.data, selected.size > 0 else {
            verifyError = QUICError(.handshakeFailed, "the peer agreed on no application protocol (ALPN)")
            return false
        }
        alpn = String(decoding: UnsafeBufferPointer(start: name, count: Int(selected.size)), as: UTF8.self)
        var count: UInt32 = 0
        guard let certs = gnutls_certificate_get_peers(session, &count), count > 0 else {
            verifyError = .peerAuthentication(expected: expectedNodeID, received: nil, "the peer presented no certificate")
            return false
        }
        let received: NodeID
        do {
            received = try Identity.nodeID(
                ofDER: UnsafeBufferPointer(start: certs[0].data, count: Int(certs[0].size))
            )
        } catch {
            verifyError = .peerAuthentication(expected: expectedNodeID, received: nil, "the peer certificate is unreadable")
            return false
        }
        if let expectedNodeID {
            guard received == expectedNodeID else {
                verifyError = .peerAuthentication(
                    expected: expectedNodeID, received: received, "the peer's NodeID is not the one dialled"
                )
                return false
            }
        } else {
            let allowed: Bool
            switch policy {
            case .any: allowed = true
            case .none: allowed = false
            case .allow(let set): allowed = set.contains(received)
            case .decide(let decide):
                serverName = receivedServerName()
                allowed = decide(IncomingHandshake(nodeID: received, address: remote, serverName: serverName))
            }
            guard allowed else {
                var error = QUICError.peerAuthentication(
                    expected: nil, received: received, "the accept policy rejected this NodeID"
                )
                if case .allow(let set) = policy, set.count == 1 { error.expectedNodeID = set.first }
                verifyError = error
                return false
            }
        }
        peerNodeID = received
        return true
    }

    // MARK: Errors

    /// The error to report when ngtcp2 fails a read with `rv`, preferring what the verify callback recorded.
    func error(forReadFailure rv: Int32) -> QUICError {
        if let verifyError { return verifyError }
        if rv == NGTCP2_ERR_DRAINING, let conn {
            return peerCloseError(conn)
        }
        if rv == NGTCP2_ERR_CRYPTO, let conn {
            let alert = ngtcp2_conn_get_tls_alert(conn)
            if !isClient && peerNodeID == nil && (alert == 116 || alert == 42 || alert == 0) {
                return .peerAuthentication(expected: nil, received: nil, "the peer presented no acceptable certificate (TLS alert \(alert))")
            }
            return QUICError(.handshakeFailed, "TLS failed with alert \(alert)")
        }
        if case .handshaking = phase {
            return QUICError(.handshakeFailed, "ngtcp2: \(String(cString: ngtcp2_strerror(rv)))")
        }
        return QUICError(.protocolViolation, "ngtcp2: \(String(cString: ngtcp2_strerror(rv)))")
    }

    private func peerCloseError(_ conn: OpaquePointer) -> QUICError {
        var ccerr = ngtcp2_connection_close_error()
        ngtcp2_conn_get_connection_close_error(conn, &ccerr)
        let reason = ccerr.reason.map { String(decoding: UnsafeBufferPointer(start: $0, count: ccerr.reasonlen), as: UTF8.self) } ?? ""
        let suffix = reason.isEmpty ? "" : ": \(reason)"
        if ccerr.type == NGTCP2_CONNECTION_CLOSE_ERROR_CODE_TYPE_APPLICATION {
            var error = QUICError(.connectionClosed, "the peer closed the connection with code \(ccerr.error_code)\(suffix)")
            error.applicationErrorCode = ccerr.error_code
            return error
        }
        if case .handshaking = phase {
            let code = ccerr.error_code
            if code & 0xff00 == UInt64(NGTCP2_CRYPTO_ERROR) {
                return QUICError(.handshakeFailed, "the peer rejected the handshake with TLS alert \(code & 0xff)\(suffix)")
            }
            return QUICError(.handshakeFailed, "the peer closed during the handshake with code \(code)\(suffix)")
        }
        var error = QUICError(.connectionClosed, "the peer closed the connection with transport code \(ccerr.error_code)\(suffix)")
        error.applicationErrorCode = nil
        return error
    }
}

/// GnuTLS certificate credentials built from an ``Identity``: the only owner of the handle, freed in deinit.
final class TLSCredentials {
    let handle: OpaquePointer

    init(identity: Identity, presentCertificate: Bool) throws {
        var cred: gnutls_certificate_credentials_t?
        try check(gnutls_certificate_allocate_credentials(&cred), .tls, "allocating credentials")
        guard let cred else { throw QUICError(.tls, "allocating credentials returned nothing") }
        handle = cred
        if presentCertificate {
            var cert = Array(identity.certificatePEM.utf8)
            var key = Array(identity.privateKeyPEM.utf8)
            let rc = cert.withUnsafeMutableBufferPointer { certBuffer in
                key.withUnsafeMutableBufferPointer { keyBuffer in
                    var certDatum = gnutls_datum_t(data: certBuffer.baseAddress, size: UInt32(certBuffer.count))
                    var keyDatum = gnutls_datum_t(data: keyBuffer.baseAddress, size: UInt32(keyBuffer.count))
                    return gnutls_certificate_set_x509_key_mem2(cred, &certDatum, &keyDatum, GNUTLS_X509_FMT_PEM, nil, 0)
                }
            }
            if rc < 0 {
                gnutls_certificate_free_credentials(cred)
                throw QUICError(.tls, "loading the identity into TLS: \(String(cString: gnutls_strerror(rc)))")
            }
        }
        // Self-signed certificates have no chain to check: trust comes only from the pinned NodeID, which the
        // verify function compares during the handshake.
        gnutls_certificate_set_verify_function(cred) { session in
            guard let session, let pointer = gnutls_session_get_ptr(session) else { return -1 }
            let ref = pointer.assumingMemoryBound(to: ngtcp2_crypto_conn_ref.self)
            guard let userData = ref.pointee.user_data else { return -1 }
            let connection = Unmanaged<ConnectionCore>.fromOpaque(userData).takeUnretainedValue()
            guard let policy = connection.router?.policy else { return -1 }
            guard connection.verifyPeer(policy: policy) else {
                // Without a protocol the peer is told so (alert no_application_protocol), not "bad certificate".
                return connection.alpn == nil ? GNUTLS_E_NO_APPLICATION_PROTOCOL : -1
            }
            return 0
        }
    }

    deinit {
        gnutls_certificate_free_credentials(handle)
    }
}

extension QUICError {
    /// The peer closed the connection with application code 0: an orderly end, after which no more streams come.
    var isOrderlyPeerClose: Bool { code == .connectionClosed && applicationErrorCode == 0 }
}
