internal import CNgtcp2
internal import CHolePunchNetShims
#if canImport(Glibc)
import Glibc
#endif

// Stream I/O and the other operations behind connection and stream handles.
extension Endpoint {
    // MARK: Operations for connection and stream handles

    func established(_ key: UInt64) throws -> ConnectionCore {
        guard let core = connections[key] else { throw endedError(key) }
        if case .closed(let error) = core.phase { throw error }
        return core
    }

    /// A connection that still takes new data: established and not closing.
    func writable(_ key: UInt64) throws -> ConnectionCore {
        let core = try established(key)
        guard !core.isClosing else { throw QUICError(.closedLocally, "the connection is closing") }
        return core
    }

    /// Suspends the caller on `list` until an event wakes it (it then re-checks its condition), or its task is
    /// cancelled (it throws ``QUICError/Code/cancelled`` and leaves nothing behind).
    func suspend(on list: WaitList) async throws {
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
    func waitForAcknowledgements(_ core: ConnectionCore, until deadline: UInt64? = nil) async throws {
        guard let conn = core.conn else { return }
        let key = core.key
        let timer = loop.schedule(at: deadline ?? hp_now_ns() + ngtcp2_conn_get_pto(conn)) { [weak self] in
            self?.assumeIsolated { $0.deliveryTick(key) }
        }
        defer { loop.cancelTimer(timer) }
        try await suspend(on: core.deliveryWaiters)
    }

    func deliveryTick(_ key: UInt64) {
        guard let core = connections[key] else { return }
        settleFins(core)
        waiters.wake(core.deliveryWaiters)
    }

    /// Marks as acknowledged each FIN that went out before the last of its stream's data was acknowledged, once a
    /// PTO has passed since then with nothing in flight: a lost FIN would have been retransmitted (and be in flight)
    /// within that time, so it was acknowledged inside a retransmission that merged it with data.
    func settleFins(_ core: ConnectionCore) {
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
    var ackDelayAllowance: UInt64 { 30_000_000 }

    /// The default bound of a graceful close: 16 PTOs (enough for four retransmissions with backoff), at least
    /// one second, at most ``EndpointConfiguration/closeTimeout``.
    func defaultCloseTimeout(_ core: ConnectionCore) -> Duration {
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
