internal import CGnuTLS
import Synchronization

/// The key that MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256 are computed with.
///
/// A credential keeps its HMAC states keyed once: a punch signs and checks every probe with one
/// credential, and keying HMAC-SHA256 afresh for each (`gnutls_hmac_fast`) cost as much as the MAC itself. Two
/// credentials are equal when their keys are.
public struct STUNCredential: Hashable, Sendable {
    /// The HMAC key bytes.
    public let key: [UInt8]
    /// HMAC states keyed with ``key``, made on first use and shared by copies of this credential.
    let keyed: STUNKeyedHMAC

    /// Uses `key` as the HMAC key as is (punch sessions use a random per-session key).
    public init(key: [UInt8]) {
        self.key = key
        self.keyed = STUNKeyedHMAC(key: key)
    }

    /// Whether two credentials have the same key.
    public static func == (lhs: STUNCredential, rhs: STUNCredential) -> Bool { lhs.key == rhs.key }

    /// Hashes the key.
    public func hash(into hasher: inout Hasher) { hasher.combine(key) }

    /// A short-term credential: the key is the password's UTF-8 bytes (RFC 8489 §9.1.1).
    ///
    /// The password is not run through OpaqueString; callers with non-ASCII passwords must prepare them.
    public static func shortTerm(password: String) -> STUNCredential {
        STUNCredential(key: Array(password.utf8))
    }

    /// A long-term credential: the key is MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
    public static func longTerm(username: String, realm: String, password: String) throws(STUNError) -> STUNCredential {
        STUNCredential(key: try STUNCrypto.md5(Array("\(username):\(realm):\(password)".utf8)))
    }
}

/// Hashes and checksums: CRC-32 in Swift, HMAC and MD5 through GnuTLS.
enum STUNCrypto {
    /// The CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) table, built once.
    static let crcTable: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = (c & 1) != 0 ? (0xEDB8_8320 ^ (c >> 1)) : (c >> 1) }
        return c
    }

    /// CRC-32 of `bytes[range]`, as used by FINGERPRINT before the XOR.
    static func crc32(_ bytes: [UInt8], _ range: Range<Int>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for i in range {
            crc = crcTable[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8)
        }
        return crc ^ 0xFFFF_FFFF
    }

    /// HMAC-SHA1 (20 bytes) under `credential`, with its keyed state.
    static func hmacSHA1(_ credential: STUNCredential, _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try credential.keyed.mac(GNUTLS_MAC_SHA1, size: 20, data)
    }

    /// HMAC-SHA256 (32 bytes) under `credential`, with its keyed state.
    static func hmacSHA256(_ credential: STUNCredential, _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try credential.keyed.mac(GNUTLS_MAC_SHA256, size: 32, data)
    }

    /// HMAC-SHA1 (20 bytes), keyed for this one call.
    static func hmacSHA1(key: [UInt8], _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try hmac(GNUTLS_MAC_SHA1, size: 20, key: key, data)
    }

    /// HMAC-SHA256 (32 bytes), keyed for this one call.
    static func hmacSHA256(key: [UInt8], _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try hmac(GNUTLS_MAC_SHA256, size: 32, key: key, data)
    }

    private static func hmac(_ algorithm: gnutls_mac_algorithm_t, size: Int, key: [UInt8], _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: size)
        // GnuTLS wants non-null pointers even for empty input, hence the one-byte stand-ins.
        let keyBytes = key.isEmpty ? [0] : key
        let dataBytes = data.isEmpty ? [0] : data
        let rc = keyBytes.withUnsafeBytes { k in
            dataBytes.withUnsafeBytes { d in
                digest.withUnsafeMutableBytes { out in
                    gnutls_hmac_fast(algorithm, k.baseAddress, key.count, d.baseAddress, data.count, out.baseAddress)
                }
            }
        }
        guard rc == 0 else { throw STUNError(.crypto, "gnutls_hmac_fast failed with \(rc)") }
        return digest
    }

    /// MD5 (16 bytes), only for long-term credential keys.
    static func md5(_ data: [UInt8]) throws(STUNError) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 16)
        let dataBytes = data.isEmpty ? [0] : data
        let rc = dataBytes.withUnsafeBytes { d in
            digest.withUnsafeMutableBytes { out in
                gnutls_hash_fast(GNUTLS_DIG_MD5, d.baseAddress, data.count, out.baseAddress)
            }
        }
        guard rc == 0 else { throw STUNError(.crypto, "gnutls_hash_fast(MD5) failed with \(rc)") }
        return digest
    }

    /// Compares without an early exit, so that timing does not reveal how many bytes matched.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in a.indices { diff |= a[i] ^ b[i] }
        return diff == 0
    }
}

/// HMAC states keyed once with one key, one per algorithm, made on first use.
///
/// `gnutls_hmac_output` hands out the MAC and resets the state to just after keying, so each MAC costs the
/// message's blocks and the outer hash only, not the two key blocks again. A state is used by one caller at a time
/// (the lock); it is freed with the credential.
final class STUNKeyedHMAC: Sendable {
    private let key: [UInt8]
    /// By `gnutls_mac_algorithm_t` raw value. `gnutls_hmac_hd_t` is a plain pointer, used only under the lock.
    private let states = Mutex<[UInt32: OpaquePointer]>([:])

    init(key: [UInt8]) { self.key = key }

    deinit {
        states.withLock { states in
            for state in states.values { gnutls_hmac_deinit(state, nil) }
        }
    }

    /// The HMAC of `data` with `algorithm`, whose output is `size` bytes.
    func mac(_ algorithm: gnutls_mac_algorithm_t, size: Int, _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try states.withLock { (states) throws(STUNError) -> [UInt8] in
            let state: OpaquePointer
            if let existing = states[algorithm.rawValue] {
                state = existing
            } else {
                var made: gnutls_hmac_hd_t?
                // GnuTLS wants a non-null key pointer even for an empty key, hence the one-byte stand-in.
                let keyBytes = key.isEmpty ? [0] : key
                let rc = keyBytes.withUnsafeBytes { gnutls_hmac_init(&made, algorithm, $0.baseAddress, key.count) }
                guard rc == 0, let made else { throw STUNError(.crypto, "gnutls_hmac_init failed with \(rc)") }
                states[algorithm.rawValue] = made
                state = made
            }
            var digest = [UInt8](repeating: 0, count: size)
            let input = data.isEmpty ? [0] : data
            let rc = input.withUnsafeBytes { gnutls_hmac(state, $0.baseAddress, data.count) }
            guard rc == 0 else {
                // The state may hold part of the message now: drop it, the next call keys a fresh one.
                gnutls_hmac_deinit(state, nil)
                states[algorithm.rawValue] = nil
                throw STUNError(.crypto, "gnutls_hmac failed with \(rc)")
            }
            digest.withUnsafeMutableBytes { gnutls_hmac_output(state, $0.baseAddress) }
            return digest
        }
    }
}
