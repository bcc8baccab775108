import ArgumentParser

/// The `holepunch` command-line tool: rendezvous, peers, NAT discovery, strategies, the lab and benchmarks.
@main
struct HolePunchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holepunch",
        abstract: "Direct, encrypted QUIC connections between peers behind NATs.",
        subcommands: [DemoCommand.self, StrategyCommand.self, BenchGroupCommand.self, RendezvousCommand.self, PeerCommand.self, IdentityCommand.self, NATCommand.self, LabCommand.self]
    )
}
