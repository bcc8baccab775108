import HolePunch
import Logging
import HolePunchStrategy

/// The client's side of the control stream: writing messages, the read loop, and what each server message does.
extension RendezvousClient {
    func send(_ message: ClientMessage) async {
        await send([message])
    }

    /// Writes `messages` in one write, in order.
    func send(_ messages: [ClientMessage]) async {
        guard let stream, closedReason == nil else { return }
        do {
            try await stream.write(messages.flatMap { RendezvousFraming.frame($0) })
        } catch {
            fail(RendezvousError(.disconnected, "lost the rendezvous connection: \(error)"))
        }
    }

    func readLoop() async {
        guard let stream else { return }
        var reader = FrameReader()
        do {
            while let chunk = try await stream.read() {
                reader.append(chunk)
                while let body = try reader.next() {
                    let receivedAt = ContinuousClock.now
                    let message: ServerMessage
                    do {
                        message = try RendezvousFraming.decode(ServerMessage.self, from: body)
                    } catch {
                        // The framing is intact, only this message is out of range (e.g. another peer's profile
                        // relayed by a server that does not check it): drop it, keep the registration.
                        invalidMessages += 1
                        logger.info("invalid message from the rendezvous dropped", metadata: ["error": "\(error)"])
                        continue
                    }
                    await handle(message, receivedAt: receivedAt)
                }
            }
            fail(RendezvousError(.disconnected, "the rendezvous closed the connection"))
        } catch {
            fail(RendezvousError(.disconnected, "lost the rendezvous connection: \(error)"))
        }
    }

    func handle(_ message: ServerMessage, receivedAt: ContinuousClock.Instant) async {
        switch message {
        case .ping(let id):
            await send(.pong(id: id))
        case .registered(let confirmed):
            registered = confirmed
            registerWaiter?.resume(returning: .success(confirmed))
            registerWaiter = nil
        case .keepAliveAck:
            break
        case .coordinate(let coordinate):
            await send(.coordinateAck(sessionID: coordinate.sessionID))
            let received = ReceivedCoordinate(coordinate: coordinate, receivedAt: receivedAt)
            if coordinate.role == .initiator {
                if let id = coordinate.requestID { answer(id, .success(received)) }
            } else if !configuration.acceptsPunches {
                targetCoordinates += 1
            } else if !(await configuration.admission.admits(coordinate.peer)) {
                targetCoordinates += 1
                refusedCoordinates += 1
                logger.info("punch refused by the admission policy", metadata: [
                    "peer.node": "\(coordinate.peer.short)", "session.id": "\(coordinate.sessionID)",
                ])
                await send(.punchResult(sessionID: coordinate.sessionID, outcome: PunchFailureCode.refused.rawValue))
            } else {
                targetCoordinates += 1
                logger.info("punch requested by peer", metadata: ["peer.node": "\(coordinate.peer.short)",
                                                                  "session.id": "\(coordinate.sessionID)"])
                let handle = await startPunch(received)
                punchesContinuation.yield(IncomingPunch(coordinate: received, handle: handle))
                let sink = incomingContinuation
                track(Task {
                    if case .success(let connection) = await handle.result() { sink.yield(connection) }
                })
            }
        case .error(let reply):
            let error = RendezvousError(RendezvousError.Code(reply.code), reply.message)
            // A refusal naming a request belongs to that request, even one nobody waits for any more (timed out,
            // cancelled): only a refusal without a request id can be the register's.
            if let id = reply.requestID {
                answer(id, .failure(error))
            } else if let waiter = registerWaiter {
                registerWaiter = nil
                waiter.resume(returning: .failure(error))
            } else {
                logger.info("rendezvous error", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Hands the answer to punch request `id` to its waiter, or keeps it for a pipelined request's caller.
    func answer(_ id: UInt64, _ result: Result<ReceivedCoordinate, RendezvousError>) {
        if let waiter = requestWaiters.removeValue(forKey: id) {
            waiter.resume(returning: result)
        } else if pipelinedIDs.contains(id) {
            unclaimedAnswers[id] = result
        }
    }

    func keepAliveLoop() async {
        while closedReason == nil {
            let interval = Duration.milliseconds(max(registered?.keepAliveMilliseconds ?? 10_000, 50))
            guard (try? await Task.sleep(for: interval)) != nil else { return }
            await send(.keepAlive)
        }
    }

    func fail(_ error: RendezvousError) {
        guard closedReason == nil else { return }
        closedReason = error
        registerWaiter?.resume(returning: .failure(error))
        registerWaiter = nil
        for waiter in requestWaiters.values { waiter.resume(returning: .failure(error)) }
        requestWaiters.removeAll()
        incomingContinuation.finish()
        punchesContinuation.finish()
    }
}
