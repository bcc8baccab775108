public import HolePunchQUIC
import Synchronization

/// An asynchronous punch: its id, its progress, and its result, which is delivered exactly once.
///
/// The seed's `execute_async`: start a punch with ``PunchExecutor/startPunch(_:)``, keep the handle, and await
/// ``value()`` or read ``events`` when convenient.
public final class PunchHandle: Sendable {
    /// The punch's id, for ``PunchExecutor/cancel(_:)`` and ``PunchExecutor/activePunches()``.
    public let id: PunchID
    /// Progress events, ending with `.done`. The stream finishes after `.done`.
    public let events: AsyncStream<PunchEvent>
    let box: ResultBox

    init(id: PunchID, events: AsyncStream<PunchEvent>, box: ResultBox) {
        self.id = id
        self.events = events
        self.box = box
    }

    /// A handle for a punch that never started: its result is `error` at once and its events end with it.
    /// For callers that refuse a punch before it reaches an executor (e.g. a peer this side does not admit).
    package static func failed(_ error: PunchError) -> PunchHandle {
        let (events, continuation) = AsyncStream.makeStream(of: PunchEvent.self)
        continuation.yield(.done(.failure(error)))
        continuation.finish()
        let box = ResultBox()
        box.deliver(.failure(error))
        return PunchHandle(id: PunchID(rawValue: 0), events: events, box: box)
    }

    /// Waits for the outcome.
    public func result() async -> Result<QUICConnection, PunchError> {
        await box.wait()
    }

    /// Waits for the connection.
    ///
    /// - Throws: ``PunchError`` when the punch failed or was cancelled.
    public func value() async throws(PunchError) -> QUICConnection {
        try await box.wait().get()
    }
}

/// Holds a punch's result: set once, awaited by any number of callers.
final class ResultBox: Sendable {
    private enum State {
        case pending([CheckedContinuation<Result<QUICConnection, PunchError>, Never>])
        case done(Result<QUICConnection, PunchError>)
    }

    private let state = Mutex(State.pending([]))
    private let deliveryCount = Atomic<Int>(0)

    /// Stores the result and wakes every waiter. Returns false (and changes nothing) when a result is already set.
    @discardableResult
    func deliver(_ result: Result<QUICConnection, PunchError>) -> Bool {
        let waiters: [CheckedContinuation<Result<QUICConnection, PunchError>, Never>]? = state.withLock { state in
            guard case .pending(let waiters) = state else { return nil }
            state = .done(result)
            return waiters
        }
        guard let waiters else { return false }
        deliveryCount.add(1, ordering: .relaxed)
        for waiter in waiters { waiter.resume(returning: result) }
        return true
    }

    /// How many times a result was delivered: 0 or 1, whatever races happened.
    var deliveries: Int { deliveryCount.load(ordering: .relaxed) }

    /// The result, if set.
    var current: Result<QUICConnection, PunchError>? {
        state.withLock { state in
            if case .done(let result) = state { return result }
            return nil
        }
    }

    func wait() async -> Result<QUICConnection, PunchError> {
        await withCheckedContinuation { continuation in
            let ready: Result<QUICConnection, PunchError>? = state.withLock { state in
                switch state {
                case .done(let result):
                    return result
                case .pending(var waiters):
                    waiters.append(continuation)
                    state = .pending(waiters)
                    return nil
                }
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}
