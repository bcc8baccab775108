import HolePunch
package import HolePunchNet
package import Logging

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
    /// `mapped` is our address as the TURN server saw it: the mapping our NAT made for the allocation, after the
    /// registration's, so on the registration's IP it becomes the registration's `lastAllocatedPort` (a sequential
    /// NAT's peer predicts our next ports from it; without it, pairs of sequential NATs missed by one and ended
    /// relayed in the lab).
    package func publishRelayed(_ candidates: [Candidate], mapped: SocketAddress? = nil) async throws(RendezvousError)
        -> Registered
    {
        relayCandidates = candidates
        // Port 0 is no mapping (the rendezvous refuses it, and would close our connection over it): a TURN server
        // that sends it must not cut us off from our rendezvous.
        if let mapped, mapped.port != 0, mapped.ip == registered?.observedAddress.ip {
            lastRegistration.lastAllocatedPort = mapped.port
        }
        return try await register(lastRegistration)
    }
}

/// A TURN allocation a driver outside this module started with `RendezvousClient.startPublishedRelay(_:logger:)`:
/// what `holepunch lab peer` holds, so that it uses the relay the way a `HolePunchNode` does without copying it.
package struct PublishedRelay: Sendable {
    /// Our relayed address, published as a `relay` candidate.
    package var address: SocketAddress { relay.candidate.address }
    let relay: NodeRelay
    let executor: PunchExecutor

    /// Deletes the allocation (one bounded transaction) and detaches it: a driver that exits at once would otherwise
    /// leave it counting against coturn's quotas until its lifetime ends.
    package func stop() async {
        await relay.stop(endpoint: executor.endpoint, executor: executor)
    }
}

extension RendezvousClient {
    /// What a node does with a grant (`HolePunchNode`'s relay start, minus the credential renewal a short-lived
    /// driver does not need): allocates on the punch socket, opens the allocation to punching peers and publishes
    /// the relayed address. Nil when allocating failed (NodeRelay logs why, once) or the rendezvous refused the
    /// address (logged here); the caller then punches only.
    package func startPublishedRelay(_ grant: TURNGrant, logger: Logger) async -> PublishedRelay? {
        guard let relay = await NodeRelay.start(grant: grant, endpoint: executor.endpoint, executor: executor, logger: logger)
        else { return nil }
        setRelayPermitter { peers in await relay.permit(peers) }
        do {
            _ = try await publishRelayed([relay.candidate], mapped: relay.mapped)
        } catch {
            logger.info("the rendezvous refused the relayed address", metadata: ["error": "\(error)"])
            await relay.stop(endpoint: executor.endpoint, executor: executor)
            return nil
        }
        return PublishedRelay(relay: relay, executor: executor)
    }
}
