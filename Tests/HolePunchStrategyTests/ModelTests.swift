import HolePunchNet
import Foundation
import Testing
@testable import HolePunchStrategy

@Suite struct NATModelTypeTests {
    @Test func stableNames() {
        #expect(NATType.allCases.map(\.rawValue) == ["full_cone", "restricted", "port_restricted", "symmetric", "unknown"])
    }

    @Test(arguments: [
        (NATMapping.endpointIndependent, NATFiltering.endpointIndependent, NATType.fullCone),
        (.endpointIndependent, .addressDependent, .restricted),
        (.endpointIndependent, .addressAndPortDependent, .portRestricted),
        (.addressDependent, .endpointIndependent, .symmetric),
        (.addressAndPortDependent, .addressAndPortDependent, .symmetric),
        (.unknown, .addressDependent, .unknown),
    ])
    func legacyTypeIsDerived(mapping: NATMapping, filtering: NATFiltering, expected: NATType) {
        #expect(NATProfile(mapping: mapping, filtering: filtering).type == expected)
    }

    @Test func presetsMatchTheLab() throws {
        #expect(NATProfile.labPresets.map(\.name) == ["full_cone", "restricted", "port_restricted", "symmetric_seq", "symmetric_random"])
        #expect(NATProfile.labPresets.map(\.profile.type) == [.fullCone, .restricted, .portRestricted, .symmetric, .symmetric])
        #expect(NATProfile.symmetricRandom.allocation == .random)
        #expect(NATProfile.symmetricSequential.portDelta == 1)
        for t in NATType.allCases {
            #expect(NATProfile(legacy: t).type == t)
        }
        #expect(try #require(NATProfile.preset(named: "symmetric_random")) == .symmetricRandom)
        #expect(NATProfile.preset(named: "bogus") == nil)
    }

    @Test func confidenceIsClamped() {
        #expect(NATProfile(mapping: .unknown, filtering: .unknown, confidence: 7).confidence == 1)
        #expect(NATProfile(mapping: .unknown, filtering: .unknown, confidence: .nan).confidence == 0)
    }

    @Test func worstNAT() {
        #expect(NATType.worst(.fullCone, .symmetric) == .symmetric)
        #expect(NATType.worst(.restricted, .portRestricted) == .portRestricted)
        #expect(NATType.worst(.fullCone, .fullCone) == .fullCone)
    }
}

@Suite struct PortListTests {
    @Test func orderIsPreservedAndDuplicatesDropped() {
        let list = PortList([.port(5000), .range(4998...5001), .port(10), .port(5000), .port(0)])
        #expect(Array(list) == [5000, 4998, 4999, 5001, 10])
    }

    @Test func truncateKeepsTheFirst() {
        var list: PortList = [3, 1, 2]
        list.truncate(to: 2)
        #expect(Array(list) == [3, 1])
    }
}

@Suite struct ValidationTests {
    @Test func aSafePlanIsUnchanged() {
        let plan = PunchPlan(ports: [1000, 1001, 1002], packetsPerRound: 3, interval: .milliseconds(100))
        let (out, reasons) = plan.validated()
        #expect(reasons.isEmpty)
        #expect(out == plan)
    }

    @Test func packetRateIsCappedByStretchingTheInterval() throws {
        let plan = PunchPlan(ports: PortList([.range(1000...1099)]), localSockets: 2, packetsPerRound: 50,
                             interval: .milliseconds(10))
        let (out, reasons) = plan.validated(PlanLimits(maxPacketsPerSecond: 200))
        #expect(out.packetsPerSecond <= 200)
        #expect(out.interval == .milliseconds(500))
        let reason = try #require(reasons.first { $0.field == "interval" })
        #expect(reason.description.contains("200 packets/s"))
    }

    @Test func configurableRateCap() {
        let plan = PunchPlan(ports: PortList([.range(1000...1009)]), packetsPerRound: 10, interval: .milliseconds(100))
        #expect(plan.validated(PlanLimits(maxPacketsPerSecond: 50)).plan.interval == .milliseconds(200))
        #expect(plan.validated(PlanLimits(maxPacketsPerSecond: 100)).reasons.isEmpty)
    }

    @Test func everyBoundIsClampedWithAReason() {
        let plan = PunchPlan(ports: PortList([.range(1...5000)]), localSockets: 500, packetsPerRound: 1000,
                             interval: .seconds(60), rounds: 1_000_000, timeout: .milliseconds(5),
                             connectTimeout: .seconds(100), startDelay: .seconds(60), initialRTT: .zero, lowTTL: 900,
                             handshakeCopies: 50)
        let (out, reasons) = plan.validated()
        let fields = Set(reasons.map(\.field))
        #expect(fields.isSuperset(of: ["ports", "localSockets", "packetsPerRound", "rounds", "timeout",
                                       "connectTimeout", "interval", "startDelay", "initialRTT", "lowTTL",
                                       "handshakeCopies"]))
        #expect(out.ports.count == 2048)
        #expect(Array(out.ports.prefix(2)) == [1, 2])
        #expect(out.localSockets == PlanLimits.default.maxLocalSockets)
        #expect(out.rounds == 1000)
        #expect(out.timeout == .milliseconds(100))
        #expect(out.lowTTL == nil)
        #expect(out.handshakeCopies == PlanLimits.default.maxHandshakeCopies)
        #expect(out.packetsPerSecond <= PlanLimits.default.maxPacketsPerSecond)
        #expect(reasons.allSatisfy { !$0.description.isEmpty })
    }

    @Test func packetsPerRoundNeverExceedsThePortCount() {
        let (out, reasons) = PunchPlan(ports: [1, 2], packetsPerRound: 5).validated()
        #expect(out.packetsPerRound == 2)
        #expect(reasons.map(\.field) == ["packetsPerRound"])
    }

    @Test func budgetFigures() {
        let plan = PunchPlan(ports: PortList([.range(1000...1019)]), localSockets: 2, packetsPerRound: 4,
                             interval: .milliseconds(100), rounds: 10, timeout: .milliseconds(550),
                             startDelay: .milliseconds(50))
        #expect(plan.effectiveRounds == 6)
        #expect(plan.packetBudget == 48)
        #expect(plan.probedPortCount == 20)
    }
}

@Suite struct DefaultStrategyTests {
    static func ctx(_ l: NATProfile, _ r: NATProfile, ports: [UInt16] = [50000]) -> PunchContext {
        PunchContext(localNAT: l, remoteNAT: r, candidatePorts: ports)
    }

    // (local, remote, timeout ms, connect ms, ports per round, start delay, interval, rounds)
    @Test(arguments: [
        (NATProfile.fullCone, NATProfile.fullCone, 1000, 800, 1, 50, 100, 3),
        (.fullCone, .restricted, 2000, 1500, 3, 100, 200, 5),
        (.portRestricted, .restricted, 2000, 1500, 3, 100, 200, 5),
        (.fullCone, .unknown, 2000, 1500, 3, 100, 200, 5),
        (.symmetricSequential, .fullCone, 4000, 3000, 5, 150, 300, 7),
        (.restricted, .symmetricRandom, 4000, 3000, 5, 150, 300, 7),
    ])
    func timingTableRows(l: NATProfile, r: NATProfile, timeout: Int, connect: Int, parallel: Int,
                         delay: Int, interval: Int, rounds: Int) {
        let plan = DefaultStrategy().plan(Self.ctx(l, r, ports: [50000, 50010, 50020, 50030, 50040]))
        #expect(plan.timeout == .milliseconds(timeout))
        #expect(plan.connectTimeout == .milliseconds(connect))
        #expect(plan.packetsPerRound == parallel)
        #expect(plan.startDelay == .milliseconds(delay))
        #expect(plan.interval == .milliseconds(interval))
        #expect(plan.rounds == rounds)
    }

    @Test func keepsEveryCandidateInOrderAndPredictsSequentialPortsNearestFirst() {
        let plan = DefaultStrategy().plan(Self.ctx(.fullCone, .symmetricSequential, ports: [50000, 40000, 45000]))
        #expect(Array(plan.ports) == [50000, 40000, 45000, 50001, 50002, 50003, 50004, 50005])
    }

    @Test func usesTheMeasuredRTT() {
        var c = Self.ctx(.fullCone, .fullCone)
        c.rtt = .milliseconds(42)
        #expect(DefaultStrategy().plan(c).initialRTT == .milliseconds(42))
        #expect(DefaultStrategy().plan(Self.ctx(.fullCone, .fullCone)).initialRTT == .milliseconds(333))
    }

    @Test func defaultPlansAreWithinTheDefaultLimits() {
        for (_, c) in StrategyCheck.allContexts() {
            #expect(DefaultStrategy().plan(c).validated().reasons.isEmpty)
        }
    }
}

@Suite struct PunchHistoryTests {
    static func success(_ ms: Int, offset: Int) -> PunchOutcome {
        .success(timeToConnect: .milliseconds(ms), winningPort: UInt16(50000 + offset), portOffset: offset, rounds: 2)
    }

    @Test func summariesPerPairAndPeer() {
        let h = PunchHistory()
        h.record(Self.success(100, offset: 1), local: .fullCone, remote: .symmetric, peerID: "a")
        h.record(.failure(code: .timeout, rounds: 7), local: .fullCone, remote: .symmetric, peerID: "b")
        h.record(Self.success(300, offset: 3), local: .fullCone, remote: .symmetric, peerID: "b")
        h.record(Self.success(900, offset: 0), local: .restricted, remote: .restricted, peerID: "a")

        let pair = h.summary(local: .fullCone, remote: .symmetric)
        #expect(pair.attempts == 3)
        #expect(pair.successes == 2)
        #expect(abs(pair.successRate - 2.0 / 3.0) < 1e-9)
        #expect(pair.medianTimeToConnect == .milliseconds(200))
        #expect(pair.lastWinningOffset == 3)

        let peerA = h.summary(peerID: "a")
        #expect(peerA.attempts == 2)
        #expect(peerA.medianTimeToConnect == .milliseconds(500))
        #expect(peerA.lastWinningOffset == 0)

        let none = h.summary(peerID: "nobody")
        #expect(none == .empty)
        #expect(none.successRate == 0)
    }

    @Test func oddMedianAndFill() {
        let h = PunchHistory()
        for ms in [50, 10, 30] { h.record(Self.success(ms, offset: 2), local: .fullCone, remote: .fullCone, peerID: "p") }
        let ctx = h.fill(PunchContext(localNAT: .fullCone, remoteNAT: .fullCone, peerID: "p"))
        #expect(ctx.pairHistory.medianTimeToConnect == .milliseconds(30))
        #expect(ctx.peerHistory.attempts == 3)
    }

    @Test func capacityDropsTheOldest() {
        let h = PunchHistory(capacity: 2)
        for i in 0..<5 { h.record(Self.success(10, offset: i), local: .fullCone, remote: .fullCone, peerID: "p") }
        #expect(h.records.count == 2)
        #expect(h.summary(peerID: "p").lastWinningOffset == 4)
    }

    @Test func concurrentRecording() async {
        let h = PunchHistory()
        await withTaskGroup(of: Void.self) { group in
            for i in 0..<100 {
                group.addTask { h.record(Self.success(i, offset: 0), local: .fullCone, remote: .fullCone, peerID: "p") }
            }
        }
        #expect(h.summary(peerID: "p").attempts == 100)
    }

    static func tempURL() -> URL {
        FileManager.default.temporaryDirectory.appendingPathComponent("hp-history-\(UUID().uuidString).json")
    }

    @Test func jsonRoundTrip() throws {
        let h = PunchHistory()
        h.record(Self.success(120, offset: -2), local: .portRestricted, remote: .symmetric, peerID: "n1")
        h.record(.failure(code: .allPortsFailed, rounds: 5), local: .portRestricted, remote: .symmetric, peerID: "n1")
        h.record(.failure(code: PunchFailureCode(rawValue: "somethingNew"), rounds: 1), local: .unknown,
                 remote: .fullCone, peerID: "n2")
        let url = Self.tempURL()
        defer { try? FileManager.default.removeItem(at: url) }
        try h.save(to: url)
        let loaded = try PunchHistory.load(from: url)
        #expect(loaded.records == h.records)
        #expect(loaded.summary(peerID: "n1") == h.summary(peerID: "n1"))
    }

    @Test func missingFileIsUnreadable() {
        #expect { try PunchHistory.load(from: URL(fileURLWithPath: "/nonexistent/h.json")) } throws: { e in
            (e as? PunchHistoryError)?.code == .unreadable
        }
    }

    @Test(arguments: ["not json", "{\"records\": []}", "{\"version\": 1, \"records\": [{\"bogus\": 1}]}"])
    func malformedFiles(text: String) throws {
        let url = Self.tempURL()
        defer { try? FileManager.default.removeItem(at: url) }
        try Data(text.utf8).write(to: url)
        #expect { try PunchHistory.load(from: url) } throws: { e in (e as? PunchHistoryError)?.code == .malformed }
    }

    @Test func futureVersionIsRejected() throws {
        let url = Self.tempURL()
        defer { try? FileManager.default.removeItem(at: url) }
        try Data("{\"version\": 99, \"records\": []}".utf8).write(to: url)
        #expect { try PunchHistory.load(from: url) } throws: { e in
            (e as? PunchHistoryError)?.code == .unsupportedVersion
        }
    }
}

@Suite struct NATModelEstimateTests {
    @Test func coneIsExact() {
        let ctx = StrategyCheck.context(local: SimulatedNAT.all[0], remote: SimulatedNAT.all[0], role: .initiator, attempt: 1)
        #expect(NATModel.hitProbability(plan: PunchPlan(ports: [50000]), ctx: ctx, remoteSockets: 1) == 1)
        #expect(NATModel.hitProbability(plan: PunchPlan(ports: [50001]), ctx: ctx, remoteSockets: 1) == 0)
    }

    @Test func birthdayGrowsWithPortsAndSockets() {
        let rnd = SimulatedNAT.named("symmetric_random")!
        let ctx = StrategyCheck.context(local: SimulatedNAT.all[0], remote: rnd, role: .initiator, attempt: 1)
        let small = PunchPlan(ports: PortList([.range(1000...1099)]), packetsPerRound: 100, rounds: 1)
        let big = PunchPlan(ports: PortList([.range(1000...1999)]), packetsPerRound: 100, rounds: 10, timeout: .seconds(5))
        let p1 = NATModel.hitProbability(plan: small, ctx: ctx, remoteSockets: 1)
        let p2 = NATModel.hitProbability(plan: big, ctx: ctx, remoteSockets: 1)
        let p3 = NATModel.hitProbability(plan: big, ctx: ctx, remoteSockets: 32)
        #expect(p1 > 0 && p1 < p2 && p2 < p3 && p3 < 1)
    }

    @Test func strictFiltersNeedBothSides() {
        let pr = SimulatedNAT.named("port_restricted")!
        let a = StrategyCheck.context(local: pr, remote: pr, role: .initiator, attempt: 1)
        let b = StrategyCheck.context(local: pr, remote: pr, role: .target, attempt: 1)
        let good = NATModel.successProbability(planA: PunchPlan(ports: [50000]), ctxA: a,
                                               planB: PunchPlan(ports: [40000]), ctxB: b)
        let oneSided = NATModel.successProbability(planA: PunchPlan(ports: [50000]), ctxA: a,
                                                   planB: PunchPlan(ports: [1]), ctxB: b)
        #expect(good == 1)
        #expect(oneSided == 0)
    }
}

@Suite struct FallbackWithSwiftStrategiesTests {
    struct Boom: Error, CustomStringConvertible { var description: String { "boom" } }

    struct Failing: PunchStrategy {
        let name = "failing"
        func plan(_ ctx: PunchContext) throws -> PunchPlan { throw Boom() }
        func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws -> PunchPlan? { throw Boom() }
        func onResult(_ ctx: PunchContext, _ outcome: PunchOutcome) throws { throw Boom() }
    }

    struct Fixed: PunchStrategy {
        let name = "fixed"
        func plan(_ ctx: PunchContext) throws -> PunchPlan { PunchPlan(ports: [1234]) }
    }

    static let ctx = PunchContext(localNAT: .fullCone, remoteNAT: .symmetricSequential, candidatePorts: [50000])

    @Test func anyErrorIsTypedAndCounted() throws {
        let s = FallbackStrategy(primary: Failing())
        #expect(s.plan(Self.ctx) == DefaultStrategy().plan(Self.ctx))
        let event = ProbeEvent(round: 1, elapsed: .zero, probesSent: 1, currentPlan: PunchPlan(ports: [1]))
        #expect(s.onProbe(Self.ctx, event) == nil)
        s.onResult(Self.ctx, .failure(code: .cancelled, rounds: 0))
        #expect(s.fallbackCount == 3)
        let e = try #require(s.lastError)
        #expect(e.code == .strategyFailed)
        #expect(e.cause == "boom")
        #expect(s.name == "failing")
    }

    @Test func aWorkingStrategyIsUsedAsIs() {
        let s = FallbackStrategy(primary: Fixed())
        #expect(Array(s.plan(Self.ctx).ports) == [1234])
        #expect(s.fallbackCount == 0)
        #expect(s.lastError == nil)
    }

    @Test func noPrimaryMeansDefaultEveryTime() {
        let s = FallbackStrategy(primary: nil, loadError: StrategyError(code: .fileUnreadable, message: "gone", file: "x.lua"))
        #expect(s.plan(Self.ctx) == DefaultStrategy().plan(Self.ctx))
        #expect(s.plan(Self.ctx) == DefaultStrategy().plan(Self.ctx))
        #expect(s.fallbackCount == 2)
        #expect(s.lastError?.code == .fileUnreadable)
        #expect(s.name == "unloaded")
    }

    @Test func missingFileFallsBack() {
        let s = FallbackStrategy.loading(path: "/nonexistent/strategy.lua")
        #expect(s.lastError?.code == .fileUnreadable)
        #expect(s.lastError?.description == "/nonexistent/strategy.lua: cannot read the file")
        #expect(s.plan(Self.ctx) == DefaultStrategy().plan(Self.ctx))
    }

    @Test func errorDescriptionIsFileLineMessage() {
        #expect(StrategyError(code: .runtime, message: "m", file: "f.lua", line: 3).description == "f.lua:3: m")
        #expect(StrategyError(code: .runtime, message: "m", file: "f.lua").description == "f.lua: m")
        #expect(StrategyError(code: .runtime, message: "m").description == "m")
    }
}

@Suite struct LargePortListTests {
    @Test func largeListsKeepOrderAndDropDuplicates() {
        let specs: [PortSpec] = [.range(60000...60100), .port(1), .range(59990...60010), .port(0), .port(1), .port(65535)]
        let list = PortList(specs)
        #expect(list.count == 101 + 1 + 10 + 1)
        #expect(Array(list.prefix(2)) == [60000, 60001])
        #expect(Array(list[101...]) == [1] + Array(59990...59999) + [65535])
    }
}
