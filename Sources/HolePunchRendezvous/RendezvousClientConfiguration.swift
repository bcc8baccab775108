public import HolePunch
public import HolePunchSTUN
public import HolePunchNet
public import HolePunchQUIC
public import HolePunchStrategy

/// Who may make this peer punch: asked, with the requester's NodeID, for every target-role coordinate message
/// before a punch starts. A refused request starts nothing (no probe leaves), and the rendezvous is told the
/// outcome `refused`.
///
/// The decision runs on the client's message loop, so it should answer quickly (a lookup, not a network call).
public struct PunchAdmission: Sendable {
    private let decide: @Sendable (NodeID) async -> Bool

    /// An admission decided by `decide` (true admits).
    public init(_ decide: @escaping @Sendable (NodeID) async -> Bool) {
        self.decide = decide
    }

    /// Whether `peer` may make this side punch.
    public func admits(_ peer: NodeID) async -> Bool {
        await decide(peer)
    }

    /// Every registered peer may (the default: a public rendezvous's peers are strangers, but the punched
    /// connection still has to prove the NodeID the rendezvous named).
    public static let any = PunchAdmission { _ in true }
    /// No one may: this peer only punches out.
    public static let none = PunchAdmission { _ in false }
    /// Only these NodeIDs may.
    public static func allowList(_ nodes: Set<NodeID>) -> PunchAdmission {
        PunchAdmission { nodes.contains($0) }
    }
}

/// Settings for a ``RendezvousClient``.
public struct RendezvousClientConfiguration: Sendable {
    /// The rendezvous's QUIC address.
    public var server: SocketAddress
    /// The rendezvous's NodeID: the handshake must prove it.
    public var serverNodeID: NodeID
    /// How long to wait for the rendezvous to answer a register or punch request.
    public var requestTimeout: Duration
    /// The strategy for this client's punches; nil uses the executor's.
    public var strategy: (any PunchStrategy)?
    /// An overall limit on each punch; nil keeps the plan's.
    public var punchTimeout: Duration?
    /// Whether target-role coordinate messages start punches (true), or are only acknowledged and counted in
    /// ``RendezvousClient/targetCoordinates`` (false: load tests of the rendezvous itself).
    public var acceptsPunches = true
    /// Who may make this peer punch (target role); ``PunchAdmission/any`` by default.
    public var admission = PunchAdmission.any
    /// The application protocol (TLS ALPN) the rendezvous speaks, whatever protocols the punch endpoint serves.
    public var alpn = "holepunch/1"
    /// NAT discovery that ``RendezvousClient/connect(_:)`` starts once registered, in the background
    /// (``RendezvousClient/startNATDiscovery(server:configuration:)``), when the registration carries no NAT profile
    /// and a STUN server is known (``natDiscoveryServer``, else the rendezvous's); nil (the default) starts none.
    ///
    /// Registration never waits for it: discovery waits out its filtering tests (seconds behind a filtering NAT),
    /// while the rendezvous observes the mapped address on its own. Until it ends, punches plan with the profile
    /// the registration carried (unknown); afterwards the client registers again with the measured profile.
    public var backgroundNATDiscovery: NATDiscovery.Configuration?
    /// The STUN server background discovery measures against; nil uses the one the rendezvous advertises.
    public var natDiscoveryServer: SocketAddress?

    /// Creates a configuration.
    public init(
        server: SocketAddress, serverNodeID: NodeID, requestTimeout: Duration = .seconds(10),
        strategy: (any PunchStrategy)? = nil, punchTimeout: Duration? = nil
    ) {
        self.server = server
        self.serverNodeID = serverNodeID
        self.requestTimeout = requestTimeout
        self.strategy = strategy
        self.punchTimeout = punchTimeout
    }
}

/// A coordinate message as this peer received it, with the instants derived from its receipt.
public struct ReceivedCoordinate: Sendable {
    /// The message.
    public var coordinate: Coordinate
    /// When it was decoded here (monotonic clock).
    public var receivedAt: ContinuousClock.Instant
    /// When probing starts: ``receivedAt`` plus the coordinate's start delay.
    public var startAt: ContinuousClock.Instant { receivedAt.advanced(by: coordinate.startDelay) }
}

/// A punch the rendezvous asked this peer to accept (the target role), already started.
public struct IncomingPunch: Sendable {
    /// The coordinate message that started it.
    public var coordinate: ReceivedCoordinate
    /// The running punch: live events and the result.
    public var handle: PunchHandle
}
