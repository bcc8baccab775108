import Foundation
import Testing

/// Drives `lab/lab.sh` and `lab/probe.py` with Foundation `Process`.
///
/// The lab needs root, `ip netns`, nftables inside namespaces and /dev/net/tun; `lab.sh check`
/// decides. Every lab made here has a unique `HP_LAB` prefix that starts with `runPrefix`.
enum LabSupport {
    static let repoRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let labScript = repoRoot.appendingPathComponent("lab/lab.sh").path
    static let probeScript = repoRoot.appendingPathComponent("lab/probe.py").path

    /// Prefix shared by every lab of this test process, e.g. `hpt12345`.
    static let runPrefix = "hpt\(ProcessInfo.processInfo.processIdentifier)"

    private static let counter = Counter()

    /// A fresh lab name, e.g. `hpt12345x3`.
    static func uniqueName() -> String { "\(runPrefix)x\(counter.next())" }

    /// Why the lab cannot run here, or nil when it can.
    static let unavailableReason: String? = {
        guard geteuid() == 0 else { return "needs root (uid \(geteuid()))" }
        guard FileManager.default.isExecutableFile(atPath: labScript) else { return "missing \(labScript)" }
        do {
            let r = try run([labScript, "check"], env: ["HP_LAB": runPrefix + "c"], timeout: 30)
            if r.status == 0 {
                reapStaleLabs()
                return nil
            }
            let why = (r.stdout + r.stderr).trimmingCharacters(in: .whitespacesAndNewlines)
            return why.isEmpty ? "lab.sh check failed" : why
        } catch {
            return "cannot run lab.sh check: \(error)"
        }
    }()

    /// Deletes labs left by earlier test processes that died without cleaning up (SIGKILL, a
    /// crash): names `hpt<pid>x<n>` whose pid no longer runs. Never touches any other lab.
    static func reapStaleLabs() {
        guard let r = try? run([labScript, "list"], timeout: 30) else { return }
        for name in r.stdout.split(separator: "\n").map(String.init) {
            guard name.hasPrefix("hpt"), let x = name.firstIndex(of: "x"),
                  let pid = Int32(name[name.index(name.startIndex, offsetBy: 3)..<x]),
                  pid != ProcessInfo.processInfo.processIdentifier, kill(pid, 0) != 0, errno == ESRCH
            else { continue }
            print("HolePunchLabTests: deleting stale lab \(name) (its test process \(pid) is gone)")
            _ = try? run([labScript, "down"], env: ["HP_LAB": name], timeout: 60)
        }
    }

    static var available: Bool {
        if let why = unavailableReason {
            print("HolePunchLabTests skipped: \(why)")
            return false
        }
        return true
    }

    struct RunResult: Sendable {
        var status: Int32
        var stdout: String
        var stderr: String
        var timedOut: Bool
    }

    struct LabError: Error, CustomStringConvertible {
        var description: String
    }

    /// Runs a command to completion (bounded by `timeout`), capturing output through temp files
    /// (not pipes: a detached child that inherited a pipe would keep it open forever).
    static func run(_ argv: [String], env: [String: String] = [:], timeout: TimeInterval = 60) throws -> RunResult {
        let bg = try Background(argv, env: env)
        return bg.wait(timeout: timeout)
    }

    /// A process started in the background; always reaped by `wait` or `stop`.
    final class Background: @unchecked Sendable {
        let process = Process()
        let outURL: URL
        let errURL: URL
        /// The file the process writes once it is ready, if any; removed with the output files.
        let readyFile: String?

        init(_ argv: [String], env: [String: String] = [:], readyFile: String? = nil) throws {
            self.readyFile = readyFile
            let dir = FileManager.default.temporaryDirectory
            let id = UUID().uuidString
            outURL = dir.appendingPathComponent("hplab-\(id).out")
            errURL = dir.appendingPathComponent("hplab-\(id).err")
            _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
            _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = argv
            var environment = ProcessInfo.processInfo.environment
            for (k, v) in env { environment[k] = v }
            process.environment = environment
            process.standardInput = FileHandle.nullDevice
            let outHandle = try FileHandle(forWritingTo: outURL)
            let errHandle = try FileHandle(forWritingTo: errURL)
            defer {
                try? outHandle.close()
                try? errHandle.close()
            }
            process.standardOutput = outHandle
            process.standardError = errHandle
            try process.run()
        }

        /// Waits at most `timeout` seconds, then terminates (SIGTERM, then SIGKILL) the process.
        func wait(timeout: TimeInterval) -> RunResult {
            let deadline = Date().addingTimeInterval(timeout)
            var timedOut = false
            while process.isRunning {
                if Date() >= deadline {
                    timedOut = true
                    process.terminate()
                    let killAt = Date().addingTimeInterval(2)
                    while process.isRunning && Date() < killAt { usleep(10_000) }
                    if process.isRunning { kill(process.processIdentifier, SIGKILL) }
                    break
                }
                usleep(5_000)
            }
            process.waitUntilExit()
            let out = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
            let err = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
            try? FileManager.default.removeItem(at: outURL)
            try? FileManager.default.removeItem(at: errURL)
            if let readyFile { try? FileManager.default.removeItem(atPath: readyFile) }
            return RunResult(status: process.terminationStatus, stdout: out, stderr: err, timedOut: timedOut)
        }

        func stop() -> RunResult {
            if process.isRunning { process.terminate() }
            return wait(timeout: 3)
        }
    }

    /// Polls `condition` every 20 ms for at most `timeout` seconds.
    @discardableResult
    static func waitUntil(timeout: TimeInterval, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    /// Network namespaces currently present whose name is `<lab>-<host>`.
    static func namespaces(ofLab lab: String) -> [String] {
        namespaces(startingWith: lab + "-")
    }

    static func namespaces(startingWith prefix: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        return names.filter { $0.hasPrefix(prefix) }.sorted()
    }
}

private final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0
    func next() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value
    }
}

/// One running lab instance.
final class Lab: @unchecked Sendable {
    let name: String
    private var isUp = false

    var env: [String: String] { ["HP_LAB": name, "HP_LAB_QUIET": "1"] }

    /// Brings a lab up with `lab.sh up <options>`; throws (after lab.sh cleaned up) when it fails.
    init(_ options: [String], name: String = LabSupport.uniqueName()) throws {
        self.name = name
        let r = try LabSupport.run([LabSupport.labScript, "up"] + options, env: ["HP_LAB": name, "HP_LAB_QUIET": "1"], timeout: 60)
        guard r.status == 0, !r.timedOut else {
            _ = try? LabSupport.run([LabSupport.labScript, "down"], env: ["HP_LAB": name], timeout: 60)
            throw LabSupport.LabError(description: "lab.sh up \(options.joined(separator: " ")) failed (\(r.status)): \(r.stderr)")
        }
        isUp = true
    }

    /// Deletes the lab; idempotent.
    func down() {
        _ = try? LabSupport.run([LabSupport.labScript, "down"], env: env, timeout: 60)
        isUp = false
    }

    /// Runs `argv` inside `host`'s namespace.
    func exec(_ host: String, _ argv: [String], timeout: TimeInterval = 30) throws -> LabSupport.RunResult {
        try LabSupport.run([LabSupport.labScript, "exec", host, "--"] + argv, env: env, timeout: timeout)
    }

    func background(_ host: String, _ argv: [String]) throws -> LabSupport.Background {
        try LabSupport.Background([LabSupport.labScript, "exec", host, "--"] + argv, env: env)
    }

    /// Starts `argv` in `host` with `--ready-file` appended (probe.py and `holepunch lab rendezvous` write that
    /// file once they listen), and expects the file within `timeout` seconds. Stopping the process removes it.
    func backgroundWhenReady(_ host: String, _ argv: [String], timeout: TimeInterval = 10,
                             sourceLocation: SourceLocation = #_sourceLocation) throws -> LabSupport.Background {
        let ready = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(host)-\(UUID().uuidString).ready").path
        let process = try LabSupport.Background([LabSupport.labScript, "exec", host, "--"] + argv + ["--ready-file", ready],
                                                env: env, readyFile: ready)
        #expect(LabSupport.waitUntil(timeout: timeout) { FileManager.default.fileExists(atPath: ready) },
                "\(argv.joined(separator: " ")) in \(host) did not get ready", sourceLocation: sourceLocation)
        return process
    }

    /// Runs `lab/probe.py <args>` inside `host` and decodes its JSON output.
    func probe<T: Decodable>(_ host: String, _ args: [String], as type: T.Type, timeout: TimeInterval = 30) throws -> T {
        let r = try exec(host, ["python3", LabSupport.probeScript] + args, timeout: timeout)
        guard !r.timedOut else { throw LabSupport.LabError(description: "probe \(args) in \(host) timed out") }
        guard let line = r.stdout.split(separator: "\n").last else {
            throw LabSupport.LabError(description: "probe \(args) in \(host) printed nothing (exit \(r.status)): \(r.stderr)")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(line.utf8))
        } catch {
            throw LabSupport.LabError(description: "probe \(args) in \(host): bad JSON \(r.stdout) (\(error)); stderr: \(r.stderr)")
        }
    }

    /// `probe.py punch` on both peers at once (a raw UDP punch through the probe server's name registry, so the lab
    /// needs `--probe-server`): what each side printed.
    func rawPunch(timeout: String) throws -> (a: PunchResult, b: PunchResult) {
        let a = try background("peer-a", ["python3", LabSupport.probeScript, "punch", "--name", "a", "--peer", "b", "--timeout", timeout])
        let b = try probe("peer-b", ["punch", "--name", "b", "--peer", "a", "--timeout", timeout], as: PunchResult.self, timeout: 20)
        let ra = a.wait(timeout: 20)
        let pa = try JSONDecoder().decode(PunchResult.self, from: Data((ra.stdout.split(separator: "\n").last ?? "").utf8))
        return (pa, b)
    }

    func status() throws -> LabStatus {
        let r = try LabSupport.run([LabSupport.labScript, "status", "--json"], env: env, timeout: 30)
        return try JSONDecoder().decode(LabStatus.self, from: Data(r.stdout.utf8))
    }

    deinit {
        if isUp { down() }
    }
}

/// Runs `body` with a fresh lab and always deletes it afterwards, then checks nothing is left.
func withLab<T>(_ options: [String], _ body: (Lab) throws -> T) throws -> T {
    let lab = try Lab(options)
    defer {
        lab.down()
        #expect(LabSupport.namespaces(ofLab: lab.name).isEmpty, "lab \(lab.name) left namespaces behind")
    }
    return try body(lab)
}

// MARK: - JSON shapes

struct LabStatus: Decodable {
    struct Host: Decodable {
        var netns: String
        var addresses: [String]
    }
    struct NAT: Decodable {
        var type: String
        var `public`: String
        var port_preservation: String
        var mapping_timeout: Int
        var delay_line: Bool
    }
    var lab: String
    var hosts: [String: Host]
    var nat: [String: NAT]
    var state_dir: String
}

/// What `probe.py classify` prints; later `holepunch nat detect --json` is to print the same fields.
struct Classification: Decodable {
    struct Allocation: Decodable {
        var kind: String
        var port_preserving: Bool
        var first_mapping_preserved: Bool
        var delta: Int?
        var ports: [Int]
        var local_ports: [Int]
    }
    var mapping: String?
    var filtering: String?
    var mapped_address: String?
    var allocation: Allocation?
    var error: String?
}

struct RTTResult: Decodable {
    struct Stats: Decodable {
        var min: Double
        var median: Double
        var mean: Double
        var p95: Double
        var max: Double
        var stdev: Double
    }
    var sent: Int
    var received: Int
    var loss_pct: Double
    var rtt_ms: Stats?
}

struct QueryResult: Decodable {
    var local_port: Int
    var mapped: String?
    var again: [String?]?
}

struct ListenResult: Decodable {
    struct Datagram: Decodable { var from: String }
    var received: [Datagram]
}

struct PunchResult: Decodable {
    var connected: Bool
    var time_ms: Double?
    var first_heard_ms: Double?
    var peer_observed: String?
    var sent: Int?
}

struct SendResult: Decodable {
    var sent: Int
    var replies: Int
    var icmp_errors: Int
}

func port(of endpoint: String?) -> Int? {
    guard let e = endpoint, let p = e.split(separator: ":").last else { return nil }
    return Int(p)
}
