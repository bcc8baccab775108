internal import Foundation
import HolePunch
public import HolePunchSTUN
public import Logging
public import ServiceLifecycle
public import HolePunchQUIC
public import HolePunchNet

/// Settings for a ``RendezvousServer``.
public struct RendezvousServerConfiguration: Sendable {
    /// Where the QUIC endpoint listens (port 0 picks one).
    public var listen: SocketAddress
    /// The server's identity; its NodeID is what peers pin (`--rendezvous-id`).
    public var identity: Identity
    /// The STUN responder: nil runs none. Ports given as 0 are chosen by the kernel.
    public var stun: STUNResponderConfiguration?
    /// Registration, session and rate-limit rules.
    public var state: RendezvousState.Configuration
    /// What one peer connection may cost: message rate, queued replies, streams, pings and buffers.
    public var limits: RendezvousLimits
    /// How often registrations and sessions are checked for expiry.
    public var housekeepingInterval: Duration
    /// RTT samples taken right after a registration (one more per keep-alive).
    public var pingsPerRegistration: Int
    /// Test seam: a one-way delay added to the path to a peer, in both directions (the server's writes to it
    /// are held back, and its messages are handled late, by this much). Models a far peer on loopback.
    public var linkDelay: (@Sendable (NodeID) -> Duration)?
    /// Punch requests routed through the ``RendezvousDirectory`` and not answered yet, at most; further ones are
    /// refused with `capacity` (each holds a task until its answer or the directory's timeout).
    public var maxRoutedRequests = 1024

    /// Creates a configuration.
    public init(
        listen: SocketAddress,
        identity: Identity,
        stun: STUNResponderConfiguration? = nil,
        state: RendezvousState.Configuration = .init(),
        limits: RendezvousLimits = .init(),
        housekeepingInterval: Duration = .seconds(1),
        pingsPerRegistration: Int = 4,
        linkDelay: (@Sendable (NodeID) -> Duration)? = nil
    ) {
        self.listen = listen
        self.identity = identity
        self.stun = stun
        self.state = state
        self.limits = limits
        self.housekeepingInterval = housekeepingInterval
        self.pingsPerRegistration = pingsPerRegistration
        self.linkDelay = linkDelay
    }
}

/// What a ``RendezvousServer`` has done so far.
public struct RendezvousStatistics: Sendable, Hashable {
    /// Peers registered now.
    public var registrations = 0
    /// Sessions live now.
    public var sessions = 0
    /// Connections open now.
    public var connections = 0
    /// Sessions created since start.
    public var coordinations = 0
    /// Requests refused (unknown target, rate limit…) since start.
    public var refusals = 0
    /// The most recent measured start skews (newest last, at most 64).
    public var recentSkews: [Duration] = []
    /// STUN datagrams received and answered, if a responder runs.
    public var stunReceived = 0
    /// STUN replies sent.
    public var stunSent = 0
    /// Connections closed since start for sending faster than ``RendezvousLimits/messagesPerSecond``.
    public var closedForRate = 0
    /// Connections closed since start because their reply queue reached ``RendezvousLimits/maxQueuedFrames``.
    public var closedForBacklog = 0
    /// Connections closed since start for an undecodable message or an oversized frame.
    public var closedForProtocol = 0
    /// Streams after the control stream that were reset unread, since start.
    public var streamsRefused = 0
    /// Pings skipped since start because a connection had ``RendezvousLimits/maxPendingPings`` outstanding.
    public var pingsSkipped = 0
    /// RTT pings outstanding now, over all connections.
    public var pendingPings = 0
    /// Replies queued now, over all connections.
    public var queuedFrames = 0
    /// The longest any one connection's reply queue has been since start.
    public var largestQueue = 0
    /// Punch requests for peers held by other instances that were coordinated through the directory, since start.
    public var routedCoordinations = 0
    /// The most recent round trips of routed requests through the directory (newest last, at most 64).
    public var recentDirectoryRoundTrips: [Duration] = []
    /// The sum of every routed coordination's round trip through the directory, since start (over
    /// ``routedCoordinations``: the mean).
    public var directoryRoundTripTotal = Duration.zero
    /// Registrations dropped since start because another instance registered the same NodeID later.
    public var movedAway = 0
}

/// The rendezvous: a QUIC server on our stack that registers peers and coordinates their punches.
///
/// Peers dial it from their punch socket, so `QUICConnection.remoteAddress` is the punch mapping, and the
/// TLS handshake proves their NodeID. Each peer opens one bidirectional control stream carrying
/// length-prefixed JSON (`ClientMessage` in, ``ServerMessage`` out). The protocol logic lives in
/// ``RendezvousState``; this actor only does I/O, timers and RTT pings.
///
/// Lifecycle: ``bind(configuration:logger:)`` binds the sockets (so callers learn the real ports), ``run()``
/// serves until ``shutdown()``, task cancellation or a ServiceLifecycle graceful shutdown.
public actor RendezvousServer: Service {
    private enum Phase { case bound, running, stopped }

    /// The QUIC endpoint peers connect to.
    public nonisolated let endpoint: Endpoint
    /// The server's NodeID.
    public nonisolated let nodeID: NodeID
    /// The QUIC listen address (with the real port).
    public nonisolated let address: SocketAddress
    /// The STUN responder's bound addresses (primary first), empty when none runs.
    public nonisolated let stunAddresses: [SocketAddress]

    private let configuration: RendezvousServerConfiguration
    private let stunServer: STUNServer?
    private let logger: Logger
    private let clock = ContinuousClock()
    private let origin: ContinuousClock.Instant
    private var phase = Phase.bound
    private var state: RendezvousState
    private var links: [UInt64: Link] = [:]
    private var linkByNode: [NodeID: UInt64] = [:]
    private var nextConnection: UInt64 = 1
    private var nextPing: UInt64 = 1
    private var stats = RendezvousStatistics()
    private var stopWaiters: [CheckedContinuation<Void, Never>] = []
    /// The cluster's directory, if this instance is one of several (see ``use(directory:)``).
    private var directory: (any RendezvousDirectory)?
    /// NodeIDs announced to the directory, with their registration's wall-clock time in milliseconds.
    private var announced: [NodeID: Int64] = [:]
    /// The latest round trip of a routed request (sent with the next one, so the holder can plan for it).
    private var directoryRTT = Duration.zero
    private var routedInFlight = 0

    /// One peer connection, the queue its writer drains and everything else it may cost (each bounded by
    /// ``RendezvousLimits``).
    private struct Link {
        var node: NodeID
        var connection: QUICConnection
        var outbox: AsyncStream<Outgoing>.Continuation
        /// Frames in `outbox` the writer has not taken yet.
        var queued = 0
        /// Every message the peer sends takes a token.
        var messages: TokenBucket
        /// RTT pings sent on this connection and not answered yet, by ping id.
        var pings: [UInt64: Ping] = [:]
        /// Set once the server decided to close it: nothing more is read, handled or queued.
        var closing = false
        /// The QUIC handshake's RTT (plus any injected path delay both ways), the registration's provisional RTT.
        var handshakeRTT: Duration?
    }

    /// An RTT ping in flight: `sentAt` is nil until the writer hands it to QUIC.
    private struct Ping {
        var queuedAt: Duration
        var sentAt: Duration?
        var samplesLeft: Int
    }

    /// A frame to write once `notBefore` has passed; the session id marks coordinate messages.
    private struct Outgoing: Sendable {
        var frame: [UInt8]
        var notBefore: ContinuousClock.Instant
        var sessionID: String?
        var pingID: UInt64?
    }

    /// Binds the QUIC endpoint and the STUN sockets; nothing runs until ``run()``.
    ///
    /// - Throws: ``RendezvousError`` `connectionFailed` when a socket cannot be bound.
    public static func bind(
        configuration: RendezvousServerConfiguration,
        logger: Logger = Logger(label: "holepunch.rendezvous", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws(RendezvousError) -> RendezvousServer {
        let endpoint: Endpoint
        do {
            let limits = configuration.limits
            endpoint = try await Endpoint.bind(
                configuration.listen,
                configuration: EndpointConfiguration(
                    identity: configuration.identity, acceptPolicy: .any, keepAliveInterval: nil,
                    streamReceiveWindow: limits.streamReceiveWindow, connectionReceiveWindow: limits.connectionReceiveWindow,
                    maxIncomingStreams: max(1, limits.streamsPerConnection), streamSendBuffer: limits.streamSendBuffer,
                    maxConnections: limits.maxConnections),
                logger: logger
            )
        } catch {
            throw RendezvousError(.connectionFailed, "cannot listen on \(configuration.listen): \(error)")
        }
        var stun: STUNServer?
        if let stunConfiguration = configuration.stun {
            do {
                stun = try STUNServer(configuration: stunConfiguration)
            } catch {
                await endpoint.close()
                throw RendezvousError(.connectionFailed, "cannot bind the STUN responder: \(error)")
            }
        }
        return RendezvousServer(endpoint: endpoint, stun: stun, configuration: configuration, logger: logger)
    }

    private init(endpoint: Endpoint, stun: STUNServer?, configuration: RendezvousServerConfiguration, logger: Logger) {
        self.endpoint = endpoint
        self.nodeID = endpoint.nodeID
        self.address = endpoint.localAddress
        self.stunServer = stun
        self.stunAddresses = stun?.localAddresses ?? []
        self.configuration = configuration
        self.logger = logger
        self.state = RendezvousState(configuration: configuration.state)
        self.origin = ContinuousClock.now
    }

    /// Serves until ``shutdown()``, cancellation, or graceful shutdown; then closes every connection and socket.
    ///
    /// - Throws: ``RendezvousError`` `shuttingDown` when the server already ran.
    public func run() async throws {
        guard phase == .bound else { throw RendezvousError(.shuttingDown, "the server has already run") }
        phase = .running
        do { try stunServer?.start() } catch {
            logger.info("stun responder failed to start", metadata: ["error": "\(error)"])
        }
        logger.info("rendezvous listening", metadata: ["rendezvous.address": "\(address)", "rendezvous.node": "\(nodeID)"])
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await withDiscardingTaskGroup { group in
                    group.addTask { await self.housekeeping() }
                    for await connection in self.endpoint.incoming {
                        group.addTask { await self.serve(connection) }
                    }
                    // The endpoint closed: stop the timers and any connection still being served.
                    group.cancelAll()
                }
            } onCancel: {
                Task { await self.shutdown() }
            }
        } onGracefulShutdown: {
            Task { await self.shutdown() }
        }
        await shutdown()
    }

    /// Stops serving: closes every connection, the endpoint and the STUN sockets. Idempotent.
    public func shutdown() async {
        guard phase != .stopped else { return }
        phase = .stopped
        await directory?.close()
        for link in links.values { link.outbox.finish() }
        await endpoint.close()
        stunServer?.stop()
        for waiter in stopWaiters { waiter.resume() }
        stopWaiters.removeAll()
    }

    /// Current counters.
    public func statistics() -> RendezvousStatistics {
        var snapshot = stats
        snapshot.registrations = state.registrationCount
        snapshot.sessions = state.sessionCount
        snapshot.connections = links.count
        snapshot.pendingPings = links.values.reduce(0) { $0 + $1.pings.count }
        snapshot.queuedFrames = links.values.reduce(0) { $0 + $1.queued }
        if let stun = stunServer?.statistics {
            snapshot.stunReceived = stun.received
            snapshot.stunSent = stun.sent
        }
        return snapshot
    }

    /// The server's RTT estimate for a registered peer (for tests and monitoring).
    public func rtt(of node: NodeID) -> Duration? { state.peer(node)?.rtt }

    /// How many RTT samples the server has for `node` (0 when unregistered).
    public func rttSamples(of node: NodeID) -> Int { state.peer(node)?.rttSamples ?? 0 }

    /// Whether `node` is registered.
    public func isRegistered(_ node: NodeID) -> Bool { state.peer(node) != nil }

    // MARK: Cluster

    /// Makes this instance one of a cluster: registrations are announced to `directory`, and punch requests for
    /// NodeIDs held elsewhere are routed through it. Call before ``run()``; without it the server is a single
    /// instance, exactly as before.
    public func use(directory: any RendezvousDirectory) {
        self.directory = directory
        directory.attach(self)
    }

    /// Answers a punch request another instance routed here (``RendezvousDirectory``): the target's coordinate
    /// is queued here, the initiator's is returned for the requesting instance to send.
    public func answerRemotePunch(_ request: RemotePunchRequest) -> RemotePunchReply {
        guard phase == .running else {
            return .refused(ErrorReply(requestID: request.requestID, code: RendezvousError.Code.shuttingDown.name,
                                       message: "the instance holding the target is shutting down"))
        }
        let (actions, reply) = state.acceptRemotePunch(request, now: now)
        apply(actions)
        return reply
    }

    /// Another instance registered `node` at `claimedAt` (wall-clock milliseconds). If this instance's registration
    /// is not newer it is dropped (the peer moved); if it is newer, it is announced again so that the other drops.
    public func moved(_ node: NodeID, claimedAt: Int64) {
        guard let since = announced[node], let directory else { return }
        if since > claimedAt {
            directory.registered(node, since: since)
            return
        }
        stats.movedAway += 1
        logger.info("peer moved to another instance", metadata: ["peer.node": "\(node.short)"])
        apply(state.moved(node))
    }

    /// The NodeIDs this instance announced, with their registration times (a directory re-announces them after
    /// it reconnected).
    public func announcedRegistrations() -> [NodeID: Int64] { announced }

    /// Tells the directory whether `node` is held here now, if that changed.
    private func syncDirectory(_ node: NodeID) {
        guard let directory else { return }
        let holds = state.peer(node) != nil
        if holds, announced[node] == nil {
            let since = Int64(Date().timeIntervalSince1970 * 1000)
            announced[node] = since
            directory.registered(node, since: since)
        } else if !holds, announced.removeValue(forKey: node) != nil {
            directory.unregistered(node)
        }
    }

    /// A punch request for a NodeID not held here: the requester's checks run here, the rest at the instance the
    /// directory finds.
    private func routePunch(from node: NodeID, requestID: UInt64, target: NodeID, via directory: any RendezvousDirectory) {
        switch state.prepareRemotePunch(from: node, requestID: requestID, target: target, secret: .random(),
                                        directoryRTT: directoryRTT, now: now) {
        case .refused(let actions):
            apply(actions)
        case .forward(let request):
            guard routedInFlight < configuration.maxRoutedRequests else {
                apply([.send(.error(ErrorReply(requestID: requestID, code: RendezvousError.Code.capacity.name,
                                               message: "too many punch requests routed to other instances; retry later")),
                             to: node, after: .zero)])
                return
            }
            routedInFlight += 1
            Task { await self.finishRoute(request, via: directory) }
        }
    }

    private func finishRoute(_ request: RemotePunchRequest, via directory: any RendezvousDirectory) async {
        let sent = clock.now
        let result: Result<RemotePunchReply, RendezvousError>
        do { result = .success(try await directory.requestPunch(request)) } catch { result = .failure(error) }
        routedInFlight -= 1
        let roundTrip = sent.duration(to: clock.now)
        guard phase == .running else { return }
        func refuse(_ code: String, _ message: String) {
            apply([.send(.error(ErrorReply(requestID: request.requestID, code: code, message: message)),
                         to: request.initiator, after: .zero)])
        }
        switch result {
        case .failure(let error) where error.code == .unknownTarget:
            refuse(error.code.name, "no peer \(request.target) is registered at any rendezvous instance")
        case .failure(let error):
            refuse(error.code.name, error.message)
        case .success(.refused(let reply)):
            refuse(reply.code, reply.message)
        case let .success(.coordinate(coordinate, delay)):
            guard coordinate.requestID == request.requestID, coordinate.sessionID == request.sessionID,
                  coordinate.sessionKey == request.sessionKey, coordinate.peer == request.target,
                  coordinate.role == .initiator else {
                refuse(RendezvousError.Code.protocolViolation.name, "the instance holding the target answered another request")
                return
            }
            directoryRTT = roundTrip
            stats.recentDirectoryRoundTrips.append(roundTrip)
            if stats.recentDirectoryRoundTrips.count > 64 { stats.recentDirectoryRoundTrips.removeFirst() }
            stats.routedCoordinations += 1
            stats.directoryRoundTripTotal += roundTrip
            // The holder planned for the round trip we sent; the part of this one beyond it is already spent.
            let planned = Duration.microseconds(delay) + (Duration.microseconds(request.directoryRTTMicroseconds) - roundTrip) / 2
            enqueue(.coordinate(coordinate), to: request.initiator, after: max(.zero, planned))
        }
    }

    // MARK: Connections

    private var now: Duration { origin.duration(to: clock.now) }

    /// Why the server ends a connection: the QUIC application code and reason it closes with.
    private struct Ending {
        var code: UInt64
        var reason: String
        static let normal = Ending(code: 0, reason: "")
    }

    private func serve(_ connection: QUICConnection) async {
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
    private func read(_ stream: QUICStream, node: NodeID, connection: UInt64, pathDelay: Duration) async -> Ending {
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

    private func write(_ outbox: AsyncStream<Outgoing>, to stream: QUICStream, node: NodeID, connection: UInt64,
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

    private func handle(_ message: ClientMessage, from node: NodeID, connection: UInt64) {
        let at = now
        switch message {
        case .register(let registration):
            guard let link = links[connection] else { return }
            let stun = configuration.stun != nil ? stunAddresses.first : nil
            let wasCurrent = state.peer(node)?.connection == connection
            let actions = state.register(node: node, connection: connection, observed: link.connection.remoteAddress,
                                         registration: registration, stunServer: stun, now: at)
            apply(actions)
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

    private func ping(_ node: NodeID, samples: Int) {
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

    private func apply(_ actions: [RendezvousState.Action]) {
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

    private func enqueue(_ message: ServerMessage, to node: NodeID, after: Duration, sessionID: String? = nil, pingID: UInt64? = nil) {
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
    private func end(connection: UInt64, _ ending: Ending) async {
        guard let link = links[connection], !link.closing else { return }
        links[connection]?.closing = true
        links[connection]?.pings.removeAll()
        link.outbox.finish()
        await link.connection.close(errorCode: ending.code, reason: ending.reason)
    }

    private func housekeeping() async {
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

extension RendezvousServer {
    /// Runs the server in a ServiceLifecycle `ServiceGroup` that shuts it down gracefully on SIGTERM or SIGINT
    /// (what `holepunch rendezvous` does), and returns once it has stopped.
    ///
    /// - Throws: whatever ``run()`` or the group throws.
    public func runUntilSignalled(logger: Logger) async throws {
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: [.init(service: self)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
