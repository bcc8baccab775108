import HolePunch
public import HolePunchNet
public import HolePunchQUIC

/// The state machine's configuration, actions and records.
extension RendezvousState {
    /// Timers and limits.
    public struct Configuration: Sendable, Hashable {
        /// A registration lives this long after its last register or keep-alive.
        public var registrationTTL: Duration
        /// A session is forgotten this long after it was created (or earlier, once a result arrives).
        public var sessionTTL: Duration
        /// The start delay of a session the measurements cannot vouch for: a peer without an RTT estimate, or a
        /// peer whose NAT allocates ports at random (its side of a birthday punch opens many sockets before its
        /// first probe). It is also the most any session gets.
        public var startDelay: Duration
        /// The floor of a session's start delay. Both peers start the same delay after *their own* receipt of the
        /// coordinate message, so the delay does not change the skew (the compensation does); it only has to
        /// cover what each peer does between receipt and first probe (planning with its strategy, arming timers).
        /// A session between peers with RTT estimates whose NATs do not allocate at random gets this floor plus
        /// both peers' RTT spread (the RTT pings are answered by the peer's process, so their spread is how late
        /// that process may run), at most ``startDelay``.
        public var minStartDelay: Duration
        /// The most a nearer peer's coordinate message is held back, whatever the RTTs say.
        public var maxCompensation: Duration
        /// The most registrations held; further new NodeIDs are refused with `capacity`.
        public var maxRegistrations: Int
        /// The most live sessions; further requests are refused with `capacity`.
        public var maxSessions: Int
        /// Token bucket per peer for registers and punch requests: this many at once…
        public var rateBurst: Double
        /// …refilled at this many per second.
        public var ratePerSecond: Double
        /// Token bucket per *target* for punch requests, whoever sends them: this many at once…
        ///
        /// The per-requester bucket alone lets many (or many fake) requesters make one peer punch without pause;
        /// this one bounds the probes any single peer can be made to send. Its defaults (30, 5/s) are larger than
        /// the requester's (10, 2/s), so that one requester alone cannot use up a target's bucket and lock honest
        /// peers out of it.
        public var targetRateBurst: Double
        /// …refilled at this many per second.
        public var targetRatePerSecond: Double

        /// Creates a configuration.
        public init(
            registrationTTL: Duration = .seconds(30),
            sessionTTL: Duration = .seconds(30),
            startDelay: Duration = .milliseconds(150),
            minStartDelay: Duration = .milliseconds(20),
            maxCompensation: Duration = .seconds(2),
            maxRegistrations: Int = 100_000,
            maxSessions: Int = 100_000,
            rateBurst: Double = 10,
            ratePerSecond: Double = 2,
            targetRateBurst: Double = 30,
            targetRatePerSecond: Double = 5
        ) {
            self.registrationTTL = registrationTTL
            self.sessionTTL = sessionTTL
            self.startDelay = startDelay
            self.minStartDelay = minStartDelay
            self.maxCompensation = maxCompensation
            self.maxRegistrations = maxRegistrations
            self.maxSessions = maxSessions
            self.rateBurst = rateBurst
            self.ratePerSecond = ratePerSecond
            self.targetRateBurst = targetRateBurst
            self.targetRatePerSecond = targetRatePerSecond
        }
    }

    /// What the driver must do.
    public enum Action: Sendable, Hashable {
        /// Send `message` to `node`'s current connection after `after` (zero: at once).
        case send(ServerMessage, to: NodeID, after: Duration)
        /// Close `node`'s connection `connection` (its registration expired or was replaced).
        case close(NodeID, connection: UInt64, reason: String)
        /// A session was created: both coordinate messages are among the actions returned with it.
        case sessionStarted(sessionID: String, initiator: NodeID, target: NodeID, nearDelay: Duration)
        /// Both peers acknowledged: `skew` is the measured difference of their arrival times, `planned` the
        /// difference the RTT estimates predicted.
        case skewMeasured(sessionID: String, skew: Duration, planned: Duration)
        /// A session ended (`expired`, or the outcome a peer reported).
        case sessionEnded(sessionID: String, reason: String)
    }

    /// A registered peer, as the state machine holds it.
    public struct Peer: Sendable, Hashable {
        /// The connection the registration arrived on.
        public var connection: UInt64
        /// The observed (public) address.
        public var observed: SocketAddress
        /// Published candidates, NAT profile and last allocated port.
        public var registration: Registration
        /// When it expires unless refreshed.
        public var expires: Duration
        /// The RTT estimate: the minimum of the last four samples (scheduling noise only ever adds delay), or
        /// the provisional one (``RendezvousState/provisionalRTT(node:rtt:)``) until the first sample arrives.
        public var rtt: Duration? { rttWindow.minimum ?? provisionalRTT }
        /// How much the RTT samples vary (largest minus smallest of the window; zero with fewer than two).
        public var rttSpread: Duration { rttWindow.spread }
        /// The observed address first (as `srflx`), then the published candidates at other addresses.
        public var candidates: [Candidate] {
            [Candidate(kind: .serverReflexive, address: observed)] + registration.candidates.filter { $0.address != observed }
        }
        /// How many RTT samples have arrived.
        public var rttSamples: Int { rttWindow.next }
        var rttWindow = RTTWindow()
        /// The QUIC handshake's RTT of the registration's connection: a peer that asks for a punch right behind
        /// its register has answered no ping yet, and scheduling it as 0 ms away would hold its message back.
        var provisionalRTT: Duration?
        var tokens: Double
        var refilled: Duration
        /// The bucket for punch requests *to* this peer.
        var targetTokens: Double
        var targetRefilled: Duration
    }

    /// The last four RTT samples, inline (no allocation per peer).
    struct RTTWindow: Sendable, Hashable {
        var samples: (Int64, Int64, Int64, Int64) = (.max, .max, .max, .max)
        var next = 0

        mutating func add(_ sample: Duration) {
            let nanos = Int64(sample.components.seconds) * 1_000_000_000 + sample.components.attoseconds / 1_000_000_000
            switch next & 3 {
            case 0: samples.0 = nanos
            case 1: samples.1 = nanos
            case 2: samples.2 = nanos
            default: samples.3 = nanos
            }
            next += 1
        }

        var minimum: Duration? {
            let low = min(min(samples.0, samples.1), min(samples.2, samples.3))
            return low == .max ? nil : .nanoseconds(low)
        }

        var spread: Duration {
            let taken = [samples.0, samples.1, samples.2, samples.3].filter { $0 != .max }
            guard let low = taken.min(), let high = taken.max() else { return .zero }
            return .nanoseconds(high - low)
        }

        static func == (a: RTTWindow, b: RTTWindow) -> Bool {
            a.next == b.next && a.samples == b.samples
        }

        func hash(into hasher: inout Hasher) {
            hasher.combine(next)
            hasher.combine(samples.0)
            hasher.combine(samples.1)
            hasher.combine(samples.2)
            hasher.combine(samples.3)
        }
    }

    struct Session: Sendable {
        var initiator: NodeID
        var target: NodeID
        var expires: Duration
        var planned: Duration
        var sent: [Duration?] = [nil, nil]
        var acked: [Duration?] = [nil, nil]
        /// Set once a peer reported an outcome; the record stays until both acks are in (for the skew).
        var ended = false
        var bothAcked: Bool { acked[0] != nil && acked[1] != nil }
    }
}
