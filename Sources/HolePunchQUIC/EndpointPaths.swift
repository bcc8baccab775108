import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchNetShims
#if canImport(Glibc)
import Glibc
#endif

// The path layer's endpoint side: adding, validating and switching a connection's paths, path probes in and out,
// and the mapping between QUIC's stable peer address and the active path (see ``PathTable``).
extension Endpoint {
    func addPath(_ key: UInt64, _ route: PathRoute) throws {
        let core = try established(key)
        try checkFamily(route)
        guard core.paths.add(route) else {
            throw QUICError(.limitExceeded, "a connection keeps at most \(PathTable.maxPaths) paths")
        }
    }

    /// Challenges the peer on `route` until it answers or `timeout` passes; resends every PTO (at least 20 ms).
    func validatePath(_ key: UInt64, _ route: PathRoute, timeout: Duration) async throws {
        let deadline = hp_now_ns() &+ nanoseconds(timeout)
        while true {
            let core = try established(key)
            guard let entry = core.paths.entries[route] else {
                throw QUICError(.invalidArgument, "the connection has no path \(route): add it first")
            }
            if entry.isValidated { return }
            let now = hp_now_ns()
            guard now < deadline else {
                throw QUICError(.pathValidationFailed, "the peer did not answer on \(route) within \(timeout.humanDescription)")
            }
            sendChallenge(core, on: route, now: now)
            let pto = core.conn.map { ngtcp2_conn_get_pto($0) } ?? 0
            let wakeAt = min(now &+ max(pto, 20_000_000), deadline)
            let timer = loop.schedule(at: wakeAt) { [weak self] in
                self?.assumeIsolated { $0.wakePathWaiters(key) }
            }
            defer { loop.cancelTimer(timer) }
            try await suspend(on: core.pathWaiters)
        }
    }

    private func wakePathWaiters(_ key: UInt64) {
        if let core = connections[key] { waiters.wake(core.pathWaiters) }
    }

    /// Makes `route` the active path; it must be validated.
    func switchPath(_ key: UInt64, to route: PathRoute) throws {
        let core = try established(key)
        guard core.paths.entries[route]?.isValidated == true else {
            throw QUICError(.invalidArgument, "the path \(route) is not validated")
        }
        if let change = core.paths.activate(route) {
            moved(core, change)
            // Tell the peer, which follows once it has validated the path too (a path validated long ago, the
            // one we started on say, gets no new challenge from validation).
            sendChallenge(core, on: route, now: hp_now_ns(), kind: .announcement)
        }
        flush(core)
    }

    func pathStatuses(_ key: UInt64) -> [PathStatus] {
        (connections[key] ?? drainable[key])?.paths.statuses ?? []
    }

    func pathChanges(_ key: UInt64) -> AsyncStream<PathChange> {
        let (stream, continuation) = AsyncStream.makeStream(of: PathChange.self, bufferingPolicy: .bufferingNewest(16))
        guard let core = connections[key], !core.isClosed else {
            continuation.finish()
            return stream
        }
        core.pathChangeSink?.finish()
        core.pathChangeSink = continuation
        return stream
    }

    private func checkFamily(_ route: PathRoute) throws {
        // A relayed path's peer may be of either family: only the server is reached from our socket.
        guard reachableFamilies.contains(route.address.family) else {
            throw QUICError(.invalidArgument, "cannot reach \(route) from a socket bound to \(localAddress)")
        }
    }

    // MARK: Probes

    /// The probe key of a connection whose handshake completed here (a TLS exporter secret), derived on first use.
    /// Completion, not confirmation: a dial that returns at completion (a relay-first punch) moves to a direct path
    /// at once; waiting for the confirmation cost a PTO of validation resends (~350 ms at an 81 ms RTT in the lab).
    private func probeKey(_ core: ConnectionCore) -> [UInt8]? {
        if let key = core.pathKey { return key }
        guard core.isHandshakeCompleted, let session = core.session else { return nil }
        if case .closed = core.phase { return nil }
        core.pathKey = PathProbe.key(session: session)
        return core.pathKey
    }

    /// The connection ID the peer routes by: the current destination connection ID of our packets.
    private func peerConnectionID(_ core: ConnectionCore) -> [UInt8]? {
        guard let conn = core.conn, let dcid = ngtcp2_conn_get_dcid(conn) else { return nil }
        var copy = dcid.pointee
        return withUnsafeBytes(of: &copy.data) { Array($0.prefix(copy.datalen)) }
    }

    func sendChallenge(_ core: ConnectionCore, on route: PathRoute, now: UInt64, kind: PathProbe.Kind = .challenge) {
        var challenge: UInt64 = 0
        _ = gnutls_rnd(GNUTLS_RND_NONCE, &challenge, MemoryLayout<UInt64>.size)
        guard sendProbe(core, kind, challenge: challenge, on: route) else { return }
        core.paths.challengeSent(on: route, challenge: challenge, now: now)
    }

    @discardableResult
    private func sendProbe(_ core: ConnectionCore, _ kind: PathProbe.Kind, challenge: UInt64, on route: PathRoute) -> Bool {
        guard let key = probeKey(core), let cid = peerConnectionID(core) else { return false }
        let probe = PathProbe(kind: kind, connectionID: cid, challenge: challenge).encoded(key: key)
        sendDatagram(probe, on: route)
        return true
    }

    /// A datagram with the path-probe marker: a challenge is answered on the path it came by, a response may
    /// validate a path. Anything unauthenticated is dropped and counted.
    func receivePathProbe(_ packet: UnsafeRawBufferPointer, on route: PathRoute) {
        guard let probe = PathProbe.parse(packet),
              let core = probe.connectionID.withUnsafeBytes({ router.routes[CIDKey($0)] }),
              !core.isClosed, let key = probeKey(core), PathProbe.verify(packet, key: key)
        else {
            counters.datagramsDropped += 1
            return
        }
        counters.pathProbesReceived += 1
        let now = hp_now_ns()
        switch probe.kind {
        case .challenge, .announcement:
            let (answer, challengeBack) = core.paths.challengeReceived(
                on: route, challenge: probe.challenge, now: now, announced: probe.kind == .announcement
            )
            guard answer else { return }
            sendProbe(core, .response, challenge: probe.challenge, on: route)
            // The peer is moving here: validate the path for our own sends, so we can follow.
            if challengeBack { sendChallenge(core, on: route, now: now) }
            if probe.kind == .announcement, let change = core.paths.followAnnounced(route) {
                moved(core, change)
                flush(core)
            }
        case .response:
            guard let newlyValidated = core.paths.responseReceived(on: route, challenge: probe.challenge) else { return }
            if core.liveness.isRechecking {
                recheckAnswered(core, on: route)
            } else if newlyValidated, let change = core.paths.followAnnounced(route) {
                // The peer announced its move here, or its packets came from here (its NAT rebound): follow.
                moved(core, change)
                flush(core)
            }
            waiters.wake(core.pathWaiters)
        }
    }

    // MARK: QUIC's view

    /// The address QUIC is told a datagram that arrived on `route` came from. Once the handshake completed, always
    /// the stable path's peer address, so QUIC never sees a path change (its decryption still decides whether the
    /// packet is the peer's); the path layer, not ngtcp2's migration, then follows the peer to a new address, on
    /// either side of the connection (ngtcp2 0.12 lets only a server follow, and a client drops packets from an
    /// address it did not dial). Before, the source itself. nil (drop it) for a relayed route the connection does
    /// not know: a relay forwards from any peer that has a permission, and QUIC could not answer there.
    func quicSource(_ core: ConnectionCore, on route: PathRoute) -> SocketAddress? {
        if route.isRelayed, route != core.paths.stable, core.paths.entries[route] == nil { return nil }
        if core.isHandshakeCompleted || route == core.paths.stable { return core.paths.stable.peer }
        return route.peer
    }

    /// After a QUIC packet that arrived on `route` was read: when ngtcp2 decrypted it, note that the active path
    /// works, follow the peer to a path it moved to, or challenge a path it uses that this side has not validated
    /// yet (a new address is a NAT rebinding: ``PathTable/packetReceived(on:now:)``).
    func notePacket(_ core: ConnectionCore, on route: PathRoute) {
        guard PacketDecryption.happened, core.isHandshakeCompleted else { return }
        let now = hp_now_ns()
        switch core.paths.packetReceived(on: route, now: now) {
        case .none: break
        case .heardOnActive: heardOnActive(core)
        case .followed(let change): moved(core, change)
        case .challenge: sendChallenge(core, on: route, now: now)
        }
    }
}

/// Whether ngtcp2 decrypted a packet during the read in progress on this thread (`Endpoint.read` resets it
/// first). ngtcp2 0.12 returns 0 from `ngtcp2_conn_read_pkt` for a packet it discards too (one that fails
/// decryption), and only an authenticated packet may move a connection to a path. Thread-local, because the decrypt
/// callback gets no user data; a loop reads one datagram at a time.
enum PacketDecryption {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        return key
    }()

    static func reset() { pthread_setspecific(key, nil) }

    static var happened: Bool { pthread_getspecific(key) != nil }

    /// ngtcp2's decrypt callback, noting each success.
    static let callback: ngtcp2_decrypt = { dest, aead, context, ciphertext, length, nonce, nonceLength, aad, aadLength in
        let rv = ngtcp2_crypto_decrypt_cb(dest, aead, context, ciphertext, length, nonce, nonceLength, aad, aadLength)
        if rv == 0 { pthread_setspecific(PacketDecryption.key, UnsafeRawPointer(bitPattern: 1)) }
        return rv
    }
}
