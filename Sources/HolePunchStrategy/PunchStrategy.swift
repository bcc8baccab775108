public import HolePunchNet

/// Decides where and how hard to punch. The executor asks ``plan(_:)`` before each attempt, may ask
/// ``onProbe(_:_:)`` between rounds, and reports the result through ``onResult(_:_:)``.
///
/// The hooks are synchronous, because a plan is a small, CPU-bound computation (microseconds) and tools
/// call them in tight loops. The executor calls the `detached…` variants instead, which by default run the
/// synchronous hook off the executor's actor, so even a slow strategy cannot stall other punches. Conformers
/// must be `Sendable`: the executor calls them from many punch tasks at once, so an implementation with
/// mutable state serialises it itself (``LuaStrategy`` uses a lock around its `lua_State`).
///
/// Plans are validated by the caller (``PunchPlan/validated(_:)``); a strategy need not clamp.
public protocol PunchStrategy: Sendable {
    /// A short, stable name for logs and metrics (a bounded dimension: the file name, not a path).
    var name: String { get }

    /// The plan for one attempt. Throws ``StrategyError`` when the strategy cannot produce one.
    func plan(_ ctx: PunchContext) throws -> PunchPlan

    /// Called after each probe round; returns a replacement plan for the remaining rounds, or nil to keep
    /// the current one. The default keeps it.
    func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws -> PunchPlan?

    /// Called once with the attempt's outcome. The default ignores it.
    func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) throws

    /// ``plan(_:)`` as the executor calls it: without holding the caller's actor, so a slow strategy never
    /// stalls other punches. The default runs ``plan(_:)`` from a nonisolated async function, that is on
    /// the global concurrent executor; ``LuaStrategy`` runs it on its own queue and abandons a call that
    /// overruns its time limit.
    func detachedPlan(_ ctx: PunchContext) async throws -> PunchPlan

    /// ``onProbe(_:_:)`` as the executor calls it; see ``detachedPlan(_:)``.
    func detachedOnProbe(_ ctx: PunchContext, _ event: ProbeEvent) async throws -> PunchPlan?

    /// ``onResult(_:_:)`` as the executor calls it; see ``detachedPlan(_:)``.
    func detachedOnResult(_ ctx: PunchContext, _ outcome: PunchOutcome) async throws

    /// The plan for one attempt together with who made it: ``detachedPlan(_:)``, or ``DefaultStrategy``'s
    /// plan with the reason when that fails. The executor calls this, so that every punch can say which
    /// strategy planned it and a fallback is never silent. The default implementation does exactly that;
    /// ``FallbackStrategy`` also reports the fallbacks it makes itself.
    func detachedDecision(_ ctx: PunchContext) async -> PlanDecision
}

/// A plan and the strategy that made it, as the executor reports it (``PunchStrategy/detachedDecision(_:)``).
public struct PlanDecision: Sendable, Hashable {
    /// The plan, before validation.
    public var plan: PunchPlan
    /// The name of the strategy whose plan this is: the strategy asked, or `builtin-default` after a fallback.
    public var plannedBy: String
    /// Why the strategy asked did not plan: its error, when the built-in plan answered instead; nil otherwise.
    public var fallbackReason: StrategyError?

    /// Creates a decision.
    public init(plan: PunchPlan, plannedBy: String, fallbackReason: StrategyError? = nil) {
        self.plan = plan
        self.plannedBy = plannedBy
        self.fallbackReason = fallbackReason
    }

    /// The built-in plan for `ctx`, standing in for a strategy that failed with `reason`.
    public static func fallback(_ ctx: PunchContext, reason: StrategyError) -> PlanDecision {
        let builtin = DefaultStrategy()
        return PlanDecision(plan: builtin.plan(ctx), plannedBy: builtin.name, fallbackReason: reason)
    }
}

extension PunchStrategy {
    /// Runs ``plan(_:)`` off the caller's actor (a nonisolated async function runs on the global executor).
    public func detachedPlan(_ ctx: PunchContext) async throws -> PunchPlan { try plan(ctx) }
    /// Runs ``onProbe(_:_:)`` off the caller's actor.
    public func detachedOnProbe(_ ctx: PunchContext, _ event: ProbeEvent) async throws -> PunchPlan? {
        try onProbe(ctx, event)
    }
    /// Runs ``onResult(_:_:)`` off the caller's actor.
    public func detachedOnResult(_ ctx: PunchContext, _ outcome: PunchOutcome) async throws {
        try onResult(ctx, outcome)
    }

    /// The strategy's own plan, or the built-in one with the reason when the strategy throws.
    public func detachedDecision(_ ctx: PunchContext) async -> PlanDecision {
        do {
            return PlanDecision(plan: try await detachedPlan(ctx), plannedBy: name)
        } catch {
            return .fallback(ctx, reason: StrategyError.wrapping(error))
        }
    }

    /// Keeps the current plan.
    public func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws -> PunchPlan? { nil }
    /// Ignores the outcome.
    public func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) throws {}
}

/// The built-in strategy: the seed's timing table and its documented (but never implemented) cadence,
/// without the seed's port bugs. It is the fallback whenever a script is missing or fails, so it never
/// throws and depends on nothing but the context.
///
/// Timing row, picked by the worse NAT of the pair:
///
/// | worst NAT | timeout | connect timeout | ports per round |
/// |---|---|---|---|
/// | symmetric | 4000 ms | 3000 ms | 5 |
/// | full cone (both) | 1000 ms | 800 ms | 1 |
/// | anything else | 2000 ms | 1500 ms | 3 |
///
/// Cadence, by the same worst NAT: full cone 50 ms start delay / 100 ms interval / 3 rounds; symmetric
/// 150 / 300 / 7; anything else (restricted, port restricted, unknown) 100 / 200 / 5.
///
/// Ports: every candidate port in the order given (the seed dropped all but the first N), then, when the
/// peer's NAT allocates sequentially, the next N ports it would allocate, nearest first (the seed tried
/// them in ascending order from a wrong base), counted from the last port its NAT is known to have allocated
/// (`PunchContext.lastAllocatedPort`) when the peer published one, else from its first candidate port.
public struct DefaultStrategy: PunchStrategy {
    /// One row of the seed's timing table.
    public struct TimingRow: Sendable, Hashable {
        /// Punch timeout.
        public var timeout: Duration
        /// QUIC connect timeout.
        public var connectTimeout: Duration
        /// Ports tried in parallel (probes per round).
        public var parallelPorts: Int
    }

    /// One row of the seed's documented cadence.
    public struct Cadence: Sendable, Hashable {
        /// Delay before the first probe.
        public var initialDelay: Duration
        /// Time between rounds.
        public var interval: Duration
        /// Number of rounds.
        public var retries: Int
    }

    /// `builtin-default`, the name used in logs and metrics.
    public let name = "builtin-default"

    /// Creates the strategy.
    public init() {}

    /// The timing row for a pair: symmetric anywhere, both full cone, or anything else.
    public static func timingRow(local: NATType, remote: NATType) -> TimingRow {
        if local == .symmetric || remote == .symmetric {
            return TimingRow(timeout: .milliseconds(4000), connectTimeout: .milliseconds(3000), parallelPorts: 5)
        }
        if local == .fullCone && remote == .fullCone {
            return TimingRow(timeout: .milliseconds(1000), connectTimeout: .milliseconds(800), parallelPorts: 1)
        }
        return TimingRow(timeout: .milliseconds(2000), connectTimeout: .milliseconds(1500), parallelPorts: 3)
    }

    /// The documented cadence for the worse NAT type of a pair.
    public static func cadence(worst: NATType) -> Cadence {
        switch worst {
        case .fullCone:
            Cadence(initialDelay: .milliseconds(50), interval: .milliseconds(100), retries: 3)
        case .symmetric:
            Cadence(initialDelay: .milliseconds(150), interval: .milliseconds(300), retries: 7)
        case .restricted, .portRestricted, .unknown:
            Cadence(initialDelay: .milliseconds(100), interval: .milliseconds(200), retries: 5)
        }
    }

    /// The plan described above. Never throws.
    public func plan(_ ctx: PunchContext) -> PunchPlan {
        let row = Self.timingRow(local: ctx.localNAT.type, remote: ctx.remoteNAT.type)
        let cadence = Self.cadence(worst: ctx.worstNAT)
        var specs = ctx.candidatePorts.map(PortSpec.port)
        let remote = ctx.remoteNAT
        // The base is the port the peer's NAT allocated last, when the peer published it: a NAT whose counter is
        // shared by all its mappings moved on after registration (NAT discovery alone takes ports), so counting
        // from the registration's port aims behind the counter.
        if remote.mapping != .endpointIndependent, remote.allocation == .sequential,
           let base = ctx.sequentialBase {
            for k in 1...row.parallelPorts {
                if let p = remote.predictedPort(after: base, step: k) { specs.append(.port(p)) }
            }
        }
        return PunchPlan(
            ports: PortList(specs),
            localSockets: 1,
            // The seed's "ports in parallel", never more than there are ports.
            packetsPerRound: max(1, min(row.parallelPorts, specs.isEmpty ? row.parallelPorts : PortList(specs).count)),
            interval: cadence.interval,
            rounds: cadence.retries,
            timeout: row.timeout,
            connectTimeout: row.connectTimeout,
            startDelay: cadence.initialDelay,
            initialRTT: ctx.rtt ?? .milliseconds(333),
            dialCandidatesDirectly: true,
            relay: Self.relayUse(ctx),
            directAfterRelay: Self.directAfterRelay(ctx)
        )
    }

    /// When default.lua (and this fallback, so that a failing script changes nothing here) uses the relay:
    ///
    /// - no relay available: `never`;
    /// - a pair that cannot be punched (``PunchContext/cannotBePunched``), or one whose NAT-pair history holds two or
    ///   more attempts and no success: `first`, since waiting for the punch only delays the first byte;
    /// - anything else: `after` three times the pair's median time to connect (five RTTs without one; 100 ms when
    ///   the RTT is not measured), within 1…10 s, so a pair that punches as it did before never touches the relay.
    public static func relayUse(_ ctx: PunchContext) -> RelayUse {
        guard ctx.relayAvailable else { return .never }
        let pair = ctx.pairHistory
        if ctx.cannotBePunched || (pair.attempts >= 2 && pair.successes == 0) { return .first }
        let rttMs = ctx.rtt?.milliseconds ?? 100
        let expectedMs = pair.medianTimeToConnect?.milliseconds ?? 5 * rttMs
        return .after(.fromMilliseconds(min(max(3 * expectedMs, 1000), 10_000)))
    }

    /// How long default.lua keeps punching beside a relayed connection: 10 s for a pair that cannot be punched (its
    /// punch tries only the known ports; a NAT that changed may still let one through), 30 s otherwise.
    public static func directAfterRelay(_ ctx: PunchContext) -> Duration {
        ctx.cannotBePunched ? .seconds(10) : .seconds(30)
    }
}
