import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy

/// The I/O side of one punch: its sockets, dial tasks, connections and timer, and where its result goes. Owned by
/// the executor actor and touched only there.
///
/// Protocol state (phase, rounds, dials in flight and their paths, proven paths, probe transactions) lives in
/// ``session`` alone; the runtime keeps the handles that perform its actions, keyed by the session's ids.
final class PunchRuntime {
    let id: PunchID
    let options: PunchOptions
    var session: PunchSession
    let context: PunchContext
    /// The strategy's hooks after planning, behind `FallbackStrategy`, so a failing hook never breaks the punch.
    let strategy: FallbackStrategy
    let strategyName: String
    let box: ResultBox
    let events: AsyncStream<PunchEvent>.Continuation
    let startedAt: ContinuousClock.Instant
    /// The session key as a STUN credential, made once: it keeps the HMAC state keyed for every probe this punch
    /// signs or checks.
    let credential: STUNCredential
    /// Signs this side's probes and answers with ``credential``; nil when the session id makes no valid USERNAME, and
    /// then no probe is sent (as when signing each probe failed).
    let signer: PunchProbe.Signer?
    /// Local sockets: 0 is the executor's endpoint; more are a birthday punch's extra sockets (`PunchSocketSet`).
    var sockets: [Endpoint] = []
    /// Handshakes in flight, by the session's dial id.
    var dials: [Int: Task<Void, Never>] = [:]
    /// Established connections not yet handed over or closed, by the session's dial or accept id.
    var connections: [Int: QUICConnection] = [:]
    var timerTask: Task<Void, Never>?
    var timerGeneration = 0
    /// The QUIC error of a dial whose peer was not the pinned NodeID, for the failure message.
    var authenticationError: QUICError?
    /// When the first verified probe from the peer arrived, from the start instant (for failure reports).
    var firstPathProven: Duration?
    /// The peer's candidates this punch checks, their probe targets, and which candidate an address belongs to.
    var checks = CandidateChecks(pool: [], base: nil, typed: false)
    /// Relay first (`PunchRelay.swift`): the relayed dial in flight, the session's dials waiting for its outcome,
    /// and the relayed connection once delivered (the punch goes on beside it).
    var relayDial: Task<Void, Never>?
    var relayDialing = false
    var relayTried = false
    /// Relayed dials made so far: a dial that reaches the relay before the target's permission for us is in place is
    /// dropped there, so a failed one is tried again while the punch runs (``PunchExecutor/maxRelayDials``).
    var relayDials = 0
    var waitingDials: [(dial: Int, socket: Int, to: SocketAddress)] = []
    var relayed: QUICConnection?
    /// How the session ended while the relayed dial was still running: the punch's outcome waits for the dial.
    var failureAwaitingRelay: PunchFailureCode?

    init(
        id: PunchID, options: PunchOptions, session: PunchSession, context: PunchContext,
        strategy: FallbackStrategy, strategyName: String, box: ResultBox,
        events: AsyncStream<PunchEvent>.Continuation, startedAt: ContinuousClock.Instant
    ) {
        self.id = id
        self.options = options
        self.session = session
        self.context = context
        self.strategy = strategy
        self.strategyName = strategyName
        self.box = box
        self.events = events
        self.startedAt = startedAt
        self.credential = STUNCredential(key: options.sessionKey)
        self.signer = try? PunchProbe.Signer(sessionID: options.sessionID, senderRole: options.role.rawValue, credential: credential)
    }
}
