import HolePunchNet
import PropertyBased
import Testing
@testable import HolePunchStrategy

/// Random and extreme values for everything a peer (or history) puts into a context.
enum HostileInput {
    /// Mostly extremes and boundary values, sometimes anything.
    static let int = Gen.oneOf(
        Gen.element(of: [Int.max, Int.min, Int.max - 1, Int.min + 1, 0, 1, -1, 65535, 65536, -65536, 1 << 62, -(1 << 62)]).map { $0! },
        Gen.int()
    )
    static let double = Gen.oneOf(
        Gen.element(of: [Double.nan, .infinity, -.infinity, .greatestFiniteMagnitude, -.greatestFiniteMagnitude,
                         .leastNonzeroMagnitude, 0, -0.0, 1, -1, 1e300]).map { $0! },
        Gen.double(in: -1e12...1e12)
    )
    static let duration = Gen.oneOf(
        Gen.element(of: [Duration.seconds(Int64.max), .seconds(Int64.min), .zero, .nanoseconds(1), .nanoseconds(-1),
                         .seconds(1 << 40), .milliseconds(80)]).map { $0! },
        Gen.int64().map { Duration.nanoseconds($0) }
    )
    static let ports = Gen.uint16().array(of: 0...12)

    static let profile = zip(Gen<NATMapping>.case, Gen<NATFiltering>.case, Gen<NATAllocation>.case, int, double)
        .map { mapping, filtering, allocation, delta, confidence in
            var p = NATProfile(mapping: mapping, filtering: filtering, allocation: allocation)
            // Bypass the initializer's clamps: a planner must survive whatever a `var` can hold.
            p.portDelta = delta
            p.confidence = confidence
            return p
        }

    static let history = zip(int, int, duration.optional(), int.optional())
        .map { HistorySummary(attempts: $0, successes: $1, medianTimeToConnect: $2, lastWinningOffset: $3) }

    static let context = zip(profile, profile, ports, duration.optional(), int, history, history, Gen<PunchRole>.case,
                             Gen.uint64())
        .map { local, remote, ports, rtt, attempt, pair, peer, role, seed in
            PunchContext(localNAT: local, remoteNAT: remote, candidateHosts: ["192.0.2.1"], candidatePorts: ports,
                         localPort: 4000, rtt: rtt, attempt: attempt, pairHistory: pair, peerHistory: peer, role: role,
                         seed: seed)
        }
}

/// A validated plan is one the executor can run: inside the limits, no port 0, a finite rate under the cap.
func expectUsable(_ plan: PunchPlan, _ limits: PlanLimits = .default) {
    let (v, _) = plan.validated(limits)
    #expect(v.ports.count <= limits.maxTotalPorts)
    #expect(!v.ports.contains(0))
    #expect((1...limits.maxLocalSockets).contains(v.localSockets))
    #expect((1...limits.maxPacketsPerRound).contains(v.packetsPerRound))
    #expect((1...limits.maxRounds).contains(v.rounds))
    #expect(limits.timeoutBounds.contains(v.timeout))
    #expect(limits.intervalBounds.lowerBound <= v.interval)
    #expect(v.startDelay >= .zero && v.startDelay <= limits.maxStartDelay)
    #expect(v.packetsPerSecond <= limits.maxPacketsPerSecond * 1.0001)
    _ = (v.effectiveRounds, v.packetBudget, v.probedPortCount)
}

@Suite("Planners: random and extreme contexts give a usable plan or a typed error, never a trap")
struct PlannerPropertyTests {
    @Test("DefaultStrategy")
    func defaultStrategy() async {
        await propertyCheck(count: 500, input: HostileInput.context) { ctx in
            let plan = DefaultStrategy().plan(ctx)
            #expect(plan.ports.count >= Set(ctx.candidatePorts.filter { $0 != 0 }).count)
            expectUsable(plan)
        }
    }

    @Test("plan validation with absurd plan fields")
    func validation() async {
        let counts = zip(HostileInput.ports, HostileInput.int, HostileInput.int, HostileInput.int, HostileInput.int,
                         HostileInput.int.optional())
        let times = zip(HostileInput.duration, HostileInput.duration, HostileInput.duration, HostileInput.duration,
                        HostileInput.duration)
        let plan = zip(counts, times).map { c, t in
            PunchPlan(ports: PortList(ports: c.0), localSockets: c.1, packetsPerRound: c.2, interval: t.0, rounds: c.3,
                      timeout: t.1, connectTimeout: t.2, startDelay: t.3, initialRTT: t.4, lowTTL: c.5,
                      handshakeCopies: c.4)
        }
        await propertyCheck(count: 500, input: plan) { plan in
            // The raw plan's derived figures must not trap either (strategies and tools read them).
            _ = (plan.packetsPerSecond, plan.effectiveRounds, plan.packetBudget, plan.probedPortCount)
            expectUsable(plan)
        }
    }

    @Test("the NAT model scores any plan against any context")
    func natModel() async {
        await propertyCheck(count: 300, input: HostileInput.context, HostileInput.context) { a, b in
            let planA = DefaultStrategy().plan(a), planB = DefaultStrategy().plan(b)
            let p = NATModel.successProbability(planA: planA, ctxA: a, planB: planB, ctxB: b)
            #expect(p >= 0 && p <= 1)
        }
    }
}

extension LuaTests {
    @Test("the shipped strategies via LuaStrategy: a plan or a StrategyError; the fallback always plans")
    func shippedStrategiesProperty() async throws {
        for name in LuaTests.shipped {
            let lua = try LuaStrategy(path: LuaTests.shippedPath(name))
            let fallback = FallbackStrategy(primary: lua)
            await propertyCheck(count: 150, input: HostileInput.context) { ctx in
                switch Result(catching: { () throws(StrategyError) in try lua.plan(ctx) }) {
                case .success(let plan): expectUsable(plan)
                case .failure(let error): #expect(!error.message.isEmpty)
                }
                expectUsable(fallback.plan(ctx))
            }
        }
    }
}
