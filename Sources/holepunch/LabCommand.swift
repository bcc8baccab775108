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

/// A missing `lab/lab.sh` is a usage error (exit 64, usage shown), as ArgumentParser reports `ValidationError`.
func withLabScript<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let missing as LabScriptNotFound { throw ValidationError(missing.description) }
}

struct LabUpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "up",
        abstract: "Create the lab (options as `lab.sh up`: --nat-a/--nat-b TYPE, --delay MS, --loss PCT, --topology NAME…).",
        discussion: """
            Needs root. NAT types: full_cone, restricted, port_restricted, symmetric_seq, symmetric_random. \
            Topologies (docs/lab.md): two-nats (default), same-lan, same-lan-hairpin, cgnat-homes, cgnat-vs-nat, dual-stack.

            Examples:
              sudo holepunch lab up --nat-a port_restricted --nat-b symmetric_seq
              sudo holepunch lab up --nat-a full_cone --nat-b restricted --loss 20
              sudo holepunch lab up --topology cgnat-homes --delay 20
            """
    )
    @OptionGroup var lab: LabNameOptions
    @Argument(parsing: .allUnrecognized, help: "Options passed to `lab.sh up`.")
    var options: [String] = []
    func run() throws { try withLabScript { try LabScript.exec(["up"] + options, name: lab.name) } }
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
    func run() throws { try withLabScript { try LabScript.exec(["down"], name: lab.name) } }
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
        try withLabScript { try LabScript.exec(["exec", host, "--"] + rest, name: lab.name) }
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
    func run() throws {
        try withLabScript { try LabScript.exec(["status"] + (json ? ["--json"] : env ? ["--env"] : []), name: lab.name) }
    }
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
    func run() throws { try withLabScript { try LabScript.exec(["renat"] + options, name: lab.name) } }
}
