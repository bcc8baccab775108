import HolePunch
import HolePunchQUIC

/// Who may ask for a punch: the requester's and the target's checks, and the token buckets behind them.
extension RendezvousState {
    func refusal(_ node: NodeID, _ requestID: UInt64, _ code: RendezvousError.Code, _ message: String) -> Action {
        .send(.error(ErrorReply(requestID: requestID, code: code.name, message: message)), to: node, after: .zero)
    }

    /// The requester's checks: registered, within its rate limit, not asking for itself. Nil when admitted.
    mutating func admitRequester(_ node: NodeID, requestID: UInt64, target: NodeID, now: Duration) -> [Action]? {
        guard var requester = peers[node] else {
            return [refusal(node, requestID, .notRegistered, "register before asking for a punch")]
        }
        guard take(&requester, now: now) else {
            peers[node] = requester
            return [refusal(node, requestID, .rateLimited, "more than \(Int(configuration.rateBurst)) requests at once or "
                            + "\(configuration.ratePerSecond)/s; retry later")]
        }
        peers[node] = requester
        guard target != node else { return [refusal(node, requestID, .selfTarget, "cannot punch to yourself")] }
        return nil
    }

    /// The target's checks (it is held here): its punch-request bucket and the session capacity. Nil when admitted.
    mutating func admitTarget(_ target: NodeID, requestID: UInt64, to node: NodeID, now: Duration) -> [Action]? {
        guard var other = peers[target] else { return nil }
        guard Self.take(&other.targetTokens, &other.targetRefilled, burst: configuration.targetRateBurst,
                        rate: configuration.targetRatePerSecond, now: now) else {
            peers[target] = other
            return [refusal(node, requestID, .rateLimited, "peer \(target.short) receives more than "
                            + "\(Int(configuration.targetRateBurst)) punch requests at once or "
                            + "\(configuration.targetRatePerSecond)/s; retry later")]
        }
        peers[target] = other
        guard sessions.count < configuration.maxSessions else {
            return [refusal(node, requestID, .capacity, "the rendezvous holds its maximum of sessions; retry later")]
        }
        return nil
    }

    // MARK: Helpers

    func side(of node: NodeID, in session: Session) -> Int? {
        if session.initiator == node { return 0 }
        if session.target == node { return 1 }
        return nil
    }

    /// Refills the peer's own bucket and takes a token; false when empty.
    func take(_ peer: inout Peer, now: Duration) -> Bool {
        Self.take(&peer.tokens, &peer.refilled, burst: configuration.rateBurst, rate: configuration.ratePerSecond, now: now)
    }

    /// Refills a token bucket and takes a token; false when empty.
    static func take(_ tokens: inout Double, _ refilled: inout Duration, burst: Double, rate: Double,
                             now: Duration) -> Bool {
        let elapsed = Double((now - refilled) / .microseconds(1)) / 1_000_000
        tokens = min(burst, tokens + max(0, elapsed) * rate)
        refilled = now
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
