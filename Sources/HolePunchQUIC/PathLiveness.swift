/// Whether the active path of a connection still reaches the peer, and the re-check of every known path once it
/// seems not to: a state machine with no I/O (the endpoint feeds it sends, packets and answers, and sends the
/// challenges it asks for).
///
/// The active path is *silent* when ack-eliciting data has been outstanding on it for ``silenceLimit(pto:initialRTT:)``
/// and no authenticated packet came back on it. Silence starts a re-check: a challenge on every path of the
/// connection, repeated every silence limit until one answers or the idle timeout ends the connection. The first
/// path to answer carries the connection from then on (the active one answering ends the re-check in place).
struct PathLiveness {
    /// Since when ack-eliciting data has been outstanding on the active path with nothing heard back (monotonic ns).
    private(set) var awaitingSince: UInt64?
    /// When the running re-check began; nil when none runs.
    private(set) var recheckSince: UInt64?

    /// How long the active path may stay silent: three probe timeouts, as RFC 9000 §8.2.4 allows a path validation
    /// (at least six initial RTTs, so a PTO measured on a fast path does not turn a short stall into a move).
    ///
    /// Three PTOs is two retransmissions unanswered: one loss burst rarely takes that many, and a dead path is
    /// found within about a second on an Internet path, long before any idle timeout.
    static func silenceLimit(pto: UInt64, initialRTT: UInt64) -> UInt64 {
        max(3 &* pto, 6 &* initialRTT)
    }

    var isRechecking: Bool { recheckSince != nil }

    /// An authenticated packet arrived on the active path: it works, and a running re-check ends.
    mutating func heardOnActive() {
        awaitingSince = nil
        recheckSince = nil
    }

    /// The connection moved to another path: it starts with a clean slate there.
    mutating func moved() {
        heardOnActive()
    }

    /// After a flush (packets sent, a timer handled): notes outstanding data; returns true when the active path
    /// has now been silent for `limit` and a re-check begins.
    mutating func check(inFlight: Bool, now: UInt64, limit: UInt64) -> Bool {
        // Only data that expects an answer starts the clock; it stops only when the peer is heard (data declared
        // lost and not yet resent leaves nothing in flight, yet the path is no better).
        if inFlight && awaitingSince == nil { awaitingSince = now }
        guard recheckSince == nil, let since = awaitingSince, now &- since >= limit else { return false }
        recheckSince = now
        return true
    }
}
