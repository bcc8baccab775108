import Foundation
import Testing
@testable import HolePunchStrategy

extension LuaTests {
    /// The hostile corpus: each script is contained with a typed error, and the fallback answers with the
    /// built-in default plan.
    @Suite struct Hostile {
        static let small = LuaStrategy.Limits(instructionBudget: 200_000, memoryLimit: 2 << 20, timeLimit: .seconds(5))

        /// Runs `source` behind a `FallbackStrategy` and checks containment; returns the typed error.
        @discardableResult
        func contained(_ source: String, limits: LuaStrategy.Limits = Hostile.small, code: StrategyError.Code,
                       field: String? = nil, atLine line: Int? = nil,
                       sourceLocation: SourceLocation = #_sourceLocation) throws -> StrategyError {
            let logs = CapturedLogs()
            let fallbacks = Counter()
            let s = FallbackStrategy.loading(source: source, chunkName: "hostile.lua", limits: limits,
                                             logger: logs.logger, onFallback: { _ in fallbacks.increment() })
            let plan = s.plan(LuaTests.ctx)
            #expect(plan == DefaultStrategy().plan(LuaTests.ctx), sourceLocation: sourceLocation)
            #expect(s.fallbackCount == 1, sourceLocation: sourceLocation)
            #expect(fallbacks.value == 1, sourceLocation: sourceLocation)
            let error = try #require(s.lastError, sourceLocation: sourceLocation)
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            #expect(error.file == "hostile.lua", sourceLocation: sourceLocation)
            if let field { #expect(error.field == field, "\(error)", sourceLocation: sourceLocation) }
            if let line { #expect(error.line == line, "\(error)", sourceLocation: sourceLocation) }
            #expect(logs.all.contains { $0.2["strategy.error.code"]?.description == code.rawValue },
                    sourceLocation: sourceLocation)
            return error
        }

        static func planBody(_ body: String) -> String {
            "return { plan = function(ctx)\n\(body)\nreturn { ports = ctx.ports } end }"
        }

        @Test func infiniteLoop() throws {
            let e = try contained(Self.planBody("while true do end"), code: .instructionBudgetExceeded, atLine: 2)
            #expect(e.description.hasPrefix("hostile.lua:2: "))
        }

        @Test func infiniteLoopThatCatchesTheBudgetError() throws {
            try contained(Self.planBody("while true do pcall(function() while true do end end) end"),
                          code: .instructionBudgetExceeded)
        }

        @Test func infiniteLoopInTheMainChunk() throws {
            try contained("while true do end", code: .instructionBudgetExceeded)
        }

        @Test func wallClockCap() throws {
            let limits = LuaStrategy.Limits(instructionBudget: Int.max / 2, memoryLimit: 2 << 20, timeLimit: .milliseconds(20))
            try contained(Self.planBody("while true do end"), limits: limits, code: .timeLimitExceeded)
        }

        @Test func unboundedTableGrowth() throws {
            let limits = LuaStrategy.Limits(instructionBudget: 100_000_000, memoryLimit: 2 << 20, timeLimit: .seconds(10))
            try contained(Self.planBody("local t = {} local i = 0 while true do i = i + 1 t[i] = {i} end"),
                          limits: limits, code: .memoryLimitExceeded)
        }

        @Test func hugeStringRep() throws {
            // The sandbox refuses 2^40 bytes up front, as a memory error that pcall cannot swallow.
            let e = try contained(Self.planBody("local s = string.rep('x', 2^40)"), code: .memoryLimitExceeded, atLine: 2)
            #expect(e.message.contains("too large"))
        }

        @Test func stringRepOfNothingIsRefusedBeforeItStarts() throws {
            // No allocation at all: 2^40 empty copies used to loop inside C, out of the hook's reach.
            let e = try contained(Self.planBody("local s = string.rep('', 1 << 40)"), code: .instructionBudgetExceeded,
                                  atLine: 2)
            #expect(e.message.contains("string.rep: refused"), "\(e)")
        }

        @Test func tableMoveOverAHugeRangeIsRefused() throws {
            let e = try contained(Self.planBody("table.move({}, 1, 1 << 40, 1)"), code: .instructionBudgetExceeded, atLine: 2)
            #expect(e.message.contains("table.move: refused"), "\(e)")
        }

        @Test func aFakeLengthCannotMakeInsertShiftForever() throws {
            let e = try contained(Self.planBody("""
                local t = setmetatable({}, { __len = function() return 1 << 40 end })
                table.insert(t, 1, 'x')
                """), code: .instructionBudgetExceeded, atLine: 3)
            #expect(e.message.contains("table.insert: refused"), "\(e)")
        }

        @Test func concatAtTheLastIntegerPositionEnds() async throws {
            // The pricing loop once ran `k <= j; k++` and never ended for j == math.maxinteger. Run it off the
            // caller with the abandon rule, so a regression fails with timeLimitExceeded instead of hanging.
            let source = """
                return { plan = function(ctx)
                    local t = {}
                    t[math.maxinteger] = "x"
                    local s = table.concat(t, "", math.maxinteger, math.maxinteger)
                    assert(s == "x")
                    return { ports = ctx.ports }
                end }
                """
            let strategy = FallbackStrategy.loading(source: source, chunkName: "concat.lua",
                                                    limits: LuaStrategy.Limits(timeLimit: .milliseconds(200)))
            _ = await strategy.detachedPlan(LuaTests.ctx)
            #expect(strategy.lastError == nil, "\(String(describing: strategy.lastError))")
        }

        @Test func aLengthThatChangesBetweenCallsIsRefused() throws {
            let e = try contained(Self.planBody("""
                local n = 0
                local t = setmetatable({}, { __len = function() n = n + 1; return n % 2 == 1 and 1 or (1 << 62) end })
                table.insert(t, 1, 'x')
                """), code: .instructionBudgetExceeded, atLine: 4)
            #expect(e.message.contains("table.insert: refused, a table whose length comes from __len"), "\(e)")
        }

        @Test func quadraticPlainFindIsCharged() throws {
            let e = try contained(Self.planBody("""
                local s, n = string.rep('a', 1 << 19), string.rep('a', 1 << 12) .. 'b'
                s:find(n, 1, true)
                """), code: .instructionBudgetExceeded, atLine: 3)
            #expect(e.message.contains("string.find"), "\(e)")
        }

        @Test func oversizedLoadChunksAreRefused() throws {
            let limits = LuaStrategy.Limits(instructionBudget: Int.max / 2, memoryLimit: 64 << 20, timeLimit: .seconds(5))
            let e = try contained(Self.planBody("load(string.rep(' ', 300000))"), limits: limits,
                                  code: .instructionBudgetExceeded, atLine: 2)
            #expect(e.message.contains("load: refused"), "\(e)")
            let many = try contained(Self.planBody("for i = 1, 100 do load('return 1') end"), limits: limits,
                                     code: .instructionBudgetExceeded, atLine: 2)
            #expect(many.message.contains("chunks"), "\(many)")
        }

        @Test func aHugeBudgetStillLeavesTheClockInCharge() throws {
            // With an instruction budget that never runs out, loops of capped library calls end on time.
            let limits = LuaStrategy.Limits(instructionBudget: Int.max / 2, memoryLimit: 8 << 20, timeLimit: .milliseconds(50))
            try contained(Self.planBody("local t = {} for i = 1, 1000 do t[i] = i end while true do table.concat(t, ',') end"),
                          limits: limits, code: .timeLimitExceeded, atLine: 2)
            try contained(Self.planBody("local t = {} while true do table.move(t, 1, 1 << 20, 1) end"),
                          limits: limits, code: .timeLimitExceeded, atLine: 2)
        }

        @Test func largeStringRepHitsTheMemoryCap() throws {
            try contained(Self.planBody("local s = string.rep('x', 2^26)"), code: .memoryLimitExceeded)
        }

        @Test func memoryErrorCaughtByPcallStillAborts() throws {
            try contained(Self.planBody("pcall(string.rep, 'x', 2^26) while true do end"), code: .memoryLimitExceeded)
        }

        @Test func deepRecursion() throws {
            // Under the default 8 MiB cap, the Lua stack hits the memory cap first.
            let limits = LuaStrategy.Limits(instructionBudget: 100_000_000)
            try contained(Self.planBody("local function f(n) return 1 + f(n + 1) end f(1)"),
                          limits: limits, code: .memoryLimitExceeded)
        }

        @Test func deepRecursionWithRoomForTheStack() throws {
            // With room to spare, Lua's own stack limit stops it, as an ordinary runtime error.
            let limits = LuaStrategy.Limits(instructionBudget: 100_000_000, memoryLimit: 256 << 20, timeLimit: .seconds(10))
            let e = try contained(Self.planBody("local function f(n) return 1 + f(n + 1) end f(1)"),
                                  limits: limits, code: .runtime)
            #expect(e.message.contains("stack overflow"))
        }

        @Test func osExecute() throws {
            let e = try contained(Self.planBody("os.execute('touch /tmp/pwned')"), code: .runtime, atLine: 2)
            #expect(e.message.contains("os"))
        }

        @Test func ioOpen() throws {
            try contained(Self.planBody("local f = io.open('/etc/passwd')"), code: .runtime, atLine: 2)
        }

        @Test func requireIsAbsent() throws {
            try contained(Self.planBody("require('os')"), code: .runtime, atLine: 2)
        }

        @Test func dofileIsAbsent() throws {
            try contained("dofile('/etc/passwd') return {}", code: .runtime, atLine: 1)
        }

        @Test func loadOfABinaryChunk() throws {
            // A binary chunk header (string.dump is removed, so it is written by hand).
            let e = try contained(Self.planBody("local f, err = load('\\27Lua\\84\\0\\25\\147\\13\\10\\26\\10') assert(f, err)"),
                                  code: .runtime, atLine: 2)
            #expect(e.message.contains("binary"))
        }

        @Test func binaryChunkAsTheScript() throws {
            let e = try contained("\u{1B}LuaT\0 binary", code: .syntax)
            #expect(e.message.contains("binary"))
        }

        @Test func coroutineYieldAcrossTheHook() throws {
            try contained(Self.planBody("coroutine.yield(1)"), code: .runtime, atLine: 2)
        }

        @Test func finaliserIsRefused() throws {
            try contained(Self.planBody("setmetatable({}, { __gc = function() while true do end end })"),
                          code: .runtime, atLine: 2)
        }

        @Test func hugeErrorMessageIsTruncated() throws {
            let e = try contained(Self.planBody("error(string.rep('x', 1000000))"), code: .runtime, atLine: 2)
            #expect(e.message.utf8.count < 1024)
            #expect(e.message.hasSuffix("(truncated)"))
        }

        @Test func nonStringError() throws {
            let e = try contained(Self.planBody("error({})"), code: .runtime, atLine: 2)
            #expect(e.message.contains("table value"))
        }

        /// A plan of a million ports, one line per step so the failing line is known.
        static let millionPortsScript = """
            return { plan = function(ctx)
                local p = {}
                for i = 1, 1000000 do p[i] = (i % 65535) + 1 end
                return { ports = p }
            end }
            """

        @Test func millionPorts() throws {
            let limits = LuaStrategy.Limits(instructionBudget: 50_000_000, memoryLimit: 128 << 20, timeLimit: .seconds(20))
            let e = try contained(Self.millionPortsScript, limits: limits, code: .invalidPlan, field: "ports", atLine: 1)
            #expect(e.message.contains("at most"))
        }

        @Test func millionPortsUnderDefaultLimits() throws {
            let e = try contained(Self.millionPortsScript, limits: LuaStrategy.Limits(), code: .instructionBudgetExceeded)
            #expect(e.line == 3)
        }

        /// One plan field out of range or of the wrong type: the returned table, the field the error names,
        /// and the line it reports where that is pinned.
        static let invalidPlanFields: [(plan: String, field: String, line: Int?)] = [
            ("{ ports = { 5, -1 } }", "ports[2]", 1),
            ("{ ports = ctx.ports, timeout_ms = 0/0 }", "timeout_ms", nil),
            ("{ ports = ctx.ports, interval_ms = math.huge }", "interval_ms", nil),
            ("{ ports = ctx.ports, sockets = 1e9 }", "sockets", nil),
            ("{ ports = ctx.ports, rounds = 2.5 }", "rounds", nil),
            ("{ ports = '1,2,3' }", "ports", nil),
            ("{ ports = ctx.ports, timout_ms = 5 }", "timout_ms", nil),
            ("{ ports = {} }", "ports", nil),
            ("{ ports = ctx.ports, candidates = { 0 } }", "candidates[1]", nil),
            ("{ ports = ctx.ports, candidates = { 1.5 } }", "candidates[1]", nil),
            ("{ ports = ctx.ports, candidates = { 1, 'x' } }", "candidates[2]", nil),
            ("{ ports = ctx.ports, candidates = { 0/0 } }", "candidates[1]", nil),
            ("{ ports = ctx.ports, candidates = 3 }", "candidates", nil),
            ("(function() local c = {} for i = 1, 5000 do c[i] = 1 end return { ports = ctx.ports, candidates = c } end)()", "candidates", nil),
            ("{ ports = ctx.ports, max_candidates = 0 }", "max_candidates", nil),
            ("{ ports = ctx.ports, max_candidates = 1e9 }", "max_candidates", nil),
            ("{ ports = ctx.ports, max_candidates = 'all' }", "max_candidates", nil),
            ("{ ports = ctx.ports, relay = 'sometimes' }", "relay", nil),
            ("{ ports = ctx.ports, relay = string.rep('x', 5000) }", "relay", nil),
            ("{ ports = ctx.ports, relay = true }", "relay", nil),
            ("{ ports = ctx.ports, relay = 250 }", "relay", nil),
            ("{ ports = ctx.ports, relay = {} }", "relay", nil),
            ("{ ports = ctx.ports, relay = { after = 250 } }", "relay", nil),
            ("{ ports = ctx.ports, relay = { 250 } }", "relay", nil),
            ("{ ports = ctx.ports, relay = { after_ms = -1 } }", "relay.after_ms", nil),
            ("{ ports = ctx.ports, relay = { after_ms = 0/0 } }", "relay.after_ms", nil),
            ("{ ports = ctx.ports, relay = { after_ms = math.huge } }", "relay.after_ms", nil),
            ("{ ports = ctx.ports, relay = { after_ms = 1e12 } }", "relay.after_ms", nil),
            ("{ ports = ctx.ports, relay = { after_ms = '250' } }", "relay.after_ms", nil),
            ("{ ports = ctx.ports, direct_after_relay_ms = -5 }", "direct_after_relay_ms", nil),
            ("{ ports = ctx.ports, direct_after_relay_ms = 1e12 }", "direct_after_relay_ms", nil),
            ("{ ports = ctx.ports, direct_after_relay_ms = 'long' }", "direct_after_relay_ms", nil),
        ]

        @Test(arguments: invalidPlanFields)
        func invalidPlanField(_ c: (plan: String, field: String, line: Int?)) throws {
            try contained("return { plan = function(ctx) return \(c.plan) end }",
                          code: .invalidPlan, field: c.field, atLine: c.line)
        }

        @Test func planReturnsNothing() throws {
            try contained("return { plan = function(ctx) end }", code: .invalidPlan)
        }

        @Test func scriptReturnsNothing() throws {
            try contained("local x = 1", code: .missingHook)
        }

        @Test func scriptWithoutPlan() throws {
            try contained("return { on_result = function() end }", code: .missingHook, field: "plan")
        }

        @Test func syntaxError() throws {
            try contained("return { plan = function(ctx) return { ports = } end }", code: .syntax, atLine: 1)
        }

        @Test func patternBacktrackingCannotHang() throws {
            // With Lua patterns this search would run for hours inside C, out of the hook's reach; find is
            // plain-text only, so it returns at once, and the pattern functions are gone.
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    assert(string.rep('a', 100000):find('a*a*a*a*a*b') == nil)
                    assert(('x.y'):find('.', 1) == 2)
                    assert(string.match == nil and string.gmatch == nil and string.gsub == nil)
                    return { ports = ctx.ports }
                end }
                """)
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [50000, 50100])
            try contained(Self.planBody("local m = ('aaaa'):match('a*a*b')"), code: .runtime, atLine: 2)
        }

        @Test func metatableTricksAreIgnored() throws {
            // Plan conversion reads raw fields: an __index cannot inject values or run code outside the
            // call, so this plan is simply empty and takes every default.
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    return setmetatable({}, { __index = function() while true do end end })
                end }
                """)
            #expect(try s.plan(LuaTests.ctx) == DefaultStrategy().plan(LuaTests.ctx))
        }
    }
}

/// A thread-safe counter for callbacks.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func increment() { lock.withLock { n += 1 } }
    var value: Int { lock.withLock { n } }
}
