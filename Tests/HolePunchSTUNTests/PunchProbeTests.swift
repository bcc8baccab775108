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

extension PunchProbeTests {
    @Test("one credential signs and checks many probes: each MAC equals one keyed afresh, forgeries still fail")
    func credentialReusedAcrossProbes() throws {
        let credential = STUNCredential(key: key)
        for index in 0..<5 {
            let transaction = STUNTransactionID.random()
            let reused = try PunchProbe.request(sessionID: "s\(index)", senderRole: "initiator", credential: credential,
                                                transactionID: transaction)
            let fresh = try PunchProbe.request(sessionID: "s\(index)", senderRole: "initiator", key: key,
                                               transactionID: transaction)
            #expect(reused == fresh)
            let message = try STUNMessage.decode(reused)
            #expect(try PunchProbe.verify(message, bytes: reused, sessionID: "s\(index)", credential: credential).transactionID
                    == transaction)
            // A failed check (a flipped MAC byte) leaves the keyed state fit for the next probe.
            var forged = reused
            forged[forged.count - 12] ^= 1
            #expect(stunError { _ = try PunchProbe.verify(message, bytes: forged, sessionID: "s\(index)",
                                                          credential: credential) }?.code == .badIntegrity)
        }
        // SHA-1 and SHA-256 states of one credential do not disturb each other.
        let both = try STUNMessage(.request, attributes: [.username("u")])
            .encoded(integrity: credential, integritySHA256: credential, fingerprint: true)
        let bothFresh = try STUNMessage(.request, transactionID: try STUNMessage.decode(both).transactionID, attributes: [.username("u")])
            .encoded(integrity: STUNCredential(key: key), integritySHA256: STUNCredential(key: key), fingerprint: true)
        #expect(both == bothFresh)
        #expect(STUNCredential(key: key) == credential)
    }
}
