/// What ``STUNMessage/decode(_:options:)`` accepts.
public struct STUNDecodingOptions: Hashable, Sendable {
    /// The largest datagram accepted, in bytes. STUN over UDP should stay under the path MTU; 1500 leaves
    /// room for every legitimate Binding message while refusing to parse jumbo junk.
    public var maximumSize: Int
    /// Whether RFC 3489 messages (no magic cookie) are accepted. Only a responder that wants to serve
    /// old clients, such as Debian's `stun`, turns this on.
    public var allowLegacy: Bool

    /// Creates options; the defaults are strict RFC 8489.
    public init(maximumSize: Int = 1500, allowLegacy: Bool = false) {
        self.maximumSize = maximumSize
        self.allowLegacy = allowLegacy
    }
}

/// Which integrity attributes ``STUNMessage/verifyIntegrity(of:credential:require:)`` insists on.
public enum STUNIntegrityRequirement: Hashable, Sendable {
    /// At least one of MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256; every one present must match.
    case any
    /// MESSAGE-INTEGRITY (HMAC-SHA1) must be present and match.
    case sha1
    /// MESSAGE-INTEGRITY-SHA256 must be present and match.
    case sha256
}

/// Where one attribute sits in a datagram.
struct RawAttributeSpan {
    var type: UInt16
    /// Offset of the attribute header.
    var offset: Int
    /// The value bytes, without padding.
    var value: Range<Int>
}

extension STUNMessage {
    /// A cheap check for demultiplexing: could `bytes` be a STUN message?
    ///
    /// It looks only at the header: the first two bits are zero, the length is a multiple of four and
    /// matches the datagram, and the magic cookie is present (or, with `allowLegacy`, anything is).
    /// It never parses attributes, so it is safe to call on every datagram.
    public static func looksLikeSTUN(_ bytes: [UInt8], allowLegacy: Bool = false) -> Bool {
        guard bytes.count >= 20, bytes[0] & 0xC0 == 0 else { return false }
        let length = Int(read16(bytes, 2))
        guard length % 4 == 0, 20 + length == bytes.count else { return false }
        return allowLegacy || read32(bytes, 4) == magicCookie
    }

    /// Walks the header and attribute framing, checking every length, without interpreting values.
    static func scan(_ bytes: [UInt8], options: STUNDecodingOptions) throws(STUNError) -> (type: UInt16, cookie: UInt32, spans: [RawAttributeSpan]) {
        guard bytes.count >= 20 else {
            throw STUNError(.truncated, "\(bytes.count) bytes is shorter than the 20-byte STUN header")
        }
        guard bytes[0] & 0xC0 == 0 else { throw STUNError(.notSTUN, "the first two bits are not zero") }
        guard bytes.count <= options.maximumSize else {
            throw STUNError(.tooLarge, "\(bytes.count) bytes exceeds the \(options.maximumSize)-byte limit")
        }
        let length = Int(read16(bytes, 2))
        guard length % 4 == 0 else { throw STUNError(.misaligned, "message length \(length) is not a multiple of 4") }
        guard 20 + length <= bytes.count else {
            throw STUNError(.truncated, "header announces \(length) attribute bytes, datagram has \(bytes.count - 20)")
        }
        guard 20 + length == bytes.count else {
            throw STUNError(.lengthMismatch, "\(bytes.count - 20 - length) bytes follow the announced message length")
        }
        let cookie = read32(bytes, 4)
        guard cookie == magicCookie || options.allowLegacy else {
            throw STUNError(.badMagicCookie, "magic cookie is 0x\(String(cookie, radix: 16)), not 0x2112a442")
        }
        var spans: [RawAttributeSpan] = []
        var offset = 20
        let end = bytes.count
        while offset < end {
            guard end - offset >= 4 else { throw STUNError(.attributeOverrun, "attribute header at \(offset) is cut off") }
            let type = read16(bytes, offset)
            let valueLength = Int(read16(bytes, offset + 2))
            let padded = (valueLength + 3) & ~3
            guard offset + 4 + padded <= end else {
                throw STUNError(
                    .attributeOverrun,
                    "attribute 0x\(String(type, radix: 16)) at \(offset) declares \(valueLength) bytes, only \(end - offset - 4) remain"
                )
            }
            spans.append(RawAttributeSpan(type: type, offset: offset, value: (offset + 4)..<(offset + 4 + valueLength)))
            offset += 4 + padded
        }
        return (read16(bytes, 0), cookie, spans)
    }

    /// Decodes and validates a datagram.
    ///
    /// Checks framing (header, lengths, padding, magic cookie, attribute overrun, size limit), decodes every
    /// known attribute strictly, and verifies FINGERPRINT when present (it must be last). Attributes after
    /// MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored, as RFC 8489 §14.5
    /// says; so are attributes other than FINGERPRINT after MESSAGE-INTEGRITY-SHA256. Integrity is not
    /// checked here because the key may depend on USERNAME: call ``verifyIntegrity(of:credential:require:)``.
    ///
    /// - Throws: ``STUNError`` describing the first problem found.
    public static func decode(_ bytes: [UInt8], options: STUNDecodingOptions = STUNDecodingOptions()) throws(STUNError) -> STUNMessage {
        let (type, cookie, spans) = try scan(bytes, options: options)
        let (messageClass, method) = split(type: type)
        let tid = Array(bytes[8..<20])
        let xorPad = be32(magicCookie) + tid
        var attributes: [STUNAttribute] = []
        var seenIntegrity = false
        var seenIntegritySHA256 = false
        var seenFingerprint = false
        for span in spans {
            if seenFingerprint {
                throw STUNError(.badFingerprint, "attribute 0x\(String(span.type, radix: 16)) follows FINGERPRINT, which must be last")
            }
            switch span.type {
            case STUNAttributeType.fingerprint:
                seenFingerprint = true
                let expected = STUNCrypto.crc32(bytes, 0..<span.offset) ^ 0x5354_554E
                guard span.value.count == 4 else { throw STUNError(.badAttribute, "FINGERPRINT must be 4 bytes") }
                let actual = read32(bytes, span.value.lowerBound)
                guard actual == expected else {
                    throw STUNError(.badFingerprint, "FINGERPRINT 0x\(String(actual, radix: 16)) should be 0x\(String(expected, radix: 16))")
                }
            case STUNAttributeType.messageIntegritySHA256 where !seenIntegritySHA256:
                seenIntegritySHA256 = true
            case STUNAttributeType.messageIntegrity where !seenIntegrity && !seenIntegritySHA256:
                seenIntegrity = true
            default:
                // Anything after an integrity attribute is outside its protection: ignore it, as the RFC says.
                if seenIntegrity || seenIntegritySHA256 { continue }
            }
            attributes.append(try STUNAttribute.decode(type: span.type, value: Array(bytes[span.value]), xorPad: xorPad))
        }
        var message = STUNMessage(messageClass, method: method, transactionID: STUNTransactionID(tid)!, attributes: attributes)
        message.cookie = cookie
        return message
    }

    /// Checks MESSAGE-INTEGRITY and/or MESSAGE-INTEGRITY-SHA256 of a received datagram with `credential`.
    ///
    /// - Throws: ``STUNError`` `.missingIntegrity` when the required attribute is absent, `.badIntegrity` when
    ///   a value does not match, or a framing error.
    public static func verifyIntegrity(
        of bytes: [UInt8],
        credential: STUNCredential,
        require: STUNIntegrityRequirement = .any
    ) throws(STUNError) {
        let (_, _, spans) = try scan(bytes, options: STUNDecodingOptions(maximumSize: 65_535 + 20, allowLegacy: true))
        var sha1: RawAttributeSpan?
        var sha256: RawAttributeSpan?
        for span in spans {
            if span.type == STUNAttributeType.messageIntegrity && sha1 == nil && sha256 == nil { sha1 = span }
            if span.type == STUNAttributeType.messageIntegritySHA256 && sha256 == nil { sha256 = span }
        }
        switch require {
        case .any where sha1 == nil && sha256 == nil:
            throw STUNError(.missingIntegrity, "no MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256")
        case .sha1 where sha1 == nil:
            throw STUNError(.missingIntegrity, "no MESSAGE-INTEGRITY")
        case .sha256 where sha256 == nil:
            throw STUNError(.missingIntegrity, "no MESSAGE-INTEGRITY-SHA256")
        default:
            break
        }
        if let span = sha1 {
            guard span.value.count == 20 else { throw STUNError(.badAttribute, "MESSAGE-INTEGRITY must be 20 bytes") }
            let mac = try STUNCrypto.hmacSHA1(credential, prefix(bytes, upTo: span.offset, coveringValue: 20))
            guard STUNCrypto.constantTimeEqual(mac, Array(bytes[span.value])) else {
                throw STUNError(.badIntegrity, "MESSAGE-INTEGRITY does not match")
            }
        }
        if let span = sha256 {
            let n = span.value.count
            guard n >= 16, n <= 32, n % 4 == 0 else { throw STUNError(.badAttribute, "MESSAGE-INTEGRITY-SHA256 has a bad length") }
            let mac = try STUNCrypto.hmacSHA256(credential, prefix(bytes, upTo: span.offset, coveringValue: n))
            guard STUNCrypto.constantTimeEqual(Array(mac.prefix(n)), Array(bytes[span.value])) else {
                throw STUNError(.badIntegrity, "MESSAGE-INTEGRITY-SHA256 does not match")
            }
        }
    }

    /// The bytes an integrity attribute at `offset` covers, with the header length rewritten to end just
    /// after that attribute (RFC 8489 §14.5).
    static func prefix(_ bytes: [UInt8], upTo offset: Int, coveringValue valueLength: Int) -> [UInt8] {
        var covered = Array(bytes[0..<offset])
        let length = be16(UInt16(offset - 20 + 4 + valueLength))
        covered[2] = length[0]
        covered[3] = length[1]
        return covered
    }

    /// Encodes the message, appending freshly computed security attributes.
    ///
    /// Existing MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT entries in `attributes` are
    /// dropped first, so a decoded message can be re-encoded with the same keys and give the same bytes.
    ///
    /// - Parameters:
    ///   - integrity: adds MESSAGE-INTEGRITY (HMAC-SHA1) keyed by this credential.
    ///   - integritySHA256: adds MESSAGE-INTEGRITY-SHA256 (full 32 bytes) keyed by this credential.
    ///   - fingerprint: adds FINGERPRINT last.
    ///   - padding: the byte used to pad values to four bytes. RFC 8489 says zero; RFC 5769's vectors use 0x20.
    /// - Throws: ``STUNError`` `.badAttribute` when a value exceeds 65,535 bytes, or `.crypto`.
    public func encoded(
        integrity: STUNCredential? = nil,
        integritySHA256: STUNCredential? = nil,
        fingerprint: Bool = false,
        padding: UInt8 = 0
    ) throws(STUNError) -> [UInt8] {
        // Three types: an array scan, not a Set built (and hashed into) for every message a punch signs.
        let security: [UInt16] = [
            STUNAttributeType.messageIntegrity, STUNAttributeType.messageIntegritySHA256, STUNAttributeType.fingerprint,
        ]
        var bytes = try encodedVerbatim(attributes: attributes.filter { !security.contains($0.type) }, padding: padding)
        func setLength(_ length: Int) {
            bytes[2] = UInt8(length >> 8)
            bytes[3] = UInt8(length & 0xFF)
        }
        if let integrity {
            setLength(bytes.count - 20 + 24)
            let mac = try STUNCrypto.hmacSHA1(integrity, bytes)
            bytes += be16(STUNAttributeType.messageIntegrity) + be16(20) + mac
        }
        if let integritySHA256 {
            setLength(bytes.count - 20 + 36)
            let mac = try STUNCrypto.hmacSHA256(integritySHA256, bytes)
            bytes += be16(STUNAttributeType.messageIntegritySHA256) + be16(32) + mac
        }
        if fingerprint {
            setLength(bytes.count - 20 + 8)
            let crc = STUNCrypto.crc32(bytes, 0..<bytes.count) ^ 0x5354_554E
            bytes += be16(STUNAttributeType.fingerprint) + be16(4) + be32(crc)
        }
        setLength(bytes.count - 20)
        return bytes
    }

    /// Encodes `attributes` exactly as given, security attributes included, computing nothing.
    ///
    /// Useful for tests that need deliberately wrong integrity or fingerprint values.
    public func encodedVerbatim(padding: UInt8 = 0) throws(STUNError) -> [UInt8] {
        try encodedVerbatim(attributes: attributes, padding: padding)
    }

    private func encodedVerbatim(attributes: [STUNAttribute], padding: UInt8) throws(STUNError) -> [UInt8] {
        let xorPad = be32(STUNMessage.magicCookie) + transactionID.bytes
        var bytes = be16(messageType) + [0, 0] + be32(cookie) + transactionID.bytes
        for attribute in attributes {
            let value = attribute.encodeValue(xorPad: xorPad)
            guard value.count <= 0xFFFF else {
                throw STUNError(.badAttribute, "attribute 0x\(String(attribute.type, radix: 16)) value exceeds 65535 bytes")
            }
            bytes += be16(attribute.type) + be16(UInt16(value.count)) + value
            bytes += [UInt8](repeating: padding, count: (4 - value.count % 4) % 4)
        }
        guard bytes.count - 20 <= 0xFFFF else { throw STUNError(.tooLarge, "message exceeds 65535 attribute bytes") }
        bytes[2] = UInt8((bytes.count - 20) >> 8)
        bytes[3] = UInt8((bytes.count - 20) & 0xFF)
        return bytes
    }
}
