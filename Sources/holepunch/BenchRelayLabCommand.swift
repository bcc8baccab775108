import ArgumentParser
import Foundation
import HolePunchLab
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch bench relay-lab`: time to first byte relay-first against punch-only, in the real-NAT lab (issue 15
/// item 6). A sibling of `bench relay` (loopback) because it needs root and a lab, and shares nothing with it but the
/// subject.
struct BenchRelayLabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "relay-lab",
        abstract: "Lab: time to first byte relay-first vs punch-only, same pairs, alternating trials; medians.",
        discussion: """
            Needs root; builds and removes its own lab with coturn (`lab.sh up --turn`) and runs `lab matrix` trials \
            with two variants of strategies/default.lua: relay-first (the relay at once, whatever the pair) and \
            punch-only (never the relay), one trial of each in turn. Time to first byte runs from the initiator's \
            connect call (registration, coordination, connection and one echoed line); the rendezvous round trip is \
            the median time to the registration's confirmation.

            Examples:
              sudo holepunch bench relay-lab
              sudo holepunch bench relay-lab --trials 9 --pair port_restricted:port_restricted --json bench-results/relay-lab.json
            """
    )

    @Option(name: .customLong("pair"), help: "Pairs A:B (repeatable); default port_restricted:port_restricted and full_cone:symmetric_random.")
    var pairs: [String] = []
    @Option(help: "Trials per pair and variant.") var trials = 5
    @Option(help: "One-way delay on each WAN link, ms.") var delay: Double = 20
    @Option(help: "Write the results as JSON to this file.") var json: String?

    /// The relay decision of default.lua, and what each variant makes of it.
    static let variants: [(name: String, find: String, replace: String)] = [
        ("relay-first.lua", "elseif hopeless or (history.pair.attempts >= 2 and history.pair.successes == 0) then", "elseif true then"),
        ("punch-only.lua", "if not ctx.relay_available then", "if true then"),
    ]

    func run() async throws {
        if let reason = LabScript.unavailableReason() { throw LabFailure(reason) }
        guard (1...100).contains(trials) else { throw ValidationError("--trials must be 1-100") }
        let labDir = try withLabScript { try LabScript.directory() }
        let repo = URL(fileURLWithPath: labDir).deletingLastPathComponent().path
        let source = try String(contentsOfFile: "\(repo)/strategies/default.lua", encoding: .utf8)
        let directory = NSTemporaryDirectory() + "holepunch-bench-relay-lab-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var files: [String] = []
        for variant in Self.variants {
            guard source.contains(variant.find) else { throw LabFailure("default.lua no longer says \(variant.find)") }
            let path = "\(directory)/\(variant.name)"
            try source.replacingOccurrences(of: variant.find, with: variant.replace).write(toFile: path, atomically: true, encoding: .utf8)
            files.append(path)
        }
        var selected: [(String, String)] = []
        for pair in pairs.isEmpty ? ["port_restricted:port_restricted", "full_cone:symmetric_random"] : pairs {
            let parts = pair.split(separator: ":").map(String.init)
            guard parts.count == 2, labNATTypes.contains(parts[0]), labNATTypes.contains(parts[1]) else {
                throw ValidationError("bad --pair \(pair): A:B with types \(labNATTypes.joined(separator: ", "))")
            }
            selected.append((parts[0], parts[1]))
        }
        let lab = LabSession(script: "\(labDir)/lab.sh", labDir: labDir, name: "hpbr\(getpid())")
        LabSession.installInterruptCleanup(lab)
        defer { lab.down() }
        var runner = MatrixRunner(lab: lab, strategies: files, pairs: selected, trials: trials, delay: delay, loss: 0,
                                  punchTimeout: 5, discover: false, raw: false, impostor: false, startDelay: 150)
        runner.alternate = true
        let report = try await runner.run()
        let rows = Self.rows(report)
        print(Self.table(rows, report: report))
        if let json {
            let object: [String: Any] = ["date": report.date, "delay_ms": delay, "rtt_ms": report.rttMs, "trials": trials,
                                         "rows": rows.map { $0.json(rtt: report.rttMs) }, "matrix": report.json()]
            try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
                .write(to: URL(fileURLWithPath: json))
        }
    }

    /// One pair and variant: medians over its successful trials, from the initiator's connect call.
    struct Row {
        var pair: String
        var variant: String
        var successes: Int
        var trials: Int
        var firstByte: Double?
        var registered: Double?
        var connected: Double?
        var paths: String

        /// First byte after the registration (the rendezvous round trip), ms.
        var beyondRendezvous: Double? { firstByte.flatMap { first in registered.map { first - $0 } } }

        /// ``beyondRendezvous`` in peer RTTs.
        func beyondInRTTs(_ rtt: Double) -> Double? { beyondRendezvous.map { $0 / max(rtt, 1) } }

        /// What ``beyondRendezvous`` takes over two peer RTTs (the relayed handshake and the echo), ms: the hosts'
        /// processing when the protocol waits for nothing else (it stays the same whatever the delay).
        func overTwoRTTs(_ rtt: Double) -> Double? { beyondRendezvous.map { $0 - 2 * rtt } }

        func json(rtt: Double) -> [String: Any] {
            var entry: [String: Any] = ["pair": pair, "variant": variant, "successes": successes, "trials": trials, "paths": paths]
            if let firstByte { entry["first_byte_median_ms"] = firstByte }
            if let registered { entry["registered_median_ms"] = registered }
            if let connected { entry["connected_median_ms"] = connected }
            if let beyond = beyondInRTTs(rtt) { entry["beyond_rendezvous_rtts"] = beyond }
            if let over = overTwoRTTs(rtt) { entry["over_two_rtts_ms"] = over }
            return entry
        }
    }

    static func rows(_ report: MatrixReport) -> [Row] {
        report.strategies.flatMap { variant in
            (report.results[variant] ?? []).map { pair in
                let ok = pair.trials.filter(\.ok)
                func median(_ values: [Double?]) -> Double? { percentile(values.compactMap { $0 }.sorted(), 0.5) }
                return Row(pair: "\(pair.a) × \(pair.b)", variant: variant, successes: ok.count, trials: pair.trials.count,
                           firstByte: median(ok.map(\.connectFirstByteMs)), registered: median(ok.map { $0.phases?["registered"] }),
                           connected: median(ok.map { $0.phases?["connected"] }), paths: pair.relayPaths)
            }
        }.sorted { ($0.pair, $0.variant) < ($1.pair, $1.variant) }
    }

    static func table(_ rows: [Row], report: MatrixReport) -> String {
        func ms(_ value: Double?) -> String { value.map { String(format: "%.0f", $0) } ?? "–" }
        var out = "Relay-first vs punch-only in the lab, \(report.date): \(report.trials) alternating trial(s) per variant, "
        out += "\(Int(report.delay)) ms one-way per WAN link, peer-to-peer RTT \(String(format: "%.1f", report.rttMs)) ms. "
        out += "Medians from the initiator's connect call.\n\n"
        out += "| pair | variant | success | first byte ms | registered ms | connected ms | beyond the rendezvous, in RTTs | "
        out += "over 2 RTTs, ms | paths |\n"
        out += "|---|---|---|---|---|---|---|---|---|\n"
        for row in rows {
            let beyond = row.beyondInRTTs(report.rttMs).map { String(format: "%.2f", $0) } ?? "–"
            let over = row.overTwoRTTs(report.rttMs).map { String(format: "%.1f", $0) } ?? "–"
            out += "| \(row.pair) | \(row.variant) | \(row.successes)/\(row.trials) | \(ms(row.firstByte)) | \(ms(row.registered)) | "
            out += "\(ms(row.connected)) | \(beyond) | \(over) | \(row.paths) |\n"
        }
        return out
    }
}
