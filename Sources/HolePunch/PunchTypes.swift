public import HolePunchNet
public import HolePunchQUIC
public import HolePunchStrategy

/// When a punch starts probing.
public enum PunchTime: Sendable, Hashable {
    /// As soon as the punch is started.
    case now
    /// After a delay from the moment the punch is started (the rendezvous's clock-free start).
    case after(Duration)
    /// At an instant on the monotonic clock.
    case at(ContinuousClock.Instant)
}

/// Everything one punch needs: the seed's options plus the peer's identity.
public struct PunchOptions: Sendable {
    /// The peer's host: a numeric IPv4 or IPv6 address.
    public var targetHost: String
    /// The peer's candidate ports, in the order to try them (order is preserved).
    public var targetPorts: [UInt16]
    /// Every address of the peer that may be checked, typed and prioritised (issue 14). Empty means the one
    /// target above, as a server-reflexive candidate per port. Whoever fills it (the rendezvous client) has already
    /// applied `CandidateFilter`: the executor probes only what is here.
    public var candidates: [Candidate]
    /// The last port the peer's NAT is known to have allocated (the base for sequential prediction), when the peer
    /// published one; nil otherwise.
    public var remoteLastAllocatedPort: UInt16?
    /// The local port to punch from; nil means the executor's endpoint, whatever its port. When set, it must be
    /// the endpoint's port: a punch only works from the socket whose mapping was advertised.
    public var localPort: UInt16?
    /// The session id agreed through the rendezvous.
    public var sessionID: String
    /// The per-session key that authenticates probes (both peers hold the same key).
    public var sessionKey: [UInt8]
    /// When to start probing.
    public var punchTime: PunchTime
    /// Whether this side dials (initiator) or accepts (target).
    public var role: PunchRole
    /// What this side's NAT does.
    public var localNAT: NATProfile
    /// What the peer's NAT does.
    public var remoteNAT: NATProfile
    /// The peer's NodeID: the handshake must prove it.
    public var targetNodeID: NodeID
    /// A strategy for this punch only; nil uses the executor's.
    public var strategy: (any PunchStrategy)?
    /// The measured RTT to the peer, if known (e.g. from the rendezvous).
    public var rtt: Duration?
    /// An overall timeout that overrides the plan's, if set.
    public var timeout: Duration?
    /// The application protocol (TLS ALPN) the initiator dials with; nil uses the endpoint's
    /// `EndpointConfiguration.alpn`. The target accepts any protocol its endpoint lists.
    public var alpn: String?

    /// Creates options. NAT types default to unknown, the start to now.
    public init(
        targetHost: String,
        targetPorts: [UInt16],
        localPort: UInt16? = nil,
        sessionID: String,
        sessionKey: [UInt8],
        punchTime: PunchTime = .now,
        role: PunchRole,
        localNAT: NATProfile = NATProfile(legacy: .unknown),
        remoteNAT: NATProfile = NATProfile(legacy: .unknown),
        targetNodeID: NodeID,
        strategy: (any PunchStrategy)? = nil,
        rtt: Duration? = nil,
        timeout: Duration? = nil,
        alpn: String? = nil,
        candidates: [Candidate] = [],
        remoteLastAllocatedPort: UInt16? = nil
    ) {
        self.targetHost = targetHost
        self.targetPorts = targetPorts
        self.candidates = candidates
        self.remoteLastAllocatedPort = remoteLastAllocatedPort
        self.localPort = localPort
        self.sessionID = sessionID
        self.sessionKey = sessionKey
        self.punchTime = punchTime
        self.role = role
        self.localNAT = localNAT
        self.remoteNAT = remoteNAT
        self.targetNodeID = targetNodeID
        self.strategy = strategy
        self.rtt = rtt
        self.timeout = timeout
        self.alpn = alpn
    }
}

extension PunchFailureCode {
    /// The options were invalid (bad host, no ports, a local port that is not the endpoint's, empty session).
    public static let invalidOptions = PunchFailureCode(rawValue: "invalidOptions")
    /// The executor runs as many punches as it allows, in total or to this peer
    /// (``PunchExecutor/Configuration/maxConcurrentPunches``, ``PunchExecutor/Configuration/maxPunchesPerPeer``).
    public static let tooManyPunches = PunchFailureCode(rawValue: "tooManyPunches")
    /// This side refused the punch: the peer is not admitted, or none of its candidates may be probed.
    public static let refused = PunchFailureCode(rawValue: "refused")
}

/// Why a punch failed, with what it had tried.
public struct PunchError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The failure code: `timeout`, `unreachable`, `allPortsFailed`, `cancelled`, `peerAuthenticationFailed`,
    /// `invalidOptions`, `tooManyPunches` or `refused`.
    public var code: PunchFailureCode
    /// A human-readable explanation.
    public var message: String
    /// The remote ports probed, in the order first tried.
    public var portsTried: [UInt16]
    /// Probe rounds started.
    public var rounds: Int
    /// Time from the start instant to the failure.
    public var elapsed: Duration

    /// Creates an error.
    public init(code: PunchFailureCode, message: String, portsTried: [UInt16] = [], rounds: Int = 0, elapsed: Duration = .zero) {
        self.code = code
        self.message = message
        self.portsTried = portsTried
        self.rounds = rounds
        self.elapsed = elapsed
    }

    public var description: String {
        "\(code): \(message) (ports tried \(portsTried.count), rounds \(rounds), after \(elapsed.humanDescription))"
    }
}

/// Identifies one punch of an executor.
public struct PunchID: Hashable, Sendable, CustomStringConvertible, Comparable {
    /// The raw number, unique per executor.
    public let rawValue: UInt64
    /// Creates an id.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public var description: String { "punch-\(rawValue)" }
    public static func < (lhs: PunchID, rhs: PunchID) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// A snapshot of one punch in progress, for monitoring.
public struct PunchInfo: Sendable, Hashable {
    /// The punch's id.
    public var id: PunchID
    /// The peer's host.
    public var targetHost: String
    /// The peer's NodeID.
    public var targetNodeID: NodeID
    /// This side's role.
    public var role: PunchRole
    /// The session's phase: `scheduled`, `probing`, `connecting`, `succeeded` or `failed(code)`.
    public var phase: String
    /// Remote ports probed so far, in the order first tried.
    public var portsTried: [UInt16]
    /// The current probe round (0 before the start).
    public var round: Int
    /// When the punch was started.
    public var startedAt: ContinuousClock.Instant
    /// Time since it was started.
    public var elapsed: Duration
}

/// Progress of a punch, as a handle's ``PunchHandle/events`` reports it.
public enum PunchEvent: Sendable, Hashable {
    /// The strategy named here planned the punch (first event of every punch): the strategy asked, or
    /// `builtin-default` when it failed and the built-in plan answered.
    case planned(strategy: String)
    /// The strategy `strategy` failed with `reason` and the built-in plan is used instead (sent just before
    /// `.planned(strategy: "builtin-default")`): the script is broken and must be fixed.
    case strategyFellBack(strategy: String, reason: StrategyError)
    /// A probe round started.
    case roundStarted(round: Int, ports: Int)
    /// An authenticated probe or answer from the peer arrived: a path is open.
    case probeAnswered(from: SocketAddress)
    /// A QUIC handshake began.
    case connecting(to: SocketAddress)
    /// The punch ended: connected (with the path and time) or failed (with the code).
    case done(Result<PunchSuccess, PunchError>)
}

/// How a successful punch connected.
public struct PunchSuccess: Sendable, Hashable {
    /// The peer address the connection uses.
    public var remoteAddress: SocketAddress
    /// The local port the winning socket is bound to.
    public var localPort: UInt16
    /// Time from the start instant to the authenticated connection.
    public var timeToConnect: Duration
    /// Probe rounds started before it connected.
    public var rounds: Int
    /// The candidate pair that won, as the peer's side of it: the candidate's kind (`prflx` when the path's address
    /// was learned from a probe, not published), family and the address the connection uses.
    public var candidate: Candidate
}
