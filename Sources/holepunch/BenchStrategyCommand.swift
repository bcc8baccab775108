import ArgumentParser
import Foundation
import HolePunchLab
import HolePunchStrategy

/// `holepunch bench …`: benchmarks. Other benchmarks (e.g. `bench punch`) add themselves to `subcommands`.
struct BenchGroupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks.",
        discussion: """
            Each benchmark prints a table; --json FILE also writes the figures for scripts. Use a release build.

            Examples:
              holepunch bench quic --compare
              holepunch bench strategy --iterations 50000
            """,
        subcommands: [
            BenchStrategyCommand.self, BenchQUICCommand.self, BenchPunchCommand.self, BenchRendezvousCommand.self,
            BenchRendezvousFloodCommand.self, BenchInitialsCommand.self, BenchRelayCommand.self, BenchRelayLabCommand.self,
        ]
    )
}

/// `holepunch bench strategy`: latency of `plan(ctx)` per shipped strategy and for the built-in default.
struct BenchStrategyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strategy",
        abstract: "Median and p99 latency of plan(ctx) for each shipped strategy and the built-in Swift default.",
        discussion: """
            Contexts cycle over every NAT pair, both roles and attempts 1–5. Goal: default.lua median under 20 µs.

            Examples:
              holepunch bench strategy
              holepunch bench strategy --iterations 50000 --json bench-results/strategy.json
            """
    )

    @Option(help: "Directory holding the shipped strategies.")
    var dir: String = "strategies"

    @Option(help: "Timed calls per strategy.")
    var iterations: Int = 20_000

    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        guard iterations >= 100 else { throw ValidationError("--iterations must be at least 100") }
    }

    struct Report: Codable {
        var contexts: Int
        var results: [StrategyBenchmark.Result]
    }

    static let shipped = ["default", "macula", "aggressive", "conservative", "sequential", "birthday"]

    func run() async throws {
        var candidates: [(String, String, any PunchStrategy)] = [("builtin-default", "Swift DefaultStrategy", DefaultStrategy())]
        for name in Self.shipped {
            let path = (dir as NSString).appendingPathComponent("\(name).lua")
            do {
                candidates.append(("\(name).lua", path, try LuaStrategy(path: path)))
            } catch {
                printError(error.description)
                throw ExitCode.failure
            }
        }
        // check's cases with an RTT and no history: the same 360 contexts as earlier measurements.
        let contexts = StrategyCheck.allContexts().map(\.ctx).filter { $0.rtt != nil && $0.pairHistory == .empty && !$0.relayAvailable }
        var results: [StrategyBenchmark.Result] = []
        for (label, source, strategy) in candidates {
            results.append(try StrategyBenchmark.measure(strategy, label: label, source: source, contexts: contexts,
                                                         iterations: iterations))
        }
        printTable([["strategy", "median µs", "p99 µs", "mean µs", "calls"]] + results.map {
            [$0.strategy, String(format: "%.2f", $0.medianMicros), String(format: "%.2f", $0.p99Micros),
             String(format: "%.2f", $0.meanMicros), "\($0.iterations)"]
        })
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let data = try encoder.encode(Report(contexts: contexts.count, results: results))
            do {
                try data.write(to: URL(fileURLWithPath: json))
            } catch {
                printError("\(json): cannot write: \(error.localizedDescription)")
                throw ExitCode.failure
            }
        }
    }
}
