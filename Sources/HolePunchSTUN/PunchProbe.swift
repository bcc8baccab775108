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
        let message = STUNMessage(.request, transactionID: transactionID, attributes: [
            .username(try checkedUsername(sessionID, senderRole)),
        ])
        return try message.encoded(integritySHA256: STUNCredential(key: key), fingerprint: true)
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
        let message = STUNMessage(.successResponse, transactionID: transactionID, attributes: [
            .username(try checkedUsername(sessionID, senderRole)),
            .xorMappedAddress(observedAddress),
        ])
        return try message.encoded(integritySHA256: STUNCredential(key: key), fingerprint: true)
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
        try STUNMessage.verifyIntegrity(of: bytes, credential: STUNCredential(key: key), require: .sha256)
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

    private static func checkedUsername(_ sessionID: String, _ role: String) throws(STUNError) -> String {
        guard !role.isEmpty, !role.contains(":") else {
            throw STUNError(.invalidConfiguration, "probe role '\(role)' must be non-empty and contain no ':'")
        }
        let name = username(sessionID: sessionID, senderRole: role)
        guard name.utf8.count <= 512 else { throw STUNError(.invalidConfiguration, "probe USERNAME exceeds 512 bytes") }
        return name
    }
}
