package import HolePunchStrategy

/// Latency of `plan(ctx)`, measured the same way by `holepunch bench strategy` and by any harness in this package.
package enum StrategyBenchmark {
    /// One strategy's figures.
    package struct Result: Sendable, Hashable, Codable {
        /// Display name, e.g. `default.lua`.
        package var strategy: String
        /// Where it came from (a path, or `Swift DefaultStrategy`).
        package var source: String
        /// Timed calls.
        package var iterations: Int
        /// Median latency in microseconds.
        package var medianMicros: Double
        /// 99th percentile latency in microseconds.
        package var p99Micros: Double
        /// Mean latency in microseconds.
        package var meanMicros: Double
    }

    /// Calls `plan` `iterations` times, cycling over `contexts` (after a warm-up of up to 2000 calls), and
    /// times each call with the continuous clock.
    package static func measure(_ strategy: some PunchStrategy, label: String, source: String,
                               contexts: [PunchContext], iterations: Int) throws -> Result {
        precondition(!contexts.isEmpty && iterations > 0)
        let clock = ContinuousClock()
        // Warm up caches, the allocator and Lua's string table before timing.
        for i in 0..<min(2000, iterations) { _ = try strategy.plan(contexts[i % contexts.count]) }
        var samples: [Double] = []
        samples.reserveCapacity(iterations)
        var portsSeen = 0
        for i in 0..<iterations {
            let ctx = contexts[i % contexts.count]
            let start = clock.now
            let plan = try strategy.plan(ctx)
            let elapsed = clock.now - start
            portsSeen &+= plan.ports.count // keeps the optimiser from discarding the call
            samples.append(elapsed.benchSeconds * 1e6)
        }
        samples.sort()
        func percentile(_ p: Double) -> Double { samples[min(samples.count - 1, Int(Double(samples.count) * p))] }
        return Result(strategy: label, source: source, iterations: iterations + (portsSeen < 0 ? 1 : 0),
                      medianMicros: percentile(0.5), p99Micros: percentile(0.99),
                      meanMicros: samples.reduce(0, +) / Double(samples.count))
    }
}
