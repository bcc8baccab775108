internal import HolePunchNet

/// One entry of a plan's remote port list: a single port or an inclusive range.
public enum PortSpec: Sendable, Hashable, Codable {
    /// One port.
    case port(UInt16)
    /// An inclusive range, expanded in ascending order.
    case range(ClosedRange<UInt16>)

    /// Number of ports this entry expands to.
    public var count: Int {
        switch self {
        case .port: 1
        case .range(let r): r.count
        }
    }
}

/// An ordered list of remote ports without duplicates. Order is what a strategy uses to say "most likely
/// first", so it is preserved exactly; a port that appears again later is dropped at its later position.
/// Port 0 is never a valid destination and is dropped.
public struct PortList: Sendable, Hashable, Codable, RandomAccessCollection, ExpressibleByArrayLiteral,
    CustomStringConvertible
{
    /// The expanded ports, in probe order.
    public private(set) var ports: [UInt16]

    /// Expands `specs` in order and drops duplicates and port 0.
    public init(_ specs: [PortSpec]) {
        var out: [UInt16] = []
        out.reserveCapacity(specs.reduce(0) { $0 + $1.count })
        if out.capacity <= 16 {
            // Plans against easy NATs have a handful of ports: a linear scan beats any set.
            func add(_ p: UInt16) { if p != 0, !out.contains(p) { out.append(p) } }
            for spec in specs {
                switch spec {
                case .port(let p): add(p)
                case .range(let r): for p in r { add(p) }
                }
            }
        } else {
            // One bit per port (8 KiB): constant-time duplicate checks for birthday-sized lists.
            var seen = [UInt64](repeating: 0, count: 1024)
            func add(_ p: UInt16) {
                let word = Int(p >> 6), bit = UInt64(1) << UInt64(p & 63)
                if p != 0, seen[word] & bit == 0 {
                    seen[word] |= bit
                    out.append(p)
                }
            }
            for spec in specs {
                switch spec {
                case .port(let p): add(p)
                case .range(let r): for p in r { add(p) }
                }
            }
        }
        ports = out
    }

    /// A list from single ports, in order.
    public init(ports: [UInt16]) {
        self.init(ports.map(PortSpec.port))
    }

    /// A list from single ports, in order.
    public init(arrayLiteral elements: UInt16...) {
        self.init(ports: elements)
    }

    /// Index of the first port.
    public var startIndex: Int { ports.startIndex }
    /// One past the last port.
    public var endIndex: Int { ports.endIndex }
    /// The port at `position` in probe order.
    public subscript(position: Int) -> UInt16 { ports[position] }

    /// Keeps only the first `n` ports.
    public mutating func truncate(to n: Int) {
        if ports.count > n { ports.removeSubrange(Swift.max(n, 0)...) }
    }

    /// `N ports: a, b, c…` with at most five shown.
    public var description: String {
        let head = ports.prefix(5).map(String.init).joined(separator: ", ")
        return "\(ports.count) ports: \(head)\(ports.count > 5 ? ", …" : "")"
    }
}

/// What one punch attempt does: where to probe, from how many sockets, at what cadence, for how long.
///
/// A round sends `packetsPerRound` probes from each local socket, walking `ports` in order and wrapping
/// around, so the packet rate is `packetsPerRound × localSockets / interval`. Build one directly or get one
/// from a ``PunchStrategy``; always run ``validated(_:)`` before executing it.
public struct PunchPlan: Sendable, Hashable, Codable {
    /// Remote ports to probe, most likely first.
    public var ports: PortList
    /// Local UDP sockets to probe from (more than one for birthday attacks on random-allocation NATs).
    public var localSockets: Int
    /// Probes sent per round from each local socket.
    public var packetsPerRound: Int
    /// Time between the starts of two rounds.
    public var interval: Duration
    /// Number of probe rounds.
    public var rounds: Int
    /// Deadline of the whole punch, measured from the start instant.
    public var timeout: Duration
    /// Deadline of the QUIC handshake once a path is proven.
    public var connectTimeout: Duration
    /// Delay after the coordinated start instant before the first probe.
    public var startDelay: Duration
    /// Initial RTT estimate handed to QUIC for the handshake.
    public var initialRTT: Duration
    /// Also dial the first candidate directly, before any probe proved it (the seed's direct mode; the executor does
    /// so only for a punch from one local socket, and keeps one handshake in flight at a time).
    public var dialCandidatesDirectly: Bool
    /// Optional IP TTL for the first round of probes: enough to open our own NAT, too low to reach the
    /// peer's NAT and trip its filter before it has punched. Nil means the system default.
    public var lowTTL: Int?
    /// How many times each QUIC handshake datagram is sent on the punched path (1 = once). Copies turn a per-datagram
    /// loss rate p into about p^copies for independent loss, for a few kilobytes once per punch.
    public var handshakeCopies: Int
    /// Which of the peer's typed candidates (`PunchContext.candidates`, 0-based indices) to check, in this order;
    /// nil checks them all in priority order. Indices that name no candidate are ignored.
    public var candidateOrder: [Int]?
    /// Most candidates to check (the first ones of ``candidateOrder`` or of the priority order); nil: no cap but the
    /// limits' (``PlanLimits/maxCandidates``).
    public var maxCandidates: Int?
    /// When to carry the connection over a TURN relay (issue 15); only when `PunchContext.relayAvailable`.
    public var relay: RelayUse
    /// How long to keep trying for a direct path once the connection runs over the relay (the punch goes on
    /// beside it; the connection moves when a direct path is proven).
    public var directAfterRelay: Duration

    /// Creates a plan. Defaults are the ones documented in `docs/strategies.md`.
    public init(
        ports: PortList,
        localSockets: Int = 1,
        packetsPerRound: Int = 3,
        interval: Duration = .milliseconds(200),
        rounds: Int = 5,
        timeout: Duration = .milliseconds(2000),
        connectTimeout: Duration = .milliseconds(1500),
        startDelay: Duration = .milliseconds(100),
        initialRTT: Duration = .milliseconds(333),
        dialCandidatesDirectly: Bool = true,
        lowTTL: Int? = nil,
        handshakeCopies: Int = 1,
        candidateOrder: [Int]? = nil,
        maxCandidates: Int? = nil,
        relay: RelayUse = .never,
        directAfterRelay: Duration = .seconds(30)
    ) {
        self.relay = relay
        self.directAfterRelay = directAfterRelay
        self.candidateOrder = candidateOrder
        self.maxCandidates = maxCandidates
        self.ports = ports
        self.localSockets = localSockets
        self.packetsPerRound = packetsPerRound
        self.interval = interval
        self.rounds = rounds
        self.timeout = timeout
        self.connectTimeout = connectTimeout
        self.startDelay = startDelay
        self.initialRTT = initialRTT
        self.dialCandidatesDirectly = dialCandidatesDirectly
        self.lowTTL = lowTTL
        self.handshakeCopies = handshakeCopies
    }

    /// Probe packets per second this plan sends, all sockets together.
    public var packetsPerSecond: Double {
        let seconds = interval.seconds
        // Doubles, not Int products: an unvalidated plan may hold any counts, and reading its rate must not trap.
        return seconds > 0 ? Double(packetsPerRound) * Double(localSockets) / seconds : .infinity
    }

    /// Rounds that fit before the timeout (a round that starts after the deadline never runs).
    public var effectiveRounds: Int {
        let usable = (timeout - startDelay).seconds
        guard usable > 0 else { return 0 }
        let interval = self.interval.seconds
        guard interval > 0 else { return rounds }
        // Compared as a Double first: a tiny interval over a long timeout is more rounds than an Int holds.
        let fit = (usable / interval).rounded(.down)
        return fit >= Double(rounds) ? rounds : min(rounds, Int(fit) + 1)
    }

    /// Total probe packets the plan may send (saturating at `Int.max` for absurd, unvalidated plans).
    public var packetBudget: Int { saturatingProduct(effectiveRounds, packetsPerRound, localSockets) }

    /// Distinct remote ports that actually get probed, given the rounds that fit.
    public var probedPortCount: Int { min(ports.count, saturatingProduct(effectiveRounds, packetsPerRound)) }
}

/// The core's safety limits. ``PunchPlan/validated(_:)`` clamps every plan into them.
public struct PlanLimits: Sendable, Hashable, Codable {
    /// Highest probe rate of one punch session, all sockets together.
    public var maxPacketsPerSecond: Double
    /// Most remote ports in one plan.
    public var maxTotalPorts: Int
    /// Most local sockets in one plan.
    public var maxLocalSockets: Int
    /// Most probes per round per socket.
    public var maxPacketsPerRound: Int
    /// Most rounds.
    public var maxRounds: Int
    /// Shortest and longest allowed punch timeout.
    public var timeoutBounds: ClosedRange<Duration>
    /// Shortest and longest allowed connect timeout.
    public var connectTimeoutBounds: ClosedRange<Duration>
    /// Shortest and longest allowed interval.
    public var intervalBounds: ClosedRange<Duration>
    /// Longest start delay.
    public var maxStartDelay: Duration
    /// Allowed QUIC initial RTT.
    public var initialRTTBounds: ClosedRange<Duration>
    /// Most copies of each handshake datagram.
    public var maxHandshakeCopies: Int
    /// Most of the peer's candidates one punch checks; the probes to all of them share the packet-rate cap.
    public var maxCandidates: Int
    /// Longest delay of ``RelayUse/after(_:)``: a relay that starts later than this is of no use to a waiting
    /// application (the punch's own timeout is at most 30 s).
    public var maxRelayDelay: Duration
    /// Longest ``PunchPlan/directAfterRelay``: how long the punch may go on beside a relayed connection.
    public var maxDirectAfterRelay: Duration

    /// Creates limits; the defaults are the documented ones (1000 packets/s, 2048 ports, 256 sockets…).
    ///
    /// The defaults are sized for the birthday search against a random-allocation NAT: 256 fresh mappings on
    /// one side and ~2000 random probes from the other hit with p ≈ 1 − e^(−256·2000/64512) > 99.9 %, and
    /// 1000 probes/s (about 1 Mbit/s of ~120-byte STUN packets) sends them in about two seconds. Plans for
    /// easier NAT pairs send far less; the caps only bound what a strategy may ask for.
    public init(
        maxPacketsPerSecond: Double = 1000,
        maxTotalPorts: Int = 2048,
        maxLocalSockets: Int = 256,
        maxPacketsPerRound: Int = 256,
        maxRounds: Int = 1000,
        timeoutBounds: ClosedRange<Duration> = .milliseconds(100)...(.seconds(30)),
        connectTimeoutBounds: ClosedRange<Duration> = .milliseconds(100)...(.seconds(30)),
        intervalBounds: ClosedRange<Duration> = .milliseconds(1)...(.seconds(10)),
        maxStartDelay: Duration = .seconds(5),
        initialRTTBounds: ClosedRange<Duration> = .milliseconds(1)...(.seconds(10)),
        maxHandshakeCopies: Int = 3,
        maxCandidates: Int = 16,
        maxRelayDelay: Duration = .seconds(60),
        maxDirectAfterRelay: Duration = .seconds(600)
    ) {
        self.maxRelayDelay = maxRelayDelay
        self.maxDirectAfterRelay = maxDirectAfterRelay
        self.maxCandidates = maxCandidates
        self.maxPacketsPerSecond = maxPacketsPerSecond
        self.maxTotalPorts = maxTotalPorts
        self.maxLocalSockets = maxLocalSockets
        self.maxPacketsPerRound = maxPacketsPerRound
        self.maxRounds = maxRounds
        self.timeoutBounds = timeoutBounds
        self.connectTimeoutBounds = connectTimeoutBounds
        self.intervalBounds = intervalBounds
        self.maxStartDelay = maxStartDelay
        self.initialRTTBounds = initialRTTBounds
        self.maxHandshakeCopies = maxHandshakeCopies
    }

    /// The documented defaults.
    public static let `default` = PlanLimits()
}

/// Why ``PunchPlan/validated(_:)`` changed a field, e.g. `packetsPerRound: 900 → 256 (max 256)`.
public struct ClampReason: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The plan field that was changed (Swift name).
    public var field: String
    /// The value the strategy asked for.
    public var requested: String
    /// The value that will run.
    public var applied: String
    /// The rule that applied, in words.
    public var rule: String

    /// Creates a reason.
    public init(field: String, requested: String, applied: String, rule: String) {
        self.field = field
        self.requested = requested
        self.applied = applied
        self.rule = rule
    }

    /// One human-readable line.
    public var description: String { "\(field): \(requested) → \(applied) (\(rule))" }
}

extension PunchPlan {
    /// This plan clamped into `limits`, with one reason per change. Never fails: an unsafe plan becomes
    /// a safe one, and the reasons say how. The packet rate is enforced last, by stretching the interval,
    /// because the rate cap is the limit that protects the network.
    public func validated(_ limits: PlanLimits = .default) -> (plan: PunchPlan, reasons: [ClampReason]) {
        var p = self
        var reasons: [ClampReason] = []
        func note(_ field: String, _ from: some CustomStringConvertible, _ to: some CustomStringConvertible,
                  _ rule: String) {
            reasons.append(ClampReason(field: field, requested: from.description, applied: to.description,
                                       rule: rule))
        }
        func clampInt(_ field: String, _ value: inout Int, _ range: ClosedRange<Int>) {
            let c = min(max(value, range.lowerBound), range.upperBound)
            if c != value {
                note(field, value, c, value < range.lowerBound ? "min \(range.lowerBound)" : "max \(range.upperBound)")
                value = c
            }
        }
        func clampDuration(_ field: String, _ value: inout Duration, _ range: ClosedRange<Duration>) {
            let c = min(max(value, range.lowerBound), range.upperBound)
            if c != value {
                note(field, value.formattedMilliseconds, c.formattedMilliseconds,
                     value < range.lowerBound ? "min \(range.lowerBound.formattedMilliseconds)"
                                              : "max \(range.upperBound.formattedMilliseconds)")
                value = c
            }
        }

        if p.ports.count > limits.maxTotalPorts {
            let before = p.ports.count
            p.ports.truncate(to: limits.maxTotalPorts)
            note("ports", "\(before) ports", "\(p.ports.count) ports", "max \(limits.maxTotalPorts), first ones kept")
        }
        clampInt("localSockets", &p.localSockets, 1...max(1, limits.maxLocalSockets))
        clampInt("packetsPerRound", &p.packetsPerRound, 1...max(1, limits.maxPacketsPerRound))
        if !p.ports.isEmpty && p.packetsPerRound > p.ports.count {
            note("packetsPerRound", p.packetsPerRound, p.ports.count, "no more than the number of ports")
            p.packetsPerRound = p.ports.count
        }
        clampInt("rounds", &p.rounds, 1...max(1, limits.maxRounds))
        clampDuration("timeout", &p.timeout, limits.timeoutBounds)
        clampDuration("connectTimeout", &p.connectTimeout, limits.connectTimeoutBounds)
        clampDuration("interval", &p.interval, limits.intervalBounds)
        clampDuration("startDelay", &p.startDelay, .zero...max(.zero, limits.maxStartDelay))
        clampDuration("initialRTT", &p.initialRTT, limits.initialRTTBounds)
        clampInt("handshakeCopies", &p.handshakeCopies, 1...max(1, limits.maxHandshakeCopies))
        if let ttl = p.lowTTL, !(1...255).contains(ttl) {
            note("lowTTL", ttl, "nil", "TTL must be in 1...255")
            p.lowTTL = nil
        }

        let cap = max(1, limits.maxCandidates)
        if let wanted = p.maxCandidates, !(1...cap).contains(wanted) {
            let applied = min(max(wanted, 1), cap)
            note("maxCandidates", wanted, applied, wanted < 1 ? "min 1" : "max \(cap)")
            p.maxCandidates = applied
        }
        if let order = p.candidateOrder {
            var seen: Set<Int> = []
            let kept = order.filter { $0 >= 0 && seen.insert($0).inserted }.prefix(cap)
            if kept.count != order.count {
                note("candidateOrder", "\(order.count) indices", "\(kept.count) indices", "distinct, non-negative, at most \(cap)")
            }
            p.candidateOrder = Array(kept)
        }

        if case .after(var delay) = p.relay {
            clampDuration("relay", &delay, .zero...max(.zero, limits.maxRelayDelay))
            p.relay = .after(delay)
        }
        clampDuration("directAfterRelay", &p.directAfterRelay, .zero...max(.zero, limits.maxDirectAfterRelay))

        if let reason = p.capRate(limits) { reasons.append(reason) }
        return (p, reasons)
    }

    /// Stretches the interval so that the plan sends at most `limits.maxPacketsPerSecond`, and says so; nil when the
    /// plan was within the cap. ``validated(_:)`` applies it last; the executor applies it again after it widened a
    /// round to reach every candidate, so all candidates together share one cap.
    public mutating func capRate(_ limits: PlanLimits) -> ClampReason? {
        guard limits.maxPacketsPerSecond > 0, packetsPerSecond > limits.maxPacketsPerSecond else { return nil }
        let before = interval
        let seconds = Double(packetsPerRound) * Double(localSockets) / limits.maxPacketsPerSecond
        // Round up to whole microseconds so the resulting rate is at or just below the cap; a cap so low that
        // the interval leaves Int64 saturates instead of trapping.
        let micros = min((seconds * 1_000_000).rounded(.up), 9e18)
        interval = .microseconds(Int64(micros))
        return ClampReason(
            field: "interval", requested: before.formattedMilliseconds, applied: interval.formattedMilliseconds,
            rule: "max \(limits.maxPacketsPerSecond.formatted) packets/s for \(packetsPerRound) packets × \(localSockets) sockets per round"
        )
    }
}

extension Duration {
    /// This duration in (fractional) seconds. Computed as a ratio of durations, not from `components`, which
    /// traps when the whole seconds leave Int64 (e.g. the difference of two extreme durations in an unvalidated plan).
    var seconds: Double {
        self / .seconds(1)
    }

    /// This duration in (fractional) milliseconds.
    var milliseconds: Double { seconds * 1000 }

    /// `250 ms`, `0.5 ms`.
    var formattedMilliseconds: String { "\(milliseconds.formatted) ms" }

    /// A duration from fractional milliseconds (rounded to nanoseconds); NaN is zero and values beyond Int64
    /// nanoseconds (about 292 years) saturate, so no script's number can trap here.
    static func fromMilliseconds(_ ms: Double) -> Duration {
        let nanos = (ms * 1_000_000).rounded()
        guard !nanos.isNaN else { return .zero }
        return .nanoseconds(Int64(min(max(nanos, -9e18), 9e18)))
    }
}

/// The product of non-negative counts, `Int.max` when it overflows (a negative factor makes it 0).
func saturatingProduct(_ factors: Int...) -> Int {
    var product = 1
    for f in factors {
        guard f > 0 else { return 0 }
        let (r, overflow) = product.multipliedReportingOverflow(by: f)
        if overflow { return .max }
        product = r
    }
    return product
}

extension Double {
    /// Shortest readable form: `200`, `1.5`, `0.333`.
    var formatted: String {
        if self == rounded(), abs(self) < 1e15 { return String(Int64(self)) }
        return String((self * 1000).rounded() / 1000)
    }
}

/// When a punch carries the connection over a TURN relay.
public enum RelayUse: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Never: direct or nothing (the behaviour before relays existed).
    case never
    /// At once: connect through the relay while the punch goes on beside it, then move to the direct path.
    case first
    /// When no direct path was proven this long after the punch started.
    case after(Duration)

    /// `never`, `first` or `after 250 ms`.
    public var description: String {
        switch self {
        case .never: "never"
        case .first: "first"
        case .after(let delay): "after \(delay.humanDescription)"
        }
    }
}
