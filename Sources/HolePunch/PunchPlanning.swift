import HolePunchNet
import HolePunchStrategy
import Logging

/// Planning a punch: checking its options, reserving its session, asking its strategy, and building the session
/// state machine and the runtime that will perform it.
extension PunchExecutor {
    /// Checks `options`, reserves its session in ``admission`` and plans the punch. The reservation is released
    /// if planning fails; on success it belongs to the returned runtime until the punch ends.
    func prepare(
        id: PunchID, options: PunchOptions, box: ResultBox,
        events: AsyncStream<PunchEvent>.Continuation, startedAt: ContinuousClock.Instant
    ) async throws -> PunchRuntime {
        guard !options.sessionID.isEmpty, !options.sessionID.contains(":") else {
            throw PunchError(code: .invalidOptions, message: "the session id must be non-empty and contain no ':'")
        }
        guard !options.sessionKey.isEmpty else {
            throw PunchError(code: .invalidOptions, message: "the session key is empty")
        }
        try admission.reserve(
            options.sessionID, punch: id, node: options.targetNodeID,
            maxPunches: maxConcurrentPunches, maxPerPeer: maxPunchesPerPeer
        )
        do {
            return try await plan(id: id, options: options, box: box, events: events, startedAt: startedAt)
        } catch {
            admission.forget(session: options.sessionID)
            throw error
        }
    }

    private func plan(
        id: PunchID, options: PunchOptions, box: ResultBox,
        events: AsyncStream<PunchEvent>.Continuation, startedAt: ContinuousClock.Instant
    ) async throws -> PunchRuntime {
        let host = try validatedTarget(options)
        var checks = candidateChecks(options, host: host)
        let strategy = options.strategy ?? defaultStrategy
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
            limits: limits,
            candidates: checks.pool,
            lastAllocatedPort: options.remoteLastAllocatedPort
        )
        context = history.fill(context)
        context.attempt = context.peerHistory.attempts + 1
        // The initiator dials the target's relayed address (`PunchRelay.swift`): for the initiator a relay can carry
        // the connection when the peer published one we can reach; for the target when its own endpoint has one
        // attached (the address it published), whether or not the initiator has an allocation too.
        if options.role == .target {
            context.relayAvailable = await endpoint.hasRelay
        } else {
            context.relayAvailable = options.candidates.contains { $0.kind == .relayed && canReach($0.family) }
        }
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
        let (validated, reasons) = plan.validated(limits)
        for reason in reasons {
            logger.debug("plan clamped", metadata: ["punch.id": "\(id)", "reason": "\(reason)"])
        }
        let startDelay: Duration
        switch options.punchTime {
        case .now: startDelay = .zero
        case .after(let delay): startDelay = delay
        case .at(let instant): startDelay = max(.zero, instant - clock.instant(at: clock.now()))
        }
        let startAt = clock.now() + nanoseconds(startDelay) + nanoseconds(validated.startDelay)
        let sessionPlan = checks.build(validated, limits: limits)
        let session = PunchSession(PunchSession.Configuration(
            role: options.role, candidates: checks.targets, plan: sessionPlan,
            startAt: startAt, deadline: startAt + nanoseconds(sessionPlan.timeout)
        ))
        // The hooks after planning go through `FallbackStrategy`, which keeps the plan when `on_probe` fails and
        // logs a failing `on_result`; a strategy that is one already is used as it is.
        var hookLogger = logger
        hookLogger[metadataKey: "punch.id"] = "\(id)"
        let hooks = strategy as? FallbackStrategy ?? FallbackStrategy(primary: strategy, logger: hookLogger)
        let runtime = PunchRuntime(
            id: id, options: options, session: session, context: context, strategy: hooks,
            strategyName: strategyName, box: box, events: events, startedAt: startedAt
        )
        runtime.checks = checks
        runtime.sockets = [endpoint]
        if validated.localSockets > 1 {
            runtime.sockets += try await openExtraSockets(validated.localSockets - 1, for: options, punch: id)
        }
        return runtime
    }

    /// The target host as an address (port 0), after checking the options against the endpoint.
    private func validatedTarget(_ options: PunchOptions) throws(PunchError) -> SocketAddress {
        let host: SocketAddress
        do {
            host = try SocketAddress(host: options.targetHost, port: 0)
        } catch {
            throw PunchError(code: .invalidOptions, message: "target host: \(error)")
        }
        // With typed candidates the host is only the strategy's `ctx.hosts`; candidates of a family the endpoint
        // cannot reach are skipped instead (`candidateChecks`).
        guard !options.candidates.isEmpty || canReach(host.family) else {
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
        return host
    }

    /// A `strategy`'s `onProbe` replacement plan, validated and clamped like any plan, for the punch `id` if it
    /// still runs: later rounds walk its ports on the checked candidates.
    func replacePlan(_ id: PunchID, with replacement: PunchPlan) {
        guard let runtime = runtimes[id] else { return }
        var plan = replacement
        if let timeout = runtime.options.timeout { plan.timeout = timeout }
        let (validated, _) = plan.validated(limits)
        var checks = runtime.checks
        let sessionPlan = checks.build(validated, limits: limits)
        guard !checks.targets.isEmpty else { return }
        runtime.checks = checks
        apply(runtime, runtime.session.replacePlan(sessionPlan, candidates: checks.targets))
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
