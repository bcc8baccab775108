import Foundation
import Testing
@testable import HolePunchStrategy

/// The strategy author's loop: `check` covers the contexts a real run produces (no RTT, histories), and
/// `simulate` replays a series of attempts through `on_result`; plus the bundled default.lua.
extension LuaTests {
    @Suite struct AuthorLoop {
        /// Overruns its wall-clock limit on the calls `overrunning` says, and plans normally otherwise.
        final class WallClockOverrunner: PunchStrategy, @unchecked Sendable {
            let name = "overrunner"
            let overrunning: (Int) -> Bool
            private let lock = NSLock()
            private var calls = 0
            init(overrunning: @escaping (Int) -> Bool) { self.overrunning = overrunning }
            func plan(_ ctx: PunchContext) throws -> PunchPlan {
                let call = lock.withLock { calls += 1; return calls }
                if overrunning(call) {
                    throw StrategyError(code: .timeLimitExceeded, message: "plan: time limit of 100 ms exceeded", file: "overrunner.lua")
                }
                return DefaultStrategy().plan(ctx)
            }
        }

        @Test func checkDoesNotBlameAScriptForOneWallClockOverrun() {
            // The first call overruns (a loaded machine), the retry plans: not the script's fault.
            let once = WallClockOverrunner { $0 == 1 }
            #expect(StrategyCheck.run(once, file: "overrunner.lua").isEmpty)
            // Every call overruns: really slow, reported.
            let always = WallClockOverrunner { _ in true }
            let errors = StrategyCheck.run(always, file: "overrunner.lua")
            #expect(errors.first?.code == .timeLimitExceeded)
        }

        @Test func checkReportsADivisionOfAMissingRTTWithItsLine() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    local half = ctx.rtt_ms / 2
                    return { ports = ctx.ports, interval_ms = half }
                end }
                """, chunkName: "halfrtt.lua")
            let errors = StrategyCheck.run(s, file: "halfrtt.lua")
            let error = try #require(errors.first, "check passed a script that divides a nil rtt_ms")
            #expect(error.code == .runtime)
            #expect(error.description.hasPrefix("halfrtt.lua:2: "), "\(error.description)")
            #expect(error.message.contains("rtt nil"), "the first failing context should say the RTT was nil")
        }

        @Test func checkReportsAHistoryFieldThatIsNilAfterFailures() throws {
            // median_ttc_ms exists only once a punch succeeded: attempts > 0 does not imply it.
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    local t = 4000
                    if ctx.history.pair.attempts > 0 then t = 3 * ctx.history.pair.median_ttc_ms end
                    return { ports = ctx.ports, timeout_ms = t }
                end }
                """, chunkName: "median.lua")
            let errors = StrategyCheck.run(s, file: "median.lua")
            let error = try #require(errors.first, "check passed a script that multiplies a nil median")
            #expect(error.description.hasPrefix("median.lua:3: "), "\(error.description)")
        }

        @Test func checkCoversBothRolesNilRTTAndHistories() {
            let contexts = StrategyCheck.allContexts().map(\.ctx)
            #expect(Set(contexts.map(\.role)) == Set(PunchRole.allCases))
            #expect(contexts.contains { $0.rtt == nil })
            #expect(contexts.contains { $0.rtt != nil })
            #expect(contexts.contains { $0.pairHistory.attempts == 0 && $0.peerHistory.attempts == 0 })
            #expect(contexts.contains { $0.pairHistory.successes > 0 && $0.pairHistory.medianTimeToConnect != nil })
            #expect(contexts.contains { $0.pairHistory.attempts > 0 && $0.pairHistory.successes == 0 })
            #expect(contexts.contains { $0.relayAvailable })
            #expect(contexts.contains { !$0.relayAvailable })
        }

        @Test func simulateReplaysAttemptsThroughOnResult() throws {
            // Widens its port window after every failure it is told about and ignores `ctx.attempt`, so its plan
            // can only change if `on_result` is called.
            let learner = LuaTests.repoRoot.appendingPathComponent("strategies/examples/learner.lua").path
            let initiator = try LuaStrategy(path: learner)
            let target = try LuaStrategy(path: learner)
            // A sequential NAT moved a few ports past the advertised one: only a wider window finds it.
            let pair = (SimulatedNAT.named("port_restricted")!, SimulatedNAT.named("symmetric_seq")!)
            let rows = StrategySimulator.simulate(initiator, peer: target, pairs: [pair], attempts: 4)
            #expect(rows.map(\.attempt) == [1, 2, 3, 4])
            let counts = rows.map(\.portCount)
            #expect(counts[0] == 1)
            #expect(counts[1] > counts[0], "the plan did not change after a failed attempt: \(counts)")
            #expect(rows.first?.simulatedSuccess == false)
            #expect(rows.last?.simulatedSuccess == true, "\(rows.map(\.successProbability))")
            #expect(rows.allSatisfy { $0.error == nil })
        }

        @Test func simulateFeedsHistoryIntoLaterAttempts() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    return { ports = ctx.ports, rounds = 1 + ctx.history.peer.attempts }
                end }
                """)
            let pair = (SimulatedNAT.named("full_cone")!, SimulatedNAT.named("full_cone")!)
            let rows = StrategySimulator.simulate(s, pairs: [pair], attempts: 3)
            #expect(rows.map(\.rounds) == [1, 2, 3])
        }

        @Test func theBundledDefaultIsTheShippedFileByteForByte() throws {
            let shipped = try Data(contentsOf: URL(fileURLWithPath: LuaTests.shippedPath("default")))
            #expect(Array(shipped) == Array(LuaStrategy.bundledDefaultSource.utf8))
            let bundled = try LuaStrategy.bundledDefault()
            #expect(bundled.name == "default")
            #expect(StrategyCheck.run(bundled, file: LuaStrategy.bundledDefaultChunkName).isEmpty)
            #expect(FallbackStrategy.recommended().name == "default")
        }

        @Test func aFallbackStrategySaysWhoPlannedAndWhy() async throws {
            let broken = FallbackStrategy.loading(source: """
                return { plan = function(ctx) return "no plan today" end }
                """, chunkName: "broken.lua")
            let decision = await broken.detachedDecision(LuaTests.ctx)
            #expect(decision.plannedBy == DefaultStrategy().name)
            #expect(decision.plan == DefaultStrategy().plan(LuaTests.ctx))
            let reason = try #require(decision.fallbackReason)
            #expect(reason.file == "broken.lua")
            #expect(broken.fallbackCount == 1)
            let good = await FallbackStrategy.recommended().detachedDecision(LuaTests.ctx)
            #expect(good.plannedBy == "default")
            #expect(good.fallbackReason == nil)
        }
    }
}
