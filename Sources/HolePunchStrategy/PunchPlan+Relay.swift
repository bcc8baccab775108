// The relay's timeline under a plan, which both peers run: when the initiator's relayed dial starts, and until when
// the target accepts it. The executor waits by it and the simulator models it, so the two cannot drift apart.
// docs/strategies.md, "The relay": "When each side accepts the relayed dial".

extension PunchPlan {
    /// What a target adds to the end of the initiator's relayed dial before it stops waiting for it: the two sides'
    /// start instants differ by the coordinate's travel to each (well under a second), and the handshake's last
    /// flight must still arrive.
    package static let relayAcceptMargin: Duration = .seconds(1)

    /// When the initiator's relayed dial starts, from the punch's start: at once for `RelayUse.first`; for
    /// `RelayUse.after` at its delay, or when the punch times out if that comes first (a punch about to fail
    /// dials the relay instead; one that runs out of rounds earlier dials earlier still). Nil for `RelayUse.never`.
    package var relayDialStart: Duration? {
        switch relay {
        case .never: nil
        case .first: .zero
        case .after(let delay): min(delay, timeout)
        }
    }

    /// Until when, from the punch's start, a target running this plan accepts the initiator's relayed dial even
    /// after its own punch has ended: the latest that dial can start (`relayDialStart`), its handshake's
    /// `connectTimeout` and `relayAcceptMargin`. Nil for `RelayUse.never`: the target accepts only while it
    /// punches. Validated plans bound it: at most `timeout + connectTimeout + 1 s` (61 s with the default limits).
    package var relayAcceptEnd: Duration? {
        relayDialStart.map { $0 + connectTimeout + Self.relayAcceptMargin }
    }
}
