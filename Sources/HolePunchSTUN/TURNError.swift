internal import Foundation

/// Every failure of the TURN client: a code callers can switch on, a human-readable message, and optionally the
/// error underneath.
public struct TURNError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A stable, machine-readable kind of failure (extensible, like ``STUNError/Code``).
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, e.g. `quotaExceeded`.
        public let rawValue: String
        /// Creates a code from its name.
        public init(_ rawValue: String) { self.rawValue = rawValue }
        /// The code's name.
        public var description: String { rawValue }

        /// The server did not answer within the configured bound.
        public static let unreachable = Code("unreachable")
        /// The server rejected our credentials (401 after we sent them).
        public static let wrongCredentials = Code("wrongCredentials")
        /// The server refused another allocation for this user (486).
        public static let quotaExceeded = Code("quotaExceeded")
        /// The 5-tuple already has an allocation, or a request did not match it (437 on Allocate).
        public static let allocationMismatch = Code("allocationMismatch")
        /// The allocation no longer exists on the server (437 on Refresh and others, or its lifetime ran out).
        public static let expired = Code("expired")
        /// A response that matched our transaction but broke the protocol (a missing or malformed attribute).
        public static let malformed = Code("malformed")
        /// Any other error response; the message carries the server's code.
        public static let rejected = Code("rejected")
        /// More peers than the configured bound.
        public static let limit = Code("limit")
        /// A TURN setting is unusable (an unreadable or empty secret file…).
        public static let invalidConfiguration = Code("invalidConfiguration")
        /// The allocation was closed (deallocated, or the client stopped) before the operation finished.
        public static let closed = Code("closed")
    }

    /// What kind of failure this is.
    public var code: Code
    /// What happened, for humans; never contains a password or secret.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `TURN <code>: <message>`.
    public var description: String { "TURN \(code): \(message)" }
}

/// A TURN username and password (RFC 8489 long-term credentials).
///
/// `description` and `debugDescription` never show the password, so the value can be logged or interpolated safely.
public struct TURNCredentials: Hashable, Sendable, Codable, CustomStringConvertible, CustomDebugStringConvertible {
    /// The username (for REST credentials, `expiry:NodeID`).
    public var username: String
    /// The password.
    public var password: String

    /// Creates credentials.
    public init(username: String, password: String) {
        self.username = username
        self.password = password
    }

    /// Credentials in coturn's shared-secret scheme (the "TURN REST API", `--use-auth-secret`): the username is
    /// `expiry:user`, with `expiry` in Unix seconds (`expiresAt`), and the password is base64(HMAC-SHA1(secret, username)).
    ///
    /// - Throws: ``STUNError`` `.crypto` when HMAC fails.
    public static func rest(secret: [UInt8], user: String, expiresAt: Int64) throws(STUNError) -> TURNCredentials {
        let username = "\(expiresAt):\(user)"
        let mac = try STUNCrypto.hmacSHA1(key: secret, Array(username.utf8))
        return TURNCredentials(username: username, password: Data(mac).base64EncodedString())
    }

    /// The expiry of REST credentials in Unix seconds (the number before the first `:` of the username), or nil.
    public var restExpiry: Int64? {
        guard let colon = username.firstIndex(of: ":") else { return nil }
        return Int64(username[..<colon])
    }

    /// The username with the password redacted.
    public var description: String { "TURNCredentials(username: \(username), password: <redacted>)" }
    /// Same as ``description``.
    public var debugDescription: String { description }
}
