import Foundation
import ProcessTestSupport
import Testing

@Suite("holepunch processes on loopback", .serialized)
struct ProcessTests {
    @Test("rendezvous + two peer processes: A connects to B by NodeID and a line goes both ways")
    func lineBothWays() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-rdv")
        defer { rdv.close() }
        let (dir, common) = (rdv.dir, ["peer"] + rdv.peerArguments)
        let (b, bID) = try await startWaitingPeer(binary, common, identity: "b.pem", in: dir)
        defer { b.stop() }

        let a = try Child(binary, common + ["--identity", "a.pem", "--connect", bID], directory: dir)
        defer { a.stop() }
        await expectLinesCross(a, b)
        #expect(a.stderr.text.contains("connected"))
        #expect(a.stderr.text.contains("timeToConnectMs="))
        a.closeInput()
        b.closeInput()
        #expect(await a.waitExit(.seconds(10)) == 0)
        #expect(await b.waitExit(.seconds(10)) == 0)
    }

    @Test("peer --echo: A sends a line and ends its input; the echo comes back whole and both exit 0")
    func echoBothExitZero() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-echo")
        defer { rdv.close() }
        let (dir, common) = (rdv.dir, ["peer"] + rdv.peerArguments + ["--no-nat-detect"])
        let (b, bID) = try await startWaitingPeer(binary, common + ["--echo"], identity: "b.pem", in: dir)
        defer { b.stop() }

        let a = try Child(binary, common + ["--identity", "a.pem", "--connect", bID], directory: dir)
        defer { a.stop() }
        a.write("hello through the echo\n")
        a.closeInput()
        // The echo side writes, finishes and closes at once: its graceful close must not cut the echo short.
        #expect(await a.waitExit(.seconds(20)) == 0, "A err: \(a.stderr.text)")
        #expect(await b.waitExit(.seconds(10)) == 0, "B err: \(b.stderr.text)")
        #expect(a.stdout.text == "hello through the echo\n", "A err: \(a.stderr.text)")
        #expect(!a.stderr.text.contains("error"))
    }

    @Test("an unknown NodeID: one clear error line with a hint, exit status 2")
    func unknownNodeID() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-rdv")
        defer { rdv.close() }
        let a = try Child(binary, ["peer", "--rendezvous", rdv.quic, "--rendezvous-id", "@rdv.id", "--identity", "a.pem",
                                   "--no-nat-detect", "--connect", String(repeating: "a", count: 52)], directory: rdv.dir)
        defer { a.stop() }
        #expect(await a.waitExit(.seconds(15)) == 2)
        #expect(a.stderr.text.contains("error: rendezvous unknownTarget"))
        #expect(a.stderr.text.contains("hint:"))
        #expect(!a.stderr.text.contains("Fatal error"))
    }

    @Test("killing B mid-punch gives A a typed failure (timeout, unreachable or allPortsFailed), never a hang")
    func killTargetMidPunch() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        // A long start delay opens a window between the coordinate message and the first probe: the floor too, or
        // the peers' RTT estimates would shorten it. 4 s: with 1.5 s a loaded CI run saw the coordinate and killed B
        // only after A had connected at the start.
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-rdv", extra: ["--start-delay-ms", "4000",
                                                                                 "--min-start-delay-ms", "4000", "--no-stun"])
        defer { rdv.close() }
        let (dir, common) = (rdv.dir, ["peer"] + rdv.peerArguments + ["--no-nat-detect"])
        let (b, bID) = try await startWaitingPeer(binary, common, identity: "b.pem", in: dir)
        defer { b.stop() }
        let a = try Child(binary, common + ["--identity", "a.pem", "--connect", bID, "--timeout", "5"], directory: dir)
        defer { a.stop() }
        let coordinated = await eventually(.seconds(15)) { a.stderr.text.contains("coordinated") }
        try #require(coordinated, "A was not coordinated: \(a.stderr.text)")
        b.stop()
        let status = await a.waitExit(.seconds(30))
        #expect(status == 3, "A: \(a.stderr.text)")
        let text = a.stderr.text
        // Unreachable needs an ICMP answer from every planned port; on a loopback shared with parallel tests a
        // planned neighbour of B's port may be held by another process, which swallows the probes silently, and the
        // rounds then run out instead (CI: `allPortsFailed … (127.0.0.1, 1 candidate ports)`). Each is a typed end.
        #expect(["timeout", "unreachable", "allPortsFailed"].contains { text.contains("punch failed: \($0)") }, "A: \(text)")
    }
}
