import Foundation
public import Logging

extension Logger {
    /// A logger that drops everything: the default when the caller passes none.
    static var noop: Logger { Logger(label: "holepunch.strategy", factory: { _ in SwiftLogNoOpLogHandler() }) }
}

/// A strategy written in Lua 5.4, run in a sandbox: no `io`, `os`, `package`, `require` or `debug`; text
/// chunks only; an instruction budget, a memory cap and a wall-clock cap. See `docs/strategies.md`.
///
/// Limits: every Lua instruction and every call into Lua's C library is charged to the instruction
/// budget before it runs (a call that would do too much is refused up front), allocations count against
/// the memory cap, and the wall-clock cap is checked by the count hook, by library calls and by large
/// allocations.
///
/// Concurrency: a `lua_State` is not thread-safe, so every use of it holds the engine's call lock. The
/// synchronous hooks run on the caller's thread (tools, benchmarks); the executor uses the `detached…`
/// hooks, which run on the strategy's own queue and give up after twice the time limit (at least
/// 20 ms more), so a slow script never holds the executor or another strategy. This type is
/// `@unchecked Sendable` because its only mutable state, `engine`, is read and replaced under `lock`.
public final class LuaStrategy: PunchStrategy, @unchecked Sendable {
    /// Per-state resource limits.
    public struct Limits: Sendable, Hashable {
        /// Lua VM instructions allowed per hook call (counted by a count hook, in granules of 1000). Calls
        /// into the C library and large allocations are charged against it too, in instruction-sized units.
        public var instructionBudget: Int
        /// Bytes the state may allocate in total.
        public var memoryLimit: Int
        /// Wall-clock time allowed per hook call. The executor abandons a call still running at twice this
        /// (at least 20 ms more).
        public var timeLimit: Duration
        /// Tests only: how long a caller waits before abandoning a call, instead of `abandonAfter`'s rule,
        /// so that the abandon path can be exercised with a script the sandbox would stop in time.
        var abandonAfterOverride: Duration?

        /// Creates limits; the defaults are 1,000,000 instructions, 8 MiB and 100 ms. Values are kept
        /// within sane bounds: at least 1 instruction, 64 KiB (a bare state needs about 20 KiB) and 1 ms;
        /// at most 1 hour of wall-clock time.
        public init(instructionBudget: Int = 1_000_000, memoryLimit: Int = 8 << 20,
                    timeLimit: Duration = .milliseconds(100)) {
            self.instructionBudget = max(1, instructionBudget)
            self.memoryLimit = max(64 << 10, memoryLimit)
            self.timeLimit = min(max(timeLimit, .milliseconds(1)), .seconds(3600))
        }
    }

    /// The file the script came from, when it came from a file.
    public let path: String?
    /// The limits every state of this strategy gets.
    public let limits: Limits
    private let logger: Logger
    private let lock = NSLock()
    private var engine: LuaEngine

    /// Loads the script at `path`.
    public convenience init(path: String, limits: Limits = Limits(), logger: Logger? = nil) throws(StrategyError) {
        let bytes = try Self.read(path)
        try self.init(bytes: bytes, displayName: path, path: path, limits: limits, logger: logger ?? .noop)
    }

    /// Loads a script from a string; `chunkName` names it in errors (e.g. `inline.lua`).
    public convenience init(source: String, chunkName: String = "strategy.lua", limits: Limits = Limits(),
                            logger: Logger? = nil) throws(StrategyError) {
        try self.init(bytes: Array(source.utf8), displayName: chunkName, path: nil, limits: limits,
                      logger: logger ?? .noop)
    }

    private init(bytes: [UInt8], displayName: String, path: String?, limits: Limits, logger: Logger) throws(StrategyError) {
        self.path = path
        self.limits = limits
        self.logger = logger
        engine = try LuaEngine.load(source: bytes, displayName: displayName, limits: limits, logger: logger)
    }

    private static func read(_ path: String) throws(StrategyError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw StrategyError(code: .fileUnreadable, message: "cannot read the file", file: path)
        }
        return Array(data)
    }

    /// Number of Lua states alive in the process: a debug counter for leak checks.
    public static var liveStateCount: Int { LuaEngine.liveStates }

    /// Live Lua states whose script is named `chunkName` (the display name given at load).
    static func liveStateCount(named chunkName: String) -> Int { LuaEngine.liveStates(named: chunkName) }

    /// The script's `name` field, or its file name without `.lua`.
    public var name: String { lock.withLock { engine.name } }

    /// Bytes the current state has allocated.
    public var memoryUsed: Int { lock.withLock { engine.memoryUsed } }

    /// Loads the file again. If the new version fails to load, the old one stays in force and the error
    /// is thrown. Throws `fileUnreadable` for strategies that were loaded from a string.
    public func reload() throws(StrategyError) {
        guard let path else {
            throw StrategyError(code: .fileUnreadable, message: "this strategy was not loaded from a file")
        }
        let fresh = try LuaEngine.load(source: try Self.read(path), displayName: path, limits: limits, logger: logger)
        lock.withLock { engine = fresh }
    }

    /// Replaces the script with `source`, keeping the old one if the new one fails to load.
    public func reload(source: String, chunkName: String? = nil) throws(StrategyError) {
        let name = chunkName ?? lock.withLock { engine.displayName }
        let fresh = try LuaEngine.load(source: Array(source.utf8), displayName: name, limits: limits, logger: logger)
        lock.withLock { engine = fresh }
    }

    private var current: LuaEngine { lock.withLock { engine } }

    /// The engine in force, for tests that wait on its queue.
    var engineForTesting: LuaEngine { current }

    /// Runs the script's `plan(ctx)`. Missing fields take the built-in default plan's values for `ctx`.
    public func plan(_ ctx: PunchContext) throws(StrategyError) -> PunchPlan {
        try current.withState(hook: "plan") { (e) throws(StrategyError) in try e.plan(ctx) }
    }

    /// Runs `on_probe(ctx, event)` if the script has one; missing fields keep the current plan's values.
    public func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws(StrategyError) -> PunchPlan? {
        try current.withState(hook: "on_probe") { (e) throws(StrategyError) in try e.onProbe(ctx, event) }
    }

    /// Runs `on_result(ctx, outcome)` if the script has one.
    public func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) throws(StrategyError) {
        try current.withState(hook: "on_result") { (e) throws(StrategyError) in try e.onResult(ctx, outcome) }
    }

    /// ``plan(_:)`` on the strategy's own queue; a call that overruns is abandoned with `timeLimitExceeded`.
    public func detachedPlan(_ ctx: PunchContext) async throws(StrategyError) -> PunchPlan {
        try await current.detached(hook: "plan") { (e) throws(StrategyError) in try e.plan(ctx) }
    }

    /// ``onProbe(_:_:)`` on the strategy's own queue, with the same bound.
    public func detachedOnProbe(_ ctx: PunchContext, _ event: ProbeEvent) async throws(StrategyError) -> PunchPlan? {
        let engine = current
        // Most scripts have no on_probe: skip the queue hop and the timer for every round of every punch.
        guard engine.hasOnProbe else { return nil }
        return try await engine.detached(hook: "on_probe") { (e) throws(StrategyError) in try e.onProbe(ctx, event) }
    }

    /// ``onResult(_:_:)`` on the strategy's own queue, with the same bound.
    public func detachedOnResult(_ ctx: PunchContext, _ outcome: PunchOutcome) async throws(StrategyError) {
        let engine = current
        guard engine.hasOnResult else { return }
        try await engine.detached(hook: "on_result") { (e) throws(StrategyError) in try e.onResult(ctx, outcome) }
    }
}

/// Wraps a strategy so that a failing script never breaks a punch: on any error it logs why, counts a
/// fallback and answers with ``DefaultStrategy`` (or the fallback given). The executor uses this wrapper,
/// calls its non-throwing hooks, and maps ``fallbackCount`` / `onFallback` to its metric.
public final class FallbackStrategy: PunchStrategy, @unchecked Sendable {
    // @unchecked Sendable: `current`, `count` and `last` are only touched under `lock`; the rest is
    // immutable. Hooks run outside the lock, so a slow script never blocks `fallbackCount` readers.

    /// What answers when the primary fails.
    public let fallback: DefaultStrategy
    private let logger: Logger
    private let onFallback: (@Sendable (StrategyError) -> Void)?
    private let reloadPath: String?
    private let reloadLimits: LuaStrategy.Limits
    private let lock = NSLock()
    private var current: (any PunchStrategy)?
    /// Loads the primary on first use (`recommended(limits:logger:onFallback:)`): every executor configuration
    /// made with the default strategy would otherwise build a Lua state it may never run.
    private var pendingLoad: (() throws(StrategyError) -> any PunchStrategy)?
    private var count = 0
    private var last: StrategyError?

    /// Wraps `primary`. `loadError` is the reason when `primary` is nil; `onFallback` is called (outside
    /// any lock) each time the fallback is used, e.g. to increment a metric.
    public convenience init(primary: (any PunchStrategy)?, loadError: StrategyError? = nil, logger: Logger? = nil,
                            onFallback: (@Sendable (StrategyError) -> Void)? = nil) {
        self.init(primary: primary, loadError: loadError, path: nil, limits: .init(), logger: logger,
                  onFallback: onFallback)
    }

    private init(primary: (any PunchStrategy)?, loadError: StrategyError?, path: String?, limits: LuaStrategy.Limits,
                 logger: Logger?, onFallback: (@Sendable (StrategyError) -> Void)?) {
        self.current = primary
        self.fallback = DefaultStrategy()
        self.logger = logger ?? .noop
        self.onFallback = onFallback
        self.last = loadError
        self.reloadPath = path
        self.reloadLimits = limits
        if let loadError {
            self.logger.info("strategy failed to load, using the built-in default", metadata: Self.metadata(loadError))
        }
    }

    /// Loads the Lua script at `path`; if that fails, the wrapper runs the built-in default and says why.
    /// ``reload()`` can load the file again later, e.g. once it is fixed.
    public static func loading(path: String, limits: LuaStrategy.Limits = .init(), logger: Logger? = nil,
                               onFallback: (@Sendable (StrategyError) -> Void)? = nil) -> FallbackStrategy {
        do {
            return FallbackStrategy(primary: try LuaStrategy(path: path, limits: limits, logger: logger),
                                    loadError: nil, path: path, limits: limits, logger: logger, onFallback: onFallback)
        } catch {
            return FallbackStrategy(primary: nil, loadError: error, path: path, limits: limits, logger: logger,
                                    onFallback: onFallback)
        }
    }

    /// Loads a Lua script from a string, with the same fallback rule.
    public static func loading(source: String, chunkName: String = "strategy.lua", limits: LuaStrategy.Limits = .init(),
                               logger: Logger? = nil,
                               onFallback: (@Sendable (StrategyError) -> Void)? = nil) -> FallbackStrategy {
        do {
            return FallbackStrategy(primary: try LuaStrategy(source: source, chunkName: chunkName, limits: limits,
                                                             logger: logger),
                                    logger: logger, onFallback: onFallback)
        } catch {
            return FallbackStrategy(primary: nil, loadError: error, logger: logger, onFallback: onFallback)
        }
    }

    /// The wrapped strategy; nil while the script could not be loaded.
    public var primary: (any PunchStrategy)? {
        loadIfPending()
        return lock.withLock { current }
    }

    /// A wrapper that loads its primary with `load` when first asked for it, with the same fallback rule.
    static func deferred(logger: Logger?, onFallback: (@Sendable (StrategyError) -> Void)?,
                         _ load: @escaping () throws(StrategyError) -> any PunchStrategy) -> FallbackStrategy {
        let strategy = FallbackStrategy(primary: nil, loadError: nil, logger: logger, onFallback: onFallback)
        strategy.pendingLoad = load
        return strategy
    }

    /// Whether the primary has been loaded (or failed to load): false until a deferred wrapper is first used.
    var hasLoadedPrimary: Bool { lock.withLock { pendingLoad == nil } }

    private func loadIfPending() {
        let failure = lock.withLock { () -> StrategyError? in
            guard let load = pendingLoad else { return nil }
            pendingLoad = nil
            do {
                current = try load()
                return nil
            } catch {
                // `load` throws only StrategyError; NSLock's untyped closure erases the type.
                let failure = StrategyError.wrapping(error)
                last = failure
                return failure
            }
        }
        if let failure {
            logger.info("strategy failed to load, using the built-in default", metadata: Self.metadata(failure))
        }
    }

    /// Loads the script file again. A Lua primary reloads in place and keeps its old version if the new
    /// one is invalid; a wrapper whose file never loaded tries to load it now. Throws the load error, or
    /// `fileUnreadable` when the wrapper was not created from a file.
    public func reload() throws(StrategyError) {
        if let lua = primary as? LuaStrategy, lua.path != nil {
            try lua.reload()
            return
        }
        guard let path = reloadPath else {
            throw StrategyError(code: .fileUnreadable, message: "this strategy was not loaded from a file")
        }
        let fresh = try LuaStrategy(path: path, limits: reloadLimits, logger: logger)
        lock.withLock { current = fresh }
    }

    /// The primary's name, or `unloaded` when the script never loaded.
    public var name: String { primary?.name ?? "unloaded" }

    /// How many hook calls were answered by the fallback (or failed, for `onResult`).
    public var fallbackCount: Int { lock.withLock { count } }

    /// The most recent failure (including a load failure), if any.
    public var lastError: StrategyError? {
        loadIfPending()
        return lock.withLock { last }
    }

    /// The primary's plan, or the default plan when it fails or is missing.
    public func plan(_ ctx: PunchContext) -> PunchPlan {
        guard let primary else {
            noteFallback(lastError ?? StrategyError(code: .missingHook, message: "no strategy loaded"), hook: "plan")
            return fallback.plan(ctx)
        }
        do {
            return try primary.plan(ctx)
        } catch {
            noteFallback(StrategyError.wrapping(error), hook: "plan")
            return fallback.plan(ctx)
        }
    }

    /// The primary's replacement plan, or nil (keep the current plan) when it fails.
    public func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) -> PunchPlan? {
        guard let primary else { return nil }
        do {
            return try primary.onProbe(ctx, event)
        } catch {
            noteFallback(StrategyError.wrapping(error), hook: "on_probe")
            return nil
        }
    }

    /// Forwards the outcome; a failure is logged and counted, never thrown.
    public func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) {
        guard let primary else { return }
        do {
            try primary.onResult(ctx, outcome)
        } catch {
            noteFallback(StrategyError.wrapping(error), hook: "on_result")
        }
    }

    /// ``plan(_:)`` through the primary's `detachedPlan`: off the caller's executor, bounded in time.
    public func detachedPlan(_ ctx: PunchContext) async -> PunchPlan { await detachedDecision(ctx).plan }

    /// ``detachedPlan(_:)`` with who planned: the primary's name, or `builtin-default` and the primary's
    /// error (or load error) when the fallback answered. The fallback is counted and logged as usual.
    public func detachedDecision(_ ctx: PunchContext) async -> PlanDecision {
        guard let primary else {
            let reason = lastError ?? StrategyError(code: .missingHook, message: "no strategy loaded")
            noteFallback(reason, hook: "plan")
            return .fallback(ctx, reason: reason)
        }
        let decision = await primary.detachedDecision(ctx)
        if let reason = decision.fallbackReason { noteFallback(reason, hook: "plan") }
        return decision
    }

    /// ``onProbe(_:_:)`` through the primary's `detachedOnProbe`.
    public func detachedOnProbe(_ ctx: PunchContext, _ event: ProbeEvent) async -> PunchPlan? {
        guard let primary else { return nil }
        do {
            return try await primary.detachedOnProbe(ctx, event)
        } catch {
            noteFallback(StrategyError.wrapping(error), hook: "on_probe")
            return nil
        }
    }

    /// ``onResult(_:_:)`` through the primary's `detachedOnResult`.
    public func detachedOnResult(_ ctx: PunchContext, _ outcome: PunchOutcome) async {
        guard let primary else { return }
        do {
            try await primary.detachedOnResult(ctx, outcome)
        } catch {
            noteFallback(StrategyError.wrapping(error), hook: "on_result")
        }
    }

    private static func metadata(_ e: StrategyError) -> Logger.Metadata {
        var m: Logger.Metadata = ["strategy.error.code": "\(e.code)", "strategy.error": "\(e.description)"]
        if let f = e.file { m["strategy.file"] = "\(f)" }
        if let l = e.line { m["strategy.line"] = "\(l)" }
        if let f = e.field { m["strategy.field"] = "\(f)" }
        return m
    }

    private func noteFallback(_ error: StrategyError, hook: String) {
        lock.withLock {
            count += 1
            last = error
        }
        var meta = Self.metadata(error)
        meta["strategy.name"] = "\(name)"
        meta["strategy.hook"] = "\(hook)"
        // Warning, not info: a script that fails at run time is a fault the operator must see, even though
        // the punch itself goes on with the built-in plan.
        logger.warning("strategy failed, using the built-in default", metadata: meta)
        onFallback?(error)
    }
}
