public import HolePunchNet

// TURN's attributes ride in `STUNAttribute.raw`: adding enum cases would break every exhaustive `switch` over
// `STUNAttribute` outside this module, and the codec already frames raw values with the usual length checks.
// The typed factories and accessors below are the only places that know their layouts.

extension STUNMessage.Method {
    /// Allocate (RFC 8656 §7): reserve a relayed transport address.
    public static let allocate = STUNMessage.Method(0x003)
    /// Refresh (RFC 8656 §8): extend or (lifetime 0) delete an allocation.
    public static let refresh = STUNMessage.Method(0x004)
    /// Send indication (RFC 8656 §11): data for a peer.
    public static let send = STUNMessage.Method(0x006)
    /// Data indication (RFC 8656 §11): data from a peer.
    public static let data = STUNMessage.Method(0x007)
    /// CreatePermission (RFC 8656 §10): let a peer's IP address send to the relayed address.
    public static let createPermission = STUNMessage.Method(0x008)
    /// ChannelBind (RFC 8656 §12): a 4-byte-header channel to a peer.
    public static let channelBind = STUNMessage.Method(0x009)
}

extension STUNAttributeType {
    /// CHANNEL-NUMBER (RFC 8656).
    public static let channelNumber: UInt16 = 0x000C
    /// LIFETIME (RFC 8656), in seconds.
    public static let lifetime: UInt16 = 0x000D
    /// XOR-PEER-ADDRESS (RFC 8656).
    public static let xorPeerAddress: UInt16 = 0x0012
    /// DATA (RFC 8656).
    public static let data: UInt16 = 0x0013
    /// XOR-RELAYED-ADDRESS (RFC 8656).
    public static let xorRelayedAddress: UInt16 = 0x0016
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656).
    public static let requestedAddressFamily: UInt16 = 0x0017
    /// REQUESTED-TRANSPORT (RFC 8656).
    public static let requestedTransport: UInt16 = 0x0019
}

extension STUNAttribute {
    /// The longest REALM and NONCE we accept or send (RFC 8489 allows fewer than 128 characters, up to 763 bytes).
    static let maximumRealmOrNonceBytes = 763

    /// XOR-PEER-ADDRESS of `address`, obfuscated with the transaction ID of the message it goes into.
    public static func xorPeerAddress(_ address: SocketAddress, transactionID: STUNTransactionID) -> STUNAttribute {
        .raw(type: STUNAttributeType.xorPeerAddress, value: encodeAddress(address, xor: xorPad(transactionID)))
    }

    /// XOR-RELAYED-ADDRESS of `address`, obfuscated with the transaction ID of the message it goes into.
    public static func xorRelayedAddress(_ address: SocketAddress, transactionID: STUNTransactionID) -> STUNAttribute {
        .raw(type: STUNAttributeType.xorRelayedAddress, value: encodeAddress(address, xor: xorPad(transactionID)))
    }

    /// LIFETIME in seconds.
    public static func lifetime(seconds: UInt32) -> STUNAttribute {
        .raw(type: STUNAttributeType.lifetime, value: be32(seconds))
    }

    /// REQUESTED-TRANSPORT; 17 is UDP, the only protocol RFC 8656 defines.
    public static func requestedTransport(_ protocolNumber: UInt8 = 17) -> STUNAttribute {
        .raw(type: STUNAttributeType.requestedTransport, value: [protocolNumber, 0, 0, 0])
    }

    /// CHANNEL-NUMBER (the number, then two reserved bytes).
    public static func channelNumber(_ number: UInt16) -> STUNAttribute {
        .raw(type: STUNAttributeType.channelNumber, value: be16(number) + [0, 0])
    }

    /// DATA: the application payload of a Send or Data indication.
    public static func data(_ payload: [UInt8]) -> STUNAttribute {
        .raw(type: STUNAttributeType.data, value: payload)
    }

    /// REALM (UTF-8).
    public static func realm(_ realm: String) -> STUNAttribute {
        .raw(type: STUNAttributeType.realm, value: Array(realm.utf8))
    }

    /// NONCE (kept as the server sent it).
    public static func nonce(_ nonce: [UInt8]) -> STUNAttribute {
        .raw(type: STUNAttributeType.nonce, value: nonce)
    }

    static func xorPad(_ transactionID: STUNTransactionID) -> [UInt8] {
        be32(STUNMessage.magicCookie) + transactionID.bytes
    }
}

extension STUNMessage {
    /// The value of the first raw attribute of `type`.
    func rawValue(_ type: UInt16) -> [UInt8]? {
        for case let .raw(t, value) in attributes where t == type { return value }
        return nil
    }

    /// Every XOR-PEER-ADDRESS, in order.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when one is malformed.
    public func xorPeerAddresses() throws(STUNError) -> [SocketAddress] {
        var result: [SocketAddress] = []
        for case let .raw(type, value) in attributes where type == STUNAttributeType.xorPeerAddress {
            result.append(try STUNAttribute.decodeAddress(value, xor: STUNAttribute.xorPad(transactionID)))
        }
        return result
    }

    /// The first XOR-RELAYED-ADDRESS, or nil.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when it is malformed.
    public func xorRelayedAddress() throws(STUNError) -> SocketAddress? {
        guard let value = rawValue(STUNAttributeType.xorRelayedAddress) else { return nil }
        return try STUNAttribute.decodeAddress(value, xor: STUNAttribute.xorPad(transactionID))
    }

    /// The first LIFETIME in seconds, or nil.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when it is not 4 bytes.
    public func lifetimeSeconds() throws(STUNError) -> UInt32? {
        guard let value = rawValue(STUNAttributeType.lifetime) else { return nil }
        guard value.count == 4 else { throw STUNError(.badAttribute, "LIFETIME must be 4 bytes, not \(value.count)") }
        return read32(value, 0)
    }

    /// The first CHANNEL-NUMBER, or nil.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when it is not 4 bytes or outside 0x4000–0x4FFF.
    public func channelNumber() throws(STUNError) -> UInt16? {
        guard let value = rawValue(STUNAttributeType.channelNumber) else { return nil }
        guard value.count == 4 else { throw STUNError(.badAttribute, "CHANNEL-NUMBER must be 4 bytes, not \(value.count)") }
        let number = read16(value, 0)
        guard TURNChannelData.channelRange.contains(number) else {
            throw STUNError(.badAttribute, "CHANNEL-NUMBER 0x\(String(number, radix: 16)) is outside 0x4000-0x4fff")
        }
        return number
    }

    /// The first DATA value, or nil.
    public var dataPayload: [UInt8]? { rawValue(STUNAttributeType.data) }

    /// The first REALM, or nil.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when it is too long or not UTF-8.
    public func realm() throws(STUNError) -> String? {
        guard let value = rawValue(STUNAttributeType.realm) else { return nil }
        guard value.count <= STUNAttribute.maximumRealmOrNonceBytes else { throw STUNError(.badAttribute, "REALM too long") }
        return try STUNAttribute.utf8(value, "REALM")
    }

    /// The first NONCE, or nil.
    ///
    /// - Throws: ``STUNError`` `.badAttribute` when it is too long.
    public func nonce() throws(STUNError) -> [UInt8]? {
        guard let value = rawValue(STUNAttributeType.nonce) else { return nil }
        guard value.count <= STUNAttribute.maximumRealmOrNonceBytes else { throw STUNError(.badAttribute, "NONCE too long") }
        return value
    }
}

/// TURN ChannelData messages (RFC 8656 §12.4): a channel number, a length and the payload, with no STUN header.
public enum TURNChannelData {
    /// The channel numbers a client may bind (RFC 8656 §12: 0x4000 through 0x4FFF).
    public static let channelRange: ClosedRange<UInt16> = 0x4000...0x4FFF

    /// A ChannelData message carrying `payload` on `channel`.
    ///
    /// - Parameters:
    ///   - channel: the bound channel number.
    ///   - payload: the data for the peer.
    ///   - padded: pad to a multiple of 4 bytes. RFC 8656 §12.5 requires it over TCP and leaves it optional over UDP,
    ///     where it only costs bytes, so UDP callers pass `false`.
    /// - Returns: nil when the payload exceeds 65,535 bytes or the channel is outside ``channelRange``.
    public static func encode(channel: UInt16, payload: UnsafeRawBufferPointer, padded: Bool = false) -> [UInt8]? {
        guard channelRange.contains(channel), payload.count <= 0xFFFF else { return nil }
        var bytes = be16(channel) + be16(UInt16(payload.count))
        bytes.reserveCapacity(4 + payload.count + 3)
        bytes.append(contentsOf: payload)
        if padded { bytes += [UInt8](repeating: 0, count: (4 - payload.count % 4) % 4) }
        return bytes
    }

    /// The channel and payload range of a ChannelData datagram, or nil when it is not one.
    ///
    /// A datagram shorter than the length it claims is discarded, as RFC 8656 §12.5 says; so is one with more than
    /// the three padding bytes a length could need after it, and one whose channel is outside ``channelRange``.
    public static func decode(_ datagram: UnsafeRawBufferPointer) -> (channel: UInt16, payload: Range<Int>)? {
        guard datagram.count >= 4 else { return nil }
        let channel = UInt16(datagram[0]) << 8 | UInt16(datagram[1])
        guard channelRange.contains(channel) else { return nil }
        let length = Int(UInt16(datagram[2]) << 8 | UInt16(datagram[3]))
        guard 4 + length <= datagram.count, datagram.count <= 4 + ((length + 3) & ~3) else { return nil }
        return (channel, 4..<(4 + length))
    }
}
