public import HolePunchNet

/// The 96-bit STUN transaction ID that pairs a response with its request.
public struct STUNTransactionID: Hashable, Sendable, CustomStringConvertible {
    /// The twelve bytes of the ID.
    public let bytes: [UInt8]

    /// Wraps exactly twelve bytes; `nil` for any other length.
    public init?(_ bytes: [UInt8]) {
        guard bytes.count == 12 else { return nil }
        self.bytes = bytes
    }

    /// A fresh ID from the system's cryptographically secure generator, as RFC 8489 §6 asks, so that
    /// an off-path attacker cannot forge a response.
    public static func random() -> STUNTransactionID {
        var generator = SystemRandomNumberGenerator()
        return STUNTransactionID((0..<12).map { _ in UInt8.random(in: 0...255, using: &generator) })!
    }

    /// The ID in lowercase hex.
    public var description: String { bytes.map { hex2($0) }.joined() }
}

/// One STUN message (RFC 8489): class, method, transaction ID and its attributes in wire order.
///
/// A decoded message keeps MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT in `attributes`
/// as they were received; when encoding, ``encoded(integrity:integritySHA256:fingerprint:padding:)``
/// drops those and computes fresh ones.
public struct STUNMessage: Hashable, Sendable {
    /// The fixed magic cookie of RFC 5389 and later.
    public static let magicCookie: UInt32 = 0x2112_A442

    /// The two class bits of the message type.
    public enum Class: UInt8, Hashable, Sendable {
        /// A request, which expects a response.
        case request = 0
        /// An indication, which expects nothing.
        case indication = 1
        /// A success response.
        case successResponse = 2
        /// An error response.
        case errorResponse = 3
    }

    /// The twelve method bits of the message type.
    public struct Method: Hashable, Sendable, CustomStringConvertible {
        /// The method number (0…0xFFF).
        public let rawValue: UInt16
        /// Creates a method from its number; bits above the twelfth are dropped.
        public init(_ rawValue: UInt16) { self.rawValue = rawValue & 0x0FFF }
        /// Binding, the only method STUN itself defines.
        public static let binding = Method(0x001)
        /// `Binding`, or the method number in hex.
        public var description: String { rawValue == 1 ? "Binding" : "method(0x\(String(rawValue, radix: 16)))" }
    }

    /// The message class.
    public var messageClass: Class
    /// The method.
    public var method: Method
    /// The transaction ID.
    public var transactionID: STUNTransactionID
    /// The four bytes where RFC 5389 puts the magic cookie. Anything else marks a legacy RFC 3489 message,
    /// whose 128-bit transaction ID is this value followed by `transactionID`.
    public var cookie: UInt32
    /// The attributes, in order.
    public var attributes: [STUNAttribute]

    /// Creates a message with the RFC 8489 magic cookie.
    public init(
        _ messageClass: Class,
        method: Method = .binding,
        transactionID: STUNTransactionID = .random(),
        attributes: [STUNAttribute] = []
    ) {
        self.messageClass = messageClass
        self.method = method
        self.transactionID = transactionID
        self.cookie = STUNMessage.magicCookie
        self.attributes = attributes
    }

    /// Whether this is an RFC 3489 message without the magic cookie.
    public var isLegacy: Bool { cookie != STUNMessage.magicCookie }

    /// The 16-bit message type: class bits interleaved with method bits (RFC 8489 §5).
    public var messageType: UInt16 {
        let m = method.rawValue
        let c = UInt16(messageClass.rawValue)
        return (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
    }

    /// Splits a 16-bit message type into class and method.
    static func split(type: UInt16) -> (Class, Method) {
        let c = ((type >> 4) & 1) | ((type >> 7) & 2)
        let m = (type & 0x000F) | ((type >> 1) & 0x0070) | ((type >> 2) & 0x0F80)
        return (Class(rawValue: UInt8(c))!, Method(m))
    }

    // MARK: Attribute accessors

    /// The first XOR-MAPPED-ADDRESS, or failing that the first MAPPED-ADDRESS.
    public var mappedAddress: SocketAddress? {
        for case let .xorMappedAddress(a) in attributes { return a }
        for case let .mappedAddress(a) in attributes { return a }
        return nil
    }

    /// The first XOR-MAPPED-ADDRESS.
    public var xorMappedAddress: SocketAddress? {
        for case let .xorMappedAddress(a) in attributes { return a }
        return nil
    }

    /// The first RESPONSE-ORIGIN (or legacy SOURCE-ADDRESS).
    public var responseOrigin: SocketAddress? {
        for case let .responseOrigin(a) in attributes { return a }
        for case let .raw(type, value) in attributes where type == STUNAttributeType.sourceAddress {
            return try? STUNAttribute.decodeAddress(value, xor: nil)
        }
        return nil
    }

    /// The first OTHER-ADDRESS (or legacy CHANGED-ADDRESS).
    public var otherAddress: SocketAddress? {
        for case let .otherAddress(a) in attributes { return a }
        for case let .raw(type, value) in attributes where type == STUNAttributeType.changedAddress {
            return try? STUNAttribute.decodeAddress(value, xor: nil)
        }
        return nil
    }

    /// The first USERNAME.
    public var username: String? {
        for case let .username(u) in attributes { return u }
        return nil
    }

    /// The first ERROR-CODE as (code, reason).
    public var errorCode: (code: Int, reason: String)? {
        for case let .errorCode(code, reason) in attributes { return (code, reason) }
        return nil
    }

    /// The first CHANGE-REQUEST as (change IP, change port).
    public var changeRequest: (changeIP: Bool, changePort: Bool)? {
        for case let .changeRequest(ip, port) in attributes { return (ip, port) }
        return nil
    }

    /// The first RESPONSE-PORT.
    public var responsePort: UInt16? {
        for case let .responsePort(p) in attributes { return p }
        return nil
    }

    /// Comprehension-required attribute types (below 0x8000) in this message that are not in `understood`.
    ///
    /// A responder answers a request that has any with error 420 and an UNKNOWN-ATTRIBUTES listing them
    /// (RFC 8489 §6.3.1.1).
    public func unknownComprehensionRequired(understood: Set<UInt16> = STUNAttributeType.understood) -> [UInt16] {
        var result: [UInt16] = []
        for attribute in attributes {
            let type = attribute.type
            if type < 0x8000 && !understood.contains(type) && !result.contains(type) {
                result.append(type)
            }
        }
        return result
    }
}

/// Attribute type numbers (IANA STUN registry).
public enum STUNAttributeType {
    /// MAPPED-ADDRESS (RFC 8489).
    public static let mappedAddress: UInt16 = 0x0001
    /// RESPONSE-ADDRESS (RFC 3489, deprecated).
    public static let responseAddress: UInt16 = 0x0002
    /// CHANGE-REQUEST (RFC 5780).
    public static let changeRequest: UInt16 = 0x0003
    /// SOURCE-ADDRESS (RFC 3489), superseded by RESPONSE-ORIGIN.
    public static let sourceAddress: UInt16 = 0x0004
    /// CHANGED-ADDRESS (RFC 3489), superseded by OTHER-ADDRESS.
    public static let changedAddress: UInt16 = 0x0005
    /// USERNAME.
    public static let username: UInt16 = 0x0006
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    public static let messageIntegrity: UInt16 = 0x0008
    /// ERROR-CODE.
    public static let errorCode: UInt16 = 0x0009
    /// UNKNOWN-ATTRIBUTES.
    public static let unknownAttributes: UInt16 = 0x000A
    /// REALM.
    public static let realm: UInt16 = 0x0014
    /// NONCE.
    public static let nonce: UInt16 = 0x0015
    /// MESSAGE-INTEGRITY-SHA256.
    public static let messageIntegritySHA256: UInt16 = 0x001C
    /// XOR-MAPPED-ADDRESS.
    public static let xorMappedAddress: UInt16 = 0x0020
    /// PADDING (RFC 5780).
    public static let padding: UInt16 = 0x0026
    /// RESPONSE-PORT (RFC 5780).
    public static let responsePort: UInt16 = 0x0027
    /// SOFTWARE.
    public static let software: UInt16 = 0x8022
    /// FINGERPRINT.
    public static let fingerprint: UInt16 = 0x8028
    /// RESPONSE-ORIGIN (RFC 5780).
    public static let responseOrigin: UInt16 = 0x802B
    /// OTHER-ADDRESS (RFC 5780).
    public static let otherAddress: UInt16 = 0x802C

    /// The comprehension-required types this module understands as a Binding responder.
    ///
    /// REALM and NONCE are listed because a request carrying them is still answerable; PADDING because
    /// RFC 5780 clients may send it. RESPONSE-ADDRESS is deliberately absent: honouring it would let anyone
    /// aim our replies at a third party.
    public static let understood: Set<UInt16> = [
        mappedAddress, changeRequest, sourceAddress, changedAddress, username, messageIntegrity, errorCode,
        unknownAttributes, realm, nonce, messageIntegritySHA256, xorMappedAddress, padding, responsePort,
    ]
}

func hex2(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(byte >> 4)], digits[Int(byte & 0xF)]])
}
