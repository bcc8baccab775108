public import HolePunchNet

// The mapping, filtering and allocation vocabulary (`NATMapping`, `NATFiltering`, `NATAllocation`) is HolePunchNet's,
// shared with the strategy layer; this file adds what only discovery has: the evidence behind a verdict.

/// One STUN transaction that discovery ran, and what came of it.
public struct NATTestRecord: Hashable, Sendable, Codable {
    /// Which test: `basic`, `filtering.changeIPAndPort`, `filtering.changePort`, `filtering.control`,
    /// `mapping.alternateIP`, `mapping.alternateIPAndPort`, `mapping.alternatePort`, `allocation.N`.
    public var name: String
    /// Index of the local socket used (0 is the primary socket).
    public var socket: Int
    /// The local address of that socket.
    public var localAddress: SocketAddress
    /// Where the request went.
    public var destination: SocketAddress
    /// The CHANGE-REQUEST flags sent, if any.
    public var changeIP: Bool
    /// The CHANGE-REQUEST flags sent, if any.
    public var changePort: Bool
    /// How many times the request was sent.
    public var transmissions: Int
    /// `answered`, `error`, `noResponse` (every retransmission went unanswered), `abandoned` (overall timeout)
    /// or `wrongSource` (the server ignored CHANGE-REQUEST).
    public var outcome: String
    /// The reflexive address the server reported.
    public var mappedAddress: SocketAddress?
    /// The address the response actually came from.
    public var responseFrom: SocketAddress?
    /// The STUN error code, for error responses.
    public var errorCode: Int?
}

/// The evidence behind a ``NATBehaviour`` verdict.
public struct NATEvidence: Hashable, Sendable, Codable {
    /// The server's primary address.
    public var server: SocketAddress
    /// The server's OTHER-ADDRESS, if it announced one.
    public var otherAddress: SocketAddress?
    /// The primary socket's local address.
    public var localAddress: SocketAddress
    /// `false` when the reflexive address equals the local address (no NAT), `true` when it differs,
    /// `nil` when unknown (no answer, or the local IP is a wildcard and the port matched).
    public var natDetected: Bool?
    /// Every test, in the order it was started.
    public var tests: [NATTestRecord]
    /// Why a verdict is what it is, in words.
    public var notes: [String]
    /// Per-dimension confidence, 0…1 (mapping, filtering, allocation).
    public var mappingConfidence: Double
    /// See ``mappingConfidence``.
    public var filteringConfidence: Double
    /// See ``mappingConfidence``.
    public var allocationConfidence: Double

    /// The port of the latest mapping discovery saw (the last answered test, in the order the tests started: the
    /// allocation tests come last): the last port the NAT is known to have allocated, which is where a
    /// sequential NAT's next mapping follows, however many ports discovery itself consumed.
    public var lastAllocatedPort: UInt16? {
        tests.last(where: { $0.mappedAddress != nil })?.mappedAddress?.port
    }

    /// Every distinct reflexive address seen, in order.
    public var mappedAddresses: [SocketAddress] {
        var seen: [SocketAddress] = []
        for test in tests {
            if let mapped = test.mappedAddress, !seen.contains(mapped) { seen.append(mapped) }
        }
        return seen
    }
}

/// What NAT behaviour discovery concluded.
public struct NATBehaviour: Hashable, Sendable, Codable {
    /// Mapping behaviour.
    public var mapping: NATMapping
    /// Filtering behaviour.
    public var filtering: NATFiltering
    /// Port allocation behaviour.
    public var allocation: NATAllocation
    /// For `sequential` allocation, the measured port step between consecutive fresh mappings.
    public var portDelta: Int?
    /// Overall confidence, 0…1: the mean of the per-dimension confidences in ``evidence``.
    public var confidence: Double
    /// The evidence.
    public var evidence: NATEvidence
    /// The reflexive address of the primary socket, as seen by the server's primary address.
    public var reflexiveAddress: SocketAddress? { evidence.tests.first?.mappedAddress }

    /// The legacy (RFC 3489-style) label: `full_cone`, `restricted`, `port_restricted`, `symmetric` or `unknown`.
    ///
    /// Any mapping other than endpoint-independent is `symmetric`; with endpoint-independent mapping, the
    /// filtering picks `full_cone` / `restricted` / `port_restricted`; anything unmeasured is `unknown`.
    public var legacyLabel: String {
        NATBehaviour.legacyLabel(mapping: mapping, filtering: filtering)
    }

    /// The legacy label for a mapping and filtering pair (see ``legacyLabel``).
    public static func legacyLabel(mapping: NATMapping, filtering: NATFiltering) -> String {
        // Unlike `NATProfile.type`, which plans with port restricted for an unmeasured filtering, a report says
        // what was measured: unknown.
        let type: NATType = switch (mapping, filtering) {
        case (.addressDependent, _), (.addressAndPortDependent, _): .symmetric
        case (.endpointIndependent, .endpointIndependent): .fullCone
        case (.endpointIndependent, .addressDependent): .restricted
        case (.endpointIndependent, .addressAndPortDependent): .portRestricted
        default: .unknown
        }
        return type.rawValue
    }

    /// Creates a verdict.
    public init(
        mapping: NATMapping, filtering: NATFiltering, allocation: NATAllocation, portDelta: Int?,
        confidence: Double, evidence: NATEvidence
    ) {
        self.mapping = mapping
        self.filtering = filtering
        self.allocation = allocation
        self.portDelta = portDelta
        self.confidence = confidence
        self.evidence = evidence
    }

    private enum CodingKeys: String, CodingKey {
        case mapping, filtering, allocation, portDelta, confidence, evidence, legacyLabel
    }

    /// Decodes a verdict; `legacyLabel` in the input is ignored because it is derived.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            mapping: try Self.decode(NATMapping.self, .mapping, from: c),
            filtering: try Self.decode(NATFiltering.self, .filtering, from: c),
            allocation: try Self.decode(NATAllocation.self, .allocation, from: c),
            portDelta: try c.decodeIfPresent(Int.self, forKey: .portDelta),
            confidence: try c.decode(Double.self, forKey: .confidence),
            evidence: try c.decode(NATEvidence.self, forKey: .evidence)
        )
    }

    /// Encodes the verdict, including the derived `legacyLabel`.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        // Discovery's JSON spells the dimensions in camelCase (`discoveryName`), as it did before they were shared.
        try c.encode(mapping.discoveryName, forKey: .mapping)
        try c.encode(filtering.discoveryName, forKey: .filtering)
        try c.encode(allocation.discoveryName, forKey: .allocation)
        try c.encodeIfPresent(portDelta, forKey: .portDelta)
        try c.encode(confidence, forKey: .confidence)
        try c.encode(evidence, forKey: .evidence)
        // The label is derived, but written out so that JSON readers need not re-derive it.
        try c.encode(legacyLabel, forKey: .legacyLabel)
    }

    /// One dimension in discovery's camelCase spelling.
    private static func decode<D: NATBehaviourDimension>(
        _ type: D.Type, _ key: CodingKeys, from c: KeyedDecodingContainer<CodingKeys>
    ) throws -> D {
        let name = try c.decode(String.self, forKey: key)
        guard let value = D(discoveryName: name) else {
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "unknown value \(name)")
        }
        return value
    }
}

extension NATProfile {
    /// The strategy's view of a measured behaviour: the same mapping, filtering and allocation; a missing port
    /// delta becomes 0.
    public init(_ behaviour: NATBehaviour) {
        self.init(mapping: behaviour.mapping, filtering: behaviour.filtering, allocation: behaviour.allocation,
                  portDelta: behaviour.portDelta ?? 0, confidence: behaviour.confidence)
    }
}
