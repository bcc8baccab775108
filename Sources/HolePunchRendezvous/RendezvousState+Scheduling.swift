import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy

/// When each peer's coordinate message goes out and when both start: the clock-free start.
extension RendezvousState {
    /// When each peer's coordinate goes out: the farther at once, the nearer after half the RTT difference (capped).
    struct Plan {
        var initiatorDelay: Duration
        var targetDelay: Duration
        var compensation: Duration
        /// Residual skew the estimates predict once compensation is capped (zero unless the cap bites).
        var planned: Duration
        var hint: Int64?
        var initiatorIsFar: Bool
        /// Both peers start this long after receipt.
        var startDelay: Duration = .zero
    }

    /// The session's start delay (``Configuration/minStartDelay``).
    func startDelay(_ initiator: Peer, _ target: Peer) -> Duration {
        startDelay(initiatorRTT: initiator.rtt, initiatorSpread: initiator.rttSpread, initiatorNAT: initiator.registration.nat,
                   target: target)
    }

    func startDelay(initiatorRTT: Duration?, initiatorSpread: Duration, initiatorNAT: NATProfile?,
                            target: Peer) -> Duration {
        let ceiling = configuration.startDelay
        guard initiatorRTT != nil, target.rtt != nil,
              initiatorNAT?.allocation != .random, target.registration.nat?.allocation != .random else { return ceiling }
        return min(ceiling, configuration.minStartDelay + initiatorSpread + target.rttSpread)
    }

    func schedule(rttI measuredI: Duration?, rttT measuredT: Duration?) -> Plan {
        let rttI = measuredI ?? .zero
        let rttT = measuredT ?? .zero
        let half = (rttI > rttT ? rttI - rttT : rttT - rttI) / 2
        let compensation = min(half, configuration.maxCompensation)
        let hint: Int64? = (measuredI != nil && measuredT != nil) ? Int64((rttI + rttT) / 2 / .microseconds(1)) : nil
        let initiatorIsFar = rttI >= rttT
        return Plan(initiatorDelay: initiatorIsFar ? .zero : compensation, targetDelay: initiatorIsFar ? compensation : .zero,
                    compensation: compensation, planned: half - compensation, hint: hint, initiatorIsFar: initiatorIsFar)
    }

    func coordinate(requestID: UInt64?, secret: SessionSecret, peer: NodeID, candidates: [Candidate],
                    nat: NATProfile?, lastAllocatedPort: UInt16?, role: PunchRole, plan: Plan) -> Coordinate {
        Coordinate(requestID: requestID, sessionID: secret.id, sessionKey: secret.key, peer: peer, candidates: candidates,
                   peerNAT: nat ?? .unknown, role: role,
                   startDelayMicroseconds: Int64(plan.startDelay / .microseconds(1)), peerRTTMicroseconds: plan.hint,
                   peerLastAllocatedPort: lastAllocatedPort)
    }

    /// The driver actually wrote a session's coordinate message to `node` at `now`.
}
