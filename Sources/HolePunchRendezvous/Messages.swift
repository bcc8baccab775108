internal import Foundation
public import HolePunch
public import HolePunchStrategy
public import HolePunchQUIC
public import HolePunchNet

/// Candidates, profile and TTLs the server confirms after a `ClientMessage/register(_:)`.
public struct Registered: Codable, Sendable, Hashable {
    /// The peer's address as the server saw it: the punch socket's public mapping.
    public var observedAddress: SocketAddress
    /// How long the registration lives without a keep-alive, in milliseconds.
    public var ttlMilliseconds: Int
    /// How often the client should send a keep-alive, in milliseconds (a third of the TTL).
    public var keepAliveMilliseconds: Int
    /// The server's STUN responder (primary address), if it runs one, for NAT behaviour discovery.
    public var stunServer: SocketAddress?
    /// TURN servers and credentials minted for this peer, when the rendezvous has any (``TURNGrant``).
    public var turn: TURNGrant?

    /// Creates a confirmation.
    public init(observedAddress: SocketAddress, ttlMilliseconds: Int, keepAliveMilliseconds: Int, stunServer: SocketAddress?,
                turn: TURNGrant? = nil) {
        self.observedAddress = observedAddress
        self.ttlMilliseconds = ttlMilliseconds
        self.keepAliveMilliseconds = keepAliveMilliseconds
        self.stunServer = stunServer
        self.turn = turn
    }

    /// Decodes and validates (``validate()``): a server cannot hand the client absurd timers.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(observedAddress: try c.decode(SocketAddress.self, forKey: .observedAddress),
                  ttlMilliseconds: try c.decode(Int.self, forKey: .ttlMilliseconds),
                  keepAliveMilliseconds: try c.decode(Int.self, forKey: .keepAliveMilliseconds),
                  stunServer: try c.decodeIfPresent(SocketAddress.self, forKey: .stunServer),
                  turn: try c.decodeIfPresent(TURNGrant.self, forKey: .turn))
        try validate()
    }

    /// Checks the timers against `RendezvousMessageLimits`.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check("ttlMilliseconds", ttlMilliseconds, RendezvousMessageLimits.ttlMilliseconds)
        try RendezvousMessageLimits.check("keepAliveMilliseconds", keepAliveMilliseconds, 1...ttlMilliseconds)
    }
}

/// What a peer publishes when it registers.
public struct Registration: Codable, Sendable, Hashable {
    /// Addresses the peer is reachable at on its own network (hairpin and same-LAN cases).
    public var lanAddresses: [SocketAddress]
    /// What the peer's NAT does, if it measured it.
    public var nat: NATProfile?

    /// Creates a registration.
    public init(lanAddresses: [SocketAddress] = [], nat: NATProfile? = nil) {
        self.lanAddresses = lanAddresses
        self.nat = nat
    }

    /// Decodes and validates (``validate()``); the NAT profile validates itself (`NATProfile.init(from:)`).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(lanAddresses: try c.decodeIfPresent([SocketAddress].self, forKey: .lanAddresses) ?? [],
                  nat: try c.decodeIfPresent(NATProfile.self, forKey: .nat))
        try validate()
    }

    /// Checks the counts against `RendezvousMessageLimits` and the NAT profile's ranges. Which addresses may be
    /// published is the server's decision, against the observed address (`CandidateFilter.isPublishable(lan:observed:)`).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check("lanAddresses count", lanAddresses.count, 0...RendezvousMessageLimits.maxLANAddresses)
        if let nat { try RendezvousMessageLimits.check(nat) }
    }
}

/// The server's instruction to punch: sent to both peers of a session.
public struct Coordinate: Codable, Sendable, Hashable {
    /// The request this answers (the initiator's id); nil in the target's copy.
    public var requestID: UInt64?
    /// A random session id, shared by both peers (it appears in probes and in the TLS server name).
    public var sessionID: String
    /// 32 random bytes that authenticate this session's probes.
    public var sessionKey: [UInt8]
    /// The other peer's NodeID: the punched connection must prove it.
    public var peer: NodeID
    /// The other peer's candidates: observed (public) address first, then its LAN addresses.
    public var candidates: [SocketAddress]
    /// The other peer's NAT profile (`NATProfile.unknown` if it published none).
    public var peerNAT: NATProfile
    /// This recipient's role: the requester is the initiator, the other peer the target.
    public var role: PunchRole
    /// Start probing this many microseconds after the message is received (clock-free start).
    public var startDelayMicroseconds: Int64
    /// The server's RTT estimate between the two peers (sum of half RTTs), in microseconds, as a hint.
    public var peerRTTMicroseconds: Int64?

    /// Creates a coordinate message.
    public init(
        requestID: UInt64?, sessionID: String, sessionKey: [UInt8], peer: NodeID, candidates: [SocketAddress],
        peerNAT: NATProfile, role: PunchRole, startDelayMicroseconds: Int64, peerRTTMicroseconds: Int64?
    ) {
        self.requestID = requestID
        self.sessionID = sessionID
        self.sessionKey = sessionKey
        self.peer = peer
        self.candidates = candidates
        self.peerNAT = peerNAT
        self.role = role
        self.startDelayMicroseconds = startDelayMicroseconds
        self.peerRTTMicroseconds = peerRTTMicroseconds
    }

    /// The start delay as a `Duration`.
    public var startDelay: Duration { .microseconds(startDelayMicroseconds) }

    /// Decodes and validates (``validate()``): everything in it was chosen by the server or by the other peer.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            requestID: try c.decodeIfPresent(UInt64.self, forKey: .requestID),
            sessionID: try c.decode(String.self, forKey: .sessionID),
            sessionKey: try c.decode([UInt8].self, forKey: .sessionKey),
            peer: try c.decode(NodeID.self, forKey: .peer),
            candidates: try c.decode([SocketAddress].self, forKey: .candidates),
            peerNAT: try c.decode(NATProfile.self, forKey: .peerNAT),
            role: try c.decode(PunchRole.self, forKey: .role),
            startDelayMicroseconds: try c.decode(Int64.self, forKey: .startDelayMicroseconds),
            peerRTTMicroseconds: try c.decodeIfPresent(Int64.self, forKey: .peerRTTMicroseconds)
        )
        try validate()
    }

    /// Checks every field against `RendezvousMessageLimits`: session id and key, candidate count, NAT profile, start
    /// delay and RTT. Which candidates may be probed is decided later, against this side's own addresses
    /// (`CandidateFilter`).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.checkSessionID(sessionID)
        try RendezvousMessageLimits.check("sessionKey length", sessionKey.count, RendezvousMessageLimits.sessionKeyLength)
        try RendezvousMessageLimits.check("candidates count", candidates.count, 1...RendezvousMessageLimits.maxCandidates)
        try RendezvousMessageLimits.check(peerNAT)
        try RendezvousMessageLimits.check("startDelayMicroseconds", startDelayMicroseconds,
                                   0...RendezvousMessageLimits.maxStartDelayMicroseconds)
        if let rtt = peerRTTMicroseconds {
            try RendezvousMessageLimits.check("peerRTTMicroseconds", rtt, 0...RendezvousMessageLimits.maxRTTMicroseconds)
        }
    }
}

/// A typed refusal, sent to the peer whose request failed.
public struct ErrorReply: Codable, Sendable, Hashable {
    /// The request it answers, if any.
    public var requestID: UInt64?
    /// The error code (``RendezvousError/Code`` name).
    public var code: String
    /// A human-readable explanation.
    public var message: String

    /// Creates an error reply.
    public init(requestID: UInt64?, code: String, message: String) {
        self.requestID = requestID
        self.code = code
        self.message = message
    }

    /// Decodes and validates (``validate()``).
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(requestID: try c.decodeIfPresent(UInt64.self, forKey: .requestID),
                  code: try c.decode(String.self, forKey: .code), message: try c.decode(String.self, forKey: .message))
        try validate()
    }

    /// Checks the string lengths against `RendezvousMessageLimits`.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check("code length", code.utf8.count, 1...RendezvousMessageLimits.maxCodeLength)
        try RendezvousMessageLimits.check("message length", message.utf8.count, 0...RendezvousMessageLimits.maxMessageLength)
    }
}

/// Messages a peer sends on its control stream.
package enum ClientMessage: Codable, Sendable, Hashable {
    /// Registers (or updates the registration of) the authenticated NodeID.
    case register(Registration)
    /// Keeps the registration (and the NAT mapping) alive.
    case keepAlive
    /// Asks for a punch to `target`; the reply is a ``ServerMessage/coordinate(_:)`` or an ``ServerMessage/error(_:)``
    /// with the same `requestID`.
    case requestPunch(requestID: UInt64, target: NodeID)
    /// Answers a ``ServerMessage/ping(id:)`` at once, so the server can measure the RTT.
    case pong(id: UInt64)
    /// Acknowledges a coordinate message at once: the server takes the midpoint of send and ack as the arrival
    /// time and reports the skew between the two peers.
    case coordinateAck(sessionID: String)
    /// Reports a session's outcome (ends the session on the server).
    case punchResult(sessionID: String, outcome: String)
}

/// Messages the server sends on a peer's control stream.
public enum ServerMessage: Codable, Sendable, Hashable {
    /// The registration was accepted.
    case registered(Registered)
    /// A keep-alive was accepted.
    case keepAliveAck
    /// Punch now: session, candidates, roles and start delay.
    case coordinate(Coordinate)
    /// Measures the RTT; the peer answers with `ClientMessage/pong(id:)`.
    case ping(id: UInt64)
    /// A request failed.
    case error(ErrorReply)
}

extension ClientMessage {
    /// Checks the fields the synthesized decoder cannot: session ids and outcome strings (the structs it carries
    /// validate themselves when decoded).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    package func validate() throws(RendezvousError) {
        switch self {
        case .register(let registration):
            try registration.validate()
        case .keepAlive, .requestPunch, .pong:
            break
        case .coordinateAck(let sessionID):
            try RendezvousMessageLimits.checkSessionID(sessionID)
        case .punchResult(let sessionID, let outcome):
            try RendezvousMessageLimits.checkSessionID(sessionID)
            try RendezvousMessageLimits.check("outcome length", outcome.utf8.count, 1...RendezvousMessageLimits.maxCodeLength)
        }
    }
}

extension ServerMessage {
    /// Checks the message's payload (again, for values built in code rather than decoded).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    package func validate() throws(RendezvousError) {
        switch self {
        case .registered(let confirmed): try confirmed.validate()
        case .coordinate(let coordinate): try coordinate.validate()
        case .error(let reply): try reply.validate()
        case .keepAliveAck, .ping: break
        }
    }
}

/// The ranges every value of the rendezvous protocol must lie in. Both sides check them where a message is
/// decoded (`RendezvousFraming/decode(_:from:)`), so a value outside them never reaches a planner, a timer or a
/// log line: the message is refused with ``RendezvousError/Code/protocolViolation``.
package enum RendezvousMessageLimits {
    /// Most LAN addresses one registration may publish.
    package static let maxLANAddresses = 8
    /// Most candidates in a coordinate message: the observed address plus the LAN addresses.
    package static let maxCandidates = 1 + maxLANAddresses
    /// Session ids: 1 to 64 characters of `[0-9A-Za-z-]` (the server draws 32 lowercase hex digits); they appear
    /// in probe USERNAMEs (where `:` separates) and in TLS server names.
    package static let maxSessionIDLength = 64
    /// Session keys: the server draws 32 bytes; 16...64 are accepted.
    package static let sessionKeyLength = 16...64
    /// The longest start delay a coordinate may ask for: 10 s.
    package static let maxStartDelayMicroseconds: Int64 = 10_000_000
    /// The largest RTT hint: 60 s.
    package static let maxRTTMicroseconds: Int64 = 60_000_000
    /// Registration TTLs from 100 ms (tests run short ones) to a day.
    package static let ttlMilliseconds = 100...86_400_000
    /// Longest error code or outcome string, in UTF-8 bytes.
    package static let maxCodeLength = 64
    /// Longest error message, in UTF-8 bytes.
    package static let maxMessageLength = 1024

    static func violation(_ field: String, _ detail: String) -> RendezvousError {
        RendezvousError(.protocolViolation, "field \(field): \(detail)")
    }

    static func check<T: Comparable & CustomStringConvertible>(
        _ field: String, _ value: T, _ range: ClosedRange<T>
    ) throws(RendezvousError) {
        guard range.contains(value) else {
            throw violation(field, "\(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
    }

    static func checkSessionID(_ id: String) throws(RendezvousError) {
        let bytes = id.utf8
        try check("sessionID length", bytes.count, 1...maxSessionIDLength)
        let allowed = bytes.allSatisfy { b in
            (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b) || b == UInt8(ascii: "-")
        }
        guard allowed else { throw violation("sessionID", "only letters, digits and '-' are allowed") }
    }

    static func check(_ nat: NATProfile) throws(RendezvousError) {
        try check("portDelta", nat.portDelta, -NATProfile.maxPortDelta...NATProfile.maxPortDelta)
        guard nat.confidence.isFinite, (0...1).contains(nat.confidence) else {
            throw violation("confidence", "\(nat.confidence) is not in 0...1")
        }
    }
}

/// Framing: a 4-byte big-endian length, then that many bytes of JSON.
///
/// JSON keeps the protocol readable in captures and trivially versionable; the messages are small and rare
/// (registration, keep-alive every few seconds, a coordinate per punch), so a binary format buys nothing
/// measurable here (see `holepunch bench rendezvous`).
package enum RendezvousFraming {
    /// The largest frame either side accepts; anything larger is a protocol error that closes the connection.
    package static let maximumFrame = 16 * 1024

    /// Encodes one message into a frame.
    package static func frame<M: Encodable>(_ message: M) -> [UInt8] {
        // The message types only hold strings, numbers and arrays: encoding cannot fail.
        let body = (try? JSONEncoder().encode(message)).map { Array($0) } ?? []
        let n = UInt32(body.count)
        return [UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)] + body
    }

    /// Decodes one message body and validates it: the structs check their fields as they are decoded, and a
    /// `ClientMessage` or ``ServerMessage`` is checked as a whole (`RendezvousMessageLimits`).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation`, naming the field when a value is out of range.
    package static func decode<M: Decodable>(_ type: M.Type, from body: [UInt8]) throws(RendezvousError) -> M {
        let message: M
        do {
            message = try JSONDecoder().decode(type, from: Data(body))
        } catch let error as RendezvousError {
            throw error
        } catch {
            throw RendezvousError(.protocolViolation, "undecodable message: \(error)")
        }
        if let client = message as? ClientMessage { try client.validate() }
        if let server = message as? ServerMessage { try server.validate() }
        return message
    }
}

/// Accumulates stream bytes and cuts them into frame bodies, in time linear in the bytes received.
///
/// Consumed frames are skipped by advancing a read index; the buffer is compacted only once the consumed prefix
/// is at least as long as what remains (and on every append that finds it fully consumed), so each byte is moved
/// at most once on average however the bytes are chunked.
package struct FrameReader: Sendable {
    private var buffer: [UInt8] = []
    /// Where the next unread byte is in `buffer`.
    private var start = 0
    /// Bytes moved inside the buffer to drop consumed frames (a test seam for the cost of framing).
    package private(set) var bytesMoved = 0
    /// Bytes received and not yet returned as frames.
    package var buffered: Int { buffer.count - start }

    /// Creates an empty reader.
    package init() {}

    /// Appends received bytes.
    package mutating func append(_ bytes: [UInt8]) {
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        } else if start >= buffer.count - start {
            bytesMoved += buffer.count - start
            buffer.removeFirst(start)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame body, or nil when more bytes are needed.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` when a frame announces more than
    ///   `RendezvousFraming/maximumFrame` bytes.
    package mutating func next() throws(RendezvousError) -> [UInt8]? {
        guard buffer.count - start >= 4 else { return nil }
        let length = Int(buffer[start]) << 24 | Int(buffer[start + 1]) << 16 | Int(buffer[start + 2]) << 8 | Int(buffer[start + 3])
        guard length <= RendezvousFraming.maximumFrame else {
            throw RendezvousError(.protocolViolation, "frame of \(length) bytes exceeds \(RendezvousFraming.maximumFrame)")
        }
        guard buffer.count - start >= 4 + length else { return nil }
        let body = Array(buffer[(start + 4)..<(start + 4 + length)])
        start += 4 + length
        return body
    }
}

/// Why a rendezvous operation failed.
public struct RendezvousError: Error, Sendable, Hashable, CustomStringConvertible {
    /// An extensible error code.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's stable name (also sent on the wire in ``ErrorReply/code``).
        public let name: String
        /// Creates a code.
        public init(_ name: String) { self.name = name }
        public var description: String { name }

        /// The target NodeID is not registered.
        public static let unknownTarget = Code("unknownTarget")
        /// The peer sent requests faster than its rate limit allows.
        public static let rateLimited = Code("rateLimited")
        /// The request needs a registration first.
        public static let notRegistered = Code("notRegistered")
        /// A peer asked for a punch to itself.
        public static let selfTarget = Code("selfTarget")
        /// The server holds as many registrations or sessions as it allows.
        public static let capacity = Code("capacity")
        /// A malformed or unexpected message.
        public static let protocolViolation = Code("protocolViolation")
        /// The rendezvous could not be reached or authenticated.
        public static let connectionFailed = Code("connectionFailed")
        /// The connection to the rendezvous ended.
        public static let disconnected = Code("disconnected")
        /// No answer came in time.
        public static let timeout = Code("timeout")
        /// The server is shutting down.
        public static let shuttingDown = Code("shuttingDown")
        /// The calling task was cancelled; what the request had started was stopped.
        public static let cancelled = Code("cancelled")
    }

    /// The error code.
    public var code: Code
    /// A human-readable explanation.
    public var message: String
    /// When the punch itself failed (``RendezvousClient/requestPunch(to:alpn:)``): its report, whose code is also
    /// this error's (`timeout`, `unreachable`, `cancelled`, `peerAuthenticationFailed`…).
    public var punch: PunchError?

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The error a failed punch becomes at this layer: same code name, same message, the report kept.
    public init(punch: PunchError) {
        self.init(Code(punch.code.rawValue), punch.message)
        self.punch = punch
    }

    public var description: String { punch?.description ?? "\(code): \(message)" }
}
