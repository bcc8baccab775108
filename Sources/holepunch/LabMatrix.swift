import ArgumentParser
import Foundation
import HolePunch
#if canImport(Glibc)
import Glibc
#endif

/// The five lab NAT types, in the order tables list them.
let labNATTypes = NATProfile.labPresets.map(\.name)

/// `holepunch lab matrix`: real punches for every ordered pair of lab NAT types, per strategy, in one lab.
///
/// One lab is brought up once; between pairs `lab.sh renat` re-makes both routers' NAT, and one rendezvous
/// runs in `rdv` for the whole run. Each trial starts two fresh `holepunch lab peer` processes with fresh
/// identities (fresh sockets, so fresh NAT mappings). A raw UDP punch (`probe.py punch`) per pair is the
/// physical reference.
struct LabMatrixCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "matrix",
        abstract: "Punch every ordered pair of lab NAT types with each strategy; print tables, write JSON.",
        discussion: """
            Needs root; builds and removes its own lab. See docs/matrix.md for the results.

            Examples:
              sudo holepunch lab matrix --trials 3 --json bench-results/matrix.json
              sudo holepunch lab matrix --trials 40 --pair port_restricted:symmetric_random
            """
    )

    @Option(name: .customLong("strategy"), help: "A Lua strategy file (repeatable); default strategies/default.lua and strategies/macula.lua.")
    var strategies: [String] = []
    @Option(help: "Trials per pair and strategy.") var trials = 3
    @Option(help: "One-way delay on each WAN link, ms.") var delay: Double = 20
    @Option(help: "Loss on each WAN link, each way, percent.") var loss: Double = 0
    @Option(help: "Write the results as JSON to this file.") var json: String?
    @Option(help: "Write the markdown tables to this file as well.") var markdown: String?
    @Option(name: .customLong("pair"), help: "Only these pairs, A:B (repeatable); default all 25.") var pairs: [String] = []
    @Option(help: "Punch timeout per trial, seconds.") var punchTimeout: Double = 5
    @Option(help: "The rendezvous's start delay ceiling, ms (its default: 150; measured peers get less).") var startDelay = 150
    @Option(help: "Lab name (default hpmx<pid>).") var name: String?
    @Flag(help: "Peers measure their NAT (RFC 5780) instead of being told the lab's configured type.") var discover = false
    @Flag(help: "Skip the raw UDP reference punch.") var noRaw = false
    @Flag(help: """
        Impostor check: a QUIC server with another identity runs in `other`, and router b DNATs every new inbound         UDP flow to it, so whatever the initiator dials first at b's address answers with the wrong identity.
        """)
    var impostor = false

    func run() async throws {
        if let reason = LabScript.unavailableReason() { throw LabFailure(reason) }
        let labDir = try LabScript.directory()
        let repo = URL(fileURLWithPath: labDir).deletingLastPathComponent().path
        let files = strategies.isEmpty ? ["\(repo)/strategies/default.lua", "\(repo)/strategies/macula.lua"] : strategies
        for file in files where !FileManager.default.fileExists(atPath: file) { throw ValidationError("no strategy file \(file)") }
        var selected: [(String, String)] = []
        if pairs.isEmpty {
            for a in labNATTypes { for b in labNATTypes { selected.append((a, b)) } }
        } else {
            for pair in pairs {
                let parts = pair.split(separator: ":").map(String.init)
                guard parts.count == 2, labNATTypes.contains(parts[0]), labNATTypes.contains(parts[1]) else {
                    throw ValidationError("bad --pair \(pair): A:B with types \(labNATTypes.joined(separator: ", "))")
                }
                selected.append((parts[0], parts[1]))
            }
        }
        let lab = LabSession(script: "\(labDir)/lab.sh", labDir: labDir, name: name ?? "hpmx\(getpid())")
        LabSession.installInterruptCleanup(lab)
        defer { lab.down() }
        let report = try await MatrixRunner(
            lab: lab, strategies: files, pairs: selected, trials: trials, delay: delay, loss: loss,
            punchTimeout: punchTimeout, discover: discover, raw: !noRaw, impostor: impostor, startDelay: startDelay
        ).run()
        let tables = report.markdown()
        print(tables)
        if let markdown { try tables.write(toFile: markdown, atomically: true, encoding: .utf8) }
        if let json {
            let data = try JSONSerialization.data(withJSONObject: report.json(), options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: json))
        }
    }
}

// MARK: - Running children

/// A child process with its output in files (never pipes: a long-lived grandchild holding a pipe would make
/// Foundation's wait hang), stopped with SIGTERM and then SIGKILL (it may have been started with SIGTERM blocked).
final class LabChild: @unchecked Sendable {
    let process = Process()
    let outPath: String
    let errPath: String

    init(_ arguments: [String], outPath: String, environment: [String: String] = [:]) throws {
        self.outPath = outPath
        errPath = outPath + ".err"
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: arguments[0])
        process.arguments = Array(arguments.dropFirst())
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = FileHandle(forWritingAtPath: outPath)
        let err = FileHandle(forWritingAtPath: errPath)
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = out
        process.standardError = err
        // Close our copies once the child has its own: a full matrix starts thousands of children, and the
        // leaked descriptors made Foundation's Process.run() crash (memcpy in run, descriptor number > 1024).
        defer {
            try? out?.close()
            try? err?.close()
        }
        try process.run()
    }

    /// Waits (bounded poll) for the exit; on timeout stops the child and returns nil.
    func wait(_ limit: Duration) async -> Int32? {
        let end = ContinuousClock.now + limit
        while process.isRunning, ContinuousClock.now < end {
            try? await Task.sleep(for: .milliseconds(5))
        }
        if process.isRunning {
            stop()
            return nil
        }
        return process.terminationStatus
    }

    /// SIGTERM, then SIGKILL if it has not gone within a second.
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        let end = ContinuousClock.now + .seconds(1)
        while process.isRunning, ContinuousClock.now < end { usleep(5_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    var output: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }
    var errors: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

    /// The last line of standard output that parses as a JSON object.
    var lastJSON: [String: Any]? {
        for line in output.split(separator: "\n").reversed() {
            if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] { return object }
        }
        return nil
    }
}

/// One lab instance driven through `lab.sh`.
final class LabSession: @unchecked Sendable {
    let script: String
    let labDir: String
    let name: String
    let work: String
    let executable: String
    private var serial = 0

    init(script: String, labDir: String, name: String) {
        self.script = script
        self.labDir = labDir
        self.name = name
        work = NSTemporaryDirectory() + "holepunch-matrix-\(name)"
        try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// A fresh file path in the work directory.
    func file(_ stem: String) -> String {
        serial += 1
        return "\(work)/\(serial)-\(stem)"
    }

    /// Starts `lab.sh ARGS` (HP_LAB set, quiet).
    func start(_ arguments: [String], stem: String) throws -> LabChild {
        try LabChild([script] + arguments, outPath: file(stem), environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"])
    }

    /// Runs `lab.sh ARGS` to the end; throws with its stderr when it fails.
    @discardableResult
    func run(_ arguments: [String], limit: Duration = .seconds(60)) async throws -> LabChild {
        let child = try start(arguments, stem: arguments.first ?? "lab")
        let status = await child.wait(limit)
        guard status == 0 else {
            throw LabFailure("lab.sh \(arguments.joined(separator: " ")) failed (\(status.map { "exit \($0)" } ?? "timeout")): "
                + child.errors.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return child
    }

    /// Starts a command inside a lab host.
    func exec(_ host: String, _ command: [String], stem: String) throws -> LabChild {
        try start(["exec", host, "--"] + command, stem: stem)
    }

    /// Deletes the lab (synchronously; also used from the interrupt handler).
    func down() {
        if let child = try? LabChild([script, "down"], outPath: "\(work)/down.out", environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"]) {
            child.process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: work)
    }

    /// The `topeer` packet counter of a router (UDP from its LAN toward the public peer range).
    func packetCounter(_ router: String) async -> Int {
        guard let child = try? exec(router, ["nft", "list", "counter", "ip", "hpnat", "topeer"], stem: "counter"),
              await child.wait(.seconds(5)) == 0 else { return 0 }
        let text = child.output
        guard let range = text.range(of: "packets ") else { return 0 }
        return Int(text[range.upperBound...].prefix { $0.isNumber }) ?? 0
    }

    nonisolated(unsafe) private static var interrupted: LabSession?

    /// Ctrl-C or SIGTERM deletes the lab before exiting (the issue: "always deletes, even on Ctrl-C").
    static func installInterruptCleanup(_ lab: LabSession) {
        interrupted = lab
        for sig in [SIGINT, SIGTERM] {
            signal(sig) { _ in
                LabSession.interrupted?.down()
                _exit(130)
            }
        }
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }
}

// MARK: - The run

/// One trial's outcome.
struct TrialResult: Sendable {
    var ok: Bool
    var timeMs: Double?
    var rounds: Int
    var packets: Int
    var error: String?
    var message: String?
    var peerNode: String? = nil
    var expectedPeer: String? = nil
    /// Initiator's start-to-first-byte: from its process start to the first echoed byte (discovery, registration,
    /// coordination, punch and one stream round trip).
    var firstByteMs: Double? = nil
    /// The same from the initiator's `connect()` call.
    var connectFirstByteMs: Double? = nil
    /// The initiator's milestones from its `connect()` call: registered, coordinated, start, connected, first_byte.
    var phases: [String: Double]? = nil
}

/// One pair's results for one strategy.
struct PairResult: Sendable {
    var a: String
    var b: String
    var trials: [TrialResult] = []

    var successes: Int { trials.filter(\.ok).count }
    var times: [Double] { trials.compactMap { $0.ok ? $0.timeMs : nil }.sorted() }
    var median: Double? { percentile(times, 0.5) }
    var p95: Double? { percentile(times, 0.95) }
    var firstByteTimes: [Double] { trials.compactMap { $0.ok ? $0.firstByteMs : nil }.sorted() }
    /// Median start-to-first-byte of the successful trials.
    var firstByteMedian: Double? { percentile(firstByteTimes, 0.5) }
    var firstByteP95: Double? { percentile(firstByteTimes, 0.95) }
    var meanPackets: Double { trials.isEmpty ? 0 : Double(trials.map(\.packets).reduce(0, +)) / Double(trials.count) }
    var meanRounds: Double { trials.isEmpty ? 0 : Double(trials.map(\.rounds).reduce(0, +)) / Double(trials.count) }
    var errors: [String: Int] {
        var counts: [String: Int] = [:]
        for trial in trials where !trial.ok { counts[trial.error ?? "unknown", default: 0] += 1 }
        return counts
    }
}

/// Nearest-rank percentile of sorted values.
func percentile(_ sorted: [Double], _ q: Double) -> Double? {
    guard !sorted.isEmpty else { return nil }
    if q == 0.5 {
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }
    let rank = Int((q * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank, 1), sorted.count) - 1]
}

/// The raw UDP reference for one pair.
struct RawResult: Sendable {
    var connected: Bool
    var timeMs: Double?
}

struct MatrixReport: Sendable {
    /// With `--impostor`: UDP packets router b sent to the impostor, over all pairs.
    var impostorPackets: Int?
    var strategies: [String]
    var results: [String: [PairResult]]  // strategy -> pairs in order
    var raw: [String: RawResult]  // "a:b" -> raw punch
    var rttMs: Double
    var trials: Int
    var delay: Double
    var loss: Double
    var date: String
    /// Whether the peers measured their NAT (`--discover`) rather than being told it.
    var discover: Bool

    private func ms(_ value: Double?) -> String { value.map { String(format: "%.0f", $0) } ?? "–" }

    func markdown() -> String {
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

    func json() -> [String: Any] {
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

struct MatrixRunner {
    let lab: LabSession
    let strategies: [String]
    let pairs: [(String, String)]
    let trials: Int
    let delay: Double
    let loss: Double
    let punchTimeout: Double
    let discover: Bool
    let raw: Bool
    let impostor: Bool
    let startDelay: Int

    /// Where the impostor listens (in `other`); router b DNATs new inbound UDP flows there.
    static let impostorAddress = "198.51.100.20:7443"

    private func progress(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    func run() async throws -> MatrixReport {
        let date = ISO8601DateFormatter().string(from: Date())
        let first = pairs[0]
        progress("lab \(lab.name): up (\(first.0) × \(first.1), delay \(delay) ms, loss \(loss)%)")
        try await lab.run(["up", "--nat-a", first.0, "--nat-b", first.1, "--delay", "\(delay)", "--loss", "\(loss)", "--probe-server"],
                          limit: .seconds(120))

        // One rendezvous for the whole run.
        let rdvIdentity = lab.file("rdv.identity")
        try Identity.generate(commonName: "lab-rendezvous").save(to: rdvIdentity)
        let ready = lab.file("rdv.ready")
        let rendezvous = try lab.exec("rdv", [lab.executable, "lab", "rendezvous", "--identity", rdvIdentity, "--ready-file", ready,
                                                "--start-delay", "\(startDelay)"],
                                      stem: "rendezvous")
        defer { rendezvous.stop() }
        let end = ContinuousClock.now + .seconds(20)
        while !FileManager.default.fileExists(atPath: ready) {
            guard rendezvous.process.isRunning, ContinuousClock.now < end else {
                throw LabFailure("the lab rendezvous did not start: \(rendezvous.errors)")
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        let rdvNode = try String(contentsOfFile: ready, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)

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
            if index > 0 { try await lab.run(["renat", "--nat-a", pair.0, "--nat-b", pair.1]) }
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
            for strategy in strategies {
                var result = PairResult(a: pair.0, b: pair.1)
                let short = URL(fileURLWithPath: strategy).lastPathComponent
                for trial in 1...max(1, trials) {
                    let outcome = try await runTrial(pair: pair, strategy: strategy, rdvNode: rdvNode)
                    result.trials.append(outcome)
                    let summary = outcome.ok
                        ? String(format: "ok %.0f ms, %d rounds, %d packets, first byte %.0f ms", outcome.timeMs ?? 0, outcome.rounds,
                                 outcome.packets, outcome.firstByteMs ?? 0)
                        : "failed: \(outcome.error ?? "?") \(outcome.message ?? "")"
                    progress("\(label) \(short) trial \(trial)/\(trials): \(summary)")
                }
                results[short, default: []].append(result)
            }
            // The impostor rule's counter, before renat replaces the table: packets b's router gave to the impostor.
            if impostor, let child = try? lab.exec("nat-b", ["nft", "list", "chain", "ip", "hpnat", "prerouting"], stem: "impostor-counter"),
               await child.wait(.seconds(5)) == 0, let range = child.output.range(of: "packets ") {
                impostorPackets? += Int(child.output[range.upperBound...].prefix { $0.isNumber }) ?? 0
            }
        }
        return MatrixReport(impostorPackets: impostorPackets, strategies: strategies.map { URL(fileURLWithPath: $0).lastPathComponent }, results: results, raw: raws,
                            rttMs: rtt, trials: trials, delay: delay, loss: loss, date: date, discover: discover)
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

    private func runTrial(pair: (String, String), strategy: String, rdvNode: String) async throws -> TrialResult {
        let idA = lab.file("a.identity"), idB = lab.file("b.identity")
        let a = try Identity.generate(commonName: "lab-peer-a")
        try a.save(to: idA)
        let b = try Identity.generate(commonName: "lab-peer-b")
        try b.save(to: idB)
        let before = await lab.packetCounter("nat-a") + lab.packetCounter("nat-b")
        func peerArguments(identity: String, nat: String) -> [String] {
            var arguments = [lab.executable, "lab", "peer", "--rendezvous-id", rdvNode, "--identity", identity,
                             "--strategy", strategy, "--punch-timeout", "\(punchTimeout)", "--timeout", "\(punchTimeout + 10)"]
            arguments += discover ? ["--discover"] : ["--nat", nat]
            return arguments
        }
        let ready = lab.file("target.ready")
        let target = try lab.exec("peer-b", peerArguments(identity: idB, nat: pair.1) + ["--ready-file", ready], stem: "target")
        let end = ContinuousClock.now + .seconds(15)
        while !FileManager.default.fileExists(atPath: ready), target.process.isRunning, ContinuousClock.now < end {
            try await Task.sleep(for: .milliseconds(5))
        }
        guard FileManager.default.fileExists(atPath: ready) else {
            target.stop()
            return TrialResult(ok: false, rounds: 0, packets: 0, error: "targetNotRegistered",
                               message: (target.lastJSON?["message"] as? String) ?? target.errors.split(separator: "\n").last.map(String.init))
        }
        let initiator = try lab.exec("peer-a", peerArguments(identity: idA, nat: pair.0) + ["--connect", "\(b.nodeID)"], stem: "initiator")
        let limit = Duration.milliseconds(Int((punchTimeout + 15) * 1000))
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
            phases: result["phases_ms"] as? [String: Double])
    }
}
