import Foundation
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunch

@Suite("One timer for all of an executor's punches")
struct PunchTimerTests {
    private func entry(_ deadline: UInt64, _ punch: UInt64, _ generation: Int = 1) -> PunchTimerQueue.Entry {
        PunchTimerQueue.Entry(deadline: deadline, punch: PunchID(rawValue: punch), generation: generation)
    }

    @Test("due entries come out earliest first, and only those due")
    func dueInOrder() {
        var queue = PunchTimerQueue()
        let deadlines: [UInt64] = [50, 10, 40, 30, 20, 60, 10, 70]
        for (index, deadline) in deadlines.enumerated() { queue.push(entry(deadline, UInt64(index + 1))) }
        #expect(queue.earliest == 10)
        let due = queue.popDue(now: 40)
        #expect(due.map(\.deadline) == [10, 10, 20, 30, 40])
        #expect(queue.earliest == 50)
        #expect(queue.popDue(now: 49).isEmpty)
        #expect(queue.popDue(now: 100).map(\.deadline) == [50, 60, 70])
        #expect(queue.earliest == nil)
    }

    @Test("keeping the live entries drops the rest and keeps the heap order")
    func keepLive() {
        var queue = PunchTimerQueue()
        for punch in 1...40 { queue.push(entry(UInt64(1000 - punch * 7 % 300), UInt64(punch), punch % 3)) }
        queue.keep { $0.generation == 0 }
        let due = queue.popDue(now: .max)
        #expect(due.count == 13)
        #expect(due.allSatisfy { $0.generation == 0 })
        #expect(due.map(\.deadline) == due.map(\.deadline).sorted())
    }
}

extension PunchTimerTests {
    @Test("many punches tick on the shared timer; once all have ended no timer task is left")
    func sharedTimerEndsWithThePunches() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        var configuration = PunchExecutor.Configuration()
        configuration.maxPunchesPerPeer = 20
        let executor = PunchExecutor(endpoint: a, configuration: configuration)
        let silent = try SilentSocket()
        // Three rounds 20 ms apart and a deadline far beyond: each punch ends with allPortsFailed after its rounds,
        // which only timers can drive.
        let strategy = FixedStrategy(perRound: 1, interval: .milliseconds(20), rounds: 3, timeout: .seconds(20))
        let handles = await (0..<20).asyncMap { index in
            await executor.startPunch(PunchOptions(
                targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "t\(index)", sessionKey: sessionKey(),
                role: .initiator, targetNodeID: PunchIdentities.b.nodeID, strategy: strategy
            ))
        }
        for handle in handles {
            guard case .failure(let error) = await handle.result() else {
                Issue.record("a punch to a silent port succeeded")
                continue
            }
            #expect(error.code == .allPortsFailed)
            #expect(error.rounds == 3)
        }
        #expect(await executor.timerSleeper == nil)
        #expect(await executor.timers.count == 0)
        await a.close()
    }
}

private extension Range where Bound == Int {
    /// Maps in order, awaiting each element (the punches start one after another, like callers would).
    func asyncMap<T>(_ transform: (Int) async -> T) async -> [T] {
        var results: [T] = []
        for index in self { results.append(await transform(index)) }
        return results
    }
}
