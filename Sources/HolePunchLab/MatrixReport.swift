import Foundation
import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

/// The five lab NAT types, in the order tables list them.
package let labNATTypes = NATProfile.labPresets.map(\.name)

/// One trial's outcome.
package struct TrialResult: Sendable {
    package var ok: Bool
    package var timeMs: Double?
    package var rounds: Int
    package var packets: Int
    package var error: String?
    package var message: String?
    package var peerNode: String? = nil
    package var expectedPeer: String? = nil
    /// Initiator's start-to-first-byte: from its process start to the first echoed byte (discovery, registration,
    /// coordination, punch and one stream round trip).
    package var firstByteMs: Double? = nil
    /// The same from the initiator's `connect()` call.
    package var connectFirstByteMs: Double? = nil
    /// The initiator's milestones from its `connect()` call: registered, coordinated, start, connected, first_byte.
    package var phases: [String: Double]? = nil
    /// The address the initiator connected to (its result's `remote`).
    package var remote: String? = nil
    /// The candidate pair that won, `local → remote` with each candidate's kind, when the peer reports one
    /// (its result's `candidate_pair`).
    package var candidatePair: String? = nil
    /// Topology trials: which way the connection went (``LabPath``).
    package var path: LabPath? = nil
    /// Which path the echoed data ended on (issue 15): `direct`, `relayed`, or `relay→direct` for a connection that
    /// started on the relay and moved (the initiator's `path`).
    package var relayPath: String? = nil
    /// From the initiator's connect call to the direct path: its connection when it started direct, else the move.
    package var timeToDirectMs: Double? = nil

    /// The run's entry in the matrix JSON.
    package func json() -> [String: Any] {
        var run: [String: Any] = ["ok": ok, "rounds": rounds, "packets": packets]
        if let timeMs { run["time_ms"] = timeMs }
        if let firstByteMs { run["first_byte_ms"] = firstByteMs }
        if let connectFirstByteMs { run["connect_first_byte_ms"] = connectFirstByteMs }
        if let phases { run["phases_ms"] = phases }
        if let error { run["error"] = error }
        if let message { run["message"] = message }
        if let peerNode { run["peer_node"] = peerNode }
        if let expectedPeer { run["expected_peer"] = expectedPeer }
        if let remote { run["remote"] = remote }
        if let candidatePair { run["candidate_pair"] = candidatePair }
        if let path { run["path"] = path.rawValue }
        if let relayPath { run["relay_path"] = relayPath }
        if let timeToDirectMs { run["time_to_direct_ms"] = timeToDirectMs }
        return run
    }
}

/// Trials of one row of the matrix (a NAT pair or a topology) and the figures the tables show for them.
package protocol TrialSeries: Sendable {
    /// The trials in the order they ran.
    var trials: [TrialResult] { get }
}

extension TrialSeries {
    package var successes: Int { trials.filter(\.ok).count }
    package var times: [Double] { trials.compactMap { $0.ok ? $0.timeMs : nil }.sorted() }
    package var median: Double? { percentile(times, 0.5) }
    package var p95: Double? { percentile(times, 0.95) }
    package var firstByteTimes: [Double] { trials.compactMap { $0.ok ? $0.firstByteMs : nil }.sorted() }
    /// Median start-to-first-byte of the successful trials.
    package var firstByteMedian: Double? { percentile(firstByteTimes, 0.5) }
    package var firstByteP95: Double? { percentile(firstByteTimes, 0.95) }
    package var meanPackets: Double { trials.isEmpty ? 0 : Double(trials.map(\.packets).reduce(0, +)) / Double(trials.count) }
    package var meanRounds: Double { trials.isEmpty ? 0 : Double(trials.map(\.rounds).reduce(0, +)) / Double(trials.count) }
    /// Successful trials that ended on a direct path (started there or moved).
    package var endedDirect: Int { trials.filter { $0.ok && ($0.relayPath == "direct" || $0.relayPath == "relay→direct") }.count }
    /// The path column: how many successful trials ended each way, e.g. `direct ×2, relayed ×1`.
    package var relayPaths: String {
        var counts: [String: Int] = [:]
        for trial in trials where trial.ok { counts[trial.relayPath ?? "?", default: 0] += 1 }
        return counts.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")
    }
    /// Median time from the connect call to the direct path, over the trials that reached one.
    package var timeToDirectMedian: Double? { percentile(trials.compactMap { $0.ok ? $0.timeToDirectMs : nil }.sorted(), 0.5) }
    package var errors: [String: Int] {
        var counts: [String: Int] = [:]
        for trial in trials where !trial.ok { counts[trial.error ?? "unknown", default: 0] += 1 }
        return counts
    }
}

/// One pair's results for one strategy.
package struct PairResult: TrialSeries {
    package var a: String
    package var b: String
    package var trials: [TrialResult] = []
}

/// One topology's results for one strategy.
package struct TopologyResult: TrialSeries {
    package var topology: LabTopology
    package var trials: [TrialResult] = []

    /// Trials that connected on a path the topology accepts.
    package var onPath: Int { trials.filter { $0.ok && $0.path.map(topology.acceptedPaths.contains) == true }.count }
    /// How many successful trials took each path, e.g. `lan ×3`.
    package var paths: String {
        var counts: [String: Int] = [:]
        for trial in trials where trial.ok { counts[trial.path?.rawValue ?? "?", default: 0] += 1 }
        return counts.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")
    }
    /// The winning candidate pairs (or, until peers report them, the addresses connected to), without ports (each
    /// trial's sockets have fresh ones), distinct, in order, each with its count.
    package var winners: String {
        var seen: [(String, Int)] = []
        for trial in trials where trial.ok {
            let winner = Self.withoutPorts(trial.candidatePair ?? trial.remote.map { "→ \($0)" } ?? "?")
            if let index = seen.firstIndex(where: { $0.0 == winner }) { seen[index].1 += 1 } else { seen.append((winner, 1)) }
        }
        return seen.map { "\($0.0) ×\($0.1)" }.joined(separator: "; ")
    }

    /// `text` with the port cut from every `ADDR:PORT` or `[ADDR]:PORT` word.
    package static func withoutPorts(_ text: String) -> String {
        text.split(separator: " ", omittingEmptySubsequences: false).map { word -> String in
            guard let colon = word.lastIndex(of: ":"), !word[word.index(after: colon)...].isEmpty,
                  word[word.index(after: colon)...].allSatisfy(\.isNumber) else { return String(word) }
            let host = word[..<colon]
            if host.hasPrefix("["), host.hasSuffix("]") { return String(host.dropFirst().dropLast()) }
            return host.contains(":") ? String(word) : String(host)
        }.joined(separator: " ")
    }
}

/// Nearest-rank percentile of sorted values.
package func percentile(_ sorted: [Double], _ q: Double) -> Double? {
    guard !sorted.isEmpty else { return nil }
    if q == 0.5 {
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }
    let rank = Int((q * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank, 1), sorted.count) - 1]
}

/// The raw UDP reference for one pair.
package struct RawResult: Sendable {
    package var connected: Bool
    package var timeMs: Double?
}

package struct MatrixReport: Sendable {
    /// With `--impostor`: UDP packets router b sent to the impostor, over all pairs.
    package var impostorPackets: Int?
    package var strategies: [String]
    package var results: [String: [PairResult]]  // strategy -> pairs in order
    package var raw: [String: RawResult]  // "a:b" -> raw punch
    package var rttMs: Double
    package var trials: Int
    package var delay: Double
    package var loss: Double
    package var date: String
    /// Whether the peers measured their NAT (`--discover`) rather than being told it.
    package var discover: Bool
    /// The router (`a` or `b`) running miniupnpd (`--port-mapping`), whose peer publishes a `mapped` candidate.
    package var portMappingRouter: String?
    /// The topology rows (strategy -> topologies in order), each run in its own lab after the pairs.
    package var topologies: [String: [TopologyResult]] = [:]
    /// Whether the lab ran coturn and peers could connect relayed (`lab matrix` without `--no-relay`).
    package var relay = false

    private func ms(_ value: Double?) -> String { value.map { String(format: "%.0f", $0) } ?? "–" }

    package func markdown() -> String {
        var out = "Lab matrix, \(date): \(trials) trial(s) per row, \(Int(delay)) ms one-way delay and \(loss)% loss on each WAN link"
        // The RTT is measured in the pairs' lab; a run of topologies alone has none.
        out += results.isEmpty ? ". " : "; peer-to-peer RTT \(String(format: "%.1f", rttMs)) ms. "
        out += "Times are from the coordinated start to the authenticated "
        out += "connection (initiator side); packets are UDP packets both peers sent toward the other's public address "
        out += "(probes and QUIC), mean per trial; ratio = median / (raw UDP punch + 1 RTT); first byte = the initiator's "
        out += "start-to-first-byte, from its process start to the first echoed byte (median, p95)"
        out += discover ? ", peers measuring their NAT." : ", peers told their NAT type."
        if relay {
            out += " coturn runs in the lab's public network and the targets publish a relayed address: path = where the"
                + " echoed data ended (direct, relayed, or relay→direct when the connection started relayed and moved);"
                + " to direct = median from the connect call to the direct path."
        }
        if let router = portMappingRouter {
            out += " Router \(router) runs miniupnpd (port mapping) in front of its NAT, and peer-\(router) publishes its"
                + " mapping as a `mapped` candidate: each \(router == "a" ? "A" : "B") is \"type + port mapping\"."
        }
        out += "\n\n"
        for strategy in strategies where !(results[strategy] ?? []).isEmpty {
            out += "### \(strategy)\n\n"
            out += "| A \\ B | success | path | median ms | p95 ms | first byte ms | to direct ms | packets | rounds | raw UDP ms | ratio | errors |\n"
            out += "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            for pair in results[strategy] ?? [] {
                let raw = raw["\(pair.a):\(pair.b)"]
                let rawText = raw.map { $0.connected ? ms($0.timeMs) : "fails" } ?? "–"
                var ratio = "–"
                if let median = pair.median, let rawTime = raw?.timeMs, raw?.connected == true {
                    ratio = String(format: "%.2f", median / (rawTime + rttMs))
                }
                let errors = pair.errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")
                out += "| \(pair.a) × \(pair.b) | \(pair.successes)/\(pair.trials.count) | \(pair.relayPaths) | \(ms(pair.median)) | \(ms(pair.p95)) | "
                out += "\(ms(pair.firstByteMedian)), \(ms(pair.firstByteP95)) | \(ms(pair.timeToDirectMedian)) | "
                out += "\(String(format: "%.0f", pair.meanPackets)) | \(String(format: "%.1f", pair.meanRounds)) | \(rawText) | \(ratio) | \(errors) |\n"
            }
            out += "\n"
        }
        if strategies.count > 1, !(results[strategies[0]] ?? []).isEmpty {
            out += "### Side by side (success, median ms)\n\n"
            out += "| pair | " + strategies.joined(separator: " | ") + " | speed-up (\(strategies[1]) / \(strategies[0])) |\n"
            out += "|---|" + String(repeating: "---|", count: strategies.count + 1) + "\n"
            let first = results[strategies[0]] ?? []
            for (index, pair) in first.enumerated() {
                var cells: [String] = []
                var medians: [Double?] = []
                for strategy in strategies {
                    let result = results[strategy]?[index]
                    medians.append(result?.median)
                    cells.append(result.map { "\($0.successes)/\($0.trials.count), \(ms($0.median))" } ?? "–")
                }
                var speedup = "–"
                if let base = medians[0], let other = medians[1], base > 0 { speedup = String(format: "%.1f×", other / base) }
                out += "| \(pair.a) × \(pair.b) | " + cells.joined(separator: " | ") + " | \(speedup) |\n"
            }
            out += "\n"
        }
        for strategy in strategies {
            guard let rows = topologies[strategy], !rows.isEmpty else { continue }
            out += "### Topologies, \(strategy)\n\n"
            out += "Connected: trials that connected at all; on path: those on a path the topology accepts. Winner: the "
            out += "candidate that won (`→ kind family address`, or `local → remote` when the peer reports a pair), or the "
            out += "address connected to when the peers report neither. "
            out += "Raw UDP: `probe.py punch` between the peers' public addresses.\n\n"
            out += "| topology | connected | on path (accepted) | median ms | first byte ms | paths taken | winner | raw UDP ms | errors |\n"
            out += "|---|---|---|---|---|---|---|---|---|\n"
            for row in rows {
                let errors = row.errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")
                let accepted = row.topology.acceptedPaths.map(\.rawValue).joined(separator: ", ")
                out += "| \(row.topology.name) | \(row.successes)/\(row.trials.count) | \(row.onPath)/\(row.trials.count) (\(accepted)) | "
                let rawText = raw["topology:\(row.topology.name)"].map { $0.connected ? ms($0.timeMs) : "fails" } ?? "–"
                out += "\(ms(row.median)) | \(ms(row.firstByteMedian)) | \(row.paths) | \(row.winners) | \(rawText) | \(errors) |\n"
            }
            out += "\n"
        }
        return out
    }

    package func json() -> [String: Any] {
        var strategiesJSON: [String: Any] = [:]
        for strategy in strategies {
            strategiesJSON[strategy] = (results[strategy] ?? []).map { pair -> [String: Any] in
                var entry: [String: Any] = [
                    "a": pair.a, "b": pair.b, "trials": pair.trials.count, "successes": pair.successes,
                    "success_rate": pair.trials.isEmpty ? 0 : Double(pair.successes) / Double(pair.trials.count),
                    "mean_packets": pair.meanPackets, "mean_rounds": pair.meanRounds, "errors": pair.errors,
                    "runs": pair.trials.map { $0.json() },
                ]
                if let median = pair.median { entry["median_ms"] = median }
                if let p95 = pair.p95 { entry["p95_ms"] = p95 }
                if let median = pair.firstByteMedian { entry["first_byte_median_ms"] = median }
                entry["ended_direct"] = pair.endedDirect
                if let median = pair.timeToDirectMedian { entry["time_to_direct_median_ms"] = median }
                if let p95 = pair.firstByteP95 { entry["first_byte_p95_ms"] = p95 }
                if let raw = raw["\(pair.a):\(pair.b)"], raw.connected, let time = raw.timeMs, let median = pair.median {
                    entry["ratio_to_raw_plus_rtt"] = median / (time + rttMs)
                }
                return entry
            }
        }
        let rawJSON = raw.mapValues { value -> [String: Any] in
            var entry: [String: Any] = ["connected": value.connected]
            if let time = value.timeMs { entry["time_ms"] = time }
            return entry
        }
        var top: [String: Any] = ["date": date, "trials": trials, "delay_ms": delay, "loss_pct": loss, "rtt_ms": rttMs, "discover": discover,
                "strategies": strategiesJSON, "raw_udp": rawJSON]
        if let impostorPackets { top["impostor_packets"] = impostorPackets }
        if let portMappingRouter { top["port_mapping_router"] = portMappingRouter }
        top["relay"] = relay
        if !topologies.isEmpty {
            top["topologies"] = topologies.mapValues { rows in
                rows.map { row -> [String: Any] in
                    var entry: [String: Any] = [
                        "topology": row.topology.name, "accepted_paths": row.topology.acceptedPaths.map(\.rawValue),
                        "trials": row.trials.count, "successes": row.successes, "on_path": row.onPath, "errors": row.errors,
                        "runs": row.trials.map { $0.json() },
                    ]
                    if let median = row.median { entry["median_ms"] = median }
                    if let median = row.firstByteMedian { entry["first_byte_median_ms"] = median }
                    return entry
                }
            }
        }
        return top
    }
}
