import Foundation
import ProcessTestSupport
import Testing

/// The strategy author's loop and loud fallbacks, as a user meets them in the CLI.
@Suite("holepunch strategy check/simulate and fallback warnings", .serialized)
struct StrategyAuthorCLITests {
    /// Writes `source` to a scratch `name` and returns its path; the caller removes `directory`.
    static func script(_ name: String, _ source: String, in directory: URL) throws -> String {
        let path = directory.appendingPathComponent(name).path
        try source.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    @Test("check fails a script that divides ctx.rtt_ms, at file:line, naming the nil-RTT case")
    func checkCatchesNilRTT() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let dir = try scratchDirectory("check-rtt")
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = try Self.script("halfrtt.lua", """
            return { plan = function(ctx)
                local half = ctx.rtt_ms / 2
                return { ports = ctx.ports, interval_ms = half }
            end }
            """, in: dir)
        let r = try await StrategyCheckCLITests.run(binary, ["strategy", "check", file], limit: 60)
        #expect(r.status != 0, "check passed: \(r.out)")
        #expect(r.err.contains("\(file):2: "), "\(r.err)")
        #expect(r.err.contains("rtt nil"), "\(r.err)")
    }

    @Test("simulate --attempts replays outcomes through on_result: a learning script's plan changes")
    func simulateReplaysAttempts() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let file = StrategyCheckCLITests.repoRoot.appendingPathComponent("strategies/examples/learner.lua").path
        let r = try await StrategyCheckCLITests.run(
            binary, ["strategy", "simulate", file, "--pair", "port_restricted,symmetric_seq", "--attempts", "3", "--json"],
            limit: 60)
        #expect(r.status == 0, "\(r.err)")
        struct Output: Decodable {
            struct Row: Decodable { var attempt: Int; var portCount: Int; var simulatedSuccess: Bool }
            var rows: [Row]
        }
        let rows = try JSONDecoder().decode(Output.self, from: Data(r.out.utf8)).rows
        #expect(rows.map(\.portCount).first == 1)
        #expect(rows.count == 3 && rows[1].portCount > rows[0].portCount, "\(rows.map(\.portCount))")
    }

    @Test("simulate without a file uses the bundled default.lua")
    func simulateDefaultsToDefaultLua() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let r = try await StrategyCheckCLITests.run(
            binary, ["strategy", "simulate", "--pair", "port_restricted,symmetric_random", "--attempts", "1"], limit: 60)
        #expect(r.status == 0, "\(r.err)")
        #expect(r.out.hasPrefix("strategy default,"), "\(r.out)")
    }

    @Test("simulate --relay connects a pair that cannot be punched through the relay; --no-relay leaves it unconnected")
    func simulateModelsTheRelay() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let args = ["strategy", "simulate", "--pair", "symmetric_seq,symmetric_random", "--attempts", "1"]
        let relayed = try await StrategyCheckCLITests.run(binary, args + ["--relay"], limit: 60)
        #expect(relayed.status == 0, "\(relayed.err)")
        #expect(relayed.out.contains("relay available"), "\(relayed.out)")
        // Relay at once (default.lua's choice for this pair), carrying the connection after two 80 ms RTTs.
        #expect(relayed.out.contains("first  relayed, relay at 160 ms"), "\(relayed.out)")
        let alone = try await StrategyCheckCLITests.run(binary, args + ["--no-relay"], limit: 60)
        #expect(alone.status == 0, "\(alone.err)")
        #expect(alone.out.contains("no relay"), "\(alone.out)")
        #expect(!alone.out.contains("relayed"), "\(alone.out)")
        #expect(alone.out.contains("never  none"), "\(alone.out)")
    }

    @Test("demo with a script that fails at run time warns on stderr and reports the fallback in its JSON",
          arguments: ["returns-string", "hostile"])
    func demoWarnsAboutABrokenScript(kind: String) async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let dir = try scratchDirectory("demo-broken")
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = kind == "hostile"
            ? StrategyCheckCLITests.repoRoot.appendingPathComponent("strategies/hostile/rep_loop.lua").path
            : try Self.script("broken.lua", "return { plan = function(ctx) return 'no plan today' end }", in: dir)
        let r = try await StrategyCheckCLITests.run(binary, ["demo", "--loopback", "--json", "--strategy", file], limit: 60)
        #expect(!r.hung)
        let warnings = r.err.split(separator: "\n").filter { $0.hasPrefix("warning: ") }
        #expect(warnings.contains { $0.contains(file + ":") }, "no warning naming the script: \(r.err)")
        struct Outcome: Decodable { var strategy: String; var plannedBy: String?; var strategyFallbacks: [String] }
        let outcome = try JSONDecoder().decode(Outcome.self, from: Data(r.out.utf8))
        #expect(outcome.plannedBy == "builtin-default")
        #expect(!outcome.strategyFallbacks.isEmpty)
    }
}
