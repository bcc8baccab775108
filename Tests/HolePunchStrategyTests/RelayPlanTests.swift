import HolePunchNet
import Testing
@testable import HolePunchStrategy

// Strategies decide when to use the TURN relay (issue 15 item 4): the Lua fields, their bounds, the shared rule of
// default.lua and DefaultStrategy, macula's order, and the simulator's relay model.
extension LuaTests {
    @Suite struct Relay {
        /// The suite's context with a relay available or not.
        static func ctx(relay: Bool) -> PunchContext {
            var ctx = LuaTests.ctx
            ctx.relayAvailable = relay
            return ctx
        }

        /// The check context for a NAT pair, with or without a relay.
        static func pair(_ a: String, _ b: String, relay: Bool,
                         history: HistorySummary = .empty) throws -> PunchContext {
            var ctx = StrategyCheck.context(local: try #require(SimulatedNAT.named(a)),
                                            remote: try #require(SimulatedNAT.named(b)), role: .initiator, attempt: 1)
            ctx.relayAvailable = relay
            ctx.pairHistory = history
            return ctx
        }

        @Test(arguments: [false, true])
        func relayAvailableArrivesAsABoolean(_ available: Bool) throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    assert(ctx.relay_available == \(available), "relay_available: " .. tostring(ctx.relay_available))
                    assert(ctx.limits.max_relay_after_ms == 60000 and ctx.limits.max_direct_after_relay_ms == 600000)
                    return { ports = ctx.ports }
                end }
                """)
            _ = try s.plan(Self.ctx(relay: available))
        }

        @Test(arguments: [
            ("\"first\"", RelayUse.first),
            ("\"never\"", .never),
            ("{ after_ms = 1250 }", .after(.milliseconds(1250))),
            ("{ after_ms = 0 }", .after(.zero)),
        ])
        func relayFieldIsRead(_ c: (lua: String, use: RelayUse)) throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx) return { ports = ctx.ports, relay = \(c.lua), direct_after_relay_ms = 4500 } end }
                """)
            let plan = try s.plan(Self.ctx(relay: true))
            #expect(plan.relay == c.use)
            #expect(plan.directAfterRelay == .milliseconds(4500))
        }

        @Test func onProbeSeesTheRelayFieldsOfThePlanInForce() throws {
            let s = try LuaStrategy(source: """
                return {
                    plan = function(ctx) return { ports = ctx.ports } end,
                    on_probe = function(ctx, event)
                        assert(event.plan.relay.after_ms == 1500, "relay: " .. tostring(event.plan.relay))
                        assert(event.plan.direct_after_relay_ms == 30000)
                        return { relay = "first" }
                    end,
                }
                """)
            let current = PunchPlan(ports: [50000], relay: .after(.milliseconds(1500)))
            let next = try s.onProbe(Self.ctx(relay: true),
                                     ProbeEvent(round: 1, elapsed: .milliseconds(300), probesSent: 3, currentPlan: current))
            #expect(next?.relay == .first)
            #expect(next?.directAfterRelay == .seconds(30))
        }

        @Test func validationClampsTheRelayDelayAndDirectAfterRelay() {
            let plan = PunchPlan(ports: [50000], relay: .after(.seconds(90)), directAfterRelay: .seconds(900))
            let (valid, reasons) = plan.validated()
            #expect(valid.relay == .after(.seconds(60)))
            #expect(valid.directAfterRelay == .seconds(600))
            #expect(reasons.map(\.field).contains("relay"))
            #expect(reasons.map(\.field).contains("directAfterRelay"))
            // Within the bounds nothing changes.
            let fine = PunchPlan(ports: [50000, 50001, 50002], relay: .after(.seconds(2)), directAfterRelay: .zero).validated()
            #expect(fine.plan.relay == .after(.seconds(2)) && fine.plan.directAfterRelay == .zero)
            #expect(fine.reasons.isEmpty, "\(fine.reasons)")
        }

        /// default.lua and the Swift fallback make the same relay choice in every `strategy check` context of the
        /// first attempt (the rule reads no attempt number).
        @Test func defaultLuaAndTheBuiltinDecideTheSame() throws {
            let lua = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let builtin = DefaultStrategy()
            var relayed = 0
            for (label, ctx) in StrategyCheck.allContexts() where ctx.attempt == 1 {
                let fromLua = try lua.plan(ctx), fromSwift = builtin.plan(ctx)
                #expect(fromLua.relay == fromSwift.relay, "\(label)")
                #expect(fromLua.directAfterRelay == fromSwift.directAfterRelay, "\(label)")
                if fromLua.relay != .never { relayed += 1 }
            }
            #expect(relayed > 0)
        }

        @Test func defaultRelaysAtOnceForAPairThatCannotBePunched() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let hopeless = try Self.pair("symmetric_seq", "symmetric_random", relay: true)
            #expect(hopeless.cannotBePunched)
            #expect(try s.plan(hopeless).relay == .first)
            #expect(try s.plan(hopeless).directAfterRelay == .seconds(10))
            let noRelay = try Self.pair("symmetric_seq", "symmetric_random", relay: false)
            #expect(try s.plan(noRelay).relay == .never)
        }

        @Test func defaultRacesElsewhereAfterThePairsTimeToConnect() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            // No history: five RTTs (80 ms) three times over.
            #expect(try s.plan(try Self.pair("full_cone", "port_restricted", relay: true)).relay
                    == .after(.milliseconds(1200)))
            // A pair that connected in 900 ms before: three times that.
            let known = HistorySummary(attempts: 3, successes: 3, medianTimeToConnect: .milliseconds(900))
            #expect(try s.plan(try Self.pair("full_cone", "port_restricted", relay: true, history: known)).relay
                    == .after(.milliseconds(2700)))
            // Only failures for this NAT pair: the relay at once.
            let failing = HistorySummary(attempts: 2, successes: 0)
            #expect(try s.plan(try Self.pair("full_cone", "port_restricted", relay: true, history: failing)).relay
                    == .first)
        }

        @Test func maculaRelaysOnlyAfterItsPunchTimedOut() throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath("macula"))
            let plan = try s.plan(try Self.pair("symmetric_seq", "symmetric_random", relay: true))
            #expect(plan.relay == .after(plan.timeout))
            #expect(plan.directAfterRelay == .zero)
            #expect(try s.plan(try Self.pair("symmetric_seq", "symmetric_random", relay: false)).relay == .never)
        }

        @Test(arguments: LuaTests.shipped)
        func noShippedStrategyRelaysWithoutARelay(_ name: String) throws {
            let s = try LuaStrategy(path: LuaTests.shippedPath(name))
            for (label, ctx) in StrategyCheck.allContexts() where ctx.attempt == 1 && !ctx.relayAvailable {
                #expect(try s.plan(ctx).relay == .never, "\(label)")
            }
        }

        @Test func simulatorConnectsAnUnpunchablePairThroughTheRelay() throws {
            let pair = [(try #require(SimulatedNAT.named("symmetric_seq")), try #require(SimulatedNAT.named("symmetric_random")))]
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let relayed = StrategySimulator.simulate(s, pairs: pair, attempts: 1, relayAvailable: true)
            #expect(relayed.first?.path == "relayed")
            #expect(relayed.first?.relay == "first")
            // The relay's setup: two RTTs of 80 ms.
            #expect(relayed.first?.relayMs == 160)
            let alone = StrategySimulator.simulate(s, pairs: pair, attempts: 1, relayAvailable: false)
            #expect(alone.first?.path == "none")
            #expect(alone.first?.relayMs == nil)
        }

        @Test func maculaPunchesThenRelaysAndItsTargetWaitsForTheRelayedDial() throws {
            let pair = [(try #require(SimulatedNAT.named("symmetric_seq")), try #require(SimulatedNAT.named("symmetric_random")))]
            let s = try LuaStrategy(path: LuaTests.shippedPath("macula"))
            let plan = try s.plan(try Self.pair("symmetric_seq", "symmetric_random", relay: true))
            // The initiator dials at the timeout; the target accepts that dial to its connect timeout and a second more.
            #expect(plan.relayDialStart == plan.timeout)
            #expect(plan.relayAcceptEnd == plan.timeout + plan.connectTimeout + .seconds(1))
            let rows = StrategySimulator.simulate(s, pairs: pair, attempts: 1, relayAvailable: true)
            #expect(rows.first?.path == "relayed", "\(rows)")
            #expect(rows.first?.relayMs == plan.timeout.milliseconds + 160)
        }

        @Test func simulatorRelaysOnlyTheInitiatorsDialAndOnlyWhileTheTargetAccepts() throws {
            let pair = [(try #require(SimulatedNAT.named("symmetric_seq")), try #require(SimulatedNAT.named("symmetric_random")))]
            func strategy(_ relay: String) throws -> LuaStrategy {
                try LuaStrategy(source: """
                    return { plan = function(ctx) return { ports = ctx.ports, timeout_ms = 3000, relay = \(relay) } end }
                    """)
            }
            // The initiator dials at 5 s, past the target's 3 s punch; a target whose plan does not use the relay
            // stopped accepting when its punch ended.
            let late = try strategy("{ after_ms = 5000 }")
            let gone = StrategySimulator.simulate(late, peer: try strategy("\"never\""), pairs: pair, attempts: 1,
                                                  relayAvailable: true)
            #expect(gone.first?.path == "none", "\(gone)")
            // The same dial reaches a target whose plan uses the relay: it waits for the dial after its punch ended.
            let waits = StrategySimulator.simulate(late, peer: late, pairs: pair, attempts: 1, relayAvailable: true)
            #expect(waits.first?.path == "relayed", "\(waits)")
            // Only the initiator dials: a target's `first` carries nothing when the initiator's plan says never.
            let targetOnly = StrategySimulator.simulate(try strategy("\"never\""), peer: try strategy("\"first\""),
                                                        pairs: pair, attempts: 1, relayAvailable: true)
            #expect(targetOnly.first?.path == "none", "\(targetOnly)")
        }

        @Test func simulatorKeepsAnEasyPairOffTheRelay() throws {
            let cone = try #require(SimulatedNAT.named("full_cone"))
            let s = try LuaStrategy(path: LuaTests.shippedPath("default"))
            let rows = StrategySimulator.simulate(s, pairs: [(cone, cone)], attempts: 1, relayAvailable: true)
            #expect(rows.first?.path == "direct")
            #expect(rows.first?.relayMs == nil)
            // relay = "first" for the same pair, with a punch that starts after the relay is up (500 ms > 2 RTTs):
            // carried by the relay until the punch proves the direct path.
            let first = try LuaStrategy(source: """
                return { plan = function(ctx) return { ports = ctx.ports, relay = "first", start_delay_ms = 500 } end }
                """)
            let raced = StrategySimulator.simulate(first, pairs: [(cone, cone)], attempts: 1, relayAvailable: true)
            #expect(raced.first?.path == "relay → direct", "\(raced)")
        }
    }
}
