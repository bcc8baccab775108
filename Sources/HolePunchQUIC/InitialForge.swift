package import HolePunchNet
internal import CNgtcp2
internal import CGnuTLS
internal import CHolePunchNetShims
#if canImport(Glibc)
import Glibc
#endif

/// Makes real client Initials that nobody will follow up: what a flood of spoofed handshakes looks like to a server.
///
/// Each datagram comes from a fresh client connection (its own connection IDs and TLS key share) that is thrown away
/// at once, so a receiver cannot tell it from a dial whose client went silent. For tests and `holepunch bench` of an
/// endpoint's address validation; it sends nothing itself.
package final class InitialForge {
    private let credentials: TLSCredentials
    private let alpn: String
    private let path: UnsafeMutablePointer<ngtcp2_path_storage>
    private let buffer: UnsafeMutableRawBufferPointer

    /// Creates a forge whose ClientHellos would present `identity` (they never get that far).
    ///
    /// - Throws: ``QUICError`` (`tls`) when the identity is unusable.
    package init(identity: Identity, alpn: String = "holepunch/1") throws {
        credentials = try TLSCredentials(identity: identity, presentCertificate: true)
        self.alpn = alpn
        path = .allocate(capacity: 1)
        ngtcp2_path_storage_zero(path)
        buffer = .allocate(byteCount: 2048, alignment: 16)
    }

    deinit {
        path.deallocate()
        buffer.deallocate()
    }

    /// One client Initial (a padded datagram of at least 1200 bytes) from `local` to `remote`, carrying `token`
    /// in its token field if given (as a client does after a Retry).
    ///
    /// - Throws: ``QUICError`` when ngtcp2 or GnuTLS refuse to build it.
    package func make(from local: SocketAddress, to remote: SocketAddress, token: [UInt8] = []) throws -> [UInt8] {
        let core = ConnectionCore(key: 0, isClient: true, route: .direct(remote), expectedNodeID: nil)
        defer { core.freeNative() }
        try core.makeSession(credentials: credentials, alpns: [alpn])
        // ngtcp2's defaults, not an endpoint's configuration: the forge has none, and a flood's Initials need not
        // match any particular endpoint's.
        var settings = ngtcp2_settings()
        ngtcp2_settings_default_versioned(NGTCP2_SETTINGS_VERSION, &settings)
        settings.initial_ts = hp_now_ns()
        var token = token
        var params = ngtcp2_transport_params()
        ngtcp2_transport_params_default_versioned(NGTCP2_TRANSPORT_PARAMS_VERSION, &params)
        var localStorage = sockaddr_storage()
        var remoteStorage = sockaddr_storage()
        let localLength = local.fill(&localStorage)
        let remoteLength = remote.fill(&remoteStorage)
        withUnsafePointer(to: &localStorage) { localPointer in
            withUnsafePointer(to: &remoteStorage) { remotePointer in
                localPointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { localAddress in
                    remotePointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { remoteAddress in
                        ngtcp2_path_storage_init(path, localAddress, localLength, remoteAddress, remoteLength, nil)
                    }
                }
            }
        }
        let (conn, _) = try token.withUnsafeMutableBufferPointer { tokenBytes in
            // ngtcp2 copies the token while it creates the connection.
            settings.token = ngtcp2_vec(base: tokenBytes.baseAddress, len: tokenBytes.count)
            return try Endpoint.openClientConnection(core, path: &path.pointee.path, settings: &settings, params: &params)
        }
        var consumed: ngtcp2_ssize = -1
        let written = ngtcp2_conn_writev_stream_versioned(
            conn, nil, NGTCP2_PKT_INFO_VERSION, nil, buffer.baseAddress!.assumingMemoryBound(to: UInt8.self),
            buffer.count, &consumed, UInt32(NGTCP2_WRITE_STREAM_FLAG_NONE), -1, nil, 0, hp_now_ns()
        )
        guard written > 0 else {
            throw QUICError(.handshakeFailed, "writing the Initial failed: \(String(cString: ngtcp2_strerror(Int32(written))))")
        }
        return Array(UnsafeRawBufferPointer(rebasing: buffer[0..<Int(written)]))
    }
}

/// A random connection ID of `length` bytes.
func randomConnectionID(length: Int) -> ngtcp2_cid {
    var bytes = [UInt8](repeating: 0, count: length)
    _ = gnutls_rnd(GNUTLS_RND_RANDOM, &bytes, length)
    var cid = ngtcp2_cid()
    bytes.withUnsafeBufferPointer { ngtcp2_cid_init(&cid, $0.baseAddress, length) }
    return cid
}
