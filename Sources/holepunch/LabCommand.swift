import ArgumentParser
import Foundation
import HolePunchLab
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch lab …`: the real-NAT lab (network namespaces, nftables NATs, delay lines) and what runs in it.
///
/// `up`, `down`, `exec`, `status` and `renat` are a thin layer over `lab/lab.sh` (see docs/lab.md): the script
/// stays the single implementation, so the CLI and the shell give the same lab. `matrix` runs real punches for
/// every NAT pair; `peer`, `rendezvous` and `detect` are the small drivers it starts inside the namespaces.
struct LabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "The real-NAT lab: network namespaces with nftables NATs, and the NAT-pair matrix.",
        discussion: """
            Needs root, iproute2 (`ip netns`), nftables and python3; see docs/lab.md. The lab script is found \
            through $HOLEPUNCH_LAB_DIR, else lab/lab.sh above the current directory or above this executable.

            Examples:
              sudo holepunch lab up --nat-a port_restricted --nat-b symmetric_seq
              sudo holepunch lab matrix --trials 3 --json bench-results/matrix.json
              sudo holepunch lab down
            """,
        subcommands: [
            LabUpCommand.self, LabDownCommand.self, LabExecCommand.self, LabStatusCommand.self, LabRenatCommand.self,
            LabMatrixCommand.self, LabPeerCommand.self, LabRendezvousCommand.self, LabDetectCommand.self,
        ]
    )
}

/// Options every lab-script subcommand shares.
struct LabNameOptions: ParsableArguments {
    @Option(name: .customLong("name"), help: "Lab instance name ([a-z][a-z0-9]{0,15}); default $HP_LAB or \"hp\".")
    var name: String?
}

/// Locating and running `lab/lab.sh`.
enum LabScript {
    /// A one-line reason why the lab cannot run here, or nil.
    static func unavailableReason() -> String? {
        if geteuid() != 0 {
            return "the lab needs root (network namespaces and nftables); run it with sudo"
        }
        guard let ip = which("ip") else { return "`ip` (iproute2) is not installed; the lab needs `ip netns`" }
        if runQuietly(ip, ["netns", "list"]) != 0 {
            return "`ip netns` is unavailable on this machine (no network namespace support?)"
        }
        return nil
    }

    /// The path of `lab/lab.sh`.
    static func path() throws -> String {
        var candidates: [String] = []
        if let dir = ProcessInfo.processInfo.environment["HOLEPUNCH_LAB_DIR"] { candidates.append(dir + "/lab.sh") }
        // Walk up from the working directory, then from the executable (…/.build*/release/holepunch).
        for start in [FileManager.default.currentDirectoryPath, executableDirectory()] {
            var url = URL(fileURLWithPath: start)
            for _ in 0..<6 {
                candidates.append(url.appendingPathComponent("lab/lab.sh").path)
                url.deleteLastPathComponent()
            }
        }
        if let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) { return found }
        throw ValidationError("cannot find lab/lab.sh: run from the repository or set HOLEPUNCH_LAB_DIR")
    }

    /// The repository's `lab/` directory.
    static func directory() throws -> String { URL(fileURLWithPath: try path()).deletingLastPathComponent().path }

    /// Replaces this process with `lab.sh ARGS` (so signals, exit codes and the terminal go straight through).
    static func exec(_ arguments: [String], name: String?) throws -> Never {
        if let reason = unavailableReason() { throw LabFailure(reason) }
        let script = try path()
        if let name { setenv("HP_LAB", name, 1) }
        let argv = [script] + arguments
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cArgs.append(nil)
        execv(script, cArgs)
        throw LabFailure("cannot run \(script): \(String(cString: strerror(errno)))")
    }

    private static func executableDirectory() -> String {
        let path = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: path).deletingLastPathComponent().path
    }

    private static func which(_ tool: String) -> String? {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":")
        for dir in dirs + ["/usr/sbin", "/sbin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(tool)") {
            return "\(dir)/\(tool)"
        }
        return nil
    }

    private static func runQuietly(_ tool: String, _ arguments: [String]) -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return -1 }
        process.waitUntilExit()
        return process.terminationStatus
    }
}

struct LabUpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "up",
        abstract: "Create the lab (options as `lab.sh up`: --nat-a/--nat-b TYPE, --delay MS, --loss PCT, --probe-server…).",
        discussion: """
            Needs root. NAT types: full_cone, restricted, port_restricted, symmetric_seq, symmetric_random.

            Examples:
              sudo holepunch lab up --nat-a port_restricted --nat-b symmetric_seq
              sudo holepunch lab up --nat-a full_cone --nat-b restricted --loss 20
            """
    )
    @OptionGroup var lab: LabNameOptions
    @Argument(parsing: .allUnrecognized, help: "Options passed to `lab.sh up`.")
    var options: [String] = []
    func run() throws { try LabScript.exec(["up"] + options, name: lab.name) }
}

struct LabDownCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "down",
        abstract: "Delete everything the lab made (idempotent).",
        discussion: """
            Needs root; safe to run when no lab exists.

            Examples:
              sudo holepunch lab down
              sudo holepunch lab down --name lab2
            """
    )
    @OptionGroup var lab: LabNameOptions
    func run() throws { try LabScript.exec(["down"], name: lab.name) }
}

struct LabExecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Run a command in a lab host's namespace: lab exec HOST -- CMD…",
        discussion: """
            Needs root and a running lab.

            Examples:
              sudo holepunch lab exec peer-a -- ip addr
              sudo holepunch lab exec nat-a -- nft list ruleset
            """
    )
    @OptionGroup var lab: LabNameOptions
    @Argument(help: "rdv, other, nat-a, nat-b, peer-a, peer-b or wan.")
    var host: String
    @Argument(parsing: .captureForPassthrough, help: "The command and its arguments.")
    var command: [String] = []
    func run() throws {
        let rest = command.first == "--" ? Array(command.dropFirst()) : command
        guard !rest.isEmpty else { throw ValidationError("usage: holepunch lab exec HOST -- CMD…") }
        try LabScript.exec(["exec", host, "--"] + rest, name: lab.name)
    }
}

struct LabStatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Addresses and NAT settings of the lab; exit 3 when it is down.",
        discussion: """
            --env prints shell variable assignments for scripts.

            Examples:
              sudo holepunch lab status
              sudo holepunch lab status --json
            """
    )
    @OptionGroup var lab: LabNameOptions
    @Flag(help: "Print JSON.") var json = false
    @Flag(help: "Print HP_LAB_*= lines.") var env = false
    func run() throws { try LabScript.exec(["status"] + (json ? ["--json"] : env ? ["--env"] : []), name: lab.name) }
}

struct LabRenatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "renat",
        abstract: "Re-make both routers' NAT in a running lab (--nat-a/--nat-b TYPE…).",
        discussion: """
            Faster than lab down and up when only the NAT types change.

            Examples:
              sudo holepunch lab renat --nat-a full_cone --nat-b symmetric_random
            """
    )
    @OptionGroup var lab: LabNameOptions
    @Argument(parsing: .allUnrecognized, help: "Options passed to `lab.sh renat`.")
    var options: [String] = []
    func run() throws { try LabScript.exec(["renat"] + options, name: lab.name) }
}
