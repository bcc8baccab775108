/// How a peer learned one of its addresses, in the sense of ICE (RFC 8445 §5.1.1).
///
/// The raw values are the wire and Lua names; they never change.
public enum CandidateKind: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// An address of one of the peer's own interfaces (a LAN address behind a NAT, or a public one).
    case host
    /// A router mapping the peer asked for (PCP, NAT-PMP or UPnP-IGD).
    case portMapped = "mapped"
    /// The peer's address as a STUN server or the rendezvous observed it: its NAT's public mapping.
    case serverReflexive = "srflx"
    /// An address the other side saw packets come from during checks, that nobody published.
    case peerReflexive = "prflx"
    /// An address on a TURN relay that forwards to the peer.
    case relayed = "relay"

    /// The kind's wire name.
    public var description: String { rawValue }

    /// The type preference of RFC 8445 §5.1.2.2 (0...126): a direct host path first, a relay last. A router
    /// mapping sits between host and server-reflexive, as the port-mapping issue asks.
    public var typePreference: UInt32 {
        switch self {
        case .host: 126
        case .peerReflexive: 110
        case .portMapped: 105
        case .serverReflexive: 100
        case .relayed: 0
        }
    }
}

/// The IP family of an address.
public enum IPFamily: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// IPv4.
    case ipv4
    /// IPv6.
    case ipv6

    /// The family's name (`ipv4`, `ipv6`).
    public var description: String { rawValue }
}

/// One address at which a peer may be reachable, with how it was learned and how much it is preferred.
///
/// Candidates are published through the rendezvous, so a received one is a stranger's claim: decoding checks only its
/// shape, and whether it may be probed is `CandidateFilter`'s decision (docs/security.md).
public struct Candidate: Sendable, Hashable, Codable, CustomStringConvertible {
    /// How the address was learned.
    public var kind: CandidateKind
    /// The address (IP and port).
    public var address: SocketAddress
    /// Higher is tried first; see ``Candidate/priority(kind:family:localPreference:)``.
    public var priority: UInt32
    /// For a `mapped` candidate, how the router granted it (protocol and lease), so strategies can prefer or ignore
    /// it; nil for every other kind. Optional on the wire: older peers neither send nor read it.
    public var mapping: Mapping?

    /// How a router granted a `mapped` candidate.
    public struct Mapping: Sendable, Hashable, Codable {
        /// The protocol's name: `pcp`, `natpmp` or `upnp` (`PortMappingProtocol`'s raw values); a string so that a
        /// protocol added later does not make older peers refuse the whole message.
        public var protocolName: String
        /// The lease the router granted, in seconds, as the publisher last refreshed it.
        public var lifetimeSeconds: UInt32

        /// Creates a mapping description.
        public init(protocolName: String, lifetimeSeconds: UInt32) {
            self.protocolName = protocolName
            self.lifetimeSeconds = lifetimeSeconds
        }

        private enum CodingKeys: String, CodingKey { case protocolName = "protocol", lifetimeSeconds = "lifetime" }
    }

    /// Creates a candidate; `priority` defaults to ``Candidate/priority(kind:family:localPreference:)`` with the
    /// default local preference.
    public init(kind: CandidateKind, address: SocketAddress, priority: UInt32? = nil, mapping: Mapping? = nil) {
        self.kind = kind
        self.address = address
        self.priority = priority ?? Candidate.priority(kind: kind, family: address.family)
        self.mapping = mapping
    }

    /// The candidate's IP family.
    public var family: IPFamily { address.family }

    /// The priority formula of RFC 8445 §5.1.2.1 with one component: `type preference << 24 | local preference << 8
    /// | 255`. The default local preference puts IPv6 ahead of IPv4 of the same kind (no NAT on most IPv6 paths).
    public static func priority(kind: CandidateKind, family: IPFamily, localPreference: UInt16? = nil) -> UInt32 {
        let local = UInt32(localPreference ?? (family == .ipv6 ? 65_535 : 65_534))
        return kind.typePreference << 24 | local << 8 | 255
    }

    /// `kind address (priority)`, e.g. `srflx 203.0.113.7:40000 (1694498559)`.
    public var description: String { "\(kind) \(address) (\(priority))" }
}

extension SocketAddress {
    /// The address's IP family.
    public var family: IPFamily { isIPv6 ? .ipv6 : .ipv4 }
}
