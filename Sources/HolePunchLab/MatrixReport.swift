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
}

/// One pair's results for one strategy.
package struct PairResult: Sendable {
    package var a: String
    package var b: String
    package var trials: [TrialResult] = []

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
    package var errors: [String: Int] {
        var counts: [String: Int] = [:]
        for trial in trials where !trial.ok { counts[trial.error ?? "unknown", default: 0] += 1 }
        return counts
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

    private func ms(_ value: Double?) -> String { value.map { String(format: "%.0f", $0) } ?? "–" }

    package func markdown() -> String {
        var out = "Lab matrix, \(date): \(trials) trial(s) per pair, \(Int(delay)) ms one-way delay and \(loss)% loss on each WAN link; "
        out += "peer-to-peer RTT \(String(format: "%.1f", rttMs)) ms. Times are from the coordinated start to the authenticated "
        out += "connection (initiator side); packets are UDP packets both peers sent toward the other's public address "
        out += "(probes and QUIC), mean per trial; ratio = median / (raw UDP punch + 1 RTT); first byte = the initiator's "
        out += "start-to-first-byte, from its process start to the first echoed byte (median, p95)"
        out += discover ? ", peers measuring their NAT.\n\n" : ", peers told their NAT type.\n\n"
        for strategy in strategies {
            out += "### \(strategy)\n\n"
            out += "| A \\ B | success | median ms | p95 ms | first byte ms | packets | rounds | raw UDP ms | ratio | errors |\n"
            out += "|---|---|---|---|---|---|---|---|---|---|\n"
            for pair in results[strategy] ?? [] {
                let raw = raw["\(pair.a):\(pair.b)"]
                let rawText = raw.map { $0.connected ? ms($0.timeMs) : "fails" } ?? "–"
                var ratio = "–"
                if let median = pair.median, let rawTime = raw?.timeMs, raw?.connected == true {
                    ratio = String(format: "%.2f", median / (rawTime + rttMs))
                }
                let errors = pair.errors.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")
                out += "| \(pair.a) × \(pair.b) | \(pair.successes)/\(pair.trials.count) | \(ms(pair.median)) | \(ms(pair.p95)) | "
                out += "\(ms(pair.firstByteMedian)), \(ms(pair.firstByteP95)) | "
                out += "\(String(format: "%.0f", pair.meanPackets)) | \(String(format: "%.1f", pair.meanRounds)) | \(rawText) | \(ratio) | \(errors) |\n"
            }
            out += "\n"
        }
        if strategies.count > 1 {
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
                    "runs": pair.trials.map { trial -> [String: Any] in
                        var run: [String: Any] = ["ok": trial.ok, "rounds": trial.rounds, "packets": trial.packets]
                        if let time = trial.timeMs { run["time_ms"] = time }
                        if let time = trial.firstByteMs { run["first_byte_ms"] = time }
                        if let time = trial.connectFirstByteMs { run["connect_first_byte_ms"] = time }
                        if let phases = trial.phases { run["phases_ms"] = phases }
                        if let error = trial.error { run["error"] = error }
                        if let message = trial.message { run["message"] = message }
                        if let peer = trial.peerNode { run["peer_node"] = peer }
                        if let expected = trial.expectedPeer { run["expected_peer"] = expected }
                        return run
                    },
                ]
                if let median = pair.median { entry["median_ms"] = median }
                if let p95 = pair.p95 { entry["p95_ms"] = p95 }
                if let median = pair.firstByteMedian { entry["first_byte_median_ms"] = median }
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
        return top
    }
}
