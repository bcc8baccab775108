import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

@Suite("Rendezvous wire: typed candidates, their bounds and the last allocated port")
struct CandidateWireTests {
    func a(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

    func decodeClient(_ json: [String: Any]) -> Result<ClientMessage, RendezvousError> {
        decodeResult(ClientMessage.self, Array(try! JSONSerialization.data(withJSONObject: ["register": ["_0": json]])))
    }

    @Test("an older peer's lanAddresses still register, as host candidates")
    func olderPeer() throws {
        guard case .register(let r) = try decodeClient(["lanAddresses": ["192.168.1.5:4000"]]).get() else {
            Issue.record("not a register")
            return
        }
        #expect(r.candidates == [Candidate(kind: .host, address: a("192.168.1.5:4000"))])
    }

    @Test("a registration round-trips its candidates and last allocated port")
    func roundTrip() throws {
        let registration = Registration(candidates: [Candidate(kind: .host, address: a("192.168.1.5:4000")),
                                                     Candidate(kind: .serverReflexive, address: a("[2001:db8::5]:4000"))],
                                        nat: .portRestricted, lastAllocatedPort: 40_123)
        let decoded = try RendezvousFraming.decode(ClientMessage.self,
                                                   from: Array(RendezvousFraming.frame(ClientMessage.register(registration)).dropFirst(4)))
        #expect(decoded == .register(registration))
    }

    @Test("prflx candidates, more relay candidates than grantable servers, priorities outside their kind's band and too many candidates are refused on decoding")
    func bounds() {
        func candidate(_ kind: String, priority: UInt32? = nil) -> [String: Any] {
            let k = CandidateKind(rawValue: kind)!
            return ["kind": kind, "address": "192.168.1.5:4000", "priority": priority ?? Candidate.priority(kind: k, family: .ipv4)]
        }
        func refused(_ list: [[String: Any]]) -> Bool {
            if case .failure(let error) = decodeClient(["candidates": list]) { return error.code == .protocolViolation }
            return false
        }
        #expect(!refused([candidate("host"), candidate("mapped"), candidate("srflx")]))
        #expect(refused([candidate("prflx")]))
        // A relay candidate decodes (a node publishes its allocation); which ones the rendezvous stores is its own
        // TURN servers' business (RelayCandidateTests: with none configured, every one is refused).
        #expect(!refused([candidate("relay")]))
        #expect(refused(Array(repeating: candidate("relay"), count: RendezvousMessageLimits.maxRelayedCandidates + 1)))
        var state = RendezvousState()
        let relayed = Candidate(kind: .relayed, address: a("192.168.1.5:4000"))
        #expect(errorCode(state.register(node: node(1), connection: 1, observed: a("203.0.113.5:4000"),
                                         registration: Registration(candidates: [relayed]), now: .zero))
                == RendezvousError.Code.protocolViolation.name, "a rendezvous without TURN refuses relay candidates")
        #expect(refused([candidate("srflx", priority: Candidate.priority(kind: .host, family: .ipv4))]), "claims a better kind")
        #expect(refused([candidate("host", priority: UInt32.max)]))
        #expect(!refused(Array(repeating: candidate("host"), count: RendezvousMessageLimits.maxPublishedCandidates)))
        #expect(refused(Array(repeating: candidate("host"), count: RendezvousMessageLimits.maxPublishedCandidates + 1)))
        #expect(refused(Array(repeating: candidate("host"), count: 500)))
    }

    @Test("a mapped candidate carries protocol and lease through the wire and the rendezvous; bad mapping fields are refused")
    func mappingFields() throws {
        let mapped = Candidate(kind: .portMapped, address: a("203.0.113.5:4000"),
                               mapping: Candidate.Mapping(protocolName: "pcp", lifetimeSeconds: 7200))
        let registration = Registration(candidates: [Candidate(kind: .host, address: a("192.168.1.5:4000")), mapped])
        let decoded = try RendezvousFraming.decode(ClientMessage.self,
                                                   from: Array(RendezvousFraming.frame(ClientMessage.register(registration)).dropFirst(4)))
        #expect(decoded == .register(registration))
        func candidate(_ kind: String, mapping: [String: Any]) -> [String: Any] {
            let k = CandidateKind(rawValue: kind)!
            return ["kind": kind, "address": "192.168.1.5:4000", "priority": Candidate.priority(kind: k, family: .ipv4),
                    "mapping": mapping]
        }
        func refused(_ list: [[String: Any]]) -> Bool {
            if case .failure(let error) = decodeClient(["candidates": list]) { return error.code == .protocolViolation }
            return false
        }
        #expect(!refused([candidate("mapped", mapping: ["protocol": "natpmp", "lifetime": 3600])]))
        #expect(refused([candidate("host", mapping: ["protocol": "pcp", "lifetime": 3600])]), "a host is no mapping")
        #expect(refused([candidate("mapped", mapping: ["protocol": "PCP;drop", "lifetime": 3600])]))
        #expect(refused([candidate("mapped", mapping: ["protocol": "", "lifetime": 3600])]))
        #expect(refused([candidate("mapped", mapping: ["protocol": String(repeating: "p", count: 17), "lifetime": 3600])]))
        #expect(refused([candidate("mapped", mapping: ["protocol": "pcp", "lifetime": 0])]))
        #expect(refused([candidate("mapped", mapping: ["protocol": "pcp", "lifetime": 4_294_967_295])]))

        // The rendezvous accepts the mapping at the observed IP and forwards it, fields intact, to the requester.
        let observed = a("203.0.113.5:5000")
        var state = RendezvousState()
        #expect(errorCode(state.register(node: node(1), connection: 1, observed: observed,
                                         registration: Registration(candidates: [mapped]), now: .zero)) == nil)
        _ = state.register(node: node(2), connection: 2, observed: a("198.51.100.9:5000"), registration: Registration(), now: .zero)
        let sent = coordinates(state.requestPunch(from: node(2), requestID: 1, target: node(1), secret: secret(), now: .zero))
        let toB = try #require(sent.first { $0.1 == node(2) }).0
        #expect(toB.candidates.last == mapped)
    }

    @Test("the server puts the observed address first as srflx, checks each kind, and forwards the last allocated port")
    func serverForwards() throws {
        let observedA = a("203.0.113.5:4000")
        var state = RendezvousState()
        let published = [Candidate(kind: .host, address: a("192.168.1.5:4000")),
                         Candidate(kind: .serverReflexive, address: a("[2001:db8::5]:4000")),
                         Candidate(kind: .host, address: observedA)]
        #expect(errorCode(state.register(node: node(1), connection: 1, observed: observedA,
                                         registration: Registration(candidates: published, lastAllocatedPort: 4100),
                                         now: .zero)) == nil)
        _ = state.register(node: node(2), connection: 2, observed: a("198.51.100.9:5000"), registration: Registration(), now: .zero)
        let sent = coordinates(state.requestPunch(from: node(2), requestID: 1, target: node(1), secret: secret(), now: .zero))
        let toB = try #require(sent.first { $0.1 == node(2) }).0
        #expect(toB.candidates == [Candidate(kind: .serverReflexive, address: observedA)] + published.prefix(2),
                "observed first, the published copy of it dropped")
        #expect(toB.peerLastAllocatedPort == 4100)
        let toA = try #require(sent.first { $0.1 == node(1) }).0
        #expect(toA.peerLastAllocatedPort == nil)
        // A srflx candidate of the observed family is the rendezvous's to publish; a third party's address never.
        for bad in [Candidate(kind: .serverReflexive, address: a("203.0.113.5:4001")),
                    Candidate(kind: .host, address: a("8.8.8.8:53")),
                    Candidate(kind: .portMapped, address: a("8.8.8.8:53"))] {
            var fresh = RendezvousState()
            let actions = fresh.register(node: node(1), connection: 1, observed: observedA,
                                         registration: Registration(candidates: [bad]), now: .zero)
            #expect(errorCode(actions) == RendezvousError.Code.protocolViolation.name, "\(bad) was accepted")
        }
    }

    @Test("Registered advertises at most maxSTUNServers usable STUN addresses")
    func stunServers() throws {
        let registered = ServerMessage.registered(Registered(observedAddress: addrA, ttlMilliseconds: 30_000,
                                                             keepAliveMilliseconds: 10_000, stunServer: nil,
                                                             stunServers: [a("127.0.0.1:7001"), a("[::1]:7001")]))
        func refused(_ body: [UInt8]) -> Bool {
            if case .failure(let error) = decodeResult(ServerMessage.self, body) { return error.code == .protocolViolation }
            return false
        }
        #expect(!refused(Array(RendezvousFraming.frame(registered).dropFirst(4))))
        #expect(refused(try body(registered, setting: "stunServers", to: ["224.0.0.1:3478"])))
        #expect(refused(try body(registered, setting: "stunServers", to: ["127.0.0.1:0"])))
        #expect(refused(try body(registered, setting: "stunServers",
                                 to: [String](repeating: "127.0.0.1:7001", count: RendezvousMessageLimits.maxSTUNServers + 1))))
    }

    @Test("a coordinate must lead with the observed srflx address")
    func coordinateLeadsWithObserved() {
        var coordinate = sampleCoordinate()
        coordinate.candidates.reverse()
        #expect(throws: RendezvousError.self) { try coordinate.validate() }
    }
}

@Suite("Rendezvous client: candidates into punch options", .serialized)
struct CandidateOptionsTests {
    func a(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

    /// A client on a loopback endpoint whose registration is confirmed as seen from 203.0.113.5:4000, no rendezvous.
    func registeredClient() async throws -> (Endpoint, RendezvousClient) {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        let client = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: a("198.51.100.1:3478"), serverNodeID: node(9)))
        await client.setRegisteredForTesting(Registered(observedAddress: a("203.0.113.5:4000"), ttlMilliseconds: 30_000,
                                                        keepAliveMilliseconds: 10_000, stunServer: nil))
        return (endpoint, client)
    }

    @Test("behind one carrier-grade NAT the LAN and the public (hairpin) candidates are both checked; the target stays the public one")
    func sharedPublicIP() async throws {
        let (endpoint, client) = try await registeredClient()
        var coordinate = sampleCoordinate()
        coordinate.candidates = [Candidate(kind: .serverReflexive, address: a("203.0.113.5:4100")),
                                 Candidate(kind: .host, address: a("192.168.1.7:5000")),
                                 Candidate(kind: .host, address: a("[2001:db8::7]:5000"))]
        coordinate.peerLastAllocatedPort = 4107
        let options = try await client.options(for: ReceivedCoordinate(coordinate: coordinate, receivedAt: .now))
        #expect(options.candidates.map(\.address) == [a("192.168.1.7:5000"), a("203.0.113.5:4100")],
                "both, by priority; not the IPv6 one from an IPv4 socket")
        #expect(options.targetHost == "203.0.113.5" && options.targetPorts == [4100])
        #expect(options.remoteLastAllocatedPort == 4107)
        await endpoint.close()
    }

    @Test("a TURN server's mapped address with port 0 is not published as our last allocated port: the registration stays one the rendezvous accepts")
    func mappedPortZeroIgnored() async throws {
        let (endpoint, client) = try await registeredClient()
        // Cancelled before it starts: the register is refused at once, after the registration it sends was updated.
        let publish = Task { [client] in
            withUnsafeCurrentTask { $0?.cancel() }
            return try? await client.publishRelayed([], mapped: SocketAddress(ip: .v4(203, 0, 113, 5), port: 0))
        }
        _ = await publish.value
        let registration = await client.lastRegistration
        #expect(throws: Never.self) { try registration.validate() }
        #expect(registration.lastAllocatedPort == nil)
        await endpoint.close()
    }

    @Test("a wildcard socket publishes the host's interfaces (not nothing); a loopback rendezvous or a bound IP does not gather")
    func wildcardPublishes() async throws {
        let wildcard = try await Endpoint.bind(.anyV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        let expected = HostCandidates.gather(port: wildcard.localAddress.port, families: [.ipv4])
        let published = Registration.hostCandidates(of: wildcard, rendezvous: a("198.51.100.1:3478"))
        #expect(published == expected)
        if expected.isEmpty { print("note: this host has no usable IPv4 interface; the gathering rules were not exercised") }
        #expect(Registration.hostCandidates(of: wildcard, rendezvous: a("127.0.0.1:3478")).isEmpty)
        if let first = expected.first {
            #expect(!Registration.hostCandidates(of: wildcard, rendezvous: a("198.51.100.1:3478"), excluding: [first.address.ip])
                .contains(first))
        }
        await wildcard.close()
        let bound = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        #expect(Registration.hostCandidates(of: bound, rendezvous: a("127.0.0.1:3478")) == [Candidate(kind: .host, address: bound.localAddress)])
        await bound.close()
    }
}

extension RendezvousClient {
    /// Stands in for a registration's confirmation, so `options(for:)` can be driven without a rendezvous.
    func setRegisteredForTesting(_ confirmed: Registered) { registered = confirmed }
}
