public import HolePunchNet

/// What history says about earlier punches, for one NAT pair or one peer.
public struct HistorySummary: Sendable, Hashable, Codable {
    /// Punches recorded.
    public var attempts: Int
    /// Punches that connected.
    public var successes: Int
    /// Median time to connect over the recorded successes; nil without successes.
    public var medianTimeToConnect: Duration?
    /// Port offset (winning port − first candidate port) of the most recent success; nil without one.
    public var lastWinningOffset: Int?

    /// Creates a summary.
    public init(attempts: Int = 0, successes: Int = 0, medianTimeToConnect: Duration? = nil,
                lastWinningOffset: Int? = nil) {
        self.attempts = attempts
        self.successes = successes
        self.medianTimeToConnect = medianTimeToConnect
        self.lastWinningOffset = lastWinningOffset
    }

    /// Successes over attempts in 0...1; 0 when nothing is recorded.
    public var successRate: Double { attempts > 0 ? Double(successes) / Double(attempts) : 0 }

    /// Nothing recorded.
    public static let empty = HistorySummary()
}

/// Everything a strategy may look at when it plans one punch attempt. Pure data: no sockets, no clocks.
public struct PunchContext: Sendable, Hashable, Codable {
    /// Our NAT's measured behaviour.
    public var localNAT: NATProfile
    /// The peer's NAT's measured behaviour.
    public var remoteNAT: NATProfile
    /// The peer's candidate addresses (host strings: reflexive first, then LAN addresses): Lua's `ctx.hosts`.
    public var candidateHosts: [String]
    /// The peer's typed candidates the executor can check (of a family our endpoint reaches, not relayed), highest
    /// priority first: Lua's `ctx.candidates`. ``PunchPlan/candidateOrder`` and ``PunchPlan/maxCandidates`` index
    /// into it. When the peer published none, the executor lists its one host as a server-reflexive candidate per
    /// port (and probes exactly as before typed candidates existed).
    public var candidates: [Candidate]
    /// The last port the peer's NAT is known to have allocated, when the peer published it: the base for sequential
    /// prediction (NAT discovery after registration may have moved the NAT's counter past the registration's port).
    public var lastAllocatedPort: UInt16?
    /// The peer's advertised ports, in the order the rendezvous gave them; the first is its reflexive port.
    public var candidatePorts: [UInt16]
    /// Our punch socket's local port, when known.
    public var localPort: UInt16?
    /// Measured round-trip time to the peer via the rendezvous; nil when not measured.
    public var rtt: Duration?
    /// Attempt number for this peer in this punch series, starting at 1.
    public var attempt: Int
    /// History for this NAT pair (all peers).
    public var pairHistory: HistorySummary
    /// History for this peer.
    public var peerHistory: HistorySummary
    /// Our role in this punch.
    public var role: PunchRole
    /// Seed for every random choice a strategy makes, so a plan is a pure function of the context.
    public var seed: UInt64
    /// The peer's identifier (e.g. its NodeID), for history and logs; may be empty.
    public var peerID: String
    /// The limits the plan will be clamped into, so a strategy can size itself.
    public var limits: PlanLimits
    /// Whether a TURN relay is available for this punch (the rendezvous granted credentials and an allocation can
    /// be made), so a plan's `PunchPlan.relay` can take effect. The target's allocation carries the connection: the
    /// executor sets it for an initiator when the peer published a relayed address it can reach, and for a target
    /// when its own endpoint has a relay attached.
    public var relayAvailable: Bool = false

    /// Creates a context.
    public init(
        localNAT: NATProfile,
        remoteNAT: NATProfile,
        candidateHosts: [String] = [],
        candidatePorts: [UInt16] = [],
        localPort: UInt16? = nil,
        rtt: Duration? = nil,
        attempt: Int = 1,
        pairHistory: HistorySummary = .empty,
        peerHistory: HistorySummary = .empty,
        role: PunchRole = .initiator,
        seed: UInt64 = 0,
        peerID: String = "",
        limits: PlanLimits = .default,
        candidates: [Candidate] = [],
        lastAllocatedPort: UInt16? = nil
    ) {
        self.candidates = candidates
        self.lastAllocatedPort = lastAllocatedPort
        self.localNAT = localNAT
        self.remoteNAT = remoteNAT
        self.candidateHosts = candidateHosts
        self.candidatePorts = candidatePorts
        self.localPort = localPort
        self.rtt = rtt
        self.attempt = attempt
        self.pairHistory = pairHistory
        self.peerHistory = peerHistory
        self.role = role
        self.seed = seed
        self.peerID = peerID
        self.limits = limits
    }

    /// The port sequential prediction counts from: ``lastAllocatedPort`` when known, else the first candidate port.
    public var sequentialBase: UInt16? { lastAllocatedPort ?? candidatePorts.first }

    /// Whether no punch can be aimed for this pair: both mappings depend on the destination (or are not measured as
    /// endpoint-independent) and one side allocates at random. The random side's mapping depends on the port the
    /// other side sends from, which that symmetric side only picks when it sends, so neither side has a port to aim at
    /// (the lab's symmetric_random pairs). default.lua calls the same condition `hopeless`.
    public var cannotBePunched: Bool {
        localNAT.mapping != .endpointIndependent && remoteNAT.mapping != .endpointIndependent
            && (localNAT.allocation == .random || remoteNAT.allocation == .random)
    }

    /// The harder of the two legacy NAT types; it picks the seed's timing row.
    public var worstNAT: NATType { NATType.worst(localNAT.type, remoteNAT.type) }
}

/// Why a punch failed. An extensible set of codes (new codes are new static members, not a breaking change);
/// the raw value is the stable name used in Lua (`outcome.error`), history files and metrics.
public struct PunchFailureCode: RawRepresentable, Sendable, Hashable, Codable, CustomStringConvertible {
    /// The stable name, e.g. `allPortsFailed`.
    public var rawValue: String
    /// Wraps a name.
    public init(rawValue: String) { self.rawValue = rawValue }
    /// The description is the raw value.
    public var description: String { rawValue }

    /// The deadline passed.
    public static let timeout = PunchFailureCode(rawValue: "timeout")
    /// Every candidate was unreachable (ICMP) or none was valid.
    public static let unreachable = PunchFailureCode(rawValue: "unreachable")
    /// All planned ports were exhausted before the deadline.
    public static let allPortsFailed = PunchFailureCode(rawValue: "allPortsFailed")
    /// The punch was cancelled.
    public static let cancelled = PunchFailureCode(rawValue: "cancelled")
    /// A connection came up but the peer was not the expected NodeID.
    public static let peerAuthenticationFailed = PunchFailureCode(rawValue: "peerAuthenticationFailed")
}

/// How one punch ended, as reported to ``PunchStrategy/onResult(_:_:)`` and recorded in ``PunchHistory``.
public enum PunchOutcome: Sendable, Hashable, Codable {
    /// Connected. `portOffset` is `winningPort − ctx.candidatePorts[0]` (0 when there was no candidate).
    case success(timeToConnect: Duration, winningPort: UInt16, portOffset: Int, rounds: Int)
    /// Failed with a code after `rounds` probe rounds.
    case failure(code: PunchFailureCode, rounds: Int)

    /// Whether the punch connected.
    public var isSuccess: Bool {
        if case .success = self { return true }
        return false
    }

    /// Rounds used.
    public var rounds: Int {
        switch self {
        case .success(_, _, _, let r), .failure(_, let r): r
        }
    }
}

/// What the executor observed after a probe round, passed to ``PunchStrategy/onProbe(_:_:)``.
public struct ProbeEvent: Sendable, Hashable, Codable {
    /// The round that just finished (1-based).
    public var round: Int
    /// Time since the start instant.
    public var elapsed: Duration
    /// Probes sent so far, all sockets together.
    public var probesSent: Int
    /// Remote ports from which an authenticated probe or response arrived.
    public var answeredPorts: [UInt16]
    /// Remote ports that produced ICMP unreachable.
    public var unreachablePorts: [UInt16]
    /// The plan in force (after validation).
    public var currentPlan: PunchPlan

    /// Creates an event.
    public init(round: Int, elapsed: Duration, probesSent: Int, answeredPorts: [UInt16] = [],
                unreachablePorts: [UInt16] = [], currentPlan: PunchPlan) {
        self.round = round
        self.elapsed = elapsed
        self.probesSent = probesSent
        self.answeredPorts = answeredPorts
        self.unreachablePorts = unreachablePorts
        self.currentPlan = currentPlan
    }
}

/// Which side of a punch this peer plays. The initiator dials QUIC; the target accepts.
public enum PunchRole: String, Sendable, Hashable, Codable, CaseIterable {
    /// Dials the QUIC connection once a path is proven.
    case initiator
    /// Accepts the QUIC connection from the pinned peer.
    case target
}
