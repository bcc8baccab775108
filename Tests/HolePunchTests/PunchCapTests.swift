import Foundation
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunch

@Suite("Punch caps: one peer cannot hold every punch slot of a process", .serialized)
struct PunchCapTests {
    func options(_ i: Int, peer: NodeID, port: UInt16) -> PunchOptions {
        PunchOptions(targetHost: "127.0.0.1", targetPorts: [port], sessionID: "cap\(i)", sessionKey: sessionKey(),
                     punchTime: .after(.seconds(60)), role: .initiator, targetNodeID: peer)
    }

    /// Starts one punch per element of `range`, all at once, with the options `options` makes for it.
    func startAtOnce(_ executor: PunchExecutor, _ range: Range<Int>,
                     _ options: @escaping @Sendable (Int) -> PunchOptions) async -> [PunchHandle] {
        await withTaskGroup(of: PunchHandle.self) { group in
            for i in range {
                group.addTask { await executor.startPunch(options(i)) }
            }
            var handles: [PunchHandle] = []
            for await handle in group { handles.append(handle) }
            return handles
        }
    }

    @Test("the ninth concurrent punch to one peer fails at once with tooManyPunches (default 8 per peer)")
    func perPeerCap() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: endpoint)
        let port = unusedPort()
        var handles: [PunchHandle] = []
        for i in 1...9 { handles.append(await executor.startPunch(options(i, peer: PunchIdentities.b.nodeID, port: port))) }
        #expect(await executor.activePunches().count == 8)
        // Another peer still gets a slot.
        let other = await executor.startPunch(options(10, peer: PunchIdentities.c.nodeID, port: port))
        #expect(await executor.activePunches().count == 9)
        await executor.shutdown()
        if case .failure(let error) = await handles[8].result() {
            #expect(error.code.rawValue == "tooManyPunches")
        } else {
            Issue.record("the ninth punch succeeded")
        }
        if case .failure(let error) = await other.result() { #expect(error.code == .cancelled) }
        await endpoint.close()
    }

    @Test("the process-wide cap: with maxConcurrentPunches 3, the fourth punch fails with tooManyPunches")
    func processCap() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        var configuration = PunchExecutor.Configuration()
        configuration.maxConcurrentPunches = 3
        let executor = PunchExecutor(endpoint: endpoint, configuration: configuration)
        let port = unusedPort()
        let peers = [PunchIdentities.a, PunchIdentities.b, PunchIdentities.c].map(\.nodeID)
        for i in 0..<3 { _ = await executor.startPunch(options(i, peer: peers[i], port: port)) }
        let fourth = await executor.startPunch(options(3, peer: PunchIdentities.b.nodeID, port: port))
        if case .failure(let error) = await fourth.result() {
            #expect(error.code == .tooManyPunches)
        } else {
            Issue.record("the fourth punch succeeded")
        }
        #expect(await executor.activePunches().count == 3)
        await executor.shutdown()
        await endpoint.close()
    }

    @Test("starts made while other punches await their strategy count against the caps and the session")
    func capsHoldWhilePlanning() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: endpoint)
        let port = unusedPort()
        // Twenty starts at once, all to one peer: each awaits its plan off the actor, so they interleave.
        let results = await startAtOnce(executor, 0..<20) { self.options($0, peer: PunchIdentities.b.nodeID, port: port) }
        #expect(results.count == 20)
        #expect(await executor.activePunches().count == 8)
        // The same session started twice concurrently runs once.
        let twins = await startAtOnce(executor, 0..<2) { _ in self.options(99, peer: PunchIdentities.c.nodeID, port: port) }
        #expect(twins.count == 2)
        #expect(await executor.activePunches().count == 9)
        await executor.shutdown()
        await endpoint.close()
    }

    @Test("a punch whose plan is still being made when the executor shuts down ends cancelled and never probes")
    func shutdownWhilePlanning() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: endpoint)
        let gate = PlanGate()
        var opts = options(1, peer: PunchIdentities.b.nodeID, port: unusedPort())
        opts.punchTime = .now
        opts.strategy = GatedStrategy(gate: gate)
        let started = Task { await executor.startPunch(opts) }
        #expect(await eventually { gate.entered })
        await executor.shutdown()
        gate.release()
        let handle = await started.value
        if case .failure(let error) = await handle.result() {
            #expect(error.code == .cancelled, "\(error)")
        } else {
            Issue.record("the punch connected")
        }
        #expect(await executor.activePunches().isEmpty)
        await endpoint.close()
    }
}

/// Lets a test hold a strategy's plan until it says so.
final class PlanGate: @unchecked Sendable {
    // @unchecked Sendable: every field is touched only under `lock`.
    private let lock = NSLock()
    private var isEntered = false
    private var waiter: CheckedContinuation<Void, Never>?
    private var released = false

    var entered: Bool { lock.withLock { isEntered } }

    func wait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow: Bool = lock.withLock {
                isEntered = true
                if released { return true }
                waiter = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    func release() {
        let waiting: CheckedContinuation<Void, Never>? = lock.withLock {
            released = true
            defer { waiter = nil }
            return waiter
        }
        waiting?.resume()
    }
}

/// A strategy whose plan waits for its gate.
struct GatedStrategy: PunchStrategy {
    let gate: PlanGate
    var name: String { "gated" }
    func plan(_ ctx: PunchContext) throws -> PunchPlan { try FixedStrategy().plan(ctx) }
    func detachedPlan(_ ctx: PunchContext) async throws -> PunchPlan {
        await gate.wait()
        return try plan(ctx)
    }
}
