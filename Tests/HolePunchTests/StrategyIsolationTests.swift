import Foundation
import HolePunchStrategy
import Logging
import ProcessTestSupport
import Testing
@testable import HolePunch

/// Records the order in which strategy calls returned. `@unchecked Sendable`: `items` is guarded by `lock`.
final class OrderLog: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func append(_ item: String) { lock.withLock { items.append(item) } }
    var all: [String] { lock.withLock { items } }
}

/// Wraps a strategy and notes in `log` when its plan returns (or throws), on either calling path.
struct RecordingStrategy: PunchStrategy {
    let inner: any PunchStrategy
    let label: String
    let log: OrderLog
    var name: String { inner.name }
    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        defer { log.append(label) }
        return try inner.plan(ctx)
    }
    func detachedPlan(_ ctx: PunchContext) async throws -> PunchPlan {
        defer { log.append(label) }
        return try await inner.detachedPlan(ctx)
    }
}

@Suite("Strategies run off the executor", .serialized)
struct StrategyIsolationTests {
    @Test("a hostile script planning one punch does not hold up planning another punch on the same executor")
    func hostileScriptDoesNotBlockOtherPunches() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let warnings = OrderLog()
        let executor = PunchExecutor(endpoint: a, logger: Logger(label: "executor", factory: { _ in
            ClosureLogHandler { level, message, metadata in
                if level == .warning { warnings.append("\(message) \(metadata["error"]?.description ?? "")") }
            }
        }))
        let silent = try SilentSocket()
        let (started, startedContinuation) = AsyncStream.makeStream(of: Void.self)
        let scriptLogger = Logger(label: "script", factory: { _ in
            ClosureLogHandler { _, _, _ in startedContinuation.yield() }
        })
        // Runs until its 2 s time limit; the instruction budget never runs out.
        let hostile = try LuaStrategy(source: """
            return { plan = function(ctx)
                hp.log('info', 'planning')
                while true do end
            end }
            """, chunkName: "stall.lua",
            limits: LuaStrategy.Limits(instructionBudget: Int.max / 2, timeLimit: .seconds(2)), logger: scriptLogger)
        let order = OrderLog()
        func options(_ session: String, _ strategy: any PunchStrategy) -> PunchOptions {
            PunchOptions(targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: session, sessionKey: sessionKey(),
                         role: .initiator, targetNodeID: PunchIdentities.b.nodeID, strategy: strategy)
        }
        let hostileOptions = options("hostile", RecordingStrategy(inner: hostile, label: "hostile", log: order))
        let hostileStart = Task { await executor.startPunch(hostileOptions) }
        var iterator = started.makeAsyncIterator()
        _ = await iterator.next() // the hostile script is running now
        let quick = await executor.startPunch(options("quick", RecordingStrategy(
            inner: FixedStrategy(rounds: 1000, timeout: .seconds(30)), label: "quick", log: order)))
        // The quick punch was planned while the hostile script still ran.
        #expect(order.all == ["quick"])
        let slow = await hostileStart.value
        #expect(order.all == ["quick", "hostile"])
        // The hostile punch fell back to the built-in plan, and the executor said so at warning level.
        #expect(warnings.all.contains { $0.hasPrefix("strategy failed") && $0.contains("stall.lua:3:") }, "\(warnings.all)")
        await executor.cancel(quick.id)
        await executor.cancel(slow.id)
        await a.close()
    }
}
