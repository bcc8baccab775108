import Dispatch
import Foundation

extension LuaStrategy.Limits {
    /// How long a caller waits for one hook call before it gives up on it: the time limit, plus as much
    /// again (at least 20 ms) for the sandbox to notice the deadline, unwind and hand the result back.
    /// The sandbox stops calls at the time limit itself (count hook, bounded library calls, large
    /// allocations); this bound is what holds if some single step inside Lua still runs long.
    var abandonAfter: Duration { abandonAfterOverride ?? timeLimit + max(timeLimit, .milliseconds(20)) }
}

/// The result of one call, delivered exactly once: by the engine when the call returns, or by the
/// abandon timer when the caller's wait runs out, whichever comes first.
final class OneShotResult<T: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: `continuation` and `resolved` are only touched under `lock`.
    private let lock = NSLock()
    private var continuation: CheckedContinuation<Result<T, StrategyError>, Never>?
    private var resolved = false

    init(_ continuation: CheckedContinuation<Result<T, StrategyError>, Never>) {
        self.continuation = continuation
    }

    /// Whether a result has been delivered (a queued call whose caller gave up need not run).
    var isResolved: Bool { lock.withLock { resolved } }

    /// Delivers `result` unless one was delivered already; says whether this one was.
    @discardableResult
    func resolve(_ result: Result<T, StrategyError>) -> Bool {
        let waiting: CheckedContinuation<Result<T, StrategyError>, Never>? = lock.withLock {
            guard !resolved else { return nil }
            resolved = true
            defer { continuation = nil }
            return continuation
        }
        waiting?.resume(returning: result)
        return waiting != nil
    }
}

extension LuaEngine {
    /// Runs `body` on the calling thread with the state to itself. Waits for the state at most
    /// ``LuaStrategy/Limits/abandonAfter``, and fails at once while an abandoned call still runs.
    /// The fast path: tools and benchmarks call strategies synchronously, and a thread hop would double
    /// the cost of a typical plan.
    func withState<T>(hook: String, _ body: (LuaEngine) throws(StrategyError) -> T) throws(StrategyError) -> T {
        if stateLock.withLock({ overrun }) { throw stillStopping(hook) }
        guard callLock.lock(before: Date(timeIntervalSinceNow: limits.abandonAfter.timeInterval)) else {
            throw stillStopping(hook)
        }
        defer { callLock.unlock() }
        return try body(self)
    }

    /// Runs `body` on the engine's own queue, so the caller's thread (the executor's actor) is free while
    /// the script runs. The caller resumes with the result or, once ``LuaStrategy/Limits/abandonAfter``
    /// has passed, with a `timeLimitExceeded` error naming the line last seen running; the abandoned call
    /// is left to the sandbox to stop, and until it has, further calls fail at once instead of queueing.
    func detached<T: Sendable>(hook: String, _ body: @escaping @Sendable (LuaEngine) throws(StrategyError) -> T)
        async throws(StrategyError) -> T
    {
        if stateLock.withLock({ overrun }) { throw stillStopping(hook) }
        let wait = limits.abandonAfter
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<T, StrategyError>, Never>) in
            let slot = OneShotResult(continuation)
            let giveUpAt = Date(timeIntervalSinceNow: wait.timeInterval)
            queue.async { [self] in
                guard !slot.isResolved else { return }
                guard callLock.lock(before: giveUpAt) else { return }
                stateLock.withLock { running = true }
                let outcome: Result<T, StrategyError>
                do throws(StrategyError) {
                    outcome = .success(try body(self))
                } catch {
                    outcome = .failure(error)
                }
                stateLock.withLock {
                    running = false
                    overrun = false
                }
                callLock.unlock()
                slot.resolve(outcome)
            }
            DispatchQueue.global().asyncAfter(deadline: .now() + wait.timeInterval) { [weak self] in
                guard let self, !slot.isResolved else { return }
                // Mark the state busy before the caller hears of it, so its next call already fails fast.
                // Only a call that is still executing keeps the state busy; one still queued will skip.
                // If the call ends in between, it clears the mark itself (under the same lock).
                self.stateLock.withLock { if self.running { self.overrun = true } }
                slot.resolve(.failure(self.abandoned(hook, after: wait)))
            }
        }
        return try result.get()
    }

    private func abandoned(_ hook: String, after wait: Duration) -> StrategyError {
        StrategyError(code: .timeLimitExceeded,
                      message: "\(hook): time limit of \(limits.timeLimit.formattedMilliseconds) exceeded; the call was abandoned after \(wait.formattedMilliseconds)",
                      file: displayName, line: lastLine)
    }

    private func stillStopping(_ hook: String) -> StrategyError {
        StrategyError(code: .timeLimitExceeded,
                      message: "\(hook): not run, the strategy is still stopping an earlier call that overran its time limit",
                      file: displayName, line: lastLine)
    }
}

extension Duration {
    /// Seconds as a `TimeInterval`, for Foundation and Dispatch deadlines.
    var timeInterval: TimeInterval {
        let c = components
        return TimeInterval(c.seconds) + TimeInterval(c.attoseconds) / 1e18
    }
}
