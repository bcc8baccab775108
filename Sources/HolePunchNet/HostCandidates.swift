#if canImport(Glibc)
internal import Glibc
#endif

/// One address of one local interface, as `getifaddrs` lists it.
package struct InterfaceAddress: Sendable, Hashable {
    /// The interface's name (`eth0`, `wlan0`).
    package var name: String
    /// The address (no port).
    package var ip: SocketAddress.IP
    /// `IFF_UP`: the interface is administratively up.
    package var isUp: Bool
    /// `IFF_LOOPBACK`.
    package var isLoopback: Bool

    /// Creates a record.
    package init(name: String, ip: SocketAddress.IP, isUp: Bool = true, isLoopback: Bool = false) {
        self.name = name
        self.ip = ip
        self.isUp = isUp
        self.isLoopback = isLoopback
    }
}

/// The `host` candidates of this machine: the addresses of its usable interfaces, which a peer behind the same
/// router (no hairpinning) or on the same IPv6 network reaches directly.
///
/// The rules (`select(_:port:families:excluding:)`): interfaces that are down or loopback are skipped, and so are
/// loopback, link-local (meaningless beyond one link), unspecified and never-a-target addresses
/// (`AddressScope/isNeverAProbeTarget`), addresses the user excludes, and duplicates. At most ``maxPerFamily``
/// addresses per family are kept, in interface order, so a host with hundreds of interfaces (containers, VPNs)
/// still publishes a bounded list. Each candidate's local preference falls with its position, IPv6 ahead of IPv4.
public enum HostCandidates {
    /// The most host candidates gathered per IP family.
    public static let maxPerFamily = 4

    /// The `host` candidates of this machine's interfaces, at `port` (the punch socket's port).
    ///
    /// - Parameters:
    ///   - port: the punch socket's port; every candidate carries it.
    ///   - families: the families the punch socket reaches (`UDPDatagramSocket/reachableFamilies`).
    ///   - excluding: addresses never to publish (a VPN's, a management network's).
    /// - Returns: the candidates, by falling priority; empty when `getifaddrs` fails.
    public static func gather(port: UInt16, families: Set<IPFamily>, excluding: Set<SocketAddress.IP> = []) -> [Candidate] {
        select(interfaceAddresses(), port: port, families: families, excluding: excluding)
    }

    /// Whether this machine has an address of `family` that ``gather(port:families:excluding:)`` would publish (a
    /// usable IPv6 address decides whether a wildcard punch socket should be dual-stack).
    public static func hasUsableAddress(of family: IPFamily) -> Bool {
        !gather(port: 1, families: [family]).isEmpty
    }

    /// Applies the rules above to a list of interface addresses (pure, for tests with a known interface set).
    package static func select(
        _ interfaces: [InterfaceAddress], port: UInt16, families: Set<IPFamily>, excluding: Set<SocketAddress.IP>
    ) -> [Candidate] {
        var kept: [IPFamily: [SocketAddress]] = [:]
        for interface in interfaces where interface.isUp && !interface.isLoopback && !excluding.contains(interface.ip) {
            let address = SocketAddress(ip: interface.ip, port: port)
            let scope = address.scope
            guard families.contains(address.family), !scope.isNeverAProbeTarget,
                  scope != .loopback, scope != .linkLocal else { continue }
            var list = kept[address.family, default: []]
            guard list.count < maxPerFamily, !list.contains(address) else { continue }
            list.append(address)
            kept[address.family] = list
        }
        var out: [Candidate] = []
        for family in [IPFamily.ipv6, .ipv4] {
            for (index, address) in kept[family, default: []].enumerated() {
                // 65535/65534 for the first of each family (as `Candidate.priority`'s default), two less per place,
                // so the families interleave and each keeps its interface order.
                let preference = UInt16((family == .ipv6 ? 65_535 : 65_534) - 2 * index)
                out.append(Candidate(kind: .host, address: address,
                                     priority: Candidate.priority(kind: .host, family: family, localPreference: preference)))
            }
        }
        return out.sorted { $0.priority > $1.priority }
    }

    /// Every IPv4 and IPv6 address of every interface (`getifaddrs`); empty when the call fails.
    package static func interfaceAddresses() -> [InterfaceAddress] {
        var head: UnsafeMutablePointer<ifaddrs>?
        guard getifaddrs(&head) == 0, let first = head else { return [] }
        defer { freeifaddrs(head) }
        var out: [InterfaceAddress] = []
        var cursor: UnsafeMutablePointer<ifaddrs>? = first
        while let entry = cursor {
            defer { cursor = entry.pointee.ifa_next }
            guard let raw = entry.pointee.ifa_addr, let address = SocketAddress(UnsafePointer(raw)) else { continue }
            let flags = entry.pointee.ifa_flags
            out.append(InterfaceAddress(name: String(cString: entry.pointee.ifa_name), ip: address.ip,
                                        isUp: flags & UInt32(IFF_UP) != 0,
                                        isLoopback: flags & UInt32(IFF_LOOPBACK) != 0))
        }
        return out
    }
}
