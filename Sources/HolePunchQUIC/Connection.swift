public import HolePunchNet

/// An authenticated QUIC connection: a handle to state that lives on its endpoint's event loop.
///
/// Dropping the handle does not close the connection; call ``close(errorCode:reason:)``, or let the idle timeout
/// end it.
public final class QUICConnection: Sendable {
    /// The endpoint that owns the connection.
    public let endpoint: Endpoint
    let key: UInt64
    /// The peer's NodeID, verified during the handshake.
    public let peerNodeID: NodeID
    /// The peer's address as first seen.
    public let remoteAddress: SocketAddress
    /// Whether this side dialled (QUIC client) rather than accepted.
    public let isClient: Bool
    /// The TLS server name the client sent (on the accepting side, as received; only known to `.decide` policies).
    public let serverName: String?

    init(endpoint: Endpoint, key: UInt64, peerNodeID: NodeID, remoteAddress: SocketAddress, isClient: Bool, serverName: String?) {
        self.endpoint = endpoint
        self.key = key
        self.peerNodeID = peerNodeID
        self.remoteAddress = remoteAddress
        self.isClient = isClient
        self.serverName = serverName
    }

    /// Opens a bidirectional stream.
    ///
    /// - Throws: ``QUICError`` when the connection is closed or the peer's stream limit is reached.
    public func openStream() async throws -> QUICStream {
        let id = try await endpoint.openStream(key)
        return QUICStream(connection: self, id: id)
    }

    /// Waits for the next stream the peer opens; nil once the connection has closed cleanly.
    ///
    /// - Throws: ``QUICError`` when the connection ends with an error while waiting.
    public func acceptStream() async throws -> QUICStream? {
        guard let id = try await endpoint.acceptStream(key) else { return nil }
        return QUICStream(connection: self, id: id)
    }

    /// Closes the connection with an application error code (0 means no error) and a short reason.
    public func close(errorCode: UInt64 = 0, reason: String = "") async {
        await endpoint.closeConnection(key, code: errorCode, reason: reason)
    }

    /// Waits until the connection ends, and returns why.
    public func waitClosed() async -> QUICError {
        await endpoint.waitClosed(key)
    }

    /// Whether the connection is still open.
    public var isOpen: Bool {
        get async { await endpoint.isOpen(key) }
    }

    /// RTT, byte and packet counters; nil once closed.
    public func stats() async -> ConnectionStats? {
        await endpoint.connectionStats(key)
    }
}

/// A bidirectional QUIC stream, read and written as bytes.
public final class QUICStream: Sendable {
    /// The connection the stream belongs to.
    public let connection: QUICConnection
    /// The QUIC stream ID.
    public let id: Int64

    init(connection: QUICConnection, id: Int64) {
        self.connection = connection
        self.id = id
    }

    /// Queues bytes for sending. Waits while the stream's unacknowledged data exceeds its send buffer.
    ///
    /// - Throws: ``QUICError`` when the stream was finished or reset, or the connection closed.
    public func write(_ bytes: [UInt8]) async throws {
        try await connection.endpoint.write(connection.key, stream: id, bytes: bytes)
    }

    /// Ends the sending side (FIN) after the queued bytes.
    public func finish() async throws {
        try await connection.endpoint.finish(connection.key, stream: id)
    }

    /// Reads the next bytes as they arrive (at most `maxBytes`); nil at the end of the stream.
    ///
    /// - Throws: ``QUICError`` (`streamReset`) when the peer reset the stream, or the connection's error.
    public func read(maxBytes: Int = 65_536) async throws -> [UInt8]? {
        try await connection.endpoint.read(connection.key, stream: id, maxBytes: maxBytes)
    }

    /// Reads until the peer finishes the stream.
    ///
    /// - Throws: ``QUICError`` (`limitExceeded`) when more than `limit` bytes arrive, or a read error.
    public func readToEnd(limit: Int = 64 << 20) async throws -> [UInt8] {
        var all: [UInt8] = []
        while let chunk = try await read() {
            all.append(contentsOf: chunk)
            if all.count > limit {
                throw QUICError(.limitExceeded, "stream \(id) carried more than \(limit) bytes")
            }
        }
        return all
    }

    /// Abruptly ends both directions with an application error code (RESET_STREAM and STOP_SENDING).
    public func reset(errorCode: UInt64) async {
        await connection.endpoint.reset(connection.key, stream: id, code: errorCode)
    }
}
