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
    /// The plan's handshake copies (1: FixedStrategy's).
    var handshakeCopies = 1

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        var plan = try FixedStrategy(interval: .milliseconds(50), rounds: 40, timeout: .seconds(4)).plan(ctx)
        plan.relay = .first
        plan.connectTimeout = .seconds(2)
        plan.handshakeCopies = handshakeCopies
        return plan
    }
}

/// The plan of ``FixedStrategy`` dialling the target's address at once, with the relay raced after `delay`.
struct RelayRaceStrategy: PunchStrategy {
    let name = "test-relay-race"
    var delay: Duration = .milliseconds(300)

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        var plan = try FixedStrategy(interval: .milliseconds(50), rounds: 100, timeout: .seconds(8), dialDirect: true).plan(ctx)
        plan.relay = .after(delay)
        return plan
    }
}

@Suite("Relay-first punches")
struct PunchRelayFirstTests {
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

    @Test("the relayed dial sends its handshake datagrams as many times as the plan's handshake copies, as punch dials do")
    func relayedDialSendsHandshakeCopies() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        // The relayed leg crosses the same lossy links as the punch: the copies a lossy plan asks for matter there too.
        let relay = try SecondPort(to: b.localAddress)
        defer { relay.close() }
        let silent = try SilentSocket()
        var strategy = RelayAtOnceStrategy()
        strategy.handshakeCopies = 2
        var dialling = options(to: b, ports: [silent.port], session: "copies", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: strategy)
        dialling.candidates = [Candidate(kind: .serverReflexive, address: .loopbackV4(port: silent.port)),
                               Candidate(kind: .relayed, address: relay.address)]
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: "copies", key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let handle = await initiator.startPunch(dialling)
        let connection = try await withDeadline(.seconds(10)) { try await handle.value() }
        #expect(connection.remoteAddress == relay.address)
        #expect(relay.copiesOfFirstClientDatagram == 2, "the Initial went through the relay \(relay.copiesOfFirstClientDatagram) time(s)")
        _ = await initiator.cancel(handle.id)
        _ = await target.cancel(accepting.id)
        await connection.close()
        await a.close()
        await b.close()
    }

    @Test("a relay raced against a direct handshake the target completed first: both sides keep the direct connection (the relayed dial waits for confirmation while another dial runs)")
    func relayRacedAgainstDirectDialKeepsOneConnection() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        // The target's direct address: the handshake through it completes at the target at once, but its
        // confirmation (and every probe answer) reaches the initiator only after 1.5 s, so no pair is proven when the
        // relay's delay has passed and the relayed dial starts beside the direct one.
        let direct = try SecondPort(to: b.localAddress, holdsSmallAnswers: .milliseconds(1_500))
        let relay = try SecondPort(to: b.localAddress)
        let silent = try SilentSocket()
        defer {
            direct.close()
            relay.close()
        }
        var dialling = options(to: b, ports: [direct.address.port], session: "race", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: RelayRaceStrategy())
        dialling.candidates = [Candidate(kind: .serverReflexive, address: direct.address),
                               Candidate(kind: .relayed, address: relay.address)]
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: "race", key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let handle = await initiator.startPunch(dialling)
        let dialled = try await withDeadline(.seconds(10)) { try await handle.value() }
        let accepted = try await withDeadline(.seconds(10)) { try await accepting.value() }
        let same = try? await PunchCandidateLoopbackTests.sameConnection(dialled, accepted, "one connection")
        #expect(same == true, "the initiator holds \(dialled.remoteAddress) (relay \(relay.address)), the target \(accepted.remoteAddress): different connections")
        _ = await initiator.cancel(handle.id)
        _ = await target.cancel(accepting.id)
        await dialled.close()
        await a.close()
        await b.close()
    }
}
