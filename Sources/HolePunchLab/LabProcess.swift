package import Foundation
#if canImport(Glibc)
import Glibc
#endif

// Process supervision for the lab harness: children with output in files, and one lab instance driven through
// `lab/lab.sh`. The CLI's `lab matrix` and the lab tests' drivers share it.

/// A failure with a one-line message and exit code 1.
package struct LabFailure: Error, CustomStringConvertible {
    package let description: String
    package init(_ message: String) { description = message }
}

/// A child process with its output in files (never pipes: a long-lived grandchild holding a pipe would make
/// Foundation's wait hang), stopped with SIGTERM and then SIGKILL (it may have been started with SIGTERM blocked).
package final class LabChild: @unchecked Sendable {
    package let process = Process()
    package let outPath: String
    package let errPath: String

    package init(_ arguments: [String], outPath: String, environment: [String: String] = [:]) throws {
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
    package func wait(_ limit: Duration) async -> Int32? {
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
    package func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        let end = ContinuousClock.now + .seconds(1)
        while process.isRunning, ContinuousClock.now < end { usleep(5_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    package var output: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }
    package var errors: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }

    /// The last line of standard output that parses as a JSON object.
    package var lastJSON: [String: Any]? {
        for line in output.split(separator: "\n").reversed() {
            if let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] { return object }
        }
        return nil
    }
}

/// One lab instance driven through `lab.sh`.
package final class LabSession: @unchecked Sendable {
    package let script: String
    package let labDir: String
    package let name: String
    package let work: String
    package let executable: String
    private var serial = 0

    package init(script: String, labDir: String, name: String) {
        self.script = script
        self.labDir = labDir
        self.name = name
        work = NSTemporaryDirectory() + "holepunch-matrix-\(name)"
        try? FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        executable = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    /// A fresh file path in the work directory.
    package func file(_ stem: String) -> String {
        serial += 1
        return "\(work)/\(serial)-\(stem)"
    }

    /// Starts `lab.sh ARGS` (HP_LAB set, quiet).
    package func start(_ arguments: [String], stem: String) throws -> LabChild {
        try LabChild([script] + arguments, outPath: file(stem), environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"])
    }

    /// Runs `lab.sh ARGS` to the end; throws with its stderr when it fails.
    @discardableResult
    package func run(_ arguments: [String], limit: Duration = .seconds(60)) async throws -> LabChild {
        try await runToEnd(script, arguments, limit: limit)
    }

    /// Runs `path ARGS` (a lab script: HP_LAB set, quiet) to the end; throws with its stderr when it fails.
    private func runToEnd(_ path: String, _ arguments: [String], limit: Duration) async throws -> LabChild {
        let child = try LabChild([path] + arguments, outPath: file(arguments.first ?? "lab"),
                                 environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"])
        let status = await child.wait(limit)
        guard status == 0 else {
            throw LabFailure("\(URL(fileURLWithPath: path).lastPathComponent) \(arguments.joined(separator: " ")) failed "
                + "(\(status.map { "exit \($0)" } ?? "timeout")): " + child.errors.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        return child
    }

    /// Starts a command inside a lab host.
    package func exec(_ host: String, _ command: [String], stem: String) throws -> LabChild {
        try start(["exec", host, "--"] + command, stem: stem)
    }

    /// Whether `lab/portmap.sh` may be up in this lab (``runPortMap(_:)`` ran): ``down()`` then stops it first.
    private var portMapUsed = false

    /// Runs `lab/portmap.sh ARGS` (HP_LAB set, quiet) to the end; throws with its stderr when it fails.
    package func runPortMap(_ arguments: [String], limit: Duration = .seconds(60)) async throws {
        portMapUsed = true
        _ = try await runToEnd("\(labDir)/portmap.sh", arguments, limit: limit)
    }

    /// Deletes the lab (synchronously; also used from the interrupt handler).
    package func down() {
        // A process left in a namespace keeps it alive: miniupnpd and its STUN server go before the lab.
        if portMapUsed, let child = try? LabChild(["\(labDir)/portmap.sh", "down"], outPath: "\(work)/portmap-down.out",
                                                  environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"]) {
            child.process.waitUntilExit()
        }
        if let child = try? LabChild([script, "down"], outPath: "\(work)/down.out", environment: ["HP_LAB": name, "HP_LAB_QUIET": "1"]) {
            child.process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: work)
    }

    /// The `topeer` packet counters of a router (UDP from its LAN toward the public peer range, and in the dual-stack
    /// topology toward the peers' IPv6 LANs); 0 for a router the topology does not have.
    package func packetCounter(_ router: String) async -> Int {
        // One `nft` call for every table's counters (a call per table would add a process per router and trial).
        guard let child = try? exec(router, ["nft", "list", "counters"], stem: "counter"),
              await child.wait(.seconds(5)) == 0 else { return 0 }
        return child.output.components(separatedBy: "counter topeer").dropFirst().reduce(0) { total, rest in
            guard let range = rest.range(of: "packets ") else { return total }
            return total + (Int(rest[range.upperBound...].prefix { $0.isNumber }) ?? 0)
        }
    }

    nonisolated(unsafe) private static var interrupted: LabSession?

    /// Ctrl-C or SIGTERM deletes the lab before exiting (the issue: "always deletes, even on Ctrl-C").
    package static func installInterruptCleanup(_ lab: LabSession) {
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

