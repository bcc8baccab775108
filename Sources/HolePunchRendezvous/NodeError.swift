public import HolePunch

/// Why a ``HolePunchNode`` call failed: the node's one error type.
///
/// Codes from the layers below keep their names (`timeout`, `cancelled`, `unknownTarget`, `refused`,
/// `peerAuthenticationFailed`, `connectionFailed`…), so one `switch error.code` covers a node's whole story;
/// ``punch`` keeps the details of a failed punch (ports tried, rounds, elapsed time).
public struct NodeError: Error, Sendable, CustomStringConvertible {
    /// An extensible error code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name.
        public let name: String
        /// Creates a code.
        public init(_ name: String) { self.name = name }
        public var description: String { name }

        /// The punch socket could not be bound, or the identity could not be used.
        public static let bindFailed = Code("bindFailed")
        /// The node was stopped (or is stopping): it starts nothing new.
        public static let stopped = Code("stopped")
        /// The calling task was cancelled; whatever the call had started was stopped.
        public static let cancelled = Code("cancelled")
        /// The rendezvous could not be reached or authenticated.
        public static let connectionFailed = Code("connectionFailed")
        /// The rendezvous knows no peer with that NodeID.
        public static let unknownTarget = Code("unknownTarget")
        /// No answer, or no authenticated connection, came in time.
        public static let timeout = Code("timeout")
        /// The peer's certificate did not prove the NodeID the rendezvous named.
        public static let peerAuthenticationFailed = Code("peerAuthenticationFailed")
        /// Every candidate port of the peer answered ICMP unreachable.
        public static let unreachable = Code("unreachable")
        /// No planned port of the peer answered a probe.
        public static let allPortsFailed = Code("allPortsFailed")
        /// The punch was refused before it started: none of the peer's candidates may be probed from here.
        public static let refused = Code("refused")
        /// The executor already runs as many punches (in all, or to this peer) as it allows.
        public static let tooManyPunches = Code("tooManyPunches")
        /// The punch's options were invalid.
        public static let invalidOptions = Code("invalidOptions")
        /// The rendezvous refused: this node asked faster than its rate limit allows.
        public static let rateLimited = Code("rateLimited")
        /// The rendezvous refused: it no longer holds this node's registration.
        public static let notRegistered = Code("notRegistered")
        /// The node asked for a punch to itself.
        public static let selfTarget = Code("selfTarget")
        /// The rendezvous holds as many registrations or sessions as it allows.
        public static let capacity = Code("capacity")
        /// The rendezvous sent something malformed or unexpected.
        public static let protocolViolation = Code("protocolViolation")
        /// The connection to the rendezvous ended (``HolePunchNode/incoming`` ends with this too).
        public static let disconnected = Code("disconnected")
        /// The rendezvous is shutting down.
        public static let shuttingDown = Code("shuttingDown")
        /// The ALPN asked for is not one the node's ``HolePunchNode/Options/alpns`` lists, or that list is empty
        /// or beyond what TLS can carry.
        public static let unsupportedALPN = Code("unsupportedALPN")
    }

    /// The error code.
    public var code: Code
    /// A human-readable explanation (without the code).
    public var message: String
    /// The failed punch's report, when the failure was the punch itself.
    public var punch: PunchError?

    /// Creates an error.
    public init(_ code: Code, _ message: String, punch: PunchError? = nil) {
        self.code = code
        self.message = message
        self.punch = punch
    }

    /// The rendezvous layer's error, under the same code name.
    init(_ error: RendezvousError) {
        self.init(Code(error.code.name), error.message, punch: error.punch)
    }

    public var description: String { punch?.description ?? "\(code): \(message)" }
}
