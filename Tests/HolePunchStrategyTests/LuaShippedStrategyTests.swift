import HolePunchNet
import Foundation
import Logging
import Testing
@testable import HolePunchStrategy

// The shipped strategies under strategies/, one by one; the engine itself is tested in LuaStrategyTests.swift,
// under whose serialized `LuaTests` suite these run.

extension LuaTests {
    @Suite struct Shipped {
        @Test(arguments: LuaTests.shipped)
        func passesCheck(name: String) throws {
            let path = LuaTests.shippedPath(name)
            let s = try LuaStrategy(path: path)
            #expect(s.name == name)
            let errors = StrategyCheck.run(s, file: path)
            #expect(errors.isEmpty, "\(errors.map(\.description))")
        }

        @Test(arguments: LuaTests.shipped)
        func hasAHeaderSayingWhenToUseIt(name: String) throws {
            let text = try String(contentsOfFile: LuaTests.shippedPath(name), encoding: .utf8)
            #expect(text.hasPrefix("-- \(name).lua: "))
            #expect(text.lowercased().contains("use"))
        }

        @Test func maculaReproducesTheSeedTable() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("macula"))
            for (_, c) in StrategyCheck.allContexts() where c.attempt == 1 {
                let plan = try s.plan(c)
                let row = DefaultStrategy.timingRow(local: c.localNAT.type, remote: c.remoteNAT.type)
                let cadence = DefaultStrategy.cadence(worst: c.worstNAT)
                #expect(plan.timeout == row.timeout)
                #expect(plan.connectTimeout == row.connectTimeout)
                #expect(plan.packetsPerRound == row.parallelPorts)
                #expect(plan.startDelay == cadence.initialDelay)
                #expect(plan.interval == cadence.interval)
                #expect(plan.rounds == cadence.retries)
                #expect(plan.ports.count <= row.parallelPorts)
                #expect(Array(plan.ports) == Array(plan.ports).sorted())
            }
        }

        @Test func defaultRunsABirthdaySearchOnlyWhereItCanMeet() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            func plan(_ local: String, _ remote: String) throws -> PunchPlan {
                try s.plan(StrategyCheck.context(local: .named(local)!, remote: .named(remote)!, role: .initiator,
                                                 attempt: 1)).validated().plan
            }
            // The random side opens every allowed socket; the endpoint-independent side sprays every allowed port.
            let random = try plan("symmetric_random", "port_restricted")
            #expect(random.localSockets == PlanLimits.default.maxLocalSockets)
            let spray = try plan("port_restricted", "symmetric_random")
            #expect(spray.ports.count == PlanLimits.default.maxTotalPorts)
            #expect(spray.localSockets == 1)
            // Against a lenient filter one socket does it, and two symmetric NATs with a random one get no spray.
            #expect(try plan("symmetric_random", "restricted").localSockets == 1)
            for (local, remote) in [("symmetric_seq", "symmetric_random"), ("symmetric_random", "symmetric_seq"),
                                    ("symmetric_random", "symmetric_random")] {
                let hopeless = try plan(local, remote)
                #expect(hopeless.localSockets == 1, "\(local) × \(remote)")
                #expect(hopeless.packetBudget < 100, "\(local) × \(remote): \(hopeless.packetBudget) packets")
            }
        }

        @Test func defaultCopiesHandshakesAndMoreAfterFailures() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            var c = StrategyCheck.context(local: .named("port_restricted")!, remote: .named("port_restricted")!,
                                          role: .initiator, attempt: 1)
            let first = try s.plan(c)
            #expect(first.handshakeCopies == 2)
            // Probing lasts at least 2.5 s even for the easiest pair (a lossy or late peer must still be heard).
            #expect(Double(first.rounds) * first.interval.seconds >= 2.5)
            c.pairHistory = HistorySummary(attempts: 3, successes: 1)
            #expect(try s.plan(c).handshakeCopies == 3)
        }

        @Test func defaultPredictsSequentialPortsLikelyFirst() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let c = StrategyCheck.context(local: .named("full_cone")!, remote: .named("symmetric_seq")!,
                                          role: .initiator, attempt: 1)
            let plan = try s.plan(c)
            // base + delta first: the observed port is the peer's mapping towards the rendezvous, and two
            // sequential NATs only meet if both walk forward from base + delta. The base is still tried, later.
            #expect(Array(plan.ports.prefix(3)) == [50001, 50002, 50003])
            #expect(plan.ports.contains(50000))
            var withHistory = c
            withHistory.peerHistory.lastWinningOffset = 5
            #expect(try s.plan(withHistory).ports.first == 50005)
        }

        @Test func birthdayOpensManySocketsOnTheRandomSide() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("birthday"))
            let c = StrategyCheck.context(local: .named("symmetric_random")!, remote: .named("full_cone")!,
                                          role: .initiator, attempt: 1)
            let (plan, reasons) = try s.plan(c).validated()
            #expect(plan.localSockets == PlanLimits.default.maxLocalSockets)
            #expect(reasons.isEmpty)
            let other = StrategyCheck.context(local: .named("full_cone")!, remote: .named("symmetric_random")!,
                                              role: .initiator, attempt: 1)
            #expect(try s.plan(other).ports.count > 500)
        }

        @Test func conservativeStaysUnderFourPacketsPerSecond() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("conservative"))
            for (_, c) in StrategyCheck.allContexts() {
                #expect(try s.plan(c).packetsPerSecond <= 4)
            }
        }

        @Test func checkReportsEachDistinctFailureOnce() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    if ctx.remote_nat.type == "symmetric" then return { ports = { 70000 } } end
                    if ctx.attempt == 5 then error("fifth attempt") end
                    return { ports = ctx.ports, rounds = ctx.role == "target" and math.random(1, 1000000) or 5 }
                end }
                """, chunkName: "flaky.lua")
            let errors = StrategyCheck.run(s, file: "flaky.lua")
            let codes = errors.map(\.code)
            #expect(codes.contains(.invalidPlan))
            #expect(codes.contains(.runtime))
            let port = try #require(errors.first { $0.field == "ports[1]" })
            // Bad plans point at the line where the hook is defined.
            #expect(port.description.hasPrefix("flaky.lua:1: plan field 'ports[1]': 70000 is not a port"))
            #expect(port.message.contains("in 1440 of 4320 contexts"))
            let fifth = try #require(errors.first { $0.code == .runtime })
            #expect(fifth.line == 3)
            // math.random restarts from ctx.seed on every call, so even this plan is deterministic.
            #expect(!errors.contains { $0.message.contains("deterministic") })
            #expect(StrategyCheck.run(try LuaStrategy(source: LuaTests.minimal), file: "ok.lua").isEmpty)
        }

        @Test func simulatorRatesPlans() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let rows = StrategySimulator.simulate(s, pairs: [(.named("full_cone")!, .named("full_cone")!),
                                                             (.named("full_cone")!, .named("symmetric_seq")!)], attempts: 1)
            #expect(rows.count == 2)
            #expect(rows[0].successProbability == 1)
            #expect(rows[1].successProbability > 0.5)
            #expect(rows.allSatisfy { $0.error == nil && $0.clamps.isEmpty })
        }
    }
}
