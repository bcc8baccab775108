import HolePunchNet
import HolePunchStrategy

/// The punch protocol for one session, as a value-type state machine: events in, actions out, no I/O, no clock.
///
/// The executor feeds it socket, timer and QUIC events and performs the actions it returns. Everything that
/// decides *what happens next* lives here, so tests can drive every transition synchronously.
struct PunchSession {
    /// What the session needs to know up front.
    struct Configuration {
        var role: PunchRole
        /// The addresses probes go to, in the order rounds walk them: the plan's ports on the peer's host, or every
        /// checked candidate's targets interleaved (`CandidateChecks`).
        var candidates: [SocketAddress]
        /// The validated plan.
        var plan: PunchPlan
        /// Monotonic nanoseconds at which probing starts.
        var startAt: UInt64
        /// Monotonic nanoseconds after which the punch has timed out.
        var deadline: UInt64
    }

    /// Where the session is.
    enum Phase: Equatable, CustomStringConvertible {
        /// Waiting for the coordinated start instant.
        case scheduled
        /// Sending probes; no path proven yet.
        case probing
        /// A QUIC handshake is under way (the initiator dialled).
        case connecting
        /// Ended with a connection.
        case succeeded
        /// Ended with an error.
        case failed(PunchFailureCode)

        var description: String {
            switch self {
            case .scheduled: "scheduled"
            case .probing: "probing"
            case .connecting: "connecting"
            case .succeeded: "succeeded"
            case .failed(let code): "failed(\(code))"
            }
        }

        var isTerminal: Bool {
            switch self {
            case .succeeded, .failed: true
            default: false
            }
        }
    }

    /// Something that happened.
    enum Event: Equatable {
        /// The start instant arrived.
        case start(now: UInt64)
        /// The timer the session asked for fired.
        case timer(now: UInt64)
        /// An authenticated probe request from the peer arrived on local socket `socket`.
        case probeRequest(from: SocketAddress, socket: Int)
        /// An authenticated probe response from the peer arrived on local socket `socket`.
        case probeResponse(from: SocketAddress, socket: Int)
        /// ICMP said `address` is unreachable.
        case unreachable(SocketAddress)
        /// A dial completed its handshake with the pinned peer.
        case dialEstablished(id: Int)
        /// A dial failed; `authentication` when the peer was not the pinned NodeID.
        case dialFailed(id: Int, authentication: Bool)
        /// The target accepted a QUIC connection from the pinned peer for this session, on local socket `socket`
        /// (its id from ``acceptedConnectionID()``).
        case accepted(id: Int, socket: Int = 0)
        /// The user cancelled.
        case cancel
    }

    /// A probe to send: from local socket `socket` to `to`.
    struct Probe: Equatable {
        var socket: Int
        var to: SocketAddress
    }

    /// Something the executor must do.
    enum Action: Equatable {
        case sendProbes([Probe])
        case respond(socket: Int, to: SocketAddress)
        case dial(id: Int, socket: Int, to: SocketAddress)
        case abandonDial(id: Int)
        /// Close an established connection that lost the tie-break.
        case closeDuplicate(id: Int)
        case armTimer(at: UInt64)
        case succeed(connection: Int)
        case fail(PunchFailureCode)
        /// Report progress (round started) to observers.
        case roundStarted(Int)
        /// Report that a probe from the peer proved a path.
        case pathProven(SocketAddress)
    }

    private(set) var configuration: Configuration
    private(set) var phase: Phase = .scheduled
    private(set) var round = 0
    private(set) var portsTried: [UInt16] = []
    private(set) var probesSent = 0
    /// Peer addresses a verified probe came from, first proof first (each once, whichever local socket it reached).
    var provenAddresses: [SocketAddress] {
        var seen: Set<SocketAddress> = []
        return provenOrder.compactMap { seen.insert($0.address).inserted ? $0.address : nil }
    }
    private(set) var unreachable: Set<SocketAddress> = []
    private var triedSet: Set<UInt16> = []
    private var cursor = 0
    private var nextDialID = 1
    /// A local socket and a remote address: what a dial runs over. The same remote address can be reached through
    /// several of our sockets (a birthday punch), and only the socket its probe arrived on has a NAT mapping the
    /// peer's NAT lets in, so dials are told apart by both.
    private struct Path: Hashable {
        var socket: Int
        var address: SocketAddress
    }
    private var dialsInFlight: [Int: Path] = [:]
    private var dialledPaths: Set<Path> = []
    /// Paths a probe from the peer arrived over, in the order they were proven.
    private var provenPaths: Set<Path> = []
    private var provenOrder: [Path] = []
    /// The addresses of ``provenPaths``, for constant-time "first proof of this address" checks.
    private var provenAddressSet: Set<SocketAddress> = []
    /// Proven paths the peer also answered a probe on (so both directions work), in the order answered.
    private var answeredPaths: [Path] = []
    /// The most paths one punch remembers as proven. A real punch proves a handful (a birthday punch: a few of
    /// our sockets; a cone peer: a port or two).
    static let maxProvenPaths = 64
    /// Proven paths whose handshakes failed more often than redials allow (until a fresh proof).
    private var exhaustedPaths: Set<Path> = []
    private var redials: [Path: Int] = [:]
    /// How often one proven path is dialled again after a failed handshake.
    static let maxRedials = 3
    private var winner: Int?
    /// The local socket the winning connection runs on, once the session succeeded.
    private(set) var winningSocket: Int?
    /// The peer address the winning dial went to; nil for an accepted connection (its own address says).
    private(set) var winningAddress: SocketAddress?
    /// Ids for accepted connections, apart from dial ids.
    private var lastAcceptedID = 1_000_000
    /// Probe transactions sent and seen, against replayed copies. The executor records each request it sends and
    /// asks before it believes a probe.
    var ledger = ProbeLedger()
    private var roundsExhaustedAt: UInt64?
    /// The peer answered one of our probes: it hears us, and we hear it. Probing has done its job then, so later
    /// rounds send nothing (requests from the peer are still answered).
    private(set) var bothWaysOpen = false
    /// When the last round started, so rounds paused by `roundsCanPause` resume where they stopped.
    private var lastRoundAt: UInt64 = 0
    /// The last round armed only the deadline because `roundsCanPause` held.
    private var roundsArePaused = false

    /// Rounds pause (no timer ticks, no `roundStarted`, no `onProbe`) while they could do nothing: both ways are
    /// open, so rounds send no probes, and a handshake is under way. For the initiator that is a dial in flight;
    /// the target never dials, and both ways open means the initiator has the proof it dials on. A timer tick per
    /// interval per punch cost task hops and a strategy call for nothing while handshakes queued; only the
    /// deadline is armed then, and an initiator whose last dial failed resumes its rounds.
    private var roundsCanPause: Bool {
        bothWaysOpen && (configuration.role == .target || !dialsInFlight.isEmpty)
    }

    init(_ configuration: Configuration) {
        self.configuration = configuration
    }

    private var plan: PunchPlan { configuration.plan }

    /// Feeds one event, returns what to do. Events after the end are ignored (they return no actions).
    mutating func handle(_ event: Event) -> [Action] {
        if case .cancel = event {
            guard !phase.isTerminal else { return [] }
            return finish(.cancelled)
        }
        if phase.isTerminal {
            // A late probe, dial or timer after the end changes nothing, except that a connection completing
            // after another won is closed as a duplicate.
            if case .dialEstablished(let id) = event, id != winner { return [.closeDuplicate(id: id)] }
            if case .accepted(let id, _) = event, id != winner { return [.closeDuplicate(id: id)] }
            return []
        }
        switch event {
        case .start(let now):
            return start(now)
        case .timer(let now):
            return timer(now)
        case .probeRequest(let from, let socket):
            // Always answer: the answer is what proves the path to the peer.
            return [.respond(socket: socket, to: from)] + proven(from, socket: socket)
        case .probeResponse(let from, let socket):
            bothWaysOpen = true
            let actions = proven(from, socket: socket)
            let path = Path(socket: socket, address: from)
            if provenPaths.contains(path), !answeredPaths.contains(path) { answeredPaths.append(path) }
            return actions
        case .unreachable(let address):
            return markUnreachable(address)
        case .dialEstablished(let id):
            guard let path = dialsInFlight.removeValue(forKey: id) else { return [] }
            return succeed(id, socket: path.socket, address: path.address)
        case .dialFailed(let id, let authentication):
            guard let path = dialsInFlight.removeValue(forKey: id) else { return [] }
            if authentication { return finish(.peerAuthenticationFailed) }
            dialledPaths.remove(path)
            // A proven path whose handshake failed (lost packets, a slow peer) is dialled again while the deadline
            // allows, a bounded number of times; then the next proven path, if any; otherwise the next proof of
            // the path may dial it.
            if provenPaths.contains(path) {
                if redials[path, default: 0] < PunchSession.maxRedials {
                    redials[path, default: 0] += 1
                    return dial(path.address, socket: path.socket)
                }
                exhaustedPaths.insert(path)
            }
            if configuration.role == .initiator {
                let next = dialNextProvenPath()
                if !next.isEmpty { return next }
            }
            if dialsInFlight.isEmpty && phase == .connecting { phase = .probing }
            if roundsArePaused && dialsInFlight.isEmpty {
                // The rounds paused for this dial (see `roundsCanPause`) resume where they stopped.
                roundsArePaused = false
                return [.armTimer(at: min(lastRoundAt + nanoseconds(plan.interval), configuration.deadline))]
            }
            return allPortsFailedIfDone()
        case .accepted(let id, let socket):
            guard configuration.role == .target else { return [.closeDuplicate(id: id)] }
            return succeed(id, socket: socket, address: nil)
        case .cancel:
            return []
        }
    }

    /// Adopts a new plan between rounds (a strategy's `on_probe` widened or narrowed it): later rounds walk the new
    /// candidates from their start, with the new cadence; the deadline moves to the start plus the new timeout.
    /// Rounds already sent count towards the new plan's rounds. Returns the timer to re-arm while rounds are paused.
    @discardableResult
    mutating func replacePlan(_ plan: PunchPlan, candidates: [SocketAddress]) -> [Action] {
        guard !phase.isTerminal, !candidates.isEmpty else { return [] }
        configuration.plan = plan
        configuration.candidates = candidates
        configuration.deadline = configuration.startAt + nanoseconds(plan.timeout)
        cursor = 0
        roundsExhaustedAt = nil
        // Paused rounds armed only the old deadline; a shorter timeout must still end the punch on time.
        return roundsArePaused ? [.armTimer(at: configuration.deadline)] : []
    }

    /// A fresh id for a connection the target accepted, for ``Event/accepted(id:socket:)``.
    mutating func acceptedConnectionID() -> Int {
        lastAcceptedID += 1
        return lastAcceptedID
    }

    /// Peer addresses proven in both directions on local socket `socket` (the peer answered our probe there), in
    /// the order answered: after a success, the other pairs a connection can fall back to.
    func pathsProvenBothWays(socket: Int) -> [SocketAddress] {
        answeredPaths.filter { $0.socket == socket }.map(\.address)
    }

    /// QUIC handshakes this session has started (dials, including redials).
    var dialsStarted: Int { nextDialID - 1 }

    /// The dial currently in flight to `address`, for result bookkeeping.
    func dialAddress(_ id: Int) -> SocketAddress? { dialsInFlight[id]?.address }

    // MARK: Transitions

    private mutating func start(_ now: UInt64) -> [Action] {
        guard phase == .scheduled else { return [] }
        phase = .probing
        if configuration.candidates.isEmpty { return finish(.unreachable) }
        var actions: [Action] = []
        if configuration.role == .initiator && plan.dialCandidatesDirectly && plan.localSockets == 1,
           let first = configuration.candidates.first {
            // The seed's mode, one nomination at a time (see `dialNextProvenPath`): dial the first candidate straight
            // away, before any proof. A birthday punch (several local sockets) does not: its proof names the one
            // socket whose mapping the peer lets in, and a dial already in flight would hold that one back.
            actions += dial(first, socket: 0)
        }
        actions += nextRound(now)
        return actions
    }

    private mutating func timer(_ now: UInt64) -> [Action] {
        if now >= configuration.deadline { return finish(.timeout) }
        if phase == .scheduled { return start(now) }
        if round < plan.rounds { return nextRound(now) }
        if let exhausted = roundsExhaustedAt, now >= exhausted { return allPortsFailedIfDone(now: now) }
        return [.armTimer(at: configuration.deadline)]
    }

    private mutating func nextRound(_ now: UInt64) -> [Action] {
        round += 1
        var probes: [Probe] = []
        let candidates = configuration.candidates
        for socket in 0..<(bothWaysOpen ? 0 : max(1, plan.localSockets)) {
            for _ in 0..<max(1, plan.packetsPerRound) {
                let address = candidates[cursor % candidates.count]
                cursor += 1
                if unreachable.contains(address) { continue }
                probes.append(Probe(socket: socket, to: address))
                if triedSet.insert(address.port).inserted { portsTried.append(address.port) }
            }
        }
        probesSent += probes.count
        var actions: [Action] = [.roundStarted(round), .sendProbes(probes)]
        let interval = nanoseconds(plan.interval)
        if round >= plan.rounds {
            // Give the last probes one interval to be answered before calling the ports exhausted.
            roundsExhaustedAt = now + interval
        }
        lastRoundAt = now
        roundsArePaused = roundsCanPause
        actions.append(.armTimer(at: roundsArePaused ? configuration.deadline : min(now + interval, configuration.deadline)))
        return actions
    }

    private mutating func proven(_ from: SocketAddress, socket: Int) -> [Action] {
        var actions: [Action] = []
        let path = Path(socket: socket, address: from)
        if !provenPaths.contains(path) {
            // The peer holds the session key and may send fresh probes from as many source addresses as it has (an
            // IPv6 /64 is plenty): beyond a bound, new paths are answered but not remembered or dialled.
            guard provenPaths.count < PunchSession.maxProvenPaths else { return [] }
            provenPaths.insert(path)
            provenOrder.append(path)
            if provenAddressSet.insert(from).inserted { actions.append(.pathProven(from)) }
        }
        exhaustedPaths.remove(path)
        if configuration.role == .initiator {
            actions += dialNextProvenPath()
        }
        return actions
    }

    /// The initiator nominates one pair at a time: its handshakes run one after another, oldest proof first, and
    /// one in flight is never abandoned for another (only the end of the punch abandons it). The target keeps the
    /// first handshake *it* completes, and it completes one as soon as our Finished arrives, before we hear that it
    /// did: a handshake we abandoned then (a hairpinning router gave the peer a second public port, and its proof
    /// arrived while the direct dial to the first was under way) could be the one the target kept, and the sides
    /// would end up holding different connections (1 run in 19). With one handshake alive at a time, the one the
    /// initiator completes is the one the target kept.
    private mutating func dialNextProvenPath() -> [Action] {
        guard dialsInFlight.isEmpty,
              let next = provenOrder.first(where: { !dialledPaths.contains($0) && !exhaustedPaths.contains($0) })
        else { return [] }
        return dial(next.address, socket: next.socket)
    }

    private mutating func dial(_ address: SocketAddress, socket: Int) -> [Action] {
        let path = Path(socket: socket, address: address)
        guard dialledPaths.insert(path).inserted else { return [] }
        let id = nextDialID
        nextDialID += 1
        dialsInFlight[id] = path
        phase = .connecting
        return [.dial(id: id, socket: socket, to: address)]
    }

    private mutating func markUnreachable(_ address: SocketAddress) -> [Action] {
        guard configuration.candidates.contains(address) else { return [] }
        unreachable.insert(address)
        // Unreachable means every candidate said so and nothing else got through.
        if provenOrder.isEmpty && Set(configuration.candidates).isSubset(of: unreachable) {
            return finish(.unreachable)
        }
        return []
    }

    private mutating func allPortsFailedIfDone(now: UInt64? = nil) -> [Action] {
        guard round >= plan.rounds, let exhausted = roundsExhaustedAt else { return [] }
        if let now, now < exhausted { return [.armTimer(at: exhausted)] }
        if now == nil { return [] }
        // A proven path or a dial still in flight may yet connect: then only the deadline ends the punch.
        guard dialsInFlight.isEmpty && provenOrder.isEmpty else { return [.armTimer(at: configuration.deadline)] }
        return finish(.allPortsFailed)
    }

    private mutating func succeed(_ id: Int, socket: Int, address: SocketAddress?) -> [Action] {
        winner = id
        winningSocket = socket
        winningAddress = address
        phase = .succeeded
        // Deterministic tie-break: the first connection to complete wins; every other dial is abandoned.
        var actions: [Action] = dialsInFlight.keys.sorted().map { .abandonDial(id: $0) }
        dialsInFlight.removeAll()
        actions.append(.succeed(connection: id))
        return actions
    }

    private mutating func finish(_ code: PunchFailureCode) -> [Action] {
        phase = .failed(code)
        var actions: [Action] = dialsInFlight.keys.sorted().map { .abandonDial(id: $0) }
        dialsInFlight.removeAll()
        actions.append(.fail(code))
        return actions
    }
}

/// Converts a duration to nanoseconds on the monotonic clock (negative durations count as zero).
func nanoseconds(_ duration: Duration) -> UInt64 {
    let (seconds, attoseconds) = duration.components
    guard seconds >= 0 else { return 0 }
    // Saturates at 2^62 ns (about 146 years) instead of trapping: a start delay or timeout may come from another
    // peer, and callers add a few of these to a monotonic instant, which must not overflow either.
    let cap: UInt64 = 1 << 62
    guard UInt64(seconds) < cap / 1_000_000_000 else { return cap }
    return min(cap, UInt64(seconds) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000))
}
