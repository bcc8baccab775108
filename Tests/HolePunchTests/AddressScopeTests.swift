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

    /// The rendezvous's forwarding: the observed address as `srflx` first, the rest as published `host` ones.
    func forwarded(_ texts: String...) -> [Candidate] {
        texts.enumerated().map { Candidate(kind: $0.offset == 0 ? .serverReflexive : .host, address: a($0.element)) }
    }

    func addresses(_ candidates: [Candidate]) -> [SocketAddress] { candidates.map(\.address) }

    @Test("a public rendezvous: loopback, link-local and never-targets are dropped; LAN only behind our own NAT")
    func publicRendezvous() {
        let mine = a("203.0.113.5:4000")
        let filter = CandidateFilter(rendezvous: a("198.51.100.1:3478"), ourObserved: mine, ipv6: false)
        #expect(filter.permitted(forwarded("127.0.0.1:22")).isEmpty)
        #expect(filter.permitted(forwarded("169.254.1.1:22")).isEmpty)
        #expect(filter.permitted(forwarded("255.255.255.255:9")).isEmpty)
        #expect(filter.permitted(forwarded("[2001:db8::1]:9")).isEmpty, "wrong family")
        #expect(addresses(filter.permitted(forwarded("198.51.100.9:5000", "0.0.0.0:5"))) == [a("198.51.100.9:5000")])
        // A stranger's LAN address is not ours to probe: it would name a host on *our* network.
        #expect(addresses(filter.permitted(forwarded("198.51.100.9:5000", "192.168.1.7:5000"))) == [a("198.51.100.9:5000")])
        // Behind our own NAT (same public IP) its LAN address is probed *beside* the public one (the hairpin, which
        // a carrier-grade NAT may offer while the LAN address is behind another home's router); host candidates
        // have the higher priority. A third party's public address and loopback never.
        #expect(addresses(filter.permitted(forwarded("203.0.113.5:4100", "192.168.1.7:5000", "8.8.8.8:53", "127.0.0.1:22")))
            == [a("192.168.1.7:5000"), a("203.0.113.5:4100")])
        #expect(filter.permitted(forwarded("192.168.1.7:5000")).isEmpty)
        #expect(addresses(CandidateFilter(rendezvous: a("10.0.0.1:3478"), ourObserved: a("10.0.0.5:4000"), ipv6: false)
            .permitted(forwarded("10.0.0.9:5000"))) == [a("10.0.0.9:5000")], "a rendezvous on the private network sees private addresses")
        // Another port of the observed host is fine.
        #expect(filter.permitted(forwarded("198.51.100.9:5000", "198.51.100.9:5001")).count == 2)
        #expect(filter.permitted([]).isEmpty)
    }

    @Test("all permitted candidates come back by falling priority; prflx and relay from a peer never")
    func orderAndKinds() {
        let filter = CandidateFilter(rendezvous: a("198.51.100.1:3478"), ourObserved: a("203.0.113.5:4000"),
                                     families: [.ipv4, .ipv6])
        let published = [
            Candidate(kind: .serverReflexive, address: a("203.0.113.5:4100")),
            Candidate(kind: .host, address: a("192.168.1.7:5000")),
            Candidate(kind: .serverReflexive, address: a("[2001:db8:1::7]:4100")),
            Candidate(kind: .host, address: a("[2001:db8:1::7]:4100")),
            Candidate(kind: .peerReflexive, address: a("203.0.113.5:4200")),
            Candidate(kind: .relayed, address: a("198.51.100.50:3478")),
            Candidate(kind: .host, address: a("192.168.1.7:5000"), priority: 1),
        ]
        let permitted = filter.permitted(published)
        // One entry per address, the higher priority one: the IPv6 host address is also its srflx, dropped.
        #expect(addresses(permitted) == [a("[2001:db8:1::7]:4100"), a("192.168.1.7:5000"), a("203.0.113.5:4100")])
        #expect(permitted.map(\.kind) == [.host, .host, .serverReflexive])
        #expect(zip(permitted, permitted.dropFirst()).allSatisfy { $0.priority >= $1.priority })
        // A single-family socket never gets the other family's candidates.
        let v4Only = CandidateFilter(rendezvous: a("198.51.100.1:3478"), ourObserved: a("203.0.113.5:4000"), ipv6: false)
        #expect(v4Only.permitted(published).allSatisfy { $0.family == .ipv4 })
        // A global address of the observed family that is not the observed host is a third party.
        #expect(v4Only.permitted(forwarded("203.0.113.5:4100", "198.51.100.77:5000")).count == 1)
    }

    @Test("a loopback rendezvous (tests, demos): loopback candidates stay usable, and only they")
    func loopbackRendezvous() {
        let filter = CandidateFilter(rendezvous: a("127.0.0.1:3478"), ourObserved: a("127.0.0.1:4000"), ipv6: false)
        #expect(addresses(filter.permitted(forwarded("127.0.0.1:4001"))) == [a("127.0.0.1:4001")])
        #expect(addresses(filter.permitted(forwarded("127.0.0.1:4001", "127.0.0.9:1"))) == [a("127.0.0.9:1"), a("127.0.0.1:4001")])
        #expect(filter.permitted(forwarded("224.0.0.1:4001")).isEmpty)
        // Every peer of a loopback rendezvous is on this host: its interface addresses are not where it listens.
        #expect(addresses(filter.permitted(forwarded("127.0.0.1:4001", "192.168.1.7:4001"))) == [a("127.0.0.1:4001")])
        let v6 = CandidateFilter(rendezvous: a("[::1]:3478"), ourObserved: nil, ipv6: true)
        #expect(addresses(v6.permitted(forwarded("[::1]:4001"))) == [a("[::1]:4001")])
        #expect(v6.permitted(forwarded("[ff02::1]:4001", "[::]:4001")).isEmpty)
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

    @Test("what a rendezvous accepts per kind: srflx of the other family only, mapped at the observed host, no prflx or relay")
    func publishableKinds() {
        let observed = a("198.51.100.7:4000")
        func ok(_ kind: CandidateKind, _ text: String, _ from: SocketAddress? = nil) -> Bool {
            CandidateFilter.isPublishable(Candidate(kind: kind, address: a(text)), observed: from ?? observed)
        }
        #expect(ok(.host, "[2001:db8::5]:4000"), "a host's global address of the other family")
        #expect(ok(.serverReflexive, "[2001:db8::5]:4000"))
        #expect(!ok(.serverReflexive, "198.51.100.7:4001"), "the rendezvous publishes the observed family's itself")
        #expect(!ok(.serverReflexive, "[fe80::1]:4000"))
        #expect(ok(.portMapped, "198.51.100.7:5000"))
        #expect(!ok(.portMapped, "198.51.100.8:5000"))
        #expect(!ok(.peerReflexive, "198.51.100.7:5000"))
        #expect(!ok(.relayed, "192.0.2.1:3478"))
        let v6 = a("[2001:db8:1:2::7]:4000")
        #expect(ok(.host, "[2001:db8:1:2::99]:4000", v6), "another address of the observed /64")
        #expect(!ok(.host, "[2001:db8:1:3::99]:4000", v6), "another /64 is a third party")
    }
}
