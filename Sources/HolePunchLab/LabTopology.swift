import Foundation

/// A lab topology (`lab.sh up --topology NAME`, docs/lab.md) that `holepunch lab matrix` runs beside the NAT pairs.
///
/// Each one is a place where users have peers (issue 14): one LAN, one carrier-grade NAT, two address families. What
/// a topology is about is the path a connection takes there, so each names the paths that count.
package struct LabTopology: Sendable, Hashable {
    /// The name `lab.sh up --topology` takes.
    package let name: String
    /// The paths a connection may take here to count: the LAN, a hairpin, IPv6 — whatever the topology is built for.
    package let acceptedPaths: [LabPath]
    /// Whether the hosts have global IPv6 beside IPv4: the rendezvous then listens and answers STUN on both families,
    /// and the peers bind dual-stack sockets, as `holepunch rendezvous --listen [::]:PORT --stun-other` and
    /// `holepunch peer` do on such hosts.
    package var dualStack = false

    /// Every topology besides lab.sh's default `two-nats` (the one the 25 NAT pairs run in), in table order.
    package static let all: [LabTopology] = [
        // Two peers on one home router without hairpinning: only the LAN joins them.
        LabTopology(name: "same-lan", acceptedPaths: [.lan]),
        // The same router with hairpinning: the LAN or the router's hairpin.
        LabTopology(name: "same-lan-hairpin", acceptedPaths: [.lan, .hairpin]),
        // Two homes behind one hairpinning carrier NAT: each LAN address lies behind the other home's router, so
        // only the carrier NAT's hairpin joins them.
        LabTopology(name: "cgnat-homes", acceptedPaths: [.hairpin]),
        // A home behind a carrier NAT against a single NAT: the ordinary punch between public addresses.
        LabTopology(name: "cgnat-vs-nat", acceptedPaths: [.publicInternet]),
        // Both peers have global IPv6 behind stateful firewalls (no NAT66): the IPv6 path, the easiest there is.
        LabTopology(name: "dual-stack", acceptedPaths: [.ipv6], dualStack: true),
    ]

    /// The topology called `name`, or nil.
    package static func named(_ name: String) -> LabTopology? { all.first { $0.name == name } }
}

/// Which way a lab connection went, judged from the address the initiator ended up connected to.
package enum LabPath: String, Sendable, Hashable {
    /// A 10/8 address: straight across a LAN.
    case lan
    /// The peer's public address when it is ours as well: back in through our router's (or carrier NAT's) hairpin.
    case hairpin
    /// A 100.64/10 address: inside a carrier NAT, past its hairpin.
    case carrier
    /// Another IPv4 public address: out through both NATs.
    case publicInternet = "public"
    /// Any IPv6 address (the lab has no NAT66, so it is the peer's own).
    case ipv6

    /// The path to `remote` (`ADDR:PORT` or `[ADDR]:PORT`) for an initiator whose traffic leaves with the public
    /// IPv4 address `ownPublic`.
    package init(remote: String, ownPublic: String?) {
        var host = remote
        if host.hasPrefix("["), let close = host.firstIndex(of: "]") {
            host = String(host[host.index(after: host.startIndex)..<close])
            // An IPv4-mapped address from a dual-stack socket is an IPv4 path.
            guard host.lowercased().hasPrefix("::ffff:"), host.contains(".") else {
                self = .ipv6
                return
            }
            host = String(host.dropFirst("::ffff:".count))
        } else if let colon = host.lastIndex(of: ":") {
            host = String(host[..<colon])
        }
        let octets = host.split(separator: ".").compactMap { Int($0) }
        if host == ownPublic {
            self = .hairpin
        } else if octets.first == 10 {
            self = .lan
        } else if octets.count == 4, octets[0] == 100, (64..<128).contains(octets[1]) {
            self = .carrier
        } else {
            self = .publicInternet
        }
    }
}
