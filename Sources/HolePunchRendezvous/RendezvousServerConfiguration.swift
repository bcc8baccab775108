import HolePunch
public import HolePunchSTUN
public import HolePunchNet
public import HolePunchQUIC

/// Settings for a ``RendezvousServer``.
public struct RendezvousServerConfiguration: Sendable {
    /// Where the QUIC endpoint listens (port 0 picks one).
    public var listen: SocketAddress
    /// The server's identity; its NodeID is what peers pin (`--rendezvous-id`).
    public var identity: Identity
    /// The STUN responder: nil runs none. Ports given as 0 are chosen by the kernel.
    public var stun: STUNResponderConfiguration?
    /// Registration, session and rate-limit rules.
    public var state: RendezvousState.Configuration
    /// What one peer connection may cost: message rate, queued replies, streams, pings and buffers.
    public var limits: RendezvousLimits
    /// How often registrations and sessions are checked for expiry.
    public var housekeepingInterval: Duration
    /// RTT samples taken right after a registration (one more per keep-alive).
    public var pingsPerRegistration: Int
    /// Test seam: a one-way delay added to the path to a peer, in both directions (the server's writes to it
    /// are held back, and its messages are handled late, by this much). Models a far peer on loopback.
    public var linkDelay: (@Sendable (NodeID) -> Duration)?
    /// Punch requests routed through the ``RendezvousDirectory`` and not answered yet, at most; further ones are
    /// refused with `capacity` (each holds a task until its answer or the directory's timeout).
    public var maxRoutedRequests = 1024
    /// TURN credentials minted for every registered peer; nil hands out none.
    public var turn: TURNMinting?

    /// Creates a configuration.
    public init(
        listen: SocketAddress,
        identity: Identity,
        stun: STUNResponderConfiguration? = nil,
        state: RendezvousState.Configuration = .init(),
        limits: RendezvousLimits = .init(),
        housekeepingInterval: Duration = .seconds(1),
        pingsPerRegistration: Int = 4,
        linkDelay: (@Sendable (NodeID) -> Duration)? = nil
    ) {
        self.listen = listen
        self.identity = identity
        self.stun = stun
        self.state = state
        self.limits = limits
        self.housekeepingInterval = housekeepingInterval
        self.pingsPerRegistration = pingsPerRegistration
        self.linkDelay = linkDelay
    }
}

/// What a ``RendezvousServer`` has done so far.
public struct RendezvousStatistics: Sendable, Hashable {
    /// Peers registered now.
    public var registrations = 0
    /// Sessions live now.
    public var sessions = 0
    /// Connections open now.
    public var connections = 0
    /// Sessions created since start.
    public var coordinations = 0
    /// Requests refused (unknown target, rate limit…) since start.
    public var refusals = 0
    /// The most recent measured start skews (newest last, at most 64).
    public var recentSkews: [Duration] = []
    /// STUN datagrams received and answered, if a responder runs.
    public var stunReceived = 0
    /// STUN replies sent.
    public var stunSent = 0
    /// Connections closed since start for sending faster than ``RendezvousLimits/messagesPerSecond``.
    public var closedForRate = 0
    /// Connections closed since start because their reply queue reached ``RendezvousLimits/maxQueuedFrames``.
    public var closedForBacklog = 0
    /// Connections closed since start for an undecodable message or an oversized frame.
    public var closedForProtocol = 0
    /// Streams after the control stream that were reset unread, since start.
    public var streamsRefused = 0
    /// Pings skipped since start because a connection had ``RendezvousLimits/maxPendingPings`` outstanding.
    public var pingsSkipped = 0
    /// RTT pings outstanding now, over all connections.
    public var pendingPings = 0
    /// Replies queued now, over all connections.
    public var queuedFrames = 0
    /// The longest any one connection's reply queue has been since start.
    public var largestQueue = 0
    /// Punch requests for peers held by other instances that were coordinated through the directory, since start.
    public var routedCoordinations = 0
    /// The most recent round trips of routed requests through the directory (newest last, at most 64).
    public var recentDirectoryRoundTrips: [Duration] = []
    /// The sum of every routed coordination's round trip through the directory, since start (over
    /// ``routedCoordinations``: the mean).
    public var directoryRoundTripTotal = Duration.zero
    /// Registrations dropped since start because another instance registered the same NodeID later.
    public var movedAway = 0
}
