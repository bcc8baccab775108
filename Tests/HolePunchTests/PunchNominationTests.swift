import HolePunchNet
import HolePunchStrategy
import Testing
@testable import HolePunch

/// One winner, agreed by both sides (issue 14 item 2): the initiator's session and the target's session driven
/// together, with the QUIC handshakes between them modelled as events, so the interleavings that once left the two
/// sides holding different connections replay exactly.
@Suite("Punch nomination: both sides keep the same connection")
struct PunchNominationTests {
    static let ms = PunchSessionTests.ms
    static func address(_ port: UInt16) -> SocketAddress { PunchSessionTests.address(port) }

    /// Dials the action list starts, as (id, address).
    static func dials(_ actions: [PunchSession.Action]) -> [(id: Int, to: SocketAddress)] {
        actions.compactMap { if case .dial(let id, _, let to) = $0 { (id, to) } else { nil } }
    }

    static func succeeded(_ actions: [PunchSession.Action]) -> Int? {
        actions.compactMap { if case .succeed(let id) = $0 { id } else { nil } }.first
    }

    @Test("a hairpinning router gives the second peer a second public port: both ports proven, one connection on both sides")
    func hairpinTwoPortsOneConnection() {
        // The initiator dials directly (a cone peer) and learns the peer's second public port from a probe.
        var initiator = PunchSessionTests.session(ports: [4000, 4001], perRound: 2, dialDirect: true)
        var target = PunchSessionTests.session(role: .target, ports: [5000])
        _ = target.handle(.start(now: 1000 * Self.ms))
        let started = initiator.handle(.start(now: 1000 * Self.ms))
        var inFlight = Self.dials(started).map(\.id)
        // The first dial's handshake reaches the target and completes there (the target sent HANDSHAKE_DONE): the
        // target keeps it. The initiator has not heard HANDSHAKE_DONE yet.
        let first = inFlight.first!
        let targetWinner = Self.succeeded(target.handle(.accepted(id: 100 + first)))
        #expect(targetWinner == 100 + first)
        // Now the peer's answers arrive from both of its public ports.
        var later = initiator.handle(.probeResponse(from: Self.address(4001), socket: 0))
        later += initiator.handle(.probeResponse(from: Self.address(4000), socket: 0))
        for action in later {
            if case .abandonDial(let id) = action { inFlight.removeAll { $0 == id } }
            if case .dial(let id, _, _) = action { inFlight.append(id) }
        }
        // Whatever is still in flight completes, in order; the initiator keeps the first that does.
        var initiatorWinner: Int?
        for id in inFlight where initiatorWinner == nil {
            // A handshake the target completes after it already won is closed there as a duplicate; the initiator
            // would hear HANDSHAKE_DONE and then the close, too late: it already chose.
            if id != first { _ = target.handle(.accepted(id: 100 + id)) }
            initiatorWinner = Self.succeeded(initiator.handle(.dialEstablished(id: id)))
        }
        #expect(initiatorWinner.map { $0 + 100 } == targetWinner, "initiator kept dial \(initiatorWinner.map(String.init) ?? "none"), target kept \(targetWinner.map(String.init) ?? "none")")
    }

    @Test("the initiator never has two handshakes in flight, whatever proofs and failures arrive")
    func oneHandshakeAtATime() {
        var session = PunchSessionTests.session(ports: [4000, 4001, 4002], perRound: 3, dialDirect: true)
        var inFlight: Set<Int> = []
        var maxInFlight = 0
        func feed(_ event: PunchSession.Event) {
            for action in session.handle(event) {
                switch action {
                case .dial(let id, _, _): inFlight.insert(id)
                case .abandonDial(let id):
                    // Abandoning a handshake the target may have completed is what splits the sides: never.
                    Issue.record("dial \(id) abandoned before the punch ended")
                    inFlight.remove(id)
                default: break
                }
            }
            maxInFlight = max(maxInFlight, inFlight.count)
        }
        feed(.start(now: 1000 * Self.ms))
        feed(.probeResponse(from: Self.address(4002), socket: 0))
        feed(.probeRequest(from: Self.address(4001), socket: 0))
        feed(.probeRequest(from: Self.address(9999), socket: 0))
        for _ in 0..<12 {
            guard let id = inFlight.min() else { break }
            inFlight.remove(id)
            feed(.dialFailed(id: id, authentication: false))
        }
        #expect(maxInFlight == 1)
    }

    @Test("a peer-reflexive address (a proof from an address nobody published) is dialled when the nominated dial fails")
    func peerReflexiveIsConsidered() {
        var session = PunchSessionTests.session(ports: [4000], dialDirect: true)
        let started = session.handle(.start(now: 1000 * Self.ms))
        #expect(Self.dials(started).map(\.to) == [Self.address(4000)])
        let proof = session.handle(.probeResponse(from: Self.address(4711), socket: 0))
        #expect(proof.contains(.pathProven(Self.address(4711))))
        #expect(Self.dials(proof).isEmpty, "the direct dial is still in flight")
        let next = session.handle(.dialFailed(id: 1, authentication: false))
        #expect(Self.dials(next).map(\.to) == [Self.address(4711)])
        #expect(session.handle(.dialEstablished(id: 2)) == [.succeed(connection: 2)])
        #expect(session.winningAddress == Self.address(4711))
    }

    @Test("the paths proven both ways are known after success (the others become extra connection paths)")
    func otherPathsProvenBothWays() {
        var session = PunchSessionTests.session(ports: [4000, 4001, 4002])
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4001), socket: 0))
        _ = session.handle(.probeResponse(from: Self.address(4002), socket: 0))
        _ = session.handle(.probeRequest(from: Self.address(4000), socket: 0))  // one way only
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 3))  // another local socket
        _ = session.handle(.dialEstablished(id: 1))
        #expect(session.winningAddress == Self.address(4001))
        #expect(session.pathsProvenBothWays(socket: 0) == [Self.address(4001), Self.address(4002)])
    }
}
