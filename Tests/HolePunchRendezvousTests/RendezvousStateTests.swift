import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy
import Testing
@testable import HolePunchRendezvous

func node(_ byte: UInt8) -> NodeID { try! NodeID(bytes: [UInt8](repeating: byte, count: 32)) }

let addrA = try! SocketAddress(parsing: "127.0.0.1:4001")
let addrB = try! SocketAddress(parsing: "127.0.0.1:4002")

func secret(_ id: String = "s1") -> SessionSecret { SessionSecret(id: id, key: [UInt8](repeating: 7, count: 32)) }

extension RendezvousState.Action {
    var sent: (message: ServerMessage, to: NodeID, after: Duration)? {
        if case let .send(message, to, after) = self { return (message, to, after) }
        return nil
    }
}

func coordinates(_ actions: [RendezvousState.Action]) -> [(Coordinate, NodeID, Duration)] {
    actions.compactMap { action in
        guard let sent = action.sent, case .coordinate(let c) = sent.message else { return nil }
        return (c, sent.to, sent.after)
    }
}

func errorCode(_ actions: [RendezvousState.Action]) -> String? {
    for action in actions {
        if let sent = action.sent, case .error(let reply) = sent.message { return reply.code }
    }
    return nil
}

@Suite("Rendezvous state machine")
struct RendezvousStateTests {
    func twoPeers(_ configuration: RendezvousState.Configuration = .init()) -> RendezvousState {
        var state = RendezvousState(configuration: configuration)
        _ = state.register(node: node(1), connection: 1, observed: addrA,
                           registration: Registration(lanAddresses: [try! SocketAddress(parsing: "127.0.0.9:1")], nat: .fullCone),
                           now: .zero)
        _ = state.register(node: node(2), connection: 2, observed: addrB, registration: Registration(), now: .zero)
        return state
    }

    @Test("register replies with the observed address, TTL and keep-alive interval")
    func register() {
        var state = RendezvousState()
        let stun = try! SocketAddress(parsing: "127.0.0.1:3479")
        let actions = state.register(node: node(1), connection: 7, observed: addrA, registration: Registration(),
                                     stunServer: stun, now: .seconds(1))
        #expect(actions.count == 1)
        guard let sent = actions.first?.sent, case .registered(let reply) = sent.message else {
            Issue.record("expected registered"); return
        }
        #expect(sent.to == node(1))
        #expect(reply.observedAddress == addrA)
        #expect(reply.ttlMilliseconds == 30_000)
        #expect(reply.keepAliveMilliseconds == 10_000)
        #expect(reply.stunServer == stun)
        #expect(state.registrationCount == 1)
    }

    @Test("registrations expire without keep-alives; keep-alives extend them; expiry closes the connection")
    func expiry() {
        var state = RendezvousState(configuration: .init(registrationTTL: .seconds(10)))
        _ = state.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        _ = state.register(node: node(2), connection: 2, observed: addrB, registration: Registration(), now: .zero)
        let ack = state.keepAlive(node: node(1), connection: 1, now: .seconds(8))
        #expect(ack.first?.sent?.message == .keepAliveAck)
        #expect(state.tick(now: .seconds(9)).isEmpty)
        let expired = state.tick(now: .seconds(10))
        #expect(expired == [.close(node(2), connection: 2, reason: "registration expired")])
        #expect(state.peer(node(1)) != nil)
        #expect(state.peer(node(2)) == nil)
        #expect(state.tick(now: .seconds(18)).count == 1)
        #expect(state.registrationCount == 0)
        // A keep-alive after expiry is refused: the peer must register again.
        #expect(errorCode(state.keepAlive(node: node(1), connection: 1, now: .seconds(19))) == "notRegistered")
    }

    @Test("a registration from a new connection replaces the old one and closes it; disconnects of stale connections are ignored")
    func replace() {
        var state = RendezvousState()
        _ = state.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        let actions = state.register(node: node(1), connection: 2, observed: addrB, registration: Registration(), now: .seconds(1))
        #expect(actions.first == .close(node(1), connection: 1, reason: "replaced by a newer connection"))
        _ = state.disconnected(node: node(1), connection: 1)
        #expect(state.peer(node(1))?.observed == addrB)
        _ = state.disconnected(node: node(1), connection: 2)
        #expect(state.peer(node(1)) == nil)
    }

    @Test("unknown target, self target and unregistered requester get typed errors, to the requester only")
    func refusals() {
        var state = twoPeers()
        let unknown = state.requestPunch(from: node(1), requestID: 5, target: node(9), secret: secret(), now: .seconds(1))
        #expect(unknown.count == 1)
        #expect(unknown.first?.sent?.to == node(1))
        guard case .error(let reply) = unknown.first?.sent?.message else { Issue.record("expected error"); return }
        #expect(reply.code == "unknownTarget")
        #expect(reply.requestID == 5)
        #expect(reply.message.contains(node(9).description))
        #expect(errorCode(state.requestPunch(from: node(1), requestID: 6, target: node(1), secret: secret(), now: .seconds(1))) == "selfTarget")
        #expect(errorCode(state.requestPunch(from: node(3), requestID: 7, target: node(1), secret: secret(), now: .seconds(1))) == "notRegistered")
        #expect(state.sessionCount == 0)
    }

    @Test("coordinate messages: session, key, candidates, NAT profiles, roles, same start delay for both")
    func coordinate() {
        var state = twoPeers()
        let actions = state.requestPunch(from: node(1), requestID: 42, target: node(2), secret: secret("abc"), now: .seconds(1))
        let sent = coordinates(actions)
        #expect(sent.count == 2)
        let toA = try! #require(sent.first { $0.1 == node(1) }).0
        let toB = try! #require(sent.first { $0.1 == node(2) }).0
        #expect(toA.role == .initiator)
        #expect(toB.role == .target)
        #expect(toA.requestID == 42)
        #expect(toB.requestID == nil)
        #expect(toA.sessionID == "abc" && toB.sessionID == "abc")
        #expect(toA.sessionKey == toB.sessionKey && toA.sessionKey.count == 32)
        #expect(toA.peer == node(2) && toB.peer == node(1))
        #expect(toA.candidates == [Candidate(kind: .serverReflexive, address: addrB)])
        #expect(toB.candidates == [Candidate(kind: .serverReflexive, address: addrA),
                                   Candidate(kind: .host, address: try! SocketAddress(parsing: "127.0.0.9:1"))])
        #expect(toA.peerNAT == .unknown)
        #expect(toB.peerNAT == .fullCone)
        #expect(toA.startDelayMicroseconds == 150_000 && toB.startDelayMicroseconds == 150_000)
        #expect(state.sessionCount == 1)
    }

    @Test("clock-free start: the farther peer is sent to at once, the nearer one (RTT_far − RTT_near)/2 later")
    func ordering() {
        var state = twoPeers()
        state.rttSample(node: node(1), rtt: .milliseconds(20))
        state.rttSample(node: node(2), rtt: .milliseconds(100))
        state.rttSample(node: node(2), rtt: .milliseconds(120))  // the minimum of the window counts
        let actions = state.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret(), now: .seconds(1))
        let sends = coordinates(actions)
        #expect(sends.map(\.1) == [node(2), node(1)])  // far first
        #expect(sends[0].2 == .zero)
        #expect(sends[1].2 == .milliseconds(40))
        #expect(actions.first == .sessionStarted(sessionID: "s1", initiator: node(1), target: node(2), nearDelay: .milliseconds(40)))
        #expect(sends[0].0.peerRTTMicroseconds == 60_000)

        // Mirror image: the initiator is the far one.
        var mirrored = twoPeers()
        mirrored.rttSample(node: node(1), rtt: .milliseconds(90))
        mirrored.rttSample(node: node(2), rtt: .milliseconds(10))
        let other = coordinates(mirrored.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret(), now: .seconds(1)))
        #expect(other.map(\.1) == [node(1), node(2)])
        #expect(other[1].2 == .milliseconds(40))

        // Compensation is capped.
        var capped = twoPeers(.init(maxCompensation: .milliseconds(100)))
        capped.rttSample(node: node(1), rtt: .seconds(2))
        capped.rttSample(node: node(2), rtt: .milliseconds(10))
        #expect(coordinates(capped.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret(), now: .seconds(1)))[1].2
                == .milliseconds(100))
    }

    @Test("start delay: the floor plus both RTT spreads for measured peers; the ceiling without an estimate or behind a random NAT")
    func startDelay() {
        func delays(_ state: inout RendezvousState, _ id: String) -> [Int64] {
            coordinates(state.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret(id), now: .seconds(1)))
                .map(\.0.startDelayMicroseconds)
        }
        var state = twoPeers()
        state.rttSample(node: node(1), rtt: .milliseconds(40))
        // Only the target measured: no evidence for the initiator's side, the ceiling.
        #expect(delays(&state, "a") == [150_000, 150_000])
        state.rttSample(node: node(2), rtt: .milliseconds(40))
        #expect(delays(&state, "b") == [20_000, 20_000])
        state.rttSample(node: node(1), rtt: .milliseconds(43))
        state.rttSample(node: node(2), rtt: .milliseconds(45))
        #expect(delays(&state, "c") == [28_000, 28_000])
        // A spread beyond the ceiling is capped by it.
        state.rttSample(node: node(2), rtt: .milliseconds(400))
        #expect(delays(&state, "d") == [150_000, 150_000])

        var random = twoPeers()
        _ = random.register(node: node(2), connection: 2, observed: addrB, registration: Registration(nat: .symmetricRandom),
                            now: .zero)
        random.rttSample(node: node(1), rtt: .milliseconds(40))
        random.rttSample(node: node(2), rtt: .milliseconds(40))
        #expect(delays(&random, "e") == [150_000, 150_000])
    }

    @Test("a punch request right behind the register is scheduled with the handshake RTT until a ping sample replaces it")
    func provisionalRTT() {
        var state = twoPeers()
        state.rttSample(node: node(2), rtt: .milliseconds(20))
        state.provisionalRTT(node: node(1), rtt: .milliseconds(100))
        #expect(state.peer(node(1))?.rtt == .milliseconds(100))
        let sends = coordinates(state.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret("p"), now: .seconds(1)))
        // The initiator is the far one: sent at once, the target's copy (100 − 20)/2 = 40 ms later.
        #expect(sends.map(\.1) == [node(1), node(2)])
        #expect(sends.map(\.2) == [.zero, .milliseconds(40)])
        #expect(sends.map(\.0.startDelayMicroseconds) == [20_000, 20_000])
        state.rttSample(node: node(1), rtt: .milliseconds(30))
        #expect(state.peer(node(1))?.rtt == .milliseconds(30))
        // A new connection's registration forgets the old connection's handshake RTT.
        _ = state.register(node: node(1), connection: 9, observed: addrA, registration: Registration(), now: .seconds(2))
        #expect(state.peer(node(1))?.rtt == nil)
    }

    @Test("measured skew: arrival = midpoint of send and ack, per peer")
    func skew() {
        var state = twoPeers()
        _ = state.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret(), now: .seconds(1))
        state.coordinateSent(node: node(2), sessionID: "s1", now: .milliseconds(1000))
        state.coordinateSent(node: node(1), sessionID: "s1", now: .milliseconds(1040))
        #expect(state.coordinateAcked(node: node(2), sessionID: "s1", now: .milliseconds(1100)).isEmpty)  // arrives 1050
        let done = state.coordinateAcked(node: node(1), sessionID: "s1", now: .milliseconds(1062))  // arrives 1051
        #expect(done == [.skewMeasured(sessionID: "s1", skew: .milliseconds(1), planned: .zero)])
        // Duplicates and strangers are ignored.
        #expect(state.coordinateAcked(node: node(1), sessionID: "s1", now: .milliseconds(1070)).isEmpty)
        #expect(state.coordinateAcked(node: node(3), sessionID: "s1", now: .milliseconds(1070)).isEmpty)
    }

    @Test("per-peer rate limit: a burst, then refusals, then refill over time")
    func rateLimit() {
        var state = twoPeers(.init(rateBurst: 3, ratePerSecond: 1))
        // Registration took one token from each peer.
        var codes: [String?] = []
        for i in 0..<4 {
            let actions = state.requestPunch(from: node(1), requestID: UInt64(i), target: node(2), secret: secret("s\(i)"), now: .zero)
            codes.append(errorCode(actions))
        }
        #expect(codes == [nil, nil, "rateLimited", "rateLimited"])
        // The other peer has its own bucket.
        #expect(errorCode(state.requestPunch(from: node(2), requestID: 9, target: node(1), secret: secret("x"), now: .zero)) == nil)
        #expect(errorCode(state.requestPunch(from: node(1), requestID: 10, target: node(2), secret: secret("y"), now: .seconds(1))) == nil)
        #expect(errorCode(state.requestPunch(from: node(1), requestID: 11, target: node(2), secret: secret("z"), now: .seconds(1))) == "rateLimited")
    }

    @Test("keep-alives share the per-peer bucket: a flood is refused with rateLimited and refreshes nothing")
    func keepAliveRateLimit() {
        var state = RendezvousState(configuration: .init(registrationTTL: .seconds(10), rateBurst: 3, ratePerSecond: 1))
        _ = state.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        // Registration took one token and a second has refilled a second later: three keep-alives are acknowledged.
        var replies: [ServerMessage?] = []
        for _ in 0..<3 { replies.append(state.keepAlive(node: node(1), connection: 1, now: .seconds(1)).first?.sent?.message) }
        #expect(replies == [.keepAliveAck, .keepAliveAck, .keepAliveAck])
        #expect(errorCode(state.keepAlive(node: node(1), connection: 1, now: .seconds(1))) == "rateLimited")
        // A refused keep-alive does not extend the registration: it expires 10 s after the last accepted one.
        #expect(errorCode(state.keepAlive(node: node(1), connection: 1, now: .seconds(1))) == "rateLimited")
        #expect(state.peer(node(1))?.expires == .seconds(11))
        // The bucket refills: an honest keep-alive a few seconds later is accepted again.
        #expect(state.keepAlive(node: node(1), connection: 1, now: .seconds(4)).first?.sent?.message == .keepAliveAck)
    }

    @Test("sessions expire, or end with a reported result")
    func sessionExpiry() {
        var state = twoPeers(.init(sessionTTL: .seconds(5)))
        _ = state.requestPunch(from: node(1), requestID: 1, target: node(2), secret: secret("a"), now: .seconds(1))
        _ = state.requestPunch(from: node(1), requestID: 2, target: node(2), secret: secret("b"), now: .seconds(2))
        #expect(state.sessionCount == 2)
        #expect(state.punchResult(node: node(3), sessionID: "b", outcome: "connected").isEmpty)
        #expect(state.punchResult(node: node(2), sessionID: "b", outcome: "connected") == [.sessionEnded(sessionID: "b", reason: "connected")])
        #expect(state.tick(now: .seconds(5)).isEmpty)
        #expect(state.tick(now: .seconds(6)) == [.sessionEnded(sessionID: "a", reason: "expired")])
        // "b" ended without acks: its record lingers silently until its expiry, for a late skew sample.
        #expect(state.punchResult(node: node(1), sessionID: "b", outcome: "connected").isEmpty)
        #expect(state.tick(now: .seconds(7)).isEmpty)
        #expect(state.sessionCount == 0)
    }

    @Test("capacity: registrations beyond the maximum are refused")
    func capacity() {
        var state = RendezvousState(configuration: .init(maxRegistrations: 1))
        _ = state.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        #expect(errorCode(state.register(node: node(2), connection: 2, observed: addrB, registration: Registration(), now: .zero)) == "capacity")
    }

    @Test("framing: messages round-trip, partial frames wait, oversized frames are rejected")
    func framing() throws {
        let message = ClientMessage.requestPunch(requestID: 3, target: node(4))
        let frame = RendezvousFraming.frame(message)
        var reader = FrameReader()
        reader.append(Array(frame.prefix(5)))
        #expect(try reader.next() == nil)
        reader.append(Array(frame.dropFirst(5)) + frame)
        let first = try #require(try reader.next())
        #expect(try RendezvousFraming.decode(ClientMessage.self, from: first) == message)
        #expect(try reader.next() != nil)
        #expect(try reader.next() == nil)
        var hostile = FrameReader()
        hostile.append([0x00, 0x10, 0x00, 0x00])
        #expect(throws: RendezvousError.self) { try hostile.next() }
        #expect(throws: RendezvousError.self) { try RendezvousFraming.decode(ClientMessage.self, from: Array("{}".utf8)) }
    }

    @Test("NATBehaviour maps to NATProfile field by field")
    func profileMapping() throws {
        // NATEvidence has no public memberwise init: build the verdict from its JSON form.
        let json = """
            {"mapping":"addressAndPortDependent","filtering":"addressDependent","allocation":"sequential","portDelta":2,
             "confidence":0.9,"evidence":{"server":"127.0.0.1:4001","localAddress":"127.0.0.1:4002","tests":[],"notes":[],
             "mappingConfidence":1,"filteringConfidence":1,"allocationConfidence":1}}
            """
        let behaviour = try JSONDecoder().decode(NATBehaviour.self, from: Data(json.utf8))
        let profile = NATProfile(behaviour)
        #expect(profile.mapping == .addressAndPortDependent)
        #expect(profile.filtering == .addressDependent)
        #expect(profile.allocation == .sequential)
        #expect(profile.portDelta == 2)
        #expect(profile.confidence == 0.9)
        #expect(profile.type == .symmetric)
    }
}
