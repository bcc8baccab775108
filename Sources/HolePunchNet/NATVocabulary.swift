// The one vocabulary for what a NAT does, shared by discovery (HolePunchSTUN), planning (HolePunchStrategy) and the
// rendezvous. It lives in the lowest Swift module because both of its users sit beside each other above it and
// neither should depend on the other: STUN must not pull in Lua, the strategy layer must not pull in GnuTLS.

/// The legacy NAT classification of the seed (`macula_hole_punch`), derived from a ``NATProfile``.
///
/// The raw values are the seed's stable names, used in Lua (`ctx.local_nat.type`), JSON and the CLI.
public enum NATType: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// Endpoint-independent mapping and filtering.
    case fullCone = "full_cone"
    /// Endpoint-independent mapping, address-dependent filtering.
    case restricted = "restricted"
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    case portRestricted = "port_restricted"
    /// Mapping depends on the destination: a new public port per remote endpoint.
    case symmetric = "symmetric"
    /// Not measured, or the measurement was inconclusive.
    case unknown = "unknown"

    /// The stable name, e.g. `port_restricted`.
    public var description: String { rawValue }

    /// How hard this NAT is to punch; the worse side of a pair picks the seed's timing row.
    /// `unknown` ranks just below `symmetric`, matching the seed's "anything else" row.
    public var difficulty: Int {
        switch self {
        case .fullCone: 0
        case .restricted: 1
        case .portRestricted: 2
        case .unknown: 3
        case .symmetric: 4
        }
    }

    /// The harder of two NAT types.
    public static func worst(_ a: NATType, _ b: NATType) -> NATType {
        a.difficulty >= b.difficulty ? a : b
    }
}

/// How a NAT maps one local address to public ones (RFC 4787 §4.1, measured as RFC 5780 §4.3 describes).
///
/// The raw values are the stable names of Lua (`ctx.local_nat.mapping`) and the rendezvous wire; discovery's JSON
/// (`holepunch nat detect --json`) has always spelled them as the case names (`discoveryName`).
public enum NATMapping: String, Sendable, Hashable, Codable, CaseIterable {
    /// The same public address for every destination.
    case endpointIndependent = "endpoint_independent"
    /// A new public address per destination IP.
    case addressDependent = "address_dependent"
    /// A new public address per destination IP and port ("symmetric").
    case addressAndPortDependent = "address_and_port_dependent"
    /// Not measured, or not measurable with the server used.
    case unknown = "unknown"
}

/// Which inbound packets a NAT lets through to a mapping (RFC 4787 §5, measured as RFC 5780 §4.4 describes).
///
/// Raw values and `discoveryName` as for ``NATMapping``.
public enum NATFiltering: String, Sendable, Hashable, Codable, CaseIterable {
    /// Anyone may send to the mapping.
    case endpointIndependent = "endpoint_independent"
    /// Only IPs the inside host has sent to.
    case addressDependent = "address_dependent"
    /// Only IP:port pairs the inside host has sent to.
    case addressAndPortDependent = "address_and_port_dependent"
    /// Not measured, or not measurable with the server used.
    case unknown = "unknown"
}

/// How a NAT picks the public port of a fresh mapping.
///
/// Raw values and `discoveryName` as for ``NATMapping``.
public enum NATAllocation: String, Sendable, Hashable, Codable, CaseIterable {
    /// The public port equals the local port when free.
    case portPreserving = "port_preserving"
    /// Each fresh mapping takes the previous public port plus a constant delta (``NATProfile/portDelta``).
    case sequential = "sequential"
    /// No pattern: public ports are drawn at random.
    case random = "random"
    /// Not measured, or not enough fresh mappings were observed.
    case unknown = "unknown"
}

/// One of the three NAT behaviour dimensions, with the second spelling that discovery's JSON uses.
///
/// Two spellings exist because two wire formats predate this shared vocabulary and neither may change:
/// snake_case raw values in Lua and rendezvous messages, camelCase in `nat detect --json`. The camelCase name is
/// derived from the raw value, so a new case cannot get the two out of step.
package protocol NATBehaviourDimension: RawRepresentable<String>, CaseIterable {}

extension NATBehaviourDimension {
    /// The camelCase name used by discovery's JSON, e.g. `addressAndPortDependent` for `address_and_port_dependent`.
    package var discoveryName: String {
        let words = rawValue.split(separator: "_")
        return words.prefix(1).joined() + words.dropFirst().map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
    }

    /// The value with that `discoveryName`, or nil.
    package init?(discoveryName: String) {
        guard let match = Self.allCases.first(where: { $0.discoveryName == discoveryName }) else { return nil }
        self = match
    }
}

extension NATMapping: NATBehaviourDimension {}
extension NATFiltering: NATBehaviourDimension {}
extension NATAllocation: NATBehaviourDimension {}

/// A measured NAT behaviour: mapping, filtering, port allocation and the observed port delta.
public struct NATProfile: Sendable, Hashable, Codable {
    /// Mapping behaviour.
    public var mapping: NATMapping
    /// Filtering behaviour.
    public var filtering: NATFiltering
    /// Port allocation behaviour.
    public var allocation: NATAllocation
    /// Observed difference between consecutive public ports (sequential allocation); 0 when not known.
    /// Meaningful values lie in ±``maxPortDelta``; planners must still not trust it (it is a public `var`).
    public var portDelta: Int
    /// How sure discovery is of this profile, in 0...1.
    public var confidence: Double

    /// The largest meaningful port delta: two ports differ by at most 65535.
    public static let maxPortDelta = 65535

    /// Creates a profile; `portDelta` is clamped into ±``maxPortDelta`` and `confidence` into 0...1 (NaN becomes 0).
    public init(
        mapping: NATMapping,
        filtering: NATFiltering,
        allocation: NATAllocation = .unknown,
        portDelta: Int = 0,
        confidence: Double = 1
    ) {
        self.mapping = mapping
        self.filtering = filtering
        self.allocation = allocation
        self.portDelta = min(max(portDelta, -Self.maxPortDelta), Self.maxPortDelta)
        self.confidence = confidence.isNaN ? 0 : min(max(confidence, 0), 1)
    }

    /// Decodes a profile and refuses values no NAT produces: a port delta beyond ±``maxPortDelta``, a confidence
    /// outside 0...1. Profiles arrive from other peers (through the rendezvous) and from files, so they are
    /// refused rather than clamped: a sender of nonsense should hear about it.
    ///
    /// - Throws: `DecodingError.dataCorrupted` naming the field.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let delta = try c.decode(Int.self, forKey: .portDelta)
        guard (-Self.maxPortDelta...Self.maxPortDelta).contains(delta) else {
            throw DecodingError.dataCorruptedError(forKey: .portDelta, in: c,
                                                   debugDescription: "port delta \(delta) is outside ±\(Self.maxPortDelta)")
        }
        let confidence = try c.decode(Double.self, forKey: .confidence)
        guard confidence.isFinite, (0...1).contains(confidence) else {
            throw DecodingError.dataCorruptedError(forKey: .confidence, in: c,
                                                   debugDescription: "confidence \(confidence) is outside 0...1")
        }
        self.init(mapping: try c.decode(NATMapping.self, forKey: .mapping),
                  filtering: try c.decode(NATFiltering.self, forKey: .filtering),
                  allocation: try c.decode(NATAllocation.self, forKey: .allocation),
                  portDelta: delta, confidence: confidence)
    }

    /// The most plausible profile for a legacy type, for peers that only report the seed's labels.
    /// A symmetric NAT is assumed sequential with delta 1, the common case; confidence is 0.5 because
    /// nothing was measured.
    public init(legacy type: NATType) {
        switch type {
        case .fullCone: self = .fullCone
        case .restricted: self = .restricted
        case .portRestricted: self = .portRestricted
        case .symmetric: self = NATProfile.symmetricSequential
        case .unknown: self = .unknown
        }
        if type != .unknown { confidence = 0.5 }
    }

    /// The public port a sequential NAT would give its `k`-th next mapping after `base`: `base + k·delta` (delta 1
    /// when unknown), or nil when that is not a port. Never traps, whatever `portDelta` and `k` hold: the delta
    /// comes from another peer, and a planner must not die of someone else's number.
    public func predictedPort(after base: UInt16, step k: Int) -> UInt16? {
        let delta = portDelta == 0 ? 1 : portDelta
        let (offset, o1) = k.multipliedReportingOverflow(by: delta)
        let (port, o2) = Int(base).addingReportingOverflow(offset)
        guard !o1, !o2, (1...65535).contains(port) else { return nil }
        return UInt16(port)
    }

    /// The legacy label: EIM+EIF full cone, EIM+ADF restricted, EIM+APDF port restricted, any
    /// other known mapping symmetric. An EIM NAT with unknown filtering is reported as port restricted,
    /// the safe assumption for punching.
    public var type: NATType {
        switch mapping {
        case .unknown:
            return .unknown
        case .addressDependent, .addressAndPortDependent:
            return .symmetric
        case .endpointIndependent:
            switch filtering {
            case .endpointIndependent: return .fullCone
            case .addressDependent: return .restricted
            case .addressAndPortDependent, .unknown: return .portRestricted
            }
        }
    }

    /// Lab preset `full_cone`.
    public static let fullCone = NATProfile(
        mapping: .endpointIndependent, filtering: .endpointIndependent, allocation: .portPreserving)
    /// Lab preset `restricted`.
    public static let restricted = NATProfile(
        mapping: .endpointIndependent, filtering: .addressDependent, allocation: .portPreserving)
    /// Lab preset `port_restricted`.
    public static let portRestricted = NATProfile(
        mapping: .endpointIndependent, filtering: .addressAndPortDependent, allocation: .portPreserving)
    /// Lab preset `symmetric_seq`: a new port per destination, allocated sequentially with delta 1.
    public static let symmetricSequential = NATProfile(
        mapping: .addressAndPortDependent, filtering: .addressAndPortDependent,
        allocation: .sequential, portDelta: 1)
    /// Lab preset `symmetric_random`: a new, random port per destination.
    public static let symmetricRandom = NATProfile(
        mapping: .addressAndPortDependent, filtering: .addressAndPortDependent, allocation: .random)
    /// Nothing known.
    public static let unknown = NATProfile(
        mapping: .unknown, filtering: .unknown, allocation: .unknown, confidence: 0)

    /// The lab's five NAT types by their lab names, in the lab's order.
    public static let labPresets: [(name: String, profile: NATProfile)] = [
        ("full_cone", .fullCone),
        ("restricted", .restricted),
        ("port_restricted", .portRestricted),
        ("symmetric_seq", .symmetricSequential),
        ("symmetric_random", .symmetricRandom),
    ]

    /// A lab preset by name (`full_cone`, `restricted`, `port_restricted`, `symmetric_seq`,
    /// `symmetric_random`, plus `symmetric` as `symmetric_seq` and `unknown`), or nil.
    public static func preset(named name: String) -> NATProfile? {
        switch name {
        case "symmetric": return .symmetricSequential
        case "unknown": return .unknown
        default: return labPresets.first { $0.name == name }?.profile
        }
    }
}
