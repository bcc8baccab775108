import CoreMetrics
import HolePunchStrategy
import Synchronization

/// The executor's metrics, created once per dimension set from a passed-in factory (never bootstrapped here).
///
/// Dimensions are bounded: outcome, strategy name and NAT pair. Peer ids never become dimensions.
final class PunchMetrics: Sendable {
    private let factory: any MetricsFactory
    private let attempts = Mutex<[String: Counter]>([:])
    private let fallbacks = Mutex<[String: Counter]>([:])
    /// `holepunch.punch.time_to_connect`: from the start instant to the authenticated connection.
    let timeToConnect: CoreMetrics.Timer
    /// `holepunch.punch.active`: punches in progress.
    let active: Meter

    init(factory: any MetricsFactory) {
        self.factory = factory
        timeToConnect = CoreMetrics.Timer(label: "holepunch.punch.time_to_connect", dimensions: [], factory: factory)
        active = Meter(label: "holepunch.punch.active", dimensions: [], factory: factory)
    }

    /// Counts one finished punch in `holepunch.punch.attempts`.
    func record(outcome: String, strategy: String, pair: String) {
        let key = "\(outcome)|\(strategy)|\(pair)"
        let counter = attempts.withLock { table in
            if let counter = table[key] { return counter }
            let counter = Counter(
                label: "holepunch.punch.attempts",
                dimensions: [("outcome", outcome), ("strategy", strategy), ("nat_pair", pair)],
                factory: factory
            )
            table[key] = counter
            return counter
        }
        counter.increment()
    }

    /// Counts one finished punch with `outcome` in `holepunch.punch.attempts`.
    func record(outcome: PunchOutcome, strategy: String, pair: String) {
        switch outcome {
        case .success: record(outcome: "success", strategy: strategy, pair: pair)
        case .failure(let code, _): record(outcome: code.rawValue, strategy: strategy, pair: pair)
        }
    }

    /// The `nat_pair` dimension of a punch: this side's NAT type, then the peer's (a bounded set).
    static func pair(_ options: PunchOptions) -> String {
        "\(options.localNAT.type)/\(options.remoteNAT.type)"
    }

    /// Counts one strategy failure that fell back to the built-in plan, in `holepunch.strategy.fallbacks`.
    func fallback(strategy: String) {
        let counter = fallbacks.withLock { table in
            if let counter = table[strategy] { return counter }
            let counter = Counter(label: "holepunch.strategy.fallbacks", dimensions: [("strategy", strategy)], factory: factory)
            table[strategy] = counter
            return counter
        }
        counter.increment()
    }
}
