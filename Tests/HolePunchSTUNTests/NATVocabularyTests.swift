import Foundation
import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// Discovery and the strategy layer share one NAT vocabulary (HolePunchNet), but each wire format keeps its spelling:
/// camelCase in `nat detect --json`, snake_case in Lua and rendezvous messages.
@Suite struct NATVocabularyTests {
    static func behaviour(_ mapping: NATMapping, _ filtering: NATFiltering, _ allocation: NATAllocation) throws
        -> NATBehaviour
    {
        let evidence = NATEvidence(
            server: try SocketAddress(parsing: "127.0.0.1:3478"), localAddress: try SocketAddress(parsing: "127.0.0.1:4000"),
            tests: [], notes: [], mappingConfidence: 1, filteringConfidence: 1, allocationConfidence: 1)
        return NATBehaviour(mapping: mapping, filtering: filtering, allocation: allocation, portDelta: 2, confidence: 1,
                            evidence: evidence)
    }

    @Test("discovery's JSON spells every dimension as before (camelCase) and reads it back")
    func discoveryJSONNames() throws {
        let mappings = ["endpointIndependent", "addressDependent", "addressAndPortDependent", "unknown"]
        let allocations = ["portPreserving", "sequential", "random", "unknown"]
        for (i, mapping) in NATMapping.allCases.enumerated() {
            let allocation = NATAllocation.allCases[i]
            let filtering = NATFiltering.allCases[i]
            let value = try Self.behaviour(mapping, filtering, allocation)
            let json = try JSONEncoderShim.encode(value)
            #expect(json.contains("\"mapping\":\"\(mappings[i])\""))
            #expect(json.contains("\"filtering\":\"\(mappings[i])\""))
            #expect(json.contains("\"allocation\":\"\(allocations[i])\""))
            #expect(try JSONDecoder().decode(NATBehaviour.self, from: Data(json.utf8)) == value)
        }
    }

    @Test("a snake_case name in discovery's JSON is refused, naming the field")
    func discoveryJSONRefusesTheOtherSpelling() throws {
        let json = try JSONEncoderShim.encode(try Self.behaviour(.endpointIndependent, .unknown, .random))
            .replacingOccurrences(of: "\"endpointIndependent\"", with: "\"endpoint_independent\"")
        #expect(throws: DecodingError.self) { try JSONDecoder().decode(NATBehaviour.self, from: Data(json.utf8)) }
    }

    @Test("a measured behaviour becomes the strategy's profile field by field, in snake_case on the wire")
    func profileFromBehaviour() throws {
        let profile = NATProfile(try Self.behaviour(.endpointIndependent, .addressAndPortDependent, .portPreserving))
        #expect(profile.mapping == .endpointIndependent)
        #expect(profile.filtering == .addressAndPortDependent)
        #expect(profile.allocation == .portPreserving)
        #expect(profile.portDelta == 2)
        let json = try JSONEncoderShim.encode(profile)
        #expect(json.contains("\"filtering\":\"address_and_port_dependent\""))
        #expect(json.contains("\"allocation\":\"port_preserving\""))
    }

    @Test("a report keeps unknown filtering unknown, where planning assumes port restricted")
    func legacyLabels() {
        #expect(NATBehaviour.legacyLabel(mapping: .endpointIndependent, filtering: .unknown) == "unknown")
        #expect(NATProfile(mapping: .endpointIndependent, filtering: .unknown).type == .portRestricted)
        #expect(NATBehaviour.legacyLabel(mapping: .addressDependent, filtering: .unknown) == NATType.symmetric.rawValue)
    }
}
