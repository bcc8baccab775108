@testable import HolePunchLab
import Testing

/// How the matrix judges a topology trial: the path from the address connected to, and the winner column. Pure
/// functions, so no lab (and no root) is needed.
@Suite("Lab topology rows")
struct LabTopologyTests {
    @Test("the path is read from the remote address and the initiator's own public address", arguments: [
        ("10.0.1.3:4000", "203.0.113.10", LabPath.lan),
        ("203.0.113.10:4000", "203.0.113.10", .hairpin),
        ("203.0.113.30:4000", "203.0.113.30", .hairpin),
        ("203.0.113.20:4000", "203.0.113.30", .publicInternet),
        ("100.64.0.20:4000", "203.0.113.30", .carrier),
        ("100.127.255.1:4000", nil, .carrier),
        ("100.128.0.1:4000", nil, .publicInternet),
        ("[2001:db8:0:2::2]:4000", "203.0.113.10", .ipv6),
        ("[::ffff:10.0.1.3]:4000", "203.0.113.10", .lan),
        ("[::ffff:203.0.113.10]:4000", "203.0.113.10", .hairpin),
    ] as [(String, String?, LabPath)])
    func pathFromRemote(_ remote: String, _ ownPublic: String?, _ expected: LabPath) {
        #expect(LabPath(remote: remote, ownPublic: ownPublic) == expected)
    }

    @Test("every topology accepts at least one path, and names are unique")
    func topologiesAreWellFormed() {
        #expect(Set(LabTopology.all.map(\.name)).count == LabTopology.all.count)
        #expect(LabTopology.all.allSatisfy { !$0.acceptedPaths.isEmpty })
        #expect(LabTopology.named("cgnat-homes")?.acceptedPaths == [.hairpin])
        #expect(LabTopology.named("two-nats") == nil)
    }

    @Test("a trial counts on path only when it connected on an accepted path; winners are counted without ports")
    func onPathAndWinners() throws {
        let topology = try #require(LabTopology.named("same-lan-hairpin"))
        var row = TopologyResult(topology: topology)
        row.trials = [
            TrialResult(ok: true, rounds: 1, packets: 4, remote: "203.0.113.10:4000", path: .hairpin),
            TrialResult(ok: true, rounds: 1, packets: 4, remote: "203.0.113.10:4001", path: .hairpin),
            TrialResult(ok: true, rounds: 1, packets: 4, candidatePair: "host 10.0.1.2:5000 → host 10.0.1.3:6000", path: .lan),
            TrialResult(ok: true, rounds: 1, packets: 4, remote: "203.0.113.20:4000", path: .publicInternet),
            TrialResult(ok: false, rounds: 1, packets: 4, error: "allPortsFailed", path: .lan),
        ]
        #expect(row.successes == 4)
        #expect(row.onPath == 3)
        #expect(row.winners == "→ 203.0.113.10 ×2; host 10.0.1.2 → host 10.0.1.3 ×1; → 203.0.113.20 ×1")
        #expect(row.paths == "hairpin ×2, lan ×1, public ×1")
    }

    @Test("ports are cut from IPv4 and bracketed IPv6 endpoints, nothing else")
    func portsCut() {
        #expect(TopologyResult.withoutPorts("srflx [2001:db8::1]:443 → host 10.0.1.3:9") == "srflx 2001:db8::1 → host 10.0.1.3")
        #expect(TopologyResult.withoutPorts("2001:db8::1 a:b") == "2001:db8::1 a:b")
    }

    @Test("the winning pair is read as a string or as local and remote candidates")
    func candidatePairFromJSON() {
        #expect(MatrixRunner.candidatePair("host 10.0.1.2:1 → host 10.0.1.3:2") == "host 10.0.1.2:1 → host 10.0.1.3:2")
        let pair: [String: Any] = ["local": ["kind": "host", "address": "10.0.1.2:1"],
                                   "remote": ["kind": "srflx", "address": "203.0.113.10:2"]]
        #expect(MatrixRunner.candidatePair(pair) == "host 10.0.1.2:1 → srflx 203.0.113.10:2")
        #expect(MatrixRunner.candidatePair(nil) == nil)
    }

    @Test("the winner is read from the lab peer's candidate and candidate_family fields")
    func winnerFromPeerFields() {
        #expect(MatrixRunner.winningCandidate(kind: "host", family: "ipv6", remote: "[2001:db8:0:2::2]:4000")
            == "→ host ipv6 [2001:db8:0:2::2]:4000")
        #expect(MatrixRunner.winningCandidate(kind: "srflx", family: "ipv4", remote: nil) == "→ srflx ipv4")
        #expect(MatrixRunner.winningCandidate(kind: nil, family: "ipv4", remote: "10.0.1.3:1") == nil)
    }
}
