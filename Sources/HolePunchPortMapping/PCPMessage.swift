public import HolePunchNet

/// PCP (RFC 6887) wire format: the MAP and ANNOUNCE opcodes this client uses, and their responses.
///
/// The codec checks shape only (lengths, version, opcode, R bit, address families); whether a response belongs to
/// our request (nonce, protocol, port, source) is the state machine's question (``PCPMapClient``).
public enum PCP {
    /// The server port (RFC 6887 §19.1).
    public static let serverPort: UInt16 = 5351
    /// The port unsolicited ANNOUNCEs are multicast to (RFC 6887 §19.1; miniupnpd sends them to 224.0.0.1).
    public static let clientPort: UInt16 = 5350
    /// The protocol version (RFC 6887 §7).
    public static let version: UInt8 = 2
    /// The largest PCP message (RFC 6887 §7): anything longer is not PCP.
    public static let maximumLength = 1100
    /// IANA protocol number for UDP, the only protocol mapped here.
    public static let udp: UInt8 = 17

    /// The opcodes this client sends or accepts.
    public enum Opcode: UInt8, Sendable, Hashable {
        /// ANNOUNCE: "I restarted" from the server, or a probe from a client.
        case announce = 0
        /// MAP: an inbound mapping.
        case map = 1
    }

    /// A PCP result code (RFC 6887 §7.4); an open set, so unknown codes survive decoding.
    public struct ResultCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code on the wire.
        public var rawValue: UInt8
        /// Wraps a wire code.
        public init(rawValue: UInt8) { self.rawValue = rawValue }

        /// SUCCESS.
        public static let success = ResultCode(rawValue: 0)
        /// UNSUPP_VERSION: the server speaks another version (a NAT-PMP-only router answers PCP with this).
        public static let unsupportedVersion = ResultCode(rawValue: 1)
        /// NOT_AUTHORIZED.
        public static let notAuthorized = ResultCode(rawValue: 2)
        /// MALFORMED_REQUEST.
        public static let malformedRequest = ResultCode(rawValue: 3)
        /// UNSUPP_OPCODE.
        public static let unsupportedOpcode = ResultCode(rawValue: 4)
        /// UNSUPP_OPTION.
        public static let unsupportedOption = ResultCode(rawValue: 5)
        /// MALFORMED_OPTION.
        public static let malformedOption = ResultCode(rawValue: 6)
        /// NETWORK_FAILURE (short-lifetime error: retry later).
        public static let networkFailure = ResultCode(rawValue: 7)
        /// NO_RESOURCES.
        public static let noResources = ResultCode(rawValue: 8)
        /// UNSUPP_PROTOCOL.
        public static let unsupportedProtocol = ResultCode(rawValue: 9)
        /// USER_EX_QUOTA.
        public static let userExceededQuota = ResultCode(rawValue: 10)
        /// CANNOT_PROVIDE_EXTERNAL.
        public static let cannotProvideExternal = ResultCode(rawValue: 11)
        /// ADDRESS_MISMATCH: the client address in the request is not the packet's source.
        public static let addressMismatch = ResultCode(rawValue: 12)
        /// EXCESSIVE_REMOTE_PEERS.
        public static let excessiveRemotePeers = ResultCode(rawValue: 13)

        private static let names = [
            "SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST", "UNSUPP_OPCODE", "UNSUPP_OPTION",
            "MALFORMED_OPTION", "NETWORK_FAILURE", "NO_RESOURCES", "UNSUPP_PROTOCOL", "USER_EX_QUOTA",
            "CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH", "EXCESSIVE_REMOTE_PEERS",
        ]

        /// The RFC's name, or `RESULT_<n>` for an unknown code.
        public var description: String {
            Int(rawValue) < Self.names.count ? Self.names[Int(rawValue)] : "RESULT_\(rawValue)"
        }
    }

    /// A MAP request (RFC 6887 §11.1): 24-byte header plus 36 bytes of opcode data, no options.
    public struct MapRequest: Sendable, Hashable {
        /// The 12-byte nonce that the response must echo.
        public var nonce: [UInt8]
        /// Our address as the server sees it (the packet's source address).
        public var client: SocketAddress.IP
        /// The port to map (our punch socket's).
        public var internalPort: UInt16
        /// The external port to suggest (0: any).
        public var suggestedExternalPort: UInt16
        /// Requested lifetime in seconds; 0 deletes the mapping.
        public var lifetime: UInt32

        /// Creates a request for UDP.
        public init(nonce: [UInt8], client: SocketAddress.IP, internalPort: UInt16, suggestedExternalPort: UInt16 = 0,
                    lifetime: UInt32) {
            self.nonce = nonce
            self.client = client
            self.internalPort = internalPort
            self.suggestedExternalPort = suggestedExternalPort
            self.lifetime = lifetime
        }

        /// The 60 bytes on the wire. The suggested external address is the all-zero address of the client's family
        /// (`::ffff:0.0.0.0` for IPv4, `::` for IPv6: "no preference", §11.1).
        public var bytes: [UInt8] {
            var out: [UInt8] = [PCP.version, Opcode.map.rawValue, 0, 0]
            out += bigEndian(lifetime)
            out += PCP.encode(client)
            out += nonce.count == 12 ? nonce : Array((nonce + [UInt8](repeating: 0, count: 12)).prefix(12))
            out += [PCP.udp, 0, 0, 0]
            out += bigEndian(internalPort) + bigEndian(suggestedExternalPort)
            out += client.isV4 ? PCP.encode(.v4(0, 0, 0, 0)) : [UInt8](repeating: 0, count: 16)
            return out
        }
    }

    /// A decoded response header (RFC 6887 §7.2) with the MAP data when the opcode is MAP.
    public struct Response: Sendable, Hashable {
        /// The opcode answered.
        public var opcode: Opcode
        /// The result.
        public var result: ResultCode
        /// Granted lifetime in seconds (on error: how long the error is likely to last).
        public var lifetime: UInt32
        /// The server's epoch time: seconds since its state began (§8.5).
        public var epoch: UInt32
        /// The MAP part, for MAP responses.
        public var map: MapData?
    }

    /// The MAP opcode data of a response (RFC 6887 §11.1).
    public struct MapData: Sendable, Hashable {
        /// The echoed nonce.
        public var nonce: [UInt8]
        /// The IANA protocol number.
        public var protocolNumber: UInt8
        /// The echoed internal port.
        public var internalPort: UInt16
        /// The assigned external port.
        public var externalPort: UInt16
        /// The assigned external address (decoded from its v4-mapped form for IPv4).
        public var externalIP: SocketAddress.IP
    }

    /// Why a datagram is not a usable PCP response.
    public enum DecodeFailure: Error, Hashable, Sendable {
        /// Shorter than a header, or than the opcode's data, or longer than 1100 bytes, or not a multiple of 4.
        case length(Int)
        /// A version other than 2 (a NAT-PMP server answers version 0).
        case version(UInt8)
        /// The R bit is clear: a request, not a response.
        case notResponse
        /// An opcode this client never sends.
        case opcode(UInt8)
    }

    /// Decodes a response; options after the opcode data are ignored (we send none, §7.3 lets us skip unknown
    /// optional ones and a server must not add mandatory ones we did not ask for).
    public static func decodeResponse(_ bytes: [UInt8]) throws(DecodeFailure) -> Response {
        // The version first: a NAT-PMP server's answer (version 0, 8 to 16 bytes) must read as "other version"
        // (RFC 6887 §9), not as a short PCP message.
        guard bytes.count >= 2 else { throw .length(bytes.count) }
        guard bytes[0] == version else { throw .version(bytes[0]) }
        guard bytes.count >= 24, bytes.count <= maximumLength, bytes.count % 4 == 0 else {
            throw .length(bytes.count)
        }
        guard bytes[1] & 0x80 != 0 else { throw .notResponse }
        guard let opcode = Opcode(rawValue: bytes[1] & 0x7f) else { throw .opcode(bytes[1] & 0x7f) }
        var response = Response(
            opcode: opcode, result: ResultCode(rawValue: bytes[3]), lifetime: readUInt32(bytes, 4),
            epoch: readUInt32(bytes, 8), map: nil
        )
        if opcode == .map {
            // An error response may carry the opcode data too (§7.2: "copied from the request"); require it either
            // way, since without the nonce the response cannot be matched.
            guard bytes.count >= 60 else { throw .length(bytes.count) }
            response.map = MapData(
                nonce: Array(bytes[24..<36]), protocolNumber: bytes[36],
                internalPort: UInt16(bytes[40]) << 8 | UInt16(bytes[41]),
                externalPort: UInt16(bytes[42]) << 8 | UInt16(bytes[43]),
                externalIP: decode(Array(bytes[44..<60]))
            )
        }
        return response
    }

    /// An address in PCP's 16-byte form: IPv6 as is, IPv4 as `::ffff:a.b.c.d` (§5).
    public static func encode(_ ip: SocketAddress.IP) -> [UInt8] {
        switch ip {
        case let .v4(a, b, c, d): [UInt8](repeating: 0, count: 10) + [0xff, 0xff, a, b, c, d]
        case let .v6(bytes): bytes.count == 16 ? bytes : [UInt8](repeating: 0, count: 16)
        }
    }

    /// The inverse of ``encode(_:)``: a v4-mapped address becomes IPv4.
    public static func decode(_ bytes: [UInt8]) -> SocketAddress.IP {
        if bytes.count == 16, bytes[0..<10].allSatisfy({ $0 == 0 }), bytes[10] == 0xff, bytes[11] == 0xff {
            return .v4(bytes[12], bytes[13], bytes[14], bytes[15])
        }
        return .v6(bytes)
    }

    private static func readUInt32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
        UInt32(bytes[at]) << 24 | UInt32(bytes[at + 1]) << 16 | UInt32(bytes[at + 2]) << 8 | UInt32(bytes[at + 3])
    }
}

extension SocketAddress.IP {
    /// Whether the address is IPv4.
    var isV4: Bool {
        if case .v4 = self { return true }
        return false
    }
}

/// The big-endian bytes of an integer.
func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}
