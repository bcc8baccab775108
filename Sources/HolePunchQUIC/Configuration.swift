public import HolePunchNet

/// Which incoming connections an endpoint accepts, judged on the peer's authenticated NodeID.
public enum AcceptPolicy: Sendable {
    /// Accept every authenticated peer.
    case any
    /// Accept no incoming connections: the endpoint only dials.
    case none
    /// Accept only these NodeIDs.
    case allow(Set<NodeID>)
    /// Ask a closure, on the endpoint's event loop during the handshake: keep it fast and non-blocking.
    case decide(@Sendable (IncomingHandshake) -> Bool)
}

/// What an accept policy knows about a peer when it decides: all of it authenticated except the address.
public struct IncomingHandshake: Sendable, Hashable {
    /// The peer's NodeID, proven by its certificate.
    public var nodeID: NodeID
    /// Where the handshake comes from.
    public var address: SocketAddress
    /// The TLS server name the client asked for (SNI), if any. Punches put their session id here, so a
    /// target can tell which session an incoming connection belongs to.
    public var serverName: String?
}

/// When a new client must first prove it receives at its address, with a Retry round trip (RFC 9000 §8.1), before
/// the endpoint spends a TLS session, a key exchange and a signature on its handshake.
///
/// Either way, a source that the handshake hint provider answers for (a punch probe proved that exact address) is
/// taken as validated, and a source whose IP address already holds
/// ``EndpointConfiguration/maxUnvalidatedHandshakesPerHost`` unvalidated handshakes gets a Retry.
public enum AddressValidation: Sendable, Hashable {
    /// Every new client pays one extra round trip: a flood of spoofed Initials costs no TLS work at all.
    case always
    /// Clients pay the extra round trip only while this many handshakes from unvalidated sources are already in
    /// progress: normal operation keeps one-round-trip handshakes, a flood costs at most this many TLS sessions
    /// (and connection slots) at a time.
    case underLoad(pendingHandshakes: Int)
}

/// Settings for an ``Endpoint`` and the connections it makes or accepts.
public struct EndpointConfiguration: Sendable {
    /// The identity presented in every handshake.
    public var identity: Identity
    /// Which incoming connections to accept.
    public var acceptPolicy: AcceptPolicy
    /// The TLS ALPN protocol both sides must offer: what this endpoint dials with (unless
    /// ``ConnectOptions/alpn`` names another) and the first it accepts.
    public var alpn: String
    /// Further protocols this endpoint accepts besides ``alpn``, so one socket can serve several; a connection
    /// tells which one it speaks in ``QUICConnection/alpn``. Empty by default. With ``alpn``, at most
    /// ``maxALPNs`` names of 1 to ``maxALPNLength`` bytes each (``Endpoint/bind(_:configuration:logger:)`` checks).
    public var additionalALPNs: [String] = []

    /// The most protocols an endpoint can list (GnuTLS 3.7 keeps at most 8 per session).
    public static let maxALPNs = 8
    /// The longest protocol name in bytes (GnuTLS 3.7 refuses names of 32 bytes or more).
    public static let maxALPNLength = 31

    /// Why `alpns` cannot be an endpoint's protocol list, or nil when it can. Past GnuTLS's limits every
    /// handshake's TLS setup fails, so a list that binds would silently accept nothing; an empty name is not
    /// a protocol at all (RFC 7301).
    package static func alpnProblem(_ alpns: [String]) -> String? {
        if alpns.count > maxALPNs { return "\(alpns.count) ALPN protocols; at most \(maxALPNs) fit" }
        if let bad = alpns.first(where: { $0.utf8.isEmpty || $0.utf8.count > maxALPNLength }) {
            return "ALPN protocol \"\(bad)\" has \(bad.utf8.count) bytes; 1 to \(maxALPNLength) fit"
        }
        return nil
    }
    /// Close a connection after this long without traffic.
    public var idleTimeout: Duration
    /// Send a PING after this long without traffic, so NAT mappings stay open; nil disables keep-alive. It must
    /// stay below the shortest UDP mapping timeout of the NATs on the path (and below ``idleTimeout``); default
    /// ``defaultKeepAliveInterval``. A PING also tells whether the active path still answers: when it does not,
    /// the connection re-checks its other paths (``PathChange/Reason/pathFailed``).
    public var keepAliveInterval: Duration?
    /// The default keep-alive interval, 25 s: below the 30 s UDP timeout that RFC 4787 REQ-5 lets a NAT use for
    /// a mapping without traffic and below common home routers' timeouts (30–60 s; Linux conntrack keeps an
    /// unreplied UDP flow 30 s, a replied one 120 s). Nothing measures a NAT's idle mapping lifetime yet (NAT
    /// discovery measures mapping, filtering and allocation only), so the default is this fixed value.
    public static let defaultKeepAliveInterval: Duration = .seconds(25)
    /// Give up a handshake after this long.
    public var handshakeTimeout: Duration
    /// The RTT assumed before any is measured; it sets how soon Initials are retransmitted.
    /// QUIC's default is 333 ms; punching wants much less.
    public var initialRTT: Duration
    /// The flow-control window for each stream, in bytes; extended as the application reads.
    public var streamReceiveWindow: Int
    /// The flow-control window for a whole connection, in bytes.
    public var connectionReceiveWindow: Int
    /// How many bidirectional streams a peer may open at once.
    public var maxIncomingStreams: Int
    /// How many unacknowledged bytes a stream buffers before `write` waits.
    public var streamSendBuffer: Int
    /// How many connections the endpoint holds at most; new Initials beyond it are dropped (or, from unvalidated
    /// sources, answered with a Retry). Unvalidated handshakes do not count: ``addressValidation`` bounds them.
    public var maxConnections: Int
    /// When new clients must validate their address first (default: once 16 unvalidated handshakes are pending).
    public var addressValidation: AddressValidation
    /// How many handshakes from unvalidated sources one IP address may have in progress at once; beyond it its
    /// new clients get a Retry. Any port counts: a spoofer picks ports freely. Default 8.
    public var maxUnvalidatedHandshakesPerHost: Int
    /// How many handshakes from validated sources (a Retry token, or an address the hint provider vouches for) one
    /// IP address may have in progress at once; beyond it their Initials are dropped, and the clients retransmit
    /// later. Keeps one real host from filling ``maxConnections`` with half-open handshakes. Default 128.
    public var maxPendingHandshakesPerHost: Int
    /// The longest a graceful ``QUICConnection/close(errorCode:reason:timeout:)`` waits for the peer to acknowledge
    /// what was written before it closes anyway (its default wait is 16 PTOs, at least 1 s, at most this).
    public var closeTimeout: Duration = .seconds(5)
    /// How many non-QUIC datagrams and unreachable reports ``Endpoint/nonQUICDatagrams`` holds for a reader that
    /// is behind; more are dropped and counted (``EndpointStats/nonQUICDropped``). Default 1024: about 1.5 MB of
    /// datagrams of one Ethernet MTU, 64 MiB in theory if every one were a fragmented 64 KiB datagram.
    public var nonQUICBufferLimit: Int = 1024
    /// Test seam: when false, the client presents no certificate, so servers can be tested against that case.
    var presentsCertificate = true

    /// Creates a configuration with sane defaults for an identity.
    public init(
        identity: Identity,
        acceptPolicy: AcceptPolicy = .any,
        alpn: String = "holepunch/1",
        idleTimeout: Duration = .seconds(30),
        keepAliveInterval: Duration? = EndpointConfiguration.defaultKeepAliveInterval,
        handshakeTimeout: Duration = .seconds(10),
        initialRTT: Duration = .milliseconds(100),
        streamReceiveWindow: Int = 4 << 20,
        connectionReceiveWindow: Int = 16 << 20,
        maxIncomingStreams: Int = 128,
        streamSendBuffer: Int = 4 << 20,
        maxConnections: Int = 4096,
        addressValidation: AddressValidation = .underLoad(pendingHandshakes: 16),
        maxUnvalidatedHandshakesPerHost: Int = 8,
        maxPendingHandshakesPerHost: Int = 128
    ) {
        self.identity = identity
        self.acceptPolicy = acceptPolicy
        self.alpn = alpn
        self.idleTimeout = idleTimeout
        self.keepAliveInterval = keepAliveInterval
        self.handshakeTimeout = handshakeTimeout
        self.initialRTT = initialRTT
        self.streamReceiveWindow = streamReceiveWindow
        self.connectionReceiveWindow = connectionReceiveWindow
        self.maxIncomingStreams = maxIncomingStreams
        self.streamSendBuffer = streamSendBuffer
        self.maxConnections = maxConnections
        self.addressValidation = addressValidation
        self.maxUnvalidatedHandshakesPerHost = maxUnvalidatedHandshakesPerHost
        self.maxPendingHandshakesPerHost = maxPendingHandshakesPerHost
    }
}

/// Per-dial overrides of the endpoint's configuration.
public struct ConnectOptions: Sendable {
    /// Overrides ``EndpointConfiguration/initialRTT`` for this dial (punching retransmits Initials fast).
    public var initialRTT: Duration?
    /// Overrides ``EndpointConfiguration/handshakeTimeout`` for this dial.
    public var handshakeTimeout: Duration?
    /// The TLS server name (SNI) to send; the acceptor sees it in ``IncomingHandshake/serverName`` and
    /// ``QUICConnection/serverName``. Letters, digits, '-' and '.' only.
    public var serverName: String?
    /// How many times each handshake datagram is sent (1–4; default 1). See ``HandshakeHints/packetCopies``.
    public var handshakePacketCopies: Int
    /// The application protocol (TLS ALPN) to offer; nil offers ``EndpointConfiguration/alpn``.
    public var alpn: String?
    /// Whether ``Endpoint/connect(to:expecting:options:)`` returns once *our* side of the handshake is complete
    /// (we verified the peer), one round trip before confirmation (the peer verified us).
    ///
    /// Data written at once then leaves with our handshake's last flight, and the first answer comes a round trip
    /// earlier. The price: a peer that rejects our certificate may close the connection after it was returned, so
    /// a stream operation fails (`handshakeFailed`) rather than the dial. Default false.
    public var returnsBeforeConfirmation: Bool

    /// Creates options; nil keeps the endpoint's value.
    public init(
        initialRTT: Duration? = nil, handshakeTimeout: Duration? = nil, serverName: String? = nil,
        handshakePacketCopies: Int = 1, alpn: String? = nil, returnsBeforeConfirmation: Bool = false
    ) {
        self.returnsBeforeConfirmation = returnsBeforeConfirmation
        self.alpn = alpn
        self.initialRTT = initialRTT
        self.handshakeTimeout = handshakeTimeout
        self.serverName = serverName
        self.handshakePacketCopies = handshakePacketCopies
    }
}

/// How to run the handshake of connections that a known peer address will open to this endpoint: a punch tells
/// its socket what it learned about the path before the peer dials. See ``Endpoint/setHandshakeHintProvider(_:)``.
public struct HandshakeHints: Sendable, Hashable {
    /// How many times each datagram is sent until the handshake is done (1–4). QUIC ignores duplicate packets, so
    /// copies cost only bandwidth, and they turn a per-datagram loss rate p into about p^copies for independent
    /// loss: on a path losing 36 % a handshake of ~6 datagrams completes without a retransmission 7 % of the time
    /// with one copy and 43 % with two. Only for addresses a probe proved: copies bypass ngtcp2's 3×
    /// anti-amplification accounting, so a server that multiplied its first flight for an address that was merely
    /// expected (an IP the rendezvous named) would amplify Initials spoofed from it.
    public var packetCopies: Int
    /// Initial RTT for the handshake (nil: the endpoint's).
    public var initialRTT: Duration?

    /// Creates hints.
    public init(packetCopies: Int = 1, initialRTT: Duration? = nil) {
        self.packetCopies = packetCopies
        self.initialRTT = initialRTT
    }

    /// The most copies allowed.
    public static let maxPacketCopies = 4
}

/// Counters for one endpoint's socket.
public struct EndpointStats: Sendable, Hashable {
    /// Datagrams received.
    public var datagramsReceived = 0
    /// Datagrams sent.
    public var datagramsSent = 0
    /// Datagrams in the STUN range (first byte 0x00–0x03), queued for ``Endpoint/nonQUICDatagrams`` or dropped there.
    public var stunDatagrams = 0
    /// Non-QUIC datagrams and unreachable reports dropped because ``Endpoint/nonQUICDatagrams`` held
    /// ``EndpointConfiguration/nonQUICBufferLimit`` items its reader had not taken yet.
    public var nonQUICDropped = 0
    /// Datagrams dropped: not QUIC, not STUN, unroutable, malformed, or unacceptable Initials.
    public var datagramsDropped = 0
    /// CONNECTION_CLOSE datagrams sent again to peers that still sent to a connection this side had closed: their
    /// copy of the close was lost (the closing state; rate-limited per connection).
    public var closesRepeated = 0
    /// Handshakes accepted and completed.
    public var connectionsAccepted = 0
    /// Handshakes that failed, either direction.
    public var handshakeFailures = 0
    /// Sends that the kernel refused (full buffer or an error); QUIC retransmits them.
    public var sendErrors = 0
    /// Server handshakes started: each cost a TLS session, and a key exchange and a signature once it answers.
    public var incomingHandshakesStarted = 0
    /// Retry packets sent to new clients whose address was not yet validated (``AddressValidation``).
    public var retriesSent = 0
    /// Initials whose Retry token was forged, expired, or issued to another address; each got a stateless
    /// INVALID_TOKEN close.
    public var invalidRetryTokens = 0
    /// Initials from validated sources dropped at a limit (``EndpointConfiguration/maxPendingHandshakesPerHost``
    /// or ``EndpointConfiguration/maxConnections``).
    public var initialsRefused = 0
    /// Authenticated path probes received (challenges and responses of the path layer).
    public var pathProbesReceived = 0
    /// Times a connection's active path changed, by this side's switch or by following the peer.
    public var pathSwitches = 0
    /// Times a connection's active path went silent (data unanswered for three probe timeouts) and all its paths
    /// were re-checked.
    public var pathRechecks = 0
    /// Of ``pathSwitches``, the moves from a relayed path to a direct one.
    public var relayToDirectMoves = 0
    /// Of ``pathSwitches``, the moves from a direct path to a relayed one.
    public var directToRelayMoves = 0
    /// Datagrams forwarded from a peer that arrived through an attached relay (``Endpoint/attachRelay(_:)``).
    public var relayedDatagramsReceived = 0
    /// Datagrams sent wrapped through an attached relay.
    public var relayedDatagramsSent = 0
    /// Sends on a relayed path that had no relay attached for its server or no permission for its peer (the
    /// framing refused to wrap): dropped, and counted in ``sendErrors`` too.
    public var relaySendsRefused = 0
}

/// Statistics for one connection.
public struct ConnectionStats: Sendable, Hashable {
    /// The smoothed round-trip time.
    public var smoothedRTT: Duration
    /// The minimum round-trip time seen.
    public var minRTT: Duration
    /// The latest round-trip sample.
    public var latestRTT: Duration
    /// UDP payload bytes sent on this connection.
    public var bytesSent: Int
    /// UDP payload bytes received on this connection.
    public var bytesReceived: Int
    /// Packets sent.
    public var packetsSent: Int
    /// Packets received.
    public var packetsReceived: Int
    /// Probe timeouts so far: each means ngtcp2 declared data lost and retransmitted it.
    /// (ngtcp2 0.12 exposes no per-packet loss counter; the PTO count is its nearest public figure.)
    public var probeTimeouts: Int
    /// The congestion window, bytes.
    public var congestionWindow: Int
}
