import Foundation
import Testing

/// Issue 14 item 5 in the lab: a live punched connection survives a conntrack flush on one router, and on both.
///
/// Peer A sends a numbered line every 200 ms for 12 s through `holepunch peer`; peer B echoes. Once echoes flow,
/// `conntrack -F` empties the router's connection table: its NAT forgets the mapping, and the next datagram of A's
/// flow makes a new one. With a port-preserving NAT the new mapping has the old port and nothing changes for B; a
/// NAT that gives the new mapping a new port is a rebinding, which the path layer follows (`path-changed`).
extension LabTests {
    /// Runs the echo loop between two peers behind `natA` and `natB`, flushing conntrack on `flush` (router hosts)
    /// once echoes flow; returns peer A's exit status, stdout (the echoes) and stderr (status lines), and peer B's stderr.
    static func echoAcrossConntrackFlush(
        natA: String, natB: String, flush: [String]
    ) throws -> (status: Int32, echoed: String, statusA: String, statusB: String) {
        guard haveBinary, let bin = holepunchBinary else { throw LabSupport.LabError(description: "no holepunch binary") }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("hp-conntrack-lab-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: work) }
        func path(_ name: String) -> String { work.appendingPathComponent(name).path }
        func text(_ url: URL) -> String { (try? String(contentsOf: url, encoding: .utf8)) ?? "" }
        for name in ["rdv.pem", "a.pem"] { _ = try LabSupport.run([bin, "identity", "create", path(name)], timeout: 30) }
        let created = try LabSupport.run([bin, "identity", "create", path("b.pem")], timeout: 30)
        guard let bID = created.stdout.split(separator: "\n").first.map(String.init) else {
            throw LabSupport.LabError(description: "identity create printed no NodeID")
        }
        let lab = try Lab(["--nat-a", natA, "--nat-b", natB], name: "kp\(UInt16.random(in: 1000...9999))")
        defer {
            lab.down()
            #expect(LabSupport.namespaces(ofLab: lab.name).isEmpty, "lab \(lab.name) left namespaces behind")
        }
        let rendezvous = try lab.background("rdv", [bin, "rendezvous", "--listen", "\(rdv1):7000", "--identity", path("rdv.pem"),
                                                    "--node-id-file", path("rdv.id")])
        defer { _ = rendezvous.stop() }
        guard LabSupport.waitUntil(timeout: 15, { text(rendezvous.outURL).hasPrefix("rendezvous ") }) else {
            throw LabSupport.LabError(description: "the rendezvous did not start: \(text(rendezvous.errURL))")
        }
        let b = try lab.background("peer-b", [bin, "peer", "--rendezvous", "\(rdv1):7000", "--rendezvous-id",
                                              "@\(path("rdv.id"))", "--identity", path("b.pem"), "--echo"])
        defer { _ = b.stop() }
        guard LabSupport.waitUntil(timeout: 20, { text(b.errURL).contains("registered") }) else {
            throw LabSupport.LabError(description: "peer B did not register: \(text(b.errURL))")
        }
        let lines = "i=0; while [ $i -lt 60 ]; do echo line-$i; i=$((i+1)); sleep 0.2; done"
        let a = try lab.background("peer-a", ["sh", "-c", "(\(lines)) | '\(bin)' peer --rendezvous \(rdv1):7000 "
                                             + "--rendezvous-id @\(path("rdv.id")) --identity \(path("a.pem")) --connect \(bID) --timeout 20"])
        // Flush once a few lines came back over the punched connection.
        if LabSupport.waitUntil(timeout: 30, { text(a.outURL).contains("line-5\n") }) {
            for router in flush { _ = try lab.exec(router, ["conntrack", "-F"]) }
        }
        let result = a.wait(timeout: 60)
        return (result.status, result.stdout, result.stderr, text(b.errURL))
    }

    /// Peer A exited 0 after every line came back.
    static func expectAllEchoed(
        _ run: (status: Int32, echoed: String, statusA: String, statusB: String),
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(run.status == 0, "peer A: \(run.statusA)\npeer B: \(run.statusB)", sourceLocation: sourceLocation)
        #expect(run.echoed.contains("line-59\n"), "peer A printed: \(run.echoed)", sourceLocation: sourceLocation)
    }

    @Test("conntrack flush on router A (port-preserving NATs): the punched connection goes on, every line echoed")
    func conntrackFlushOneRouter() throws {
        guard Self.haveBinary else { return }
        let run = try Self.echoAcrossConntrackFlush(natA: "port_restricted", natB: "port_restricted", flush: ["nat-a"])
        Self.expectAllEchoed(run)
    }

    @Test("conntrack flush on both routers (port-preserving NATs): the punched connection goes on, every line echoed")
    func conntrackFlushBothRouters() throws {
        guard Self.haveBinary else { return }
        let run = try Self.echoAcrossConntrackFlush(natA: "port_restricted", natB: "port_restricted", flush: ["nat-a", "nat-b"])
        Self.expectAllEchoed(run)
    }

    @Test("conntrack flush on a NAT that gives the new mapping a new port: the peer sees a rebinding, follows it, and every line is echoed")
    func conntrackFlushRebinds() throws {
        guard Self.haveBinary else { return }
        // symmetric_random: the mapping made after the flush gets a random new port; full_cone on B lets the
        // packets from that new port in, so B can learn it (a filtering NAT on B would drop them: see docs).
        let run = try Self.echoAcrossConntrackFlush(natA: "symmetric_random", natB: "full_cone", flush: ["nat-a"])
        Self.expectAllEchoed(run)
        #expect(run.statusB.contains("path-changed") && run.statusB.contains("reason=rebinding"), "peer B: \(run.statusB)")
    }

    @Test("conntrack flush on the accepting peer's NAT, which gives a new port: the dialling side follows, and every line is echoed")
    func conntrackFlushRebindsAcceptingSide() throws {
        guard Self.haveBinary else { return }
        // B (the waiting peer) accepts the QUIC connection; A dialled it. ngtcp2 lets only a server follow a peer to
        // a new address: A, the client, follows B's new port through the path layer.
        let run = try Self.echoAcrossConntrackFlush(natA: "full_cone", natB: "symmetric_random", flush: ["nat-b"])
        Self.expectAllEchoed(run)
        #expect(run.statusA.contains("path-changed"), "peer A: \(run.statusA)")
    }
}
