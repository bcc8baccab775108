import ArgumentParser
import Foundation
import HolePunchStrategy

/// `holepunch strategy …`: tools for strategy authors.
struct StrategyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strategy",
        abstract: "Check and simulate Lua punch strategies, without a network.",
        discussion: """
            Writing a strategy: docs/strategies.md.

            Examples:
              holepunch strategy check strategies/*.lua
              holepunch strategy simulate strategies/default.lua --pair symmetric,full_cone
            """,
        subcommands: [StrategyCheckCommand.self, StrategySimulateCommand.self]
    )
}

/// Prints one `file:line: message` line to standard error.
func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

/// The text of the warning every command prints (on standard error, whatever the verbosity) when a script
/// failed and the built-in plan stood in: a punch that succeeds anyway would otherwise hide a broken script.
func fallbackWarning(_ strategy: String, _ reason: StrategyError) -> String {
    "strategy \(strategy) failed, the built-in plan is used for this punch: \(reason)"
}

/// Sandbox limits shared by the strategy commands.
struct StrategyLimitOptions: ParsableArguments {
    @Option(help: "Lua instructions allowed per hook call.")
    var instructionBudget: Int = 1_000_000

    @Option(name: .customLong("memory-mib"), help: "Memory cap per Lua state, in MiB.")
    var memoryMiB: Int = 8

    @Option(help: "Wall-clock cap per hook call, in milliseconds.")
    var timeLimitMs: Int = 100

    var limits: LuaStrategy.Limits {
        LuaStrategy.Limits(instructionBudget: instructionBudget, memoryLimit: memoryMiB << 20,
                           timeLimit: .milliseconds(timeLimitMs))
    }

    func validate() throws {
        guard instructionBudget > 0, memoryMiB > 0, timeLimitMs > 0 else {
            throw ValidationError("limits must be positive")
        }
    }
}

/// `holepunch strategy check FILE…`
struct StrategyCheckCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Load each file and run plan() over every NAT pair, both roles and attempts 1–5.",
        discussion: """
            Each case runs with an 80 ms RTT and with none measured (ctx.rtt_ms nil, as in a real run before the \
            RTT is known), and with no history, a history of successes and a history of failures only (where \
            history.*.median_ttc_ms and last_offset are nil), each with a relay available and without (ctx.relay_available). \
            Errors are printed as file:line: message, with the \
            first failing case; the exit status is non-zero if any file fails. Without files, checks the bundled \
            default.lua.

            Examples:
              holepunch strategy check strategies/*.lua
              holepunch strategy check --verbose mine.lua
            """
    )

    @Argument(help: "Strategy files to check (default: the bundled default.lua).")
    var files: [String] = []

    @OptionGroup var limitOptions: StrategyLimitOptions

    @Flag(help: "Also print the clamps the core would apply.")
    var verbose = false

    func run() async throws {
        var failed = false
        for file in files.isEmpty ? [nil] : files.map(Optional.some) {
            let strategy: LuaStrategy
            do {
                if let file {
                    strategy = try LuaStrategy(path: file, limits: limitOptions.limits)
                } else {
                    strategy = try LuaStrategy.bundledDefault(limits: limitOptions.limits)
                }
            } catch {
                printError(error.description)
                failed = true
                continue
            }
            let file = file ?? "\(LuaStrategy.bundledDefaultChunkName) (bundled)"
            let errors = StrategyCheck.run(strategy, file: file)
            for e in errors { printError(e.description) }
            if errors.isEmpty {
                var clamped = 0
                let contexts = StrategyCheck.allContexts()
                for (label, ctx) in contexts {
                    guard let plan = try? strategy.plan(ctx) else { continue }
                    let reasons = plan.validated(ctx.limits).reasons
                    clamped += reasons.isEmpty ? 0 : 1
                    if verbose {
                        for r in reasons { print("\(file): note: \(label): clamped \(r)") }
                    }
                }
                print("\(file): ok (\(strategy.name), \(contexts.count) plans, \(clamped) clamped)")
            } else {
                failed = true
            }
        }
        if failed { throw ExitCode.failure }
    }
}

/// `holepunch strategy simulate [FILE] [--pair A,B] [--rtt MS] [--attempts N] [--json]`
struct StrategySimulateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "simulate",
        abstract: "Print the plans a strategy makes per NAT pair and attempt, with an estimated success probability.",
        discussion: """
            NAT names: full_cone, restricted, port_restricted, symmetric_seq (or symmetric), symmetric_random, \
            unknown. The estimate comes from a simple model: exact for cone mappings, port coverage for \
            sequential allocation, a birthday estimate for random allocation; it ignores loss and timing.

            With --relay (ctx.relay_available), the relay carries the connection from the initiator's relay time \
            (its plan's delay, none for "first", cut to its timeout, plus two RTTs to set up the allocation) if the \
            target still accepts then (to its timeout, or after its punch too when its plan uses the relay): the path \
            column says "direct" when the punch succeeds before that, "relay → direct" when it succeeds later, \
            "relayed" when the punch fails, "none" when nothing connects, each with the time the relay starts \
            carrying the connection.

            Attempts are a series to the same peer: each attempt's modelled outcome (success when the estimate is \
            at least 50 %) goes into each side's history (ctx.history) and to its on_result, and each side runs its \
            own copy of the script, so a learning strategy's plan for attempt n+1 shows what it learnt from attempt \
            n. Histories start empty for every pair.

            Examples:
              holepunch strategy simulate --pair port_restricted,symmetric_random
              holepunch strategy simulate mine.lua --pair full_cone,symmetric_seq --attempts 5
              holepunch strategy simulate builtin --json
              holepunch strategy simulate --relay --pair symmetric_random,symmetric_seq
            """
    )

    @Argument(help: "The strategy file, or 'builtin' for the built-in Swift plan (default: the bundled default.lua).")
    var file: String?

    @Option(help: "Only this NAT pair, as LOCAL,REMOTE (e.g. full_cone,symmetric_random).")
    var pair: String?

    @Option(help: "Measured RTT to assume, in milliseconds.")
    var rtt: Double = 80

    @Option(help: "Attempts to replay per pair, each learning from the ones before (1–10).")
    var attempts: Int = 3

    @Option(help: "Each NAT's port counter moved this many ports after registration, and each peer published the last port its NAT allocated (ctx.last_allocated_port), 0–1000.")
    var counterMoved: Int?

    @Flag(inversion: .prefixedNo,
          help: "Whether a TURN relay is available (ctx.relay_available); with one, a plan that uses it is modelled.")
    var relay = false

    @Flag(help: "Machine-readable JSON output.")
    var json = false

    @OptionGroup var limitOptions: StrategyLimitOptions

    func validate() throws {
        guard rtt.isFinite, rtt >= 0, rtt <= 60_000 else { throw ValidationError("--rtt must be in 0...60000 ms") }
        if let counterMoved, !(0...1000).contains(counterMoved) { throw ValidationError("--counter-moved must be in 0...1000") }
        guard (1...10).contains(attempts) else { throw ValidationError("--attempts must be in 1...10") }
        _ = try parsedPair()
    }

    func parsedPair() throws -> [(SimulatedNAT, SimulatedNAT)]? {
        guard let pair else { return nil }
        let parts = pair.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) }
        guard parts.count == 2, let a = SimulatedNAT.named(parts[0]), let b = SimulatedNAT.named(parts[1]) else {
            throw ValidationError("--pair must be LOCAL,REMOTE with names from: "
                                  + (SimulatedNAT.all.map(\.name) + ["symmetric"]).joined(separator: ", "))
        }
        return [(a, b)]
    }

    func run() async throws {
        // Two copies: each peer runs its own script, with its own state for on_result to change.
        let strategy: any PunchStrategy, peer: any PunchStrategy
        let limits = limitOptions.limits
        do {
            switch file {
            case "builtin": (strategy, peer) = (DefaultStrategy(), DefaultStrategy())
            case let path?: (strategy, peer) = (try LuaStrategy(path: path, limits: limits), try LuaStrategy(path: path, limits: limits))
            case nil: (strategy, peer) = (try LuaStrategy.bundledDefault(limits: limits), try LuaStrategy.bundledDefault(limits: limits))
            }
        } catch {
            printError(error.description)
            throw ExitCode.failure
        }
        let rows = StrategySimulator.simulate(strategy, peer: peer, pairs: try parsedPair(), rtt: .fromMilliseconds(rtt),
                                              attempts: attempts, counterMoved: counterMoved, relayAvailable: relay)
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            struct Output: Encodable {
                var strategy: String
                var rttMs: Double
                var relayAvailable: Bool
                var rows: [SimulationRow]
            }
            let data = try encoder.encode(Output(strategy: strategy.name, rttMs: rtt, relayAvailable: relay, rows: rows))
            print(String(decoding: data, as: UTF8.self))
        } else {
            print("strategy \(strategy.name), rtt \(rtt.clean) ms, \(relay ? "relay available" : "no relay") "
                  + "(initiator's plan; success estimated for both sides)")
            let header = ["pair", "try", "ports", "first ports", "rounds", "interval", "timeout", "pkts/rnd",
                          "sockets", "budget", "success", "replayed", "relay", "path"]
            var table = [header]
            for r in rows {
                table.append([
                    r.pair, "\(r.attempt)", "\(r.portCount)",
                    r.firstPorts.map(String.init).joined(separator: " ") + (r.portCount > r.firstPorts.count ? " …" : ""),
                    "\(r.rounds)", "\(r.intervalMs.clean) ms", "\(r.timeoutMs.clean) ms", "\(r.packetsPerRound)",
                    "\(r.sockets)", "\(r.packetBudget)", String(format: "%5.1f%%", r.successProbability * 100),
                    r.simulatedSuccess ? "success" : "failure", r.relay,
                    r.path + (r.relayMs.map { ", relay at \($0.clean) ms" } ?? ""),
                ])
            }
            printTable(table)
            for r in rows {
                if let e = r.error { printError("\(e) (\(r.pair) attempt \(r.attempt): built-in default shown)") }
                for c in r.clamps { print("note: \(r.pair) attempt \(r.attempt): clamped \(c)") }
            }
        }
        if rows.contains(where: { $0.error != nil }) { throw ExitCode.failure }
    }
}

/// Prints rows as left-aligned columns.
func printTable(_ rows: [[String]]) {
    guard let width = rows.first?.count else { return }
    var widths = Array(repeating: 0, count: width)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    for row in rows {
        let line = row.enumerated().map { i, cell in
            cell + String(repeating: " ", count: widths[i] - cell.count)
        }.joined(separator: "  ")
        print(line.trimmingCharacters(in: .whitespaces))
    }
}

extension Double {
    /// `80`, `12.5`, `0.333`.
    var clean: String {
        if self == rounded(), abs(self) < 1e15 { return String(Int64(self)) }
        return String((self * 1000).rounded() / 1000)
    }
}

extension Duration {
    /// A duration from fractional milliseconds.
    static func fromMilliseconds(_ ms: Double) -> Duration { .nanoseconds(Int64((ms * 1_000_000).rounded())) }
}
