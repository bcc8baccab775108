import Foundation
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunch

/// The plan of ``FixedStrategy`` with the relay at once.
struct RelayAtOnceStrategy: PunchStrategy {
    let name = "test-relay-first"

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        var plan = try FixedStrategy(interval: .milliseconds(50), rounds: 40, timeout: .seconds(4)).plan(ctx)
        plan.relay = .first
        plan.connectTimeout = .seconds(2)
        return plan
    }
}

/// ``FixedStrategy``'s 5 short rounds with the relay at once and a 10 s handshake timeout: against silent addresses the
/// probing ends (`allPortsFailed`) long before the relayed dial does.
struct RelayAwaitStrategy: PunchStrategy {
    let name = "test-relay-await"

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        var plan = try FixedStrategy(rounds: 5, timeout: .seconds(20)).plan(ctx)
        plan.relay = .first
        plan.connectTimeout = .seconds(10)
        return plan
    }
}

@Suite("Relay-first punches")
struct PunchRelayFirstTests {
    @Test("cancelling a punch whose probing failed while its relayed dial still runs ends it at once, as cancelled")
    func cancelWhileAwaitingTheRelayedDial() async throws {
        let (a, b, initiator, _, key) = try await punchPair()
        let silent = try SilentSocket()
        let relay = try SilentSocket()
        var dialling = options(to: b, ports: [silent.port], session: "awaiting", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: RelayAwaitStrategy())
        dialling.candidates = [Candidate(kind: .serverReflexive, address: .loopbackV4(port: silent.port)),
                               Candidate(kind: .relayed, address: .loopbackV4(port: relay.port))]
        let handle = await initiator.startPunch(dialling)
        // The session has ended; the punch waits only for the relayed dial's outcome.
        #expect(await eventually(.seconds(5)) { await initiator.activePunches().first?.phase == "failed(allPortsFailed)" })
        #expect(await initiator.cancel(handle.id) == .cancelled)
        let result = try await withDeadline(.seconds(3)) { await handle.result() }
        #expect(throws: PunchError.self) { try result.get() }
        if case .failure(let error) = result { #expect(error.code == .cancelled) }
        #expect(await initiator.activePunches().isEmpty)
        await a.close()
        await b.close()
    }

    @Test("a relay-first punch returns its relayed connection once we verified the target, before the target confirms (its Finished never arrives there)")
    func relayedDialReturnsBeforeConfirmation() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        // A stand-in for the target's TURN allocation that passes only our Initial: the target never sees our
        // Finished, so it never confirms.
        let relay = try SecondPort(to: b.localAddress, clientDatagramLimit: 1)
        defer { relay.close() }
        // Neither side's probes reach the other: the relayed dial is the only way the punch can connect.
        let silent = try SilentSocket()
        var dialling = options(to: b, ports: [silent.port], session: "early", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: RelayAtOnceStrategy())
        dialling.candidates = [Candidate(kind: .serverReflexive, address: .loopbackV4(port: silent.port)),
                               Candidate(kind: .relayed, address: relay.address)]
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: "early", key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let handle = await initiator.startPunch(dialling)
        // Waiting for confirmation, the dial (and its retries) would time out and the punch fail.
        let connection = try await withDeadline(.seconds(10)) { try await handle.value() }
        #expect(connection.remoteAddress == relay.address)
        #expect(connection.peerNodeID == PunchIdentities.b.nodeID)
        _ = await initiator.cancel(handle.id)
        _ = await target.cancel(accepting.id)
        await connection.close()
        await a.close()
        await b.close()
    }
}
