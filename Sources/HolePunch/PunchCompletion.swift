import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy

/// Ending a punch: its result and last event, the teardown of its timer, dials, losing sockets and session entry,
/// and the outcome in metrics, history and the strategy's `onResult` hook.
extension PunchExecutor {
    func succeed(_ runtime: PunchRuntime, connection id: Int) {
        guard let connection = runtime.connections.removeValue(forKey: id) else {
            fail(runtime, code: .timeout)
            return
        }
        if runtime.relayed != nil {
            // A direct handshake begun before the relayed connection won (`after(d)`): the app holds the relayed
            // one, which this punch could not move; this one is a duplicate.
            Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "duplicate connection") }
            finishRelayed(runtime)
            return
        }
        let elapsed = elapsedSinceStart(runtime)
        let winningSocket = runtime.session.winningSocket ?? 0
        let remote = runtime.session.winningAddress ?? connection.remoteAddress
        let port = remote.port
        let offset = runtime.options.targetPorts.first.map { Int(port) - Int($0) } ?? 0
        let outcome = PunchOutcome.success(timeToConnect: elapsed, winningPort: port, portOffset: offset, rounds: runtime.session.round)
        let success = PunchSuccess(
            remoteAddress: remote, localPort: runtime.sockets[min(winningSocket, runtime.sockets.count - 1)].localAddress.port,
            timeToConnect: elapsed, rounds: runtime.session.round, candidate: runtime.checks.candidate(for: remote)
        )
        addFallbackPaths(runtime, to: connection, socket: winningSocket)
        let closing = end(runtime, outcome: outcome, keepSocket: winningSocket)
        metrics.timeToConnect.recordNanoseconds(Int64(nanoseconds(elapsed)))
        deliver(runtime, .success(connection), event: .done(.success(success)), after: closing)
        logger.debug("punch connected", metadata: [
            "punch.id": "\(runtime.id)", "peer.address": "\(remote)", "punch.rounds": "\(runtime.session.round)",
        ])
    }

    /// Adds the other pairs proven both ways on the winning socket, then the other direct candidates the punch
    /// checked, to the connection as extra paths, so that when its path dies the connection can move to one of them
    /// instead of punching again. An added path carries nothing until the path layer validates it (a re-check when
    /// the active path goes silent), so an unproven candidate costs a few probes then, nothing before: the punch stops
    /// probing once its first handshake runs, and a pair whose answer was still on its way was never a fallback
    /// before (`typedCandidatesWin` failed 3 runs in 24 on that).
    private func addFallbackPaths(_ runtime: PunchRuntime, to connection: QUICConnection, socket: Int) {
        let active = connection.remoteAddress
        let proven = runtime.session.pathsProvenBothWays(socket: socket)
        let checked = runtime.checks.checked.filter { $0.kind != .relayed }.map(\.address)
        var seen: Set<SocketAddress> = [active]
        let others = (proven + checked).filter { $0.family == active.family && seen.insert($0).inserted }
        guard !others.isEmpty else { return }
        Task {
            // A path the table refuses (full, closed connection) is simply not a fallback.
            for address in others { try? await connection.addPath(.direct(address)) }
        }
    }

    func fail(_ runtime: PunchRuntime, code: PunchFailureCode) {
        if runtime.relayDialing, code != .cancelled {
            // No direct path, but the relayed dial may still connect: its outcome decides (`PunchRelay.swift`).
            runtime.failureAwaitingRelay = code
            return
        }
        if runtime.relayed != nil, code != .cancelled {
            // The connection runs over the relay; only the move to a direct path did not happen.
            finishRelayed(runtime)
            return
        }
        if relayInsteadOfFailing(runtime, code: code) { return }
        let elapsed = elapsedSinceStart(runtime)
        var message: String
        switch code {
        case .timeout:
            message = "no authenticated connection before the deadline"
            if let proven = runtime.firstPathProven {
                message += ": a path was proven after \(proven.humanDescription)"
                if runtime.options.role == .initiator {
                    message += ", \(runtime.session.dialsStarted) QUIC handshake(s) started"
                }
            } else {
                message += ": no probe from the peer arrived"
            }
        case .unreachable: message = "every candidate port answered ICMP unreachable"
        case .allPortsFailed: message = "no planned port answered a probe"
        case .cancelled: message = "the punch was cancelled"
        case .peerAuthenticationFailed:
            // The QUIC error's detail, not its description: the code is already this error's own.
            message = runtime.authenticationError?.detail ?? "the peer was not the expected NodeID"
        default: message = code.rawValue
        }
        if code != .cancelled { message += " (\(runtime.options.targetHost), \(runtime.options.targetPorts.count) candidate ports)" }
        let error = PunchError(
            code: code, message: message, portsTried: runtime.session.portsTried,
            rounds: runtime.session.round, elapsed: elapsed
        )
        let closing = end(runtime, outcome: .failure(code: code, rounds: runtime.session.round), keepSocket: nil)
        deliver(runtime, .failure(error), event: .done(.failure(error)), after: closing)
    }

    /// Delivers a relayed connection as the punch's result at once (relay first); the punch itself goes on, for
    /// the move to a direct path (`PunchRelay.swift`), and ends with ``finishRelayed(_:)``.
    func deliverRelayed(_ runtime: PunchRuntime, connection: QUICConnection, remote: SocketAddress) {
        runtime.relayed = connection
        if runtime.options.role == .target { admission.admitsNoMoreHandshakes(session: runtime.options.sessionID) }
        let elapsed = elapsedSinceStart(runtime)
        let success = PunchSuccess(
            remoteAddress: remote, localPort: endpoint.localAddress.port, timeToConnect: elapsed,
            rounds: runtime.session.round, candidate: Candidate(kind: .relayed, address: remote)
        )
        metrics.timeToConnect.recordNanoseconds(Int64(nanoseconds(elapsed)))
        if runtime.box.deliver(.success(connection)) { runtime.events.yield(.done(.success(success))) }
        // The probing for a direct path goes on for at most the plan's `directAfterRelay` (or to its timeout).
        let (id, limit) = (runtime.id, runtime.session.configuration.plan.directAfterRelay)
        runtime.relayDial = Task {
            do { try await Task.sleep(for: limit) } catch { return }
            guard let runtime = self.runtimes[id], runtime.relayed != nil else { return }
            self.finishRelayed(runtime)
        }
        logger.debug("punch connected through the relay", metadata: [
            "punch.id": "\(runtime.id)", "peer.address": "\(remote)",
        ])
    }

    /// Ends a punch whose relayed connection was delivered: moved to a direct path, or out of time to find one.
    func finishRelayed(_ runtime: PunchRuntime) {
        let elapsed = elapsedSinceStart(runtime)
        let outcome = PunchOutcome.success(timeToConnect: elapsed, winningPort: runtime.relayed?.remoteAddress.port ?? 0,
                                           portOffset: 0, rounds: runtime.session.round)
        let closing = end(runtime, outcome: outcome, keepSocket: 0)
        // The result went out at delivery; this only closes the losing sockets and ends the events.
        deliver(runtime, .failure(PunchError(code: .cancelled, message: "already delivered")), event: .done(.failure(
            PunchError(code: .cancelled, message: "already delivered"))), after: closing)
    }

    /// Delivers the result once the punch's losing sockets are closed, so "result delivered" means the punch has
    /// really stopped.
    private func deliver(
        _ runtime: PunchRuntime, _ result: Result<QUICConnection, PunchError>, event: PunchEvent, after closing: [Endpoint]
    ) {
        let box = runtime.box
        let events = runtime.events
        if closing.isEmpty {
            if box.deliver(result) { events.yield(event) }
            events.finish()
            return
        }
        Task {
            for socket in closing { await socket.close() }
            if box.deliver(result) { events.yield(event) }
            events.finish()
        }
    }

    /// Tears a punch down: timer, dials, registrations; records the outcome. Returns the losing extra sockets,
    /// which the caller closes before delivering the result.
    private func end(_ runtime: PunchRuntime, outcome: PunchOutcome, keepSocket: Int?) -> [Endpoint] {
        runtime.timerTask?.cancel()
        runtime.timerTask = nil
        runtime.timerGeneration += 1
        for task in runtime.dials.values { task.cancel() }
        runtime.relayDial?.cancel()
        runtime.relayDial = nil
        runtime.dials.removeAll()
        for connection in runtime.connections.values {
            Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "duplicate connection") }
        }
        runtime.connections.removeAll()
        let closing = runtime.sockets.enumerated().filter { $0.offset > 0 && $0.offset != keepSocket }.map(\.element)
        runtimes[runtime.id] = nil
        admission.forget(session: runtime.options.sessionID)
        metrics.active.decrement()
        metrics.record(outcome: outcome, strategy: runtime.strategyName, pair: PunchMetrics.pair(runtime.options))
        if case .failure(.cancelled, _) = outcome {
            // A cancellation says nothing about the network: it is not history.
        } else {
            history.record(outcome, for: runtime.context)
        }
        // A failing hook is logged and counted by `FallbackStrategy`, never thrown.
        let (strategy, context) = (runtime.strategy, runtime.context)
        Task { await strategy.detachedOnResult(context, outcome) }
        return closing
    }

    /// Time since the punch's start instant (zero before it).
    func elapsedSinceStart(_ runtime: PunchRuntime) -> Duration {
        clock.elapsed(since: runtime.session.configuration.startAt)
    }
}
