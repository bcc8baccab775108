import HolePunchNet
internal import CNgtcp2
internal import CHolePunchNetShims

// Demultiplexing: first-byte classification, connection-ID routing, and the Initial accept / Retry / handshake gate.
extension Endpoint {
    /// Sorts one datagram that arrived on `route` (for a relayed route: the payload the relay forwarded).
    func dispatch(_ packet: UnsafeRawBufferPointer, on route: PathRoute) {
        let count = packet.count
        guard count > 0 else {
            counters.datagramsDropped += 1
            return
        }
        let bytes = packet.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let first = packet[0]
        var versionCID = ngtcp2_version_cid()
        let decoded = ngtcp2_pkt_decode_version_cid(&versionCID, bytes, count, localCIDLength) == 0
        if decoded, let dcid = versionCID.dcid {
            let key = CIDKey(UnsafeRawBufferPointer(start: dcid, count: versionCID.dcidlen))
            if let core = router.routes[key] {
                read(core, packet: bytes, count: count, on: route)
                return
            }
            if let close = closing.answer(to: key, on: route, size: count, now: hp_now_ns()) {
                // A packet for a connection we closed: its peer missed the close (RFC 9000 §10.2.1).
                counters.closesRepeated += 1
                close.withUnsafeBytes { _ = send($0, on: route) }
                return
            }
        }
        if first <= 3 {
            // The owner reads these as arriving from an address: a peer's STUN or punch probe forwarded by a relay
            // would pass for a direct one, so only direct ones are handed on.
            guard case .direct(let from) = route else {
                counters.datagramsDropped += 1
                return
            }
            counters.stunDatagrams += 1
            deliverNonQUIC(.datagram(Array(packet), from: from))
            return
        }
        if first == PathProbe.marker {
            receivePathProbe(packet, on: route)
            return
        }
        // Unknown DCID: only a client Initial (long header, fixed bit set: a client cannot grease before it has
        // seen our transport parameters) may start a new server connection.
        var header = ngtcp2_pkt_hd()
        guard decoded, first & 0xc0 == 0xc0, !isAcceptDisabled, ngtcp2_accept(&header, bytes, count) == 0 else {
            counters.datagramsDropped += 1
            return
        }
        acceptInitial(&header, packet: bytes, count: count, on: route)
    }

    /// A client Initial for a new connection: validates the source's address (``AddressValidation``), then starts
    /// a server connection, sends a Retry, or drops it. On a relayed route the source is the peer's address as the
    /// relay saw it, and no handshake hints are asked: they vouch for a direct address.
    func acceptInitial(_ header: inout ngtcp2_pkt_hd, packet: UnsafePointer<UInt8>, count: Int, on route: PathRoute) {
        let from = route.peer
        let hints = route.isRelayed ? nil : handshakeHintProvider?(from)
        var proof: HandshakeGate.Proof = hints == nil ? .none : .vouched
        var originalDCID: ngtcp2_cid?
        if header.token.len > 0, let base = header.token.base, base[0] == RetryTokenKey.magic {
            guard let original = retryKey.verify(
                UnsafeBufferPointer(start: base, count: header.token.len), version: header.version, remote: from,
                dcid: header.dcid, now: hp_now_ns()
            ) else {
                // RFC 9000 §8.1.3: the client will not take another Retry, so tell it at once rather than let it time out.
                counters.invalidRetryTokens += 1
                sendInvalidTokenClose(header, to: route)
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
            sendRetry(header, to: route)
        case .accept(let validated):
            guard let core = makeServerConnection(header: &header, from: route, hints: hints, originalDCID: originalDCID) else {
                counters.datagramsDropped += 1
                return
            }
            core.hintsAsked = hints != nil
            gate.started(core.key, from: from, validated: validated)
            read(core, packet: packet, count: count, on: route)
        }
    }

    /// Answers an Initial with a Retry carrying a token for its source address; keeps no state.
    func sendRetry(_ header: ngtcp2_pkt_hd, to route: PathRoute) {
        let remote = route.peer
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
        sendStateless(count: Int(written), to: route)
    }

    /// Closes, without any connection state, the handshake of an Initial whose Retry token failed verification.
    func sendInvalidTokenClose(_ header: ngtcp2_pkt_hd, to route: PathRoute) {
        var clientSCID = header.scid
        var dcid = header.dcid
        let written = ngtcp2_crypto_write_connection_close(
            io.sendBuffer.baseAddress!.assumingMemoryBound(to: UInt8.self), io.sendBuffer.count, header.version,
            &clientSCID, &dcid, UInt64(NGTCP2_INVALID_TOKEN), nil, 0
        )
        guard written > 0 else { return }
        sendStateless(count: Int(written), to: route)
    }

    var isAcceptDisabled: Bool {
        if case .none = router.policy { return true }
        return false
    }

    func read(_ core: ConnectionCore, packet: UnsafePointer<UInt8>, count: Int, on route: PathRoute) {
        guard let conn = core.conn else { return }
        guard let source = quicSource(core, on: route) else {
            counters.datagramsDropped += 1
            return
        }
        core.bytesReceived += count
        core.packetsReceived += 1
        // Only datagrams from the handshake's own address may earn it copies: the copies go to `core.remote`, and a
        // packet from a vouched-for address must not buy amplification towards an address someone spoofed.
        if !core.hintsAsked, route == .direct(core.remote), gate.isPending(core.key),
           let hints = handshakeHintProvider?(core.remote) {
            // A probe may prove the path just after the first Initial arrived: later handshake datagrams get copies.
            core.hintsAsked = true
            core.handshakeCopies = min(max(hints.packetCopies, 1), HandshakeHints.maxPacketCopies)
        }
        var info = ngtcp2_pkt_info()
        PacketDecryption.reset()
        let rv = io.withPath(remote: source) { path in
            ngtcp2_conn_read_pkt_versioned(conn, path, NGTCP2_PKT_INFO_VERSION, &info, packet, count, hp_now_ns())
        }
        if rv != 0 {
            fail(core, rv: rv)
            return
        }
        notePacket(core, on: route)
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

    func touch(_ core: ConnectionCore) {
        if touchedKeys.insert(core.key).inserted { touched.append(core) }
    }

    func flushTouched() {
        let batch = touched
        touched.removeAll(keepingCapacity: true)
        touchedKeys.removeAll(keepingCapacity: true)
        for core in batch where !core.isClosed {
            wakeWriters(core)
            flush(core)
        }
    }

}
