internal import CHolePunchShims
internal import CLua
import HolePunchNet

// The values that cross between Swift and Lua: a context, event or outcome pushed as tables, and a returned
// table read back as a plan. Split from LuaEngine.swift, which owns the state and its calls; everything here
// runs under `callLock` between protected calls, with the non-raising API only (see ``LuaEngine``).
extension LuaEngine {
    // MARK: Swift -> Lua values

    func set(_ key: String, int v: Int) { lua_pushinteger(L, lua_Integer(v)); lua_setfield(L, -2, key) }
    func set(_ key: String, number v: Double) { lua_pushnumber(L, v); lua_setfield(L, -2, key) }
    func set(_ key: String, bool v: Bool) { lua_pushboolean(L, v ? 1 : 0); lua_setfield(L, -2, key) }
    func set(_ key: String, string v: String) { lua_pushstring(L, v); lua_setfield(L, -2, key) }
    func set(_ key: String, ports: some Collection<some BinaryInteger>) {
        lua_createtable(L, Int32(clamping: ports.count), 0)
        for (i, p) in ports.enumerated() {
            lua_pushinteger(L, lua_Integer(p))
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, key)
    }

    func pushProfile(_ p: NATProfile) {
        lua_createtable(L, 0, 6)
        set("type", string: p.type.rawValue)
        set("mapping", string: p.mapping.rawValue)
        set("filtering", string: p.filtering.rawValue)
        set("allocation", string: p.allocation.rawValue)
        set("port_delta", int: p.portDelta)
        set("confidence", number: p.confidence)
    }

    func pushHistory(_ h: HistorySummary) {
        lua_createtable(L, 0, 5)
        set("attempts", int: h.attempts)
        set("successes", int: h.successes)
        set("success_rate", number: h.successRate)
        if let m = h.medianTimeToConnect { set("median_ttc_ms", number: m.milliseconds) }
        if let o = h.lastWinningOffset { set("last_offset", int: o) }
    }

    /// One typed candidate: `kind`, `family`, `address` (and its alias `host`), `port`, `priority`; a `mapped` one
    /// also `protocol` and `lease` (seconds), so a strategy can prefer or ignore router mappings.
    func pushCandidate(_ c: Candidate) {
        lua_createtable(L, 0, 8)
        set("kind", string: c.kind.rawValue)
        set("family", string: c.family.rawValue)
        set("address", string: c.address.host)
        set("host", string: c.address.host)
        set("port", int: Int(c.address.port))
        set("priority", int: Int(c.priority))
        if let mapping = c.mapping {
            set("protocol", string: mapping.protocolName)
            set("lease", int: Int(mapping.lifetimeSeconds))
        }
    }

    func pushContext(_ ctx: PunchContext) {
        lua_createtable(L, 0, 18)
        pushProfile(ctx.localNAT)
        lua_setfield(L, -2, "local_nat")
        pushProfile(ctx.remoteNAT)
        lua_setfield(L, -2, "remote_nat")
        lua_createtable(L, Int32(clamping: ctx.candidateHosts.count), 0)
        for (i, host) in ctx.candidateHosts.enumerated() {
            lua_pushstring(L, host)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, "hosts")
        lua_createtable(L, Int32(clamping: ctx.candidates.count), 0)
        for (i, candidate) in ctx.candidates.enumerated() {
            pushCandidate(candidate)
            lua_rawseti(L, -2, lua_Integer(i + 1))
        }
        lua_setfield(L, -2, "candidates")
        if let last = ctx.lastAllocatedPort { set("last_allocated_port", int: Int(last)) }
        set("ports", ports: ctx.candidatePorts)
        if let lp = ctx.localPort { set("local_port", int: Int(lp)) }
        if let rtt = ctx.rtt { set("rtt_ms", number: rtt.milliseconds) }
        set("attempt", int: ctx.attempt)
        set("role", string: ctx.role.rawValue)
        lua_pushinteger(L, lua_Integer(Int64(bitPattern: ctx.seed)))
        lua_setfield(L, -2, "seed")
        set("peer_id", string: ctx.peerID)
        set("relay_available", bool: ctx.relayAvailable)
        lua_createtable(L, 0, 2)
        pushHistory(ctx.pairHistory)
        lua_setfield(L, -2, "pair")
        pushHistory(ctx.peerHistory)
        lua_setfield(L, -2, "peer")
        lua_setfield(L, -2, "history")
        lua_createtable(L, 0, 11)
        set("max_pps", number: ctx.limits.maxPacketsPerSecond)
        set("max_ports", int: ctx.limits.maxTotalPorts)
        set("max_sockets", int: ctx.limits.maxLocalSockets)
        set("max_packets_per_round", int: ctx.limits.maxPacketsPerRound)
        set("max_rounds", int: ctx.limits.maxRounds)
        set("min_timeout_ms", number: ctx.limits.timeoutBounds.lowerBound.milliseconds)
        set("max_timeout_ms", number: ctx.limits.timeoutBounds.upperBound.milliseconds)
        set("max_handshake_copies", int: ctx.limits.maxHandshakeCopies)
        set("max_candidates", int: ctx.limits.maxCandidates)
        set("max_relay_after_ms", number: ctx.limits.maxRelayDelay.milliseconds)
        set("max_direct_after_relay_ms", number: ctx.limits.maxDirectAfterRelay.milliseconds)
        lua_setfield(L, -2, "limits")
    }

    func pushPlan(_ p: PunchPlan) {
        lua_createtable(L, 0, 16)
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
        if let order = p.candidateOrder { set("candidates", ports: order.map { $0 + 1 }) }
        if let cap = p.maxCandidates { set("max_candidates", int: cap) }
        switch p.relay {
        case .never: set("relay", string: "never")
        case .first: set("relay", string: "first")
        case .after(let delay):
            lua_createtable(L, 0, 1)
            set("after_ms", number: delay.milliseconds)
            lua_setfield(L, -2, "relay")
        }
        set("direct_after_relay_ms", number: p.directAfterRelay.milliseconds)
    }

    func pushEvent(_ e: ProbeEvent) {
        lua_createtable(L, 0, 6)
        set("round", int: e.round)
        set("elapsed_ms", number: e.elapsed.milliseconds)
        set("probes_sent", int: e.probesSent)
        set("answered", ports: e.answeredPorts)
        set("unreachable", ports: e.unreachablePorts)
        pushPlan(e.currentPlan)
        lua_setfield(L, -2, "plan")
    }

    func pushOutcome(_ o: PunchOutcome) {
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

    func convertPlan(at t: Int32, line: Int?, defaults: () -> PunchPlan) throws(StrategyError) -> PunchPlan {
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
            case "max_candidates": plan.maxCandidates = try integer(key, 1...Self.hardMaxCandidates)
            case "candidates": plan.candidateOrder = try candidateIndices(field: key, fail: fail)
            case "handshake_copies": plan.handshakeCopies = try integer(key, 1...16)
            case "relay": plan.relay = try relayUse(field: key, fail: fail)
            case "direct_after_relay_ms": plan.directAfterRelay = try millis(key, allowZero: true, max: Self.hardMaxRelayMs)
            case "dial_direct":
                guard lua_type(L, -1) == LUA_TBOOLEAN else { throw fail(key, "expected a boolean, got \(typeName(-1))") }
                plan.dialCandidatesDirectly = lua_toboolean(L, -1) != 0
            default:
                throw fail(key, "unknown field (known: ports, sockets, packets_per_round, rounds, interval_ms, timeout_ms, connect_timeout_ms, start_delay_ms, initial_rtt_ms, dial_direct, low_ttl, handshake_copies, candidates, max_candidates, relay, direct_after_relay_ms)")
            }
            lua_settop(L, -2)
        }
        return plan
    }

    /// Longest relay delay or `direct_after_relay_ms` a plan may name before clamping (one hour); more is an error.
    static let hardMaxRelayMs = 3_600_000.0

    /// `relay`: `"never"`, `"first"` or `{ after_ms = N }` (N in 0…``hardMaxRelayMs``, clamped later to
    /// ``PlanLimits/maxRelayDelay``). Anything else, or a table with another key, is a typed plan error.
    func relayUse(field: String, fail: (String, String) -> StrategyError) throws(StrategyError) -> RelayUse {
        switch lua_type(L, -1) {
        case LUA_TSTRING:
            switch string(-1) {
            case "never": return .never
            case "first": return .first
            case let other:
                let shown = other.count > 40 ? String(other.prefix(40)) + "…" : other
                throw fail(field, "expected \"never\", \"first\" or { after_ms = N }, got \"\(shown)\"")
            }
        case LUA_TTABLE:
            let table = lua_gettop(L)
            var delay: Duration?
            lua_pushnil(L)
            while lua_next(L, table) != 0 {
                guard lua_type(L, -2) == LUA_TSTRING, string(-2) == "after_ms" else {
                    throw fail(field, "a relay table has one key, after_ms")
                }
                let name = "\(field).after_ms"
                guard lua_type(L, -1) == LUA_TNUMBER else { throw fail(name, "expected a number, got \(typeName(-1))") }
                let v = lua_tonumberx(L, -1, nil)
                guard v.isFinite, v >= 0 else { throw fail(name, "expected a finite number of milliseconds, zero or more") }
                guard v <= Self.hardMaxRelayMs else {
                    throw fail(name, "\(v.formatted) ms is more than \(Self.hardMaxRelayMs.formatted) ms")
                }
                delay = .fromMilliseconds(v)
                lua_settop(L, -2)
            }
            guard let delay else { throw fail(field, "a relay table needs after_ms") }
            return .after(delay)
        default:
            throw fail(field, "expected \"never\", \"first\" or { after_ms = N }, got \(typeName(-1))")
        }
    }

    /// Most entries `candidates` and `max_candidates` may name before clamping; more is an error.
    static let hardMaxCandidates = 1024

    /// `candidates`: an array of 1-based indices into `ctx.candidates`, returned 0-based. Indices past the end are
    /// accepted here and ignored by the executor (a script need not know how many the peer published).
    func candidateIndices(field: String, fail: (String, String) -> StrategyError) throws(StrategyError) -> [Int] {
        guard lua_type(L, -1) == LUA_TTABLE else { throw fail(field, "expected an array of candidate indices, got \(typeName(-1))") }
        let list = lua_gettop(L)
        let n = Int(lua_rawlen(L, list))
        guard n <= Self.hardMaxCandidates else {
            throw fail(field, "\(n) entries; a plan may name at most \(Self.hardMaxCandidates) candidates")
        }
        var indices: [Int] = []
        indices.reserveCapacity(n)
        for i in stride(from: 1, through: n, by: 1) {
            let name = "\(field)[\(i)]"
            guard lua_rawgeti(L, list, lua_Integer(i)) == LUA_TNUMBER else {
                throw fail(name, "expected a candidate index, got \(typeName(-1))")
            }
            let v = lua_tonumberx(L, -1, nil)
            guard v.isFinite, v == v.rounded() else { throw fail(name, "expected a whole candidate index, got \(v)") }
            guard v >= 1, v <= Double(Self.hardMaxCandidates) else {
                throw fail(name, "\(v.formatted) is not a candidate index (1...\(Self.hardMaxCandidates))")
            }
            indices.append(Int(v) - 1)
            lua_settop(L, -2)
        }
        return indices
    }

    func ports(field: String, fail: (String, String) -> StrategyError) throws(StrategyError) -> PortList {
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
