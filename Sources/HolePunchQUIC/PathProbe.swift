internal import CGnuTLS

/// A path-layer challenge or response: the datagram that validates one path of a connection below QUIC.
///
/// Layout: marker `0x0e` (RFC 9443 leaves 4–15 unassigned, so it is told apart from STUN, DTLS and QUIC's fixed bit
/// before any lookup), kind (1 challenge, 2 response, 3 announcement: a challenge that also says "I moved here"), the receiver's connection ID (length byte, then the bytes),
/// an 8-byte challenge, and a 16-byte tag: HMAC-SHA256 over everything before it, keyed by a TLS exporter secret
/// of the connection. Only the two ends of the connection can make a valid probe, so an off-path sender cannot
/// make a connection record or move to an address; a response is no larger than its challenge (no amplification).
struct PathProbe: Equatable {
    static let marker: UInt8 = 0x0e
    static let tagLength = 16
    /// The TLS exporter label the key is derived with (RFC 8446 §7.5).
    static let exporterLabel = Array("EXPORTER-holepunch-path-probe".utf8)

    enum Kind: UInt8 {
        case challenge = 1, response = 2
        /// A challenge sent by a side that just made this path its active one: the peer answers it like any
        /// challenge, and follows once it has validated the path too. An explicit signal, because the switching
        /// side may have no QUIC packet to send for a while (all its data acknowledged), and a plain challenge may
        /// only be validating a path for later.
        case announcement = 3
    }

    var kind: Kind
    /// The connection ID the receiver routes by: one it issued.
    var connectionID: [UInt8]
    var challenge: UInt64

    /// The bytes without the tag, then with it.
    func encoded(key: [UInt8]) -> [UInt8] {
        var bytes: [UInt8] = [Self.marker, kind.rawValue, UInt8(connectionID.count)] + connectionID
        withUnsafeBytes(of: challenge.bigEndian) { bytes.append(contentsOf: $0) }
        bytes += Self.tag(bytes, key: key)
        return bytes
    }

    /// Reads the unauthenticated fields; the tag is checked with ``verify(_:key:)`` once the connection is known.
    static func parse(_ bytes: UnsafeRawBufferPointer) -> PathProbe? {
        guard bytes.count >= 3, bytes[0] == marker, let kind = Kind(rawValue: bytes[1]) else { return nil }
        let length = Int(bytes[2])
        guard length <= 20, bytes.count == 3 + length + 8 + tagLength else { return nil }
        let cid = Array(bytes[3..<(3 + length)])
        var challenge: UInt64 = 0
        for byte in bytes[(3 + length)..<(3 + length + 8)] { challenge = challenge << 8 | UInt64(byte) }
        return PathProbe(kind: kind, connectionID: cid, challenge: challenge)
    }

    /// Whether the datagram's tag is right for `key` (compared in constant time).
    static func verify(_ bytes: UnsafeRawBufferPointer, key: [UInt8]) -> Bool {
        guard bytes.count > tagLength else { return false }
        let expected = tag(Array(bytes[0..<(bytes.count - tagLength)]), key: key)
        var difference: UInt8 = 0
        for (index, byte) in expected.enumerated() { difference |= byte ^ bytes[bytes.count - tagLength + index] }
        return difference == 0
    }

    private static func tag(_ bytes: [UInt8], key: [UInt8]) -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        _ = gnutls_hmac_fast(GNUTLS_MAC_SHA256, key, key.count, bytes, bytes.count, &digest)
        return Array(digest.prefix(tagLength))
    }

    /// The probe key of a connection whose handshake completed: a TLS exporter secret, the same on both sides.
    static func key(session: OpaquePointer) -> [UInt8]? {
        var key = [UInt8](repeating: 0, count: 32)
        let rc = exporterLabel.withUnsafeBufferPointer { label in
            label.withMemoryRebound(to: CChar.self) { label in
                gnutls_prf_rfc5705(session, label.count, label.baseAddress, 0, nil, key.count, &key)
            }
        }
        return rc == 0 ? key : nil
    }
}
