public import HolePunchNet
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
        let lan = "10.0.1.20"
        // Typed candidates as a peer on a LAN publishes them: its reflexive address and its host address.
        let candidates = [(CandidateKind.serverReflexive, rh), (.host, lan)].compactMap { kind, host in
            (try? SocketAddress(host: host, port: rp)).map { Candidate(kind: kind, address: $0) }
        }
        return PunchContext(localNAT: local.profile, remoteNAT: remote.profile, candidateHosts: [rh, lan],
                            candidatePorts: [rp], localPort: lp, rtt: rtt, attempt: attempt,
                            role: role, seed: seed &+ UInt64(attempt), peerID: "peer-\(remote.name)",
                            candidates: candidates)
    }

    /// The histories `check` plans with: none; successes (every summary field set); failures only, where
    /// `attempts > 0` but `median_ttc_ms` and `last_offset` are still nil, as after a first failed punch.
    static let histories: [(label: String, pair: HistorySummary, peer: HistorySummary)] = [
        ("no history", .empty, .empty),
        ("history of successes",
         HistorySummary(attempts: 4, successes: 3, medianTimeToConnect: .milliseconds(240), lastWinningOffset: 2),
         HistorySummary(attempts: 2, successes: 1, medianTimeToConnect: .milliseconds(180), lastWinningOffset: 1)),
        ("history of failures", HistorySummary(attempts: 3, successes: 0), HistorySummary(attempts: 1, successes: 0)),
    ]

    /// Every context `check` covers: each NAT pair, both roles, attempts 1–5, with an 80 ms RTT and with
    /// none measured (`ctx.rtt_ms` nil, as before the rendezvous has measured it), each with every history of
    /// `histories`, each with a relay available and without (`ctx.relay_available`); a sequential peer publishes its
    /// last allocated port on even attempts (`ctx.last_allocated_port`, the NAT's counter 3 ports past registration).
    /// The label names the case, so a failure can be reproduced.
    public static func allContexts() -> [(label: String, ctx: PunchContext)] {
        var out: [(String, PunchContext)] = []
        for a in SimulatedNAT.all {
            for b in SimulatedNAT.all {
                for role in PunchRole.allCases {
                    for attempt in 1...5 {
                        for rtt in [Duration.milliseconds(80), nil] {
                            for history in histories {
                                for relay in [false, true] {
                                    var ctx = context(local: a, remote: b, role: role, attempt: attempt, rtt: rtt)
                                    ctx.pairHistory = history.pair
                                    ctx.peerHistory = history.peer
                                    ctx.relayAvailable = relay
                                    let rttLabel = rtt.map { "rtt \(Int($0.milliseconds)) ms" } ?? "rtt nil"
                                    var label = "\(a.name),\(b.name) \(role.rawValue) attempt \(attempt), \(rttLabel), "
                                        + history.label + (relay ? ", relay available" : ", no relay")
                                    if b.profile.allocation == .sequential, attempt % 2 == 0,
                                       let base = ctx.candidatePorts.first {
                                        ctx.lastAllocatedPort = base &+ 3
                                        label += ", last allocated \(base &+ 3)"
                                    }
                                    out.append((label, ctx))
                                }
                            }
                        }
                    }
                }
            }
        }
        return out
    }

    /// Plans `ctx`, up to twice more if a call overran only its wall-clock limit. The instruction budget is the
    /// deterministic bound on a script's work; the wall clock also counts the time the thread was not running,
    /// which on a loaded machine can exceed the limit for a script that is fine (with 4320 contexts per file, two
    /// overruns in a row happened on a machine with a load of 10 on 2 cores). A script that is really slow overruns
    /// every call, and is reported.
    static func planRetryingWallClock(_ strategy: some PunchStrategy, _ ctx: PunchContext) throws -> PunchPlan {
        for _ in 1...2 {
            do {
                return try strategy.plan(ctx)
            } catch let e as StrategyError where e.code == .timeLimitExceeded {
                continue
            }
        }
        return try strategy.plan(ctx)
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
                let plan = try planRetryingWallClock(strategy, ctx)
                if plan.ports.isEmpty {
                    add(StrategyError(code: .invalidPlan, message: "the plan has no ports", file: file, field: "ports"),
                        label)
                }
                if try planRetryingWallClock(strategy, ctx) != plan {
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
        // Sequential (or unknown allocation): the mapping is counter + k·delta for k in 1...spread, uniformly, where
        // the counter is the last port the NAT allocated when the peer published it.
        let set = Set(probed)
        let counter = ctx.sequentialBase ?? base
        let hits = (1...max(1, sequentialSpread)).filter { k in
            remote.predictedPort(after: counter, step: k).map(set.contains) ?? false
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
    /// The outcome replayed into history and `on_result` for the next attempt: success when
    /// ``successProbability`` is at least 0.5 (the model's likelier outcome).
    public var simulatedSuccess: Bool
    /// The initiator's relay choice (``RelayUse``'s description: `never`, `first`, `after 1.2 s`).
    public var relay: String = "never"
    /// Where the modelled connection ends up: `direct`, `relay → direct` (carried over the relay until the punch
    /// proved a path), `relayed` (the punch failed, the relay carries it) or `none`.
    public var path: String = "none"
    /// For a connection the relay carries first: the time from the punch's start until the relay carries it, that is
    /// the relay's delay plus its setup (``NATModel/relaySetupRTTs`` RTTs); nil when the relay is not used.
    public var relayMs: Double?
    /// Clamp reasons for the initiator's plan.
    public var clamps: [String]
    /// The error, when the strategy failed for this pair (the row then shows the default plan), or when its
    /// `on_result` failed.
    public var error: String?
}

/// Runs a strategy on both sides of each NAT pair and rates the plans with ``NATModel``.
///
/// Attempts are a series, as when a peer punches to the same peer again: each attempt's modelled outcome
/// (``SimulationRow/simulatedSuccess``) is recorded in each side's ``PunchHistory`` (so later contexts carry
/// it in `ctx.history`) and reported to each side's `on_result`, so the plan a learning strategy makes for
/// attempt n+1 shows what it learnt from attempt n. Histories start empty for every pair.
public enum StrategySimulator {
    /// Rows for `pairs` (every pair when nil), attempts 1–`attempts`.
    ///
    /// `peer` is the target side's own copy of the strategy (two peers never share a script's state); when nil,
    /// `strategy` plans both sides and only the initiator's outcomes are reported to its `on_result`.
    ///
    /// `counterMoved`: each NAT's port counter moved this many ports past the registration's port before the punch
    /// (NAT discovery and other flows allocate too), and each peer published the last port its NAT allocated
    /// (`ctx.last_allocated_port`); the model aims a sequential NAT's mapping from there. Nil: nothing published,
    /// the counter is at the registration's port.
    ///
    /// `relayAvailable` is each side's `ctx.relay_available`; with it, a row whose plans use the relay is modelled by
    /// ``NATModel/path(success:planA:planB:outcome:relayAvailable:rtt:)``.
    public static func simulate(_ strategy: any PunchStrategy, peer: (any PunchStrategy)? = nil,
                                pairs: [(SimulatedNAT, SimulatedNAT)]? = nil,
                                rtt: Duration = .milliseconds(80), attempts: Int = 3,
                                limits: PlanLimits = .default, counterMoved: Int? = nil,
                                relayAvailable: Bool = false) -> [SimulationRow] {
        func published(_ ctx: PunchContext) -> PunchContext {
            var ctx = ctx
            ctx.relayAvailable = relayAvailable
            if let moved = counterMoved, let base = ctx.candidatePorts.first {
                ctx.lastAllocatedPort = UInt16(clamping: min(65535, Int(base) + moved))
            }
            return ctx
        }
        let pairs = pairs ?? SimulatedNAT.all.flatMap { a in SimulatedNAT.all.map { (a, $0) } }
        var rows: [SimulationRow] = []
        for (a, b) in pairs {
            let historyA = PunchHistory(), historyB = PunchHistory()
            for attempt in 1...max(1, attempts) {
                let ctxA = historyA.fill(published(
                    StrategyCheck.context(local: a, remote: b, role: .initiator, attempt: attempt, rtt: rtt)))
                let ctxB = historyB.fill(published(
                    StrategyCheck.context(local: b, remote: a, role: .target, attempt: attempt, rtt: rtt)))
                var failure: String?
                func note(_ error: any Error, _ hook: String) {
                    if failure == nil { failure = "\(hook): " + StrategyError.wrapping(error).description }
                }
                func planned(_ s: any PunchStrategy, _ ctx: PunchContext) -> PunchPlan {
                    do { return try s.plan(ctx) } catch {
                        note(error, "plan")
                        return DefaultStrategy().plan(ctx)
                    }
                }
                let (planA, reasons) = planned(strategy, ctxA).validated(limits)
                let (planB, _) = planned(peer ?? strategy, ctxB).validated(limits)
                let p = NATModel.successProbability(planA: planA, ctxA: ctxA, planB: planB, ctxB: ctxB)
                let success = p >= 0.5
                let outcomeA = NATModel.outcome(success: success, plan: planA, ctx: ctxA, rtt: rtt)
                let outcomeB = NATModel.outcome(success: success, plan: planB, ctx: ctxB, rtt: rtt)
                let (path, relayAt) = NATModel.path(success: success, planA: planA, planB: planB, outcome: outcomeA,
                                                    relayAvailable: relayAvailable, rtt: rtt)
                historyA.record(outcomeA, for: ctxA)
                historyB.record(outcomeB, for: ctxB)
                do { try strategy.onResult(ctxA, outcomeA) } catch { note(error, "on_result") }
                if let peer {
                    do { try peer.onResult(ctxB, outcomeB) } catch { note(error, "on_result") }
                }
                rows.append(SimulationRow(
                    pair: "\(a.name),\(b.name)", attempt: attempt, portCount: planA.ports.count,
                    firstPorts: Array(planA.ports.prefix(4)), rounds: planA.rounds,
                    intervalMs: planA.interval.milliseconds, timeoutMs: planA.timeout.milliseconds,
                    packetsPerRound: planA.packetsPerRound, sockets: planA.localSockets,
                    packetBudget: planA.packetBudget, successProbability: p, simulatedSuccess: success,
                    relay: planA.relay.description, path: path, relayMs: relayAt?.milliseconds,
                    clamps: reasons.map(\.description), error: failure))
            }
        }
        return rows
    }
}

extension NATModel {
    /// The outcome one side reports for a modelled attempt. On success the winning port is the first probed
    /// port the model counts as a hit (the advertised port for a cone mapping, the nearest predicted one for a
    /// sequential NAT, the first probed port for a random one), reached after the rounds it takes to get
    /// there plus one RTT; a failure is a timeout after every round.
    static func outcome(success: Bool, plan: PunchPlan, ctx: PunchContext, rtt: Duration) -> PunchOutcome {
        guard success else { return .failure(code: .timeout, rounds: plan.rounds) }
        let probed = Array(plan.ports.prefix(plan.probedPortCount))
        let base = ctx.candidatePorts.first ?? probed.first ?? 0
        let remote = ctx.remoteNAT
        let counter = ctx.sequentialBase ?? base
        let predicted = Set((1...max(1, sequentialSpread)).compactMap { remote.predictedPort(after: counter, step: $0) })
        // The same cases as hitProbability's.
        let index: Int
        if remote.mapping == .endpointIndependent || remote.mapping == .unknown || remote.allocation == .portPreserving {
            index = probed.firstIndex(of: base) ?? 0
        } else if remote.allocation == .random {
            index = 0
        } else {
            index = probed.firstIndex(where: predicted.contains) ?? 0
        }
        let port = probed.isEmpty ? base : probed[index]
        let round = index / max(1, plan.packetsPerRound) + 1
        let time = plan.startDelay + plan.interval * (round - 1) + rtt
        return .success(timeToConnect: time, winningPort: port, portOffset: Int(port) - Int(base), rounds: round)
    }
}

extension NATModel {
    /// Round trips the relay costs before it carries the connection: Allocate, then CreatePermission and ChannelBind
    /// together (the TURN server is taken to be as far as the peer). The 401 challenge of the first Allocate is not
    /// counted: a client that keeps its allocation's nonce skips it.
    public static let relaySetupRTTs = 2

    /// When the relay would carry the connection under `plan`, measured from the punch's start: its relayed dial's
    /// start (`PunchPlan.relayDialStart`) plus the relay's setup; nil for `never`.
    static func relayTime(_ plan: PunchPlan, rtt: Duration) -> Duration? {
        plan.relayDialStart.map { $0 + rtt * relaySetupRTTs }
    }

    /// Where a modelled attempt's connection runs, and when the relay starts carrying it. As in the executor, the
    /// initiator (A) dials the target's relayed address, from its plan's relay time, only when a relay is
    /// available; the target (B) accepts that dial while it punches (to its timeout) and, when its plan uses the
    /// relay, after its punch ended too, to `PunchPlan.relayAcceptEnd`: a dial that starts later finds nobody. A
    /// punch that succeeds before the relay carries the connection never touches it; one that succeeds later moves
    /// the connection from the relay to the direct path; one that fails leaves it relayed.
    public static func path(success: Bool, planA: PunchPlan, planB: PunchPlan, outcome: PunchOutcome,
                            relayAvailable: Bool, rtt: Duration) -> (path: String, relayAt: Duration?) {
        let accepting = max(planB.timeout, planB.relayAcceptEnd ?? .zero)
        let reached = relayAvailable && (planA.relayDialStart.map { $0 < accepting } ?? false)
        let relayAt = reached ? relayTime(planA, rtt: rtt) : nil
        switch (outcome, relayAt) {
        case (.success(let ttc, _, _, _), let at?) where at < ttc: return ("relay → direct", at)
        case (.success, _): return ("direct", nil)
        case (.failure, let at?): return ("relayed", at)
        case (.failure, nil): return ("none", nil)
        }
    }
}
