import Foundation
import HolePunch
import HolePunchNet
import HolePunchStrategy
import PropertyBased
import Synchronization
import Testing
@testable import HolePunchRendezvous

/// A JSON number as a hostile sender might write it: an extreme integer, a fraction, or one beyond Int64.
enum WireNumber: Sendable {
    case int(Int64)
    case double(Double)

    var json: Any {
        switch self {
        case .int(let v): v
        case .double(let v): v
        }
    }

    static let gen = Gen.oneOf(
        Gen.element(of: [Int64.max, Int64.min, Int64.max - 1, 0, -1, 1, 65535, 65536, -65536, 10_000_001, 60_000_001])
            .map { WireNumber.int($0!) },
        Gen.int64().map { WireNumber.int($0) },
        Gen.element(of: [1e30, -1e30, 1e308, 0.5, -0.5, 1.0000001, Double.leastNonzeroMagnitude]).map { WireNumber.double($0!) },
        Gen.double(in: -2...2).map { WireNumber.double($0) }
    )
}

enum WireText {
    static let gen = Gen.oneOf(
        Gen.element(of: ["", "a:b", "0123456789abcdef0123456789abcdef", String(repeating: "f", count: 64),
                         String(repeating: "f", count: 65), "ü", "\u{0}", "a b", "../x", String(repeating: "x", count: 5000)])
            .map { $0! },
        Gen.letterOrNumber.string(of: 0...80)
    )
    static let address = Gen.element(of: [
        "127.0.0.1:4000", "[::1]:4000", "192.168.1.5:5000", "8.8.8.8:53", "224.0.0.1:9", "255.255.255.255:9",
        "0.0.0.0:1", "169.254.1.1:1", "[fe80::1]:1", "[::ffff:127.0.0.1]:22", "198.51.100.7:0", "198.51.100.7:65535",
        "999.1.1.1:1", "1.2.3.4:99999", "garbage", "",
    ]).map { $0! }
}

/// Candidates as a hostile sender might write them: any kind name, any address text, any priority.
enum WireCandidate {
    static let kind = Gen.element(of: ["host", "srflx", "mapped", "prflx", "relay", "bogus", ""]).map { $0! }

    /// A candidate's JSON; `priority` nil gives the kind's default priority (valid unless the kind is unknown).
    static func json(kind: String, address: String, priority: WireNumber?) -> [String: Any] {
        let base = CandidateKind(rawValue: kind).map { Candidate.priority(kind: $0, family: .ipv4) } ?? 0
        return ["kind": kind, "address": address, "priority": priority?.json ?? Int64(base)]
    }

    static let hostile = zip(kind, WireText.address, WireNumber.gen.optional())
        .map { json(kind: $0, address: $1, priority: $2) }
}

/// The decode as a `Result`, so closures keep the typed error.
func decodeResult<M: Decodable>(_ type: M.Type, _ body: [UInt8]) -> Result<M, RendezvousError> {
    Result { () throws(RendezvousError) in try RendezvousFraming.decode(type, from: body) }
}

@Suite("Decoders: random and extreme wire values give a typed error or a message within RendezvousMessageLimits")
struct DecoderPropertyTests {
    /// Counts the inputs that passed validation, so a test can show its success branch ran at all.
    final class Counter: Sendable {
        let value = Mutex(0)
        func add() { value.withLock { $0 += 1 } }
        var count: Int { value.withLock { $0 } }
    }

    @Test("coordinate messages, then candidate choice and planning with what was accepted")
    func coordinates() async {
        // Each field is valid three times in four, hostile otherwise, so a good share of messages pass and reach the
        // candidate filter and the planner.
        func mostly(_ valid: WireNumber) -> Generator<WireNumber, AnySequence<(index: Int, value: Any)>> {
            Gen.frequency((3, Gen.always(valid)), (1, WireNumber.gen))
        }
        let numbers = zip(mostly(.int(1)), mostly(.double(0.5)), mostly(.int(150_000)), mostly(.int(20_000)),
                          WireNumber.gen.optional())
        // Biased towards valid lists, so that a good share of messages pass and reach the planner.
        let plausible = Gen.element(of: ["198.51.100.7:4000", "192.168.1.5:5000", "127.0.0.1:4000", "224.0.0.1:9",
                                         "[2001:db8::7]:4000"]).map { $0! }
        let candidateLists = Gen.frequency(
            (3, zip(plausible, zip(Gen.element(of: ["host", "srflx", "mapped"]).map { $0! }, plausible).array(of: 0...3))
                .map { first, rest -> [[String: Any]] in
                    [WireCandidate.json(kind: "srflx", address: first, priority: nil)]
                        + rest.map { WireCandidate.json(kind: $0, address: $1, priority: nil) }
                }),
            (1, WireCandidate.hostile.array(of: 0...16)))
        let keys = Gen.frequency((3, Gen.always([Int](repeating: 7, count: 32))), (1, Gen.int(in: -1...300).array(of: 0...80)))
        let sessionIDs = Gen.frequency((3, Gen.always("0123456789abcdef")), (1, WireText.gen))
        let shape = zip(sessionIDs, candidateLists, keys,
                        Gen.bool(0.8), Gen.element(of: ["sequential", "random", "unknown", "port_preserving"]).map { $0! })
        let filter = CandidateFilter(rendezvous: try! SocketAddress(parsing: "198.51.100.1:3478"),
                                     ourObserved: try! SocketAddress(parsing: "203.0.113.5:4000"), families: [.ipv4, .ipv6])
        let accepted = Counter()
        await propertyCheck(count: 400, input: numbers, shape) { n, s in
            let (delta, confidence, start, rtt, requestID) = n
            let (sessionID, candidates, key, validPeer, allocation) = s
            var coordinate: [String: Any] = [
                "sessionID": sessionID, "sessionKey": key, "candidates": candidates,
                "peer": validPeer ? node(2).description : "not-a-node",
                "peerNAT": ["mapping": "address_and_port_dependent", "filtering": "address_and_port_dependent",
                            "allocation": allocation, "portDelta": delta.json, "confidence": confidence.json],
                "role": "target", "startDelayMicroseconds": start.json, "peerRTTMicroseconds": rtt.json,
            ]
            if let requestID { coordinate["requestID"] = requestID.json }
            guard let data = try? JSONSerialization.data(withJSONObject: ["coordinate": ["_0": coordinate]]) else { return }
            let decoded: ServerMessage
            switch decodeResult(ServerMessage.self, Array(data)) {
            case .success(let message): decoded = message
            case .failure(let error):
                #expect(error.code == .protocolViolation)
                return
            }
            guard case .coordinate(let c) = decoded else {
                Issue.record("decoded as \(decoded)")
                return
            }
            accepted.add()
            #expect(abs(c.peerNAT.portDelta) <= NATProfile.maxPortDelta)
            #expect((0...1).contains(c.peerNAT.confidence))
            #expect((0...RendezvousMessageLimits.maxStartDelayMicroseconds).contains(c.startDelayMicroseconds))
            #expect((1...RendezvousMessageLimits.maxCandidates).contains(c.candidates.count))
            #expect(RendezvousMessageLimits.sessionKeyLength.contains(c.sessionKey.count))
            let permitted = filter.permitted(c.candidates)
            #expect(permitted.allSatisfy { !$0.address.scope.isNeverAProbeTarget && $0.address.scope != .loopback })
            #expect(permitted.allSatisfy { $0.kind != .peerReflexive && $0.kind != .relayed })
            #expect(zip(permitted, permitted.dropFirst()).allSatisfy { $0.priority >= $1.priority }, "by priority")
            let ctx = PunchContext(localNAT: .portRestricted, remoteNAT: c.peerNAT,
                                   candidateHosts: permitted.map(\.address.host), candidatePorts: permitted.map(\.address.port),
                                   rtt: c.peerRTTMicroseconds.map { .microseconds($0) }, role: c.role)
            let (plan, _) = DefaultStrategy().plan(ctx).validated()
            #expect(!plan.ports.contains(0))
            #expect(plan.packetsPerSecond <= PlanLimits.default.maxPacketsPerSecond * 1.0001)
        }
        #expect(accepted.count > 0, "no generated coordinate passed validation: the success path went untested")
    }

    @Test("registrations (client to server), then the server's register with what was accepted")
    func registrations() async {
        // Typed candidates three times in four, an older peer's LAN addresses otherwise.
        let lists = Gen.frequency((3, WireCandidate.hostile.array(of: 0...16).map { ["candidates": $0] as [String: Any] }),
                                  (1, WireText.address.array(of: 0...14).map { ["lanAddresses": $0] as [String: Any] }))
        let input = zip(lists, WireNumber.gen, WireNumber.gen, Gen.bool, WireText.address)
        let stored = Counter()
        await propertyCheck(count: 400, input: input) { list, delta, confidence, withNAT, observedText in
            var registration = list
            if withNAT {
                registration["nat"] = ["mapping": "endpoint_independent", "filtering": "address_dependent",
                                       "allocation": "sequential", "portDelta": delta.json, "confidence": confidence.json]
            }
            guard let data = try? JSONSerialization.data(withJSONObject: ["register": ["_0": registration]]),
                  let observed = try? SocketAddress(parsing: observedText) else { return }
            let decoded: ClientMessage
            switch decodeResult(ClientMessage.self, Array(data)) {
            case .success(let message): decoded = message
            case .failure(let error):
                #expect(error.code == .protocolViolation)
                return
            }
            guard case .register(let r) = decoded else {
                Issue.record("decoded as \(decoded)")
                return
            }
            #expect(r.candidates.count <= RendezvousMessageLimits.maxPublishedCandidates)
            #expect(r.candidates.allSatisfy { $0.kind != .peerReflexive })
            #expect(r.candidates.count { $0.kind == .relayed } <= RendezvousMessageLimits.maxRelayedCandidates)
            // With no TURN servers configured, the state stores no relay candidate (isPublishable refuses them below).
            var state = RendezvousState()
            let actions = state.register(node: node(1), connection: 1, observed: observed, registration: r, now: .zero)
            if let peer = state.peer(node(1)) {
                stored.add()
                #expect(peer.registration.candidates.allSatisfy { CandidateFilter.isPublishable($0, observed: observed) })
                #expect(peer.candidates.first == Candidate(kind: .serverReflexive, address: observed), "observed first")
            } else {
                #expect(errorCode(actions) == RendezvousError.Code.protocolViolation.name)
            }
        }
        #expect(stored.count > 0, "no generated registration was stored: the success path went untested")
    }

    @Test("client strings: session ids and outcomes of any length and alphabet")
    func clientStrings() async {
        await propertyCheck(count: 300, input: WireText.gen, WireText.gen) { sessionID, outcome in
            let body = Array(RendezvousFraming.frame(ClientMessage.punchResult(sessionID: sessionID, outcome: outcome)).dropFirst(4))
            switch decodeResult(ClientMessage.self, body) {
            case .success(let message):
                guard case .punchResult(let id, let text) = message else { return }
                #expect((1...RendezvousMessageLimits.maxSessionIDLength).contains(id.utf8.count))
                #expect(!id.contains(":"))
                #expect((1...RendezvousMessageLimits.maxCodeLength).contains(text.utf8.count))
            case .failure(let error):
                #expect(error.code == .protocolViolation)
            }
        }
    }
}
