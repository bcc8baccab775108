import Testing
@testable import HolePunch

@Suite("Punch caps: one peer cannot hold every punch slot of a process", .serialized)
struct PunchCapTests {
    func options(_ i: Int, peer: NodeID, port: UInt16) -> PunchOptions {
        PunchOptions(targetHost: "127.0.0.1", targetPorts: [port], sessionID: "cap\(i)", sessionKey: sessionKey(),
                     punchTime: .after(.seconds(60)), role: .initiator, targetNodeID: peer)
    }

    @Test("the ninth concurrent punch to one peer fails at once with tooManyPunches (default 8 per peer)")
    func perPeerCap() async throws {
        let endpoint = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: endpoint)
        let port = unusedPort()
        var handles: [PunchHandle] = []
        for i in 1...9 { handles.append(await executor.startPunch(options(i, peer: PunchIdentities.b.nodeID, port: port))) }
        #expect(await executor.activePunches().count == 8)
        // Another peer still gets a slot.
        let other = await executor.startPunch(options(10, peer: PunchIdentities.c.nodeID, port: port))
        #expect(await executor.activePunches().count == 9)
        await executor.shutdown()
        if case .failure(let error) = await handles[8].result() {
            #expect(error.code.rawValue == "tooManyPunches")
        } else {
            Issue.record("the ninth punch succeeded")
        }
        if case .failure(let error) = await other.result() { #expect(error.code == .cancelled) }
        await endpoint.close()
    }
}
