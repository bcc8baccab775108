import HolePunchNet
import Testing
@testable import HolePunchSTUN

@Suite struct PunchProbeTests {
    let key: [UInt8] = Array(0..<32)

    @Test func requestAndResponseVerify() throws {
        let request = try PunchProbe.request(sessionID: "s-42", senderRole: "initiator", key: key)
        #expect(STUNMessage.looksLikeSTUN(request))
        let seen = try PunchProbe.verify(request, sessionID: "s-42", key: key)
        #expect(!seen.isResponse)
        #expect(seen.senderRole == "initiator")

        let response = try PunchProbe.response(
            transactionID: seen.transactionID, sessionID: "s-42", senderRole: "target", key: key,
            observedAddress: addr("203.0.113.7:40001")
        )
        let answer = try PunchProbe.verify(response, sessionID: "s-42", key: key)
        #expect(answer.isResponse)
        #expect(answer.senderRole == "target")
        #expect(answer.transactionID == seen.transactionID)
        #expect(answer.reflexiveAddress == addr("203.0.113.7:40001"))
    }

    @Test func wrongKeySessionOrTamperingIsRejected() throws {
        let request = try PunchProbe.request(sessionID: "s:with:colons", senderRole: "target", key: key)
        #expect(try PunchProbe.verify(request, sessionID: "s:with:colons", key: key).senderRole == "target")
        #expect(stunError { _ = try PunchProbe.verify(request, sessionID: "s:with:colons", key: [1]) }?.code == .badIntegrity)
        #expect(stunError { _ = try PunchProbe.verify(request, sessionID: "other", key: key) }?.code == .unexpectedMessage)
        // A plain Binding request (no credentials) is not a probe.
        let plain = try STUNMessage(.request, attributes: [.username("s:with:colons:target")]).encoded(fingerprint: true)
        #expect(stunError { _ = try PunchProbe.verify(plain, sessionID: "s:with:colons", key: key) }?.code == .missingIntegrity)
        // Re-signing a tampered username with SHA1 integrity only still fails.
        let sha1Only = try STUNMessage(.request, attributes: [.username("s:with:colons:target")])
            .encoded(integrity: STUNCredential(key: key), fingerprint: true)
        #expect(stunError { _ = try PunchProbe.verify(sha1Only, sessionID: "s:with:colons", key: key) }?.code == .missingIntegrity)
        #expect(stunError { _ = try PunchProbe.request(sessionID: "s", senderRole: "a:b", key: key) }?.code == .invalidConfiguration)
    }
}
