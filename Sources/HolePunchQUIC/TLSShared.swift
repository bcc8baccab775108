import Synchronization
internal import CGnuTLS
// GnuTLS's enum and flag constants resolve through CNgtcp2 in release (WMO) builds; see Identity.swift.
internal import CNgtcp2

// The parts of a handshake's TLS setup that do not depend on the connection, built once and shared: an endpoint
// per punch socket made every extra socket parse its identity again, build its own GnuTLS credentials (which
// includes a sign-and-verify self-test of the key) and parse the priority string again for every session.

/// The TLS priorities of every session: TLS 1.3 only, no middlebox-compat mode, and X25519 first among the key
/// exchange groups.
///
/// X25519 first, with a client sending one key share (`GNUTLS_KEY_SHARE_TOP` in `TLSSessionSetup.clientFlags`),
/// makes a client generate one X25519 key instead of a P-256 and an X25519 key (GnuTLS's default order and its
/// default of two shares). The other groups stay listed in NORMAL's order, so a peer that prefers or only speaks
/// P-256 still completes, without a HelloRetryRequest when its own list includes X25519 (every GnuTLS NORMAL and
/// aioquic does).
enum TLSSessionSetup {
    static let priorityString = "NORMAL:-VERS-ALL:+VERS-TLS1.3:%DISABLE_TLS13_COMPAT_MODE:-GROUP-ALL:+GROUP-X25519"
        + ":+GROUP-SECP256R1:+GROUP-SECP384R1:+GROUP-SECP521R1:+GROUP-X448"
        + ":+GROUP-FFDHE2048:+GROUP-FFDHE3072:+GROUP-FFDHE4096:+GROUP-FFDHE6144:+GROUP-FFDHE8192"

    /// `gnutls_init` flags for a client session: one key share, for the first group (X25519).
    static var clientFlags: UInt32 { GNUTLS_CLIENT.rawValue | GNUTLS_KEY_SHARE_TOP.rawValue }

    /// Sets the shared priorities on a new session.
    static func applyPriority(to session: gnutls_session_t?) throws {
        guard let priority = ParsedPriority.shared.handle else {
            // Parsing failed once (it cannot for this constant string); say why on every session.
            try check(gnutls_priority_set_direct(session, priorityString, nil), .tls, "setting the TLS priority")
            return
        }
        try check(gnutls_priority_set(session, priority), .tls, "setting the TLS priority")
    }
}

/// The parsed `TLSSessionSetup.priorityString`, kept for the life of the process.
///
/// `@unchecked Sendable`: the handle is written once in `init` and only read afterwards; GnuTLS documents a
/// priority cache as usable by many sessions at once, on any thread, as long as it is not freed.
private final class ParsedPriority: @unchecked Sendable {
    static let shared = ParsedPriority()
    let handle: gnutls_priority_t?

    private init() {
        var priority: gnutls_priority_t?
        handle = gnutls_priority_init(&priority, TLSSessionSetup.priorityString, nil) == 0 ? priority : nil
    }
}

// `@unchecked Sendable`: `handle` is set in init and never changed; GnuTLS documents certificate credentials as
// shareable by any number of sessions on any threads once they are set up, which they are by the end of init.
extension TLSCredentials: @unchecked Sendable {}

/// The credentials built from one `Identity`, shared by every copy of it: all endpoints of a node (one per punch
/// socket) use one set instead of each parsing the identity again.
final class CredentialCache: Sendable {
    /// Built credentials, keyed by whether they present the certificate (false only in tests).
    private let built = Mutex<[Bool: TLSCredentials]>([:])

    /// The credentials for `identity`, built on first use. A failure is thrown and not remembered.
    func credentials(for identity: Identity, presentCertificate: Bool) throws -> TLSCredentials {
        try built.withLock { built in
            if let credentials = built[presentCertificate] { return credentials }
            let credentials = try TLSCredentials(identity: identity, presentCertificate: presentCertificate)
            built[presentCertificate] = credentials
            return credentials
        }
    }
}

extension Identity {
    /// GnuTLS credentials for this identity, built once and shared by every endpoint that uses it.
    func tlsCredentials(presentCertificate: Bool) throws -> TLSCredentials {
        try credentialCache.credentials(for: self, presentCertificate: presentCertificate)
    }
}
