/// An error from the QUIC endpoint, a connection, a stream, or an identity file.
///
/// Errors are a struct with an extensible ``Code`` rather than a frozen enum, so new codes never break callers.
public struct QUICError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong, as a stable machine-readable code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name.
        public let name: String
        init(_ name: String) { self.name = name }
        public var description: String { name }

        /// A socket call failed (bind, send, epoll).
        public static let socket = Code("socket")
        /// An argument was invalid (bad address family, bad configuration value).
        public static let invalidArgument = Code("invalidArgument")
        /// An identity file is missing, unreadable or corrupt, or key generation failed.
        public static let identity = Code("identity")
        /// GnuTLS reported an error while setting up TLS.
        public static let tls = Code("tls")
        /// The peer's certificate did not hash to the expected NodeID, or it sent none.
        public static let peerAuthenticationFailed = Code("peerAuthenticationFailed")
        /// The peer rejected our certificate or closed during the handshake.
        public static let handshakeFailed = Code("handshakeFailed")
        /// The handshake did not complete within the configured handshake timeout.
        public static let handshakeTimeout = Code("handshakeTimeout")
        /// The connection was idle for longer than its idle timeout.
        public static let idleTimeout = Code("idleTimeout")
        /// The peer closed the connection; ``QUICError/applicationErrorCode`` holds its code.
        public static let connectionClosed = Code("connectionClosed")
        /// The connection was closed locally.
        public static let closedLocally = Code("closedLocally")
        /// The peer reset the stream; ``QUICError/applicationErrorCode`` holds its code.
        public static let streamReset = Code("streamReset")
        /// The peer violated QUIC (ngtcp2 reported a protocol error).
        public static let protocolViolation = Code("protocolViolation")
        /// The awaiting task was cancelled.
        public static let cancelled = Code("cancelled")
        /// The endpoint was closed.
        public static let endpointClosed = Code("endpointClosed")
        /// A read would exceed the caller's limit.
        public static let limitExceeded = Code("limitExceeded")
        /// The peer did not answer a path challenge in time: the path does not reach it (or not both ways).
        public static let pathValidationFailed = Code("pathValidationFailed")
    }

    /// The error's code.
    public var code: Code
    /// A human-readable explanation.
    public var message: String
    /// The NodeID that was expected, for ``Code/peerAuthenticationFailed``.
    public var expectedNodeID: NodeID?
    /// The NodeID that was presented, for ``Code/peerAuthenticationFailed`` (nil when no certificate came).
    public var receivedNodeID: NodeID?
    /// The application error code carried by a close or reset.
    public var applicationErrorCode: UInt64?

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(detail)" }

    /// The message with the NodeIDs involved, without the code: for errors of other layers that carry this one
    /// under a code of their own.
    public var detail: String {
        guard let expectedNodeID else { return message }
        return message + " (expected \(expectedNodeID), received \(receivedNodeID.map { "\($0)" } ?? "no certificate"))"
    }

    static func peerAuthentication(expected: NodeID?, received: NodeID?, _ message: String) -> QUICError {
        var error = QUICError(.peerAuthenticationFailed, message)
        error.expectedNodeID = expected
        error.receivedNodeID = received
        return error
    }
}
