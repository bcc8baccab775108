/// A set of suspended callers that wait for the same kind of event (a stream's data, a connection's streams,
/// acknowledgements): each is a ticket in the endpoint's ``Waiters`` table.
///
/// Any number of callers may wait on one list. An event wakes them all and each re-checks what it waits for, so
/// two concurrent readers or acceptors both make progress and neither is lost.
final class WaitList {
    fileprivate(set) var tickets: [UInt64] = []

    var isEmpty: Bool { tickets.isEmpty }
}

/// Every suspended caller of one endpoint, by ticket. Confined to the endpoint's event loop.
///
/// A waiter is resumed exactly once: by ``wake(_:)`` (it returns and re-checks), by ``cancel(_:)`` when its task is
/// cancelled (it throws ``QUICError/Code/cancelled``), whichever comes first; the other finds the ticket gone.
final class Waiters {
    private var parked: [UInt64: (continuation: CheckedContinuation<Void, any Error>, list: WaitList)] = [:]
    private var nextTicket: UInt64 = 1

    /// How many callers are suspended (for tests: a cancelled wait must leave nothing behind).
    var count: Int { parked.count }

    func makeTicket() -> UInt64 {
        defer { nextTicket += 1 }
        return nextTicket
    }

    func park(_ ticket: UInt64, _ continuation: CheckedContinuation<Void, any Error>, on list: WaitList) {
        parked[ticket] = (continuation, list)
        list.tickets.append(ticket)
    }

    /// Resumes every waiter of `list`; each re-checks its condition.
    func wake(_ list: WaitList) {
        guard !list.tickets.isEmpty else { return }
        let tickets = list.tickets
        list.tickets.removeAll()
        for ticket in tickets {
            parked.removeValue(forKey: ticket)?.continuation.resume()
        }
    }

    /// Resumes one waiter with a cancellation error, if it is still suspended.
    func cancel(_ ticket: UInt64) {
        guard let (continuation, list) = parked.removeValue(forKey: ticket) else { return }
        list.tickets.removeAll { $0 == ticket }
        continuation.resume(throwing: QUICError(.cancelled, "the waiting task was cancelled"))
    }
}
