package import HolePunchNet

// The node's relayed addresses in its registrations, and the hook that opens its allocation to a punching peer
// (issue 15; docs/relay.md, "The node's allocation").
extension RendezvousClient {
    /// `registration` with ``relayCandidates`` added, within `RendezvousMessageLimits.maxPublishedCandidates` (a
    /// relayed address is worth more than the last of many host addresses).
    func withRelayCandidates(_ registration: Registration) -> Registration {
        let relayed = relayCandidates.filter { candidate in !registration.candidates.contains(candidate) }
        guard !relayed.isEmpty else { return registration }
        var sent = registration
        sent.candidates = Array(sent.candidates.prefix(RendezvousMessageLimits.maxPublishedCandidates - relayed.count)) + relayed
        return sent
    }

    /// Sets what opens this node's relay allocation to a target punch's peer (``relayPermitter``).
    func setRelayPermitter(_ permit: @escaping @Sendable ([SocketAddress]) async -> Void) {
        relayPermitter = permit
    }

    /// Publishes `candidates` (this node's relayed addresses) in this and every later registration: registers again
    /// with the latest registration and returns the confirmation (with fresh TURN credentials, when granted).
    ///
    /// - Throws: ``RendezvousError``, e.g. `protocolViolation` when the rendezvous refuses an address that is not on
    ///   one of its TURN servers.
    package func publishRelayed(_ candidates: [Candidate]) async throws(RendezvousError) -> Registered {
        relayCandidates = candidates
        return try await register(lastRegistration)
    }
}
