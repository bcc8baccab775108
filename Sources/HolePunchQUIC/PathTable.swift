public import HolePunchNet

/// Where one path of a connection leads: how a datagram for the peer leaves this endpoint.
///
/// QUIC never sees a path: it sees one stable peer address (the one the connection started on), and the
/// connection's path table maps it to the active path (see docs/design-notes.md, "The path layer").
public enum PathRoute: Sendable, Hashable, CustomStringConvertible {
    /// From the endpoint's socket straight to this address of the peer.
    case direct(SocketAddress)
    /// Through a relay allocation: datagrams go to the relay `server` wrapped for `peer` (by the endpoint's
    /// ``Endpoint/attachRelay(_:)`` framing), and datagrams the server forwards from `peer` arrive on this route.
    /// `peer` is the peer's address as the relay sees it.
    case relay(server: SocketAddress, peer: SocketAddress)

    /// Where the endpoint's socket sends this path's datagrams, and where they come from: the peer's address on a
    /// direct path, the relay server on a relayed one.
    public var address: SocketAddress {
        switch self {
        case .direct(let address): address
        case .relay(let server, _): server
        }
    }

    /// The peer's address on this path: what its datagrams carry as source, and what QUIC is told for a
    /// connection that started on this path.
    public var peer: SocketAddress {
        switch self {
        case .direct(let address): address
        case .relay(_, let peer): peer
        }
    }

    /// Whether the path goes through a relay.
    public var isRelayed: Bool {
        if case .relay = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .direct(let address): "direct \(address)"
        case .relay(let server, let peer): "relay \(server) to \(peer)"
        }
    }
}

/// One path of a connection as its table knows it.
public struct PathStatus: Sendable, Hashable {
    /// Where the path leads.
    public var route: PathRoute
    /// This side has seen the peer answer a challenge sent on the path: the peer receives there.
    public var isValidated: Bool
    /// QUIC's datagrams to the peer leave on this path.
    public var isActive: Bool
}

/// The active path of a connection changed.
public struct PathChange: Sendable, Hashable, CustomStringConvertible {
    /// Why the active path changed. Extensible: more reasons may be added.
    public struct Reason: Sendable, Hashable, CustomStringConvertible {
        /// The reason's name, as status lines print it.
        public let name: String

        /// Creates a reason; the static members are the ones the path layer reports.
        public init(_ name: String) { self.name = name }

        /// This side switched on request (``QUICConnection/switchPath(to:)``).
        public static let switched = Reason("switched")
        /// The peer moved to a path this side had validated too, and this side followed.
        public static let peerMoved = Reason("peer-moved")
        /// The active path went silent; this side re-checked the connection's paths and moved to one that answered.
        public static let pathFailed = Reason("path-failed")
        /// The peer's authenticated packets came from a new address (its NAT dropped and re-made the mapping);
        /// this side validated the address and moved there.
        public static let rebinding = Reason("rebinding")

        public var description: String { name }
    }

    /// The path left.
    public var from: PathRoute
    /// The path now carrying the connection.
    public var to: PathRoute
    /// Why the connection moved.
    public var reason: Reason

    /// True when this side chose the move (``Reason/switched`` or ``Reason/pathFailed``); false when it followed the
    /// peer (``Reason/peerMoved`` or ``Reason/rebinding``).
    public var isLocal: Bool { reason == .switched || reason == .pathFailed }

    /// Creates a change with a reason.
    public init(from: PathRoute, to: PathRoute, reason: Reason) {
        self.from = from
        self.to = to
        self.reason = reason
    }

    /// Creates a change that this side made on request (`isLocal`) or that followed the peer's move.
    public init(from: PathRoute, to: PathRoute, isLocal: Bool) {
        self.init(from: from, to: to, reason: isLocal ? .switched : .peerMoved)
    }

    public var description: String { "from \(from) to \(to) reason \(reason)" }
}

/// A connection's paths to its peer, and which one is active: a state machine with no I/O (the endpoint sends the
/// challenges it asks for, and feeds it what arrives).
///
/// A path counts as *validated* once the peer answered, on it, a challenge only the peer can answer (``PathProbe``),
/// and as *proven by the peer* once the peer's own authenticated challenge arrived on it. Once the handshake
/// completed, every QUIC packet routed to the connection is handed to QUIC as coming from the stable address
/// (QUIC's decryption decides whether it is the peer's); the connection sends only on validated paths.
struct PathTable {
    struct Entry {
        var isValidated: Bool
        var isPeerProven: Bool
        /// The challenges this side sent lately and waits to see answered (the last ``outstandingChallenges``), so
        /// an answer to an earlier resend still counts on a path slower than the resends.
        var challenges: [UInt64] = []
        /// When this side last sent a challenge (monotonic ns), so reactive challenges stay rate-limited.
        var challengedAt: UInt64 = 0
        /// Learned from the peer's authenticated QUIC packets rather than from a path probe or the application:
        /// the peer did not announce it, so its NAT gave the flow a new address (a rebinding).
        var isObserved = false
    }

    /// What the endpoint does after a QUIC packet that passed decryption (``packetReceived(on:now:)``).
    enum PacketAction: Equatable {
        case none
        /// The packet came on the active path.
        case heardOnActive
        /// The connection followed the peer to the packet's path.
        case followed(PathChange)
        /// Challenge the packet's path, so it can be followed once the peer answers there.
        case challenge
    }

    /// How many of this side's challenges per path are remembered as outstanding.
    static let outstandingChallenges = 4

    /// The most paths one connection keeps: the peer can make us record paths (by challenging from them).
    static let maxPaths = 8
    /// How many of the peer's challenge values are remembered to refuse copies. The peer draws a fresh random
    /// value for every challenge it sends, so a value seen again is a copy (replayed, perhaps from another
    /// address); 256 values cost 2 KiB at most, and an honest peer sends a few per path.
    static let rememberedChallenges = 256

    /// What QUIC sees as the peer's address for the whole life of the connection.
    let stable: PathRoute
    private(set) var active: PathRoute
    private(set) var entries: [PathRoute: Entry]
    /// Insertion order, so ``statuses`` is stable.
    private var order: [PathRoute]
    /// The path the peer challenged from most recently: where it is moving. Followed once validated.
    private var peerPreferred: PathRoute?
    /// The path the peer last announced as its new active one; cleared when this side moves.
    private var peerAnnounced: PathRoute?
    /// The peer's challenge values seen lately (``rememberedChallenges``), oldest first in `challengeOrder`.
    private var seenChallenges: Set<UInt64> = []
    private var challengeOrder: [UInt64] = []

    init(stable: PathRoute) {
        self.stable = stable
        active = stable
        // The handshake itself proved the first path both ways.
        entries = [stable: Entry(isValidated: true, isPeerProven: true)]
        order = [stable]
    }

    var statuses: [PathStatus] {
        order.compactMap { route in
            entries[route].map { PathStatus(route: route, isValidated: $0.isValidated, isActive: route == active) }
        }
    }

    /// Adds a path; false when the table is full (an existing path is fine).
    mutating func add(_ route: PathRoute) -> Bool {
        if entries[route] != nil { return true }
        guard entries.count < Self.maxPaths else { return false }
        entries[route] = Entry(isValidated: false, isPeerProven: false)
        order.append(route)
        return true
    }

    /// Whether QUIC packets arriving on `route` belong to this connection (the peer is known there).
    func carries(_ route: PathRoute) -> Bool {
        guard let entry = entries[route] else { return false }
        return entry.isValidated || entry.isPeerProven
    }

    /// Records a challenge sent on `route`.
    mutating func challengeSent(on route: PathRoute, challenge: UInt64, now: UInt64) {
        guard var entry = entries[route] else { return }
        entry.challenges.append(challenge)
        if entry.challenges.count > Self.outstandingChallenges { entry.challenges.removeFirst() }
        entry.challengedAt = now
        entries[route] = entry
    }

    /// The peer answered a challenge on `route`. Returns nil when the answer matches no outstanding challenge, and
    /// otherwise whether it newly validated the path.
    mutating func responseReceived(on route: PathRoute, challenge: UInt64) -> Bool? {
        guard var entry = entries[route], let index = entry.challenges.firstIndex(of: challenge) else { return nil }
        let newly = !entry.isValidated
        entry.challenges.remove(at: index)
        entry.isValidated = true
        entries[route] = entry
        return newly
    }

    /// When `route` was announced or validated: follows the peer there when it announced its move there
    /// (``PathProbe/Kind/announcement``) or its packets came from there unannounced (its NAT rebound), and this
    /// side validated it; nil otherwise. A path the peer only challenged from is followed on the peer's next QUIC
    /// packet there (``packetReceived(on:now:)``): validating a path for later does not move the connection.
    mutating func followAnnounced(_ route: PathRoute) -> PathChange? {
        guard route == peerAnnounced || entries[route]?.isObserved == true else { return nil }
        return followIfPreferred(route)
    }

    /// Follows the peer to `route` when it is where the peer is moving and this side validated it.
    private mutating func followIfPreferred(_ route: PathRoute) -> PathChange? {
        guard route != active, route == peerPreferred, let entry = entries[route], entry.isValidated else { return nil }
        defer {
            active = route
            peerPreferred = nil
            peerAnnounced = nil
        }
        return PathChange(from: active, to: route, reason: entry.isObserved ? .rebinding : .peerMoved)
    }

    /// The peer challenged from `route` with `challenge`. Returns whether to answer (the path is recorded, or the
    /// table is full) and whether this side should challenge back to validate it for its own sends.
    ///
    /// A challenge value seen before is a copy: the tag binds no address, so whoever saw one could otherwise send
    /// it again from addresses of its choosing, fill the table and name the path the connection follows.
    mutating func challengeReceived(
        on route: PathRoute, challenge: UInt64, now: UInt64, announced: Bool = false
    ) -> (answer: Bool, challengeBack: Bool) {
        guard !seenChallenges.contains(challenge), add(route) else { return (false, false) }
        seenChallenges.insert(challenge)
        challengeOrder.append(challenge)
        if challengeOrder.count > Self.rememberedChallenges {
            seenChallenges.remove(challengeOrder.removeFirst())
        }
        entries[route]?.isPeerProven = true
        peerPreferred = route
        peerAnnounced = announced ? route : nil
        return (true, needsChallenge(route, now: now))
    }

    /// Whether a reactive challenge on `route` is due: it is not validated and none went out in the last 50 ms.
    func needsChallenge(_ route: PathRoute, now: UInt64) -> Bool {
        guard let entry = entries[route], !entry.isValidated else { return false }
        return now &- entry.challengedAt >= 50_000_000
    }

    /// This side switches to `route` (on request, or because the active path failed); nil when it is not
    /// validated (or already active).
    mutating func activate(_ route: PathRoute, reason: PathChange.Reason = .switched) -> PathChange? {
        guard route != active, entries[route]?.isValidated == true else { return nil }
        defer { active = route }
        peerPreferred = nil
        peerAnnounced = nil
        return PathChange(from: active, to: route, reason: reason)
    }

    /// A QUIC packet from `route` passed decryption (it is the peer's). On the active path that is all; on a path
    /// the peer moved to and this side validated, follow; from an address the table does not know, the peer's NAT
    /// rebound: record it (when there is room) as where the peer is, and challenge it.
    mutating func packetReceived(on route: PathRoute, now: UInt64) -> PacketAction {
        if route == active { return .heardOnActive }
        if entries[route] == nil {
            guard add(route) else { return .none }
            entries[route]?.isObserved = true
        }
        // A path the peer sends from unannounced is where it is now (an announced one became preferred when its
        // challenge came).
        if entries[route]?.isObserved == true { peerPreferred = route }
        if let change = followIfPreferred(route) { return .followed(change) }
        return needsChallenge(route, now: now) ? .challenge : .none
    }
}
