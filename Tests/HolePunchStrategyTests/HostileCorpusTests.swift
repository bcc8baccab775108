import Foundation
import Testing
@testable import HolePunchStrategy

extension LuaTests {
    /// The hostile corpus in `strategies/hostile/`: scripts that do their work inside single calls into Lua's C
    /// library (or single VM instructions), where the count hook never fires. Each must end with a typed
    /// budget, time or memory error, promptly, on the executor's path and under `strategy check`.
    @Suite struct HostileCorpus {
        static let directory = LuaTests.repoRoot.appendingPathComponent("strategies/hostile")
        static var files: [String] {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
            return names.filter { $0.hasSuffix(".lua") }.sorted()
        }

        /// Far above the "about twice the limit" the sandbox achieves (see the report's table); only a hang
        /// or a call that runs for many limits fails it, not a slow machine.
        static let generousBound: Duration = .seconds(5)

        @Test func theCorpusIsThere() {
            #expect(Self.files.count >= 15, "\(Self.files)")
        }

        @Test(arguments: HostileCorpus.files)
        func endsWithATypedAbortOnTheExecutorPath(_ name: String) async throws {
            let path = Self.directory.appendingPathComponent(name).path
            let logs = CapturedLogs()
            let strategy = FallbackStrategy.loading(path: path, logger: logs.logger)
            let clock = ContinuousClock()
            let start = clock.now
            let plan = await strategy.detachedPlan(LuaTests.ctx)
            let elapsed = clock.now - start
            #expect(plan == DefaultStrategy().plan(LuaTests.ctx))
            let error = try #require(strategy.lastError)
            #expect(error.isSandboxAbort, "\(error)")
            #expect(error.file == path)
            #expect(error.line != nil, "no line in \(error)")
            #expect(elapsed < Self.generousBound, "\(name) took \(elapsed)")
            // A script that fails at run time is a warning, not a debug note.
            #expect(logs.all.contains { $0.0 == .warning && $0.2["strategy.error.code"]?.description == error.code.rawValue })
        }

        @Test(arguments: HostileCorpus.files)
        func endsWithATypedAbortOnTheSynchronousPath(_ name: String) throws {
            let path = Self.directory.appendingPathComponent(name).path
            let error: StrategyError
            do {
                let strategy = try LuaStrategy(path: path)
                _ = try strategy.plan(LuaTests.ctx)
                Issue.record("\(name) planned without an error")
                return
            } catch let e {
                error = e
            }
            #expect(error.isSandboxAbort, "\(error)")
            #expect(error.line != nil, "no line in \(error)")
        }

        @Test(arguments: HostileCorpus.files)
        func theCheckerReportsEachFileAsFailing(_ name: String) {
            let path = Self.directory.appendingPathComponent(name).path
            let errors: [StrategyError]
            do {
                errors = StrategyCheck.run(try LuaStrategy(path: path), file: path)
            } catch let e {
                errors = [e]
            }
            #expect(errors.count == 1, "\(errors)")
            #expect(errors.first?.isSandboxAbort == true, "\(errors)")
            #expect(errors.first?.description.hasPrefix(path + ":") == true, "\(errors)")
        }

        @Test func everyShippedStrategyPassesTheChecker() throws {
            let dir = LuaTests.repoRoot.appendingPathComponent("strategies")
            let shipped = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".lua") }
            #expect(shipped.count >= LuaTests.shipped.count)
            for name in shipped {
                let path = dir.appendingPathComponent(name).path
                let errors = StrategyCheck.run(try LuaStrategy(path: path), file: path)
                #expect(errors.isEmpty, "\(name): \(errors)")
            }
        }

        @Test func hostileOnProbeAndOnResultAreContainedToo() async throws {
            let logs = CapturedLogs()
            let strategy = FallbackStrategy.loading(source: """
                return {
                    plan = function(ctx) return { ports = ctx.ports } end,
                    on_probe = function(ctx, ev) return { ports = { string.rep('', 1 << 40) } } end,
                    on_result = function(ctx, r) table.move({}, 1, 1 << 40, 1) end,
                }
                """, chunkName: "hooks.lua", logger: logs.logger)
            let event = ProbeEvent(round: 1, elapsed: .milliseconds(10), probesSent: 1, answeredPorts: [],
                                   unreachablePorts: [], currentPlan: DefaultStrategy().plan(LuaTests.ctx))
            #expect(await strategy.detachedOnProbe(LuaTests.ctx, event) == nil)
            #expect(strategy.lastError?.code == .instructionBudgetExceeded)
            #expect(strategy.lastError?.line == 3, "\(String(describing: strategy.lastError))")
            await strategy.detachedOnResult(LuaTests.ctx, .failure(code: .timeout, rounds: 1))
            #expect(strategy.lastError?.code == .instructionBudgetExceeded)
            #expect(strategy.lastError?.line == 4, "\(String(describing: strategy.lastError))")
            #expect(strategy.fallbackCount == 2)
            #expect(logs.all.filter { $0.0 == .warning }.count == 2)
        }

        @Test(arguments: [
            ("local x = string.sub()", "bad argument #1 to 'sub'"),
            ("local x = table.concat({1, {}, 3})", "for 'concat'"),
            ("local x = ('x'):rep('a')", "to 'rep'"),
            ("table.sort({3, 1, 2}, function(a, b) error('boom') end)", "boom"),
        ])
        func ordinaryErrorsInBoundedCallsKeepTheirPositionAndName(_ body: String, _ expected: String) throws {
            // The bounded wrappers call the original functions from C; their errors must still read as before.
            let s = try LuaStrategy(source: LuaTests.Hostile.planBody(body), chunkName: "plain.lua")
            let e = try #require(throws: StrategyError.self) { _ = try s.plan(LuaTests.ctx) }
            #expect(e.code == .runtime)
            #expect(e.line == 2, "\(e)")
            #expect(e.message.contains(expected), "\(e)")
        }

        @Test func aLargeScriptStillLoadsAndPlans() throws {
            // Large allocations check the budget and the clock only inside a call: compiling a script (and
            // its 200 KB literal) happens before any call and must not trip over the previous call's values.
            let big = String(repeating: "x", count: 200_000)
            let s = try LuaStrategy(source: "local big = '\(big)'\n" + LuaTests.minimal)
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [50000, 50100])
            let t = try LuaStrategy(source: LuaTests.minimal)
            _ = try t.plan(LuaTests.ctx)
            try t.reload(source: "local big = '\(big)'\n" + LuaTests.minimal)
            #expect(Array(try t.plan(LuaTests.ctx).ports) == [50000, 50100])
        }

        @Test func anOverrunningCallIsAbandonedAndTheStrategyRecovers() async throws {
            // A wait shorter than the time limit stands in for a step the sandbox cannot interrupt in time.
            // The wait is long enough for the call to start even on a loaded machine, and far below the limit.
            var limits = LuaStrategy.Limits(instructionBudget: Int.max / 2, timeLimit: .seconds(2))
            limits.abandonAfterOverride = .milliseconds(200)
            let strategy = try LuaStrategy(source: """
                local first = true
                return { plan = function(ctx)
                    if first then
                        first = false
                        while true do end
                    end
                    return { ports = ctx.ports }
                end }
                """, chunkName: "overrun.lua", limits: limits)
            let abandoned = await #expect(throws: StrategyError.self) { _ = try await strategy.detachedPlan(LuaTests.ctx) }
            #expect(abandoned?.code == .timeLimitExceeded)
            #expect(abandoned?.message.contains("abandoned") == true, "\(String(describing: abandoned))")
            #expect(abandoned?.line == 5, "\(String(describing: abandoned))")
            // While the abandoned call is being stopped, calls fail at once rather than queue behind it.
            let busy = await #expect(throws: StrategyError.self) { _ = try await strategy.detachedPlan(LuaTests.ctx) }
            #expect(busy?.code == .timeLimitExceeded)
            #expect(busy?.message.contains("still stopping") == true, "\(String(describing: busy))")
            // Once the sandbox has stopped it (at the time limit), the strategy answers again.
            try await Self.waitUntilIdle(strategy)
            let plan = try await strategy.detachedPlan(LuaTests.ctx)
            #expect(Array(plan.ports) == [50000, 50100])
        }

        @Test func aCallAbandonedBeforeTheHookFiresStillNamesALine() async throws {
            // One long instruction (a 4 MiB NUL-string compare) runs before the count hook's first granule: a
            // caller that gives up first used to get no line at all (seen under load in the corpus test for
            // nul_string_compare.lua). The function the call entered is known from the start.
            var limits = LuaStrategy.Limits(instructionBudget: Int.max / 2, timeLimit: .seconds(2))
            limits.abandonAfterOverride = .milliseconds(200)
            let strategy = try LuaStrategy(source: """
                local s = "\0"
                return { plan = function(ctx)
                    while #s < (4 << 20) do s = s .. s end
                    while true do if s < s then break end end
                end }
                """, chunkName: "early.lua", limits: limits)
            let abandoned = await #expect(throws: StrategyError.self) { _ = try await strategy.detachedPlan(LuaTests.ctx) }
            #expect(abandoned?.code == .timeLimitExceeded)
            #expect(abandoned?.line == 2, "\(String(describing: abandoned))")
            try await Self.waitUntilIdle(strategy)
        }

        /// Waits (event, not sleep) until the strategy's queue has finished what it was running.
        static func waitUntilIdle(_ strategy: LuaStrategy) async throws {
            let engine = strategy.engineForTesting
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                engine.queue.async { c.resume() }
            }
        }
    }
}
