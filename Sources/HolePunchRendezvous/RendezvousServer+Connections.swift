import HolePunch
import Logging
import HolePunchQUIC

/// The server's I/O per peer connection: serving its control stream, reading and writing frames within the
/// limits, performing the state machine's actions, RTT pings, and housekeeping.
extension RendezvousServer {
    func serve(_ connection: QUICConnection) async {
        guard phase == .running else {
            await connection.close(errorCode: RendezvousCloseCode.shuttingDown, reason: "shutting down")
            return
        }
        let id = nextConnection
        nextConnection += 1
        let node = connection.peerNodeID
        // A peer that never opens its control stream is closed by the QUIC idle timeout.
        guard let stream = try? await connection.acceptStream(), phase == .running else {
            await connection.close()
            return
        }
        let limits = configuration.limits
        let (outbox, continuation) = AsyncStream.makeStream(of: Outgoing.self)
        let delay = configuration.linkDelay?(node) ?? .zero
        // ngtcp2 reports UINT64_MAX as min_rtt before its first sample: only a plausible figure counts.
        let measured = await connection.stats()?.minRTT
        links[id] = Link(node: node, connection: connection, outbox: continuation,
                         messages: TokenBucket(burst: limits.messageBurst, perSecond: limits.messagesPerSecond, now: now),
                         handshakeRTT: measured.flatMap { $0 > .zero && $0 < .seconds(10) ? $0 + delay * 2 : nil })
        linkByNode[node] = id
        await withDiscardingTaskGroup { group in
            group.addTask { await self.write(outbox, to: stream, node: node, connection: id, pathDelay: delay) }
            group.addTask { await self.refuseExtraStreams(on: connection) }
            let ending = await self.read(stream, node: node, connection: id, pathDelay: delay)
            continuation.finish()
            // Closing ends the writer (a blocked write fails) and the stream refuser (accept returns).
            await self.end(connection: id, ending)
        }
        links[id] = nil
        if linkByNode[node] == id { linkByNode[node] = nil }
        apply(state.disconnected(node: node, connection: id))
        syncDirectory(node)
    }

    /// Reads and handles the control stream until it ends or a limit is hit; returns how to close.
    func read(_ stream: QUICStream, node: NodeID, connection: UInt64, pathDelay: Duration) async -> Ending {
        var reader = FrameReader()
        do {
            while let chunk = try await stream.read() {
                reader.append(chunk)
                while let body = try reader.next() {
                    guard phase == .running, links[connection]?.closing == false else { return .normal }
                    // Every frame costs a token before it is decoded: decoding is the expensive part.
                    guard links[connection]?.messages.take(now: now) == true else {
                        stats.closedForRate += 1
                        let limits = configuration.limits
                        return Ending(code: RendezvousCloseCode.rateLimited, reason: "\(RendezvousError.Code.rateLimited): "
                                      + "more than \(Int(limits.messageBurst)) messages at once or \(limits.messagesPerSecond)/s")
                    }
                    let message = try RendezvousFraming.decode(ClientMessage.self, from: body)
                    if pathDelay > .zero { try await clock.sleep(for: pathDelay) }
                    guard phase == .running, links[connection]?.closing == false else { return .normal }
                    handle(message, from: node, connection: connection)
                }
            }
        } catch let error as RendezvousError where error.code == .protocolViolation {
            stats.closedForProtocol += 1
            logger.debug("peer protocol violation", metadata: ["peer.node": "\(node.short)", "error": "\(error)"])
            return Ending(code: RendezvousCloseCode.protocolViolation, reason: "\(error)")
        } catch {
            logger.debug("peer connection ended", metadata: ["peer.node": "\(node.short)", "error": "\(error)"])
        }
        return .normal
    }

    /// The protocol uses one stream per connection: any other the transport lets a peer open is reset unread,
    /// and drained so that its buffered bytes are released.
    private func refuseExtraStreams(on connection: QUICConnection) async {
        while let extra = try? await connection.acceptStream() {
            stats.streamsRefused += 1
            await extra.reset(errorCode: RendezvousCloseCode.streamRefused)
            while (try? await extra.read()) != nil {}
        }
    }

    func write(_ outbox: AsyncStream<Outgoing>, to stream: QUICStream, node: NodeID, connection: UInt64,
                       pathDelay: Duration) async {
        for await item in outbox {
            links[connection]?.queued -= 1
            if item.notBefore > clock.now {
                guard (try? await clock.sleep(until: item.notBefore)) != nil else { return }
            }
            // The send instant is taken before the (simulated) path delay: it is part of the path.
            noteSent(item, node: node, connection: connection)
            if pathDelay > .zero {
                guard (try? await clock.sleep(for: pathDelay)) != nil else { return }
            }
            do { try await stream.write(item.frame) } catch { return }
        }
    }

    private func noteSent(_ item: Outgoing, node: NodeID, connection: UInt64) {
        let at = now
        if let session = item.sessionID { state.coordinateSent(node: node, sessionID: session, now: at) }
        if let ping = item.pingID { links[connection]?.pings[ping]?.sentAt = at }
    }

    func handle(_ message: ClientMessage, from node: NodeID, connection: UInt64) {
        let at = now
        switch message {
        case .register(let registration):
            guard let link = links[connection] else { return }
            let stun = configuration.stun != nil ? stunAddresses.first : nil
            let wasCurrent = state.peer(node)?.connection == connection
            let actions = state.register(node: node, connection: connection, observed: link.connection.remoteAddress,
                                         registration: registration, stunServer: stun, stunServers: advertisedSTUN,
                                         relayServers: configuration.turn?.servers ?? [], now: at)
            apply(actions.map { grantingTURN($0) })
            if let handshake = link.handshakeRTT, state.peer(node)?.connection == connection, state.peer(node)?.rttSamples == 0 {
                state.provisionalRTT(node: node, rtt: handshake)
            }
            syncDirectory(node)
            if !wasCurrent, state.peer(node)?.connection == connection {
                logger.info("peer registered", metadata: ["peer.node": "\(node.short)",
                                                          "peer.observed": "\(link.connection.remoteAddress)"])
                ping(node, samples: configuration.pingsPerRegistration)
            }
        case .keepAlive:
            let actions = state.keepAlive(node: node, connection: connection, now: at)
            apply(actions)
            // Only an accepted keep-alive earns an RTT sample: a refused one queues nothing but its refusal.
            if actions.contains(where: { if case .send(.keepAliveAck, _, _) = $0 { true } else { false } }) {
                ping(node, samples: 1)
            }
        case .requestPunch(let requestID, let target):
            // Only the connection holding the registration asks: a newer connection whose register was refused
            // (a punch request pipelined behind it) would otherwise coordinate from an older connection's addresses.
            guard let registered = state.peer(node), registered.connection == connection else {
                apply([.send(.error(ErrorReply(requestID: requestID, code: RendezvousError.Code.notRegistered.name,
                                               message: "register on this connection before asking for a punch")),
                             to: node, after: .zero)])
                return
            }
            if let directory, state.peer(target) == nil {
                routePunch(from: node, requestID: requestID, target: target, via: directory)
            } else {
                apply(state.requestPunch(from: node, requestID: requestID, target: target, secret: .random(), now: at))
            }
        case .pong(let id):
            guard let pending = links[connection]?.pings.removeValue(forKey: id), let sent = pending.sentAt else { return }
            state.rttSample(node: node, rtt: at - sent)
            if pending.samplesLeft > 1 { ping(node, samples: pending.samplesLeft - 1) }
        case .coordinateAck(let sessionID):
            apply(state.coordinateAcked(node: node, sessionID: sessionID, now: at))
        case .punchResult(let sessionID, let outcome):
            apply(state.punchResult(node: node, sessionID: sessionID, outcome: outcome))
        }
    }

    func ping(_ node: NodeID, samples: Int) {
        guard samples > 0, let connection = linkByNode[node], let link = links[connection], !link.closing else { return }
        guard link.pings.count < configuration.limits.maxPendingPings else {
            stats.pingsSkipped += 1
            return
        }
        let id = nextPing
        nextPing += 1
        links[connection]?.pings[id] = Ping(queuedAt: now, sentAt: nil, samplesLeft: samples)
        enqueue(.ping(id: id), to: node, after: .zero, pingID: id)
    }

    func apply(_ actions: [RendezvousState.Action]) {
        for action in actions {
            switch action {
            case let .send(message, node, after):
                if case .error = message { stats.refusals += 1 }
                var session: String?
                if case .coordinate(let coordinate) = message { session = coordinate.sessionID }
                enqueue(message, to: node, after: after, sessionID: session)
            case let .close(node, connection, reason):
                syncDirectory(node)
                guard links[connection] != nil else { continue }
                logger.info("peer connection closed", metadata: ["peer.node": "\(node.short)", "reason": "\(reason)"])
                closeSoon(connection, Ending(code: RendezvousCloseCode.replaced, reason: reason))
            case let .sessionStarted(sessionID, initiator, target, nearDelay):
                stats.coordinations += 1
                logger.debug("session started", metadata: [
                    "session.id": "\(sessionID)", "peer.initiator": "\(initiator.short)", "peer.target": "\(target.short)",
                    "session.near_delay": "\(nearDelay)",
                ])
            case let .skewMeasured(sessionID, skew, planned):
                stats.recentSkews.append(skew)
                if stats.recentSkews.count > 64 { stats.recentSkews.removeFirst() }
                logger.info("start skew measured", metadata: [
                    "session.id": "\(sessionID)", "session.skew": "\(skew)", "session.planned_skew": "\(planned)",
                ])
            case let .sessionEnded(sessionID, reason):
                logger.debug("session ended", metadata: ["session.id": "\(sessionID)", "reason": "\(reason)"])
            }
        }
    }

    func enqueue(_ message: ServerMessage, to node: NodeID, after: Duration, sessionID: String? = nil, pingID: UInt64? = nil) {
        guard let id = linkByNode[node], let link = links[id], !link.closing else { return }
        // A peer that does not read its replies must not make the server hold an ever longer queue for it.
        guard link.queued < configuration.limits.maxQueuedFrames else {
            stats.closedForBacklog += 1
            logger.info("peer connection closed", metadata: ["peer.node": "\(node.short)", "reason": "backlog"])
            closeSoon(id, Ending(code: RendezvousCloseCode.backlog, reason: "\(RendezvousError.Code.rateLimited): "
                                 + "\(link.queued) replies queued unread"))
            return
        }
        links[id]?.queued += 1
        stats.largestQueue = max(stats.largestQueue, link.queued + 1)
        link.outbox.yield(Outgoing(frame: RendezvousFraming.frame(message), notBefore: clock.now.advanced(by: after),
                                   sessionID: sessionID, pingID: pingID))
    }

    /// Marks a connection closing (nothing more is handled or queued for it) and closes it from a task, since
    /// this runs in the middle of handling; `serve` cleans up once its read fails.
    private func closeSoon(_ connection: UInt64, _ ending: Ending) {
        guard let link = links[connection], !link.closing else { return }
        links[connection]?.closing = true
        links[connection]?.pings.removeAll()
        link.outbox.finish()
        let quic = link.connection
        Task { await quic.close(errorCode: ending.code, reason: ending.reason) }
    }

    /// Closes a connection `serve` is done with (unless it is closing already).
    func end(connection: UInt64, _ ending: Ending) async {
        guard let link = links[connection], !link.closing else { return }
        links[connection]?.closing = true
        links[connection]?.pings.removeAll()
        link.outbox.finish()
        await link.connection.close(errorCode: ending.code, reason: ending.reason)
    }

    func housekeeping() async {
        while phase == .running {
            guard (try? await clock.sleep(for: configuration.housekeepingInterval)) != nil else { return }
            let at = now
            apply(state.tick(now: at))
            // A ping unanswered for `pingTimeout` is dropped, whether it went out or is still queued behind a
            // peer that does not read.
            let timeout = configuration.limits.pingTimeout
            for (id, link) in links where !link.pings.isEmpty {
                links[id]?.pings = link.pings.filter { at - $0.value.queuedAt < timeout }
            }
        }
    }
}
