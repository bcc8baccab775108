internal import CNgtcp2
internal import CHolePunchNetShims

// The connection driver: flushing packets, timers, closing, and the caches of ended connections.
extension Endpoint {
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
        // Pacing (RFC 9002 §7.7): ngtcp2 spaces the next packet by the bytes written since the last update over
        // 1.25 cwnd/RTT. The handshake's own flights are not paced: charged at the update after the flush that
        // completed the handshake, they held the first stream bytes back by 0.1-0.25 RTT (a relayed first byte came
        // 2.2 RTTs after the coordinate, not 2). So updates start there, and that first one is stamped at time 0:
        // the handshake's bytes are counted as sent long ago, with nothing left to wait for (ngtcp2 0.12 only sets
        // the next send time from it, and cancels a time that has passed at the next expiry). Skipping updates later
        // would not do: the skipped bytes stay counted and the next update charges them at once.
        if core.isPaced {
            ngtcp2_conn_update_pkt_tx_time(conn, now)
        } else if core.isHandshakeCompleted {
            ngtcp2_conn_update_pkt_tx_time(conn, 0)
            core.isPaced = true
        }
        checkLiveness(core, now: now)
        if packets >= 128 {
            // More may be ready: come back after other sockets and jobs had a turn.
            let key = core.key
            loop.execute { self.assumeIsolated { $0.flushIfOpen(key) } }
        }
        rearm(core)
    }

    func flushIfOpen(_ key: UInt64) {
        if let core = connections[key] { flush(core) }
    }

    func fillVectors(_ stream: StreamState, into vectors: inout [ngtcp2_vec]) -> (Int, UInt64) {
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

    func sendClose(_ core: ConnectionCore, applicationCode: UInt64?, reason: String, rv: Int32 = 0) {
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
            if written > 0 {
                core.closeDatagram = Array(UnsafeRawBufferPointer(rebasing: io.sendBuffer[0..<Int(written)]))
                sendPacket(core, count: Int(written))
            }
        }
    }

    // MARK: Timers

    func rearm(_ core: ConnectionCore) {
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

    func timerFired(_ key: UInt64) {
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
    func fail(_ core: ConnectionCore, rv: Int32) {
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
    func abandon(_ key: UInt64) {
        guard let core = connections[key], case .handshaking = core.phase else { return }
        sendClose(core, applicationCode: 0, reason: "dial cancelled")
        finish(core, QUICError(.cancelled, "the dial to \(core.remote) was cancelled"))
    }

    /// Removes a connection: routes, timer, waiters, native state. Every exit path ends here exactly once.
    func finish(_ core: ConnectionCore, _ error: QUICError) {
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
        if let datagram = core.closeDatagram, core.isHandshakeCompleted, let conn = core.conn {
            // The closing state: three PTOs as RFC 9000 §10.2 asks, and no less than a second, so a peer that was
            // between packets when the close was lost still hears it. Only after a handshake: a failed handshake's
            // peer retransmits its Initials, which must not fill the table.
            let now = hp_now_ns()
            let linger = max(3 &* ngtcp2_conn_get_pto(conn), Self.closingLingerFloor)
            closing.insert(cids: Array(core.localCIDs), datagram: datagram, route: core.paths.active, expiry: now &+ linger, now: now)
        }
        for key in core.localCIDs where router.routes[key] === core {
            router.routes[key] = nil
        }
        core.localCIDs.removeAll()
        if let timer = core.timerID { loop.cancelTimer(timer) }
        core.timerID = nil
        stopRecheck(core)
        core.handshakeWaiter?.resume(throwing: error)
        core.handshakeWaiter = nil
        // Every waiter wakes, re-checks and finds the connection closed (or the data it still may read).
        waiters.wake(core.acceptWaiters)
        for stream in core.streams.values { core.wakeStream(stream) }
        waiters.wake(core.deliveryWaiters)
        waiters.wake(core.closeWaiters)
        waiters.wake(core.pathWaiters)
        core.pathChangeSink?.finish()
        core.pathChangeSink = nil
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

    /// The shortest time a closed connection's close is sent again on request (ns).
    static let closingLingerFloor: UInt64 = 1_000_000_000

    func endedError(_ key: UInt64) -> QUICError {
        ended[key]?.reason ?? QUICError(.closedLocally, "the connection is closed")
    }

    func wakeWriters(_ core: ConnectionCore) {
        let limit = UInt64(configuration.streamSendBuffer)
        for stream in core.streams.values where !stream.writeWaiters.isEmpty && stream.unacked < limit {
            waiters.wake(stream.writeWaiters)
        }
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
