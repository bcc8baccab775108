import Foundation
internal import CGnuTLS
// The GnuTLS enum constants (GNUTLS_X509_FMT_*) resolve through CNgtcp2 in release (WMO) builds, which also
// include gnutls.h; importing it here keeps both build modes compiling.
internal import CNgtcp2
internal import CHolePunchShims

/// A node's identity: the SHA-256 of its certificate's SubjectPublicKeyInfo.
///
/// Printed as 52 lowercase base32 characters (RFC 4648 alphabet, no padding): shorter than hex, and
/// case-insensitive when typed back in.
public struct NodeID: Hashable, Sendable, CustomStringConvertible, Codable, Comparable {
    /// The 32 digest bytes.
    public let bytes: [UInt8]

    /// Creates a NodeID from 32 digest bytes.
    ///
    /// - Throws: ``QUICError`` (`invalidArgument`) when `bytes` is not 32 bytes long.
    public init(bytes: [UInt8]) throws {
        guard bytes.count == 32 else {
            throw QUICError(.invalidArgument, "a NodeID is 32 bytes, got \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// Hashes a DER-encoded SubjectPublicKeyInfo into a NodeID.
    public init(subjectPublicKeyInfo spki: [UInt8]) {
        self.bytes = SHA256.hash(spki)
    }

    /// Parses the printable form: 52 base32 characters (case-insensitive), or 64 hex digits.
    ///
    /// - Throws: ``QUICError`` (`invalidArgument`) naming what is wrong with the text.
    public init(parsing text: String) throws {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        if trimmed.count == 64, let bytes = Hex.decode(trimmed) {
            self.bytes = bytes
            return
        }
        guard trimmed.count == 52 else {
            throw QUICError(
                .invalidArgument,
                "a NodeID is 52 base32 characters (or 64 hex digits), got \(trimmed.count) characters"
            )
        }
        guard let bytes = Base32.decode(trimmed.lowercased()), bytes.count == 32 else {
            throw QUICError(.invalidArgument, "'\(trimmed)' is not valid base32 (letters a-z and digits 2-7)")
        }
        self.bytes = bytes
    }

    /// The printable base32 form.
    public var description: String { Base32.encode(bytes) }

    /// The first 8 characters, for logs.
    public var short: String { String(description.prefix(8)) }

    public static func < (lhs: NodeID, rhs: NodeID) -> Bool {
        lhs.bytes.lexicographicallyPrecedes(rhs.bytes)
    }

    public init(from decoder: any Decoder) throws {
        try self.init(parsing: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// A key pair and a self-signed X.509 certificate: what a node presents in the mutual-TLS handshake.
///
/// The identity is kept as PEM text, so it is a plain `Sendable` value; GnuTLS objects are made from it only
/// where they are used, and freed there.
public struct Identity: Sendable {
    /// The PKCS#8 private key, PEM.
    public let privateKeyPEM: String
    /// The self-signed certificate, PEM.
    public let certificatePEM: String
    /// The NodeID this identity proves.
    public let nodeID: NodeID
    /// GnuTLS credentials made from this identity on first use, shared by its copies (see `TLSShared.swift`).
    let credentialCache = CredentialCache()

    /// Generates a fresh Ed25519 key and a self-signed certificate valid for ten years.
    ///
    /// Ed25519 signs and verifies handshakes several times faster than ECDSA P-256 (what identities were before),
    /// and a peer of either kind completes a handshake with the other. Files holding P-256 identities keep loading,
    /// with the same NodeID: the NodeID hashes the public key whatever its algorithm.
    ///
    /// - Parameter commonName: the certificate's subject CN; purely informational.
    public static func generate(commonName: String = "holepunch") throws -> Identity {
        var key: gnutls_x509_privkey_t?
        try check(gnutls_x509_privkey_init(&key), .identity, "allocating a private key")
        defer { gnutls_x509_privkey_deinit(key) }
        let bits = hp_gnutls_curve_to_bits(GNUTLS_ECC_CURVE_ED25519)
        try check(
            gnutls_x509_privkey_generate(key, GNUTLS_PK_EDDSA_ED25519, bits, 0), .identity, "generating an Ed25519 key"
        )

        var crt: gnutls_x509_crt_t?
        try check(gnutls_x509_crt_init(&crt), .identity, "allocating a certificate")
        defer { gnutls_x509_crt_deinit(crt) }
        try check(gnutls_x509_crt_set_version(crt, 3), .identity, "setting the certificate version")
        var serial = [UInt8](repeating: 0, count: 16)
        _ = gnutls_rnd(GNUTLS_RND_NONCE, &serial, serial.count)
        serial[0] &= 0x7f  // a positive INTEGER
        try check(gnutls_x509_crt_set_serial(crt, serial, serial.count), .identity, "setting the serial")
        let now = time(nil)
        try check(gnutls_x509_crt_set_activation_time(crt, now - 3600), .identity, "setting activation time")
        try check(
            gnutls_x509_crt_set_expiration_time(crt, now + 10 * 365 * 24 * 3600), .identity, "setting expiry"
        )
        let cn = Array(commonName.utf8)
        try check(
            gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, cn, UInt32(cn.count)),
            .identity, "setting the subject"
        )
        try check(gnutls_x509_crt_set_key(crt, key), .identity, "attaching the key")
        try check(
            gnutls_x509_crt_set_key_usage(crt, UInt32(GNUTLS_KEY_DIGITAL_SIGNATURE)), .identity, "setting key usage"
        )
        // Ed25519 fixes its own hash (SHA-512 inside the signature): GnuTLS refuses any digest but "unknown" or SHA-512.
        try check(gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_UNKNOWN, 0), .identity, "self-signing")

        var keyDatum = gnutls_datum_t()
        try check(
            gnutls_x509_privkey_export2_pkcs8(key, GNUTLS_X509_FMT_PEM, nil, UInt32(GNUTLS_PKCS_PLAIN.rawValue), &keyDatum),
            .identity, "exporting the key"
        )
        let keyPEM = takeString(keyDatum)
        var crtDatum = gnutls_datum_t()
        try check(gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &crtDatum), .identity, "exporting the certificate")
        let crtPEM = takeString(crtDatum)
        return try Identity(privateKeyPEM: keyPEM, certificatePEM: crtPEM)
    }

    /// Builds an identity from PEM text, checking that the key and the certificate belong together.
    ///
    /// - Throws: ``QUICError`` (`identity`) when either part is missing or corrupt, or they do not match.
    public init(privateKeyPEM: String, certificatePEM: String) throws {
        let certificateKeyID = try Identity.withCertificate(pem: certificatePEM) { crt in
            try Identity.keyID { gnutls_x509_crt_get_key_id(crt, 0, $0, $1) }
        }
        let keyKeyID = try Identity.withPrivateKey(pem: privateKeyPEM) { key in
            try Identity.keyID { gnutls_x509_privkey_get_key_id(key, 0, $0, $1) }
        }
        guard certificateKeyID == keyKeyID else {
            throw QUICError(.identity, "the private key does not belong to the certificate")
        }
        self.privateKeyPEM = privateKeyPEM
        self.certificatePEM = certificatePEM
        self.nodeID = try Identity.withCertificate(pem: certificatePEM) { try Identity.nodeID(of: $0) }
    }

    /// Loads an identity from a PEM file holding the private key and the certificate.
    ///
    /// - Parameters:
    ///   - path: the PEM file, as `save(to:)` writes it.
    ///   - warning: told (once, before parsing) when the file can be read by users other than its owner:
    ///     the private key is the node's identity, so anyone who can read it can impersonate the node. Loading goes
    ///     on; the caller decides how loudly to say it (the CLI prints a `warning:` line).
    /// - Throws: ``QUICError`` (`identity`) naming the path for a missing, unreadable or corrupt file.
    public static func load(from path: String, warning: (String) -> Void = { _ in }) throws -> Identity {
        if let problem = permissionProblem(ofFile: path) { warning(problem) }
        guard FileManager.default.fileExists(atPath: path) else {
            throw QUICError(.identity, "identity file '\(path)' does not exist (create one with `holepunch identity create \(path)`)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QUICError(.identity, "identity file '\(path)' is not readable")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw QUICError(.identity, "identity file '\(path)' is not PEM text")
        }
        let key = pemBlock(in: text, kinds: ["PRIVATE KEY", "EC PRIVATE KEY"])
        let certificate = pemBlock(in: text, kinds: ["CERTIFICATE"])
        guard let key else { throw QUICError(.identity, "identity file '\(path)' has no PRIVATE KEY block") }
        guard let certificate else { throw QUICError(.identity, "identity file '\(path)' has no CERTIFICATE block") }
        do {
            return try Identity(privateKeyPEM: key, certificatePEM: certificate)
        } catch var error as QUICError {
            error.message = "identity file '\(path)': \(error.message)"
            throw error
        }
    }

    /// Writes the key and certificate to a PEM file readable only by its owner (mode 0600).
    ///
    /// The file is born private: the bytes go to a new temporary file in the same directory, created with mode 0600
    /// (`mkstemp`), flushed to disk, then renamed over `path` in one step. There is no moment at which the key sits
    /// in a file that others may read (creating with default permissions and tightening them afterwards leaves such a
    /// window, and umask 0 would make it world-readable), and a reader never sees a half-written file. An existing
    /// file or symbolic link at `path` is replaced, not written through.
    ///
    /// - Throws: ``QUICError`` (`identity`) when the file cannot be written.
    public func save(to path: String) throws {
        let text = privateKeyPEM + (privateKeyPEM.hasSuffix("\n") ? "" : "\n") + certificatePEM
        func failure(_ step: String) -> QUICError {
            QUICError(.identity, "cannot write identity file '\(path)': \(step): \(String(cString: strerror(errno)))")
        }
        let url = URL(fileURLWithPath: path)
        let directory = url.deletingLastPathComponent().path
        var template = Array("\(directory)/.\(url.lastPathComponent).XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw failure("creating a temporary file in '\(directory)'") }
        let temporary = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var renamed = false
        defer { if !renamed { unlink(temporary) } }
        // mkstemp already gives 0600; fchmod makes it independent of the C library's choice and of the umask.
        guard fchmod(fd, 0o600) == 0 else {
            close(fd)
            throw failure("setting mode 0600")
        }
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, bytes.count - written) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                close(fd)
                throw failure("writing")
            }
            written += n
        }
        guard fsync(fd) == 0 else {
            close(fd)
            throw failure("flushing")
        }
        close(fd)
        guard rename(temporary, path) == 0 else { throw failure("renaming the temporary file into place") }
        renamed = true
    }

    /// Why the identity file at `path` is not private, or nil when only its owner can read it (or it cannot be
    /// inspected; loading then reports the real problem).
    public static func permissionProblem(ofFile path: String) -> String? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        let mode = info.st_mode & 0o777
        guard mode & 0o077 != 0 else { return nil }
        return "identity file '\(path)' is readable by others (mode \(String(mode, radix: 8))): its private key lets anyone "
            + "who can read it act as this node; run `chmod 600 \(path)`"
    }

    /// The certificate as DER bytes.
    public var certificateDER: [UInt8] {
        (try? Identity.withCertificate(pem: certificatePEM) { crt -> [UInt8] in
            var datum = gnutls_datum_t()
            guard gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_DER, &datum) == 0 else { return [] }
            return takeBytes(datum)
        }) ?? []
    }

    /// The key's algorithm as GnuTLS names it: "EdDSA (Ed25519)" for identities made now, "EC/ECDSA" for P-256
    /// identities made before; for diagnostics and tests.
    var keyAlgorithmName: String {
        (try? Identity.withCertificate(pem: certificatePEM) { crt -> String in
            let algorithm = gnutls_pk_algorithm_t(rawValue: UInt32(clamping: gnutls_x509_crt_get_pk_algorithm(crt, nil)))
            return gnutls_pk_get_name(algorithm).map { String(cString: $0) } ?? "unknown"
        }) ?? "unknown"
    }

    // MARK: Helpers shared with the TLS layer

    /// Computes the NodeID of a parsed certificate.
    static func nodeID(of crt: gnutls_x509_crt_t?) throws -> NodeID {
        var pubkey: gnutls_pubkey_t?
        try check(gnutls_pubkey_init(&pubkey), .identity, "allocating a public key")
        defer { gnutls_pubkey_deinit(pubkey) }
        try check(gnutls_pubkey_import_x509(pubkey, crt, 0), .identity, "reading the certificate's public key")
        var datum = gnutls_datum_t()
        try check(gnutls_pubkey_export2(pubkey, GNUTLS_X509_FMT_DER, &datum), .identity, "exporting the public key")
        return NodeID(subjectPublicKeyInfo: takeBytes(datum))
    }

    /// Computes the NodeID of a DER certificate as received in a handshake.
    static func nodeID(ofDER der: UnsafeBufferPointer<UInt8>) throws -> NodeID {
        var crt: gnutls_x509_crt_t?
        try check(gnutls_x509_crt_init(&crt), .identity, "allocating a certificate")
        defer { gnutls_x509_crt_deinit(crt) }
        var datum = gnutls_datum_t(data: UnsafeMutablePointer(mutating: der.baseAddress), size: UInt32(der.count))
        try check(gnutls_x509_crt_import(crt, &datum, GNUTLS_X509_FMT_DER), .peerAuthenticationFailed, "parsing the peer certificate")
        return try nodeID(of: crt)
    }

    private static func withCertificate<R>(pem: String, _ body: (gnutls_x509_crt_t?) throws -> R) throws -> R {
        var crt: gnutls_x509_crt_t?
        try check(gnutls_x509_crt_init(&crt), .identity, "allocating a certificate")
        defer { gnutls_x509_crt_deinit(crt) }
        var bytes = Array(pem.utf8)
        try bytes.withUnsafeMutableBufferPointer { buffer in
            var datum = gnutls_datum_t(data: buffer.baseAddress, size: UInt32(buffer.count))
            try check(gnutls_x509_crt_import(crt, &datum, GNUTLS_X509_FMT_PEM), .identity, "the certificate is corrupt")
        }
        return try body(crt)
    }

    private static func withPrivateKey<R>(pem: String, _ body: (gnutls_x509_privkey_t?) throws -> R) throws -> R {
        var key: gnutls_x509_privkey_t?
        try check(gnutls_x509_privkey_init(&key), .identity, "allocating a private key")
        defer { gnutls_x509_privkey_deinit(key) }
        var bytes = Array(pem.utf8)
        try bytes.withUnsafeMutableBufferPointer { buffer in
            var datum = gnutls_datum_t(data: buffer.baseAddress, size: UInt32(buffer.count))
            try check(
                gnutls_x509_privkey_import2(key, &datum, GNUTLS_X509_FMT_PEM, nil, UInt32(GNUTLS_PKCS_PLAIN.rawValue)),
                .identity, "the private key is corrupt"
            )
        }
        return try body(key)
    }

    private static func keyID(_ get: (UnsafeMutablePointer<UInt8>, UnsafeMutablePointer<Int>) -> Int32) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 64)
        var size = buffer.count
        try check(get(&buffer, &size), .identity, "computing a key id")
        return Array(buffer.prefix(size))
    }

    private static func pemBlock(in text: String, kinds: [String]) -> String? {
        for kind in kinds {
            let begin = "-----BEGIN \(kind)-----"
            let end = "-----END \(kind)-----"
            if let start = text.range(of: begin), let stop = text.range(of: end, range: start.upperBound..<text.endIndex) {
                return String(text[start.lowerBound..<stop.upperBound]) + "\n"
            }
        }
        return nil
    }
}

/// Throws a ``QUICError`` when a GnuTLS call returned a negative code.
func check(_ rc: Int32, _ code: QUICError.Code, _ what: String) throws {
    if rc < 0 {
        throw QUICError(code, "\(what): \(String(cString: gnutls_strerror(rc)))")
    }
}

/// Copies a GnuTLS-allocated datum into Swift bytes and frees it.
func takeBytes(_ datum: gnutls_datum_t) -> [UInt8] {
    defer { hp_gnutls_free(datum.data) }
    guard let data = datum.data else { return [] }
    return Array(UnsafeBufferPointer(start: data, count: Int(datum.size)))
}

private func takeString(_ datum: gnutls_datum_t) -> String {
    String(decoding: takeBytes(datum), as: UTF8.self)
}

/// SHA-256 through GnuTLS, which is linked anyway.
enum SHA256 {
    static func hash(_ bytes: [UInt8]) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        _ = bytes.withUnsafeBytes { gnutls_hash_fast(GNUTLS_DIG_SHA256, $0.baseAddress, $0.count, &digest) }
        return digest
    }

    static func hash(_ buffer: UnsafeRawBufferPointer) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        _ = gnutls_hash_fast(GNUTLS_DIG_SHA256, buffer.baseAddress, buffer.count, &digest)
        return digest
    }
}

/// RFC 4648 base32, lowercase, without padding.
enum Base32 {
    private static let alphabet = Array("abcdefghijklmnopqrstuvwxyz234567".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        var buffer: UInt32 = 0
        var bits = 0
        for byte in bytes {
            buffer = (buffer << 8) | UInt32(byte)
            bits += 8
            while bits >= 5 {
                out.append(alphabet[Int((buffer >> UInt32(bits - 5)) & 31)])
                bits -= 5
            }
        }
        if bits > 0 {
            out.append(alphabet[Int((buffer << UInt32(5 - bits)) & 31)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        var out = [UInt8]()
        var buffer: UInt32 = 0
        var bits = 0
        for char in text.utf8 {
            let value: UInt32
            switch char {
            case UInt8(ascii: "a")...UInt8(ascii: "z"): value = UInt32(char - UInt8(ascii: "a"))
            case UInt8(ascii: "2")...UInt8(ascii: "7"): value = UInt32(char - UInt8(ascii: "2") + 26)
            default: return nil
            }
            buffer = (buffer << 5) | value
            bits += 5
            if bits >= 8 {
                out.append(UInt8((buffer >> UInt32(bits - 8)) & 0xff))
                bits -= 8
            }
        }
        // Leftover bits must be zero padding, or the text has a non-canonical tail.
        if bits > 0 && (buffer & ((1 << UInt32(bits)) - 1)) != 0 { return nil }
        return out
    }
}

/// Lowercase hex.
enum Hex {
    static func encode(_ bytes: [UInt8]) -> String {
        bytes.map { String(format: "%02x", $0) }.joined()
    }

    static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    private static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
