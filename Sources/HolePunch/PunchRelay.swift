import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy

/// Relay first, then direct (issue 15 item 3): when the plan says `relay = .first` and the peer published a relayed
/// address, the initiator dials that address at once (plain UDP from our punch socket; the target's TURN allocation
/// forwards it, and the target answers through it). The connection is the punch's result as soon as it exists;
/// the probing goes on beside it, and a direct pair the session would dial becomes a path of that connection
/// instead (`validatePath` then `switchPath`): no second handshake. The relayed path stays in the connection's
/// table, so the keeper moves back to it if the direct path dies.
///
/// The target needs nothing new to accept: the Initial arrives on its relayed route and is admitted by the session's
/// server name. It delivers that connection at once too, and keeps answering probes until its punch ends, so the
/// initiator can prove a direct pair. A target whose punch ends without a connection while its plan uses the relay
/// (and its endpoint has one) keeps accepting the initiator's relayed dial until that dial's end
/// (`PunchPlan.relayAcceptEnd`): "punch, then relay" dials when both punches have given up.
extension PunchExecutor {
    /// The peer's relayed address when this punch may connect through it (the plan's `relay` is not `never`).
    func relayTarget(_ runtime: PunchRuntime) -> SocketAddress? {
        guard runtime.options.role == .initiator, runtime.session.configuration.plan.relay != .never else { return nil }
        return runtime.options.candidates.first { $0.kind == .relayed && $0.family == endpoint.localAddress.family }?.address
    }

    /// Starts the relayed dial as the plan asks: at once for `first`; for `after(d)`, `d` after the punch's start
    /// when no direct path was proven by then (or earlier, when the punch fails before: ``relayInsteadOfFailing(_:code:)``).
    func startRelayDial(_ runtime: PunchRuntime) {
        guard let relayed = relayTarget(runtime) else { return }
        guard case .after(let delay) = runtime.session.configuration.plan.relay else {
            dialRelay(runtime, relayed)
            return
        }
        let (id, clock) = (runtime.id, clock)
        let at = runtime.session.configuration.startAt + nanoseconds(delay)
        runtime.relayDial = Task {
            do { try await clock.sleep(until: at) } catch { return }
            self.relayDelayElapsed(id, relayed: relayed)
        }
    }

    private func relayDelayElapsed(_ id: PunchID, relayed: SocketAddress) {
        guard let runtime = runtimes[id], !runtime.relayTried, runtime.session.provenAddresses.isEmpty else { return }
        dialRelay(runtime, relayed)
    }

    /// A punch about to fail that may still connect through the relay: the initiator dials it (`after(d)` before
    /// `d`), the target waits for that dial (`awaitRelayedDial`); the failure waits for the outcome. True
    /// when it does.
    func relayInsteadOfFailing(_ runtime: PunchRuntime, code: PunchFailureCode) -> Bool {
        guard code != .cancelled, !runtime.relayTried else { return false }
        if runtime.options.role == .target { return awaitRelayedDial(runtime, code: code) }
        guard let relayed = relayTarget(runtime) else { return false }
        runtime.failureAwaitingRelay = code
        dialRelay(runtime, relayed)
        return true
    }

    /// A target punch that ended without a connection keeps its session admitted until the initiator's relayed dial
    /// can no longer arrive (`PunchPlan.relayAcceptEnd` after the start), when its plan uses the relay and its
    /// endpoint has one: the initiator dials the relay only when its own punch has given up, or at the plan's delay,
    /// and both sides' punches end alike (macula's "punch, then relay" found nobody accepting before this). A target
    /// never dials, so its probing stops; only the relayed Initial is awaited. True when it waits.
    private func awaitRelayedDial(_ runtime: PunchRuntime, code: PunchFailureCode) -> Bool {
        guard runtime.context.relayAvailable, let window = runtime.session.configuration.plan.relayAcceptEnd else { return false }
        let end = runtime.session.configuration.startAt + nanoseconds(window)
        guard clock.now() < end else { return false }
        runtime.relayTried = true
        runtime.failureAwaitingRelay = code
        let (id, clock) = (runtime.id, clock)
        runtime.relayDial = Task {
            do { try await clock.sleep(until: end) } catch { return }
            self.relayWaitEnded(id)
        }
        logger.debug("punch ended; accepting the relayed dial", metadata: [
            "punch.id": "\(runtime.id)", "punch.outcome": "\(code.rawValue)",
        ])
        return true
    }

    /// The target's wait for the relayed dial is over with no connection: the punch fails as it would have.
    private func relayWaitEnded(_ id: PunchID) {
        guard let runtime = runtimes[id], runtime.relayed == nil, let code = runtime.failureAwaitingRelay else { return }
        fail(runtime, code: code)
    }

    /// Cancels a punch: through its session while it runs; a punch whose session has ended (it only awaits the relay)
    /// ends here, since its session has nothing left to cancel.
    func cancelPunch(_ runtime: PunchRuntime) {
        let actions = runtime.session.handle(.cancel)
        if actions.isEmpty { fail(runtime, code: .cancelled) } else { apply(runtime, actions) }
    }

    /// Relayed dials one punch makes at most (the first and two more after handshake timeouts).
    static let maxRelayDials = 3

    /// Dials the peer's relayed address; the session's own dials wait for its outcome.
    private func dialRelay(_ runtime: PunchRuntime, _ relayed: SocketAddress) {
        runtime.relayTried = true
        runtime.relayDialing = true
        runtime.relayDials += 1
        let (endpoint, node, plan, punchID) = (runtime.sockets[0], runtime.options.targetNodeID,
                                               runtime.session.configuration.plan, runtime.id)
        // Returns at our Finished, a peer round trip before the target's confirmation, so the app's first bytes
        // leave with it (time to first byte: one handshake round trip and one for the data). Punch dials wait for
        // confirmation because the target may refuse all but one of several; a relayed dial is the punch's only
        // dial to the target's allocation, made as the target starts its punch, so a refusal needs the target's
        // punch to end within that round trip, and then the app's first stream operation fails (`handshakeFailed`).
        // Not so while a direct dial runs beside it (`after(d)` with the first candidate dialled at once): the target
        // ends its punch with whichever handshake completes there first and refuses the other, so this one too waits
        // for the target's confirmation; returning early gave the app a relayed connection the target had refused
        // while the target kept the direct one, which this punch then closed as a duplicate.
        // Dials the session starts while this one runs, on any socket, wait for its outcome (`interceptDial`), so
        // only dials already in flight can race it.
        let alone = runtime.dials.isEmpty
        // The relayed leg crosses the same lossy links as the punch (ours to the relay, the relay's to the target): the
        // plan's copies of every handshake datagram apply to it as to the punch's dials.
        let options = ConnectOptions(initialRTT: plan.initialRTT, handshakeTimeout: plan.connectTimeout,
                                     serverName: PunchExecutor.serverName(forSession: runtime.options.sessionID),
                                     handshakePacketCopies: plan.handshakeCopies, alpn: runtime.options.alpn,
                                     returnsBeforeConfirmation: alone)
        runtime.events.yield(.connecting(to: relayed))
        runtime.relayDial = Task {
            let result: Result<QUICConnection, any Error>
            do {
                result = .success(try await endpoint.connect(to: relayed, expecting: node, options: options))
            } catch {
                result = .failure(error)
            }
            self.relayDialFinished(punchID, address: relayed, result: result)
        }
    }

    /// Whether the session's dial to `to` is handled here: while the relayed dial runs it waits (on every socket: a
    /// direct handshake beside a relayed dial that returns at our Finished could be the one the target keeps), once
    /// the relayed connection exists it becomes a path move on it (socket 0 only; a birthday socket is another
    /// 5-tuple, dialled as before).
    func interceptDial(_ runtime: PunchRuntime, dial: Int, socket: Int, to: SocketAddress) -> Bool {
        if socket == 0, let connection = runtime.relayed, connection.isClient {
            moveToDirect(runtime, connection: connection, dial: dial, to: to)
            return true
        }
        guard runtime.relayDialing else { return false }
        runtime.waitingDials.append((dial, socket, to))
        return true
    }

    private func relayDialFinished(_ id: PunchID, address: SocketAddress, result: Result<QUICConnection, any Error>) {
        guard let runtime = runtimes[id] else {
            if case .success(let connection) = result {
                Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "punch already ended") }
            }
            return
        }
        runtime.relayDialing = false
        runtime.relayDial = nil
        let waiting = runtime.waitingDials
        runtime.waitingDials = []
        switch result {
        case .success(let connection):
            deliverRelayed(runtime, connection: connection, remote: address)
            if runtime.failureAwaitingRelay != nil {
                finishRelayed(runtime)
                return
            }
            for (dial, socket, to) in waiting {
                if socket == 0 {
                    moveToDirect(runtime, connection: connection, dial: dial, to: to)
                } else {
                    apply(runtime, [.dial(id: dial, socket: socket, to: to)])
                }
            }
        case .failure(let error):
            // The target opens its allocation to us when it hears of the punch, as we dial: on a loaded machine our
            // first Initials can reach the relay before that permission and be dropped (seen once in CI).
            if runtime.failureAwaitingRelay == nil, runtime.relayDials < Self.maxRelayDials,
               (error as? QUICError)?.code == .handshakeTimeout {
                runtime.waitingDials = waiting
                dialRelay(runtime, address)
                return
            }
            logger.info("relayed dial failed; punching only", metadata: [
                "punch.id": "\(runtime.id)", "relay.address": "\(address)", "error": "\(error)",
            ])
            if let code = runtime.failureAwaitingRelay {
                fail(runtime, code: code)
                return
            }
            for (dial, socket, to) in waiting { apply(runtime, [.dial(id: dial, socket: socket, to: to)]) }
        }
    }

    /// A target punch's accepted connection that arrived through our relay: delivered at once, and the punch goes
    /// on answering probes. True when it was.
    func acceptRelayed(_ runtime: PunchRuntime, connection: QUICConnection) async -> Bool {
        guard runtime.relayed == nil,
              await connection.paths().contains(where: { $0.isActive && $0.route.isRelayed }) else { return false }
        guard runtimes[runtime.id] === runtime else {
            Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "punch already ended") }
            return true
        }
        // A target past its punch (`awaitRelayedDial`) stops waiting: the relayed dial came.
        let wasAwaiting = runtime.failureAwaitingRelay != nil
        stopAwaitingRelayedDial(runtime)
        deliverRelayed(runtime, connection: connection, remote: connection.remoteAddress)
        if wasAwaiting { finishRelayed(runtime) }
        return true
    }

    /// Ends a target's wait for the relayed dial (`awaitRelayedDial`): its timer stops and the failure it would have
    /// reported is dropped, since a connection came.
    func stopAwaitingRelayedDial(_ runtime: PunchRuntime) {
        runtime.relayDial?.cancel()
        runtime.relayDial = nil
        runtime.failureAwaitingRelay = nil
    }

    /// Moves the relayed connection to the direct path `to` the session proved: validate, then switch. The punch
    /// ends when it moved; a path that does not validate counts as a failed dial, so the session tries the next.
    private func moveToDirect(_ runtime: PunchRuntime, connection: QUICConnection, dial: Int, to: SocketAddress) {
        let punchID = runtime.id
        runtime.events.yield(.connecting(to: to))
        runtime.dials[dial] = Task {
            do {
                try await connection.addPath(.direct(to))
                try await connection.validatePath(.direct(to))
                try await connection.switchPath(to: .direct(to))
                self.movedToDirect(punchID, dial: dial, to: to)
            } catch {
                self.moveFailed(punchID, dial: dial)
            }
        }
    }

    private func movedToDirect(_ id: PunchID, dial: Int, to: SocketAddress) {
        guard let runtime = runtimes[id] else { return }
        runtime.dials[dial] = nil
        logger.debug("relayed connection moved to the direct path", metadata: [
            "punch.id": "\(runtime.id)", "peer.address": "\(to)",
        ])
        finishRelayed(runtime)
    }

    private func moveFailed(_ id: PunchID, dial: Int) {
        guard let runtime = runtimes[id] else { return }
        runtime.dials[dial] = nil
        apply(runtime, runtime.session.handle(.dialFailed(id: dial, authentication: false)))
    }
}
