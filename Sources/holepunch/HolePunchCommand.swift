import ArgumentParser
import HolePunch

/// The `holepunch` command-line tool: rendezvous, peers, NAT discovery, strategies, the lab and benchmarks.
@main
struct HolePunchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holepunch",
        abstract: "Direct, encrypted QUIC connections between peers behind NATs.",
        discussion: """
            Every subcommand has --help with examples. Exit status: 0 success, 1 a local error (a file, a socket, \
            an address that cannot be bound), 2 the rendezvous refused, 3 the punch or the connection failed, 64 bad \
            arguments.

            Examples:
              holepunch demo
              holepunch identity create a.pem
              holepunch peer --help
            """,
        version: HolePunchPackage.version,
        subcommands: [DemoCommand.self, StrategyCommand.self, BenchGroupCommand.self, RendezvousCommand.self, PeerCommand.self, IdentityCommand.self, NATCommand.self, LabCommand.self]
    )
}
