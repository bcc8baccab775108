import HolePunchNet
import HolePunchStrategy

/// Which of the peer's candidates a punch checks, where their probes go, and which candidate a proven address
/// belongs to (issue 14).
///
/// Every checked candidate's probe targets are interleaved into the one list the session's rounds walk (the first
/// target of each candidate before the second of any), so all pairs are checked at once and share the plan's
/// packet-rate cap instead of multiplying it. A server-reflexive candidate gets the plan's port prediction, moved
/// from the base port the plan was made around to the candidate's port; host, router-mapped and peer-reflexive
/// candidates are probed at their exact port (a LAN address is no NAT mapping to predict around).
struct CandidateChecks: Sendable {
    /// The candidates a strategy may choose from (`PunchContext.candidates`): the peer's, less those we cannot reach.
    let pool: [Candidate]
    /// The port the plan's ports were predicted around (the peer's first advertised port).
    let base: UInt16?
    /// Whether the pool came from typed candidates the peer published; without them the punch probes exactly the
    /// plan's ports on its one host, as before candidates existed, and the plan's candidate fields do not apply.
    let typed: Bool
    /// The candidates checked, in check order.
    private(set) var checked: [Candidate] = []
    /// Probe targets of every checked candidate, interleaved.
    private(set) var targets: [SocketAddress] = []
    /// The candidate each target belongs to.
    private var owners: [SocketAddress: Candidate] = [:]

    /// Checks for `pool`, targets not yet built (``build(_:limits:)``).
    init(pool: [Candidate], base: UInt16?, typed: Bool) {
        self.pool = pool
        self.base = base
        self.typed = typed
    }

    /// Builds the checked candidates and their targets for `plan`, and returns the plan the session runs: with
    /// several candidates a round holds at least one probe per candidate (never more than there are targets),
    /// and the interval is stretched again so that all of them together stay within `limits`' packet rate. A
    /// direct dial (the one handshake the initiator nominates before any proof) is made only when one candidate is
    /// checked: with several it is a guess, and a wrong one (a LAN address behind someone else's router) would hold
    /// the proven pair back for a whole connect timeout.
    mutating func build(_ plan: PunchPlan, limits: PlanLimits) -> PunchPlan {
        checked = typed ? ordered(plan, limits: limits) : Array(pool.prefix(1))
        var lists: [[SocketAddress]] = []
        owners = [:]
        for candidate in checked {
            var list: [SocketAddress] = []
            for address in typed ? addresses(of: candidate, plan) : plan.ports.map({ candidate.address.with(port: $0) })
            where owners[address] == nil {
                owners[address] = candidate
                list.append(address)
            }
            lists.append(list)
        }
        if !typed {
            // One host: the plan's ports in the plan's order, exactly.
            targets = lists.first ?? []
            return plan
        }
        targets = Self.interleave(lists)
        var widened = plan
        let perRound = min(max(plan.packetsPerRound, checked.count), targets.count, max(1, limits.maxPacketsPerRound))
        widened.packetsPerRound = max(1, perRound)
        widened.dialCandidatesDirectly = plan.dialCandidatesDirectly && checked.count == 1
        _ = widened.capRate(limits)
        return widened
    }

    /// The candidate a proven peer address belongs to: the checked one it was probed as, or a peer-reflexive
    /// candidate (an authenticated probe came from an address nobody published).
    func candidate(for address: SocketAddress) -> Candidate {
        owners[address].map { Candidate(kind: $0.kind, address: address, priority: $0.priority, mapping: $0.mapping) }
            ?? Candidate(kind: .peerReflexive, address: address)
    }

    /// The pool in the plan's order (its indices, or priority order), capped.
    private func ordered(_ plan: PunchPlan, limits: PlanLimits) -> [Candidate] {
        let cap = min(plan.maxCandidates ?? limits.maxCandidates, max(1, limits.maxCandidates))
        guard let order = plan.candidateOrder else { return Array(pool.prefix(cap)) }
        return Array(order.lazy.filter { $0 < pool.count }.map { pool[$0] }.prefix(cap))
    }

    /// Where a candidate's probes go: the plan's prediction moved onto a server-reflexive candidate's port, the
    /// exact address of any other kind.
    private func addresses(of candidate: Candidate, _ plan: PunchPlan) -> [SocketAddress] {
        guard candidate.kind == .serverReflexive, let base else { return [candidate.address] }
        let shift = Int(candidate.address.port) - Int(base)
        return plan.ports.compactMap { port in
            let moved = Int(port) + shift
            return (1...65535).contains(moved) ? candidate.address.with(port: UInt16(moved)) : nil
        }
    }

    /// The lists merged round-robin: every list's first element, then every list's second, and so on.
    static func interleave(_ lists: [[SocketAddress]]) -> [SocketAddress] {
        let total = lists.reduce(0) { $0 + $1.count }
        var merged: [SocketAddress] = []
        merged.reserveCapacity(total)
        var depth = 0
        while merged.count < total {
            for list in lists where depth < list.count { merged.append(list[depth]) }
            depth += 1
        }
        return merged
    }
}

extension PunchExecutor {
    /// Whether this executor can send to an address of `family`: what the endpoint's socket reaches (both families
    /// for a dual-stack socket).
    nonisolated func canReach(_ family: IPFamily) -> Bool {
        endpoint.reachableFamilies.contains(family)
    }

    /// The candidate checks for a punch: the peer's typed candidates we can reach (a relayed one is reached through
    /// its relay, not probed), or, when it published none, its one host as a server-reflexive candidate per port.
    nonisolated func candidateChecks(_ options: PunchOptions, host: SocketAddress) -> CandidateChecks {
        let base = options.targetPorts.first
        guard !options.candidates.isEmpty else {
            let legacy = options.targetPorts.map { Candidate(kind: .serverReflexive, address: host.with(port: $0)) }
            return CandidateChecks(pool: legacy, base: base, typed: false)
        }
        let pool = options.candidates.filter { $0.kind != .relayed && canReach($0.family) }
        return CandidateChecks(pool: pool, base: base, typed: true)
    }
}

extension SocketAddress {
    /// This address with another port.
    func with(port: UInt16) -> SocketAddress {
        var copy = self
        copy.port = port
        return copy
    }
}
