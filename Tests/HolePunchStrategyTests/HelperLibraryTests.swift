import HolePunchNet
import Testing
@testable import HolePunchStrategy

extension LuaTests {
    /// The `hp` helper library (Resources/hp.lua, run before each strategy): what a strategy can rely on
    /// beyond the per-helper results that `Basics.helpers` checks.
    @Suite struct HelperLibrary {
        /// Runs `body` as the body of a plan hook and returns the plan (or throws the strategy's error).
        static func plan(_ body: String, limits: LuaStrategy.Limits = .init()) throws -> PunchPlan {
            let s = try LuaStrategy(source: "return { plan = function(ctx)\n\(body)\nreturn { ports = ctx.ports }\nend }",
                                    chunkName: "helpers.lua", limits: limits)
            return try s.plan(LuaTests.ctx)
        }

        @Test("hp.worst_nat ranks every pair as NATType.worst does")
        func worstNATFollowsDifficulty() throws {
            var checks = ""
            for a in NATType.allCases {
                for b in NATType.allCases {
                    let expected = NATType.worst(a, b).rawValue
                    checks += "assert(hp.worst_nat('\(a)', '\(b)') == '\(expected)', '\(a) vs \(b)')\n"
                }
            }
            _ = try Self.plan(checks)
        }

        @Test("an argument error names the helper and the strategy's line")
        func argumentErrorsPointAtTheCaller() throws {
            let error = try #require(throws: StrategyError.self) {
                try Self.plan("local x = 1\nhp.range(1, 9, 0)")
            }
            #expect(error.code == .runtime)
            #expect(error.line == 3)
            #expect(error.message.contains("bad argument #3 to 'range' (step must not be zero)"))
        }

        @Test("a limit hit inside a helper is reported at the strategy's line, not the library's")
        func limitsInsideHelpersNameTheStrategyLine() throws {
            let limits = LuaStrategy.Limits(instructionBudget: 1_000_000, memoryLimit: 64 << 20, timeLimit: .seconds(10))
            let error = try #require(throws: StrategyError.self) {
                try Self.plan("local x = 1\nfor i = 1, 1000 do hp.range(1, 60000) end", limits: limits)
            }
            #expect(error.code == .instructionBudgetExceeded)
            #expect(error.line == 3, "\(error)")
        }

        @Test("argument checks keep their messages")
        func argumentMessages() throws {
            _ = try Self.plan("""
                local function msg(f, ...) local ok, e = pcall(f, ...); assert(not ok); return e end
                assert(msg(hp.sequence, 1, 1, -1):find("count must be in 0...65536", 1, true))
                assert(msg(hp.around, 1, 40000):find("radius must be in 0...32767", 1, true))
                assert(msg(hp.random_ports, 5, 0):find("must be a port (1...65535)", 1, true))
                assert(msg(hp.merge, {1}, 7):find("table expected, got number", 1, true))
                assert(msg(hp.merge, {1, 70000}):find("argument 1, element 2 is not a port", 1, true))
                assert(msg(hp.clamp, 1, 3, 2):find("hi must not be below lo", 1, true))
                assert(msg(hp.range, 1.5, 3):find("number has no integer representation", 1, true))
                assert(msg(hp.worst_nat, {type = "bogus"}, "full_cone"):find("not a NAT type name", 1, true))
                assert(hp.version == 1)
                """)
        }

        @Test("a strategy that replaces globals does not change what hp does")
        func capturedBuiltins() throws {
            _ = try Self.plan("""
                math.random = function() return 7 end
                math.tointeger = nil
                error, type, select, rawlen = nil, nil, nil, nil
                local p = hp.random_ports(50, 2000, 2100)
                local seen = {}
                for _, v in ipairs(p) do assert(not seen[v] and v >= 2000 and v <= 2100); seen[v] = true end
                assert(#hp.merge({1, 2}, {2, 3}) == 3)
                """)
        }

        @Test("hp.random_ports draws what math.random draws, so plans stay deterministic for ctx.seed")
        func randomPortsUseTheCallGenerator() throws {
            // Each call restarts the generator from ctx.seed: the first call draws by hand, the second through hp.
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    if DRAWN == nil then
                        local seen, n = {}, 0
                        DRAWN = {}
                        while n < 20 do
                            local p = math.random(3000, 3040)
                            if not seen[p] then seen[p] = true; n = n + 1; DRAWN[n] = p end
                        end
                    else
                        local p = hp.random_ports(20, 3000, 3040)
                        for i = 1, 20 do assert(p[i] == DRAWN[i], "draw " .. i) end
                    end
                    return { ports = ctx.ports }
                end }
                """)
            _ = try s.plan(LuaTests.ctx)
            _ = try s.plan(LuaTests.ctx)
        }

        @Test("the library loads under the smallest limits a test uses")
        func loadsUnderSmallLimits() throws {
            let limits = LuaStrategy.Limits(instructionBudget: 10, memoryLimit: 2 << 20, timeLimit: .milliseconds(20))
            // The strategy's own budget is far below what the library needs to define itself (hundreds of instructions).
            let s = try LuaStrategy(source: "return { plan = function(ctx) return { ports = { 1 } } end }",
                                    limits: limits)
            #expect(s.name == "strategy")
        }
    }
}
