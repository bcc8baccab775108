public import HolePunchNet

/// The protocol a router granted a mapping through.
///
/// The raw values are the names the CLI prints and a candidate's `ctx` will carry; they never change.
public enum PortMappingProtocol: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// Port Control Protocol (RFC 6887), MAP opcode.
    case pcp
    /// NAT Port Mapping Protocol (RFC 6886), through libnatpmp.
    case natpmp
    /// UPnP Internet Gateway Device (WANIPConnection AddPortMapping), through miniupnpc.
    case upnp

    /// The protocol's name.
    public var description: String { rawValue }
}

/// A mapping a router granted: datagrams to `external` reach our socket's port.
public struct PortMapping: Sendable, Hashable, Codable, CustomStringConvertible {
    /// How the mapping was made.
    public var mappingProtocol: PortMappingProtocol
    /// The router's public address and port that forward to us.
    public var external: SocketAddress
    /// Our socket's port, the one the router forwards to.
    public var internalPort: UInt16
    /// How long the router promised to keep the mapping, in seconds, counted from `grantedAt`.
    public var lifetimeSeconds: UInt32
    /// When the router granted (or last refreshed) the mapping, on the monotonic clock.
    public var grantedAt: ContinuousClock.Instant

    /// Creates a mapping value.
    public init(
        mappingProtocol: PortMappingProtocol, external: SocketAddress, internalPort: UInt16, lifetimeSeconds: UInt32,
        grantedAt: ContinuousClock.Instant
    ) {
        self.mappingProtocol = mappingProtocol
        self.external = external
        self.internalPort = internalPort
        self.lifetimeSeconds = lifetimeSeconds
        self.grantedAt = grantedAt
    }

    /// The lease as a duration.
    public var lease: Duration { .seconds(Int64(lifetimeSeconds)) }

    /// When the lease ends unless refreshed.
    public var expiresAt: ContinuousClock.Instant { grantedAt + lease }

    /// When to refresh: half the lifetime, as RFC 6887 §11.2.1 and RFC 6886 §3.3 recommend.
    public var refreshAt: ContinuousClock.Instant { grantedAt + lease / 2 }

    /// `pcp 203.0.113.10:40000 -> :4000 lease 7200s`.
    public var description: String { "\(mappingProtocol) \(external) -> :\(internalPort) lease \(lifetimeSeconds)s" }

    private enum CodingKeys: String, CodingKey { case mappingProtocol = "protocol", external, internalPort, lifetimeSeconds }

    /// Decodes a mapping; the grant time is not on the wire, so it becomes the time of decoding.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        mappingProtocol = try container.decode(PortMappingProtocol.self, forKey: .mappingProtocol)
        external = try container.decode(SocketAddress.self, forKey: .external)
        internalPort = try container.decode(UInt16.self, forKey: .internalPort)
        lifetimeSeconds = try container.decode(UInt32.self, forKey: .lifetimeSeconds)
        grantedAt = .now
    }

    /// Encodes protocol, external address, internal port and lifetime (`protocol`, `external`, …).
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(mappingProtocol, forKey: .mappingProtocol)
        try container.encode(external, forKey: .external)
        try container.encode(internalPort, forKey: .internalPort)
        try container.encode(lifetimeSeconds, forKey: .lifetimeSeconds)
    }
}
