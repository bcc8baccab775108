import Foundation
import ProcessTestSupport
import Testing

/// The cluster as it is deployed: `holepunch rendezvous --cluster` processes and `holepunch peer` processes, and an
/// instance that dies without a word (SIGKILL: no unsubscribe, no goodbye to NATS).
@Suite("Cluster of rendezvous processes", .serialized)
struct ClusterProcessTests {
    @Test("an instance killed with SIGKILL: its peer is unknown at once, re-registers at another instance, and is reachable from a third")
    func instanceKilled() async throws {
        guard let binary = holepunchBinaryOrSkip(), let nats = try await NATSServerProcess.startOrSkip() else { return }
        defer { nats.stop() }
        let dir = try scratchDirectory("hp-cluster-kill")
        defer { try? FileManager.default.removeItem(at: dir) }
        // One identity for every instance: peers check the rendezvous's NodeID, whichever instance they reach.
        let create = try Child(binary, ["identity", "create", "rdv.pem"], directory: dir)
        #expect(await create.waitExit(.seconds(20)) == 0)
        let instance = ["--identity", "rdv.pem", "--no-stun", "--cluster", nats.url]
        let (a, quicA) = try await startRendezvous(binary, in: dir, extra: instance)
        defer { a.stop() }
        let (b, quicB) = try await startRendezvous(binary, in: dir, extra: instance)
        defer { b.stop() }
        let (c, quicC) = try await startRendezvous(binary, in: dir, extra: instance)
        defer { c.stop() }
        func peer(at quic: String) -> [String] {
            ["peer", "--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0", "--no-nat-detect"]
        }
        /// A peer process at instance C dials `target` and sends `line`; returns it (the caller stops it).
        func dial(_ target: String, line: String) throws -> Child {
            let child = try Child(binary, peer(at: quicC) + ["--identity", "dialer.pem", "--connect", target], directory: dir)
            child.write(line + "\n")
            return child
        }

        // The target waits at A; a peer at C reaches it through NATS.
        let (first, target) = try await startWaitingPeer(binary, peer(at: quicA), identity: "target.pem", in: dir)
        defer { first.stop() }
        let before = try dial(target, line: "before the kill")
        defer { before.stop() }
        let crossed = await eventually(.seconds(30)) { first.stdout.text.contains("before the kill") }
        #expect(crossed, "dialer: \(before.stderr.text) | target: \(first.stderr.text)")
        before.stop()

        // A dies. Its NATS connection drops with it, and with it the subscription that routed the target there:
        // a request for the target is refused as unknown (exit 2), not sent to the dead instance until a timeout.
        a.stop()
        first.stop()
        let orphan = try dial(target, line: "nobody there")
        defer { orphan.stop() }
        let status = await orphan.waitExit(.seconds(20))
        #expect(status == 2, "dialing a peer of the dead instance: \(String(describing: status)) \(orphan.stderr.text)")
        #expect(orphan.stderr.text.contains("unknownTarget"), "\(orphan.stderr.text)")
        // NATS's own "no responders", not a request that went to the dead instance and waited out its timeout.
        #expect(!orphan.stderr.text.contains("no answer in"), "the request was routed to the dead instance: \(orphan.stderr.text)")

        // The target registers again, at B (what an app does when its rendezvous connection ends), and is reachable
        // from C at once: nothing stale to wait out.
        let (second, again) = try await startWaitingPeer(binary, peer(at: quicB), identity: "target.pem", in: dir)
        defer { second.stop() }
        #expect(again == target)
        let after = try dial(target, line: "after the kill")
        defer { after.stop() }
        let crossedAgain = await eventually(.seconds(30)) { second.stdout.text.contains("after the kill") }
        #expect(crossedAgain, "dialer: \(after.stderr.text) | target: \(second.stderr.text)")
        #expect(b.process.isRunning && c.process.isRunning)
    }
}
