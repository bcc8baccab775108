internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchShims
internal import CHolePunchNetShims

// The ngtcp2 callbacks of a connection: C thunks that recover the connection from `user_data`, and the
// methods they forward to.
extension ConnectionCore {
    // MARK: Callbacks, as methods (the C thunks in `makeCallbacks` forward here)

    func onHandshakeCompleted() {
        if let session {
            var selected = gnutls_datum_t()
            if gnutls_alpn_get_selected_protocol(session, &selected) == 0, let bytes = selected.data {
                alpn = String(decoding: UnsafeBufferPointer(start: bytes, count: Int(selected.size)), as: UTF8.self)
            }
        }
        isHandshakeCompleted = true
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
        cb.decrypt = PacketDecryption.callback
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

}

@inline(__always)
private func core(_ userData: UnsafeMutableRawPointer) -> ConnectionCore {
    Unmanaged<ConnectionCore>.fromOpaque(userData).takeUnretainedValue()
}
