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
    /// The primary STUN address of each IP family the server answers STUN on (at most
    /// `RendezvousMessageLimits.maxSTUNServers`): a peer registered over one family sends a binding to the other
    /// family's from its punch socket and publishes the answer as a `srflx` candidate.
    public var stunServers: [SocketAddress]
    /// TURN servers and credentials minted for this peer, when the rendezvous has any (``TURNGrant``).
    public var turn: TURNGrant?

    /// Creates a confirmation.
    public init(observedAddress: SocketAddress, ttlMilliseconds: Int, keepAliveMilliseconds: Int, stunServer: SocketAddress?,
                stunServers: [SocketAddress] = [], turn: TURNGrant? = nil) {
        self.observedAddress = observedAddress
        self.ttlMilliseconds = ttlMilliseconds
        self.keepAliveMilliseconds = keepAliveMilliseconds
        self.stunServer = stunServer
        self.stunServers = stunServers
        self.turn = turn
    }

    /// Decodes and validates (``validate()``): a server cannot hand the client absurd timers.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(observedAddress: try c.decode(SocketAddress.self, forKey: .observedAddress),
                  ttlMilliseconds: try c.decode(Int.self, forKey: .ttlMilliseconds),
                  keepAliveMilliseconds: try c.decode(Int.self, forKey: .keepAliveMilliseconds),
                  stunServer: try c.decodeIfPresent(SocketAddress.self, forKey: .stunServer),
                  stunServers: try c.decodeIfPresent([SocketAddress].self, forKey: .stunServers) ?? [],
                  turn: try c.decodeIfPresent(TURNGrant.self, forKey: .turn))
        try validate()
    }

    /// Checks the timers and the STUN addresses against `RendezvousMessageLimits`: a server cannot aim the
    /// client's bindings at a multicast, broadcast or unspecified address, or at many addresses.
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check("ttlMilliseconds", ttlMilliseconds, RendezvousMessageLimits.ttlMilliseconds)
        try RendezvousMessageLimits.check("keepAliveMilliseconds", keepAliveMilliseconds, 1...ttlMilliseconds)
        try RendezvousMessageLimits.check("stunServers count", stunServers.count, 0...RendezvousMessageLimits.maxSTUNServers)
        if let bad = stunServers.first(where: { $0.port == 0 || $0.scope.isNeverAProbeTarget }) {
            throw RendezvousMessageLimits.violation("stunServers", "\(bad) is not a STUN server address")
        }
    }
}

/// What a peer publishes when it registers.
public struct Registration: Codable, Sendable, Hashable {
    /// The peer's own candidates: `host` addresses of its interfaces, a `srflx` address of the family it did not
    /// register over, router mappings. The rendezvous adds the address it observes as the first `srflx`
    /// candidate itself, and refuses kinds and addresses a peer may not publish
    /// (`CandidateFilter.isPublishable(_:observed:)`).
    public var candidates: [Candidate]
    /// What the peer's NAT does, if it measured it.
    public var nat: NATProfile?
    /// The last port the peer's NAT is known to have allocated (the latest mapping NAT discovery saw): the base
    /// for sequential port prediction.
    public var lastAllocatedPort: UInt16?

    /// Creates a registration.
    public init(candidates: [Candidate] = [], nat: NATProfile? = nil, lastAllocatedPort: UInt16? = nil) {
        self.candidates = candidates
        self.nat = nat
        self.lastAllocatedPort = lastAllocatedPort
    }

    /// Creates a registration that publishes `lanAddresses` as `host` candidates.
    public init(lanAddresses: [SocketAddress], nat: NATProfile? = nil) {
        self.init(candidates: lanAddresses.map { Candidate(kind: .host, address: $0) }, nat: nat)
    }

    /// The published `host` addresses (what older peers called LAN addresses).
    public var lanAddresses: [SocketAddress] { candidates.filter { $0.kind == .host }.map(\.address) }

    private enum CodingKeys: String, CodingKey {
        case candidates, nat, lastAllocatedPort, lanAddresses
    }

    /// Decodes and validates (``validate()``); the NAT profile validates itself (`NATProfile.init(from:)`). A
    /// registration from an older peer, with `lanAddresses` and no `candidates`, publishes them as `host`
    /// candidates.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let nat = try c.decodeIfPresent(NATProfile.self, forKey: .nat)
        let port = try c.decodeIfPresent(UInt16.self, forKey: .lastAllocatedPort)
        if let candidates = try c.decodeIfPresent([Candidate].self, forKey: .candidates) {
            self.init(candidates: candidates, nat: nat, lastAllocatedPort: port)
        } else {
            let lan = try c.decodeIfPresent([SocketAddress].self, forKey: .lanAddresses) ?? []
            try RendezvousMessageLimits.check("lanAddresses count", lan.count, 0...RendezvousMessageLimits.maxPublishedCandidates)
            self.init(lanAddresses: lan, nat: nat)
            lastAllocatedPort = port
        }
        try validate()
    }

    /// Encodes the candidates (and, for a rendezvous that predates them, the host addresses as `lanAddresses`).
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(candidates, forKey: .candidates)
        try c.encode(lanAddresses, forKey: .lanAddresses)
        try c.encodeIfPresent(nat, forKey: .nat)
        try c.encodeIfPresent(lastAllocatedPort, forKey: .lastAllocatedPort)
    }

    /// Checks the candidates (count, kinds a peer may publish, priorities) against `RendezvousMessageLimits` and
    /// the NAT profile's ranges. Which addresses may be published is the server's decision, against the observed
    /// address (`CandidateFilter.isPublishable(_:observed:)`).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.check(candidates: candidates, field: "candidates",
                                          count: 0...RendezvousMessageLimits.maxPublishedCandidates)
        if let nat { try RendezvousMessageLimits.check(nat) }
        if let port = lastAllocatedPort { try RendezvousMessageLimits.check("lastAllocatedPort", port, 1...UInt16.max) }
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
    /// The other peer's candidates: the address the rendezvous observed first (`srflx`), then those it published.
    public var candidates: [Candidate]
    /// The other peer's NAT profile (`NATProfile.unknown` if it published none).
    public var peerNAT: NATProfile
    /// The last port the other peer's NAT is known to have allocated, when it published one.
    public var peerLastAllocatedPort: UInt16?
    /// This recipient's role: the requester is the initiator, the other peer the target.
    public var role: PunchRole
    /// Start probing this many microseconds after the message is received (clock-free start).
    public var startDelayMicroseconds: Int64
    /// The server's RTT estimate between the two peers (sum of half RTTs), in microseconds, as a hint.
    public var peerRTTMicroseconds: Int64?

    /// Creates a coordinate message.
    public init(
        requestID: UInt64?, sessionID: String, sessionKey: [UInt8], peer: NodeID, candidates: [Candidate],
        peerNAT: NATProfile, role: PunchRole, startDelayMicroseconds: Int64, peerRTTMicroseconds: Int64?,
        peerLastAllocatedPort: UInt16? = nil
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
        self.peerLastAllocatedPort = peerLastAllocatedPort
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
            candidates: try c.decode([Candidate].self, forKey: .candidates),
            peerNAT: try c.decode(NATProfile.self, forKey: .peerNAT),
            role: try c.decode(PunchRole.self, forKey: .role),
            startDelayMicroseconds: try c.decode(Int64.self, forKey: .startDelayMicroseconds),
            peerRTTMicroseconds: try c.decodeIfPresent(Int64.self, forKey: .peerRTTMicroseconds),
            peerLastAllocatedPort: try c.decodeIfPresent(UInt16.self, forKey: .peerLastAllocatedPort)
        )
        try validate()
    }

    /// Checks every field against `RendezvousMessageLimits`: session id and key, candidates (count, kinds,
    /// priorities; the first is the observed `srflx` address), NAT profile, start delay, RTT and last port. Which candidates may be probed is decided later, against this side's own addresses
    /// (`CandidateFilter`).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` naming the field.
    public func validate() throws(RendezvousError) {
        try RendezvousMessageLimits.checkSessionID(sessionID)
        try RendezvousMessageLimits.check("sessionKey length", sessionKey.count, RendezvousMessageLimits.sessionKeyLength)
        try RendezvousMessageLimits.check(candidates: candidates, field: "candidates",
                                          count: 1...RendezvousMessageLimits.maxCandidates)
        guard candidates.first?.kind == .serverReflexive else {
            throw RendezvousMessageLimits.violation("candidates", "the first must be the observed (srflx) address")
        }
        try RendezvousMessageLimits.check(peerNAT)
        if let port = peerLastAllocatedPort {
            try RendezvousMessageLimits.check("peerLastAllocatedPort", port, 1...UInt16.max)
        }
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
