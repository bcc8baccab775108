import Foundation
import HolePunchQUIC
#if canImport(Glibc)
import Glibc
#endif

/// Runs the matrix in one lab: brings it up, starts one rendezvous, and for each pair re-makes the NATs and
/// runs every trial of every strategy, with the raw UDP reference beside them. Topologies come after the pairs,
/// each in a lab of its own (`lab.sh up --topology`), with its own rendezvous.
package struct MatrixRunner {
    package let lab: LabSession
    package let strategies: [String]
    package let pairs: [(String, String)]
    package let trials: Int
    package let delay: Double
    package let loss: Double
    package let punchTimeout: Double
    package let discover: Bool
    package let raw: Bool
    package let impostor: Bool
    package let startDelay: Int
    package let topologies: [LabTopology]
    /// The router (`a` or `b`) to run miniupnpd on (`lab/portmap.sh`) for the pairs, whose peer maps its port; nil: none.
    package let portMappingRouter: String?
    /// With `discover`: the initiator too waits for its discovery to be published before it asks for the punch.
    package var discoverFirst = false
    /// Whether the labs run coturn (`lab.sh up --turn`) and the rendezvous grants it, so that peers may connect
    /// relayed (issue 15); off: punch only, as before.
    package var relay = true
    /// Loss on the relayed leg, percent each way (`lab.sh up --turn-loss`): a lossy relay.
    package var relayLoss: Double = 0
    /// Bytes the initiator sends after its last line and expects echoed whole (`lab peer --transfer`).
    package var transfer = 0
    /// Run each pair's trials round by round, one trial of every strategy per round (`bench relay-lab`), instead of
    /// every trial of one strategy, then the next: a machine that gets busier mid-pair then slows both alike.
    package var alternate = false

    /// A runner for one matrix (the memberwise initialiser is internal to this module).
    package init(lab: LabSession, strategies: [String], pairs: [(String, String)], trials: Int, delay: Double, loss: Double,
                 punchTimeout: Double, discover: Bool, raw: Bool, impostor: Bool, startDelay: Int, topologies: [LabTopology] = [],
                 portMappingRouter: String? = nil) {
        self.lab = lab
        self.strategies = strategies
        self.pairs = pairs
        self.trials = trials
        self.delay = delay
        self.loss = loss
        self.punchTimeout = punchTimeout
        self.discover = discover
        self.raw = raw
        self.impostor = impostor
        self.startDelay = startDelay
        self.topologies = topologies
        self.portMappingRouter = portMappingRouter
    }

    /// The rendezvous's IPv6 STUN responder in dual-stack topologies (lab.sh's RDV6_IP1).
    package static let rendezvousSTUN6 = "[2001:db8:0:ff::10]:3480"

    /// Where the impostor listens (in `other`); router b DNATs new inbound UDP flows there.
    package static let impostorAddress = "198.51.100.20:7443"

    private func progress(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    package func run() async throws -> MatrixReport {
        let date = ISO8601DateFormatter().string(from: Date())
        var report = MatrixReport(strategies: strategies.map { URL(fileURLWithPath: $0).lastPathComponent }, results: [:], raw: [:],
                                  rttMs: 0, trials: trials, delay: delay, loss: loss, date: date, discover: discover)
        report.portMappingRouter = portMappingRouter
        report.relay = relay
        if !pairs.isEmpty { try await runPairs(into: &report) }
        for (index, topology) in topologies.enumerated() {
            if index > 0 || !pairs.isEmpty { try await lab.run(["down"]) }
            try await runTopology(topology, label: "[topology \(index + 1)/\(topologies.count)] \(topology.name)", into: &report)
        }
        return report
    }

    /// The rendezvous (with its STUN responder) in `rdv`, and its NodeID once it listens. In a dual-stack topology it
    /// takes QUIC on both families and answers STUN on IPv6 too (advertised, so peers learn their IPv6 reflexive
    /// address), as a rendezvous deployed on such a host would.
    private func startRendezvous(dualStack: Bool = false) async throws -> (LabChild, String) {
        var turn: [String] = []
        if relay {
            // lab.sh up --turn says where its coturn listens and where the shared secret is.
            let status = try await lab.run(["status", "--env"]).output
            let env = Dictionary(status.split(separator: "\n").compactMap { line -> (String, String)? in
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                return parts.count == 2 ? (parts[0], parts[1]) : nil
            }) { a, _ in a }
            guard let server = env["HP_LAB_TURN_SERVER"], let secret = env["HP_LAB_TURN_SECRET_FILE"] else {
                throw LabFailure("the lab runs no TURN server (lab.sh up --turn)")
            }
            turn = ["--turn-server", server, "--turn-secret-file", secret]
        }
        let rdvIdentity = lab.file("rdv.identity")
        try Identity.generate(commonName: "lab-rendezvous").save(to: rdvIdentity)
        let ready = lab.file("rdv.ready")
        let rendezvous = try lab.exec("rdv", [lab.executable, "lab", "rendezvous", "--identity", rdvIdentity, "--ready-file", ready,
                                                "--start-delay", "\(startDelay)"] + turn
                                          + (dualStack ? ["--listen", "[::]:7000", "--stun-other", Self.rendezvousSTUN6] : []),
                                      stem: "rendezvous")
        do {
            let end = ContinuousClock.now + .seconds(20)
            while !FileManager.default.fileExists(atPath: ready) {
                guard rendezvous.process.isRunning, ContinuousClock.now < end else {
                    throw LabFailure("the lab rendezvous did not start: \(rendezvous.errors)")
                }
                try await Task.sleep(for: .milliseconds(10))
            }
            return (rendezvous, try String(contentsOfFile: ready, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines))
        } catch {
            // The caller stops it once it returned; until then, a failure here must.
            rendezvous.stop()
            throw error
        }
    }

    /// The NAT pairs, in one lab in the default topology (`renat` between pairs) with one rendezvous.
    private func runPairs(into report: inout MatrixReport) async throws {
        let first = pairs[0]
        progress("lab \(lab.name): up (\(first.0) × \(first.1), delay \(delay) ms, loss \(loss)%)")
        try await lab.run(["up", "--nat-a", first.0, "--nat-b", first.1, "--delay", "\(delay)", "--loss", "\(loss)", "--probe-server"] + turnOptions,
                          limit: .seconds(120))
        try await portMap("up")
        // One rendezvous for all pairs.
        let (rendezvous, rdvNode) = try await startRendezvous()
        defer { rendezvous.stop() }

        var impostorServer: LabChild?
        defer { impostorServer?.stop() }
        if impostor {
            let identity = lab.file("impostor.identity")
            try Identity.generate(commonName: "lab-impostor").save(to: identity)
            let impostorReady = lab.file("impostor.ready")
            impostorServer = try lab.exec("other", [lab.executable, "lab", "rendezvous", "--listen", Self.impostorAddress,
                                                    "--identity", identity, "--no-stun", "--ready-file", impostorReady],
                                          stem: "impostor")
            while !FileManager.default.fileExists(atPath: impostorReady) {
                guard impostorServer?.process.isRunning == true else { throw LabFailure("the impostor did not start") }
                try await Task.sleep(for: .milliseconds(10))
            }
        }

        let rtt = await measureRTT()
        progress("peer-to-peer RTT \(String(format: "%.1f", rtt)) ms (sum of both peers' RTTs to the rendezvous)")
        var impostorPackets: Int? = impostor ? 0 : nil
        var results: [String: [PairResult]] = [:]
        var raws: [String: RawResult] = [:]
        for (index, pair) in pairs.enumerated() {
            let label = "[\(index + 1)/\(pairs.count)] \(pair.0) × \(pair.1)"
            if index > 0 {
                // renat replaces the router's tables: miniupnpd and its rules go first and come back after.
                try await portMap("down")
                try await lab.run(["renat", "--nat-a", pair.0, "--nat-b", pair.1])
                try await portMap("up")
            }
            if impostor {
                // After the cone DNAT (which admits the real flows of recorded mappings), before nothing else:
                // every other new inbound UDP flow to b's public address goes to the impostor.
                try await lab.run(["exec", "nat-b", "--", "nft", "add rule ip hpnat prerouting iifname \"wan0\" meta l4proto udp "
                                   + "counter dnat ip to \(Self.impostorAddress)"])
            }
            if raw {
                let reference = await rawPunch(tag: index)
                raws["\(pair.0):\(pair.1)"] = reference
                progress("\(label) raw UDP: " + (reference.connected ? String(format: "%.0f ms", reference.timeMs ?? 0) : "fails"))
            }
            var rows = strategies.map { _ in PairResult(a: pair.0, b: pair.1) }
            let order = alternate ? (1...max(1, trials)).flatMap { trial in strategies.indices.map { ($0, trial) } }
                                  : strategies.indices.flatMap { index in (1...max(1, trials)).map { (index, $0) } }
            for (index, trial) in order {
                let outcome = try await runTrial(pair: pair, strategy: strategies[index], rdvNode: rdvNode)
                rows[index].trials.append(outcome)
                let summary = outcome.ok
                    ? String(format: "ok %.0f ms, %d rounds, %d packets, first byte %.0f ms", outcome.timeMs ?? 0, outcome.rounds,
                             outcome.packets, outcome.firstByteMs ?? 0) + ", path \(outcome.relayPath ?? "?")"
                    : "failed: \(outcome.error ?? "?") \(outcome.message ?? "")"
                progress("\(label) \(URL(fileURLWithPath: strategies[index]).lastPathComponent) trial \(trial)/\(trials): \(summary)")
            }
            for (index, strategy) in strategies.enumerated() {
                results[URL(fileURLWithPath: strategy).lastPathComponent, default: []].append(rows[index])
            }
            // The impostor rule's counter, before renat replaces the table: packets b's router gave to the impostor.
            if impostor, let child = try? lab.exec("nat-b", ["nft", "list", "chain", "ip", "hpnat", "prerouting"], stem: "impostor-counter"),
               await child.wait(.seconds(5)) == 0, let range = child.output.range(of: "packets ") {
                impostorPackets? += Int(child.output[range.upperBound...].prefix { $0.isNumber }) ?? 0
            }
        }
        try await portMap("down")
        report.impostorPackets = impostorPackets
        report.results = results
        report.raw = raws
        report.rttMs = rtt
    }

    /// One topology in a lab of its own: the home routers are lab.sh's default type (port_restricted), and each trial's
    /// path is judged from the address the initiator (peer-a) connected to.
    private func runTopology(_ topology: LabTopology, label: String, into report: inout MatrixReport) async throws {
        progress("lab \(lab.name): up (topology \(topology.name), delay \(delay) ms, loss \(loss)%)")
        try await lab.run(["up", "--topology", topology.name, "--delay", "\(delay)", "--loss", "\(loss)", "--probe-server"] + turnOptions,
                          limit: .seconds(120))
        let status = try await lab.run(["status", "--json"])
        let hosts = (try? JSONSerialization.jsonObject(with: Data(status.output.utf8)) as? [String: Any])?["hosts"] as? [String: Any]
        let ownPublic = (hosts?["peer-a"] as? [String: Any])?["public"] as? String
        let (rendezvous, rdvNode) = try await startRendezvous(dualStack: topology.dualStack)
        defer { rendezvous.stop() }
        if raw {
            let reference = await rawPunch(tag: 1000 + (topologies.firstIndex(of: topology) ?? 0))
            report.raw["topology:\(topology.name)"] = reference
            progress("\(label) raw UDP: " + (reference.connected ? String(format: "%.0f ms", reference.timeMs ?? 0) : "fails"))
        }
        let homeRouters = ("port_restricted", "port_restricted")
        for strategy in strategies {
            var row = TopologyResult(topology: topology)
            let short = URL(fileURLWithPath: strategy).lastPathComponent
            for trial in 1...max(1, trials) {
                var outcome = try await runTrial(pair: homeRouters, strategy: strategy, rdvNode: rdvNode,
                                                 dualStack: topology.dualStack)
                outcome.path = outcome.remote.map { LabPath(remote: $0, ownPublic: ownPublic) }
                row.trials.append(outcome)
                let summary = outcome.ok
                    ? String(format: "ok %.0f ms, ", outcome.timeMs ?? 0) + "path \(outcome.path?.rawValue ?? "?"), "
                        + (outcome.candidatePair ?? "remote \(outcome.remote ?? "?")")
                    : "failed: \(outcome.error ?? "?") \(outcome.message ?? "")"
                progress("\(label) \(short) trial \(trial)/\(trials): \(summary)")
            }
            report.topologies[short, default: []].append(row)
        }
    }

    /// `lab.sh up` options for coturn: none without the relay.
    private var turnOptions: [String] {
        guard relay else { return [] }
        return ["--turn"] + (relayLoss > 0 ? ["--turn-loss", "\(relayLoss)"] : [])
    }

    /// `lab/portmap.sh up --router X` or `down` when the pairs run with port mapping (nothing otherwise). `down` always
    /// comes before `lab.sh down` or `renat` (LabSession.down does it too).
    private func portMap(_ action: String) async throws {
        guard let router = portMappingRouter else { return }
        try await lab.runPortMap(action == "up" ? ["up", "--router", router] : [action])
    }

    /// RTT between the peers: each peer's RTT to the rendezvous crosses its own WAN link twice, so the sum is
    /// what a packet from A to B and back crosses.
    private func measureRTT() async -> Double {
        var total = 0.0
        for host in ["peer-a", "peer-b"] {
            guard let child = try? lab.exec(host, ["python3", "\(lab.labDir)/probe.py", "rtt", "--server", "198.51.100.10:3478",
                                                   "--count", "20", "--interval", "10"], stem: "rtt"),
                  await child.wait(.seconds(20)) != nil,
                  let stats = child.lastJSON?["rtt_ms"] as? [String: Any],
                  let median = stats["median"] as? Double else { continue }
            total += median
        }
        return total
    }

    /// `probe.py punch` on both sides at once: the time from knowing the peer's address to hearing each other.
    private func rawPunch(tag: Int) async -> RawResult {
        let nameA = "a\(tag)x\(getpid())", nameB = "b\(tag)x\(getpid())"
        let script = "\(lab.labDir)/probe.py"
        guard let a = try? lab.exec("peer-a", ["python3", script, "punch", "--name", nameA, "--peer", nameB, "--timeout", "5"], stem: "rawa"),
              let b = try? lab.exec("peer-b", ["python3", script, "punch", "--name", nameB, "--peer", nameA, "--timeout", "5"], stem: "rawb")
        else { return RawResult(connected: false) }
        _ = await a.wait(.seconds(15))
        _ = await b.wait(.seconds(15))
        let times = [a.lastJSON, b.lastJSON].map { ($0?["connected"] as? Bool == true) ? $0?["time_ms"] as? Double : nil }
        guard let ta = times[0], let tb = times[1] else { return RawResult(connected: false) }
        return RawResult(connected: true, timeMs: max(ta, tb))
    }

    /// One punch between fresh peers; `dualStack` binds them to `[::]:0`, as `holepunch peer` does on a host with IPv6.
    private func runTrial(pair: (String, String), strategy: String, rdvNode: String, dualStack: Bool = false)
        async throws -> TrialResult
    {
        let idA = lab.file("a.identity"), idB = lab.file("b.identity")
        let a = try Identity.generate(commonName: "lab-peer-a")
        try a.save(to: idA)
        let b = try Identity.generate(commonName: "lab-peer-b")
        try b.save(to: idB)
        let before = await lab.packetCounter("nat-a") + lab.packetCounter("nat-b")
        // Each peer's whole run is bounded (`lab peer --timeout`); a target cut off there closes its connection at once
        // (code 0), which the initiator would report as a failed echo. A connection that starts relayed has one phase
        // more (the initiator waits up to 5 s for the move to a direct path, then echoes again), and the target starts
        // before the initiator and closes after it: their budgets cover that, so only the product can fail the echo.
        let budget = punchTimeout + 10 + (relay ? 10 : 0)
        func peerArguments(identity: String, nat: String, timeout: Double) -> [String] {
            var arguments = [lab.executable, "lab", "peer", "--rendezvous-id", rdvNode, "--identity", identity,
                             "--strategy", strategy, "--punch-timeout", "\(punchTimeout)", "--timeout", "\(timeout)"]
            arguments += discover ? ["--discover"] + (discoverFirst ? ["--discover-first"] : []) : ["--nat", nat]
            if dualStack { arguments += ["--bind", "[::]:0"] }
            if transfer > 0 { arguments += ["--transfer", "\(transfer)"] }
            return arguments
        }
        // The peer behind the mapping router asks for a mapping (the target publishes it before it reports ready).
        let mapsA = portMappingRouter == "a" ? ["--port-mapping"] : [], mapsB = portMappingRouter == "b" ? ["--port-mapping"] : []
        let ready = lab.file("target.ready")
        let target = try lab.exec("peer-b", peerArguments(identity: idB, nat: pair.1, timeout: budget + 5) + mapsB + ["--ready-file", ready],
                                  stem: "target")
        let end = ContinuousClock.now + .seconds(15)
        while !FileManager.default.fileExists(atPath: ready), target.process.isRunning, ContinuousClock.now < end {
            try await Task.sleep(for: .milliseconds(5))
        }
        guard FileManager.default.fileExists(atPath: ready) else {
            target.stop()
            return TrialResult(ok: false, rounds: 0, packets: 0, error: "targetNotRegistered",
                               message: (target.lastJSON?["message"] as? String) ?? target.errors.split(separator: "\n").last.map(String.init))
        }
        let initiator = try lab.exec("peer-a", peerArguments(identity: idA, nat: pair.0, timeout: budget) + mapsA + ["--connect", "\(b.nodeID)"],
                                     stem: "initiator")
        let limit = Duration.milliseconds(Int((budget + 5) * 1000))
        _ = await initiator.wait(limit)
        _ = await target.wait(.seconds(8))
        let after = await lab.packetCounter("nat-a") + lab.packetCounter("nat-b")
        var result = initiator.lastJSON ?? [:]
        let targetResult = target.lastJSON ?? [:]
        var ok = result["ok"] as? Bool == true
        var error = result["error"] as? String
        if ok, let peer = result["peer_node"] as? String, peer != "\(b.nodeID)" {
            // Never expected: the handshake pins the NodeID. Recorded loudly if it ever happens.
            ok = false
            error = "wrongPeer"
        }
        if ok, result["echo"] as? Bool != true {
            // The punch reported a connection, but no line made it through and back: not a working connection.
            ok = false
            // A clean end with bytes missing is the silent loss a graceful close exists to prevent: named apart.
            let outcome = result["echo_outcome"] as? String ?? ""
            error = outcome == "silentLoss" ? "silentLoss" : "noEcho"
            result["message"] = "echo: \(outcome)"
        }
        if result.isEmpty { error = "noResult" }
        return TrialResult(
            ok: ok, timeMs: result["time_ms"] as? Double, rounds: result["rounds"] as? Int ?? 0, packets: max(0, after - before),
            error: ok ? nil : error,
            message: ok ? nil : ((result["message"] as? String) ?? initiator.errors.split(separator: "\n").last.map(String.init))
                .map { $0 + ((targetResult["error"] as? String).map { " (target: \($0))" } ?? "") },
            peerNode: result["peer_node"] as? String, expectedPeer: "\(b.nodeID)",
            firstByteMs: result["first_byte_ms"] as? Double, connectFirstByteMs: result["connect_first_byte_ms"] as? Double,
            phases: result["phases_ms"] as? [String: Double], remote: result["remote"] as? String,
            candidatePair: Self.candidatePair(result["candidate_pair"])
                ?? Self.winningCandidate(kind: result["candidate"], family: result["candidate_family"], remote: result["remote"]),
            relayPath: result["path"] as? String, timeToDirectMs: result["time_to_direct_ms"] as? Double)
    }

    /// The winner as the lab peer reports it (`candidate`, `candidate_family`, `remote`): `→ kind family address`, e.g.
    /// `→ host ipv6 [2001:db8:0:2::2]:4000`; nil without a kind.
    package static func winningCandidate(kind: Any?, family: Any?, remote: Any?) -> String? {
        guard let kind = kind as? String else { return nil }
        return (["→", kind] + [family, remote].compactMap { $0 as? String }).joined(separator: " ")
    }

    /// The winning candidate pair from a peer's result: a string as it is, or `{"local": {"kind", "address"},
    /// "remote": {…}}` as `kind address → kind address`; nil when the peer reports none.
    package static func candidatePair(_ value: Any?) -> String? {
        if let text = value as? String { return text }
        guard let pair = value as? [String: Any] else { return nil }
        func side(_ key: String) -> String {
            guard let candidate = pair[key] as? [String: Any] else { return "?" }
            return ["kind", "address"].compactMap { candidate[$0] as? String }.joined(separator: " ")
        }
        return "\(side("local")) → \(side("remote"))"
    }
}
