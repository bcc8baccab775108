internal import CGnuTLS

/// The key that MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256 are computed with.
public struct STUNCredential: Hashable, Sendable {
    /// The HMAC key bytes.
    public let key: [UInt8]

    /// Uses `key` as the HMAC key as is (punch sessions use a random per-session key).
    public init(key: [UInt8]) { self.key = key }

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

    /// HMAC-SHA1 (20 bytes).
    static func hmacSHA1(key: [UInt8], _ data: [UInt8]) throws(STUNError) -> [UInt8] {
        try hmac(GNUTLS_MAC_SHA1, size: 20, key: key, data)
    }

    /// HMAC-SHA256 (32 bytes).
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
