import Testing
import HolePunchNet
import HolePunchQUIC
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
