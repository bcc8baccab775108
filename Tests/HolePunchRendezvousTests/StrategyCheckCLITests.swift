import Foundation
import ProcessTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch strategy check` over the hostile corpus and the shipped strategies, as CI runs it.
@Suite("holepunch strategy check on the hostile corpus", .serialized)
struct StrategyCheckCLITests {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    static func luaFiles(in directory: String) -> [String] {
        let dir = repoRoot.appendingPathComponent(directory)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        return names.filter { $0.hasSuffix(".lua") }.sorted().map { dir.appendingPathComponent($0).path }
    }

    /// Runs the binary to the end of both outputs, killing it (by its PID) if it outlives `limit`.
    static func run(_ binary: String, _ arguments: [String], limit: TimeInterval) async throws -> ProcessOutcome {
        try await runToEnd(binary, arguments, limit: limit)
    }

    @Test("every hostile script is reported failing with a sandbox error at file:line, and the check ends")
    func hostileCorpusFails() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let files = Self.luaFiles(in: "strategies/hostile")
        #expect(files.count >= 15)
        let r = try await Self.run(binary, ["strategy", "check"] + files, limit: 120)
        #expect(!r.hung, "strategy check did not finish")
        #expect(r.status != 0)
        #expect(!r.err.contains("Fatal error") && !r.err.contains("Stack dump"), "\(r.err)")
        let lines = r.err.split(separator: "\n").map(String.init)
        let sandbox = ["instruction budget", "time limit", "memory limit", "refused"]
        for file in files {
            let reported = lines.filter { $0.hasPrefix(file + ":") }
            #expect(reported.count == 1, "\(file): \(reported)")
            guard let line = reported.first else { continue }
            // file:LINE: message, with a sandbox abort as the message.
            let afterFile = line.dropFirst(file.count + 1)
            #expect(Int(afterFile.prefix { $0.isNumber }) != nil, "no line number: \(line)")
            #expect(sandbox.contains { line.contains($0) }, "not a sandbox error: \(line)")
        }
        #expect(!r.out.contains(": ok ("), "a hostile script passed: \(r.out)")
    }

    @Test("every shipped strategy passes")
    func shippedStrategiesPass() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let files = Self.luaFiles(in: "strategies")
        #expect(files.count >= 6)
        let r = try await Self.run(binary, ["strategy", "check"] + files, limit: 120)
        #expect(!r.hung)
        #expect(r.status == 0, "\(r.err)")
        for file in files { #expect(r.out.contains("\(file): ok ("), "\(file) did not pass: \(r.out)") }
    }
}
