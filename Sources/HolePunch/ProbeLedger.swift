import HolePunchNet
import HolePunchSTUN

/// Which probe transactions one punch has sent and seen, so that a captured probe replayed from elsewhere proves
/// nothing. A value type with no I/O: the executor records every request it sends and asks before it believes one.
///
/// A probe's MESSAGE-INTEGRITY proves that someone with the session key made it, not that it came from where it
/// arrived: anyone on the path can copy it and send it again from another address. Two rules close that:
/// - **A response counts only once, only for a request this side sent, and only from where that request went.**
///   A copied response from another source, a second copy, or a response to a request we never sent does not
///   prove a path (and does not stop our probing).
/// - **A request counts once.** Every probe request carries a fresh random transaction id, so a second request
///   with an id already seen in this session is a copy: it is neither answered nor taken as proof.
///   Session keys are new for every coordination, so a probe from an earlier session fails integrity anyway.
///
/// Both tables are bounded (oldest first out). The bound is far above what a punch sends under the plan limits
/// (1,000 probes/s for at most 30 s): a copy can only slip through after that many newer genuine probes.
struct ProbeLedger {
    /// Where a request went: the local socket and the remote address.
    private struct Destination: Hashable {
        var socket: Int
        var address: SocketAddress
    }

    /// The most transactions each table remembers.
    let capacity: Int
    private var sent: [STUNTransactionID: Destination] = [:]
    private var sentOrder = BoundedQueue<STUNTransactionID>()
    private var seenRequests: Set<STUNTransactionID> = []
    private var seenOrder = BoundedQueue<STUNTransactionID>()

    /// Creates an empty ledger remembering up to `capacity` transactions of each kind.
    init(capacity: Int = 65_536) {
        self.capacity = max(1, capacity)
    }

    /// Records a request about to be sent from local socket `socket` to `address`.
    mutating func recordSent(_ transaction: STUNTransactionID, socket: Int, to address: SocketAddress) {
        if sent.updateValue(Destination(socket: socket, address: address), forKey: transaction) == nil {
            sentOrder.push(transaction)
        }
        while sentOrder.count > capacity, let oldest = sentOrder.pop() { sent[oldest] = nil }
    }

    /// Whether a verified response is the first answer to a request we sent to `from` from socket `socket`.
    /// Accepting it consumes the transaction.
    mutating func acceptResponse(_ transaction: STUNTransactionID, socket: Int, from: SocketAddress) -> Bool {
        guard let destination = sent[transaction], destination == Destination(socket: socket, address: from) else {
            return false
        }
        sent[transaction] = nil
        return true
    }

    /// Whether a verified request is the first with its transaction id in this session.
    mutating func acceptRequest(_ transaction: STUNTransactionID) -> Bool {
        guard seenRequests.insert(transaction).inserted else { return false }
        seenOrder.push(transaction)
        while seenOrder.count > capacity, let oldest = seenOrder.pop() { seenRequests.remove(oldest) }
        return true
    }

    /// Requests sent whose answer has not arrived (and not been forgotten).
    var outstanding: Int { sent.count }
}

/// A FIFO queue with amortised O(1) push and pop (an array and a read index, compacted when half is dead).
struct BoundedQueue<Element> {
    private var storage: [Element] = []
    private var head = 0

    var count: Int { storage.count - head }

    mutating func push(_ element: Element) { storage.append(element) }

    mutating func pop() -> Element? {
        guard head < storage.count else { return nil }
        let element = storage[head]
        head += 1
        if head > 1024 && head * 2 > storage.count {
            storage.removeFirst(head)
            head = 0
        }
        return element
    }
}
