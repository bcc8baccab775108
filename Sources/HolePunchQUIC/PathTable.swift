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
public struct PathChange: Sendable, Hashable {
    /// The path left.
    public var from: PathRoute
    /// The path now carrying the connection.
    public var to: PathRoute
    /// True when this side switched (``QUICConnection/switchPath(to:)``); false when it followed the peer, which
    /// moved to a path this side had validated too.
    public var isLocal: Bool
}

/// A connection's paths to its peer, and which one is active: a state machine with no I/O (the endpoint sends the
/// challenges it asks for, and feeds it what arrives).
///
/// A path counts as *validated* once the peer answered, on it, a challenge only the peer can answer (``PathProbe``),
/// and as *proven by the peer* once the peer's own authenticated challenge arrived on it. QUIC packets arriving on
/// either kind are handed to QUIC as coming from the stable address; the connection sends only on validated paths.
struct PathTable {
    struct Entry {
        var isValidated: Bool
        var isPeerProven: Bool
        /// The challenge this side sent last and waits to see answered.
        var challenge: UInt64?
        /// When this side last sent a challenge (monotonic ns), so reactive challenges stay rate-limited.
        var challengedAt: UInt64 = 0
    }

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
        entries[route]?.challenge = challenge
        entries[route]?.challengedAt = now
    }

    /// The peer answered a challenge on `route`; returns true when that validated the path.
    mutating func responseReceived(on route: PathRoute, challenge: UInt64) -> Bool {
        guard let entry = entries[route], entry.challenge == challenge else { return false }
        entries[route]?.challenge = nil
        entries[route]?.isValidated = true
        return !entry.isValidated
    }

    /// The peer challenged from `route` with `challenge`. Returns whether to answer (the path is recorded, or the
    /// table is full) and whether this side should challenge back to validate it for its own sends.
    ///
    /// A challenge value seen before is a copy: the tag binds no address, so whoever saw one could otherwise send
    /// it again from addresses of its choosing, fill the table and name the path the connection follows.
    mutating func challengeReceived(
        on route: PathRoute, challenge: UInt64, now: UInt64
    ) -> (answer: Bool, challengeBack: Bool) {
        guard !seenChallenges.contains(challenge), add(route) else { return (false, false) }
        seenChallenges.insert(challenge)
        challengeOrder.append(challenge)
        if challengeOrder.count > Self.rememberedChallenges {
            seenChallenges.remove(challengeOrder.removeFirst())
        }
        entries[route]?.isPeerProven = true
        peerPreferred = route
        return (true, needsChallenge(route, now: now))
    }

    /// Whether a reactive challenge on `route` is due: it is not validated and none went out in the last 50 ms.
    func needsChallenge(_ route: PathRoute, now: UInt64) -> Bool {
        guard let entry = entries[route], !entry.isValidated else { return false }
        return now &- entry.challengedAt >= 50_000_000
    }

    /// This side switches to `route`; nil when it is not validated (or already active).
    mutating func activate(_ route: PathRoute) -> PathChange? {
        guard route != active, entries[route]?.isValidated == true else { return nil }
        defer { active = route }
        peerPreferred = nil
        return PathChange(from: active, to: route, isLocal: true)
    }

    /// A QUIC packet from `route` passed decryption: when the peer moved there and this side validated it, follow.
    mutating func packetReceived(on route: PathRoute) -> PathChange? {
        guard route != active, route == peerPreferred, entries[route]?.isValidated == true else { return nil }
        defer { active = route }
        return PathChange(from: active, to: route, isLocal: false)
    }
}
