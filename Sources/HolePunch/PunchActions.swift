import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy

/// Performing a session's actions: probes and answers on the punch's sockets, dials, the timer, and the strategy's
/// `onProbe` hook between rounds. Every event the session handles comes back through ``apply(_:_:replyTo:)``.
extension PunchExecutor {
    /// The application error code that closes a connection which lost the tie-break.
    public static let duplicateCode: UInt64 = 0x4850_0001

    func apply(_ runtime: PunchRuntime, _ actions: [PunchSession.Action], replyTo transaction: STUNTransactionID? = nil) {
        for action in actions {
            switch action {
            case .sendProbes(let probes):
                let sockets = runtime.sockets
                // Each request's transaction is recorded before it leaves, so only answers to it are believed.
                var outgoing: [(socket: Endpoint, to: SocketAddress, bytes: [UInt8])] = []
                for probe in probes where probe.socket < sockets.count {
                    let transaction = STUNTransactionID.random()
                    guard let bytes = try? runtime.signer?.request(transactionID: transaction) else { continue }
                    runtime.session.ledger.recordSent(transaction, socket: probe.socket, to: probe.to)
                    outgoing.append((sockets[probe.socket], probe.to, bytes))
                }
                Task {
                    for datagram in outgoing {
                        try? await datagram.socket.send(datagram: datagram.bytes, to: datagram.to)
                    }
                }
            case .respond(let socket, let to):
                guard let transaction, socket < runtime.sockets.count,
                      let bytes = try? runtime.signer?.response(transactionID: transaction, observedAddress: to)
                else { continue }
                let endpoint = runtime.sockets[socket]
                Task { try? await endpoint.send(datagram: bytes, to: to) }
            case .dial(let dial, let socket, let to):
                guard socket < runtime.sockets.count, !interceptDial(runtime, dial: dial, socket: socket, to: to) else { continue }
                let endpoint = runtime.sockets[socket]
                let node = runtime.options.targetNodeID
                let plan = runtime.session.configuration.plan
                let punchID = runtime.id
                let serverName = PunchExecutor.serverName(forSession: runtime.options.sessionID)
                let alpn = runtime.options.alpn
                runtime.events.yield(.connecting(to: to))
                runtime.dials[dial] = Task {
                    let result: Result<QUICConnection, any Error>
                    do {
                        let connection = try await endpoint.connect(
                            to: to, expecting: node,
                            options: ConnectOptions(
                                initialRTT: plan.initialRTT, handshakeTimeout: plan.connectTimeout, serverName: serverName,
                                handshakePacketCopies: plan.handshakeCopies, alpn: alpn
                                // Not `returnsBeforeConfirmation`: a punch succeeds only once the target has verified
                                // us and confirmed. Returning at our Finished would save a peer RTT but count as
                                // success a dial the target refuses (its punch ended, or it kept another of our
                                // dials), in metrics and history, and hand the app a dead connection.
                            )
                        )
                        result = .success(connection)
                    } catch {
                        result = .failure(error)
                    }
                    self.dialFinished(punchID, dial: dial, result: result)
                }
            case .abandonDial(let dial):
                // Cancelling the dial's task abandons its half-open handshake at once.
                runtime.dials.removeValue(forKey: dial)?.cancel()
            case .closeDuplicate(let id):
                if let connection = runtime.connections.removeValue(forKey: id) {
                    Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "duplicate connection") }
                }
            case .armTimer(let at):
                arm(runtime, at: at)
            case .roundStarted(let round):
                runtime.events.yield(.roundStarted(round: round, ports: runtime.session.portsTried.count))
                consultOnProbe(runtime, round: round)
            case .pathProven(let address):
                // A no-op unless this is a target punch: its proven addresses get handshake hints.
                admission.proved(address, session: runtime.options.sessionID)
                if runtime.firstPathProven == nil { runtime.firstPathProven = elapsedSinceStart(runtime) }
                runtime.events.yield(.probeAnswered(from: address))
            case .succeed(let id):
                succeed(runtime, connection: id)
            case .fail(let code):
                fail(runtime, code: code)
            }
        }
    }

    /// Gives the strategy's `onProbe` hook the round's outcome; a plan it returns replaces the current one
    /// (validated and clamped like any plan, restricted to the candidate host).
    private func consultOnProbe(_ runtime: PunchRuntime, round: Int) {
        let session = runtime.session
        let event = ProbeEvent(
            round: round, elapsed: elapsedSinceStart(runtime), probesSent: session.probesSent,
            answeredPorts: session.provenAddresses.map(\.port),
            unreachablePorts: session.unreachable.map(\.port).sorted(),
            currentPlan: session.configuration.plan
        )
        // The hook runs off the actor; its answer is applied when it comes, if the punch is still running. A
        // failing hook keeps the plan (`FallbackStrategy` logs and counts it).
        let (strategy, context, id) = (runtime.strategy, runtime.context, runtime.id)
        Task {
            guard let plan = await strategy.detachedOnProbe(context, event) else { return }
            self.replacePlan(id, with: plan)
        }
    }

    func arm(_ runtime: PunchRuntime, at deadline: UInt64) {
        runtime.timerTask?.cancel()
        runtime.timerGeneration += 1
        let generation = runtime.timerGeneration
        let id = runtime.id
        let clock = self.clock
        runtime.timerTask = Task {
            if deadline > clock.now() {
                do { try await clock.sleep(until: deadline) } catch { return }
            }
            self.timerFired(id, generation: generation)
        }
    }

    private func timerFired(_ id: PunchID, generation: Int) {
        guard let runtime = runtimes[id], runtime.timerGeneration == generation else { return }
        runtime.timerTask = nil
        apply(runtime, runtime.session.handle(.timer(now: clock.now())))
    }

    private func dialFinished(_ id: PunchID, dial: Int, result: Result<QUICConnection, any Error>) {
        guard let runtime = runtimes[id] else {
            // The punch ended while this handshake completed: nobody wants the connection.
            if case .success(let connection) = result {
                Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "punch already ended") }
            }
            return
        }
        runtime.dials[dial] = nil
        switch result {
        case .success(let connection):
            runtime.connections[dial] = connection
            apply(runtime, runtime.session.handle(.dialEstablished(id: dial)))
        case .failure(let error):
            let authentication = (error as? QUICError)?.code == .peerAuthenticationFailed
            if authentication { runtime.authenticationError = error as? QUICError }
            apply(runtime, runtime.session.handle(.dialFailed(id: dial, authentication: authentication)))
        }
    }
}
