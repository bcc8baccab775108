public import Logging
public import CoreMetrics
import HolePunchSTUN
import Synchronization
public import HolePunchNet
public import HolePunchQUIC
public import HolePunchStrategy
#if canImport(Glibc)
import Glibc
#endif

/// Runs hole punches on a shared-socket `Endpoint`: the seed's `macula_hole_punch` API, done right.
///
/// Probes, the QUIC handshake and (through the rendezvous) the advertised mapping all use the endpoint's one
/// socket. A punch is planned by a `PunchStrategy` (Lua or Swift), clamped by `PlanLimits`, and run by a
/// `PunchSession` state machine; the first connection that proves the pinned NodeID wins.
///
/// The executor reads the endpoint's non-QUIC datagrams (for probes) and takes over its accept policy (to admit only
/// peers of live target sessions, plus whatever ``Configuration/acceptOthers`` allows). Datagrams and connections that
/// belong to no punch are passed on through ``otherDatagrams(_:)`` and ``otherConnections``.
///
/// The executor's work is split by job across files: this one holds its state and public API; planning
/// (`PunchPlanning.swift`), the peer's candidates and their probe targets (`PunchCandidates.swift`), the birthday
/// socket set (`PunchSocketSet.swift`), probe routing and the endpoint wiring
/// (`PunchProbeRouting.swift`), performing the session's actions (`PunchActions.swift`), ending a punch
/// (`PunchCompletion.swift`), the live-session table and handshake admission (`Admission.swift`) and the SNI
/// encoding (`PunchServerName.swift`).
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

    let otherConnectionsContinuation: AsyncStream<QUICConnection>.Continuation
    /// The strategy for punches whose options name none.
    let defaultStrategy: any PunchStrategy
    /// Safety limits every plan is clamped to.
    let limits: PlanLimits
    /// ``Configuration/maxConcurrentPunches`` and ``Configuration/maxPunchesPerPeer``, enforced by ``admission``.
    let maxConcurrentPunches: Int
    let maxPunchesPerPeer: Int
    let logger: Logger
    let metrics: PunchMetrics
    /// The one table of live sessions (preparing or running), read by the endpoint's event loop for admission;
    /// it also holds the accept policy for connections that belong to no punch.
    let admission: Admission
    /// The one clock for instants, timers and elapsed times.
    let clock = PunchClock()
    /// The I/O side of each running punch; its protocol state is in the runtime's session.
    var runtimes: [PunchID: PunchRuntime] = [:]
    private var nextID: UInt64 = 1
    var installed = false
    var acceptTask: Task<Void, Never>?
    var otherDatagramHandler: (@Sendable ([UInt8], SocketAddress) -> Void)?
    /// Readers of one relay server's non-QUIC datagrams (`relayDatagrams(from:_:)`), so that a TURN client keeps its
    /// responses while NAT discovery takes ``otherDatagrams(_:)``.
    var relayDatagramHandlers: [SocketAddress: @Sendable ([UInt8], SocketAddress) -> Void] = [:]

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
        self.defaultStrategy = configuration.strategy
        self.limits = configuration.limits
        self.maxConcurrentPunches = configuration.maxConcurrentPunches
        self.maxPunchesPerPeer = configuration.maxPunchesPerPeer
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
        let startedAt = clock.instant(at: clock.now())
        do {
            let runtime = try await prepare(id: id, options: options, box: box, events: eventsContinuation, startedAt: startedAt)
            if admission.wasCancelledWhilePreparing(options.sessionID) {
                // Cancelled (or the executor shut down) while its plan was being made: it never starts.
                admission.forget(session: options.sessionID)
                await closeExtraSockets(of: runtime)
                throw PunchError(code: .cancelled, message: "the punch was cancelled before it started")
            }
            runtimes[id] = runtime
            if options.role == .target {
                let plan = runtime.session.configuration.plan
                admission.expect(
                    options.targetNodeID, session: options.sessionID,
                    hints: HandshakeHints(packetCopies: plan.handshakeCopies, initialRTT: plan.initialRTT)
                )
            }
            metrics.active.increment()
            startRelayDial(runtime)
            let now = clock.now()
            if now >= runtime.session.configuration.startAt {
                apply(runtime, runtime.session.handle(.start(now: now)))
            } else {
                arm(runtime, at: runtime.session.configuration.startAt)
            }
        } catch let error as PunchError {
            box.deliver(.failure(error))
            eventsContinuation.yield(.done(.failure(error)))
            eventsContinuation.finish()
            metrics.record(outcome: error.code.rawValue, strategy: (options.strategy ?? defaultStrategy).name,
                           pair: PunchMetrics.pair(options))
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
        if runtimes[id] == nil, admission.cancelPreparing(id) {
            // Still awaiting its strategy: it ends as cancelled as soon as its plan arrives.
            return .cancelled
        }
        guard let runtime = runtimes[id] else {
            // Ids are issued in order from 1, so an id below the next one belonged to a punch that has ended.
            return (1..<nextID).contains(id.rawValue) ? .alreadyFinished : .unknown
        }
        cancelPunch(runtime)
        return .cancelled
    }

    /// The punches in progress, oldest first.
    public func activePunches() -> [PunchInfo] {
        let now = clock.instant(at: clock.now())
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

    /// Starts reading the endpoint's non-QUIC datagrams and takes over its accept policy now, not at the first punch.
    public func start() async {
        await installIfNeeded()
    }

    /// Stops accepting for punches and cancels every active punch.
    public func shutdown() {
        admission.cancelAll()
        for runtime in runtimes.values.sorted(by: { $0.id < $1.id }) {
            cancelPunch(runtime)
        }
        acceptTask?.cancel()
        acceptTask = nil
        otherConnectionsContinuation.finish()
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

