public import HolePunchNet

/// One STUN attribute, typed where this module understands it and raw otherwise.
public enum STUNAttribute: Hashable, Sendable {
    /// MAPPED-ADDRESS: the reflexive address, not obfuscated (kept for RFC 3489 clients).
    case mappedAddress(SocketAddress)
    /// XOR-MAPPED-ADDRESS: the reflexive address, XOR-ed with the cookie and transaction ID.
    case xorMappedAddress(SocketAddress)
    /// USERNAME (UTF-8, under 513 bytes).
    case username(String)
    /// MESSAGE-INTEGRITY: HMAC-SHA1, 20 bytes.
    case messageIntegrity([UInt8])
    /// MESSAGE-INTEGRITY-SHA256: HMAC-SHA256, truncated to 16…32 bytes (a multiple of 4).
    case messageIntegritySHA256([UInt8])
    /// FINGERPRINT: CRC-32 of the message XOR 0x5354554E.
    case fingerprint(UInt32)
    /// ERROR-CODE: a code from 300 to 699 and a UTF-8 reason phrase.
    case errorCode(code: Int, reason: String)
    /// SOFTWARE (UTF-8, under 763 bytes).
    case software(String)
    /// CHANGE-REQUEST (RFC 5780): ask the server to answer from another IP and/or port.
    case changeRequest(changeIP: Bool, changePort: Bool)
    /// RESPONSE-ORIGIN (RFC 5780): the address the response was sent from.
    case responseOrigin(SocketAddress)
    /// OTHER-ADDRESS (RFC 5780): the server's alternate address and port.
    case otherAddress(SocketAddress)
    /// RESPONSE-PORT (RFC 5780): send the response to this port of the source IP.
    case responsePort(UInt16)
    /// UNKNOWN-ATTRIBUTES: the comprehension-required types a 420 response did not understand.
    case unknownAttributes([UInt16])
    /// Any other attribute (PRIORITY, REALM, NONCE, ICE-CONTROLLED…), kept byte for byte.
    case raw(type: UInt16, value: [UInt8])

    /// The attribute's type number.
    public var type: UInt16 {
        switch self {
        case .mappedAddress: STUNAttributeType.mappedAddress
        case .xorMappedAddress: STUNAttributeType.xorMappedAddress
        case .username: STUNAttributeType.username
        case .messageIntegrity: STUNAttributeType.messageIntegrity
        case .messageIntegritySHA256: STUNAttributeType.messageIntegritySHA256
        case .fingerprint: STUNAttributeType.fingerprint
        case .errorCode: STUNAttributeType.errorCode
        case .software: STUNAttributeType.software
        case .changeRequest: STUNAttributeType.changeRequest
        case .responseOrigin: STUNAttributeType.responseOrigin
        case .otherAddress: STUNAttributeType.otherAddress
        case .responsePort: STUNAttributeType.responsePort
        case .unknownAttributes: STUNAttributeType.unknownAttributes
        case let .raw(type, _): type
        }
    }

    /// An RFC 3489 SOURCE-ADDRESS, which legacy clients such as Debian's `stun` need.
    public static func legacySourceAddress(_ address: SocketAddress) -> STUNAttribute {
        .raw(type: STUNAttributeType.sourceAddress, value: encodeAddress(address, xor: nil))
    }

    /// An RFC 3489 CHANGED-ADDRESS, which legacy clients such as Debian's `stun` need.
    public static func legacyChangedAddress(_ address: SocketAddress) -> STUNAttribute {
        .raw(type: STUNAttributeType.changedAddress, value: encodeAddress(address, xor: nil))
    }

    // MARK: Value encoding

    /// The attribute's value bytes (without header or padding). `xorPad` is cookie ‖ transaction ID.
    func encodeValue(xorPad: [UInt8]) -> [UInt8] {
        switch self {
        case let .mappedAddress(a), let .responseOrigin(a), let .otherAddress(a):
            return STUNAttribute.encodeAddress(a, xor: nil)
        case let .xorMappedAddress(a):
            return STUNAttribute.encodeAddress(a, xor: xorPad)
        case let .username(s), let .software(s):
            return Array(s.utf8)
        case let .messageIntegrity(v), let .messageIntegritySHA256(v):
            return v
        case let .fingerprint(v):
            return be32(v)
        case let .errorCode(code, reason):
            let clamped = min(max(code, 300), 699)
            return [0, 0, UInt8(clamped / 100), UInt8(clamped % 100)] + Array(reason.utf8)
        case let .changeRequest(ip, port):
            return [0, 0, 0, (ip ? 0x04 : 0) | (port ? 0x02 : 0)]
        case let .responsePort(p):
            return be16(p) + [0, 0]
        case let .unknownAttributes(types):
            return types.flatMap { be16($0) }
        case let .raw(_, value):
            return value
        }
    }

    static func encodeAddress(_ address: SocketAddress, xor pad: [UInt8]?) -> [UInt8] {
        var port = address.port
        var ip = address.ipBytes
        if let pad {
            port ^= 0x2112
            for i in ip.indices { ip[i] ^= pad[i] }
        }
        return [0, address.isIPv6 ? 0x02 : 0x01] + be16(port) + ip
    }

    // MARK: Value decoding

    /// Decodes one attribute value. Types this module does not model come back as `.raw`.
    static func decode(type: UInt16, value: [UInt8], xorPad: [UInt8]) throws(STUNError) -> STUNAttribute {
        switch type {
        case STUNAttributeType.mappedAddress:
            return .mappedAddress(try decodeAddress(value, xor: nil))
        case STUNAttributeType.xorMappedAddress:
            return .xorMappedAddress(try decodeAddress(value, xor: xorPad))
        case STUNAttributeType.responseOrigin:
            return .responseOrigin(try decodeAddress(value, xor: nil))
        case STUNAttributeType.otherAddress:
            return .otherAddress(try decodeAddress(value, xor: nil))
        case STUNAttributeType.username:
            guard value.count <= 512 else { throw STUNError(.badAttribute, "USERNAME longer than 512 bytes") }
            return .username(try utf8(value, "USERNAME"))
        case STUNAttributeType.software:
            guard value.count <= 763 else { throw STUNError(.badAttribute, "SOFTWARE longer than 763 bytes") }
            return .software(try utf8(value, "SOFTWARE"))
        case STUNAttributeType.messageIntegrity:
            guard value.count == 20 else { throw STUNError(.badAttribute, "MESSAGE-INTEGRITY must be 20 bytes") }
            return .messageIntegrity(value)
        case STUNAttributeType.messageIntegritySHA256:
            guard value.count >= 16, value.count <= 32, value.count % 4 == 0 else {
                throw STUNError(.badAttribute, "MESSAGE-INTEGRITY-SHA256 must be 16 to 32 bytes, a multiple of 4")
            }
            return .messageIntegritySHA256(value)
        case STUNAttributeType.fingerprint:
            guard value.count == 4 else { throw STUNError(.badAttribute, "FINGERPRINT must be 4 bytes") }
            return .fingerprint(read32(value, 0))
        case STUNAttributeType.errorCode:
            guard value.count >= 4 else { throw STUNError(.badAttribute, "ERROR-CODE shorter than 4 bytes") }
            let errorClass = Int(value[2] & 0x07)
            let number = Int(value[3])
            guard (3...6).contains(errorClass), number < 100 else {
                throw STUNError(.badAttribute, "ERROR-CODE class \(errorClass) number \(number) out of range")
            }
            guard value.count <= 4 + 763 else { throw STUNError(.badAttribute, "ERROR-CODE reason too long") }
            return .errorCode(code: errorClass * 100 + number, reason: try utf8(Array(value[4...]), "ERROR-CODE reason"))
        case STUNAttributeType.changeRequest:
            guard value.count == 4 else { throw STUNError(.badAttribute, "CHANGE-REQUEST must be 4 bytes") }
            return .changeRequest(changeIP: value[3] & 0x04 != 0, changePort: value[3] & 0x02 != 0)
        case STUNAttributeType.responsePort:
            guard value.count == 4 else { throw STUNError(.badAttribute, "RESPONSE-PORT must be 4 bytes") }
            return .responsePort(read16(value, 0))
        case STUNAttributeType.unknownAttributes:
            guard value.count % 2 == 0 else { throw STUNError(.badAttribute, "UNKNOWN-ATTRIBUTES has an odd length") }
            return .unknownAttributes(stride(from: 0, to: value.count, by: 2).map { read16(value, $0) })
        default:
            return .raw(type: type, value: value)
        }
    }

    static func decodeAddress(_ value: [UInt8], xor pad: [UInt8]?) throws(STUNError) -> SocketAddress {
        guard value.count >= 4 else { throw STUNError(.badAttribute, "address attribute shorter than 4 bytes") }
        let family = value[1]
        let expected: Int
        switch family {
        case 0x01: expected = 8
        case 0x02: expected = 20
        default: throw STUNError(.badAttribute, "address family 0x\(hex2(family)) is neither IPv4 nor IPv6")
        }
        guard value.count == expected else {
            throw STUNError(.badAttribute, "address attribute of family \(family) must be \(expected) bytes, not \(value.count)")
        }
        var port = read16(value, 2)
        var ip = Array(value[4...])
        if let pad {
            port ^= 0x2112
            for i in ip.indices { ip[i] ^= pad[i] }
        }
        return SocketAddress(ipBytes: ip, port: port)!
    }

    static func utf8(_ bytes: [UInt8], _ what: String) throws(STUNError) -> String {
        guard let s = String(validating: bytes, as: UTF8.self) else {
            throw STUNError(.badAttribute, "\(what) is not valid UTF-8")
        }
        return s
    }
}

@inline(__always) func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
@inline(__always) func be32(_ v: UInt32) -> [UInt8] {
    [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)]
}
@inline(__always) func read16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) << 8 | UInt16(b[i + 1]) }
@inline(__always) func read32(_ b: [UInt8], _ i: Int) -> UInt32 {
    UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
}
