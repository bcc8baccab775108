internal import CHolePunchShims
internal import CLua
import Foundation
import Synchronization
import Logging

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

    private func run(source: [UInt8]) throws(StrategyError) {
        let top = lua_gettop(L)
        defer { lua_settop(L, top) }
        let status = watched {
            source.withUnsafeBufferPointer { buf in
                buf.withMemoryRebound(to: CChar.self) { chars in
                    hp_lua_load_run(handle, chars.baseAddress, chars.count, "@" + shortName, budget, timeNs)
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
    private func rawField(_ t: Int32, _ key: String) -> Int32 {
        lua_pushstring(L, key)
        return lua_rawget(L, t)
    }

    private func typeName(_ idx: Int32) -> String {
        String(cString: lua_typename(L, lua_type(L, idx)))
    }

    private func string(_ idx: Int32) -> String {
        var len = 0
        guard let p = hp_lua_tolstring(L, idx, &len) else { return "" }
        return String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self)
    }

    private func definitionLine(_ idx: Int32) -> Int? {
        var ar = lua_Debug()
        lua_pushvalue(L, idx)
        guard lua_getinfo(L, ">S", &ar) != 0, ar.linedefined > 0 else { return nil }
        return Int(ar.linedefined)
    }

    // MARK: Swift -> Lua values

    private func set(_ key: String, int v: Int) { lua_pushinteger(L, lua_Integer(v)); lua_setfield(L, -2, key) }
    private func set(_ key: String, number v: Double) { lua_pushnumber(L, v); lua_setfield(L, -2, key) }
    private func set(_ key: String, bool v: Bool) { lua_pushboolean(L, v ? 1 : 0); lua_setfield(L, -2, key) }
    private func set(_ key: String, string v: String) { lua_pushstring(L, v); lua_setfield(L, -2, key) }
    private func set(_ key: String, ports: some Collection<UInt16>) {
        lua_createtable(L, Int32(clamping: ports.count), 0)
        for (i, p) in ports.enumerated() {
            lua_pushinteger(L, lua_Integer(p))
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, key)
    }

    private func pushProfile(_ p: NATProfile) {
        lua_createtable(L, 0, 6)
        set("type", string: p.type.rawValue)
        set("mapping", string: p.mapping.rawValue)
        set("filtering", string: p.filtering.rawValue)
        set("allocation", string: p.allocation.rawValue)
        set("port_delta", int: p.portDelta)
        set("confidence", number: p.confidence)
    }

    private func pushHistory(_ h: HistorySummary) {
        lua_createtable(L, 0, 5)
        set("attempts", int: h.attempts)
        set("successes", int: h.successes)
        set("success_rate", number: h.successRate)
        if let m = h.medianTimeToConnect { set("median_ttc_ms", number: m.milliseconds) }
        if let o = h.lastWinningOffset { set("last_offset", int: o) }
    }

    private func pushContext(_ ctx: PunchContext) {
        lua_createtable(L, 0, 14)
        pushProfile(ctx.localNAT)
        lua_setfield(L, -2, "local_nat")
        pushProfile(ctx.remoteNAT)
        lua_setfield(L, -2, "remote_nat")
        lua_createtable(L, Int32(clamping: ctx.candidateHosts.count), 0)
        for (i, host) in ctx.candidateHosts.enumerated() {
            lua_pushstring(L, host)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, "candidates")
        set("ports", ports: ctx.candidatePorts)
        if let lp = ctx.localPort { set("local_port", int: Int(lp)) }
        if let rtt = ctx.rtt { set("rtt_ms", number: rtt.milliseconds) }
        set("attempt", int: ctx.attempt)
        set("role", string: ctx.role.rawValue)
        lua_pushinteger(L, lua_Integer(Int64(bitPattern: ctx.seed)))
        lua_setfield(L, -2, "seed")
        set("peer_id", string: ctx.peerID)
        lua_createtable(L, 0, 2)
        pushHistory(ctx.pairHistory)
        lua_setfield(L, -2, "pair")
        pushHistory(ctx.peerHistory)
        lua_setfield(L, -2, "peer")
        lua_setfield(L, -2, "history")
        lua_createtable(L, 0, 8)
        set("max_pps", number: ctx.limits.maxPacketsPerSecond)
        set("max_ports", int: ctx.limits.maxTotalPorts)
        set("max_sockets", int: ctx.limits.maxLocalSockets)
        set("max_packets_per_round", int: ctx.limits.maxPacketsPerRound)
        set("max_rounds", int: ctx.limits.maxRounds)
        set("min_timeout_ms", number: ctx.limits.timeoutBounds.lowerBound.milliseconds)
        set("max_timeout_ms", number: ctx.limits.timeoutBounds.upperBound.milliseconds)
        set("max_handshake_copies", int: ctx.limits.maxHandshakeCopies)
        lua_setfield(L, -2, "limits")
    }

    private func pushPlan(_ p: PunchPlan) {
        lua_createtable(L, 0, 11)
        set("ports", ports: p.ports)
        set("sockets", int: p.localSockets)
        set("packets_per_round", int: p.packetsPerRound)
        set("interval_ms", number: p.interval.milliseconds)
        set("rounds", int: p.rounds)
        set("timeout_ms", number: p.timeout.milliseconds)
        set("connect_timeout_ms", number: p.connectTimeout.milliseconds)
        set("start_delay_ms", number: p.startDelay.milliseconds)
        set("initial_rtt_ms", number: p.initialRTT.milliseconds)
        set("dial_direct", bool: p.dialCandidatesDirectly)
        if let ttl = p.lowTTL { set("low_ttl", int: ttl) }
        set("handshake_copies", int: p.handshakeCopies)
    }

    private func pushEvent(_ e: ProbeEvent) {
        lua_createtable(L, 0, 6)
        set("round", int: e.round)
        set("elapsed_ms", number: e.elapsed.milliseconds)
        set("probes_sent", int: e.probesSent)
        set("answered", ports: e.answeredPorts)
        set("unreachable", ports: e.unreachablePorts)
        pushPlan(e.currentPlan)
        lua_setfield(L, -2, "plan")
    }

    private func pushOutcome(_ o: PunchOutcome) {
        lua_createtable(L, 0, 6)
        switch o {
        case .success(let ttc, let port, let offset, let rounds):
            set("success", bool: true)
            set("time_to_connect_ms", number: ttc.milliseconds)
            set("winning_port", int: Int(port))
            set("port_offset", int: offset)
            set("rounds", int: rounds)
        case .failure(let code, let rounds):
            set("success", bool: false)
            set("error", string: code.rawValue)
            set("rounds", int: rounds)
        }
    }

    // MARK: Lua -> PunchPlan

    /// Most ports a plan may name before clamping; more is an error, not a clamp ("absurd counts").
    static let hardMaxPorts = 65535

    private func convertPlan(at t: Int32, line: Int?, defaults: () -> PunchPlan) throws(StrategyError) -> PunchPlan {
        var plan = defaults()
        func fail(_ field: String, _ message: String) -> StrategyError {
            StrategyError(code: .invalidPlan, message: "plan field '\(field)': \(message)", file: displayName,
                          line: line, field: field)
        }
        func number(_ field: String, _ idx: Int32 = -1) throws(StrategyError) -> Double {
            guard lua_type(L, idx) == LUA_TNUMBER else {
                throw fail(field, "expected a number, got \(typeName(idx))")
            }
            let v = lua_tonumberx(L, idx, nil)
            guard v.isFinite else { throw fail(field, "expected a finite number, got \(v)") }
            return v
        }
        func integer(_ field: String, _ range: ClosedRange<Int>, _ idx: Int32 = -1) throws(StrategyError) -> Int {
            let v = try number(field, idx)
            guard v == v.rounded() else { throw fail(field, "expected a whole number, got \(v.formatted)") }
            guard v >= Double(range.lowerBound), v <= Double(range.upperBound) else {
                throw fail(field, "\(v.formatted) is out of range \(range.lowerBound)...\(range.upperBound)")
            }
            return Int(v)
        }
        func millis(_ field: String, allowZero: Bool, max: Double) throws(StrategyError) -> Duration {
            let v = try number(field)
            guard allowZero ? v >= 0 : v > 0 else {
                throw fail(field, "must be \(allowZero ? "zero or more" : "greater than zero"), got \(v.formatted)")
            }
            guard v <= max else { throw fail(field, "\(v.formatted) ms is more than \(max.formatted) ms") }
            return .fromMilliseconds(v)
        }

        lua_pushnil(L)
        while lua_next(L, t) != 0 {
            guard lua_type(L, -2) == LUA_TSTRING else {
                throw fail("?", "plan keys must be field names; found a \(typeName(-2)) key")
            }
            let key = string(-2)
            switch key {
            case "ports": plan.ports = try ports(field: key, fail: fail)
            case "sockets": plan.localSockets = try integer(key, 1...1024)
            case "packets_per_round": plan.packetsPerRound = try integer(key, 1...65535)
            case "rounds": plan.rounds = try integer(key, 1...100_000)
            case "interval_ms": plan.interval = try millis(key, allowZero: false, max: 600_000)
            case "timeout_ms": plan.timeout = try millis(key, allowZero: false, max: 3_600_000)
            case "connect_timeout_ms": plan.connectTimeout = try millis(key, allowZero: false, max: 3_600_000)
            case "start_delay_ms": plan.startDelay = try millis(key, allowZero: true, max: 3_600_000)
            case "initial_rtt_ms": plan.initialRTT = try millis(key, allowZero: false, max: 600_000)
            case "low_ttl": plan.lowTTL = try integer(key, 1...255)
            case "handshake_copies": plan.handshakeCopies = try integer(key, 1...16)
            case "dial_direct":
                guard lua_type(L, -1) == LUA_TBOOLEAN else { throw fail(key, "expected a boolean, got \(typeName(-1))") }
                plan.dialCandidatesDirectly = lua_toboolean(L, -1) != 0
            default:
                throw fail(key, "unknown field (known: ports, sockets, packets_per_round, rounds, interval_ms, timeout_ms, connect_timeout_ms, start_delay_ms, initial_rtt_ms, dial_direct, low_ttl, handshake_copies)")
            }
            lua_settop(L, -2)
        }
        return plan
    }

    private func ports(field: String, fail: (String, String) -> StrategyError) throws(StrategyError) -> PortList {
        guard lua_type(L, -1) == LUA_TTABLE else { throw fail(field, "expected an array of ports, got \(typeName(-1))") }
        let list = lua_gettop(L)
        let n = Int(lua_rawlen(L, list))
        guard n > 0 else { throw fail(field, "must be a non-empty array") }
        guard n <= Self.hardMaxPorts else {
            throw fail(field, "\(n) entries; a plan may name at most \(Self.hardMaxPorts) ports")
        }
        func port(_ idx: Int32, _ name: String) throws(StrategyError) -> UInt16 {
            guard lua_type(L, idx) == LUA_TNUMBER else { throw fail(name, "expected a port number, got \(typeName(idx))") }
            let v = lua_tonumberx(L, idx, nil)
            guard v.isFinite, v == v.rounded() else { throw fail(name, "expected a whole port number, got \(v)") }
            guard v >= 1, v <= 65535 else { throw fail(name, "\(v.formatted) is not a port (1...65535)") }
            return UInt16(v)
        }
        var specs: [PortSpec] = []
        specs.reserveCapacity(n)
        var expanded = 0
        for i in 1...n {
            let name = "\(field)[\(i)]"
            switch lua_rawgeti(L, list, lua_Integer(i)) {
            case LUA_TNUMBER:
                specs.append(.port(try port(-1, name)))
                expanded += 1
            case LUA_TTABLE:
                guard lua_rawlen(L, -1) == 2 else { throw fail(name, "a range must be {lo, hi}") }
                lua_rawgeti(L, -1, 1)
                let lo = try port(-1, name + "[1]")
                lua_rawgeti(L, -2, 2)
                let hi = try port(-1, name + "[2]")
                guard lo <= hi else { throw fail(name, "range \(lo)...\(hi) is empty") }
                lua_settop(L, -3)
                specs.append(.range(lo...hi))
                expanded += Int(hi - lo) + 1
            default:
                throw fail(name, "expected a port or a {lo, hi} range, got \(typeName(-1))")
            }
            guard expanded <= Self.hardMaxPorts else {
                throw fail(field, "more than \(Self.hardMaxPorts) ports after expanding ranges")
            }
            lua_settop(L, -2)
        }
        return PortList(specs)
    }
}
