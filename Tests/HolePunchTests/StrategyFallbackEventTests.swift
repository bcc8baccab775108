import Foundation
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunch

/// Every punch says which strategy planned it, and a script that fails at run time is never silent.
@Suite("Strategy fallbacks are reported as punch events", .serialized)
struct StrategyFallbackEventTests {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// The events up to `.planned`, from a punch to a silent port (cancelled once planned).
    func planningEvents(_ strategy: (any PunchStrategy)?) async throws -> [PunchEvent] {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try SilentSocket()
        let handle = await executor.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "fallback", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID, strategy: strategy))
        var events: [PunchEvent] = []
        for await event in handle.events {
            events.append(event)
            if case .planned = event { break }
        }
        _ = await executor.cancel(handle.id)
        _ = await handle.result()
        await a.close()
        return events
    }

    @Test("a script that returns a string, or a hostile one stopped by the sandbox, produces .strategyFellBack",
          arguments: ["returns-string", "strategies/hostile/rep_loop.lua"])
    func brokenScriptFallsBackLoudly(script: String) async throws {
        let strategy: LuaStrategy
        if script == "returns-string" {
            strategy = try LuaStrategy(source: "return { name = 'broken', plan = function(ctx) return 'no plan' end }",
                                       chunkName: "broken.lua")
        } else {
            strategy = try LuaStrategy(path: Self.repoRoot.appendingPathComponent(script).path)
        }
        let events = try await planningEvents(strategy)
        guard case .strategyFellBack(let name, let reason)? = events.first else {
            Issue.record("no .strategyFellBack event before the plan: \(events)")
            return
        }
        #expect(name == strategy.name)
        #expect(reason.file != nil, "the reason should point into the script: \(reason)")
        #expect(events.dropFirst().first == .planned(strategy: DefaultStrategy().name))
    }

    @Test("without a strategy the executor plans with the bundled default.lua, and says so")
    func defaultConfigurationUsesDefaultLua() async throws {
        let events = try await planningEvents(nil)
        #expect(events == [.planned(strategy: "default")])
    }

    @Test("a fallback inside a FallbackStrategy is reported too, not swallowed")
    func fallbackStrategyReportsItsFallback() async throws {
        let wrapped = FallbackStrategy.loading(source: "return { plan = function(ctx) error('boom') end }",
                                               chunkName: "boom.lua")
        let events = try await planningEvents(wrapped)
        guard case .strategyFellBack(_, let reason)? = events.first else {
            Issue.record("no .strategyFellBack event: \(events)")
            return
        }
        #expect(reason.description.hasPrefix("boom.lua:1: "), "\(reason)")
        #expect(events.last == .planned(strategy: DefaultStrategy().name))
    }
}
