import Foundation

/// A named NAT setting used by `strategy check` and `strategy simulate`: the lab's five types plus unknown.
public struct SimulatedNAT: Sendable, Hashable {
    /// Lab name, e.g. `symmetric_random`.
    public var name: String
    /// Its profile.
    public var profile: NATProfile

    /// The lab's five presets and `unknown`.
    public static let all: [SimulatedNAT] =
        NATProfile.labPresets.map { SimulatedNAT(name: $0.name, profile: $0.profile) }
        + [SimulatedNAT(name: "unknown", profile: .unknown)]

    /// A setting by lab name (`symmetric` means `symmetric_seq`), or nil.
    public static func named(_ name: String) -> SimulatedNAT? {
        NATProfile.preset(named: name).map { SimulatedNAT(name: name, profile: $0) }
    }
}

/// Runs a strategy over synthetic contexts, without a network: the engine of `holepunch strategy check`.
public enum StrategyCheck {
    /// The synthetic peers' addresses and ports (documentation ranges of RFC 5737).
    static let hostA = "198.51.100.10", hostB = "203.0.113.20"
    static let portA: UInt16 = 40000, portB: UInt16 = 50000

    /// The context peer A sees when punching to B.
    public static func context(local: SimulatedNAT, remote: SimulatedNAT, role: PunchRole, attempt: Int,
                               rtt: Duration? = .milliseconds(80), seed: UInt64 = 0x5EED) -> PunchContext {
        let (lp, rp, rh) = role == .initiator ? (portA, portB, hostB) : (portB, portA, hostA)
        return PunchContext(localNAT: local.profile, remoteNAT: remote.profile, candidateHosts: [rh, "192.168.1.20"],
                            candidatePorts: [rp], localPort: lp, rtt: rtt, attempt: attempt,
                            role: role, seed: seed &+ UInt64(attempt), peerID: "peer-\(remote.name)")
    }

    /// Every context `check` covers: each NAT pair, both roles, attempts 1–5.
    public static func allContexts(rtt: Duration? = .milliseconds(80)) -> [(label: String, ctx: PunchContext)] {
        var out: [(String, PunchContext)] = []
        for a in SimulatedNAT.all {
            for b in SimulatedNAT.all {
                for role in PunchRole.allCases {
                    for attempt in 1...5 {
                        out.append(("\(a.name),\(b.name) \(role.rawValue) attempt \(attempt)",
                                    context(local: a, remote: b, role: role, attempt: attempt, rtt: rtt)))
                    }
                }
            }
        }
        return out
    }

    /// Plans every context; returns the errors, one per distinct failure, each saying in how many contexts
    /// it happened and the first one (so a broken script does not print 360 copies). A plan that differs
    /// between two identical calls, or that has no ports, is an error too.
    public static func run(_ strategy: some PunchStrategy, file: String) -> [StrategyError] {
        var order: [StrategyError] = []
        var seen: [StrategyError: (label: String, count: Int)] = [:]
        func add(_ e: StrategyError, _ label: String) {
            if let s = seen[e] {
                seen[e] = (s.label, s.count + 1)
            } else {
                seen[e] = (label, 1)
                order.append(e)
            }
        }
        let contexts = allContexts()
        for (label, ctx) in contexts {
            do {
                let plan = try strategy.plan(ctx)
                if plan.ports.isEmpty {
                    add(StrategyError(code: .invalidPlan, message: "the plan has no ports", file: file, field: "ports"),
                        label)
                }
                if try strategy.plan(ctx) != plan {
                    add(StrategyError(code: .invalidPlan, message: "plan is not deterministic for the same ctx",
                                      file: file), label)
                }
            } catch let e as StrategyError {
                add(e, label)
                // A script that ran out of budget, time or memory is failed: running it over the remaining
                // contexts would only take up to its time limit once more for each of them.
                if e.isSandboxAbort { break }
            } catch {
                add(StrategyError(code: .strategyFailed, message: "\(error)", file: file), label)
            }
        }
        return order.map { e in
            var e = e
            let s = seen[e]!
            e.message += " (in \(s.count) of \(contexts.count) contexts; first: \(s.label))"
            return e
        }
    }
}

/// A simple, explainable NAT model for `holepunch strategy simulate`: estimates how likely a pair of plans
/// opens a path. Exact for cone mappings (the candidate port is either probed or not), a coverage estimate
/// for sequential allocation, a birthday estimate for random allocation. It ignores loss and timing races.
public enum NATModel {
    /// Ports a random-allocation NAT draws from.
    static let randomRange = 64512.0
    /// How far a sequential NAT may have moved since the advertised port (other flows allocate too).
    static let sequentialSpread = 4

    /// Probability that `plan` (sent by the side whose context is `ctx`) hits the remote's mapping for
    /// us, given that the remote opens `remoteSockets` mappings.
    public static func hitProbability(plan: PunchPlan, ctx: PunchContext, remoteSockets: Int) -> Double {
        let probed = Array(plan.ports.prefix(plan.probedPortCount))
        guard let base = ctx.candidatePorts.first, !probed.isEmpty else { return 0 }
        let remote = ctx.remoteNAT
        let mapping = remote.mapping == .unknown ? .endpointIndependent : remote.mapping
        if mapping == .endpointIndependent || remote.allocation == .portPreserving {
            return probed.contains(base) ? 1 : 0
        }
        if remote.allocation == .random {
            // Each of our m probed ports misses all n fresh remote mappings with (1 - n/R).
            let n = Double(max(1, remoteSockets)), m = Double(probed.count)
            return 1 - Foundation.pow(1 - min(1, n / randomRange), m)
        }
        // Sequential (or unknown allocation): the mapping is base + k·delta for k in 1...spread, uniformly.
        let set = Set(probed)
        let hits = (1...max(1, sequentialSpread)).filter { k in
            remote.predictedPort(after: base, step: k).map(set.contains) ?? false
        }.count
        return Double(hits) / Double(sequentialSpread)
    }

    /// Whether a NAT lets in a packet from the peer's mapping without having sent to that exact port.
    static func lenient(_ p: NATProfile) -> Bool {
        p.filtering == .endpointIndependent || p.filtering == .addressDependent
    }

    /// Success probability of a punch where A runs `planA` with `ctxA` and B runs `planB` with `ctxB`.
    /// A path opens when one side's probe reaches the other's mapping and that NAT admits it: a lenient
    /// filter admits anything from the peer's address; a strict one only after its own side also hit.
    public static func successProbability(planA: PunchPlan, ctxA: PunchContext, planB: PunchPlan,
                                          ctxB: PunchContext) -> Double {
        let pA = hitProbability(plan: planA, ctx: ctxA, remoteSockets: planB.localSockets)
        let pB = hitProbability(plan: planB, ctx: ctxB, remoteSockets: planA.localSockets)
        let lenA = lenient(ctxA.localNAT), lenB = lenient(ctxB.localNAT)
        var total = 0.0
        for hitA in [true, false] {
            for hitB in [true, false] {
                let p = (hitA ? pA : 1 - pA) * (hitB ? pB : 1 - pB)
                let ok = (hitA && (lenB || hitB)) || (hitB && (lenA || hitA))
                if ok { total += p }
            }
        }
        return min(max(total, 0), 1)
    }
}

/// One line of `holepunch strategy simulate`.
public struct SimulationRow: Sendable, Hashable, Codable {
    /// `local_nat,remote_nat`.
    public var pair: String
    /// Attempt number.
    public var attempt: Int
    /// Ports in the validated plan (initiator side).
    public var portCount: Int
    /// The first few ports.
    public var firstPorts: [UInt16]
    /// Rounds.
    public var rounds: Int
    /// Interval in milliseconds.
    public var intervalMs: Double
    /// Timeout in milliseconds.
    public var timeoutMs: Double
    /// Packets per round.
    public var packetsPerRound: Int
    /// Local sockets.
    public var sockets: Int
    /// Total packets the initiator's plan may send.
    public var packetBudget: Int
    /// Estimated probability that the punch opens a path, in 0...1.
    public var successProbability: Double
    /// Clamp reasons for the initiator's plan.
    public var clamps: [String]
    /// The error, when the strategy failed for this pair (the row then shows the default plan).
    public var error: String?
}

/// Runs a strategy on both sides of each NAT pair and rates the plans with ``NATModel``.
public enum StrategySimulator {
    /// Rows for `pairs` (every pair when nil), attempts 1–`attempts`.
    public static func simulate(_ strategy: some PunchStrategy, pairs: [(SimulatedNAT, SimulatedNAT)]? = nil,
                                rtt: Duration = .milliseconds(80), attempts: Int = 3,
                                limits: PlanLimits = .default) -> [SimulationRow] {
        let pairs = pairs ?? SimulatedNAT.all.flatMap { a in SimulatedNAT.all.map { (a, $0) } }
        var rows: [SimulationRow] = []
        for (a, b) in pairs {
            for attempt in 1...max(1, attempts) {
                let ctxA = StrategyCheck.context(local: a, remote: b, role: .initiator, attempt: attempt, rtt: rtt)
                let ctxB = StrategyCheck.context(local: b, remote: a, role: .target, attempt: attempt, rtt: rtt)
                var failure: String?
                func planned(_ ctx: PunchContext) -> PunchPlan {
                    do { return try strategy.plan(ctx) } catch {
                        if failure == nil { failure = (error as? StrategyError)?.description ?? "\(error)" }
                        return DefaultStrategy().plan(ctx)
                    }
                }
                let (planA, reasons) = planned(ctxA).validated(limits)
                let (planB, _) = planned(ctxB).validated(limits)
                let p = NATModel.successProbability(planA: planA, ctxA: ctxA, planB: planB, ctxB: ctxB)
                rows.append(SimulationRow(
                    pair: "\(a.name),\(b.name)", attempt: attempt, portCount: planA.ports.count,
                    firstPorts: Array(planA.ports.prefix(4)), rounds: planA.rounds,
                    intervalMs: planA.interval.milliseconds, timeoutMs: planA.timeout.milliseconds,
                    packetsPerRound: planA.packetsPerRound, sockets: planA.localSockets,
                    packetBudget: planA.packetBudget, successProbability: p,
                    clamps: reasons.map(\.description), error: failure))
            }
        }
        return rows
    }
}
