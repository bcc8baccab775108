public import HolePunchNet
public import HolePunchQUIC

extension Registration {
    /// The `host` candidates a peer whose punch socket is `endpoint` publishes.
    ///
    /// A socket bound to one IP publishes that address (unless excluded). A wildcard socket publishes the
    /// addresses of the host's usable interfaces in the families it reaches (`HostCandidates.gather`: no loopback,
    /// link-local or down interfaces, at most `HostCandidates.maxPerFamily` per family) — without them two peers
    /// on one LAN behind a router that does not hairpin have no path. With a loopback rendezvous every peer is on
    /// this host, so a wildcard socket publishes nothing (its interfaces are not where its peers are).
    ///
    /// - Parameters:
    ///   - endpoint: the punch socket.
    ///   - rendezvous: the rendezvous the peer registers at.
    ///   - excluding: addresses never to publish (`holepunch peer --exclude-address`).
    public static func hostCandidates(
        of endpoint: Endpoint, rendezvous: SocketAddress, excluding: Set<SocketAddress.IP> = []
    ) -> [Candidate] {
        let local = endpoint.localAddress
        guard local.ipBytes.allSatisfy({ $0 == 0 }) else {
            return excluding.contains(local.ip) ? [] : [Candidate(kind: .host, address: local)]
        }
        guard rendezvous.scope != .loopback else { return [] }
        return HostCandidates.gather(port: local.port, families: endpoint.reachableFamilies, excluding: excluding)
    }
}
