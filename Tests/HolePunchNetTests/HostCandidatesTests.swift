import HolePunchNet
import Testing

@Suite("Host candidates: which interface addresses a peer publishes")
struct HostCandidatesTests {
    func ip(_ text: String) -> SocketAddress.IP { try! SocketAddress(host: text, port: 0).ip }

    @Test("down, loopback, link-local, unspecified, multicast and excluded addresses are skipped; duplicates once")
    func rules() {
        let interfaces = [
            InterfaceAddress(name: "lo", ip: ip("127.0.0.1"), isLoopback: true),
            InterfaceAddress(name: "lo", ip: ip("::1"), isLoopback: true),
            InterfaceAddress(name: "eth0", ip: ip("192.168.1.7")),
            InterfaceAddress(name: "eth0", ip: ip("fe80::1")),
            InterfaceAddress(name: "eth0", ip: ip("2001:db8::7")),
            InterfaceAddress(name: "eth1", ip: ip("10.0.0.7"), isUp: false),
            InterfaceAddress(name: "eth2", ip: ip("169.254.3.4")),
            InterfaceAddress(name: "tun0", ip: ip("10.8.0.2")),
            InterfaceAddress(name: "odd", ip: ip("0.0.0.0")),
            InterfaceAddress(name: "odd", ip: ip("224.0.0.1")),
            InterfaceAddress(name: "eth0:1", ip: ip("192.168.1.7")),
        ]
        let gathered = HostCandidates.select(interfaces, port: 4000, families: [.ipv4, .ipv6], excluding: [ip("10.8.0.2")])
        #expect(gathered.map(\.address) == [try! SocketAddress(parsing: "[2001:db8::7]:4000"),
                                            try! SocketAddress(parsing: "192.168.1.7:4000")])
        #expect(gathered.allSatisfy { $0.kind == .host })
        #expect(zip(gathered, gathered.dropFirst()).allSatisfy { $0.priority > $1.priority })
        let v4 = HostCandidates.select(interfaces, port: 4000, families: [.ipv4], excluding: [])
        #expect(v4.map(\.address.host) == ["192.168.1.7", "10.8.0.2"], "only the socket's family; nothing excluded")
    }

    @Test("a host with hundreds of interfaces publishes at most maxPerFamily addresses of each family")
    func bounded() {
        var many: [InterfaceAddress] = []
        for n in 0..<300 {
            let low = UInt8(n & 0xFF)
            let high = UInt8(n >> 8)
            var v6: [UInt8] = [0x20, 0x01, 0x0d, 0xb8]
            v6 += [UInt8](repeating: 0, count: 10)
            v6 += [high, low]
            many.append(InterfaceAddress(name: "veth\(n)", ip: .v4(10, high, low, 1)))
            many.append(InterfaceAddress(name: "veth\(n)", ip: .v6(v6)))
        }
        let gathered = HostCandidates.select(many, port: 1, families: [.ipv4, .ipv6], excluding: [])
        #expect(gathered.filter { $0.family == .ipv4 }.count == HostCandidates.maxPerFamily)
        #expect(gathered.filter { $0.family == .ipv6 }.count == HostCandidates.maxPerFamily)
        #expect(Set(gathered.map(\.priority)).count == gathered.count, "distinct priorities: a stable order")
    }

    @Test("this machine's interfaces: the rules hold for whatever getifaddrs lists")
    func realHost() {
        let gathered = HostCandidates.gather(port: 4242, families: [.ipv4, .ipv6])
        for family in IPFamily.allCases {
            #expect(gathered.filter { $0.family == family }.count <= HostCandidates.maxPerFamily)
        }
        for candidate in gathered {
            let scope = candidate.address.scope
            #expect(candidate.address.port == 4242)
            #expect(scope != .loopback && scope != .linkLocal && !scope.isNeverAProbeTarget, "\(candidate)")
        }
        #expect(Set(gathered.map(\.address)).count == gathered.count)
        // Every usable interface address of a family is published while there is room.
        let usable = Set(HostCandidates.interfaceAddresses().filter { interface in
            let scope = AddressScope(interface.ip)
            return interface.isUp && !interface.isLoopback && scope != .loopback && scope != .linkLocal
                && !scope.isNeverAProbeTarget
        }.map(\.ip))
        #expect(Set(gathered.map(\.address.ip)).isSubset(of: usable))
        #expect(gathered.count == min(usable.filter { SocketAddress(ip: $0, port: 1).family == .ipv4 }.count, HostCandidates.maxPerFamily)
                + min(usable.filter { SocketAddress(ip: $0, port: 1).family == .ipv6 }.count, HostCandidates.maxPerFamily))
        // Excluding one leaves it out.
        if let first = gathered.first {
            #expect(!HostCandidates.gather(port: 4242, families: [.ipv4, .ipv6], excluding: [first.address.ip])
                .contains { $0.address.ip == first.address.ip })
        }
    }
}
