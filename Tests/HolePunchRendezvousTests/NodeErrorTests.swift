import HolePunch
import HolePunchStrategy
import Testing
@testable import HolePunchRendezvous

/// `NodeError` is the node's one error type: every code a lower layer can hand it is a member a caller can
/// name in a `switch error.code`, under the lower layer's name.
@Suite("NodeError codes")
struct NodeErrorTests {
    @Test("every punch failure code surfaces as a NodeError.Code member of the same name", arguments: [
        (PunchFailureCode.timeout, NodeError.Code.timeout),
        (.unreachable, .unreachable),
        (.allPortsFailed, .allPortsFailed),
        (.cancelled, .cancelled),
        (.peerAuthenticationFailed, .peerAuthenticationFailed),
        (.refused, .refused),
        (.tooManyPunches, .tooManyPunches),
        (.invalidOptions, .invalidOptions),
    ])
    func punchCodes(_ punch: PunchFailureCode, _ expected: NodeError.Code) {
        let failure = PunchError(code: punch, message: "m", portsTried: [], rounds: 0, elapsed: .zero)
        let error = NodeError(RendezvousError(punch: failure))
        #expect(error.code == expected)
        #expect(error.punch == failure)
    }

    @Test("every rendezvous code surfaces as a NodeError.Code member of the same name", arguments: [
        (RendezvousError.Code.unknownTarget, NodeError.Code.unknownTarget),
        (.rateLimited, .rateLimited),
        (.notRegistered, .notRegistered),
        (.selfTarget, .selfTarget),
        (.capacity, .capacity),
        (.protocolViolation, .protocolViolation),
        (.connectionFailed, .connectionFailed),
        (.disconnected, .disconnected),
        (.timeout, .timeout),
        (.shuttingDown, .shuttingDown),
        (.cancelled, .cancelled),
    ])
    func rendezvousCodes(_ code: RendezvousError.Code, _ expected: NodeError.Code) {
        let error = NodeError(RendezvousError(code, "m"))
        #expect(error.code == expected)
        #expect(error.description == "\(expected.name): m")
    }
}
