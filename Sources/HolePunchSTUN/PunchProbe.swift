public import HolePunchNet

/// Authenticated STUN Binding messages that punch sessions use as probes.
///
/// A probe is a Binding request with USERNAME `"<session id>:<sender role>"`, MESSAGE-INTEGRITY-SHA256 keyed by
/// the per-session key the rendezvous handed out, and FINGERPRINT (so it demultiplexes cleanly from QUIC). The
/// answer is a Binding success response with the same USERNAME shape, naming the responder's role, and an
/// XOR-MAPPED-ADDRESS carrying the peer-reflexive address the responder saw the request come from.
///
/// Only someone holding the session key can produce a probe that ``verify(_:sessionID:key:)`` accepts, so a
/// verified probe proves that the path is open to the real peer.
public enum PunchProbe {
    /// What a verified probe says.
    public struct Verified: Hashable, Sendable {
        /// The session the probe belongs to.
        public var sessionID: String
        /// The role the sender claims (e.g. `initiator` or `target`). Callers reject their own role to
        /// ignore reflections of their own probes.
        public var senderRole: String
        /// The transaction ID, which pairs a response with the request that caused it.
        public var transactionID: STUNTransactionID
        /// Whether this is a request (to be answered) or a success response.
        public var isResponse: Bool
        /// For responses, the address the peer saw our request come from.
        public var reflexiveAddress: SocketAddress?
    }

    /// The USERNAME a probe carries.
    public static func username(sessionID: String, senderRole: String) -> String {
        "\(sessionID):\(senderRole)"
    }

    /// Builds a probe request.
    ///
    /// - Throws: ``STUNError`` `.invalidConfiguration` when the role contains `:` or the username is too long.
    public static func request(
        sessionID: String,
        senderRole: String,
        key: [UInt8],
        transactionID: STUNTransactionID = .random()
    ) throws(STUNError) -> [UInt8] {
        try request(sessionID: sessionID, senderRole: senderRole, credential: STUNCredential(key: key), transactionID: transactionID)
    }

    /// Builds a probe request under `credential`: a punch makes its credential once and reuses its keyed HMAC
    /// state for every probe (``request(sessionID:senderRole:key:transactionID:)`` keys it afresh each time).
    public static func request(
        sessionID: String,
        senderRole: String,
        credential: STUNCredential,
        transactionID: STUNTransactionID = .random()
    ) throws(STUNError) -> [UInt8] {
        try Signer(sessionID: sessionID, senderRole: senderRole, credential: credential).request(transactionID: transactionID)
    }

    /// Builds the success response to a verified probe request.
    ///
    /// - Parameters:
    ///   - transactionID: the request's transaction ID (from ``Verified/transactionID``).
    ///   - sessionID: the punch session the request named.
    ///   - senderRole: the responder's own role.
    ///   - key: the session key that protects the response's integrity.
    ///   - observedAddress: where the request came from, as the responder's socket saw it.
    public static func response(
        transactionID: STUNTransactionID,
        sessionID: String,
        senderRole: String,
        key: [UInt8],
        observedAddress: SocketAddress
    ) throws(STUNError) -> [UInt8] {
        try response(transactionID: transactionID, sessionID: sessionID, senderRole: senderRole,
                     credential: STUNCredential(key: key), observedAddress: observedAddress)
    }

    /// Builds the success response to a verified probe request under `credential` (see
    /// ``request(sessionID:senderRole:credential:transactionID:)``).
    public static func response(
        transactionID: STUNTransactionID,
        sessionID: String,
        senderRole: String,
        credential: STUNCredential,
        observedAddress: SocketAddress
    ) throws(STUNError) -> [UInt8] {
        try Signer(sessionID: sessionID, senderRole: senderRole, credential: credential)
            .response(transactionID: transactionID, observedAddress: observedAddress)
    }

    /// One side of a punch session's probe signing: the USERNAME checked and built once, and one credential whose
    /// HMAC state stays keyed, so that each probe costs its encoding and one MAC only. A punch makes one.
    public struct Signer: Sendable {
        /// The USERNAME every probe of this side carries, `"<session id>:<sender role>"`.
        public let username: String
        /// The session key, with its keyed HMAC state.
        public let credential: STUNCredential

        /// Checks the role and the USERNAME's length once.
        ///
        /// - Throws: ``STUNError`` `.invalidConfiguration` when the role contains `:` or the username is too long.
        public init(sessionID: String, senderRole: String, credential: STUNCredential) throws(STUNError) {
            self.username = try PunchProbe.checkedUsername(sessionID, senderRole)
            self.credential = credential
        }

        /// A probe request with this side's USERNAME and a MAC under the credential.
        public func request(transactionID: STUNTransactionID = .random()) throws(STUNError) -> [UInt8] {
            let message = STUNMessage(.request, transactionID: transactionID, attributes: [.username(username)])
            return try message.encoded(integritySHA256: credential, fingerprint: true)
        }

        /// The success response to a verified request `transactionID` that came from `observedAddress`.
        public func response(transactionID: STUNTransactionID, observedAddress: SocketAddress) throws(STUNError) -> [UInt8] {
            let message = STUNMessage(.successResponse, transactionID: transactionID, attributes: [
                .username(username),
                .xorMappedAddress(observedAddress),
            ])
            return try message.encoded(integritySHA256: credential, fingerprint: true)
        }
    }

    /// Verifies a received probe request or response for `sessionID` under `key`.
    ///
    /// Checks, in order: framing and FINGERPRINT, Binding method, request or success class, USERNAME present
    /// and naming this session, MESSAGE-INTEGRITY-SHA256 under `key`, and (for responses) XOR-MAPPED-ADDRESS.
    ///
    /// - Throws: ``STUNError``; `.badIntegrity` / `.missingIntegrity` for forgeries, `.unexpectedMessage`
    ///   for STUN that is not a probe of this session.
    public static func verify(_ bytes: [UInt8], sessionID: String, key: [UInt8]) throws(STUNError) -> Verified {
        try verify(STUNMessage.decode(bytes), bytes: bytes, sessionID: sessionID, key: key)
    }

    /// Verifies a probe that the caller has already decoded (to find its session) from `bytes`: the same checks as
    /// ``verify(_:sessionID:key:)`` without decoding twice. `message` must be the decoding of `bytes`.
    public static func verify(
        _ message: STUNMessage, bytes: [UInt8], sessionID: String, key: [UInt8]
    ) throws(STUNError) -> Verified {
        try verify(message, bytes: bytes, sessionID: sessionID, credential: STUNCredential(key: key))
    }

    /// Verifies a decoded probe under `credential`, reusing its keyed HMAC state: the same checks as
    /// ``verify(_:bytes:sessionID:key:)``.
    public static func verify(
        _ message: STUNMessage, bytes: [UInt8], sessionID: String, credential: STUNCredential
    ) throws(STUNError) -> Verified {
        guard message.method == .binding else { throw STUNError(.unexpectedMessage, "probe is not a Binding message") }
        let isResponse: Bool
        switch message.messageClass {
        case .request: isResponse = false
        case .successResponse: isResponse = true
        default: throw STUNError(.unexpectedMessage, "probe is neither a request nor a success response")
        }
        guard message.attributes.last?.type == STUNAttributeType.fingerprint else {
            throw STUNError(.unexpectedMessage, "probe lacks FINGERPRINT")
        }
        guard let username = message.username, let colon = username.lastIndex(of: ":") else {
            throw STUNError(.unexpectedMessage, "probe lacks a session:role USERNAME")
        }
        let session = String(username[..<colon])
        let role = String(username[username.index(after: colon)...])
        guard session == sessionID else {
            throw STUNError(.unexpectedMessage, "probe belongs to session '\(session)', not '\(sessionID)'")
        }
        try STUNMessage.verifyIntegrity(of: bytes, credential: credential, require: .sha256)
        let reflexive = message.xorMappedAddress
        if isResponse && reflexive == nil {
            throw STUNError(.unexpectedMessage, "probe response lacks XOR-MAPPED-ADDRESS")
        }
        return Verified(
            sessionID: session,
            senderRole: role,
            transactionID: message.transactionID,
            isResponse: isResponse,
            reflexiveAddress: isResponse ? reflexive : nil
        )
    }

    static func checkedUsername(_ sessionID: String, _ role: String) throws(STUNError) -> String {
        guard !role.isEmpty, !role.contains(":") else {
            throw STUNError(.invalidConfiguration, "probe role '\(role)' must be non-empty and contain no ':'")
        }
        let name = username(sessionID: sessionID, senderRole: role)
        guard name.utf8.count <= 512 else { throw STUNError(.invalidConfiguration, "probe USERNAME exceeds 512 bytes") }
        return name
    }
}
