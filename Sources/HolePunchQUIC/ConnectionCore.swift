import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchShims
#if canImport(Glibc)
import Glibc
#endif

/// Length of every connection ID this side issues. Fixed, because a short header does not carry the DCID length:
/// the demultiplexer must know it to read the DCID of any packet addressed to us.
let localCIDLength = 16

/// A connection ID as a cheap hashable key (up to 20 bytes, QUIC's maximum).
struct CIDKey: Hashable {
    var a: UInt64 = 0
    var b: UInt64 = 0
    var c: UInt32 = 0
    var length: UInt8 = 0

    init(_ bytes: UnsafeRawBufferPointer) {
        let count = min(bytes.count, 20)
        var words = (UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &words) { raw in
            for i in 0..<count { raw[i] = bytes[i] }
        }
        // Bytes past the ID stay zero, so equal IDs compare equal.
        a = words.0
        b = words.1
        c = words.2
        length = UInt8(count)
    }

    init(_ cid: ngtcp2_cid) {
        var copy = cid
        let count = cid.datalen
        self = withUnsafeBytes(of: &copy.data) { CIDKey(UnsafeRawBufferPointer(rebasing: $0.prefix(count))) }
    }
}

/// The state of one stream, owned by its connection.
final class StreamState {
    let id: Int64
    // Send side. Queued chunks stay allocated until ngtcp2 reports them acknowledged, because ngtcp2
    // does not copy stream data: it retransmits from the application's buffers.
    var chunks: [UnsafeMutableRawBufferPointer] = []
    var chunksBaseOffset: UInt64 = 0  // stream offset of chunks[0]
    var queuedEnd: UInt64 = 0  // stream offset after the last queued byte
    var sentOffset: UInt64 = 0  // bytes handed to ngtcp2
    var ackedOffset: UInt64 = 0
    var finRequested = false
    var finSent = false
    /// The peer acknowledged the FIN.
    var finAcked = false
    /// When the last of the stream's data was acknowledged after its FIN had gone out, while the FIN's own
    /// acknowledgement was not seen: ngtcp2 merges a lost FIN into retransmitted data, and the acknowledgement of
    /// that merged frame does not say it carried the FIN (see `Endpoint.settleFins`). Monotonic ns.
    var unconfirmedFinSince: UInt64?
    let writeWaiters = WaitList()
    var writeClosedError: QUICError?
    // Receive side.
    var received: [UInt8] = []
    var receivedStart = 0
    var finReceived = false
    var resetError: QUICError?
    let readWaiters = WaitList()
    /// The application has been told how the receive side ended (nil returned, or the reset thrown).
    var endReported = false
    /// ngtcp2 closed the stream: both sides ended cleanly, or one was reset.
    var closedByStack = false

    init(id: Int64) { self.id = id }

    var unacked: UInt64 { queuedEnd - ackedOffset }
    var hasUnsent: Bool { sentOffset < queuedEnd || (finRequested && !finSent) }
    /// Everything written was acknowledged, and the FIN too once `finish` asked for it.
    var isDelivered: Bool { ackedOffset >= queuedEnd && (!finRequested || finAcked) }

    func releaseAcked() {
        while let first = chunks.first, chunksBaseOffset + UInt64(first.count) <= ackedOffset {
            chunksBaseOffset += UInt64(first.count)
            first.deallocate()
            chunks.removeFirst()
        }
    }

    func freeAll() {
        for chunk in chunks { chunk.deallocate() }
        chunks.removeAll()
    }

    deinit { freeAll() }
}

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

    init(key: UInt64, isClient: Bool, remote: SocketAddress, expectedNodeID: NodeID?) {
        self.key = key
        self.isClient = isClient
        self.remote = remote
        self.expectedNodeID = expectedNodeID
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

    // MARK: Callbacks, as methods (the C thunks in `makeCallbacks` forward here)

    func onHandshakeCompleted() {
        if let session {
            var selected = gnutls_datum_t()
            if gnutls_alpn_get_selected_protocol(session, &selected) == 0, let bytes = selected.data {
                alpn = String(decoding: UnsafeBufferPointer(start: bytes, count: Int(selected.size)), as: UTF8.self)
            }
        }
        if !isClient {
            phase = .established
            announceAccepted = true
        } else if returnsOnCompletion {
            handshakeWaiter?.resume()
            handshakeWaiter = nil
        }
    }

    func onHandshakeConfirmed() {
        // The client waits for confirmation (HANDSHAKE_DONE), which the server sends only after it has
        // verified *our* certificate: so a dial never reports success to a server that is about to reject it.
        if isClient, case .handshaking = phase {
            phase = .established
            handshakeWaiter?.resume()
            handshakeWaiter = nil
        }
    }

    func onStreamOpen(_ id: Int64) {
        // Only the peer's streams arrive here; ours are created in `openStream`.
        guard streams[id] == nil else { return }
        streams[id] = StreamState(id: id)
        pendingIncomingStreams.append(id)
        wake(acceptWaiters)
    }

    func onStreamData(_ id: Int64, flags: UInt32, data: UnsafeBufferPointer<UInt8>) {
        // Stream data (or a FIN) is what a peer's graceful close waits to see acknowledged.
        lastStreamDataAt = hp_now_ns()
        let stream: StreamState
        if let existing = streams[id] {
            stream = existing
        } else {
            onStreamOpen(id)
            stream = streams[id]!
        }
        stream.received.append(contentsOf: data)
        if flags & NGTCP2_STREAM_DATA_FLAG_FIN != 0 { stream.finReceived = true }
        wake(stream.readWaiters)
    }

    func onAcked(_ id: Int64, offset: UInt64, length: UInt64) {
        guard let stream = streams[id] else { return }
        stream.ackedOffset = max(stream.ackedOffset, offset + length)
        if length == 0 {
            // ngtcp2 reports an acknowledgement without data only for a frame that carried the FIN. The FIN is sent
            // in a frame of its own (see `Endpoint.flush`), so this is how its acknowledgement normally shows.
            stream.finAcked = true
        } else if stream.finSent, !stream.finAcked, stream.ackedOffset >= stream.queuedEnd,
                  stream.unconfirmedFinSince == nil {
            stream.unconfirmedFinSince = hp_now_ns()
        }
        stream.releaseAcked()
        wake(deliveryWaiters)
    }

    func onStreamReset(_ id: Int64, code: UInt64) {
        guard let stream = streams[id] else { return }
        var error = QUICError(.streamReset, "the peer reset stream \(id) with code \(code)")
        error.applicationErrorCode = code
        stream.resetError = error
        wakeStream(stream)
    }

    func onStreamStopSending(_ id: Int64, code: UInt64) {
        guard let stream = streams[id] else { return }
        var error = QUICError(.streamReset, "the peer stopped reading stream \(id) with code \(code)")
        error.applicationErrorCode = code
        stream.writeClosedError = error
        wakeStream(stream)
    }

    func onStreamClose(_ id: Int64, code: UInt64?) {
        guard let stream = streams[id] else { return }
        stream.closedByStack = true
        if code == nil {
            // ngtcp2 closes a stream without an error code only once all its data and FIN were acknowledged.
            stream.finAcked = true
            stream.ackedOffset = max(stream.ackedOffset, stream.queuedEnd)
        } else if stream.writeClosedError == nil {
            var error = QUICError(.streamReset, "stream \(id) was reset; nothing more can be written to it")
            error.applicationErrorCode = code
            stream.writeClosedError = error
        }
        if !stream.finReceived && stream.resetError == nil {
            var error = QUICError(.streamReset, "stream \(id) closed before its end")
            error.applicationErrorCode = code
            stream.resetError = error
        }
        stream.freeAll()
        wakeStream(stream)
        // Keep the state until the reader has seen how the stream ended; it retires the stream then.
        retireIfDone(stream)
    }

    func onNewConnectionID(_ cid: UnsafeMutablePointer<ngtcp2_cid>, token: UnsafeMutablePointer<UInt8>, length: Int) -> Int32 {
        var bytes = [UInt8](repeating: 0, count: length)
        guard gnutls_rnd(GNUTLS_RND_RANDOM, &bytes, length) == 0,
              gnutls_rnd(GNUTLS_RND_RANDOM, token, Int(NGTCP2_STATELESS_RESET_TOKENLEN)) == 0
        else { return NGTCP2_ERR_CALLBACK_FAILURE }
        bytes.withUnsafeBufferPointer { ngtcp2_cid_init(cid, $0.baseAddress, length) }
        let key = CIDKey(cid.pointee)
        localCIDs.insert(key)
        router?.routes[key] = self
        return 0
    }

    func onRemoveConnectionID(_ cid: UnsafePointer<ngtcp2_cid>) {
        let key = CIDKey(cid.pointee)
        localCIDs.remove(key)
        if router?.routes[key] === self { router?.routes[key] = nil }
    }

    /// The callbacks shared by both sides: thin thunks that recover `self` from `user_data` and forward.
    static func makeCallbacks(client: Bool) -> ngtcp2_callbacks {
        var cb = ngtcp2_callbacks()
        if client {
            cb.client_initial = ngtcp2_crypto_client_initial_cb
            cb.recv_retry = ngtcp2_crypto_recv_retry_cb
        } else {
            cb.recv_client_initial = ngtcp2_crypto_recv_client_initial_cb
        }
        cb.recv_crypto_data = ngtcp2_crypto_recv_crypto_data_cb
        cb.encrypt = ngtcp2_crypto_encrypt_cb
        cb.decrypt = ngtcp2_crypto_decrypt_cb
        cb.hp_mask = ngtcp2_crypto_hp_mask_cb
        cb.update_key = ngtcp2_crypto_update_key_cb
        cb.delete_crypto_aead_ctx = ngtcp2_crypto_delete_crypto_aead_ctx_cb
        cb.delete_crypto_cipher_ctx = ngtcp2_crypto_delete_crypto_cipher_ctx_cb
        cb.get_path_challenge_data = ngtcp2_crypto_get_path_challenge_data_cb
        cb.version_negotiation = ngtcp2_crypto_version_negotiation_cb
        cb.rand = { dest, length, _ in
            _ = gnutls_rnd(GNUTLS_RND_RANDOM, dest, length)
        }
        cb.get_new_connection_id = { _, cid, token, length, userData in
            guard let cid, let token, let userData else { return NGTCP2_ERR_CALLBACK_FAILURE }
            return core(userData).onNewConnectionID(cid, token: token, length: length)
        }
        cb.remove_connection_id = { _, cid, userData in
            guard let cid, let userData else { return 0 }
            core(userData).onRemoveConnectionID(cid)
            return 0
        }
        cb.handshake_completed = { _, userData in
            guard let userData else { return 0 }
            core(userData).onHandshakeCompleted()
            return 0
        }
        cb.handshake_confirmed = { _, userData in
            guard let userData else { return 0 }
            core(userData).onHandshakeConfirmed()
            return 0
        }
        cb.stream_open = { _, id, userData in
            guard let userData else { return 0 }
            core(userData).onStreamOpen(id)
            return 0
        }
        cb.recv_stream_data = { _, flags, id, _, data, length, userData, _ in
            guard let userData else { return 0 }
            core(userData).onStreamData(id, flags: flags, data: UnsafeBufferPointer(start: data, count: length))
            return 0
        }
        cb.acked_stream_data_offset = { _, id, offset, length, userData, _ in
            guard let userData else { return 0 }
            core(userData).onAcked(id, offset: offset, length: length)
            return 0
        }
        cb.stream_reset = { _, id, _, code, userData, _ in
            guard let userData else { return 0 }
            core(userData).onStreamReset(id, code: code)
            return 0
        }
        cb.stream_stop_sending = { _, id, code, userData, _ in
            guard let userData else { return 0 }
            core(userData).onStreamStopSending(id, code: code)
            return 0
        }
        cb.stream_close = { _, flags, id, code, userData, _ in
            guard let userData else { return 0 }
            let hasCode = flags & NGTCP2_STREAM_CLOSE_FLAG_APP_ERROR_CODE_SET != 0
            core(userData).onStreamClose(id, code: hasCode ? code : nil)
            return 0
        }
        cb.extend_max_stream_data = { _, _, _, _, _ in 0 }
        return cb
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

@inline(__always)
private func core(_ userData: UnsafeMutableRawPointer) -> ConnectionCore {
    Unmanaged<ConnectionCore>.fromOpaque(userData).takeUnretainedValue()
}

/// The routing table of one endpoint's socket: DCID → connection. Shared with callbacks, which add and retire
/// connection IDs while ngtcp2 runs.
final class ConnectionRouter {
    var routes: [CIDKey: ConnectionCore] = [:]
    var policy: AcceptPolicy

    init(policy: AcceptPolicy) { self.policy = policy }
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
