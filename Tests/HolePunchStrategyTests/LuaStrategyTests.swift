import HolePunchNet
import Foundation
import Logging
import ProcessTestSupport
import Testing
@testable import HolePunchStrategy

/// Every test that creates a Lua state lives under this serialized suite, so the live-state counter
/// used by the leak test is not disturbed by tests running in parallel.
@Suite(.serialized) struct LuaTests {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static let shipped = ["default", "macula", "aggressive", "conservative", "sequential", "birthday"]
    static func shippedPath(_ name: String) -> String {
        repoRoot.appendingPathComponent("strategies/\(name).lua").path
    }

    static let ctx = PunchContext(
        localNAT: NATProfile(mapping: .endpointIndependent, filtering: .addressDependent, allocation: .portPreserving,
                             portDelta: 0, confidence: 0.75),
        remoteNAT: NATProfile(mapping: .addressAndPortDependent, filtering: .addressAndPortDependent,
                              allocation: .sequential, portDelta: 2, confidence: 0.5),
        candidateHosts: ["203.0.113.7", "10.0.0.7"],
        candidatePorts: [50000, 50100],
        localPort: 40000,
        rtt: .milliseconds(42),
        attempt: 3,
        pairHistory: HistorySummary(attempts: 4, successes: 3, medianTimeToConnect: .milliseconds(250), lastWinningOffset: 2),
        peerHistory: HistorySummary(attempts: 2, successes: 1, medianTimeToConnect: .milliseconds(300), lastWinningOffset: -1),
        role: .target,
        seed: 0xDEAD_BEEF,
        peerID: "node-7",
        candidates: [
            Candidate(kind: .host, address: try! SocketAddress(host: "10.0.0.7", port: 50200)),
            Candidate(kind: .serverReflexive, address: try! SocketAddress(host: "203.0.113.7", port: 50000), priority: 7),
            Candidate(kind: .host, address: try! SocketAddress(host: "2001:db8::7", port: 50300)),
            Candidate(kind: .portMapped, address: try! SocketAddress(host: "203.0.113.7", port: 40000),
                      mapping: Candidate.Mapping(protocolName: "pcp", lifetimeSeconds: 7200)),
        ]
    )

    static let minimal = "return { plan = function(ctx) return { ports = ctx.ports } end }"
}

/// Captures log records for assertions.
final class CapturedLogs: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [(Logger.Level, String, Logger.Metadata)] = []
    func append(_ level: Logger.Level, _ message: String, _ meta: Logger.Metadata) { lock.withLock { items.append((level, message, meta)) } }
    var all: [(Logger.Level, String, Logger.Metadata)] { lock.withLock { items } }

    var logger: Logger {
        Logger(label: "test", factory: { _ in ClosureLogHandler { self.append($0, $1, $2) } })
    }
}

extension LuaTests {
    @Suite struct Basics {
        @Test func minimalScriptUsesDefaultsForMissingFields() throws {
            let s = try LuaStrategy(source: LuaTests.minimal)
            let plan = try s.plan(LuaTests.ctx)
            var expected = DefaultStrategy().plan(LuaTests.ctx)
            expected.ports = [50000, 50100]
            #expect(plan == expected)
            #expect(s.name == "strategy")
        }

        @Test func everyFieldConverts() throws {
            let s = try LuaStrategy(source: """
                return { name = "full", plan = function(ctx)
                    return { ports = { 7, {10, 12}, 7, 11, 3 }, sockets = 4, packets_per_round = 2,
                             interval_ms = 25.5, rounds = 9, timeout_ms = 3000, connect_timeout_ms = 900,
                             start_delay_ms = 0, initial_rtt_ms = 50, dial_direct = false, low_ttl = 3,
                             handshake_copies = 2 }
                end }
                """)
            let plan = try s.plan(LuaTests.ctx)
            #expect(s.name == "full")
            #expect(Array(plan.ports) == [7, 10, 11, 12, 3])
            #expect(plan.localSockets == 4)
            #expect(plan.packetsPerRound == 2)
            #expect(plan.interval == .microseconds(25_500))
            #expect(plan.rounds == 9)
            #expect(plan.timeout == .seconds(3))
            #expect(plan.connectTimeout == .milliseconds(900))
            #expect(plan.startDelay == .zero)
            #expect(plan.initialRTT == .milliseconds(50))
            #expect(plan.dialCandidatesDirectly == false)
            #expect(plan.lowTTL == 3)
            #expect(plan.handshakeCopies == 2)
        }

        @Test func plansAreDeterministicForAContext() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    local p = hp.random_ports(50, 2000, 60000)
                    p[#p + 1] = math.random(1000, 1999)
                    return { ports = p }
                end }
                """)
            let a = try s.plan(LuaTests.ctx)
            let b = try s.plan(LuaTests.ctx)
            let other = try LuaStrategy(source: "return { plan = function(ctx) return { ports = hp.random_ports(50, 2000, 60000) } end }")
            #expect(a == b)
            #expect(a.ports.count == 51)
            #expect(Set(a.ports).count == 51)
            #expect(Array(try other.plan(LuaTests.ctx).ports) == Array(a.ports.prefix(50)))
            var reseeded = LuaTests.ctx
            reseeded.seed = 1
            #expect(try s.plan(reseeded) != a)
        }

        @Test func shippedPlansAreDeterministicAcrossStates() throws {
            for name in LuaTests.shipped {
                let one = try LuaStrategy(path: LuaTests.shippedPath(name))
                let two = try LuaStrategy(path: LuaTests.shippedPath(name))
                for (_, c) in StrategyCheck.allContexts() where c.attempt <= 2 {
                    #expect(try one.plan(c) == two.plan(c), "\(name)")
                }
            }
        }

        // Each ctx field arrives in Lua with the right value (one assertion per field).
        @Test(arguments: [
            ("ctx.local_nat.type", "'restricted'"),
            ("ctx.local_nat.mapping", "'endpoint_independent'"),
            ("ctx.local_nat.filtering", "'address_dependent'"),
            ("ctx.local_nat.allocation", "'port_preserving'"),
            ("ctx.local_nat.port_delta", "0"),
            ("ctx.local_nat.confidence", "0.75"),
            ("ctx.remote_nat.type", "'symmetric'"),
            ("ctx.remote_nat.mapping", "'address_and_port_dependent'"),
            ("ctx.remote_nat.filtering", "'address_and_port_dependent'"),
            ("ctx.remote_nat.allocation", "'sequential'"),
            ("ctx.remote_nat.port_delta", "2"),
            ("ctx.remote_nat.confidence", "0.5"),
            // The host strings moved to ctx.hosts when ctx.candidates became typed.
            ("table.concat(ctx.hosts, ',')", "'203.0.113.7,10.0.0.7'"),
            ("#ctx.candidates", "4"),
            ("ctx.candidates[1].kind", "'host'"),
            ("ctx.candidates[1].family", "'ipv4'"),
            ("ctx.candidates[1].address", "'10.0.0.7'"),
            ("ctx.candidates[1].host", "'10.0.0.7'"),
            ("ctx.candidates[1].port", "50200"),
            ("math.type(ctx.candidates[1].port)", "'integer'"),
            ("ctx.candidates[2].kind", "'srflx'"),
            ("ctx.candidates[2].priority", "7"),
            ("ctx.candidates[3].family", "'ipv6'"),
            ("ctx.candidates[3].address", "'2001:db8::7'"),
            ("ctx.candidates[1].protocol", "nil"),
            ("ctx.candidates[4].kind", "'mapped'"),
            ("ctx.candidates[4].protocol", "'pcp'"),
            ("ctx.candidates[4].lease", "7200"),
            ("ctx.last_allocated_port", "nil"),
            ("table.concat(ctx.ports, ',')", "'50000,50100'"),
            ("math.type(ctx.ports[1])", "'integer'"),
            ("ctx.local_port", "40000"),
            ("ctx.rtt_ms", "42"),
            ("ctx.attempt", "3"),
            ("ctx.role", "'target'"),
            ("ctx.seed", "0xDEADBEEF"),
            ("ctx.peer_id", "'node-7'"),
            ("ctx.history.pair.attempts", "4"),
            ("ctx.history.pair.successes", "3"),
            ("ctx.history.pair.success_rate", "0.75"),
            ("ctx.history.pair.median_ttc_ms", "250"),
            ("ctx.history.pair.last_offset", "2"),
            ("ctx.history.peer.attempts", "2"),
            ("ctx.history.peer.success_rate", "0.5"),
            ("ctx.history.peer.median_ttc_ms", "300"),
            ("ctx.history.peer.last_offset", "-1"),
            ("ctx.limits.max_pps", "1000"),
            ("ctx.limits.max_ports", "2048"),
            ("ctx.limits.max_sockets", "256"),
            ("ctx.limits.max_handshake_copies", "3"),
            ("ctx.limits.max_candidates", "16"),
        ])
        func contextFieldArrives(expr: String, expected: String) throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    local got = \(expr)
                    if got ~= \(expected) then error("got " .. tostring(got)) end
                    return { ports = ctx.ports }
                end }
                """)
            _ = try s.plan(LuaTests.ctx)
        }

        @Test func unmeasuredFieldsAreNil() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    assert(ctx.rtt_ms == nil and ctx.local_port == nil and ctx.last_allocated_port == nil)
                    assert(#ctx.candidates == 0)
                    assert(ctx.history.pair.median_ttc_ms == nil and ctx.history.peer.last_offset == nil)
                    assert(ctx.history.pair.success_rate == 0)
                    return { ports = { 1 } }
                end }
                """)
            _ = try s.plan(PunchContext(localNAT: .fullCone, remoteNAT: .fullCone))
        }

        @Test func onResultSeesOutcomes() throws {
            let s = try LuaStrategy(source: """
                local seen, last_ttc, last_error, last_port = 0, 0, "none", 0
                return {
                    plan = function(ctx)
                        return { ports = { last_port > 0 and last_port or 1 }, rounds = seen + 1,
                                 timeout_ms = last_ttc > 0 and last_ttc or 1000, dial_direct = last_error == "timeout" }
                    end,
                    on_result = function(ctx, outcome)
                        seen = seen + 1
                        if outcome.success then
                            last_ttc = outcome.time_to_connect_ms
                            last_port = outcome.winning_port
                            assert(outcome.port_offset == 3 and outcome.rounds == 2)
                        else
                            last_error = outcome.error
                        end
                    end,
                }
                """)
            try s.onResult(LuaTests.ctx, .success(timeToConnect: .milliseconds(777), winningPort: 50003, portOffset: 3, rounds: 2))
            try s.onResult(LuaTests.ctx, .failure(code: .timeout, rounds: 7))
            let plan = try s.plan(LuaTests.ctx)
            #expect(plan.rounds == 3)
            #expect(plan.timeout == .milliseconds(777))
            #expect(Array(plan.ports) == [50003])
            #expect(plan.dialCandidatesDirectly == true)
        }

        @Test func onProbeReplacesOrKeepsThePlan() throws {
            let s = try LuaStrategy(source: """
                return {
                    plan = function(ctx) return { ports = ctx.ports } end,
                    on_probe = function(ctx, event)
                        if #event.answered > 0 then return nil end
                        return { ports = hp.merge(event.plan.ports, hp.sequence(event.plan.ports[1] + 1, 1, event.round)),
                                 rounds = event.plan.rounds + event.probes_sent }
                    end,
                }
                """)
            let current = PunchPlan(ports: [50000], rounds: 5)
            let widened = try #require(try s.onProbe(LuaTests.ctx, ProbeEvent(round: 2, elapsed: .milliseconds(400),
                                                                              probesSent: 10, currentPlan: current)))
            #expect(Array(widened.ports) == [50000, 50001, 50002])
            #expect(widened.rounds == 15)
            #expect(widened.timeout == current.timeout)
            #expect(try s.onProbe(LuaTests.ctx, ProbeEvent(round: 2, elapsed: .zero, probesSent: 10,
                                                          answeredPorts: [50000], currentPlan: current)) == nil)
            let noHook = try LuaStrategy(source: LuaTests.minimal)
            #expect(try noHook.onProbe(LuaTests.ctx, ProbeEvent(round: 1, elapsed: .zero, probesSent: 1, currentPlan: current)) == nil)
        }

        @Test func helpers() throws {
            let s = try LuaStrategy(source: """
                local function eq(a, b)
                    if #a ~= #b then return false end
                    for i = 1, #a do if a[i] ~= b[i] then return false end end
                    return true
                end
                return { plan = function(ctx)
                    assert(eq(hp.range(5, 8), {5, 6, 7, 8}))
                    assert(eq(hp.range(8, 5), {8, 7, 6, 5}))
                    assert(eq(hp.range(1, 9, 4), {1, 5, 9}))
                    assert(eq(hp.around(100, 2), {100, 101, 99, 102, 98}))
                    assert(eq(hp.around(1, 1), {1, 2}))
                    assert(eq(hp.sequence(100, 2, 3), {100, 102, 104}))
                    assert(eq(hp.sequence(65534, 1, 3), {65534, 65535}))
                    assert(eq(hp.merge({3, 1}, {1, 2}, {3}), {3, 1, 2}))
                    assert(hp.clamp(5, 1, 3) == 3 and math.type(hp.clamp(5, 1, 3)) == "integer")
                    assert(hp.clamp(0.5, 1, 3) == 1)
                    assert(hp.worst_nat("full_cone", "symmetric") == "symmetric")
                    assert(hp.worst_nat(ctx.local_nat, ctx.remote_nat) == "symmetric")
                    assert(#hp.random_ports(10) == 10)
                    local ok, err = pcall(hp.range, 1, 1e9)
                    assert(not ok and err:find("at most"))
                    assert(not pcall(hp.random_ports, 5, 10, 12))
                    assert(not pcall(hp.worst_nat, "bogus", "full_cone"))
                    assert(type(load("return 1")) == "function")
                    assert(print == nil and dofile == nil and loadfile == nil and string.dump == nil)
                    assert(io == nil and os == nil and package == nil and debug == nil and require == nil)
                    assert(collectgarbage == nil and coroutine == nil)
                    return { ports = ctx.ports }
                end }
                """)
            _ = try s.plan(LuaTests.ctx)
        }

        @Test func hpLogGoesToTheLogger() throws {
            let logs = CapturedLogs()
            let s = try LuaStrategy(source: """
                return { name = "chatty", plan = function(ctx)
                    hp.log("warning", "planning attempt " .. ctx.attempt)
                    for i = 1, 500 do hp.log("debug", "spam") end
                    return { ports = ctx.ports }
                end }
                """, logger: logs.logger)
            _ = try s.plan(LuaTests.ctx)
            let all = logs.all
            let first = try #require(all.first)
            #expect(first.1 == "strategy script log")
            #expect(first.2["strategy.message"]?.description == "planning attempt 3")
            #expect(first.2["strategy.level"]?.description == "warning")
            #expect(first.2["strategy.name"]?.description == "chatty")
            #expect(first.0 <= .info)
            #expect(all.count == 64) // capped per call
        }

        @Test func reloadKeepsTheOldVersionWhenTheNewOneIsInvalid() throws {
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("hp-reload-\(UUID().uuidString).lua")
            defer { try? FileManager.default.removeItem(at: url) }
            try Data("return { plan = function(ctx) return { ports = { 1111 } } end }".utf8).write(to: url)
            let s = try LuaStrategy(path: url.path)
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [1111])

            try Data("return { plan = function(ctx) return { ports = { 2222 } } end".utf8).write(to: url)
            #expect { try s.reload() } throws: { e in
                let e = try #require(e as? StrategyError)
                return e.code == .syntax && e.file == url.path && e.line != nil
            }
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [1111])

            try Data("return { plan = function(ctx) return { ports = { 3333 } } end }".utf8).write(to: url)
            try s.reload()
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [3333])
        }

        @Test func fallbackWrapperReloadsAFixedFile() throws {
            let url = FileManager.default.temporaryDirectory.appendingPathComponent("hp-fix-\(UUID().uuidString).lua")
            defer { try? FileManager.default.removeItem(at: url) }
            try Data("return { plan = function(ctx) return { ports = { 0 } } end".utf8).write(to: url)
            let s = FallbackStrategy.loading(path: url.path)
            #expect(s.primary == nil)
            #expect(s.lastError?.code == .syntax)
            #expect(s.plan(LuaTests.ctx) == DefaultStrategy().plan(LuaTests.ctx))
            #expect(throws: StrategyError.self) { try s.reload() }
            #expect(s.primary == nil)

            try Data("return { name = 'fixed', plan = function(ctx) return { ports = { 4444 } } end }".utf8).write(to: url)
            try s.reload()
            #expect(s.name == "fixed")
            #expect(Array(s.plan(LuaTests.ctx).ports) == [4444])
            #expect(s.fallbackCount == 1)

            // A broken edit now keeps the working version.
            try Data("return 42".utf8).write(to: url)
            #expect { try s.reload() } throws: { e in (e as? StrategyError)?.code == .missingHook }
            #expect(Array(s.plan(LuaTests.ctx).ports) == [4444])
        }

        @Test func noLeakUnderRepeatedLoadAndRelease() throws {
            // Counted by a name no other test uses: executors elsewhere in the process create states of their own.
            let name = "leak-\(UInt64.random(in: 0...UInt64.max)).lua"
            func live() -> Int { LuaStrategy.liveStateCount(named: name) }
            for _ in 0..<200 {
                let s = try LuaStrategy(source: LuaTests.minimal, chunkName: name)
                _ = try s.plan(LuaTests.ctx)
                #expect(live() == 1)
            }
            for _ in 0..<50 {
                _ = try? LuaStrategy(source: "return {", chunkName: name)
                _ = FallbackStrategy.loading(source: "while true do end", chunkName: name)
            }
            #expect(live() == 0)
            var held: [LuaStrategy] = []
            for _ in 0..<10 { held.append(try LuaStrategy(source: LuaTests.minimal, chunkName: name)) }
            #expect(live() == 10)
            held.removeAll()
            #expect(live() == 0)
        }

        @Test func concurrentCallsAreSerialised() async throws {
            let s = try LuaStrategy(source: """
                local calls = 0
                return { plan = function(ctx)
                    calls = calls + 1
                    local mine = calls
                    for i = 1, 1000 do end
                    return { ports = { ctx.ports[1] }, rounds = mine }
                end }
                """)
            let rounds = await withTaskGroup(of: Int.self) { group in
                for _ in 0..<64 { group.addTask { (try? s.plan(LuaTests.ctx).rounds) ?? -1 } }
                var out: [Int] = []
                for await r in group { out.append(r) }
                return out
            }
            #expect(rounds.sorted() == Array(1...64))
        }

        @Test func strategyIsReusableAfterAFailedCall() throws {
            let s = try LuaStrategy(source: """
                return { plan = function(ctx)
                    if ctx.attempt == 1 then while true do end end
                    return { ports = ctx.ports }
                end }
                """)
            var first = LuaTests.ctx
            first.attempt = 1
            #expect(throws: StrategyError.self) { try s.plan(first) }
            #expect(Array(try s.plan(LuaTests.ctx).ports) == [50000, 50100])
        }
    }
}
