public import HolePunchNet

/// An authenticated QUIC connection: a handle to state that lives on its endpoint's event loop.
///
/// Dropping the handle does not close the connection; call ``close(errorCode:reason:timeout:)``, or let the idle
/// timeout end it.
///
/// Ending a connection without losing its last bytes: finish each stream you wrote (``QUICStream/finish()``), then
/// ``close(errorCode:reason:timeout:)``, which waits until the peer has acknowledged all of it. ``abort(errorCode:reason:)``
/// closes at once and discards what is unacknowledged. Every wait here (``acceptStream()``, ``waitClosed()``, and the
/// stream's reads, writes and ``QUICStream/delivered()``) ends promptly when its task is cancelled, and any number of
/// tasks may wait at once.
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
    /// The application protocol (TLS ALPN) the connection speaks: what the client offered and the server accepted.
    public let alpn: String

    init(
        endpoint: Endpoint, key: UInt64, peerNodeID: NodeID, remoteAddress: SocketAddress, isClient: Bool,
        serverName: String?, alpn: String
    ) {
        self.alpn = alpn
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

    /// Waits for the next stream the peer opens; nil once the peer has closed the connection with application
    /// code 0 and every stream it opened was accepted.
    ///
    /// Concurrent callers each get a different stream.
    ///
    /// - Throws: ``QUICError``: the connection's error when it ended any other way (a peer's non-zero code, an idle
    ///   timeout, a local close), or `cancelled` when the calling task is cancelled.
    public func acceptStream() async throws -> QUICStream? {
        guard let id = try await endpoint.acceptStream(key) else { return nil }
        return QUICStream(connection: self, id: id)
    }

    /// Closes the connection gracefully, with an application error code (0 means no error) and a short reason.
    ///
    /// First waits until the peer has acknowledged every byte written on every stream, and the end of each stream
    /// that was finished; only then sends CONNECTION_CLOSE. Data the peer acknowledged stays readable there even
    /// after the close arrives, so a peer that writes, finishes and closes loses nothing. Meanwhile no new streams
    /// or writes are taken (they throw `closedLocally`); reads go on.
    ///
    /// The wait ends early when the connection ends or the calling task is cancelled (then it closes at once), and
    /// at the latest after `timeout`: by default 16 probe timeouts (PTO), at least 1 s and at most
    /// ``EndpointConfiguration/closeTimeout``. A stream that was never finished is waited for only up to what was
    /// written; its reader on the other side gets an error, not an end.
    ///
    /// - Returns: whether everything written was acknowledged before the connection ended (true when nothing was
    ///   written). False means the peer may have missed data: treat it like a failed write.
    @discardableResult
    public func close(errorCode: UInt64 = 0, reason: String = "", timeout: Duration? = nil) async -> Bool {
        await endpoint.closeConnection(key, code: errorCode, reason: reason, timeout: timeout)
    }

    /// Closes the connection at once: sends CONNECTION_CLOSE now and discards data the peer has not acknowledged,
    /// so its reads of unfinished streams fail. For aborts; ``close(errorCode:reason:timeout:)`` is the orderly way.
    public func abort(errorCode: UInt64 = 0, reason: String = "") async {
        await endpoint.abortConnection(key, code: errorCode, reason: reason)
    }

    /// Waits until the connection ends, and returns why.
    ///
    /// Any number of tasks may wait. A cancelled waiter returns at once with a `cancelled` error (the connection
    /// itself is unaffected).
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

    // MARK: Paths

    /// Adds a path to the peer: one more way the connection's datagrams could go. It carries nothing until it is
    /// validated (``validatePath(_:timeout:)``) and made active (``switchPath(to:)``).
    ///
    /// - Throws: ``QUICError`` `limitExceeded` when the connection has 8 paths already, `invalidArgument` for an
    ///   address of the other family, or the connection's error when it has ended.
    public func addPath(_ route: PathRoute) async throws {
        try await endpoint.addPath(key, route)
    }

    /// Proves that the peer receives on `route`: sends it authenticated challenges (again each probe timeout)
    /// until one is answered there. The peer then validates the path back, so it can follow a switch.
    ///
    /// - Throws: ``QUICError`` `pathValidationFailed` when no answer came within `timeout`, `invalidArgument` when
    ///   the path was not added, `cancelled`, or the connection's error.
    public func validatePath(_ route: PathRoute, timeout: Duration = .seconds(3)) async throws {
        try await endpoint.validatePath(key, route, timeout: timeout)
    }

    /// Moves the connection to a validated path: QUIC's datagrams leave on it from now on, with no change QUIC
    /// sees (its packets, streams and congestion state go on). The peer follows once it has validated the path
    /// too, when our first packet arrives there.
    ///
    /// - Throws: ``QUICError`` `invalidArgument` when the path is not validated, or the connection's error.
    public func switchPath(to route: PathRoute) async throws {
        try await endpoint.switchPath(key, to: route)
    }

    /// The connection's paths, the one it started on first; empty once it ended.
    public func paths() async -> [PathStatus] {
        await endpoint.pathStatuses(key)
    }

    /// The changes of the active path from now on, by either side; ends when the connection does. One subscriber:
    /// a new call ends the previous stream. It keeps the 16 newest changes its reader has not taken.
    public func pathChanges() async -> AsyncStream<PathChange> {
        await endpoint.pathChanges(key)
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

    /// Queues bytes for sending. Waits first while the stream's unacknowledged data fills its send buffer
    /// (``EndpointConfiguration/streamSendBuffer``), so a write that throws queued nothing.
    ///
    /// Returning means the bytes are queued, not that they arrived: see ``delivered()``.
    ///
    /// - Throws: ``QUICError`` when the stream was finished, reset or stopped by the peer, the connection closed or
    ///   is closing, or (`cancelled`) the calling task was cancelled while waiting.
    public func write(_ bytes: [UInt8]) async throws {
        try await connection.endpoint.write(connection.key, stream: id, bytes: bytes)
    }

    /// Ends the sending side (FIN) after the queued bytes. Returns at once; ``delivered()`` waits for the peer's
    /// acknowledgement, and ``QUICConnection/close(errorCode:reason:timeout:)`` waits for it too.
    public func finish() async throws {
        try await connection.endpoint.finish(connection.key, stream: id)
    }

    /// Waits until the peer has acknowledged every byte written so far and, once ``finish()`` was called, the end
    /// of the stream.
    ///
    /// An acknowledgement means the peer's QUIC stack holds the bytes: they stay readable there even if this side
    /// closes next. (Whether the peer's application has read them is for the application protocol to say.)
    ///
    /// - Throws: ``QUICError``: `streamReset` when the stream was reset or the peer stopped reading before
    ///   everything was acknowledged; the connection's error when it ended first; `cancelled` when the calling
    ///   task is cancelled.
    public func delivered() async throws {
        try await connection.endpoint.delivered(connection.key, stream: id)
    }

    /// Reads the next bytes as they arrive (at most `maxBytes`); nil only at the end of the stream: the peer
    /// finished it and every byte before the end has been returned.
    ///
    /// Any other end is an error, never nil: a reset, or the connection ending before the end of the stream
    /// (closed by the peer with any code, including 0; an idle timeout; a local close). Bytes that arrived before
    /// such an end are still returned first. Concurrent readers each get different bytes.
    ///
    /// - Throws: ``QUICError``: `streamReset` when the stream was reset; the connection's error (`connectionClosed`,
    ///   `idleTimeout`, `closedLocally`, `endpointClosed`, …) when it ended before the end of the stream;
    ///   `cancelled` when the calling task is cancelled.
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

    /// Abruptly ends both directions with an application error code (RESET_STREAM and STOP_SENDING). Later reads,
    /// writes and ``delivered()`` on this side throw `streamReset`.
    public func reset(errorCode: UInt64) async {
        await connection.endpoint.reset(connection.key, stream: id, code: errorCode)
    }
}
