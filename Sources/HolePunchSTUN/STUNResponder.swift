public import HolePunchNet

/// Where a STUN responder listens, and how it answers.
public struct STUNResponderConfiguration: Hashable, Sendable {
    /// The primary address (IP A1, port P1). Port 0 lets ``STUNServer`` pick one.
    public var primary: SocketAddress
    /// The alternate port P2 (RFC 5780), if any. 0 lets ``STUNServer`` pick one.
    public var alternatePort: UInt16?
    /// The alternate IP A2 (RFC 5780), if any; same family as `primary`.
    public var alternateIP: SocketAddress.IP?
    /// A SOFTWARE value to include in responses, space permitting.
    public var software: String?
    /// No reply is larger than this many times the request that caused it (see ``STUNResponder``).
    public var amplificationFactor: Int
    /// Whether RFC 3489 requests (no magic cookie) are answered, with MAPPED-ADDRESS, SOURCE-ADDRESS and
    /// CHANGED-ADDRESS, so that old clients such as Debian's `stun` work.
    public var answerLegacyClients: Bool

    /// Creates a configuration.
    public init(
        primary: SocketAddress,
        alternatePort: UInt16? = nil,
        alternateIP: SocketAddress.IP? = nil,
        software: String? = nil,
        amplificationFactor: Int = 3,
        answerLegacyClients: Bool = true
    ) {
        self.primary = primary
        self.alternatePort = alternatePort
        self.alternateIP = alternateIP
        self.software = software
        self.amplificationFactor = amplificationFactor
        self.answerLegacyClients = answerLegacyClients
    }

    /// Every local address the responder answers from: (A1,P1), (A1,P2), (A2,P1), (A2,P2) as configured.
    public var localAddresses: [SocketAddress] {
        let ips = [primary.ip] + (alternateIP.map { [$0] } ?? [])
        let ports = [primary.port] + (alternatePort.map { [$0] } ?? [])
        return ips.flatMap { ip in ports.map { SocketAddress(ip: ip, port: $0) } }
    }
}

/// One datagram a responder wants sent.
public struct STUNReply: Hashable, Sendable {
    /// The encoded message.
    public var bytes: [UInt8]
    /// The local address (one of ``STUNResponderConfiguration/localAddresses``) to send it from.
    public var from: SocketAddress
    /// The destination.
    public var to: SocketAddress

    /// Creates a reply.
    public init(bytes: [UInt8], from: SocketAddress, to: SocketAddress) {
        self.bytes = bytes
        self.from = from
        self.to = to
    }
}

/// A Binding responder (RFC 8489 + RFC 5780) as pure logic: datagram in, replies out, no I/O.
///
/// Rules:
/// - Non-STUN datagrams, indications and responses are never answered; neither is anything whose
///   FINGERPRINT is wrong (it is not ours to interpret).
/// - A request whose header is sound but whose attributes are malformed, or whose method is not Binding,
///   gets 400. Unknown comprehension-required attributes get 420 with UNKNOWN-ATTRIBUTES. A CHANGE-REQUEST
///   this server cannot honour (no alternate IP or port) also gets 420 naming CHANGE-REQUEST, as RFC 5780 §6.1
///   asks, so clients learn the test is impossible instead of mistaking silence for filtering.
/// - Success responses carry XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS (only when an alternate
///   exists), SOFTWARE (if configured) and FINGERPRINT. CHANGE-REQUEST picks the local address the reply
///   leaves from; RESPONSE-PORT changes only the destination port, never the IP.
/// - **No amplification:** a reply is at most `amplificationFactor` (default 3) times the size of the request.
///   Optional attributes are dropped in the order SOFTWARE, FINGERPRINT, RESPONSE-ORIGIN, OTHER-ADDRESS until
///   it fits; if even the mandatory part does not fit, nothing is sent.
public struct STUNResponder: Sendable {
    /// The configuration.
    public let configuration: STUNResponderConfiguration

    /// Creates a responder.
    public init(configuration: STUNResponderConfiguration) {
        self.configuration = configuration
    }

    /// The replies to send for a datagram `bytes` that came from `source` and arrived on the local address `local`.
    public func replies(to bytes: [UInt8], from source: SocketAddress, receivedOn local: SocketAddress) -> [STUNReply] {
        guard STUNMessage.looksLikeSTUN(bytes, allowLegacy: configuration.answerLegacyClients) else { return [] }
        let type = read16(bytes, 0)
        let (messageClass, method) = STUNMessage.split(type: type)
        guard messageClass == .request else { return [] }
        let transactionID = STUNTransactionID(Array(bytes[8..<20]))!
        let cookie = read32(bytes, 4)
        let limit = bytes.count * max(configuration.amplificationFactor, 1)

        let request: STUNMessage
        do {
            request = try STUNMessage.decode(bytes, options: STUNDecodingOptions(allowLegacy: configuration.answerLegacyClients))
        } catch let error {
            if error.code == .badFingerprint { return [] }
            return errorReply(400, "Bad Request", [], transactionID, cookie, method, local, source, limit)
        }
        guard method == .binding else {
            return errorReply(400, "Bad Request", [], transactionID, cookie, method, local, source, limit)
        }
        let unknown = request.unknownComprehensionRequired()
        if !unknown.isEmpty {
            return errorReply(420, "Unknown Attribute", unknown, transactionID, cookie, method, local, source, limit)
        }

        let other = otherAddress(of: local)
        var from = local
        if let change = request.changeRequest {
            if (change.changeIP && configuration.alternateIP == nil) || (change.changePort && configuration.alternatePort == nil) {
                return errorReply(420, "Unknown Attribute", [STUNAttributeType.changeRequest], transactionID, cookie, method, local, source, limit)
            }
            if change.changeIP, let other { from.ip = other.ip }
            if change.changePort, let other { from.port = other.port }
        }
        var destination = source
        if let port = request.responsePort, !request.isLegacy { destination.port = port }

        // Mandatory first, then optional ones in the order they are given up when space is short.
        var mandatory: [STUNAttribute]
        var optional: [STUNAttribute] = []
        if request.isLegacy {
            mandatory = [.mappedAddress(source), .legacySourceAddress(from)]
            if let other { mandatory.append(.legacyChangedAddress(other)) }
        } else {
            mandatory = [.xorMappedAddress(source)]
            if let other { optional.append(.otherAddress(other)) }
            optional.append(.responseOrigin(from))
        }
        var wantFingerprint = !request.isLegacy
        if let software = configuration.software, !request.isLegacy { optional.append(.software(software)) }

        var response = STUNMessage(.successResponse, method: method, transactionID: transactionID)
        response.cookie = cookie
        while true {
            response.attributes = mandatory + optional
            guard let encoded = try? response.encoded(fingerprint: wantFingerprint) else { return [] }
            if encoded.count <= limit { return [STUNReply(bytes: encoded, from: from, to: destination)] }
            if let software = optional.last, case .software = software {
                optional.removeLast()
            } else if wantFingerprint {
                wantFingerprint = false
            } else if !optional.isEmpty {
                optional.removeLast()
            } else {
                return []
            }
        }
    }

    /// The address differing from `local` in IP (if an alternate IP exists) and port (if an alternate port
    /// exists); `nil` when the server has no alternate at all.
    func otherAddress(of local: SocketAddress) -> SocketAddress? {
        guard configuration.alternateIP != nil || configuration.alternatePort != nil else { return nil }
        var other = local
        if let altIP = configuration.alternateIP {
            other.ip = local.ip == configuration.primary.ip ? altIP : configuration.primary.ip
        }
        if let altPort = configuration.alternatePort {
            other.port = local.port == configuration.primary.port ? altPort : configuration.primary.port
        }
        return other
    }

    private func errorReply(
        _ code: Int, _ reason: String, _ unknown: [UInt16], _ transactionID: STUNTransactionID, _ cookie: UInt32,
        _ method: STUNMessage.Method, _ local: SocketAddress, _ source: SocketAddress, _ limit: Int
    ) -> [STUNReply] {
        var response = STUNMessage(.errorResponse, method: method, transactionID: transactionID)
        response.cookie = cookie
        for phrase in [reason, ""] {
            response.attributes = [.errorCode(code: code, reason: phrase)]
            if !unknown.isEmpty { response.attributes.append(.unknownAttributes(unknown)) }
            if let bytes = try? response.encoded(), bytes.count <= limit {
                return [STUNReply(bytes: bytes, from: local, to: source)]
            }
        }
        return []
    }
}
