import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
#if canImport(Glibc)
import Glibc
#endif

/// Decides what an Initial for a new connection gets, and counts the server handshakes in progress per source.
///
/// A client Initial is cheap to send and easy to spoof, while answering it costs a TLS session, a key exchange and a
/// signature, and a connection slot until the handshake ends. So a source that has not shown it can receive at its
/// address gets a Retry (RFC 9000 §8.1: stateless, smaller than the Initial, so no amplification) once too many
/// unvalidated handshakes are pending, overall or from its IP address. A source that returns a valid Retry token, or
/// that the application vouches for (a probe proved that address), is validated: its handshakes are capped per IP
/// address and by `maxConnections`, and unvalidated ones never count against them.
///
/// A value type with no I/O: the endpoint feeds it events and acts on its decisions.
struct HandshakeGate {
    /// What the source of an Initial has shown about its address.
    enum Proof {
        /// Nothing: the address may be spoofed.
        case none
        /// It echoed a Retry token we issued to that address.
        case retryToken
        /// The application vouches for the address (a handshake hint provider answered for it).
        case vouched
    }

    /// What to do with the Initial.
    enum Decision: Equatable {
        /// Start a server connection (spend a TLS session on it).
        case accept(validated: Bool)
        /// Answer with a Retry packet and keep no state.
        case retry
        /// Drop it: the source or the endpoint is at its limit for validated handshakes.
        case refuse
    }

    var validation: AddressValidation
    /// Unvalidated handshakes one IP address may have pending; beyond it, Retry.
    var unvalidatedPerHost: Int
    /// Validated handshakes one IP address may have pending; beyond it, refuse.
    var validatedPerHost: Int
    var maxConnections: Int
    /// Server handshakes in progress whose source is not validated.
    private(set) var unvalidatedCount = 0
    /// Server handshakes in progress whose source is validated.
    private(set) var validatedCount = 0
    private var perHost: [SocketAddress: (unvalidated: Int, validated: Int)] = [:]
    private var pending: [UInt64: (host: SocketAddress, validated: Bool)] = [:]

    init(validation: AddressValidation, unvalidatedPerHost: Int, validatedPerHost: Int, maxConnections: Int) {
        self.validation = validation
        self.unvalidatedPerHost = unvalidatedPerHost
        self.validatedPerHost = validatedPerHost
        self.maxConnections = maxConnections
    }

    /// The gate an endpoint with `configuration` uses.
    init(_ configuration: EndpointConfiguration) {
        self.init(
            validation: configuration.addressValidation,
            unvalidatedPerHost: configuration.maxUnvalidatedHandshakesPerHost,
            validatedPerHost: configuration.maxPendingHandshakesPerHost, maxConnections: configuration.maxConnections
        )
    }

    /// The decision for a new client Initial from `source`, while the endpoint holds `connections` connections.
    func decide(from source: SocketAddress, proof: Proof, connections: Int) -> Decision {
        let counts = perHost[Self.host(source)] ?? (0, 0)
        switch proof {
        case .retryToken, .vouched:
            guard counts.validated < validatedPerHost, connections - unvalidatedCount < maxConnections else { return .refuse }
            return .accept(validated: true)
        case .none:
            let required: Bool
            switch validation {
            case .always: required = true
            case .underLoad(let pendingHandshakes): required = unvalidatedCount >= pendingHandshakes
            }
            if required || counts.unvalidated >= unvalidatedPerHost || connections >= maxConnections { return .retry }
            return .accept(validated: false)
        }
    }

    /// A server handshake started for connection `key`.
    mutating func started(_ key: UInt64, from source: SocketAddress, validated: Bool) {
        let host = Self.host(source)
        pending[key] = (host, validated)
        var counts = perHost[host] ?? (0, 0)
        if validated {
            counts.validated += 1
            validatedCount += 1
        } else {
            counts.unvalidated += 1
            unvalidatedCount += 1
        }
        perHost[host] = counts
    }

    /// Connection `key`'s handshake completed or the connection ended; nothing happens for a key not pending.
    mutating func ended(_ key: UInt64) {
        guard let entry = pending.removeValue(forKey: key), var counts = perHost[entry.host] else { return }
        if entry.validated {
            counts.validated -= 1
            validatedCount -= 1
        } else {
            counts.unvalidated -= 1
            unvalidatedCount -= 1
        }
        perHost[entry.host] = counts.validated == 0 && counts.unvalidated == 0 ? nil : counts
    }

    /// Whether connection `key` is a server handshake still in progress.
    func isPending(_ key: UInt64) -> Bool { pending[key] != nil }

    /// The per-host key: the IP address alone, since a spoofer picks ports freely.
    private static func host(_ address: SocketAddress) -> SocketAddress {
        var host = address
        host.port = 0
        return host
    }
}

/// Makes and checks Retry tokens: encrypted with a key derived from a random per-endpoint secret, bound to the
/// client's address and port and to the connection IDs, and valid for ``lifetime``.
///
/// The secret lives only in memory, so tokens die with the endpoint; nothing needs rotating.
final class RetryTokenKey {
    /// How long a token is accepted after it was issued: long enough for a retransmitted Initial on a lossy path,
    /// short enough that a token captured on the way is of little use.
    static let lifetime: Duration = .seconds(10)
    /// Room for a token (ngtcp2 0.12's `NGTCP2_CRYPTO_MAX_RETRY_TOKENLEN` is 78 bytes; that macro does not import).
    static let capacity = 128
    /// The first byte of every token ngtcp2 makes for a Retry (`NGTCP2_CRYPTO_TOKEN_MAGIC_RETRY`).
    static let magic: UInt8 = 0xb6

    private var secret = [UInt8](repeating: 0, count: 32)

    init() {
        _ = gnutls_rnd(GNUTLS_RND_RANDOM, &secret, secret.count)
    }

    /// A token for a Retry sent to `remote`, naming the connection IDs involved; nil if ngtcp2 failed.
    func make(version: UInt32, remote: SocketAddress, retrySCID: ngtcp2_cid, originalDCID: ngtcp2_cid, now: UInt64) -> [UInt8]? {
        var token = [UInt8](repeating: 0, count: Self.capacity)
        var retrySCID = retrySCID
        var originalDCID = originalDCID
        let length = remote.withSockAddr { address, addressLength in
            ngtcp2_crypto_generate_retry_token(
                &token, secret, secret.count, version, address, addressLength, &retrySCID, &originalDCID, now
            )
        }
        guard length > 0, length <= Self.capacity else { return nil }
        return Array(token.prefix(Int(length)))
    }

    /// The original destination connection ID inside `token`, when the token is ours, unexpired, issued to
    /// `remote`, and sent to connection ID `dcid`; nil otherwise.
    func verify(
        _ token: UnsafeBufferPointer<UInt8>, version: UInt32, remote: SocketAddress, dcid: ngtcp2_cid, now: UInt64
    ) -> ngtcp2_cid? {
        var originalDCID = ngtcp2_cid()
        var dcid = dcid
        let rv = remote.withSockAddr { address, addressLength in
            ngtcp2_crypto_verify_retry_token(
                &originalDCID, token.baseAddress, token.count, secret, secret.count, version, address, addressLength,
                &dcid, nanoseconds(Self.lifetime), now
            )
        }
        return rv == 0 ? originalDCID : nil
    }
}
