import ProcessTestSupport
import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// RFC 5769 test vectors, transcribed from the RFC's section 2.
enum RFC5769 {
    static let password = "VOkJxbRl1RmTxUk/WvJxBt"
    static let transactionID = hex("b7e7a701 bc34d686 fa87dfae")

    static let sampleRequest = hex("""
        00010058 2112a442 b7e7a701 bc34d686 fa87dfae
        80220010 5354554e 20746573 7420636c 69656e74
        00240004 6e0001ff
        80290008 932ff9b1 51263b36
        00060009 6576746a 3a683676 59202020
        00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
        80280004 e57a3bcf
        """)

    static let ipv4Response = hex("""
        0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
        8022000b 74657374 20766563 746f7220
        00200008 0001a147 e112a643
        00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
        80280004 c07d4c96
        """)

    static let ipv6Response = hex("""
        01010048 2112a442 b7e7a701 bc34d686 fa87dfae
        8022000b 74657374 20766563 746f7220
        00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
        00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
        80280004 c8fb0b4c
        """)

    static let longTermRequest = hex("""
        00010060 2112a442 78ad3433 c6ad72c0 29da412e
        00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
        0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
        0014000b 6578616d 706c652e 6f726700
        00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666
        """)
    static let longTermUsername = String(decoding: hex("e3839ee3 8388e383 aae38383 e382afe3 82b9"), as: UTF8.self)
}

@Suite struct RFC5769VectorTests {
    @Test func sampleRequestDecodesVerifiesAndReencodes() throws {
        let message = try STUNMessage.decode(RFC5769.sampleRequest)
        #expect(message.messageClass == .request)
        #expect(message.method == .binding)
        #expect(message.transactionID.bytes == RFC5769.transactionID)
        #expect(message.username == "evtj:h6vY")
        #expect(message.attributes.contains(.software("STUN test client")))
        #expect(message.attributes.contains(.raw(type: 0x0024, value: hex("6e0001ff"))))
        #expect(message.attributes.last == .fingerprint(0xe57a_3bcf))
        #expect(message.unknownComprehensionRequired() == [0x0024])
        try STUNMessage.verifyIntegrity(of: RFC5769.sampleRequest, credential: .shortTerm(password: RFC5769.password), require: .sha1)
        let again = try message.encoded(integrity: .shortTerm(password: RFC5769.password), fingerprint: true, padding: 0x20)
        #expect(again == RFC5769.sampleRequest)
    }

    @Test func ipv4ResponseDecodesVerifiesAndReencodes() throws {
        let message = try STUNMessage.decode(RFC5769.ipv4Response)
        #expect(message.messageClass == .successResponse)
        #expect(message.xorMappedAddress == addr("192.0.2.1:32853"))
        #expect(message.attributes.first == .software("test vector"))
        try STUNMessage.verifyIntegrity(of: RFC5769.ipv4Response, credential: .shortTerm(password: RFC5769.password))
        let again = try message.encoded(integrity: .shortTerm(password: RFC5769.password), fingerprint: true, padding: 0x20)
        #expect(again == RFC5769.ipv4Response)
    }

    @Test func ipv6ResponseDecodesVerifiesAndReencodes() throws {
        let message = try STUNMessage.decode(RFC5769.ipv6Response)
        #expect(message.xorMappedAddress == addr("[2001:db8:1234:5678:11:2233:4455:6677]:32853"))
        try STUNMessage.verifyIntegrity(of: RFC5769.ipv6Response, credential: .shortTerm(password: RFC5769.password))
        let again = try message.encoded(integrity: .shortTerm(password: RFC5769.password), fingerprint: true, padding: 0x20)
        #expect(again == RFC5769.ipv6Response)
    }

    @Test func longTermRequestVerifiesWithMD5Key() throws {
        let message = try STUNMessage.decode(RFC5769.longTermRequest)
        #expect(message.username == RFC5769.longTermUsername)
        #expect(message.attributes.contains(.raw(type: STUNAttributeType.realm, value: Array("example.org".utf8))))
        let key = try STUNCredential.longTerm(username: RFC5769.longTermUsername, realm: "example.org", password: "TheMatrIX")
        try STUNMessage.verifyIntegrity(of: RFC5769.longTermRequest, credential: key)
        let again = try message.encoded(integrity: key)
        #expect(again == RFC5769.longTermRequest)
        // The wrong password must not verify.
        let wrong = try STUNCredential.longTerm(username: RFC5769.longTermUsername, realm: "example.org", password: "TheMatrix")
        #expect(stunError { try STUNMessage.verifyIntegrity(of: RFC5769.longTermRequest, credential: wrong) }?.code == .badIntegrity)
    }

    @Test func roundTripOfEveryTypedAttribute() throws {
        let message = STUNMessage(.errorResponse, attributes: [
            .mappedAddress(addr("10.1.2.3:4")),
            .xorMappedAddress(addr("[2001:db8::1]:65535")),
            .username("user:name"),
            .errorCode(code: 420, reason: "Unknown Attribute"),
            .software("HolePunch"),
            .changeRequest(changeIP: true, changePort: false),
            .responseOrigin(addr("127.0.0.1:3478")),
            .otherAddress(addr("127.0.0.2:3479")),
            .responsePort(5555),
            .unknownAttributes([0x0024, 0x7fff]),
            .raw(type: 0x8029, value: [1, 2, 3]),
        ])
        let bytes = try message.encoded(integritySHA256: STUNCredential(key: [9, 9, 9]), fingerprint: true)
        #expect(STUNMessage.looksLikeSTUN(bytes))
        let decoded = try STUNMessage.decode(bytes)
        #expect(Array(decoded.attributes.prefix(11)) == message.attributes)
        try STUNMessage.verifyIntegrity(of: bytes, credential: STUNCredential(key: [9, 9, 9]), require: .sha256)
        #expect(stunError { try STUNMessage.verifyIntegrity(of: bytes, credential: STUNCredential(key: [9, 9, 9]), require: .sha1) }?.code == .missingIntegrity)
        #expect(stunError { try STUNMessage.verifyIntegrity(of: bytes, credential: STUNCredential(key: [9, 9, 8])) }?.code == .badIntegrity)
    }

    @Test func messageTypeInterleavesClassAndMethodBits() throws {
        let cases: [(STUNMessage.Class, UInt16, UInt16)] = [
            (.request, 0x001, 0x0001), (.indication, 0x001, 0x0011), (.successResponse, 0x001, 0x0101),
            (.errorResponse, 0x001, 0x0111), (.request, 0xFFF, 0x3EEF), (.errorResponse, 0x003, 0x0113),
        ]
        for (messageClass, method, type) in cases {
            let message = STUNMessage(messageClass, method: .init(method))
            #expect(message.messageType == type)
            let (c, m) = STUNMessage.split(type: type)
            #expect(c == messageClass && m.rawValue == method)
            #expect(try STUNMessage.decode(message.encoded()).messageClass == messageClass)
        }
    }

    @Test func attributesAfterIntegrityAreIgnored() throws {
        let base = STUNMessage(.request, attributes: [.username("a:b")])
        var bytes = try base.encoded(integrity: STUNCredential(key: [1]))
        // Append SOFTWARE after MESSAGE-INTEGRITY by hand and fix the length.
        bytes += be16(STUNAttributeType.software) + be16(4) + Array("evil".utf8)
        bytes[3] = UInt8(bytes.count - 20)
        let decoded = try STUNMessage.decode(bytes)
        #expect(!decoded.attributes.contains(.software("evil")))
        #expect(decoded.username == "a:b")
    }
}

@Suite struct HostileInputTests {
    func code(_ bytes: [UInt8], _ options: STUNDecodingOptions = STUNDecodingOptions()) -> STUNError.Code? {
        stunError { _ = try STUNMessage.decode(bytes, options: options) }?.code
    }

    var valid: [UInt8] { RFC5769.ipv4Response }

    @Test func emptyAndTruncatedAreRejected() {
        #expect(code([]) == .truncated)
        #expect(code(Array(valid.prefix(19))) == .truncated)
        #expect(code(Array(valid.prefix(40))) == .truncated)
    }

    @Test func misalignedLengthIsRejected() {
        var bytes = valid
        bytes[3] = 0x3d
        #expect(code(bytes + [0]) == .misaligned)
    }

    @Test func trailingBytesAreRejected() {
        var bytes = valid
        bytes[3] = 0x38
        #expect(code(bytes) == .lengthMismatch)
    }

    @Test func oversizedIsRejected() {
        var bytes = [UInt8](repeating: 0, count: 2000)
        bytes.replaceSubrange(0..<20, with: valid.prefix(20))
        bytes[2] = UInt8((2000 - 20) >> 8)
        bytes[3] = UInt8((2000 - 20) & 0xFF)
        #expect(code(bytes) == .tooLarge)
    }

    @Test func badCookieIsRejectedUnlessLegacyAllowed() throws {
        var bytes = RFC5769.sampleRequest
        bytes[4] ^= 0xFF
        #expect(code(bytes) == .badMagicCookie)
        // Legacy decoding still catches it through the fingerprint, which covers the cookie.
        #expect(code(bytes, STUNDecodingOptions(allowLegacy: true)) == .badFingerprint)
        #expect(!STUNMessage.looksLikeSTUN(bytes))
        let legacy = hex("0001000801e1f50ad145a81e13b3f8113f076d5b0003000400000000")
        let message = try STUNMessage.decode(legacy, options: STUNDecodingOptions(allowLegacy: true))
        #expect(message.isLegacy)
        #expect(message.changeRequest! == (false, false))
    }

    @Test func firstTwoBitsMustBeZero() {
        var bytes = valid
        bytes[0] |= 0x40
        #expect(code(bytes) == .notSTUN)
        #expect(!STUNMessage.looksLikeSTUN(bytes))
    }

    @Test func badFingerprintIsRejected() {
        var bytes = valid
        bytes[bytes.count - 1] ^= 1
        #expect(code(bytes) == .badFingerprint)
    }

    @Test func badIntegrityIsRejected() throws {
        var bytes = RFC5769.sampleRequest
        // Flip a bit in the username: the fingerprint must be recomputed to isolate the integrity failure.
        bytes[65] ^= 0x01
        let tampered = Array(bytes.prefix(bytes.count - 8))
        var fixed = tampered
        fixed[3] = UInt8(fixed.count - 20)
        #expect(stunError { try STUNMessage.verifyIntegrity(of: fixed, credential: .shortTerm(password: RFC5769.password)) }?.code == .badIntegrity)
        #expect(stunError { try STUNMessage.verifyIntegrity(of: RFC5769.sampleRequest, credential: .shortTerm(password: "nope")) }?.code == .badIntegrity)
    }

    @Test func attributeOverrunIsRejected() {
        var bytes = valid
        // SOFTWARE claims 0x40 bytes.
        bytes[22] = 0x00
        bytes[23] = 0x40
        #expect(code(bytes) == .attributeOverrun)
        // A dangling 2-byte attribute header.
        let stub = hex("00010004 2112a442 000000000000000000000000 8022")
        #expect(code(stub + [0, 0]) == .attributeOverrun || code(stub) != nil)
    }

    @Test func malformedValuesAreRejected() {
        // XOR-MAPPED-ADDRESS with family 3.
        var bytes = RFC5769.ipv4Response
        bytes[37] = 0x03
        #expect(code(bytes) != nil)
        let badChange = hex("00010008 2112a442 000000000000000000000000 00030002 00000000")
        #expect(code(badChange) == .badAttribute)
        let badError = hex("01110008 2112a442 000000000000000000000000 00090004 00000799")
        #expect(code(badError) == .badAttribute)
    }

    @Test func fingerprintMustBeLast() throws {
        let message = STUNMessage(.request, attributes: [.fingerprint(0), .software("x")])
        var bytes = try message.encodedVerbatim()
        // Fix the fingerprint so that only its position is wrong.
        let crc = STUNCrypto.crc32(bytes, 0..<20) ^ 0x5354_554E
        bytes.replaceSubrange(24..<28, with: be32(crc))
        #expect(code(bytes) == .badFingerprint)
    }

    @Test func fuzzedMutationsNeverCrash() throws {
        var rng = SplitMix64(seed: 0x5354_554E)
        let seeds = [RFC5769.sampleRequest, RFC5769.ipv4Response, RFC5769.ipv6Response, RFC5769.longTermRequest,
                     try STUNMessage(.request, attributes: [.changeRequest(changeIP: true, changePort: true), .responsePort(9)]).encoded(fingerprint: true)]
        var decoded = 0
        for iteration in 0..<20_000 {
            var bytes = seeds[iteration % seeds.count]
            let mutations = Int.random(in: 1...4, using: &rng)
            for _ in 0..<mutations {
                switch Int.random(in: 0..<5, using: &rng) {
                case 0 where !bytes.isEmpty:
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                case 1 where !bytes.isEmpty:
                    bytes.removeLast(Int.random(in: 1...min(8, bytes.count), using: &rng))
                case 2:
                    bytes += (0..<Int.random(in: 1...8, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                case 3 where bytes.count > 4:
                    // Rewrite a length field (header or attribute) to a random value.
                    let at = Int.random(in: 0..<(bytes.count - 1), using: &rng)
                    bytes[at] = 0
                    bytes[at + 1] = UInt8.random(in: 0...255, using: &rng)
                default:
                    if bytes.count > 20 { bytes[2] = 0; bytes[3] = UInt8(bytes.count - 20 & 0xFC) }
                }
            }
            if let message = try? STUNMessage.decode(bytes, options: STUNDecodingOptions(allowLegacy: iteration % 2 == 0)) {
                decoded += 1
                _ = try? message.encoded(fingerprint: true)
                _ = message.unknownComprehensionRequired()
            }
            _ = try? STUNMessage.verifyIntegrity(of: bytes, credential: STUNCredential(key: [1, 2, 3]))
            _ = STUNMessage.looksLikeSTUN(bytes)
        }
        // Some mutations (e.g. in SOFTWARE text before a fingerprint-less message) still decode.
        #expect(decoded < 20_000)
    }
}
