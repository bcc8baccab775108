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
/// compromised rendezvous relaying one) from aiming our probes at third parties or at our own host.
///
/// Inputs are the candidates as the rendezvous forwarded them (the address the rendezvous observed first, then
/// the LAN addresses the peer published), the rendezvous address this side was configured with, and this side's
/// own observed address. The rule, in order:
///
/// 1. Only candidates of our socket's address family, with a non-zero port.
/// 2. Never an unspecified, multicast, broadcast or reserved address (``AddressScope/isNeverAProbeTarget``).
/// 3. Loopback and link-local addresses only when the configured rendezvous is in that same scope: a
///    rendezvous on `127.0.0.1` means every peer is on this host (tests, demos), so the rendezvous-observed
///    address `127.0.0.1` is the real one. Otherwise such an address names *our* host or link, never the peer.
/// 4. The first candidate (observed by the rendezvous) is usable if it passes 1–3.
/// 5. A LAN candidate (any later one) is usable only when the peer's observed IP equals ours (we share a NAT,
///    so its LAN is our LAN) and the address is private (RFC 1918, CGNAT, ULA) or passes rule 3; or when it
///    has the observed candidate's IP (another port of the same host).
///
/// The result is in the rendezvous's order, observed candidate first if it survived.
public struct CandidateFilter: Sendable, Hashable {
    /// The rendezvous this side was configured with.
    public var rendezvous: SocketAddress
    /// This side's address as the rendezvous observed it, once registered.
    public var ourObserved: SocketAddress?
    /// Whether our punch socket is IPv6.
    public var ipv6: Bool

    /// Creates a filter.
    public init(rendezvous: SocketAddress, ourObserved: SocketAddress?, ipv6: Bool) {
        self.rendezvous = rendezvous
        self.ourObserved = ourObserved
        self.ipv6 = ipv6
    }

    /// Whether `address` passes rules 1–3.
    public func isProbeable(_ address: SocketAddress) -> Bool {
        guard address.isIPv6 == ipv6, address.port != 0 else { return false }
        let scope = address.scope
        if scope.isNeverAProbeTarget { return false }
        if scope == .loopback || scope == .linkLocal { return scope == rendezvous.scope }
        return true
    }

    /// Whether a rendezvous accepts `lan` as a published LAN address of a peer it observed at `observed`: never
    /// an unspecified, multicast, broadcast or reserved address; a private one always; a loopback or link-local
    /// one only when the observed address is in that scope too (a peer on `127.0.0.1` may publish another
    /// loopback port); a global one only when it has the observed IP (another port of the same host), because a
    /// public address that is not the peer's is a third party.
    public static func isPublishable(lan: SocketAddress, observed: SocketAddress) -> Bool {
        let scope = lan.scope
        guard !scope.isNeverAProbeTarget, lan.port != 0 else { return false }
        switch scope {
        case .private: return true
        case .global: return lan.ip == observed.ip
        default: return scope == observed.scope
        }
    }

    /// The candidates this side may probe, by the rule above.
    public func permitted(_ candidates: [SocketAddress]) -> [SocketAddress] {
        guard let observed = candidates.first else { return [] }
        var out: [SocketAddress] = []
        // A rendezvous sees a private address only when it sits on that private network itself; a public one that
        // names a private address as a peer's observed address names some host on *our* network instead.
        let observedOK = isProbeable(observed) && (observed.scope != .private || rendezvous.scope == .private)
        if observedOK { out.append(observed) }
        let sharesNAT = observedOK && ourObserved.map { $0.ip == observed.ip } == true
        for lan in candidates.dropFirst() where isProbeable(lan) && !out.contains(lan) {
            let sameHost = observedOK && lan.ip == observed.ip
            // isProbeable already limited loopback and link-local to a rendezvous in their scope; a global
            // "LAN" address is never meant.
            let meant = sharesNAT && lan.scope != .global
            if sameHost || meant { out.append(lan) }
        }
        return out
    }
}
