import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A benchmark step that could not run or produced a wrong result.
package struct QUICBenchError: Error, CustomStringConvertible {
    package var description: String
    package init(_ description: String) { self.description = description }
}

/// What `bench quic` measured; encoded as the `--json` file.
package struct QUICBenchReport: Codable {
    package struct Measurement: Codable {
        package var runs: [Double]
        package var median: Double
    }

    package var date: String
    package var command: String
    package var host: String
    package var bytes: Int
    package var handshakes: Int
    package var concurrency: Int
    package var runs: Int
    /// implementation → metric → runs and median.
    package var results: [String: [String: Measurement]] = [:]
    /// "ours / theirs" for each metric both measured.
    package var ratios: [String: Double] = [:]
    package var notes: [String] = []

    /// A report with no results yet (the memberwise initialiser is internal to this module).
    package init(date: String, command: String, host: String, bytes: Int, handshakes: Int, concurrency: Int, runs: Int) {
        self.date = date
        self.command = command
        self.host = host
        self.bytes = bytes
        self.handshakes = handshakes
        self.concurrency = concurrency
        self.runs = runs
    }

    package mutating func add(_ implementation: String, _ metric: String, _ values: [Double]) {
        let sorted = values.sorted()
        let middle = sorted.count / 2
        let median = sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
        results[implementation, default: [:]][metric] = Measurement(runs: values, median: median)
    }

    package mutating func computeRatios() {
        guard let ours = results["holepunch"] else { return }
        for (other, label) in [("ngtcp2-c-examples", "c_examples"), ("aioquic", "aioquic")] {
            guard let theirs = results[other] else { continue }
            for (metric, measurement) in ours {
                if let their = theirs[metric], their.median > 0 {
                    ratios["\(metric)_ours_over_\(label)"] = measurement.median / their.median
                }
            }
        }
    }

    package func printTable() {
        let order = ["holepunch", "ngtcp2-c-examples", "aioquic"]
        let metrics = [
            ("throughput_MBps", "throughput MB/s"),
            ("handshakes_per_s_sequential", "handshakes/s sequential"),
            ("handshakes_per_s_concurrent", "handshakes/s \(concurrency) in flight"),
            ("handshakes_per_s_process_each", "handshakes/s (1 process each)"),
        ]
        var rows = [["implementation", "metric", "median", "runs"]]
        for implementation in order {
            for (key, label) in metrics {
                guard let m = results[implementation]?[key] else { continue }
                rows.append([implementation, label, format(m.median), m.runs.map(format).joined(separator: ", ")])
            }
        }
        print("bench quic: \(bytes) bytes, \(handshakes) handshakes, median of \(runs) runs, \(host)")
        print(table(rows))
        if !ratios.isEmpty {
            print("")
            print(table([["ratio", "value"]] + ratios.keys.sorted().map { [$0, String(format: "%.2f×", ratios[$0]!)] }))
        }
        for note in notes { print("note: \(note)") }
    }

    private func format(_ value: Double) -> String { String(format: value >= 100 ? "%.0f" : "%.1f", value) }

    private func table(_ rows: [[String]]) -> String {
        var widths = [Int](repeating: 0, count: rows.map(\.count).max() ?? 0)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        return rows.map { row in
            row.enumerated().map { i, cell in cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }.joined(separator: "\n")
    }

    package static func hostDescription() -> String {
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return "Linux \(release), \(ProcessInfo.processInfo.activeProcessorCount) CPUs"
    }
}
