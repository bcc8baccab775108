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
        admission.expect(node, session: "s1", from: Self.peer, hints: HandshakeHints(packetCopies: 3))
        // A spoofed Initial from the peer's IP (any port) must not be answered with copies.
        #expect(admission.hints(for: Self.peer) == nil)
        var otherPort = Self.peer
        otherPort.port = 40001
        #expect(admission.hints(for: otherPort) == nil)
    }
}
