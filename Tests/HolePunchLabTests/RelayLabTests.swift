import Foundation
import Testing

/// Issue 15 in the lab: coturn in the public namespace (`lab.sh up --turn`, which `lab matrix` passes), the targets
/// allocating and publishing a relayed address, and the matrix's path column. Part of the serialized lab suite.
extension LabTests {
    @Test("the three pairs that cannot be punched connect over the lab's coturn and echo; a punchable pair with the relay available still ends direct",
          .timeLimit(.minutes(3)), .enabled(if: LabTests.haveBinary, "needs the holepunch binary"))
    func unpunchablePairsConnectRelayed() throws {
        let hopeless = ["symmetric_seq:symmetric_random", "symmetric_random:symmetric_seq", "symmetric_random:symmetric_random"]
        let pairs = try Self.matrix(["--trials", "1", "--delay", "20", "--punch-timeout", "5"]
                                         + (hopeless + ["port_restricted:symmetric_seq"]).flatMap { ["--pair", $0] },
                                         timeout: 170)
        #expect(pairs.count == 4)
        for pair in pairs {
            let run = try #require(pair.runs.first)
            let detail = "\(pair.a) × \(pair.b): \(run.error ?? "ok") \(run.message ?? "") path \(run.relay_path ?? "?")"
            print("HolePunchLabTests relay \(detail)")
            // ok includes the echo: a line went there and back through the connection.
            #expect(run.ok, "\(detail)")
            #expect(run.peer_node == run.expected_peer, "\(detail)")
            if hopeless.contains("\(pair.a):\(pair.b)") {
                #expect(run.relay_path == "relayed", "\(detail)")
            } else {
                #expect(run.relay_path == "direct", "\(detail)")
            }
        }
    }

    @Test("a lossy relay (5 % loss each way on the relayed leg): the relayed QUIC connection survives and echoes 64 KiB intact",
          .timeLimit(.minutes(3)), .enabled(if: LabTests.haveBinary, "needs the holepunch binary"))
    func lossyRelayDeliversIntact() throws {
        let pairs = try Self.matrix(["--trials", "2", "--delay", "20", "--punch-timeout", "5", "--relay-loss", "5",
                                          "--transfer", "\(64 << 10)", "--pair", "symmetric_random:symmetric_random"],
                                         timeout: 170)
        let pair = try #require(pairs.first)
        for run in pair.runs {
            let detail = "\(run.error ?? "ok") \(run.message ?? "") path \(run.relay_path ?? "?")"
            print("HolePunchLabTests lossy relay \(detail)")
            // The echo is compared byte for byte by the initiator: `silentLoss` would name bytes missing at a clean end.
            #expect(run.ok, "\(detail)")
            #expect(run.relay_path == "relayed", "\(detail)")
        }
    }

    @Test("relay first on a punchable pair: the connection starts relayed, moves to the direct path, and the matrix says relay→direct",
          .timeLimit(.minutes(3)), .enabled(if: LabTests.haveBinary, "needs the holepunch binary"))
    func relayFirstMovesToDirect() throws {
        // default.lua with the relay at once for every pair (what `bench relay-lab` calls relay-first).
        let source = try String(contentsOf: LabSupport.repoRoot.appendingPathComponent("strategies/default.lua"), encoding: .utf8)
        let decision = "elseif hopeless or (history.pair.attempts >= 2 and history.pair.successes == 0) then"
        try #require(source.contains(decision))
        let file = NSTemporaryDirectory() + "holepunch-lab-test-\(LabSupport.uniqueName())-relay-first.lua"
        try source.replacingOccurrences(of: decision, with: "elseif true then").write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let report = try Self.matrixReport(["--trials", "2", "--delay", "20", "--punch-timeout", "5", "--strategy", file,
                                            "--pair", "port_restricted:port_restricted"], timeout: 170)
        let pair = try #require(report.strategies[URL(fileURLWithPath: file).lastPathComponent]?.first)
        for run in pair.runs {
            let detail = "\(run.error ?? "ok") \(run.message ?? "") path \(run.relay_path ?? "?")"
            print("HolePunchLabTests relay first \(detail)")
            #expect(run.ok, "\(detail)")
            #expect(run.relay_path == "relay→direct", "\(detail)")
        }
    }
}
