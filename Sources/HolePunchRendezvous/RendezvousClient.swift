public import HolePunch
public import HolePunchSTUN
public import Logging
import Synchronization

/// Who may make this peer punch: asked, with the requester's NodeID, for every target-role coordinate message
/// before a punch starts. A refused request starts nothing (no probe leaves), and the rendezvous is told the
/// outcome `refused`.
///
/// The decision runs on the client's message loop, so it should answer quickly (a lookup, not a network call).
public struct PunchAdmission: Sendable {
    private let decide: @Sendable (NodeID) async -> Bool

    /// An admission decided by `decide` (true admits).
    public init(_ decide: @escaping @Sendable (NodeID) async -> Bool) {
        self.decide = decide
    }

    /// Whether `peer` may make this side punch.
    public func admits(_ peer: NodeID) async -> Bool {
        await decide(peer)
    }

    /// Every registered peer may (the default: a public rendezvous's peers are strangers, but the punched
    /// connection still has to prove the NodeID the rendezvous named).
    public static let any = PunchAdmission { _ in true }
    /// No one may: this peer only punches out.
    public static let none = PunchAdmission { _ in false }
    /// Only these NodeIDs may.
    public static func allowList(_ nodes: Set<NodeID>) -> PunchAdmission {
        PunchAdmission { nodes.contains($0) }
    }
}

/// Settings for a ``RendezvousClient``.
public struct RendezvousClientConfiguration: Sendable {
    /// The rendezvous's QUIC address.
    public var server: SocketAddress
    /// The rendezvous's NodeID: the handshake must prove it.
    public var serverNodeID: NodeID
    /// How long to wait for the rendezvous to answer a register or punch request.
    public var requestTimeout: Duration
    /// The strategy for this client's punches; nil uses the executor's.
    public var strategy: (any PunchStrategy)?
    /// An overall limit on each punch; nil keeps the plan's.
    public var punchTimeout: Duration?
    /// Whether target-role coordinate messages start punches (true), or are only acknowledged and counted in
    /// ``RendezvousClient/targetCoordinates`` (false: load tests of the rendezvous itself).
    public var acceptsPunches = true
    /// Who may make this peer punch (target role); ``PunchAdmission/any`` by default.
    public var admission = PunchAdmission.any
    /// The application protocol (TLS ALPN) the rendezvous speaks, whatever protocols the punch endpoint serves.
    public var alpn = "holepunch/1"
    /// NAT discovery that ``RendezvousClient/connect(_:)`` starts once registered, in the background
    /// (``RendezvousClient/startNATDiscovery(server:configuration:)``), when the registration carries no NAT profile
    /// and a STUN server is known (``natDiscoveryServer``, else the rendezvous's); nil (the default) starts none.
    ///
    /// Registration never waits for it: discovery waits out its filtering tests (seconds behind a filtering NAT),
    /// while the rendezvous observes the mapped address on its own. Until it ends, punches plan with the profile
    /// the registration carried (unknown); afterwards the client registers again with the measured profile.
    public var backgroundNATDiscovery: NATDiscovery.Configuration?
    /// The STUN server background discovery measures against; nil uses the one the rendezvous advertises.
    public var natDiscoveryServer: SocketAddress?

    /// Creates a configuration.
    public init(
        server: SocketAddress, serverNodeID: NodeID, requestTimeout: Duration = .seconds(10),
        strategy: (any PunchStrategy)? = nil, punchTimeout: Duration? = nil
    ) {
        self.server = server
        self.serverNodeID = serverNodeID
        self.requestTimeout = requestTimeout
        self.strategy = strategy
        self.punchTimeout = punchTimeout
    }
}

/// A coordinate message as this peer received it, with the instants derived from its receipt.
public struct ReceivedCoordinate: Sendable {
    /// The message.
    public var coordinate: Coordinate
    /// When it was decoded here (monotonic clock).
    public var receivedAt: ContinuousClock.Instant
    /// When probing starts: ``receivedAt`` plus the coordinate's start delay.
    public var startAt: ContinuousClock.Instant { receivedAt.advanced(by: coordinate.startDelay) }
}

/// A punch the rendezvous asked this peer to accept (the target role), already started.
public struct IncomingPunch: Sendable {
    /// The coordinate message that started it.
    public var coordinate: ReceivedCoordinate
    /// The running punch: live events and the result.
    public var handle: PunchHandle
}

/// A peer's side of the rendezvous, on the peer's punch `Endpoint` and its `PunchExecutor`.
///
/// The client dials the rendezvous from the punch socket (so the server sees the punch mapping), opens one
/// control stream, registers and keeps the registration alive. ``requestPunch(to:alpn:)`` asks for a punch and runs
/// it as the initiator; coordinate messages for the target role start punches on their own, announced on
/// ``incomingPunches`` and, once connected, on ``incoming``. Pings are answered and coordinate messages acked
/// at once, which is what lets the server time the clock-free start.
public actor RendezvousClient {
    /// The executor punches run on.
    public nonisolated let executor: PunchExecutor
    /// Connections punched for the target role.
    public nonisolated let incoming: AsyncStream<QUICConnection>
    /// Target-role punches as they start (with live events).
    public nonisolated let incomingPunches: AsyncStream<IncomingPunch>

    private let configuration: RendezvousClientConfiguration
    private let logger: Logger
    private let incomingContinuation: AsyncStream<QUICConnection>.Continuation
    private let punchesContinuation: AsyncStream<IncomingPunch>.Continuation
    private var connection: QUICConnection?
    private var stream: QUICStream?
    /// Work this client started and cancels on close; each entry removes itself when it ends, so a long-lived
    /// client that is asked for many punches does not keep one task per punch forever.
    private var tasks: [UInt64: Task<Void, Never>] = [:]
    private var nextTaskID: UInt64 = 0
    private var nextRequest: UInt64 = 1
    private var registerWaiter: CheckedContinuation<Result<Registered, RendezvousError>, Never>?
    /// Counts register calls, so a cancelled one never ends the wait of a newer one that superseded it.
    private var registerGeneration: UInt64 = 0
    private var requestWaiters: [UInt64: CheckedContinuation<Result<ReceivedCoordinate, RendezvousError>, Never>] = [:]
    /// A punch request to write right behind the next register, in the same write (``connect(_:coordinatingWith:)``).
    private var pipelinedRequest: ClientMessage?
    /// Pipelined requests whose answer may arrive before anyone waits for it (the register's confirmation comes
    /// first, and the coordinate can follow before ``connect(_:coordinatingWith:)`` resumes), and those answers.
    private var pipelinedIDs: Set<UInt64> = []
    private var unclaimedAnswers: [UInt64: Result<ReceivedCoordinate, RendezvousError>] = [:]
    private var closedReason: RendezvousError?
    private var localNAT: NATProfile = .unknown
    /// The latest registration sent, so that a profile refinement keeps its LAN addresses.
    private var lastRegistration = Registration()
    private var natDiscovery: Task<Result<NATBehaviour, RendezvousError>, Never>?
    /// Target-role coordinate messages received so far.
    public private(set) var targetCoordinates = 0
    /// Target-role coordinate messages refused so far (by ``RendezvousClientConfiguration/admission``, or because
    /// none of the requester's candidates may be probed).
    public private(set) var refusedCoordinates = 0
    /// Messages from the rendezvous dropped because they failed validation (``RendezvousMessageLimits``).
    public private(set) var invalidMessages = 0
    /// The last confirmation from the server.
    public private(set) var registered: Registered?

    /// Creates a client; nothing is sent until ``connect(_:)``.
    public init(
        executor: PunchExecutor, configuration: RendezvousClientConfiguration,
        logger: Logger = Logger(label: "holepunch.rendezvous.client", factory: { _ in SwiftLogNoOpLogHandler() })
    ) {
        self.executor = executor
        self.configuration = configuration
        self.logger = logger
        (incoming, incomingContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
        // Newest 64: an app that never reads the stream must not make it grow with every punch a peer asks for.
        (incomingPunches, punchesContinuation) = AsyncStream.makeStream(of: IncomingPunch.self, bufferingPolicy: .bufferingNewest(64))
    }

    /// This peer's NodeID.
    public nonisolated var nodeID: NodeID { executor.endpoint.nodeID }

    /// Dials the rendezvous from the punch socket, opens the control stream and registers.
    ///
    /// - Returns: the server's confirmation with the observed (public) address.
    /// - Throws: ``RendezvousError`` `connectionFailed`, `timeout`, `disconnected`, `cancelled` or a refusal code.
    public func connect(_ registration: Registration = Registration()) async throws(RendezvousError) -> Registered {
        guard connection == nil else { return try await register(registration) }
        do {
            let quic = try await executor.endpoint.connect(to: configuration.server, expecting: configuration.serverNodeID,
                                                           options: ConnectOptions(handshakeTimeout: configuration.requestTimeout,
                                                                                   alpn: configuration.alpn,
                                                                                   // The register leaves with our Finished.
                                                                                   returnsBeforeConfirmation: true))
            connection = quic
            stream = try await quic.openStream()
        } catch {
            if Task.isCancelled { throw RendezvousError(.cancelled, "connecting to the rendezvous was cancelled") }
            throw RendezvousError(.connectionFailed, "cannot reach the rendezvous at \(configuration.server): \(error)")
        }
        let reader = Task { await self.readLoop() }
        track(reader)
        let confirmed = try await register(registration)
        track(Task { await self.keepAliveLoop() })
        if let discovery = configuration.backgroundNATDiscovery, registration.nat == nil,
           let stun = configuration.natDiscoveryServer ?? confirmed.stunServer {
            startNATDiscovery(server: stun, configuration: discovery)
        }
        return confirmed
    }

    /// Dials the rendezvous, registers and asks for a punch to `target` in one flight: the punch request is
    /// written right behind the register, on the same stream, so the rendezvous (which handles a stream's
    /// messages in order) coordinates as soon as it has registered this peer, without a round trip between.
    /// A client that is already connected registers again and asks only once that register is confirmed: the
    /// rendezvous would coordinate a request written behind a refused re-register from the earlier registration.
    ///
    /// Cancelling the calling task ends the wait for the coordinate message with `cancelled`.
    ///
    /// - Returns: the server's confirmation and this side's coordinate message (start it with
    ///   ``startPunch(_:alpn:)``).
    /// - Throws: ``RendezvousError``: as ``connect(_:)``, then as ``coordinate(to:)``.
    public func connect(_ registration: Registration = Registration(), coordinatingWith target: NodeID)
        async throws(RendezvousError) -> (registered: Registered, coordinate: ReceivedCoordinate)
    {
        if connection != nil {
            // A refused re-register leaves the earlier registration in force, so a request written behind it would
            // still be coordinated (the target told to punch) while the caller hears only the register's error.
            let confirmed = try await register(registration)
            return (confirmed, try await coordinate(to: target))
        }
        let id = nextRequest
        nextRequest += 1
        pipelinedIDs.insert(id)
        pipelinedRequest = .requestPunch(requestID: id, target: target)
        defer {
            pipelinedIDs.remove(id)
            unclaimedAnswers[id] = nil
        }
        let confirmed: Registered
        do {
            confirmed = try await connect(registration)
        } catch {
            pipelinedRequest = nil
            throw error
        }
        let received = try await awaitCoordinate(id) { _ in }
        return (confirmed, received)
    }

    /// Registers again with new LAN addresses or NAT profile (the NodeID and observed address stay).
    ///
    /// Cancelling the calling task ends the wait at once with `cancelled`.
    ///
    /// - Throws: ``RendezvousError``.
    public func register(_ registration: Registration) async throws(RendezvousError) -> Registered {
        if let closedReason { throw closedReason }
        guard !Task.isCancelled else { throw RendezvousError(.cancelled, "the registration was cancelled") }
        if let nat = registration.nat { localNAT = nat }
        lastRegistration = registration
        registerGeneration += 1
        let generation = registerGeneration
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<Registered, RendezvousError>, Never>) in
                registerWaiter?.resume(returning: .failure(RendezvousError(.protocolViolation, "superseded by a newer register")))
                registerWaiter = continuation
                armTimeout { client in
                    // Only this call's wait: a newer register has its own timeout.
                    guard client.registerGeneration == generation else { return }
                    client.registerWaiter?.resume(returning: .failure(RendezvousError(.timeout, "the rendezvous did not confirm the registration")))
                    client.registerWaiter = nil
                }
                // A pipelined punch request leaves in the same write, so it cannot overtake the register.
                let messages = [ClientMessage.register(registration)] + [pipelinedRequest].compactMap { $0 }
                pipelinedRequest = nil
                Task { await self.send(messages) }
            }
        } onCancel: {
            // Runs on the actor after the waiter above is stored (the body holds the actor until it suspends).
            Task { await self.abandonRegister(generation) }
        }
        let confirmed = try result.get()
        registered = confirmed
        return confirmed
    }

    /// Asks the rendezvous to coordinate a punch to `target` and waits for this side's coordinate message.
    ///
    /// Cancelling the calling task ends the wait at once with `cancelled`.
    ///
    /// - Throws: ``RendezvousError`` (`unknownTarget`, `rateLimited`, `timeout`, `disconnected`, `cancelled`…).
    public func coordinate(to target: NodeID) async throws(RendezvousError) -> ReceivedCoordinate {
        let id = nextRequest
        nextRequest += 1
        return try await awaitCoordinate(id) { client in
            Task { await client.send([.requestPunch(requestID: id, target: target)]) }
        }
    }

    /// Waits for the answer to punch request `id`; `send` runs once the waiter is in place (an answer to a
    /// pipelined request may already be here).
    private func awaitCoordinate(_ id: UInt64, send: @escaping (isolated RendezvousClient) -> Void)
        async throws(RendezvousError) -> ReceivedCoordinate
    {
        if let early = unclaimedAnswers.removeValue(forKey: id) { return try early.get() }
        if let closedReason { throw closedReason }
        guard !Task.isCancelled else { throw RendezvousError(.cancelled, "the punch request was cancelled") }
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<ReceivedCoordinate, RendezvousError>, Never>) in
                requestWaiters[id] = continuation
                armTimeout { client in
                    client.requestWaiters.removeValue(forKey: id)?.resume(returning: .failure(
                        RendezvousError(.timeout, "the rendezvous did not answer the punch request")))
                }
                send(self)
            }
        } onCancel: {
            // Runs on the actor after the waiter above is stored (the body holds the actor until it suspends).
            Task { await self.abandonRequest(id) }
        }
        return try result.get()
    }

    /// Ends the wait of the `generation`th register call, unless a newer call has already superseded it.
    private func abandonRegister(_ generation: UInt64) {
        guard generation == registerGeneration, let waiter = registerWaiter else { return }
        registerWaiter = nil
        waiter.resume(returning: .failure(RendezvousError(.cancelled, "the registration was cancelled")))
    }

    private func abandonRequest(_ id: UInt64) {
        requestWaiters.removeValue(forKey: id)?.resume(returning: .failure(
            RendezvousError(.cancelled, "the punch request was cancelled")))
    }

    /// Starts the punch a coordinate message describes, on the executor; the outcome is reported to the server.
    ///
    /// When none of the peer's candidates may be probed (`CandidateFilter`), nothing starts: the handle fails
    /// at once with `refused`.
    ///
    /// - Parameters:
    ///   - received: the coordinate message, as ``coordinate(to:)`` returned it.
    ///   - alpn: the protocol the initiator dials with; nil uses the endpoint's.
    public func startPunch(_ received: ReceivedCoordinate, alpn: String? = nil) async -> PunchHandle {
        let handle: PunchHandle
        do {
            var options = try options(for: received)
            options.alpn = alpn
            handle = await executor.startPunch(options)
        } catch {
            logger.info("punch refused: no candidate may be probed", metadata: [
                "peer.node": "\(received.coordinate.peer.short)", "session.id": "\(received.coordinate.sessionID)",
            ])
            if received.coordinate.role == .target { refusedCoordinates += 1 }
            handle = .failed(error)
        }
        let session = received.coordinate.sessionID
        track(Task {
            let outcome: String
            switch await handle.result() {
            case .success: outcome = "connected"
            case .failure(let error): outcome = error.code.rawValue
            }
            await self.send(.punchResult(sessionID: session, outcome: outcome))
        })
        return handle
    }

    /// Requests a punch to `target`, runs it as the initiator and returns the authenticated connection.
    ///
    /// Cancelling the calling task cancels the request or the punch (probes, timers and extra sockets stop) and
    /// throws `cancelled`.
    ///
    /// A punch that planned before background discovery ended (unknown profile) and failed is tried once more
    /// when discovery has since measured a profile (``profileRefined(since:after:)``).
    ///
    /// - Parameters:
    ///   - target: the peer's NodeID; the connection proves it in the TLS handshake.
    ///   - alpn: the application protocol to dial with; nil uses the endpoint's.
    /// - Throws: ``RendezvousError``: a rendezvous code (`unknownTarget`, `rateLimited`, `timeout`…) when the
    ///   rendezvous refuses or fails; the punch's code with ``RendezvousError/punch`` set when the punch fails.
    public func requestPunch(to target: NodeID, alpn: String? = nil) async throws(RendezvousError) -> QUICConnection {
        let planned = localNAT
        do throws(RendezvousError) {
            return try await punchOnce(to: target, alpn: alpn)
        } catch {
            guard let punch = error.punch, !Task.isCancelled, await profileRefined(since: planned, after: punch) else {
                throw error
            }
        }
        return try await punchOnce(to: target, alpn: alpn)
    }

    /// One coordinate and one punch; task cancellation cancels either.
    private func punchOnce(to target: NodeID, alpn: String?) async throws(RendezvousError) -> QUICConnection {
        let received = try await coordinate(to: target)
        let handle = await startPunch(received, alpn: alpn)
        let id = handle.id
        let executor = self.executor
        // Also fires at once when the task was cancelled while the punch was being started.
        let result = await withTaskCancellationHandler {
            await handle.result()
        } onCancel: {
            Task { await executor.cancel(id) }
        }
        return try result.mapError { RendezvousError(punch: $0) }.get()
    }

    /// Whether a punch that planned with `planned` and failed with `error` is worth one more attempt: it planned
    /// with an unknown profile while background discovery ran, failed for want of a path (`allPortsFailed`,
    /// `timeout`), and discovery, awaited here, has since measured a profile. Some pairs need it: a NAT that
    /// allocates randomly punches through a port-restricted one only when its side knows to open many sockets.
    public func profileRefined(since planned: NATProfile, after error: PunchError) async -> Bool {
        guard planned == .unknown, error.code == .allPortsFailed || error.code == .timeout,
              let discovery = natDiscovery else { return false }
        guard case .success = await discovery.value else { return false }
        return localNAT != planned
    }

    /// Runs RFC 5780 NAT behaviour discovery from the punch socket against `server` (by default the STUN
    /// responder the rendezvous advertised), and remembers the profile for later punches.
    ///
    /// Extra sockets for the allocation test bind to the punch socket's IP, port 0.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` when no STUN server is known; `CancellationError`.
    public func discoverNAT(server: SocketAddress? = nil, configuration discovery: NATDiscovery.Configuration = .init())
        async throws -> NATBehaviour
    {
        guard let target = server ?? registered?.stunServer else {
            throw RendezvousError(.protocolViolation, "the rendezvous advertises no STUN responder; pass one")
        }
        let transport = EndpointSTUNTransport(endpoint: executor.endpoint)
        await transport.install(executor: executor)
        defer { transport.finish() }
        let local = executor.endpoint.localAddress
        let fresh = SocketAddress(ip: local.ip, port: 0)
        let client = NATDiscoveryClient(server: target, transport: transport,
                                        makeExtraTransport: { try UDPSTUNTransport(binding: fresh) },
                                        configuration: discovery)
        let behaviour = try await client.run()
        localNAT = NATProfile(behaviour)
        return behaviour
    }

    /// Starts ``discoverNAT(server:configuration:)`` in the background and, when it ends, registers again with
    /// the measured profile (and the latest registration's LAN addresses), so that punches coordinated from then
    /// on carry it. Returns at once; ``natDiscoveryResult()`` waits for the outcome. A discovery already started
    /// is kept (this call then does nothing).
    ///
    /// Punches may start meanwhile: they plan with the profile known so far (unknown unless registered with one).
    /// Discovery shares the punch socket with them; its mapping tests come last, seconds in, by which time a punch
    /// between easy NATs has long connected.
    public func startNATDiscovery(server: SocketAddress? = nil, configuration discovery: NATDiscovery.Configuration = .init()) {
        guard natDiscovery == nil else { return }
        natDiscovery = Task { () -> Result<NATBehaviour, RendezvousError> in
            let behaviour: NATBehaviour
            do {
                behaviour = try await self.discoverNAT(server: server, configuration: discovery)
            } catch let error as RendezvousError {
                return .failure(error)
            } catch {
                return .failure(RendezvousError(.disconnected, "NAT discovery stopped: \(error)"))
            }
            do throws(RendezvousError) {
                _ = try await self.refineRegistration(with: NATProfile(behaviour))
            } catch {
                return .failure(error)
            }
            return .success(behaviour)
        }
    }

    /// The outcome of the discovery ``startNATDiscovery(server:configuration:)`` (or ``connect(_:)``, with
    /// ``RendezvousClientConfiguration/backgroundNATDiscovery``) started, once it and the registration that
    /// publishes its profile have ended; nil when none was started.
    public func natDiscoveryResult() async -> Result<NATBehaviour, RendezvousError>? {
        await natDiscovery?.value
    }

    /// The NAT profile this client's punches plan with: the registered or discovered one, unknown until either.
    public var natProfile: NATProfile { localNAT }

    /// Registers again with the latest registration's LAN addresses and `profile`.
    private func refineRegistration(with profile: NATProfile) async throws(RendezvousError) -> Registered {
        var update = lastRegistration
        update.nat = profile
        return try await register(update)
    }

    /// Closes the control connection and ends ``incoming``; running punches continue to their end.
    public func close() async {
        natDiscovery?.cancel()
        fail(RendezvousError(.disconnected, "the client was closed"))
        for task in tasks.values { task.cancel() }
        tasks.removeAll()
        await connection?.close()
    }

    // MARK: Internals

    /// Turns a coordinate message into punch options: which candidate to dial, when to start, what to expect.
    ///
    /// Candidate rule: only candidates ``CandidateFilter`` permits (our family; never loopback, link-local,
    /// multicast, broadcast or unspecified addresses unless our rendezvous is in that scope; LAN addresses only
    /// when private and the peer shares our public IP). Of those, the peer's observed address, unless it shares
    /// our public IP (same NAT, where hairpinning may be unsupported) and a LAN address survived, which is then
    /// used instead.
    ///
    /// - Throws: ``PunchError`` `refused` when no candidate may be probed.
    func options(for received: ReceivedCoordinate) throws(PunchError) -> PunchOptions {
        let coordinate = received.coordinate
        let filter = CandidateFilter(rendezvous: configuration.server, ourObserved: registered?.observedAddress,
                                     ipv6: executor.endpoint.localAddress.isIPv6)
        let usable = filter.permitted(coordinate.candidates)
        guard var chosen = usable.first else {
            throw PunchError(code: .refused, message: "none of the peer's candidates may be probed from here: "
                             + coordinate.candidates.prefix(RendezvousMessageLimits.maxCandidates).map(\.description).joined(separator: ", "))
        }
        if let mine = registered?.observedAddress, chosen.ip == mine.ip, usable.count > 1 {
            chosen = usable[1]
        }
        let ports = [chosen.port] + usable.filter { $0.ip == chosen.ip && $0.port != chosen.port }.map(\.port)
        return PunchOptions(
            targetHost: chosen.host, targetPorts: ports, sessionID: coordinate.sessionID, sessionKey: coordinate.sessionKey,
            punchTime: .at(received.startAt), role: coordinate.role, localNAT: localNAT, remoteNAT: coordinate.peerNAT,
            targetNodeID: coordinate.peer, strategy: configuration.strategy,
            rtt: coordinate.peerRTTMicroseconds.map { .microseconds($0) }, timeout: configuration.punchTimeout
        )
    }

    /// Keeps `task` until it ends (or the client closes).
    private func track(_ task: Task<Void, Never>) {
        nextTaskID += 1
        let id = nextTaskID
        tasks[id] = task
        Task { [weak self] in
            await task.value
            await self?.forget(task: id)
        }
    }

    private func forget(task id: UInt64) { tasks[id] = nil }

    /// Tasks this client is still tracking (for tests: it must not grow with the punches it served).
    var trackedTaskCount: Int { tasks.count }

    private func armTimeout(_ body: @escaping @Sendable (isolated RendezvousClient) -> Void) {
        let limit = configuration.requestTimeout
        // Not kept in `tasks`: it ends by itself after `limit` and does nothing if the waiter is gone.
        Task {
            guard (try? await Task.sleep(for: limit)) != nil else { return }
            body(self)
        }
    }

    private func send(_ message: ClientMessage) async {
        await send([message])
    }

    /// Writes `messages` in one write, in order.
    private func send(_ messages: [ClientMessage]) async {
        guard let stream, closedReason == nil else { return }
        do {
            try await stream.write(messages.flatMap { RendezvousFraming.frame($0) })
        } catch {
            fail(RendezvousError(.disconnected, "lost the rendezvous connection: \(error)"))
        }
    }

    private func readLoop() async {
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

    private func handle(_ message: ServerMessage, receivedAt: ContinuousClock.Instant) async {
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
    private func answer(_ id: UInt64, _ result: Result<ReceivedCoordinate, RendezvousError>) {
        if let waiter = requestWaiters.removeValue(forKey: id) {
            waiter.resume(returning: result)
        } else if pipelinedIDs.contains(id) {
            unclaimedAnswers[id] = result
        }
    }

    private func keepAliveLoop() async {
        while closedReason == nil {
            let interval = Duration.milliseconds(max(registered?.keepAliveMilliseconds ?? 10_000, 50))
            guard (try? await Task.sleep(for: interval)) != nil else { return }
            await send(.keepAlive)
        }
    }

    private func fail(_ error: RendezvousError) {
        guard closedReason == nil else { return }
        closedReason = error
        registerWaiter?.resume(returning: .failure(error))
        registerWaiter = nil
        for waiter in requestWaiters.values { waiter.resume(returning: .failure(error)) }
        requestWaiters.removeAll()
        incomingContinuation.finish()
        punchesContinuation.finish()
    }

    /// Why the client stopped, once it has (nil while connected).
    public var failure: RendezvousError? { closedReason }
}

/// A ``STUNTransport`` over the punch endpoint's shared socket: sends with ``Endpoint/send(datagram:to:)`` and
/// receives the STUN-range datagrams that are not punch probes.
///
/// Datagrams arrive through ``PunchExecutor/otherDatagrams(_:)``, which installs the executor on the endpoint if
/// no punch has yet.
final class EndpointSTUNTransport: STUNTransport {
    let endpoint: Endpoint
    let localAddress: SocketAddress
    private let sink = Mutex<AsyncStream<STUNDatagram>.Continuation?>(nil)

    init(endpoint: Endpoint) {
        self.endpoint = endpoint
        self.localAddress = endpoint.localAddress
    }

    func install(executor: PunchExecutor) async {
        let handler: @Sendable ([UInt8], SocketAddress) -> Void = { [self] bytes, from in
            deliver(STUNDatagram(bytes: bytes, from: from))
        }
        // The executor owns the endpoint's handler (punch probes) and forwards everything else here. Setting the
        // endpoint's handler directly would take probes away from the executor for good.
        await executor.otherDatagrams(handler)
    }

    private func deliver(_ datagram: STUNDatagram) {
        _ = sink.withLock { $0?.yield(datagram) }
    }

    func send(_ bytes: [UInt8], to destination: SocketAddress) async throws {
        try await endpoint.send(datagram: bytes, to: destination)
    }

    func incoming() -> AsyncStream<STUNDatagram> {
        let (stream, continuation) = AsyncStream.makeStream(of: STUNDatagram.self, bufferingPolicy: .bufferingNewest(256))
        let previous = sink.withLock { current in
            defer { current = continuation }
            return current
        }
        previous?.finish()
        return stream
    }

    func close() async {
        finish()
    }

    func finish() {
        sink.withLock { current in
            current?.finish()
            current = nil
        }
    }
}
