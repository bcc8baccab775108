/// Every failure in HolePunchSTUN: a code that callers can switch on, a human-readable message,
/// and optionally the error underneath.
///
/// Codes are extensible static members rather than enum cases, so that adding a failure kind later
/// does not break anyone's `switch`.
public struct STUNError: Error, Sendable, CustomStringConvertible {
    /// A stable, machine-readable kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, e.g. `truncated`.
        public let rawValue: String

        /// Creates a code from its name.
        public init(_ rawValue: String) { self.rawValue = rawValue }

        /// The code's name.
        public var description: String { rawValue }

        /// Fewer bytes than the header or a declared length needs.
        public static let truncated = Code("truncated")
        /// The first two bits are not zero, or the bytes cannot be a STUN message at all.
        public static let notSTUN = Code("notSTUN")
        /// The message length is not a multiple of four.
        public static let misaligned = Code("misaligned")
        /// The header's length field disagrees with the datagram's size.
        public static let lengthMismatch = Code("lengthMismatch")
        /// The datagram is larger than the configured maximum.
        public static let tooLarge = Code("tooLarge")
        /// The magic cookie is not 0x2112A442 (and legacy RFC 3489 messages were not allowed).
        public static let badMagicCookie = Code("badMagicCookie")
        /// An attribute's declared length runs past the end of the message.
        public static let attributeOverrun = Code("attributeOverrun")
        /// An attribute value is malformed (wrong length, bad family, invalid UTF-8…).
        public static let badAttribute = Code("badAttribute")
        /// The FINGERPRINT attribute is wrong or not last.
        public static let badFingerprint = Code("badFingerprint")
        /// Integrity was required but no MESSAGE-INTEGRITY(-SHA256) attribute is present.
        public static let missingIntegrity = Code("missingIntegrity")
        /// The MESSAGE-INTEGRITY(-SHA256) value does not match the key.
        public static let badIntegrity = Code("badIntegrity")
        /// A well-formed message that is not what the caller expected (class, method, username…).
        public static let unexpectedMessage = Code("unexpectedMessage")
        /// A socket call failed; the message names the call and errno.
        public static let socket = Code("socket")
        /// A configuration value is unusable.
        public static let invalidConfiguration = Code("invalidConfiguration")
        /// A cryptographic primitive failed.
        public static let crypto = Code("crypto")
    }

    /// What kind of failure this is.
    public var code: Code
    /// What happened, for humans.
    public var message: String
    /// The underlying error, when there is one.
    public var cause: (any Error & Sendable)?

    /// Creates an error.
    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    /// `STUN <code>: <message>`, plus the cause when there is one.
    public var description: String {
        if let cause { return "STUN \(code): \(message) (\(cause))" }
        return "STUN \(code): \(message)"
    }
}
