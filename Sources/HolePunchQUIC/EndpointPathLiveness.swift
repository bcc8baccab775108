import HolePunchNet
internal import CNgtcp2
internal import CHolePunchNetShims

// Keeping a connection's path: noticing that the active path went silent, re-checking every known path in parallel,
// and moving to the first that answers (see ``PathLiveness``).
extension Endpoint {
    /// How long the active path of `core` may stay silent before its paths are re-checked.
    func silenceLimit(_ core: ConnectionCore) -> UInt64 {
        let pto = core.conn.map { ngtcp2_conn_get_pto($0) } ?? 0
        return PathLiveness.silenceLimit(pto: pto, initialRTT: nanoseconds(configuration.initialRTT))
    }

    /// After a flush: starts a re-check when ack-eliciting data has waited on the active path for too long.
    func checkLiveness(_ core: ConnectionCore, now: UInt64) {
        guard let conn = core.conn, case .established = core.phase, !core.isClosing else { return }
        var stat = ngtcp2_conn_stat()
        ngtcp2_conn_get_conn_stat_versioned(conn, NGTCP2_CONN_STAT_VERSION, &stat)
        guard core.liveness.check(inFlight: stat.bytes_in_flight > 0, now: now, limit: silenceLimit(core)) else { return }
        counters.pathRechecks += 1
        logger.debug("active path silent: re-checking paths", metadata: [
            "peer.address": "\(core.paths.active.address)", "paths.count": "\(core.paths.entries.count)",
        ])
        recheck(core.key)
    }

    /// Challenges every path of the connection at once, and again every silence limit while the re-check runs: the
    /// idle timeout, not the re-check, ends a connection none of whose paths answers.
    private func recheck(_ key: UInt64) {
        guard let core = connections[key], core.liveness.isRechecking else { return }
        let now = hp_now_ns()
        for status in core.paths.statuses { sendChallenge(core, on: status.route, now: now) }
        if let timer = core.recheckTimer { loop.cancelTimer(timer) }
        core.recheckTimer = loop.schedule(at: now &+ silenceLimit(core)) { [weak self] in
            self?.assumeIsolated { $0.recheck(key) }
        }
    }

    /// A path answered a challenge while a re-check runs: the active one means it works after all; another one
    /// takes the connection over.
    func recheckAnswered(_ core: ConnectionCore, on route: PathRoute) {
        if route == core.paths.active {
            heardOnActive(core)
        } else if let change = core.paths.activate(route, reason: .pathFailed) {
            moved(core, change)
            // Announce the move (as a switch does): the peer follows.
            sendChallenge(core, on: route, now: hp_now_ns(), kind: .announcement)
            flush(core)
        }
    }

    /// An authenticated packet arrived on the active path.
    func heardOnActive(_ core: ConnectionCore) {
        core.liveness.heardOnActive()
        stopRecheck(core)
    }

    /// The active path changed: counts it (and relay ↔ direct moves by kind), tells the application, and starts watching the new path afresh.
    func moved(_ core: ConnectionCore, _ change: PathChange) {
        counters.pathSwitches += 1
        switch (change.from.isRelayed, change.to.isRelayed) {
        case (true, false): counters.relayToDirectMoves += 1
        case (false, true): counters.directToRelayMoves += 1
        default: break
        }
        core.pathChangeSink?.yield(change)
        core.liveness.moved()
        stopRecheck(core)
        logger.debug("active path changed", metadata: [
            "path.from": "\(change.from)", "path.to": "\(change.to)", "path.reason": "\(change.reason)",
        ])
    }

    func stopRecheck(_ core: ConnectionCore) {
        if let timer = core.recheckTimer { loop.cancelTimer(timer) }
        core.recheckTimer = nil
    }
}
