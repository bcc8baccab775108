import Testing
import HolePunchNet

@Suite("Address scope and the candidate rule")
struct AddressScopeTests {
    func a(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }
    func scope(_ host: String) -> AddressScope { AddressScope(try! SocketAddress(host: host, port: 1).ip) }

    @Test("IPv4, IPv6 and v4-mapped addresses land in the right scope", arguments: [
        ("0.0.0.0", AddressScope.unspecified), ("0.1.2.3", .unspecified), ("127.0.0.1", .loopback),
        ("127.255.0.9", .loopback), ("169.254.10.1", .linkLocal), ("224.0.0.251", .multicast),
        ("239.1.1.1", .multicast), ("255.255.255.255", .broadcast), ("240.0.0.1", .reserved),
        ("10.1.2.3", .private), ("172.16.0.1", .private), ("172.31.255.1", .private), ("172.32.0.1", .global),
        ("192.168.1.1", .private), ("100.64.0.1", .private), ("100.128.0.1", .global), ("8.8.8.8", .global),
        ("198.51.100.7", .global), ("::", .unspecified), ("::1", .loopback), ("fe80::1", .linkLocal),
        ("febf::1", .linkLocal), ("ff02::1", .multicast), ("fc00::1", .private), ("fd12:3456::1", .private),
        ("fec0::1", .private), ("2001:db8::1", .global), ("::ffff:127.0.0.1", .loopback),
        ("::ffff:255.255.255.255", .broadcast), ("::ffff:192.168.0.1", .private), ("::ffff:8.8.8.8", .global),
        ("::2", .reserved), ("::7f00:1", .reserved), ("::808:808", .reserved), ("64:ff9b::7f00:1", .loopback),
        ("64:ff9b::808:808", .global), ("64:ff9b::e000:fb", .multicast), ("2002:7f00:1::1", .loopback),
        ("2002:c0a8:101::1", .private), ("2002:808:808::1", .global),
    ])
    func scopes(host: String, expected: AddressScope) {
        #expect(scope(host) == expected, "\(host)")
    }

    @Test("a public rendezvous: loopback, link-local and never-targets are dropped; LAN only behind our own NAT")
    func publicRendezvous() {
        let mine = a("203.0.113.5:4000")
        let filter = CandidateFilter(rendezvous: a("198.51.100.1:3478"), ourObserved: mine, ipv6: false)
        #expect(filter.permitted([a("127.0.0.1:22")]).isEmpty)
        #expect(filter.permitted([a("169.254.1.1:22")]).isEmpty)
        #expect(filter.permitted([a("255.255.255.255:9")]).isEmpty)
        #expect(filter.permitted([a("[2001:db8::1]:9")]).isEmpty, "wrong family")
        #expect(filter.permitted([a("198.51.100.9:5000"), a("0.0.0.0:5")]) == [a("198.51.100.9:5000")])
        // A stranger (other public IP) publishing LAN addresses: only its observed address is used.
        #expect(filter.permitted([a("198.51.100.9:5000"), a("192.168.1.7:5000")]) == [a("198.51.100.9:5000")])
        // Behind our NAT: its private LAN address is meant; a public "LAN" address or loopback is not.
        #expect(filter.permitted([a("203.0.113.5:4100"), a("192.168.1.7:5000"), a("8.8.8.8:53"), a("127.0.0.1:22")])
                == [a("203.0.113.5:4100"), a("192.168.1.7:5000")])
        // A public rendezvous cannot have observed a peer at a private address: that names a host on our network.
        #expect(filter.permitted([a("192.168.1.7:5000")]).isEmpty)
        #expect(CandidateFilter(rendezvous: a("10.0.0.1:3478"), ourObserved: a("10.0.0.5:4000"), ipv6: false)
            .permitted([a("10.0.0.9:5000")]) == [a("10.0.0.9:5000")], "a rendezvous on the private network sees private addresses")
        // Another port of the observed host is fine.
        #expect(filter.permitted([a("198.51.100.9:5000"), a("198.51.100.9:5001")]).count == 2)
        #expect(filter.permitted([]).isEmpty)
    }

    @Test("a loopback rendezvous (tests, demos): loopback candidates stay usable")
    func loopbackRendezvous() {
        let filter = CandidateFilter(rendezvous: a("127.0.0.1:3478"), ourObserved: a("127.0.0.1:4000"), ipv6: false)
        #expect(filter.permitted([a("127.0.0.1:4001")]) == [a("127.0.0.1:4001")])
        #expect(filter.permitted([a("127.0.0.1:4001"), a("127.0.0.9:1")]) == [a("127.0.0.1:4001"), a("127.0.0.9:1")])
        #expect(filter.permitted([a("224.0.0.1:4001")]).isEmpty)
        let v6 = CandidateFilter(rendezvous: a("[::1]:3478"), ourObserved: nil, ipv6: true)
        #expect(v6.permitted([a("[::1]:4001")]) == [a("[::1]:4001")])
        #expect(v6.permitted([a("[ff02::1]:4001"), a("[::]:4001")]).isEmpty)
    }

    @Test("what a rendezvous accepts as a published LAN address")
    func publishable() {
        let observed = a("198.51.100.7:4000")
        #expect(CandidateFilter.isPublishable(lan: a("192.168.1.5:4000"), observed: observed))
        #expect(CandidateFilter.isPublishable(lan: a("198.51.100.7:4001"), observed: observed))
        #expect(!CandidateFilter.isPublishable(lan: a("8.8.8.8:53"), observed: observed))
        #expect(!CandidateFilter.isPublishable(lan: a("127.0.0.1:22"), observed: observed))
        #expect(!CandidateFilter.isPublishable(lan: a("192.168.1.5:0"), observed: observed))
        #expect(CandidateFilter.isPublishable(lan: a("127.0.0.9:1"), observed: a("127.0.0.1:4000")))
        #expect(!CandidateFilter.isPublishable(lan: a("224.0.0.1:1"), observed: a("127.0.0.1:4000")))
    }
}
