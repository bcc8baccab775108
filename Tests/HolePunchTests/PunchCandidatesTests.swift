import HolePunchNet
import HolePunchStrategy
import Testing
@testable import HolePunch

/// Which candidates a punch checks and where their probes go (`CandidateChecks`), without sockets.
@Suite("Candidate checks: targets, order, shared rate cap")
struct PunchCandidatesTests {
    static func v4(_ host: String, _ port: UInt16) -> SocketAddress { try! SocketAddress(host: host, port: port) }
    static let srflx = Candidate(kind: .serverReflexive, address: v4("203.0.113.7", 50000))
    static let lan = Candidate(kind: .host, address: v4("192.168.1.20", 40000))
    static let mapped = Candidate(kind: .portMapped, address: v4("203.0.113.7", 61000))
    static let plan = PunchPlan(ports: [50000, 50001, 49999], packetsPerRound: 1, interval: .milliseconds(10))

    @Test("without typed candidates the targets are the plan's ports on the host, and the plan is unchanged")
    func legacyIsUnchanged() {
        var checks = CandidateChecks(pool: [Self.srflx, Candidate(kind: .serverReflexive, address: Self.v4("203.0.113.7", 50100))],
                                     base: 50000, typed: false)
        let sessionPlan = checks.build(Self.plan, limits: .default)
        #expect(sessionPlan == Self.plan)
        #expect(checks.targets == [50000, 50001, 49999].map { Self.v4("203.0.113.7", $0) })
        #expect(checks.candidate(for: Self.v4("203.0.113.7", 50001)).kind == .serverReflexive)
    }

    @Test("srflx gets the prediction moved onto its port; host and mapped their exact port; all interleaved")
    func targetsInterleaved() {
        let v6 = Candidate(kind: .serverReflexive, address: try! SocketAddress(host: "2001:db8::7", port: 50010))
        var checks = CandidateChecks(pool: [Self.lan, Self.srflx, v6, Self.mapped], base: 50000, typed: true)
        _ = checks.build(Self.plan, limits: .default)
        let v6Host = "2001:db8::7"
        #expect(checks.targets == [
            Self.lan.address, Self.srflx.address, try! SocketAddress(host: v6Host, port: 50010), Self.mapped.address,
            Self.v4("203.0.113.7", 50001), try! SocketAddress(host: v6Host, port: 50011),
            Self.v4("203.0.113.7", 49999), try! SocketAddress(host: v6Host, port: 50009),
        ])
    }

    @Test("a round holds one probe per candidate, and all of them together stay within the rate cap")
    func sharedRateCap() {
        var checks = CandidateChecks(pool: [Self.lan, Self.srflx, Self.mapped], base: 50000, typed: true)
        let limits = PlanLimits(maxPacketsPerSecond: 100)
        let sessionPlan = checks.build(Self.plan, limits: limits)
        #expect(sessionPlan.packetsPerRound == 3)
        #expect(sessionPlan.packetsPerSecond <= 100)
        #expect(sessionPlan.interval == .milliseconds(30), "stretched from 10 ms: 3 probes at 100/s")
    }

    @Test("a direct dial before any proof only when one candidate is checked")
    func directDialOnlyForOneCandidate() {
        var direct = Self.plan
        direct.dialCandidatesDirectly = true
        var several = CandidateChecks(pool: [Self.lan, Self.srflx], base: 50000, typed: true)
        #expect(several.build(direct, limits: .default).dialCandidatesDirectly == false)
        var one = CandidateChecks(pool: [Self.srflx], base: 50000, typed: true)
        #expect(one.build(direct, limits: .default).dialCandidatesDirectly == true)
        var legacy = CandidateChecks(pool: [Self.srflx, Self.mapped], base: 50000, typed: false)
        #expect(legacy.build(direct, limits: .default).dialCandidatesDirectly == true)
    }

    @Test("the plan orders, drops and caps candidates; the limits cap them too")
    func orderAndCap() {
        var checks = CandidateChecks(pool: [Self.lan, Self.srflx, Self.mapped], base: 50000, typed: true)
        var plan = Self.plan
        plan.candidateOrder = [2, 7, 0]
        _ = checks.build(plan, limits: .default)
        #expect(checks.checked == [Self.mapped, Self.lan], "index 7 names no candidate")
        plan.maxCandidates = 1
        _ = checks.build(plan, limits: .default)
        #expect(checks.checked == [Self.mapped])
        _ = checks.build(Self.plan, limits: PlanLimits(maxCandidates: 2))
        #expect(checks.checked == [Self.lan, Self.srflx])
    }

    @Test("a proven address nobody published is peer-reflexive; a predicted port keeps its candidate's kind")
    func winningCandidate() {
        var checks = CandidateChecks(pool: [Self.lan, Self.srflx], base: 50000, typed: true)
        _ = checks.build(Self.plan, limits: .default)
        #expect(checks.candidate(for: Self.v4("203.0.113.7", 49999)) == Candidate(kind: .serverReflexive, address: Self.v4("203.0.113.7", 49999), priority: Self.srflx.priority))
        #expect(checks.candidate(for: Self.v4("198.51.100.9", 1234)).kind == .peerReflexive)
    }

    @Test("candidates of a family the endpoint cannot reach, and relayed ones, are not checked")
    func reachability() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: endpoint)
        var punch = options(to: endpoint, session: "reach", key: sessionKey(), role: .initiator,
                            expecting: PunchIdentities.b.nodeID)
        punch.candidates = [
            Candidate(kind: .host, address: try SocketAddress(host: "2001:db8::7", port: 1000)),
            Candidate(kind: .relayed, address: Self.v4("198.51.100.1", 3478)),
            Self.lan,
        ]
        let checks = executor.candidateChecks(punch, host: .loopbackV4(port: 0))
        #expect(checks.pool == [Self.lan])
        #expect(executor.canReach(.ipv4) && !executor.canReach(.ipv6))
        await endpoint.close()
    }
}
