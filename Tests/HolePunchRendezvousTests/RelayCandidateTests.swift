import Foundation
import HolePunchNet
import HolePunchRendezvous
import Testing

/// The rendezvous's rule for `relay` candidates (docs/security.md, "Relayed candidates"): a peer may publish the
/// addresses it allocated at this rendezvous's own TURN servers, one per server, and nothing else of that kind.
@Suite("Relay candidates at the rendezvous")
struct RelayCandidateTests {
    static let turn = try! SocketAddress(parsing: "198.51.100.7:3478")
    static let observed = try! SocketAddress(parsing: "203.0.113.5:40000")
    static let other = try! SocketAddress(parsing: "203.0.113.9:40000")

    static func relayed(_ text: String) -> Candidate {
        Candidate(kind: .relayed, address: try! SocketAddress(parsing: text))
    }

    @Test("a registration with a relay candidate decodes (at most one per grantable server)")
    func decodes() throws {
        let registration = Registration(candidates: [Self.relayed("198.51.100.7:50000")])
        let frame = RendezvousFraming.frame(ClientMessage.register(registration))
        var reader = FrameReader()
        reader.append(frame)
        let body = try #require(try reader.next())
        #expect(try RendezvousFraming.decode(ClientMessage.self, from: body) == .register(registration))

        let many = Registration(candidates: (0...TURNGrant.maximumServers).map { Self.relayed("198.51.100.7:\(50000 + $0)") })
        var manyReader = FrameReader()
        manyReader.append(RendezvousFraming.frame(ClientMessage.register(many)))
        let manyBody = try #require(try manyReader.next())
        #expect(throws: RendezvousError.self) { _ = try RendezvousFraming.decode(ClientMessage.self, from: manyBody) }
    }

    @Test("a relay candidate on the rendezvous's TURN server is stored and reaches the other peer's coordinate")
    func acceptedOnOwnServer() throws {
        var state = RendezvousState()
        let candidate = Self.relayed("198.51.100.7:50000")
        let actions = state.register(node: node(1), connection: 1, observed: Self.observed,
                                     registration: Registration(candidates: [candidate]), relayServers: [Self.turn],
                                     now: .zero)
        #expect(errorCode(actions) == nil)
        #expect(state.peer(node(1))?.registration.candidates == [candidate])
        _ = state.register(node: node(2), connection: 2, observed: Self.other, registration: Registration(), now: .zero)
        let sent = coordinates(state.requestPunch(from: node(2), requestID: 1, target: node(1), secret: secret(), now: .seconds(1)))
        let toInitiator = try #require(sent.first { $0.1 == node(2) }).0
        #expect(toInitiator.candidates.contains(candidate))
    }

    @Test("relay candidates off the TURN servers, twice for one server, or with no TURN configured are refused")
    func refused() {
        let cases: [([Candidate], [SocketAddress])] = [
            ([Self.relayed("192.0.2.1:50000")], [Self.turn]),
            ([Self.relayed("198.51.100.7:50000"), Self.relayed("198.51.100.7:50001")], [Self.turn]),
            ([Self.relayed("198.51.100.7:50000")], []),
        ]
        for (candidates, servers) in cases {
            var state = RendezvousState()
            let actions = state.register(node: node(1), connection: 1, observed: Self.observed,
                                         registration: Registration(candidates: candidates), relayServers: servers,
                                         now: .zero)
            #expect(errorCode(actions) == RendezvousError.Code.protocolViolation.name, "\(candidates) at \(servers)")
            #expect(state.peer(node(1)) == nil, "a refused registration changes nothing")
        }
        // Two servers on one IP (two coturn ports) allow two.
        let second = try! SocketAddress(parsing: "198.51.100.7:3479")
        #expect(RendezvousState.relayCandidatesProblem(
            [Self.relayed("198.51.100.7:50000"), Self.relayed("198.51.100.7:50001")], relayServers: [Self.turn, second]) == nil)
    }
}
