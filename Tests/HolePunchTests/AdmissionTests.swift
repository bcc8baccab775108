import Testing
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
@testable import HolePunch

@Suite("Handshake admission")
struct AdmissionTests {
    static let peer = try! SocketAddress(parsing: "192.0.2.7:40000")

    @Test("no handshake copies for the expected peer's IP before a probe proved its exact address")
    func noCopiesBeforeProof() throws {
        let admission = Admission(others: .none)
        let node = try Identity.generate(commonName: "peer").nodeID
        admission.expect(node, session: "s1", hints: HandshakeHints(packetCopies: 3))
        // A spoofed Initial from the peer's IP (any port) must not be answered with copies.
        #expect(admission.hints(for: Self.peer) == nil)
        var otherPort = Self.peer
        otherPort.port = 40001
        #expect(admission.hints(for: otherPort) == nil)
    }
}

extension AdmissionTests {
    @Test("copies only for the exact address a probe proved, only while the punch is live")
    func copiesAfterProof() throws {
        let admission = Admission(others: .none)
        let node = try Identity.generate(commonName: "peer").nodeID
        admission.expect(node, session: "s1", hints: HandshakeHints(packetCopies: 3))
        admission.proved(Self.peer, session: "s1")
        #expect(admission.hints(for: Self.peer)?.packetCopies == 3)
        var otherPort = Self.peer
        otherPort.port = 40001
        #expect(admission.hints(for: otherPort) == nil)
        // A proof for a session that is not a live target punch grants nothing.
        admission.proved(otherPort, session: "unknown")
        #expect(admission.hints(for: otherPort) == nil)
        admission.forget(session: "s1")
        #expect(admission.hints(for: Self.peer) == nil)
    }
}

extension AdmissionTests {
    @Test("the live-session table enforces the caps and one punch per session, and a forgotten session frees its slot")
    func reservationsAreTheOneSessionTable() throws {
        let admission = Admission(others: .none)
        let a = try Identity.generate(commonName: "a").nodeID
        let b = try Identity.generate(commonName: "b").nodeID
        func refusal(_ session: String, _ punch: UInt64, _ node: NodeID) -> PunchFailureCode? {
            do {
                try admission.reserve(session, punch: PunchID(rawValue: punch), node: node, maxPunches: 3, maxPerPeer: 2)
                return nil
            } catch {
                return error.code
            }
        }
        try admission.reserve("s1", punch: PunchID(rawValue: 1), node: a, maxPunches: 3, maxPerPeer: 2)
        #expect(admission.punch(forSession: "s1") == PunchID(rawValue: 1))
        // The same session again, even to another peer: one punch per session.
        #expect(refusal("s1", 2, b) == .invalidOptions)
        try admission.reserve("s2", punch: PunchID(rawValue: 3), node: a, maxPunches: 3, maxPerPeer: 2)
        // A third punch to one peer: past maxPerPeer 2.
        #expect(refusal("s3", 4, a) == .tooManyPunches)
        try admission.reserve("s3", punch: PunchID(rawValue: 5), node: b, maxPunches: 3, maxPerPeer: 2)
        // A fourth punch: past maxPunches 3.
        #expect(refusal("s4", 6, b) == .tooManyPunches)
        admission.forget(session: "s1")
        #expect(admission.punch(forSession: "s1") == nil)
        try admission.reserve("s4", punch: PunchID(rawValue: 7), node: b, maxPunches: 3, maxPerPeer: 2)
    }

    @Test("a session being prepared admits no handshake and proves nothing until its target punch runs")
    func preparingSessionAdmitsNothing() throws {
        let admission = Admission(others: .none)
        let node = try Identity.generate(commonName: "peer").nodeID
        try admission.reserve("s1", punch: PunchID(rawValue: 1), node: node, maxPunches: 8, maxPerPeer: 8)
        admission.proved(Self.peer, session: "s1")
        #expect(admission.hints(for: Self.peer) == nil)
        #expect(admission.cancelPreparing(PunchID(rawValue: 1)))
        #expect(admission.wasCancelledWhilePreparing("s1"))
        #expect(!admission.cancelPreparing(PunchID(rawValue: 2)), "no session belongs to punch 2")
        admission.expect(node, session: "s1", hints: HandshakeHints(packetCopies: 2))
        admission.proved(Self.peer, session: "s1")
        #expect(admission.hints(for: Self.peer)?.packetCopies == 2)
        #expect(admission.punch(forSession: "s1") == PunchID(rawValue: 1), "running keeps the punch it was reserved for")
    }
}

extension AdmissionTests {
    @Test("two live punches proving one address: hints while either is live, none once both are forgotten")
    func oneAddressTwoSessions() throws {
        let admission = Admission(others: .none)
        let node = try Identity.generate(commonName: "peer").nodeID
        admission.expect(node, session: "s1", hints: HandshakeHints(packetCopies: 2))
        admission.expect(node, session: "s2", hints: HandshakeHints(packetCopies: 2))
        admission.proved(Self.peer, session: "s1")
        admission.proved(Self.peer, session: "s2")
        admission.forget(session: "s1")
        #expect(admission.hints(for: Self.peer)?.packetCopies == 2)
        admission.forget(session: "s2")
        #expect(admission.hints(for: Self.peer) == nil)
        // A session entered again starts with no proven address.
        admission.expect(node, session: "s1", hints: HandshakeHints(packetCopies: 2))
        #expect(admission.hints(for: Self.peer) == nil)
    }
}
