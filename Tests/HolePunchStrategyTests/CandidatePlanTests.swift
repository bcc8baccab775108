import HolePunchNet
import Testing
@testable import HolePunchStrategy

/// Typed candidates and the last allocated port in `ctx`, and the plan fields that choose candidates (issue 14).
extension LuaTests {
    @Suite struct Candidates {
        /// The shared context, whose typed candidates `contextFieldArrives` checks field by field.
        static var ctx: PunchContext { LuaTests.ctx }

        @Test func lastAllocatedPortArrives() throws {
            var ctx = Self.ctx
            ctx.lastAllocatedPort = 50010
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    assert(ctx.last_allocated_port == 50010 and math.type(ctx.last_allocated_port) == 'integer')
                    return { ports = ctx.ports }
                end }
                """)
            _ = try s.plan(ctx)
        }

        @Test func planChoosesCandidates() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    return { ports = ctx.ports, candidates = { 3, 1 }, max_candidates = 1 }
                end }
                """)
            let plan = try s.plan(Self.ctx)
            #expect(plan.candidateOrder == [2, 0], "1-based in Lua, 0-based in Swift")
            #expect(plan.maxCandidates == 1)
            // on_probe sees them back as Lua wrote them.
            let echo = try LuaStrategy(source: """
                return { plan = function(ctx) return { ports = ctx.ports } end,
                         on_probe = function(ctx, e)
                             assert(e.plan.candidates[1] == 3 and e.plan.candidates[2] == 1 and e.plan.max_candidates == 1)
                             return { rounds = 9 }
                         end }
                """)
            #expect(try echo.onProbe(Self.ctx, ProbeEvent(round: 1, elapsed: .zero, probesSent: 1, currentPlan: plan))?.rounds == 9)
        }

        @Test func shippedDefaultKeepsTheDefaultOrder() throws {
            let plan = try LuaStrategy(path: LuaTests.shippedPath("default")).plan(Self.ctx)
            #expect(plan.candidateOrder == nil)
            #expect(plan.maxCandidates == nil)
            #expect(DefaultStrategy().plan(Self.ctx).candidateOrder == nil)
        }

        /// A sequential peer (delta 2) whose NAT counter moved past the registration's port 50000 to 50010.
        static func sequentialContext(lastAllocated: UInt16?) -> PunchContext {
            PunchContext(
                localNAT: .portRestricted,
                remoteNAT: NATProfile(mapping: .addressAndPortDependent, filtering: .addressAndPortDependent,
                                      allocation: .sequential, portDelta: 2),
                candidatePorts: [50000], lastAllocatedPort: lastAllocated
            )
        }

        @Test func defaultLuaPredictsFromTheLastAllocatedPort() throws {
            let lua = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let known = try lua.plan(Self.sequentialContext(lastAllocated: 50010))
            #expect(Array(known.ports.prefix(3)) == [50012, 50014, 50016], "base + delta from the last allocated port first")
            #expect(known.ports.contains(50000), "the registration's port is still tried")
            let unknown = try lua.plan(Self.sequentialContext(lastAllocated: nil))
            #expect(Array(unknown.ports.prefix(3)) == [50002, 50004, 50006], "from the reflexive port when unknown")
        }

        @Test func simulatorModelsAMovedCounter() throws {
            // The NAT counter moved 40 ports past registration: a plan that counts from the published last
            // allocated port meets the peer's mapping; one that counts from the registration's port cannot.
            let pair: [(SimulatedNAT, SimulatedNAT)] = [(.named("port_restricted")!, .named("symmetric_seq")!)]
            let ignoring = """
                return { plan = function(ctx)
                    return { ports = hp.merge(ctx.ports, hp.sequence(ctx.ports[1] + 1, 1, 8)), packets_per_round = 9 }
                end }
                """
            for (script, moved, expected) in [(ignoring, nil, 1.0), (ignoring, 40, 0.0)] as [(String, Int?, Double)] {
                let rows = StrategySimulator.simulate(try LuaStrategy(source: script), pairs: pair, attempts: 1, counterMoved: moved)
                #expect(rows.first?.successProbability == expected, "moved \(moved.map(String.init) ?? "nil")")
            }
            for name in ["default", "sequential"] {
                let rows = StrategySimulator.simulate(try LuaStrategy(path: LuaTests.shippedPath(name)), pairs: pair,
                                                      attempts: 1, counterMoved: 40)
                #expect(rows.first?.successProbability == 1, "\(name).lua")
            }
        }

        @Test func swiftFallbackPredictsFromTheLastAllocatedPort() {
            let known = DefaultStrategy().plan(Self.sequentialContext(lastAllocated: 50010))
            #expect(Array(known.ports) == [50000, 50012, 50014, 50016, 50018, 50020])
            let unknown = DefaultStrategy().plan(Self.sequentialContext(lastAllocated: nil))
            #expect(Array(unknown.ports) == [50000, 50002, 50004, 50006, 50008, 50010])
        }
    }
}

/// Validation of the candidate fields: everything a script returns is bounded.
@Suite struct CandidatePlanValidationTests {
    @Test func candidateOrderIsDistinctNonNegativeAndCapped() {
        var plan = PunchPlan(ports: [1])
        plan.candidateOrder = [3, -1, 3, 0] + Array(100..<200)
        let limits = PlanLimits(maxCandidates: 4)
        let (valid, reasons) = plan.validated(limits)
        #expect(valid.candidateOrder == [3, 0, 100, 101])
        #expect(reasons.contains { $0.field == "candidateOrder" })
    }

    @Test(arguments: [(0, 1), (-5, 1), (3, 3), (1_000_000, 16)])
    func maxCandidatesIsClamped(_ c: (requested: Int, applied: Int)) {
        var plan = PunchPlan(ports: [1])
        plan.maxCandidates = c.requested
        #expect(plan.validated().plan.maxCandidates == c.applied)
    }

    @Test func capRateStretchesTheInterval() {
        var plan = PunchPlan(ports: [1, 2, 3, 4], packetsPerRound: 4, interval: .milliseconds(1))
        let reason = plan.capRate(PlanLimits(maxPacketsPerSecond: 1000))
        #expect(reason?.field == "interval")
        #expect(plan.packetsPerSecond <= 1000)
        #expect(plan.capRate(PlanLimits(maxPacketsPerSecond: 1000)) == nil)
    }
}
