public import Logging
public import CoreMetrics
import HolePunchSTUN
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs hole punches on a shared-socket `Endpoint`: the seed's `macula_hole_punch` API, done right.
///
/// Probes, the QUIC handshake and (through the rendezvous) the advertised mapping all use the endpoint's one
/// socket. A punch is planned by a `PunchStrategy` (Lua or Swift), clamped by `PlanLimits`, and run by a
/// `PunchSession` state machine; the first connection that proves the pinned NodeID wins.
///
/// The executor takes over the endpoint's datagram handler (for probes) and accept policy (to admit only peers
/// of live target sessions, plus whatever ``Configuration/acceptOthers`` allows). Datagrams and connections that
/// belong to no punch are passed on through ``otherDatagrams(_:)`` and ``otherConnections``.
public actor PunchExecutor {
    /// Settings for an executor.
    public struct Configuration: Sendable {
        /// The strategy used when a punch's options name none.
        public var strategy: any PunchStrategy
        /// Safety limits every plan is clamped to.
        public var limits: PlanLimits
        /// Which connections that belong to no punch the endpoint still accepts.
        public var acceptOthers: AcceptPolicy
        /// Most punches running at once; more fail at once with `tooManyPunches` (each punch holds sockets,
        /// timers and a probe budget, and a punch can be started by a remote peer).
        public var maxConcurrentPunches = 256
        /// Most punches running at once to one peer NodeID, so one peer cannot take every slot.
        public var maxPunchesPerPeer = 8

        /// Creates a configuration.
        /// The default strategy is the bundled `default.lua` (`FallbackStrategy.recommended(limits:logger:onFallback:)`).
        public init(strategy: any PunchStrategy = FallbackStrategy.recommended(), limits: PlanLimits = .default, acceptOthers: AcceptPolicy = .none) {
            self.strategy = strategy
            self.limits = limits
            self.acceptOthers = acceptOthers
        }
    }

    /// The endpoint whose socket punches from.
    public nonisolated let endpoint: Endpoint
    /// Outcomes of earlier punches, read by strategies for adaptive timing.
    public nonisolated let history: PunchHistory
    /// Connections accepted by the endpoint that belong to no punch.
    public nonisolated let otherConnections: AsyncStream<QUICConnection>

    private let otherConnectionsContinuation: AsyncStream<QUICConnection>.Continuation
    private let configuration: Configuration
    private let logger: Logger
    private let metrics: PunchMetrics
    private let admission: Admission
    private var runtimes: [PunchID: PunchRuntime] = [:]
    private var bySession: [String: PunchID] = [:]
    /// Sessions whose punch is being prepared (awaiting its strategy), with the peer each is to.
    private var preparing: [String: NodeID] = [:]
    /// Punches being prepared, by id, and those of them cancelled meanwhile.
    private var preparingPunches: Set<PunchID> = []
    private var cancelledWhilePreparing: Set<PunchID> = []
    private var nextID: UInt64 = 1
    private var installed = false
    private var acceptTask: Task<Void, Never>?
    private var otherDatagramHandler: (@Sendable ([UInt8], SocketAddress) -> Void)?

    /// Creates an executor for an endpoint.
    ///
    /// - Parameters:
    ///   - endpoint: the shared socket to punch from.
    ///   - configuration: default strategy, limits and accept policy for other connections.
    ///   - history: where outcomes are recorded (pass a loaded one to persist adaptive timing).
    ///   - logger: where the executor logs (info and below).
    ///   - metricsFactory: where metrics go; nil uses the process's bootstrapped factory.
    public init(
        endpoint: Endpoint,
        configuration: Configuration = Configuration(),
        history: PunchHistory = PunchHistory(),
        logger: Logger = Logger(label: "holepunch.punch", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil
    ) {
        self.endpoint = endpoint
        self.configuration = configuration
        self.history = history
        self.logger = logger
        self.metrics = PunchMetrics(factory: metricsFactory ?? MetricsSystem.factory)
        self.admission = Admission(others: configuration.acceptOthers)
        (otherConnections, otherConnectionsContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
    }

    // MARK: The seed's API

    /// Punches to a peer and returns the authenticated connection: the seed's `execute`.
    ///
    /// Cancelling the calling task cancels the punch, exactly like ``cancel(_:)``.
    ///
    /// - Parameters:
    ///   - options: the peer, its ports, the session and the roles, as the seed's `execute` took them.
    ///   - timeout: an overall limit that overrides the plan's timeout.
    /// - Throws: ``PunchError`` with `timeout`, `unreachable`, `allPortsFailed`, `cancelled`,
    ///   `peerAuthenticationFailed` or `invalidOptions`.
    public func punch(_ options: PunchOptions, timeout: Duration? = nil) async throws(PunchError) -> QUICConnection {
        var options = options
        if let timeout { options.timeout = timeout }
        let handle = await startPunch(options)
        let id = handle.id
        let result = await withTaskCancellationHandler {
            await handle.result()
        } onCancel: {
            Task { await self.cancel(id) }
        }
        return try result.get()
    }

    /// Starts a punch and returns at once with its handle: the seed's `execute_async`.
    public func startPunch(_ options: PunchOptions) async -> PunchHandle {
        await installIfNeeded()
        let id = PunchID(rawValue: nextID)
        nextID += 1
        let (events, eventsContinuation) = AsyncStream.makeStream(of: PunchEvent.self)
        let box = ResultBox()
        let handle = PunchHandle(id: id, events: events, box: box)
        let startedAt = ContinuousClock.now
        do {
            preparingPunches.insert(id)
            defer { preparingPunches.remove(id) }
            let runtime = try await prepare(id: id, options: options, box: box, events: eventsContinuation, startedAt: startedAt)
            if cancelledWhilePreparing.remove(id) != nil {
                // Cancelled (or the executor shut down) while its plan was being made: it never starts.
                for socket in runtime.sockets.dropFirst() { await socket.close() }
                throw PunchError(code: .cancelled, message: "the punch was cancelled before it started")
            }
            runtimes[id] = runtime
            bySession[options.sessionID] = id
            if options.role == .target {
                let plan = runtime.session.configuration.plan
                admission.expect(
                    options.targetNodeID, session: options.sessionID,
                    hints: HandshakeHints(packetCopies: plan.handshakeCopies, initialRTT: plan.initialRTT)
                )
            }
            metrics.active.increment()
            let now = monotonicNanoseconds()
            if now >= runtime.session.configuration.startAt {
                apply(runtime, runtime.session.handle(.start(now: now)))
            } else {
                arm(runtime, at: runtime.session.configuration.startAt)
            }
        } catch let error as PunchError {
            box.deliver(.failure(error))
            eventsContinuation.yield(.done(.failure(error)))
            eventsContinuation.finish()
            metrics.record(outcome: error.code.rawValue, strategy: (options.strategy ?? configuration.strategy).name,
                           pair: "\(options.localNAT.type)/\(options.remoteNAT.type)")
        } catch {
            let wrapped = PunchError(code: .invalidOptions, message: "\(error)")
            box.deliver(.failure(wrapped))
            eventsContinuation.yield(.done(.failure(wrapped)))
            eventsContinuation.finish()
        }
        return handle
    }

    /// Cancels a punch: timers, probes, extra sockets and half-open handshakes stop, and its result becomes
    /// `cancelled`.
    ///
    /// Cancelling a punch that already ended changes nothing and says so (the seed's `{error, not_found}` is
    /// ``PunchCancellation/alreadyFinished`` or ``PunchCancellation/unknown`` here): the race between a result and
    /// a cancel is normal, not an error.
    @discardableResult
    public func cancel(_ id: PunchID) -> PunchCancellation {
        if runtimes[id] == nil, preparingPunches.contains(id) {
            // Still awaiting its strategy: it ends as cancelled as soon as its plan arrives.
            cancelledWhilePreparing.insert(id)
            return .cancelled
        }
        guard let runtime = runtimes[id] else {
            // Ids are issued in order from 1, so an id below the next one belonged to a punch that has ended.
            return (1..<nextID).contains(id.rawValue) ? .alreadyFinished : .unknown
        }
        apply(runtime, runtime.session.handle(.cancel))
        return .cancelled
    }

    /// The punches in progress, oldest first.
    public func activePunches() -> [PunchInfo] {
        let now = ContinuousClock.now
        return runtimes.values.sorted { $0.id < $1.id }.map { runtime in
            PunchInfo(
                id: runtime.id,
                targetHost: runtime.options.targetHost,
                targetNodeID: runtime.options.targetNodeID,
                role: runtime.options.role,
                phase: runtime.session.phase.description,
                portsTried: runtime.session.portsTried,
                round: runtime.session.round,
                startedAt: runtime.startedAt,
                elapsed: now - runtime.startedAt
            )
        }
    }

    /// Sets where STUN-range datagrams that are not probes of a live punch go (e.g. a STUN or rendezvous client).
    ///
    /// Installs the executor on its endpoint if no punch has done so yet, so datagrams flow from now on.
    public func otherDatagrams(_ handler: (@Sendable ([UInt8], SocketAddress) -> Void)?) async {
        otherDatagramHandler = handler
        await installIfNeeded()
    }

    /// Takes over the endpoint's datagram handler and accept policy now, instead of at the first punch.
    public func start() async {
        await installIfNeeded()
    }

    /// Stops accepting for punches and cancels every active punch.
    public func shutdown() {
        cancelledWhilePreparing.formUnion(preparingPunches)
        for runtime in runtimes.values.sorted(by: { $0.id < $1.id }) {
            apply(runtime, runtime.session.handle(.cancel))
        }
        acceptTask?.cancel()
        acceptTask = nil
        otherConnectionsContinuation.finish()
    }

    // MARK: Setup

    private func installIfNeeded() async {
        guard !installed else { return }
        installed = true
        let admission = self.admission
        await endpoint.setAcceptPolicy(.decide { admission.admits($0) })
        await endpoint.setHandshakeHintProvider { admission.hints(for: $0) }
        await installHandlers(on: endpoint, socket: 0, punch: nil)
        let incoming = endpoint.incoming
        acceptTask = Task { [weak self] in
            for await connection in incoming {
                guard let self else { return }
                await self.accepted(connection, socket: 0)
            }
        }
    }

    private func installHandlers(on endpoint: Endpoint, socket: Int, punch: PunchID?) async {
        await endpoint.setDatagramHandler { [weak self] bytes, from in
            guard let self else { return }
            Task { await self.datagram(bytes, from: from, socket: socket) }
        }
        await endpoint.setUnreachableHandler { [weak self] address in
            guard let self else { return }
            Task { await self.unreachable(address, punch: punch) }
        }
    }

    private func prepare(
        id: PunchID, options: PunchOptions, box: ResultBox,
        events: AsyncStream<PunchEvent>.Continuation, startedAt: ContinuousClock.Instant
    ) async throws -> PunchRuntime {
        guard !options.sessionID.isEmpty, !options.sessionID.contains(":") else {
            throw PunchError(code: .invalidOptions, message: "the session id must be non-empty and contain no ':'")
        }
        guard !options.sessionKey.isEmpty else {
            throw PunchError(code: .invalidOptions, message: "the session key is empty")
        }
        // Punches still being prepared count too: preparing awaits the strategy, and starts made meanwhile must
        // not slip past the caps or start the same session twice.
        let running = runtimes.count + preparing.count
        guard running < configuration.maxConcurrentPunches else {
            throw PunchError(code: .tooManyPunches,
                             message: "\(running) punches are running, the most this executor allows")
        }
        let toPeer = runtimes.values.count(where: { $0.options.targetNodeID == options.targetNodeID })
            + preparing.values.count(where: { $0 == options.targetNodeID })
        guard toPeer < configuration.maxPunchesPerPeer else {
            throw PunchError(code: .tooManyPunches,
                             message: "\(configuration.maxPunchesPerPeer) punches to \(options.targetNodeID.short) are running already")
        }
        guard bySession[options.sessionID] == nil, preparing[options.sessionID] == nil else {
            throw PunchError(code: .invalidOptions, message: "session \(options.sessionID) is already being punched")
        }
        preparing[options.sessionID] = options.targetNodeID
        defer { preparing[options.sessionID] = nil }
        let host: SocketAddress
        do {
            host = try SocketAddress(host: options.targetHost, port: 0)
        } catch {
            throw PunchError(code: .invalidOptions, message: "target host: \(error)")
        }
        guard host.isIPv6 == endpoint.localAddress.isIPv6 else {
            throw PunchError(code: .invalidOptions, message: "target \(options.targetHost) is not in the endpoint's address family")
        }
        guard !options.targetPorts.isEmpty, !options.targetPorts.contains(0) else {
            throw PunchError(code: .invalidOptions, message: "target ports must be a non-empty list of ports 1-65535")
        }
        if let localPort = options.localPort, localPort != endpoint.localAddress.port {
            throw PunchError(
                code: .invalidOptions,
                message: "local port \(localPort) is not the endpoint's port \(endpoint.localAddress.port): a punch must leave from the advertised socket"
            )
        }
        let strategy = options.strategy ?? configuration.strategy
        var context = PunchContext(
            localNAT: options.localNAT,
            remoteNAT: options.remoteNAT,
            candidateHosts: [options.targetHost],
            candidatePorts: options.targetPorts,
            localPort: endpoint.localAddress.port,
            rtt: options.rtt,
            role: options.role,
            seed: stableSeed(options.sessionID),
            peerID: options.targetNodeID.description,
            limits: configuration.limits
        )
        context = history.fill(context)
        context.attempt = context.peerHistory.attempts + 1
        // Off the actor: a slow script must not hold up other punches (Lua calls are abandoned when they overrun).
        // A strategy never breaks a punch: a failing one is replaced by the built-in plan, never silently.
        let decision = await strategy.detachedDecision(context)
        var plan = decision.plan
        let strategyName = decision.plannedBy
        if let reason = decision.fallbackReason {
            logger.warning("strategy failed, using the built-in default plan", metadata: [
                "punch.id": "\(id)", "strategy": "\(strategy.name)", "error": "\(reason)",
            ])
            metrics.fallback(strategy: strategy.name)
            events.yield(.strategyFellBack(strategy: strategy.name, reason: reason))
        }
        events.yield(.planned(strategy: strategyName))
        if let timeout = options.timeout { plan.timeout = timeout }
        let (validated, reasons) = plan.validated(configuration.limits)
        for reason in reasons {
            logger.debug("plan clamped", metadata: ["punch.id": "\(id)", "reason": "\(reason)"])
        }
        let candidates = validated.ports.map { port -> SocketAddress in
            var address = host
            address.port = port
            return address
        }
        let startDelay: Duration
        switch options.punchTime {
        case .now: startDelay = .zero
        case .after(let delay): startDelay = delay
        case .at(let instant): startDelay = max(.zero, instant - ContinuousClock.now)
        }
        let now = monotonicNanoseconds()
        let startAt = now + nanoseconds(startDelay) + nanoseconds(validated.startDelay)
        let session = PunchSession(PunchSession.Configuration(
            role: options.role, candidates: candidates, plan: validated,
            startAt: startAt, deadline: startAt + nanoseconds(validated.timeout)
        ))
        let runtime = PunchRuntime(
            id: id, options: options, session: session, context: context, strategy: strategy,
            strategyName: strategyName, box: box, events: events, startedAt: startedAt
        )
        runtime.sockets = [endpoint]
        // Extra sockets for birthday attacks: same identity, dial-only, probes routed to this punch.
        if validated.localSockets > 1 {
            var bindAddress = endpoint.localAddress
            bindAddress.port = 0
            let identity = await endpoint.identity
            let alpns = await endpoint.alpns
            for index in 1..<validated.localSockets {
                do {
                    // A target's extra sockets accept its peer too: in a birthday punch the initiator dials
                    // whichever of our random mappings its probes found.
                    let admission = self.admission
                    let policy: AcceptPolicy = options.role == .target ? .decide { admission.admits($0) } : .none
                    // The same protocols as the main socket: a punch may win on any of its sockets.
                    var extraConfiguration = EndpointConfiguration(identity: identity, acceptPolicy: policy, alpn: alpns[0])
                    extraConfiguration.additionalALPNs = Array(alpns.dropFirst())
                    let extra = try await Endpoint.bind(bindAddress, configuration: extraConfiguration)
                    await installHandlers(on: extra, socket: index, punch: id)
                    if options.role == .target {
                        await extra.setHandshakeHintProvider { admission.hints(for: $0) }
                        let incoming = extra.incoming
                        Task { [weak self] in
                            for await connection in incoming {
                                guard let self else { return }
                                await self.accepted(connection, socket: index)
                            }
                        }
                    }
                    runtime.sockets.append(extra)
                } catch {
                    for socket in runtime.sockets.dropFirst() { await socket.close() }
                    throw PunchError(code: .invalidOptions, message: "cannot open local socket \(index): \(error)")
                }
            }
        }
        return runtime
    }

    // MARK: Events

    private func datagram(_ bytes: [UInt8], from: SocketAddress, socket: Int) {
        guard let message = try? STUNMessage.decode(bytes),
              let username = message.username,
              let separator = username.firstIndex(of: ":"),
              let id = bySession[String(username[..<separator])],
              let runtime = runtimes[id]
        else {
            if socket == 0 { otherDatagramHandler?(bytes, from) }
            return
        }
        guard let probe = try? PunchProbe.verify(message, bytes: bytes, sessionID: runtime.options.sessionID, key: runtime.options.sessionKey),
              probe.senderRole != runtime.options.role.rawValue
        else {
            // Forged, for another key, or our own probe reflected back: ignore.
            return
        }
        // A copy of a genuine probe, replayed from elsewhere or again, proves nothing (see ProbeLedger).
        let fresh = probe.isResponse
            ? runtime.ledger.acceptResponse(probe.transactionID, socket: socket, from: from)
            : runtime.ledger.acceptRequest(probe.transactionID)
        guard fresh else { return }
        let event: PunchSession.Event = probe.isResponse
            ? .probeResponse(from: from, socket: socket)
            : .probeRequest(from: from, socket: socket)
        apply(runtime, runtime.session.handle(event), replyTo: probe.transactionID)
    }

    private func unreachable(_ address: SocketAddress, punch: PunchID?) {
        if let punch, let runtime = runtimes[punch] {
            apply(runtime, runtime.session.handle(.unreachable(address)))
            return
        }
        for runtime in runtimes.values where runtime.session.configuration.candidates.contains(address) {
            apply(runtime, runtime.session.handle(.unreachable(address)))
        }
    }

    /// A handshake from the pinned peer completed on local socket `socket` (0: the endpoint; more: a target's extra
    /// socket in a birthday punch, which must then be the one kept open).
    private func accepted(_ connection: QUICConnection, socket: Int) async {
        // The initiator names the session in the TLS server name, so a late handshake from an earlier session of
        // the same peer can never be mistaken for this one.
        guard let serverName = connection.serverName,
              let session = PunchExecutor.sessionID(fromServerName: serverName),
              let punchID = bySession[session], let runtime = runtimes[punchID],
              runtime.options.role == .target, runtime.options.targetNodeID == connection.peerNodeID
        else {
            otherConnectionsContinuation.yield(connection)
            return
        }
        let id = runtime.allocateConnectionID()
        runtime.connections[id] = connection
        runtime.dialSockets[id] = socket
        apply(runtime, runtime.session.handle(.accepted(id: id)))
    }

    private func timerFired(_ id: PunchID, generation: Int) {
        guard let runtime = runtimes[id], runtime.timerGeneration == generation else { return }
        runtime.timerTask = nil
        apply(runtime, runtime.session.handle(.timer(now: monotonicNanoseconds())))
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

    // MARK: Actions

    /// The application error code that closes a connection which lost the tie-break.
    public static let duplicateCode: UInt64 = 0x4850_0001

    private func apply(_ runtime: PunchRuntime, _ actions: [PunchSession.Action], replyTo transaction: STUNTransactionID? = nil) {
        for action in actions {
            switch action {
            case .sendProbes(let probes):
                let options = runtime.options
                let sockets = runtime.sockets
                // Each request's transaction is recorded before it leaves, so only answers to it are believed.
                var outgoing: [(socket: Endpoint, to: SocketAddress, bytes: [UInt8])] = []
                for probe in probes where probe.socket < sockets.count {
                    let transaction = STUNTransactionID.random()
                    guard let bytes = try? PunchProbe.request(
                        sessionID: options.sessionID, senderRole: options.role.rawValue, key: options.sessionKey,
                        transactionID: transaction
                    ) else { continue }
                    runtime.ledger.recordSent(transaction, socket: probe.socket, to: probe.to)
                    outgoing.append((sockets[probe.socket], probe.to, bytes))
                }
                Task {
                    for datagram in outgoing {
                        try? await datagram.socket.send(datagram: datagram.bytes, to: datagram.to)
                    }
                }
            case .respond(let socket, let to):
                guard let transaction, socket < runtime.sockets.count,
                      let bytes = try? PunchProbe.response(
                        transactionID: transaction, sessionID: runtime.options.sessionID,
                        senderRole: runtime.options.role.rawValue, key: runtime.options.sessionKey, observedAddress: to
                      )
                else { continue }
                let endpoint = runtime.sockets[socket]
                Task { try? await endpoint.send(datagram: bytes, to: to) }
            case .dial(let dial, let socket, let to):
                guard socket < runtime.sockets.count else { continue }
                let endpoint = runtime.sockets[socket]
                let node = runtime.options.targetNodeID
                let plan = runtime.session.configuration.plan
                let punchID = runtime.id
                let serverName = PunchExecutor.serverName(forSession: runtime.options.sessionID)
                let alpn = runtime.options.alpn
                runtime.dialSockets[dial] = socket
                runtime.dialTargets[dial] = to
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
        // The hook runs off the actor; its answer is applied when it comes, if the punch is still running.
        let (strategy, context, id) = (runtime.strategy, runtime.context, runtime.id)
        Task {
            do {
                guard let plan = try await strategy.detachedOnProbe(context, event) else { return }
                self.replacePlan(id, with: plan)
            } catch {
                self.logger.warning("on_probe failed; keeping the plan", metadata: ["punch.id": "\(id)", "error": "\(error)"])
            }
        }
    }

    private func replacePlan(_ id: PunchID, with replacement: PunchPlan) {
        guard let runtime = runtimes[id] else { return }
        let session = runtime.session
        var plan = replacement
        if let timeout = runtime.options.timeout { plan.timeout = timeout }
        let (validated, _) = plan.validated(configuration.limits)
        guard let host = session.configuration.candidates.first else { return }
        let candidates = validated.ports.map { port -> SocketAddress in
            var address = host
            address.port = port
            return address
        }
        runtime.session.replacePlan(validated, candidates: candidates)
    }

    private func arm(_ runtime: PunchRuntime, at deadline: UInt64) {
        runtime.timerTask?.cancel()
        runtime.timerGeneration += 1
        let generation = runtime.timerGeneration
        let id = runtime.id
        // One clock read: reading it again for the subtraction could pass `deadline` in between and trap on underflow
        // (it did under valgrind, where a thread can stall between the two reads).
        let now = monotonicNanoseconds()
        let delay = deadline > now ? deadline - now : 0
        runtime.timerTask = Task {
            if delay > 0 {
                do { try await Task.sleep(for: .nanoseconds(Int64(delay))) } catch { return }
            }
            self.timerFired(id, generation: generation)
        }
    }

    private func succeed(_ runtime: PunchRuntime, connection id: Int) {
        guard let connection = runtime.connections.removeValue(forKey: id) else {
            fail(runtime, code: .timeout)
            return
        }
        let elapsed = elapsedSinceStart(runtime)
        let winningSocket = runtime.dialSockets[id] ?? 0
        let remote = runtime.dialTargets[id] ?? connection.remoteAddress
        let port = remote.port
        let offset = runtime.options.targetPorts.first.map { Int(port) - Int($0) } ?? 0
        let outcome = PunchOutcome.success(timeToConnect: elapsed, winningPort: port, portOffset: offset, rounds: runtime.session.round)
        let success = PunchSuccess(
            remoteAddress: remote, localPort: runtime.sockets[min(winningSocket, runtime.sockets.count - 1)].localAddress.port,
            timeToConnect: elapsed, rounds: runtime.session.round
        )
        let closing = end(runtime, outcome: outcome, keepSocket: winningSocket)
        metrics.timeToConnect.recordNanoseconds(Int64(nanoseconds(elapsed)))
        deliver(runtime, .success(connection), event: .done(.success(success)), after: closing)
        logger.debug("punch connected", metadata: [
            "punch.id": "\(runtime.id)", "peer.address": "\(remote)", "punch.rounds": "\(runtime.session.round)",
        ])
    }

    private func fail(_ runtime: PunchRuntime, code: PunchFailureCode) {
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
        runtime.dials.removeAll()
        for connection in runtime.connections.values {
            Task { await connection.close(errorCode: PunchExecutor.duplicateCode, reason: "duplicate connection") }
        }
        runtime.connections.removeAll()
        let closing = runtime.sockets.enumerated().filter { $0.offset > 0 && $0.offset != keepSocket }.map(\.element)
        runtimes[runtime.id] = nil
        bySession[runtime.options.sessionID] = nil
        if runtime.options.role == .target { admission.forget(session: runtime.options.sessionID) }
        metrics.active.decrement()
        let pair = "\(runtime.options.localNAT.type)/\(runtime.options.remoteNAT.type)"
        let outcomeName: String
        switch outcome {
        case .success: outcomeName = "success"
        case .failure(let code, _): outcomeName = code.rawValue
        }
        metrics.record(outcome: outcomeName, strategy: runtime.strategyName, pair: pair)
        if case .failure(.cancelled, _) = outcome {
            // A cancellation says nothing about the network: it is not history.
        } else {
            history.record(outcome, for: runtime.context)
        }
        let (strategy, context, id) = (runtime.strategy, runtime.context, runtime.id)
        Task {
            do {
                try await strategy.detachedOnResult(context, outcome)
            } catch {
                self.logger.warning("on_result failed", metadata: ["punch.id": "\(id)", "error": "\(error)"])
            }
        }
        return closing
    }

    private func elapsedSinceStart(_ runtime: PunchRuntime) -> Duration {
        let now = monotonicNanoseconds()
        let start = runtime.session.configuration.startAt
        return .nanoseconds(Int64(now > start ? now - start : 0))
    }
}

/// What ``PunchExecutor/cancel(_:)`` did.
public enum PunchCancellation: Sendable, Hashable {
    /// The punch was running (or being prepared): it stops, and its result is `cancelled`.
    case cancelled
    /// The punch had already ended (connected, failed or cancelled); nothing changed.
    case alreadyFinished
    /// This executor never started a punch with that id; nothing changed.
    case unknown
}

/// The mutable state of one punch; owned by the executor actor and touched only there.
final class PunchRuntime {
    let id: PunchID
    let options: PunchOptions
    var session: PunchSession
    let context: PunchContext
    let strategy: any PunchStrategy
    let strategyName: String
    let box: ResultBox
    let events: AsyncStream<PunchEvent>.Continuation
    let startedAt: ContinuousClock.Instant
    var sockets: [Endpoint] = []
    var dials: [Int: Task<Void, Never>] = [:]
    var dialSockets: [Int: Int] = [:]
    var dialTargets: [Int: SocketAddress] = [:]
    var connections: [Int: QUICConnection] = [:]
    var timerTask: Task<Void, Never>?
    var timerGeneration = 0
    var authenticationError: QUICError?
    /// Probe transactions sent and seen, against replayed copies.
    var ledger = ProbeLedger()
    /// When the first verified probe from the peer arrived, from the start instant (for failure reports).
    var firstPathProven: Duration?
    private var nextConnectionID = 1_000_000

    init(
        id: PunchID, options: PunchOptions, session: PunchSession, context: PunchContext,
        strategy: any PunchStrategy, strategyName: String, box: ResultBox,
        events: AsyncStream<PunchEvent>.Continuation, startedAt: ContinuousClock.Instant
    ) {
        self.id = id
        self.options = options
        self.session = session
        self.context = context
        self.strategy = strategy
        self.strategyName = strategyName
        self.box = box
        self.events = events
        self.startedAt = startedAt
    }

    /// Ids for accepted connections, apart from dial ids.
    func allocateConnectionID() -> Int {
        nextConnectionID += 1
        return nextConnectionID
    }
}

/// Which handshakes the endpoint admits: the pinned peer of a live target punch, naming that punch's session in
/// its TLS server name; plus the configured others. Consulted on the endpoint's event loop during handshakes,
/// so it is a lock, not an actor.
final class Admission: Sendable {
    /// A live target punch: whom it admits, how its handshake runs, and the peer addresses its probes proved.
    private struct Expected {
        var node: NodeID
        var hints: HandshakeHints
        var proven: Set<SocketAddress> = []
    }
    private let expected = Mutex<[String: Expected]>([:])
    private let others: AcceptPolicy

    init(others: AcceptPolicy) { self.others = others }

    /// Admits `node` for `session`; handshakes from addresses its probes prove (``proved(_:session:)``) run with
    /// `hints`.
    func expect(_ node: NodeID, session: String, hints: HandshakeHints) {
        expected.withLock { $0[session] = Expected(node: node, hints: hints) }
    }

    /// A probe of `session` proved that its peer sends from `address`; a no-op for a session that is not a live
    /// target punch.
    func proved(_ address: SocketAddress, session: String) {
        expected.withLock { _ = $0[session]?.proven.insert(address) }
    }

    func forget(session: String) { expected.withLock { $0[session] = nil } }

    /// Hints for a handshake that `address` starts: those of a live target punch whose probes proved that exact
    /// address (IP and port). Asked before the accept policy sees the ClientHello, and the endpoint takes an answer
    /// as vouching for the address (copies, no Retry): so an address merely expected (the IP the rendezvous named),
    /// which anyone can spoof, gets nothing. With two live punches proving one address, either's hints apply.
    func hints(for address: SocketAddress) -> HandshakeHints? {
        expected.withLock { table in table.values.first { $0.proven.contains(address) }?.hints }
    }

    func admits(_ handshake: IncomingHandshake) -> Bool {
        if let name = handshake.serverName, let session = PunchExecutor.sessionID(fromServerName: name),
           expected.withLock({ $0[session]?.node == handshake.nodeID }) {
            return true
        }
        switch others {
        case .any: return true
        case .none: return false
        case .allow(let set): return set.contains(handshake.nodeID)
        case .decide(let decide): return decide(handshake)
        }
    }
}

extension PunchExecutor {
    /// The TLS server name that carries a session id: its UTF-8 in hex, in DNS labels of at most 60 characters,
    /// under `.punch.holepunch` (so any session id fits the SNI's character rules).
    static func serverName(forSession session: String) -> String {
        let hex = session.utf8.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        var labels: [String] = []
        var rest = Substring(hex)
        while !rest.isEmpty {
            labels.append(String(rest.prefix(60)))
            rest = rest.dropFirst(60)
        }
        return (labels + ["punch", "holepunch"]).joined(separator: ".")
    }

    /// The session id in a server name made by ``serverName(forSession:)``; nil for any other name.
    static func sessionID(fromServerName name: String) -> String? {
        guard name.hasSuffix(".punch.holepunch") else { return nil }
        let hex = String(name.dropLast(".punch.holepunch".count).filter { $0 != "." })
        guard hex.count % 2 == 0, !hex.isEmpty else { return nil }
        var bytes: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return String(bytes: bytes, encoding: .utf8)
    }
}

/// A stable 64-bit seed from the session id (FNV-1a), so plans are deterministic per session.
func stableSeed(_ text: String) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in text.utf8 {
        hash ^= UInt64(byte)
        hash = hash &* 0x0000_0100_0000_01b3
    }
    return hash
}

/// CLOCK_MONOTONIC in nanoseconds, the clock the punch session's instants are on.
func monotonicNanoseconds() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}
