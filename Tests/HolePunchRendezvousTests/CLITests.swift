import Foundation
import HolePunch
import ProcessTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The CLI as a user meets it: every subcommand documents itself, bad input is one clear error, and the README's
/// demo works in its loopback mode.
@Suite("holepunch CLI", .serialized)
struct CLITests {
    /// Runs the binary to completion (bounded), returning exit status, stdout and stderr, both read to EOF.
    private func run(_ binary: String, _ arguments: [String], limit: TimeInterval = 60) async throws -> (Int32, String, String) {
        let r = try await runToEnd(binary, arguments, limit: limit, directory: FileManager.default.temporaryDirectory)
        if r.hung { Issue.record("holepunch \(arguments.joined(separator: " ")) did not finish within \(limit) s") }
        return (r.status, r.out, r.err)
    }

    /// The subcommand names listed under SUBCOMMANDS in a help text.
    private func subcommands(in help: String) -> [String] {
        var names: [String] = []
        var inSection = false
        for line in help.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("SUBCOMMANDS:") { inSection = true; continue }
            if inSection {
                if line.isEmpty || !line.hasPrefix("  ") { if !names.isEmpty { break } else { continue } }
                if let name = line.split(separator: " ").first, !name.isEmpty, !line.hasPrefix("    ") || names.isEmpty {
                    names.append(String(name))
                }
            }
        }
        return names.filter { $0 != "help" && !$0.hasPrefix("See") && !$0.hasPrefix("(") }
    }

    @Test("every subcommand's --help exits 0 and shows a usage line")
    func helpEverywhere() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        var queue: [[String]] = [[]]
        var visited = 0
        while let path = queue.first {
            queue.removeFirst()
            let (status, out, err) = try await run(binary, path + ["--help"])
            #expect(status == 0, "holepunch \(path.joined(separator: " ")) --help exited \(status): \(err)")
            #expect(out.contains("USAGE:"), "no usage for \(path)")
            #expect(out.contains("Examples:"), "holepunch \(path.joined(separator: " ")) --help shows no examples")
            visited += 1
            for name in subcommands(in: out) { queue.append(path + [name]) }
        }
        // The root, and at least demo/strategy/bench/rendezvous/peer/identity/nat with their children.
        #expect(visited >= 12, "only \(visited) commands documented themselves")
    }

    @Test("bad arguments exit non-zero with one clear error line, never a crash", arguments: [
        ["demo", "--nat-a", "nonsense"],
        ["demo", "--strategy", "/nonexistent/strategy.lua"],
        ["peer", "--no-such-flag"],
        ["identity", "show", "/nonexistent/id.pem"],
        ["strategy", "check", "/nonexistent/strategy.lua"],
        ["bench", "punch", "--concurrent", "0"],
        ["nat", "detect", "--stun", "not-an-address"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--message-burst", "0"],
        ["bench", "rendezvous-flood", "--seconds", "0"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--turn-server", "127.0.0.1:3478",
         "--turn-secret-file", "/nonexistent/turn.secret"],
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "/nonexistent/id.pem", "--connect", String(repeating: "a", count: 52), "--echo"],
    ])
    func badArguments(_ arguments: [String]) async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let (status, _, err) = try await run(binary, arguments)
        #expect(status != 0)
        // One error line first (what went wrong), then at most a hint or the usage: never a trace.
        let lines = err.split(separator: "\n").map(String.init)
        let first = lines.first ?? ""
        #expect(!first.isEmpty && first.count <= 300, "no clear first error line in: \(err)")
        #expect(lines.count <= 5, "too much output for one error: \(err)")
        #expect(lines.dropFirst().allSatisfy { !$0.lowercased().hasPrefix("error") }, "more than one error line: \(err)")
        #expect(!err.contains("Fatal error") && !err.contains("Stack dump") && !err.contains("backtrace"))
    }

    /// More `--turn-server`s than the rendezvous takes (typed apart: inline, it is too much for the type checker).
    static let fiveTURNServers: [String] = ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--turn-secret-file", "s"]
        + (1...5).flatMap { ["--turn-server", "127.0.0.1:\(3478 + $0)"] }

    @Test("bad arguments exit 64, whether ArgumentParser or the command itself rejects them", arguments: [
        ["demo", "--nat-a", "nonsense"],
        ["peer", "--no-such-flag"],
        ["bench", "punch", "--concurrent", "0"],
        ["nat", "detect", "--stun", "not-an-address"],
        ["rendezvous", "--listen", "nonsense"],
        // Clients would refuse every grant naming it (TURNGrant.validate): refused before the secret is even read.
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--turn-secret-file", "s", "--turn-server", "224.0.0.1:3478"],
        ["peer", "--rendezvous", "bad..name:7000", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "id.pem"],
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", "not-a-node-id", "--identity", "id.pem"],
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "id.pem", "--connect", "not-a-node-id"],
        ["strategy", "simulate", "builtin", "--attempts", "0"],
        // Seconds become whole milliseconds: a non-finite or huge value must be refused, not trap.
        ["lab", "peer", "--rendezvous-id", "x", "--identity", "id.pem", "--direct-wait", "inf"],
        ["lab", "peer", "--rendezvous-id", "x", "--identity", "id.pem", "--timeout", "1e300"],
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "id.pem", "--exclude-address", "not-an-ip"],
        // Values out of range are refused before anything runs, not clamped or run with.
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "id.pem", "--connect", String(repeating: "a", count: 52), "--timeout", "0"],
        // A keep-alive at or past the 30 s idle timeout would let an idle connection end.
        ["peer", "--rendezvous", "127.0.0.1:9", "--rendezvous-id", String(repeating: "a", count: 52), "--identity",
         "id.pem", "--keep-alive", "30"],
        ["nat", "detect", "--stun", "127.0.0.1:9", "--timeout-ms", "0"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--registration-ttl", "0"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--rate-burst", "0"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--start-delay-ms=-1"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--stun-other", "127.0.0.2:7001"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--turn-server", "127.0.0.1:3478"],
        ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--turn-secret-file", "s", "--turn-credential-ttl", "10",
         "--turn-server", "127.0.0.1:3478"],
        Self.fiveTURNServers,
    ] as [[String]])
    func badArgumentsExit64(_ arguments: [String]) async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let (status, _, err) = try await run(binary, arguments)
        #expect(status == 64, "holepunch \(arguments.joined(separator: " ")) exited \(status): \(err)")
    }

    @Test("peer --rendezvous localhost:PORT resolves the name and registers")
    func rendezvousHostName() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-cli")
        defer { rdv.close() }
        let port = try #require(rdv.quic.split(separator: ":").last)
        let (peer, _) = try await startWaitingPeer(
            binary, ["peer", "--rendezvous", "localhost:\(port)", "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"],
            identity: "b.pem", in: rdv.dir)
        peer.stop()
    }

    @Test("--version prints the package version and exits 0")
    func version() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let (status, out, _) = try await run(binary, ["--version"])
        #expect(status == 0)
        #expect(out.trimmingCharacters(in: .whitespacesAndNewlines) == HolePunchPackage.version)
    }

    @Test("the README demo, in its loopback mode, reports a successful punch and a message each way")
    func demoLoopback() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let (status, out, err) = try await run(binary, ["demo", "--loopback", "--json"])
        #expect(status == 0, "demo failed: \(err)")
        let object = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
        #expect(object?["success"] as? Bool == true)
        #expect(object?["messageRoundTrip"] as? Bool == true)
        #expect(object?["mode"] as? String == "loopback")
        #expect((object?["timeToConnectMs"] as? Double ?? -1) > 0)
    }
}

