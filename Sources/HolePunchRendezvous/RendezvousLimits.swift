/// What one peer connection may cost the rendezvous: messages, queued replies, streams, pings and buffers.
///
/// Every peer is authenticated, but a NodeID costs nothing to make, so each bound holds per connection: a
/// client that exceeds one is closed with a typed reason (``RendezvousCloseCode``) rather than served, and the
/// memory it can pin stays below roughly `connectionReceiveWindow + streamSendBuffer + maxQueuedFrames × 16 KiB`.
/// The defaults leave an honest peer (a keep-alive every ten seconds, a few punches a second, the acks of the
/// punches others ask for) far below every limit.
public struct RendezvousLimits: Sendable, Hashable {
    /// Messages of any kind a connection may send at once (token bucket size)…
    public var messageBurst: Double
    /// …regained at this many per second. A connection that runs out is closed with `rateLimited`.
    public var messagesPerSecond: Double
    /// Replies queued for one connection and not yet handed to QUIC; a peer that stops reading reaches it and
    /// is closed with `backlog` instead of growing the queue.
    public var maxQueuedFrames: Int
    /// RTT pings outstanding per connection; further pings are skipped (the estimate keeps its last samples).
    public var maxPendingPings: Int
    /// A ping unanswered (or still unsent) this long after it was queued is forgotten.
    public var pingTimeout: Duration
    /// Bidirectional streams a peer may have open (the QUIC `initial_max_streams_bidi` the server grants). The
    /// protocol uses one; streams beyond the first that a larger value lets through are reset unread.
    public var streamsPerConnection: Int
    /// Per-stream receive window, bytes: what a peer can have in flight before the server reads it.
    public var streamReceiveWindow: Int
    /// Per-connection receive window, bytes.
    public var connectionReceiveWindow: Int
    /// Bytes written to a peer and not yet acknowledged before the server's writer waits (and its queue fills).
    public var streamSendBuffer: Int
    /// Connections (in any state) the server's endpoint holds at most.
    public var maxConnections: Int

    /// Creates limits; the defaults suit a public rendezvous.
    public init(
        messageBurst: Double = 200,
        messagesPerSecond: Double = 50,
        maxQueuedFrames: Int = 256,
        maxPendingPings: Int = 4,
        pingTimeout: Duration = .seconds(10),
        streamsPerConnection: Int = 1,
        streamReceiveWindow: Int = 64 << 10,
        connectionReceiveWindow: Int = 128 << 10,
        streamSendBuffer: Int = 64 << 10,
        maxConnections: Int = 65_536
    ) {
        self.messageBurst = messageBurst
        self.messagesPerSecond = messagesPerSecond
        self.maxQueuedFrames = maxQueuedFrames
        self.maxPendingPings = maxPendingPings
        self.pingTimeout = pingTimeout
        self.streamsPerConnection = streamsPerConnection
        self.streamReceiveWindow = streamReceiveWindow
        self.connectionReceiveWindow = connectionReceiveWindow
        self.streamSendBuffer = streamSendBuffer
        self.maxConnections = maxConnections
    }
}

/// The QUIC application error codes the rendezvous closes a peer connection with; the close reason starts with
/// the matching ``RendezvousError/Code`` name.
public enum RendezvousCloseCode {
    /// The server is shutting down.
    public static let shuttingDown: UInt64 = 1
    /// The registration expired, or a newer connection of the same NodeID replaced this one.
    public static let replaced: UInt64 = 2
    /// The connection sent messages faster than ``RendezvousLimits/messagesPerSecond``.
    public static let rateLimited: UInt64 = 3
    /// The peer stopped reading: its queue of replies reached ``RendezvousLimits/maxQueuedFrames``.
    public static let backlog: UInt64 = 4
    /// An undecodable message or an oversized frame.
    public static let protocolViolation: UInt64 = 5
    /// The application error code of a stream the server refuses (any stream after the control stream).
    public static let streamRefused: UInt64 = 6
}

/// A token bucket: `burst` tokens at once, refilled at `perSecond`. Time is the driver's `Duration` since its origin.
package struct TokenBucket: Sendable, Hashable {
    private let burst: Double
    private let perSecond: Double
    private var tokens: Double
    private var refilled: Duration

    /// A full bucket at `now`.
    package init(burst: Double, perSecond: Double, now: Duration) {
        self.burst = burst
        self.perSecond = perSecond
        self.tokens = burst
        self.refilled = now
    }

    /// Refills for the time since the last call and takes one token; false (and nothing taken) when empty.
    package mutating func take(now: Duration) -> Bool {
        let elapsed = Double((now - refilled) / .microseconds(1)) / 1_000_000
        tokens = min(burst, tokens + max(0, elapsed) * perSecond)
        refilled = max(refilled, now)
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}
