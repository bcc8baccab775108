internal import CHolePunchShims
internal import CLua
import Foundation
import Synchronization
import Logging
import HolePunchNet

/// Receives `hp.log` lines from C. A separate object so its address can be handed to C before the
/// engine that owns it exists.
final class LuaLogSink {
    var logger: Logger
    var strategyName: String

    init(logger: Logger, strategyName: String) {
        self.logger = logger
        self.strategyName = strategyName
    }
}

/// C-compatible thunk for `hp.log`: it only forwards; the arguments were checked (and any Lua error raised)
/// in C before it is called, so nothing here can unwind.
private let luaLogThunk: hp_lua_log_fn = { user, level, msg, len in
    guard let user, let msg else { return }
    let sink = Unmanaged<LuaLogSink>.fromOpaque(user).takeUnretainedValue()
    let text = String(decoding: UnsafeRawBufferPointer(start: msg, count: len), as: UTF8.self)
    let names = ["trace", "debug", "info", "notice", "warning", "error"]
    // A library logs at info or lower (STYLE.md §8); the script's own level travels as metadata.
    let swiftLevel: Logger.Level = level == 0 ? .trace : level == 1 ? .debug : .info
    sink.logger.log(level: swiftLevel, "strategy script log", metadata: [
        "strategy.name": "\(sink.strategyName)",
        "strategy.level": "\(names[min(max(Int(level), 0), names.count - 1)])",
        "strategy.message": "\(text)",
    ])
}

/// Owns one sandboxed `lua_State` (through `hp_lua`) with a loaded strategy, and closes it in `deinit`.
///
/// The state is not thread-safe: every use of it happens while holding `callLock` (see `LuaEngine+Calls`),
/// either on the caller's thread or on the engine's own `queue`. That is why the type can be
/// `@unchecked Sendable`: the hook methods are only reached through those two paths, the other stored
/// properties are immutable after `load` (or, like `memoryUsed` and the overrun flag, read atomically or
/// under `stateLock`). Invariant: between protected calls, Swift only uses Lua API functions that cannot
/// raise (raw accesses on tables without metatables, pushes made while the allocator is in headroom mode),
/// so a Lua error can never unwind through Swift.
final class LuaEngine: @unchecked Sendable {
    /// Held for every use of the Lua state.
    let callLock = NSLock()
    /// Where calls that must not hold up their caller's thread (the executor's) run, one at a time.
    let queue = DispatchQueue(label: "holepunch.strategy.lua")
    /// Guards `running` and `overrun`.
    let stateLock = NSLock()
    /// A call on `queue` is executing.
    var running = false
    /// The running call overran its caller's wait and was abandoned; new calls fail at once until it ends.
    var overrun = false
    let handle: OpaquePointer
    let L: OpaquePointer
    let displayName: String
    let shortName: String
    let limits: LuaStrategy.Limits
    let sink: LuaLogSink
    private(set) var name: String
    private var planRef: Int32 = 0
    private var onProbeRef: Int32?
    private var onResultRef: Int32?
    private var planLine: Int?
    private var onProbeLine: Int?

    /// Creates a state, runs `source` in it and binds the hooks it returns.
    static func load(source: some Collection<UInt8>, displayName: String, limits: LuaStrategy.Limits,
                     logger: Logger) throws(StrategyError) -> LuaEngine {
        let engine = try LuaEngine(displayName: displayName, limits: limits, logger: logger)
        try engine.run(source: Array(source))
        return engine
    }

    private init(displayName: String, limits: LuaStrategy.Limits, logger: Logger) throws(StrategyError) {
        self.displayName = displayName
        let base = (displayName as NSString).lastPathComponent
        // Lua's short_src keeps names up to LUA_IDSIZE - 1 characters; longer ones would be mangled.
        shortName = String(base.suffix(50))
        name = base.hasSuffix(".lua") ? String(base.dropLast(4)) : base
        self.limits = limits
        sink = LuaLogSink(logger: logger, strategyName: name)
        guard let h = hp_lua_new(limits.memoryLimit, luaLogThunk, Unmanaged.passUnretained(sink).toOpaque()) else {
            throw StrategyError(code: .stateCreationFailed, message: "cannot create a Lua state", file: displayName)
        }
        handle = h
        L = hp_lua_state(h)
        Self.countLive(displayName, +1)
        try runHelperLibrary()
    }

    deinit {
        hp_lua_free(handle)
        Self.countLive(displayName, -1)
    }

    /// Lua states alive in the process (the C layer's own count).
    static var liveStates: Int { Int(hp_lua_live_states()) }

    /// Lua states alive whose script is named `displayName`: what a leak test counts, undisturbed by the states
    /// other code creates meanwhile (every executor now loads the bundled strategy).
    static func liveStates(named displayName: String) -> Int {
        liveByName.withLock { $0[displayName] ?? 0 }
    }

    private static let liveByName = Mutex<[String: Int]>([:])

    private static func countLive(_ displayName: String, _ delta: Int) {
        liveByName.withLock { counts in
            let count = (counts[displayName] ?? 0) + delta
            counts[displayName] = count == 0 ? nil : count
        }
    }

    var memoryUsed: Int { Int(hp_lua_mem_used(handle)) }

    private var budget: Int64 { Int64(clamping: limits.instructionBudget) }
    private var timeNs: Int64 {
        let c = limits.timeLimit.components
        return c.seconds * 1_000_000_000 + c.attoseconds / 1_000_000_000
    }

    // MARK: loading

    /// Instructions the helper library may use to define itself (it runs a few hundred): its own budget, because it is
    /// the host's code and must load whatever limits a strategy is given.
    private static let helperLibraryBudget: Int64 = 1_000_000
    /// Wall-clock limit for the same, in nanoseconds.
    private static let helperLibraryTimeNs: Int64 = 1_000_000_000

    /// Runs the `hp` helper library (Resources/hp.lua) in the fresh state, before the strategy, passing it the
    /// legacy NAT types' difficulties so that `hp.worst_nat` ranks them as `NATType.difficulty` does.
    private func runHelperLibrary() throws(StrategyError) {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_createtable(L, 0, Int32(NATType.allCases.count))
        for type in NATType.allCases {
            lua_pushinteger(L, lua_Integer(type.difficulty))
            lua_setfield(L, -2, type.rawValue)
        }
        let status = PackageResources.hp_lua.withUnsafeBufferPointer { buf in
            buf.withMemoryRebound(to: CChar.self) { chars in
                hp_lua_load_run(handle, chars.baseAddress, chars.count, HP_LUA_PRELUDE_CHUNK, 1, Self.helperLibraryBudget,
                                Self.helperLibraryTimeNs)
            }
        }
        guard status == LUA_OK else {
            // Only a memory cap too small for the library itself gets here; the library is checked by the tests.
            let reason = lua_type(L, -1) == LUA_TSTRING ? string(-1) : "(no message)"
            throw StrategyError(code: .stateCreationFailed, message: "cannot load the hp helper library: \(reason)",
                                file: displayName)
        }
    }

    private func run(source: [UInt8]) throws(StrategyError) {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        let status = watched {
            source.withUnsafeBufferPointer { buf in
                buf.withMemoryRebound(to: CChar.self) { chars in
                    hp_lua_load_run(handle, chars.baseAddress, chars.count, "@" + shortName, 0, budget, timeNs)
                }
            }
        }
        if status != LUA_OK {
            throw error(status: status, phase: "loading the script")
        }
        guard lua_type(L, -1) == LUA_TTABLE else {
            throw StrategyError(code: .missingHook,
                                message: "the script must return a table with a plan function (it returned \(typeName(-1)))",
                                file: displayName)
        }
        let table = lua_gettop(L)
        guard rawField(table, "plan") == LUA_TFUNCTION else {
            let got = typeName(-1)
            throw StrategyError(code: .missingHook, message: "the returned table has no plan function (plan is \(got))",
                                file: displayName, field: "plan")
        }
        planLine = definitionLine(-1)
        planRef = luaL_ref(L, hp_lua_registryindex())
        for hook in ["on_probe", "on_result"] {
            let t = rawField(table, hook)
            if t == LUA_TNIL {
                lua_settop(L, -2)
                continue
            }
            guard t == LUA_TFUNCTION else {
                throw StrategyError(code: .missingHook, message: "\(hook) must be a function, not \(typeName(-1))",
                                    file: displayName, field: hook)
            }
            if hook == "on_probe" { onProbeLine = definitionLine(-1) }
            let ref = luaL_ref(L, hp_lua_registryindex())
            if hook == "on_probe" { onProbeRef = ref } else { onResultRef = ref }
        }
        let nt = rawField(table, "name")
        if nt == LUA_TSTRING {
            // Names end up in logs and metric dimensions: keep them short.
            name = String(string(-1).prefix(64))
            sink.strategyName = name
        } else if nt != LUA_TNIL {
            throw StrategyError(code: .missingHook, message: "name must be a string, not \(typeName(-1))",
                                file: displayName, field: "name")
        }
    }

    // MARK: hooks

    var hasOnProbe: Bool { onProbeRef != nil }
    var hasOnResult: Bool { onResultRef != nil }

    func plan(_ ctx: PunchContext) throws(StrategyError) -> PunchPlan {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_rawgeti(L, hp_lua_registryindex(), lua_Integer(planRef))
        pushContext(ctx)
        try call(nargs: 1, seed: ctx.seed, hook: "plan")
        guard lua_type(L, -1) == LUA_TTABLE else {
            throw StrategyError(code: .invalidPlan, message: "plan must return a table, got \(typeName(-1))",
                                file: displayName, line: planLine)
        }
        return try convertPlan(at: lua_gettop(L), line: planLine) { DefaultStrategy().plan(ctx) }
    }

    func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws(StrategyError) -> PunchPlan? {
        guard let ref = onProbeRef else { return nil }
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_rawgeti(L, hp_lua_registryindex(), lua_Integer(ref))
        pushContext(ctx)
        pushEvent(event)
        try call(nargs: 2, seed: ctx.seed &+ UInt64(max(event.round, 0)), hook: "on_probe")
        switch lua_type(L, -1) {
        case LUA_TNIL:
            return nil
        case LUA_TTABLE:
            return try convertPlan(at: lua_gettop(L), line: onProbeLine) { event.currentPlan }
        default:
            throw StrategyError(code: .invalidPlan, message: "on_probe must return nil or a table, got \(typeName(-1))",
                                file: displayName, line: onProbeLine)
        }
    }

    func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) throws(StrategyError) {
        guard let ref = onResultRef else { return }
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        lua_rawgeti(L, hp_lua_registryindex(), lua_Integer(ref))
        pushContext(ctx)
        pushOutcome(outcome)
        try call(nargs: 2, seed: ctx.seed, hook: "on_result")
    }

    private func call(nargs: Int32, seed: UInt64, hook: String) throws(StrategyError) {
        hp_lua_set_seed(handle, seed)
        let status = watched { hp_lua_call(handle, nargs, budget, timeNs) }
        if status != LUA_OK {
            throw error(status: status, phase: hook)
        }
    }

    /// Runs one call into Lua under a watchdog. The sandbox checks its deadline itself (count hook, charged library
    /// calls, large allocations), but between two hook granules a single instruction may run long without
    /// allocating (comparing multi-megabyte strings of NUL bytes: ~60 ms each, hundreds per granule). Shortly after
    /// the deadline the watchdog sets a hook on every instruction, so the next instruction boundary raises the time
    /// error: the overrun is bounded by one instruction, on the synchronous path (`strategy check`) as well.
    private func watched<T>(_ body: () -> T) -> T {
        let token = hp_lua_watch(handle)
        let deadline = DispatchTime.now() + .nanoseconds(Int(clamping: timeNs) &+ 5_000_000)
        DispatchQueue.global().asyncAfter(deadline: deadline) { [weak self] in
            // Weak: a released strategy frees its state at once. While the closure holds the engine the state
            // cannot be freed; a token of a call that has ended is ignored.
            guard let self else { return }
            hp_lua_interrupt(self.handle, token)
        }
        defer { hp_lua_unwatch(handle) }
        return body()
    }

    // MARK: errors

    private func error(status: Int32, phase: String) -> StrategyError {
        var raw = lua_type(L, -1) == LUA_TSTRING ? string(-1) : "(no message)"
        // A script chooses its error text: bound it before it reaches logs and terminals.
        if raw.utf8.count > 512 { raw = String(raw.prefix(500)) + "… (truncated)" }
        let (line, text) = splitPosition(raw)
        let code: StrategyError.Code
        switch (status, hp_lua_abort_reason(handle)) {
        case (_, Int32(HP_LUA_ABORT_BUDGET)): code = .instructionBudgetExceeded
        case (_, Int32(HP_LUA_ABORT_TIME)): code = .timeLimitExceeded
        case (_, Int32(HP_LUA_ABORT_MEMORY)), (LUA_ERRMEM, _): code = .memoryLimitExceeded
        case (LUA_ERRSYNTAX, _): code = .syntax
        default: code = .runtime
        }
        var message = text
        switch code {
        case .instructionBudgetExceeded:
            // A refused library call explains itself ("string.rep: refused, …"); the plain budget does not.
            message = text.hasSuffix("instruction budget exceeded") || text == "not enough memory"
                ? "\(phase): instruction budget of \(limits.instructionBudget) exceeded"
                : "\(phase): \(text)"
        case .timeLimitExceeded:
            message = "\(phase): time limit of \(limits.timeLimit.formattedMilliseconds) exceeded"
        case .memoryLimitExceeded:
            message = text.contains("memory limit")
                ? "\(phase): \(text)"
                : "\(phase): memory limit of \(limits.memoryLimit) bytes exceeded"
        case .syntax:
            break
        default:
            message = "\(phase): \(text)"
        }
        // An abort raised by the allocator carries no position: use the line the sandbox saw last.
        let known = line ?? (code == .runtime || code == .syntax ? nil : lastLine)
        return StrategyError(code: code, message: message, file: displayName, line: known)
    }

    /// The script line last seen running in the current (or last) call, if any; readable from any thread.
    var lastLine: Int? {
        let l = Int(hp_lua_last_line(handle))
        return l > 0 ? l : nil
    }

    /// Splits `name:line: text` when `name` is this script's short name.
    private func splitPosition(_ msg: String) -> (Int?, String) {
        let prefix = shortName + ":"
        guard msg.hasPrefix(prefix) else { return (nil, msg) }
        let rest = msg.dropFirst(prefix.count)
        guard let colon = rest.firstIndex(of: ":"), let line = Int(rest[..<colon]) else { return (nil, msg) }
        var text = rest[rest.index(after: colon)...]
        if text.hasPrefix(" ") { text = text.dropFirst() }
        return (line, String(text))
    }

    // MARK: raw access helpers (none of these can raise)

    /// Pushes `t[key]` without metamethods and returns its type.
    func rawField(_ t: Int32, _ key: String) -> Int32 {
        lua_pushstring(L, key)
        return lua_rawget(L, t)
    }

    func typeName(_ idx: Int32) -> String {
        String(cString: lua_typename(L, lua_type(L, idx)))
    }

    func string(_ idx: Int32) -> String {
        var len = 0
        guard let p = hp_lua_tolstring(L, idx, &len) else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self)
    }

    func definitionLine(_ idx: Int32) -> Int? {
        var ar = lua_Debug()
        lua_pushvalue(L, idx)
        guard lua_getinfo(L, ">S", &ar) != 0, ar.linedefined > 0 else { return nil }
        return Int(ar.linedefined)
    }
}
