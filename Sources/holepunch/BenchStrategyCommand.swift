import ArgumentParser
import Foundation
import HolePunchStrategy

/// `holepunch bench …`: benchmarks. Other benchmarks (e.g. `bench punch`) add themselves to `subcommands`.
struct BenchGroupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks.",
        subcommands: [BenchStrategyCommand.self]
    )
}

/// `holepunch bench strategy`: latency of `plan(ctx)` per shipped strategy and for the built-in default.
struct BenchStrategyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strategy",
        abstract: "Median and p99 latency of plan(ctx) for each shipped strategy and the built-in Swift default.",
        discussion: "Contexts cycle over every NAT pair, both roles and attempts 1–5. Goal: default.lua median under 20 µs."
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

    struct Result: Codable {
        var strategy: String
        var source: String
        var iterations: Int
        var medianMicros: Double
        var p99Micros: Double
        var meanMicros: Double
    }

    struct Report: Codable {
        var contexts: Int
        var results: [Result]
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
        let contexts = StrategyCheck.allContexts().map(\.ctx)
        var results: [Result] = []
        for (label, source, strategy) in candidates {
            results.append(try measure(label: label, source: source, strategy: strategy, contexts: contexts))
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

    func measure(label: String, source: String, strategy: any PunchStrategy, contexts: [PunchContext]) throws -> Result {
        let clock = ContinuousClock()
        // Warm up caches, the allocator and Lua's string table before timing.
        for i in 0..<min(2000, iterations) { _ = try strategy.plan(contexts[i % contexts.count]) }
        var samples: [Double] = []
        samples.reserveCapacity(iterations)
        for i in 0..<iterations {
            let ctx = contexts[i % contexts.count]
            let start = clock.now
            let plan = try strategy.plan(ctx)
            let elapsed = clock.now - start
            precondition(!plan.ports.isEmpty || ctx.candidatePorts.isEmpty)
            let c = elapsed.components
            samples.append(Double(c.seconds) * 1e6 + Double(c.attoseconds) / 1e12)
        }
        samples.sort()
        func percentile(_ p: Double) -> Double { samples[min(samples.count - 1, Int(Double(samples.count) * p))] }
        return Result(strategy: label, source: source, iterations: iterations, medianMicros: percentile(0.5),
                      p99Micros: percentile(0.99), meanMicros: samples.reduce(0, +) / Double(samples.count))
    }
}
