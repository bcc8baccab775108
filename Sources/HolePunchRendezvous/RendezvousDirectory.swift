import HolePunch
import HolePunchStrategy
public import HolePunchQUIC
public import HolePunchNet

/// Where a ``RendezvousServer`` finds peers registered at *other* instances of the same deployment.
///
/// The server tells it which NodeIDs it holds (``registered(_:since:)``, ``unregistered(_:)``) and asks it when a
/// punch request names a NodeID it does not hold (``requestPunch(_:)``). The directory calls back into the server
/// (``RendezvousServer/answerRemotePunch(_:)`` and ``RendezvousServer/moved(_:claimedAt:)``) for requests and
/// claims that arrive from other instances. The NATS implementation lives in the `HolePunchCluster` target, so
/// that an app linking only this target needs no NATS library.
///
/// The registration calls are made from inside the server actor and must not block: queue or buffer the I/O.
public protocol RendezvousDirectory: AnyObject, Sendable {
    /// Called once by ``RendezvousServer/use(directory:)``: the server the directory routes requests and claims to.
    func attach(_ server: RendezvousServer)
    /// This instance now holds `node`, registered at `since` (milliseconds of wall-clock time since 1970, used only
    /// to tell the newer of two registrations of one NodeID apart).
    func registered(_ node: NodeID, since: Int64)
    /// This instance no longer holds `node`.
    func unregistered(_ node: NodeID)
    /// Asks the instance holding `request.target` to coordinate; returns its reply, or throws `unknownTarget`
    /// when no instance answers.
    func requestPunch(_ request: RemotePunchRequest) async throws(RendezvousError) -> RemotePunchReply
    /// Stops routing (the server shuts down).
    func close() async
}

/// A punch request routed to the instance that holds the target: everything that instance needs to build both
/// coordinate messages.
///
/// It arrives from another process over the directory's transport, so it is untrusted input: ``validate()`` runs
/// on decoding and checks it against the same `RendezvousMessageLimits` as peer messages.
public struct RemotePunchRequest: Codable, Sendable, Hashable {
    /// The requesting peer's request id (echoed in its coordinate message).
    public var requestID: UInt64
    /// The session, drawn by the requesting instance.
    public var sessionID: String
    /// The session's probe key, drawn by the requesting instance.
    public var sessionKey: [UInt8]
    /// The requesting peer.
    public var initiator: NodeID
    /// The peer to punch to.
    public var target: NodeID
    /// The requesting peer's candidates (observed address first), as its instance accepted them.
    public var candidates: [Candidate]
    /// The requesting peer's NAT profile.
    public var nat: NATProfile
    /// The last port the requesting peer's NAT is known to have allocated, when it published one.
    public var lastAllocatedPort: UInt16?
    /// The requesting peer's RTT to its instance, in microseconds (nil: not measured yet).
    public var initiatorRTTMicroseconds: Int64?
    /// The requesting instance's latest measured round trip through the directory, in microseconds: the reply
    /// reaches the requester's peer this much (half of it) later than a local message would.
    public var directoryRTTMicroseconds: Int64

    /// Creates a request.
    public init(requestID: UInt64, sessionID: String, sessionKey: [UInt8], initiator: NodeID, target: NodeID,
                candidates: [Candidate], nat: NATProfile, initiatorRTTMicroseconds: Int64?,
                directoryRTTMicroseconds: Int64, lastAllocatedPort: UInt16? = nil) {
        self.requestID = requestID
        self.sessionID = sessionID
        self.sessionKey = sessionKey
        self.initiator = initiator
        self.target = target
        self.candidates = candidates
        self.nat = nat
        self.initiatorRTTMicroseconds = initiatorRTTMicroseconds
        self.directoryRTTMicroseconds = directoryRTTMicroseconds
        self.lastAllocatedPort = lastAllocatedPort
    }

    /// Decodes and validates (``validate()``).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            requestID: try c.decode(UInt64.self, forKey: .requestID),
            sessionID: try c.decode(String.self, forKey: .sessionID),
            sessionKey: try c.decode([UInt8].self, forKey: .sessionKey),
            initiator: try c.decode(NodeID.self, forKey: .initiator),
            target: try c.decode(NodeID.self, forKey: .target),
            candidates: try c.decode([Candidate].self, forKey: .candidates),
            nat: try c.decode(NATProfile.self, forKey: .nat),
            initiatorRTTMicroseconds: try c.decodeIfPresent(Int64.self, forKey: .initiatorRTTMicroseconds),
            directoryRTTMicroseconds: try c.decode(Int64.self, forKey: .directoryRTTMicroseconds),
            lastAllocatedPort: try c.decodeIfPresent(UInt16.self, forKey: .lastAllocatedPort)
        )
        try validate()
    }

    /// Checks every field against `RendezvousMessageLimits`: session id and key, candidates (as a coordinate
    /// message's), NAT profile, both RTTs and the last allocated port; the initiator and target must differ.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.checkSessionID(sessionID)
        try RendezvousMessageLimits.check("sessionKey length", sessionKey.count, RendezvousMessageLimits.sessionKeyLength)
        try RendezvousMessageLimits.check(candidates: candidates, field: "candidates",
                                          count: 1...RendezvousMessageLimits.maxCandidates)
        try RendezvousMessageLimits.check(nat)
        if let rtt = initiatorRTTMicroseconds {
            try RendezvousMessageLimits.check("initiatorRTTMicroseconds", rtt, 0...RendezvousMessageLimits.maxRTTMicroseconds)
        }
        try RendezvousMessageLimits.check("directoryRTTMicroseconds", directoryRTTMicroseconds,
                                          0...RendezvousMessageLimits.maxRTTMicroseconds)
        // As a registration's: port 0 is no port, and a strategy counting "base + delta" from it would aim at nothing.
        if let port = lastAllocatedPort { try RendezvousMessageLimits.check("lastAllocatedPort", port, 1...UInt16.max) }
        guard initiator != target else {
            throw RendezvousMessageLimits.violation("target", "equals the initiator")
        }
    }
}

/// The holding instance's answer to a ``RemotePunchRequest``.
public enum RemotePunchReply: Codable, Sendable, Hashable {
    /// The session started: the requesting instance sends `coordinate` to its peer after `delayMicroseconds`
    /// (less half the directory round trip it measured beyond the estimate it sent).
    case coordinate(Coordinate, delayMicroseconds: Int64)
    /// The holding instance refused (unknown target, rate limit, capacity): forwarded to the requester.
    case refused(ErrorReply)

    /// Checks the payload: the coordinate (``Coordinate/validate()``), its delay (at most the largest start delay),
    /// or the error reply.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        switch self {
        case let .coordinate(coordinate, delay):
            try coordinate.validate()
            try RendezvousMessageLimits.check("delayMicroseconds", delay, 0...RendezvousMessageLimits.maxStartDelayMicroseconds)
        case .refused(let reply):
            try reply.validate()
        }
    }
}
