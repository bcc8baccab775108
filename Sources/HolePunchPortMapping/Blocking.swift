import Foundation
import Synchronization

/// A flag a blocking body polls to learn that its caller stopped waiting (task cancelled, bound passed).
final class StopFlag: Sendable {
    private let stopped = Mutex(false)

    /// Whether the body should stop at its next check.
    var isSet: Bool { stopped.withLock { $0 } }

    /// Asks the body to stop.
    func set() { stopped.withLock { $0 = true } }
}

/// Hands a result to whoever comes first: the body's thread, the deadline, or cancellation. The losers' values go to
/// `late` (the body's) or are dropped (theirs carry nothing).
private final class FirstResult<T: Sendable>: Sendable {
    private let continuation: Mutex<CheckedContinuation<T?, Never>?>

    init(_ continuation: CheckedContinuation<T?, Never>) { self.continuation = Mutex(continuation) }

    /// Resumes the waiter with `value` if nobody did yet; returns whether this call did.
    func offer(_ value: T?) -> Bool {
        guard let waiting = continuation.withLock({ slot -> CheckedContinuation<T?, Never>? in
            defer { slot = nil }
            return slot
        }) else { return false }
        waiting.resume(returning: value)
        return true
    }
}

/// Runs a blocking `body` (libnatpmp's and miniupnpc's calls, a PCP exchange polling its socket) on a thread of its
/// own, never on the concurrency pool, whose few threads (one per core) must not sit in `poll` or in an HTTP request.
///
/// Returns the body's value, or `nil` when `deadline` passes or the task is cancelled first; either sets the stop
/// flag the body checks between its bounded waits. A value the body produces after that goes to `late` (to undo a
/// mapping nobody waits for any more).
func onDedicatedThread<T: Sendable>(
    _ name: String, until deadline: ContinuousClock.Instant? = nil,
    late: @escaping @Sendable (T) -> Void = { _ in },
    _ body: @escaping @Sendable (StopFlag) -> T
) async -> T? {
    let stop = StopFlag()
    let race = Mutex<FirstResult<T>?>(nil)
    return await withTaskCancellationHandler {
        await withCheckedContinuation { (continuation: CheckedContinuation<T?, Never>) in
            let first = FirstResult(continuation)
            race.withLock { $0 = first }
            let finished = DispatchSemaphore(value: 0)
            let thread = Thread {
                let value = body(stop)
                if !first.offer(value) { late(value) }
                finished.signal()
            }
            thread.name = name
            thread.start()
            if let deadline {
                // A second thread only waits: the pool stays free, and the body keeps its own bounded waits.
                let timer = Thread {
                    let left = ContinuousClock.now.duration(to: deadline)
                    if finished.wait(timeout: .now() + .milliseconds(Int(max(0, left.milliseconds)))) == .timedOut {
                        stop.set()
                        _ = first.offer(nil)
                    }
                }
                timer.name = "\(name)-deadline"
                timer.start()
            }
        }
    } onCancel: {
        stop.set()
        _ = race.withLock { $0 }?.offer(nil)
    }
}

extension Duration {
    /// The duration in whole milliseconds (rounded down), the unit of `poll` and the C libraries' timeouts.
    var milliseconds: Int64 { components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000 }
}
