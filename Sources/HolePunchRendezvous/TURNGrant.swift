internal import Foundation
public import HolePunchNet
public import HolePunchQUIC
public import HolePunchSTUN

/// TURN servers and short-lived credentials for them, handed to a registered peer in ``Registered``.
///
/// The servers are configured on the rendezvous (`--turn-server`), so the client accepts their addresses as given;
/// what it bounds is their number and the credentials' sizes, so a hostile rendezvous can make a client contact at
/// most ``maximumServers`` hosts of its choosing (docs/security.md).
public struct TURNGrant: Codable, Sendable, Hashable, CustomStringConvertible {
    /// Most servers one grant may list.
    public static let maximumServers = 4
    /// Longest username (RFC 8489's USERNAME limit is 513 bytes).
    public static let maximumUsernameBytes = 512
    /// Longest password (a base64 HMAC-SHA1 is 28 characters).
    public static let maximumPasswordBytes = 128

    /// The TURN servers, in order of preference.
    public var servers: [SocketAddress]
    /// Credentials valid at every listed server until their expiry.
    public var credentials: TURNCredentials

    /// Creates a grant.
    public init(servers: [SocketAddress], credentials: TURNCredentials) {
        self.servers = servers
        self.credentials = credentials
    }

    /// Decodes and validates (``validate()``).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(servers: try c.decode([SocketAddress].self, forKey: .servers),
                  credentials: try c.decode(TURNCredentials.self, forKey: .credentials))
        try validate()
    }

    /// Checks the bounds.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check("turn.servers count", servers.count, 1...Self.maximumServers)
        // The same rule as a `Registered`'s STUN servers: never an address where nothing or everything listens.
        for server in servers where server.port == 0 || server.scope.isNeverAProbeTarget {
            throw RendezvousError(.protocolViolation, "field turn.servers: \(server) is not a TURN server address")
        }
        try RendezvousMessageLimits.check("turn.username length", credentials.username.utf8.count, 1...Self.maximumUsernameBytes)
        try RendezvousMessageLimits.check("turn.password length", credentials.password.utf8.count, 1...Self.maximumPasswordBytes)
    }

    /// The servers and the username; never the password.
    public var description: String { "TURNGrant(servers: \(servers), \(credentials))" }
}

/// How a rendezvous mints TURN credentials with a secret it shares with its TURN servers (coturn's
/// `--use-auth-secret --static-auth-secret`), so that no user database is needed.
///
/// Minted at every registration: username `expiry:NodeID`, password base64(HMAC-SHA1(secret, username)). A peer
/// that needs credentials beyond ``ttl`` registers again. `description` never shows the secret.
public struct TURNMinting: Sendable, CustomStringConvertible, CustomReflectable {
    /// The TURN servers handed out (at most ``TURNGrant/maximumServers``).
    public var servers: [SocketAddress]
    /// How long minted credentials are valid.
    public var ttl: Duration
    private let secret: [UInt8]

    /// Creates a minting rule; `secret` is the shared secret's bytes.
    public init(servers: [SocketAddress], secret: [UInt8], ttl: Duration = .seconds(600)) {
        self.servers = servers
        self.secret = secret
        self.ttl = ttl
    }

    /// Reads the secret from a file (surrounding whitespace and the final newline are not part of it).
    ///
    /// - Throws: `TURNError` `invalidConfiguration` when the file cannot be read or is empty; the message names the
    ///   path, never the contents.
    public static func secret(fromFile path: String) throws(TURNError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw TURNError(.invalidConfiguration, "cannot read the TURN secret file \(path)")
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty else { throw TURNError(.invalidConfiguration, "the TURN secret file \(path) is empty") }
        return Array(text.utf8)
    }

    /// A grant for `node`, valid for ``ttl`` from `unixTime` (seconds; the current time when nil); nil when no
    /// server is configured or HMAC fails.
    public func grant(for node: NodeID, unixTime: Int64? = nil) -> TURNGrant? {
        guard !servers.isEmpty else { return nil }
        let now = unixTime ?? Int64(Date().timeIntervalSince1970.rounded(.down))
        let expiry = now + ttl.components.seconds
        guard let credentials = try? TURNCredentials.rest(secret: secret, user: "\(node)", expiresAt: expiry) else { return nil }
        return TURNGrant(servers: Array(servers.prefix(TURNGrant.maximumServers)), credentials: credentials)
    }

    /// The servers and TTL; never the secret.
    public var description: String { "TURNMinting(servers: \(servers), ttl: \(ttl), secret: <redacted>)" }

    /// The servers and TTL without the secret, so that `dump` and reflection-based formatting cannot leak it.
    public var customMirror: Mirror { Mirror(self, children: ["servers": servers, "ttl": ttl], displayStyle: .struct) }
}
