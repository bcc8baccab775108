/// Where an IP address can be reached from: the one classification every "may we send probes there?" decision
/// uses (rendezvous registrations, candidate choice). Pure: no sockets, no system calls.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are classified as the IPv4 address they carry, so a peer cannot
/// dress up `127.0.0.1` or `255.255.255.255` as IPv6.
public enum AddressScope: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// `0.0.0.0/8`, `::`: "this host", never a destination.
    case unspecified
    /// `127.0.0.0/8`, `::1`: this host.
    case loopback
    /// `169.254.0.0/16`, `fe80::/10`: one link, meaningless beyond it.
    case linkLocal
    /// `224.0.0.0/4`, `ff00::/8`.
    case multicast
    /// `255.255.255.255`.
    case broadcast
    /// `240.0.0.0/4` (class E) and other addresses no host may use.
    case reserved
    /// `10/8`, `172.16/12`, `192.168/16`, `100.64/10` (carrier-grade NAT), `fc00::/7` (ULA), `fec0::/10`.
    case `private`
    /// Everything else: a globally routed address.
    case global

    /// The scope's name.
    public var description: String { rawValue }

    /// Whether no address of this scope may ever be a probe destination taken from the network, whatever the
    /// context: nothing listens there, or everything does.
    public var isNeverAProbeTarget: Bool {
        switch self {
        case .unspecified, .multicast, .broadcast, .reserved: true
        case .loopback, .linkLocal, .private, .global: false
        }
    }

    /// The scope of `ip`.
    public init(_ ip: SocketAddress.IP) {
        switch ip {
        case let .v4(a, b, _, _):
            self = Self.v4(a, b, ip)
        case let .v6(bytes):
            guard bytes.count == 16 else {
                self = .reserved
                return
            }
            if bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xFF, bytes[11] == 0xFF {
                self = Self.v4(bytes[12], bytes[13], .v4(bytes[12], bytes[13], bytes[14], bytes[15]))
                return
            }
            if bytes[0..<15].allSatisfy({ $0 == 0 }) {
                self = bytes[15] == 0 ? .unspecified : bytes[15] == 1 ? .loopback : .reserved
            } else if bytes[0..<12].allSatisfy({ $0 == 0 }) {
                // IPv4-compatible (::a.b.c.d, deprecated): no host should use it; never dress up an IPv4 target.
                self = .reserved
            } else if bytes[0] == 0x00, bytes[1] == 0x64, bytes[2] == 0xFF, bytes[3] == 0x9B,
                      bytes[4..<12].allSatisfy({ $0 == 0 }) {
                // NAT64 (64:ff9b::/96): the translator forwards to the IPv4 address it carries.
                self = Self.v4(bytes[12], bytes[13], .v4(bytes[12], bytes[13], bytes[14], bytes[15]))
            } else if bytes[0] == 0x20, bytes[1] == 0x02 {
                // 6to4 (2002::/16): relays forward to the IPv4 address in bits 16-47.
                self = Self.v4(bytes[2], bytes[3], .v4(bytes[2], bytes[3], bytes[4], bytes[5]))
            } else if bytes[0] == 0xFF {
                self = .multicast
            } else if bytes[0] == 0xFE, bytes[1] & 0xC0 == 0x80 {
                self = .linkLocal
            } else if bytes[0] & 0xFE == 0xFC || (bytes[0] == 0xFE && bytes[1] & 0xC0 == 0xC0) {
                self = .private
            } else {
                self = .global
            }
        }
    }

    private static func v4(_ a: UInt8, _ b: UInt8, _ ip: SocketAddress.IP) -> AddressScope {
        if ip == .v4(255, 255, 255, 255) { return .broadcast }
        switch a {
        case 0: return .unspecified
        case 127: return .loopback
        case 10: return .private
        case 100 where b & 0xC0 == 64: return .private
        case 169 where b == 254: return .linkLocal
        case 172 where b & 0xF0 == 16: return .private
        case 192 where b == 168: return .private
        case 224...239: return .multicast
        case 240...255: return .reserved
        default: return .global
        }
    }
}

extension SocketAddress {
    /// The scope of this address's IP.
    public var scope: AddressScope { AddressScope(ip) }
}

/// Which of a peer's published candidates this side may probe: the rule that keeps a hostile peer (or a
/// compromised rendezvous relaying one) from aiming our probes at third parties, at our own LAN or at our own host.
///
/// Inputs are the candidates as the rendezvous forwarded them (the address the rendezvous observed first, as a
/// `srflx` candidate, then what the peer published), the rendezvous address this side was configured with, this
/// side's own observed address and the families our punch socket reaches. The rule, per candidate:
///
/// 1. Only families our socket reaches (``families``), with a non-zero port; never `prflx` or `relay` (a peer
///    learns or allocates those, it cannot publish them).
/// 2. Never an unspecified, multicast, broadcast or reserved address (``AddressScope/isNeverAProbeTarget``).
/// 3. Loopback and link-local addresses only when the configured rendezvous is in that same scope: a
///    rendezvous on `127.0.0.1` means every peer is on this host (tests, demos), so the rendezvous-observed
///    address `127.0.0.1` is the real one. Otherwise such an address names *our* host or link, never the peer.
///    Conversely, with a loopback rendezvous *only* loopback candidates are probed: every peer is on this host.
/// 4. The first candidate (observed by the rendezvous) is usable if it passes 1–3 (and, when private, only
///    from a rendezvous on a private network itself).
/// 5. A private (RFC 1918, CGNAT, ULA), loopback or link-local candidate only when the peer's observed IP equals
///    ours (we share a NAT, so its LAN may be our LAN): a stranger elsewhere cannot make us probe our own network.
///    Behind one carrier-grade NAT the LAN address may be behind another home's router; it is probed *beside*
///    the public one (whose hairpin through the carrier NAT may work), never instead of it.
/// 6. A global candidate of the observed address's family only when it is the observed host (same IP, or for
///    IPv6 the same /64); a global candidate of the other family is taken as published (nobody here can verify
///    it, the rendezvous bounded how many there are, and each costs only its share of the probes).
///
/// The result is every permitted candidate, once per address, by falling priority (ties keep the rendezvous's
/// order), so that the executor can check them in parallel.
public struct CandidateFilter: Sendable, Hashable {
    /// The rendezvous this side was configured with.
    public var rendezvous: SocketAddress
    /// This side's address as the rendezvous observed it, once registered.
    public var ourObserved: SocketAddress?
    /// The families our punch socket reaches (`Endpoint.reachableFamilies`).
    public var families: Set<IPFamily>

    /// Creates a filter for a socket that reaches `families`.
    public init(rendezvous: SocketAddress, ourObserved: SocketAddress?, families: Set<IPFamily>) {
        self.rendezvous = rendezvous
        self.ourObserved = ourObserved
        self.families = families
    }

    /// Creates a filter for a single-family socket (IPv6 when `ipv6`, else IPv4).
    public init(rendezvous: SocketAddress, ourObserved: SocketAddress?, ipv6: Bool) {
        self.init(rendezvous: rendezvous, ourObserved: ourObserved, families: [ipv6 ? .ipv6 : .ipv4])
    }

    /// Whether `address` passes rules 1–3.
    public func isProbeable(_ address: SocketAddress) -> Bool {
        guard families.contains(address.family), address.port != 0 else { return false }
        let scope = address.scope
        if scope.isNeverAProbeTarget { return false }
        if rendezvous.scope == .loopback { return scope == .loopback }
        if scope == .loopback || scope == .linkLocal { return scope == rendezvous.scope }
        return true
    }

    /// Whether a rendezvous accepts `lan` as a published `host` address of a peer it observed at `observed`
    /// (``isPublishable(_:observed:)`` for a host candidate).
    public static func isPublishable(lan: SocketAddress, observed: SocketAddress) -> Bool {
        isPublishable(Candidate(kind: .host, address: lan), observed: observed)
    }

    /// Whether a rendezvous accepts `candidate` from a peer it observed at `observed` (docs/security.md):
    ///
    /// - never `prflx` or `relay`, a zero port, or an unspecified, multicast, broadcast or reserved address;
    /// - a loopback or link-local address only when the observed address is in that scope too (a peer on
    ///   `127.0.0.1` may publish another loopback port);
    /// - `host`: a private address always; a global one of the observed family only when it is the observed
    ///   host (same IP, or for IPv6 the same /64), because a public address that is not the peer's is a third
    ///   party; a global one of the other family always (the rendezvous cannot check it; it is bounded in number);
    /// - `srflx`: only of the other family (the rendezvous publishes the observed one itself), global or private;
    /// - `mapped`: the observed host (a router mapping has the NAT's public IP), or any global address of the
    ///   other family.
    public static func isPublishable(_ candidate: Candidate, observed: SocketAddress) -> Bool {
        let address = candidate.address
        let scope = address.scope
        guard !scope.isNeverAProbeTarget, address.port != 0,
              candidate.kind != .peerReflexive, candidate.kind != .relayed else { return false }
        if scope == .loopback || scope == .linkLocal { return scope == observed.scope }
        let otherFamily = address.family != observed.family
        switch candidate.kind {
        case .host:
            return scope == .private || otherFamily || isSameHost(address, as: observed)
        case .serverReflexive:
            return otherFamily
        case .portMapped:
            return otherFamily ? scope == .global : isSameHost(address, as: observed)
        case .peerReflexive, .relayed:
            return false
        }
    }

    /// Same IP, or two global IPv6 addresses in one /64 (a host's temporary and stable addresses).
    static func isSameHost(_ address: SocketAddress, as observed: SocketAddress) -> Bool {
        if address.ip == observed.ip { return true }
        guard case let .v6(a) = address.ip, case let .v6(b) = observed.ip, address.scope == .global,
              observed.scope == .global else { return false }
        return a.prefix(8) == b.prefix(8)
    }

    /// The candidates this side may probe, by the rule above: every permitted one, by falling priority.
    public func permitted(_ candidates: [Candidate]) -> [Candidate] {
        guard let observed = candidates.first else { return [] }
        var out: [Candidate] = []
        // A rendezvous sees a private address only when it sits on that private network itself; a public one that
        // names a private address as a peer's observed address names some host on *our* network instead.
        let observedOK = observed.kind == .serverReflexive && isProbeable(observed.address)
            && (observed.address.scope != .private || rendezvous.scope == .private)
        if observedOK { out.append(observed) }
        let sharesNAT = observedOK && ourObserved.map { $0.ip == observed.address.ip } == true
        for candidate in candidates.dropFirst() where isProbeable(candidate.address) {
            let address = candidate.address
            let allowed: Bool
            switch (candidate.kind, address.scope) {
            case (.peerReflexive, _), (.relayed, _):
                allowed = false
            case (_, .global):
                allowed = address.family != observed.address.family
                    || (observedOK && Self.isSameHost(address, as: observed.address))
            default:
                // Private, loopback (a loopback rendezvous) or link-local: only someone behind our own NAT, or
                // another port of the observed address itself.
                allowed = sharesNAT || (observedOK && address.ip == observed.address.ip)
            }
            if allowed { out.append(candidate) }
        }
        // Stable: equal priorities keep the rendezvous's order (observed address first). Then one entry per address,
        // the one with the higher priority (an IPv6 host address is often its srflx address too).
        let sorted = out.enumerated().sorted { ($0.element.priority, -$0.offset) > ($1.element.priority, -$1.offset) }
        var seen: Set<SocketAddress> = []
        return sorted.map(\.element).filter { seen.insert($0.address).inserted }
    }
}
