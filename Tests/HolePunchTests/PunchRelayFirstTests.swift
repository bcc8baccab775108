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

    /// One punch on loopback: the target probes a silent port (so the initiator proves nothing from its probes); the
    /// initiator's candidates are `direct` (its probes and any direct dial go there) and the relayed `relay`.
    struct RelayPunch {
        let a: Endpoint
        let b: Endpoint
        let initiator: PunchExecutor
        let target: PunchExecutor
        let dialling: PunchHandle
        let accepting: PunchHandle

        /// Cancels both punches and closes both endpoints.
        func end() async {
            _ = await initiator.cancel(dialling.id)
            _ = await target.cancel(accepting.id)
            await a.close()
            await b.close()
        }
    }

    /// Starts a ``RelayPunch``; `relay` and `direct` forward to the target's endpoint, made from its address.
    static func start(session: String, strategy: any PunchStrategy, relay: (SocketAddress) throws -> SecondPort,
                      direct: ((SocketAddress) throws -> SecondPort)? = nil)
        async throws -> (punch: RelayPunch, relay: SecondPort, direct: SecondPort?, silent: SilentSocket)
    {
        let (a, b, initiator, target, key) = try await punchPair()
        let (relayed, forwarded, silent) = (try relay(b.localAddress), try direct?(b.localAddress), try SilentSocket())
        let directAddress = forwarded?.address ?? .loopbackV4(port: silent.port)
        var dialling = options(to: b, ports: [directAddress.port], session: session, key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: strategy)
        dialling.candidates = [Candidate(kind: .serverReflexive, address: directAddress),
                               Candidate(kind: .relayed, address: relayed.address)]
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: session, key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let handle = await initiator.startPunch(dialling)
        let punch = RelayPunch(a: a, b: b, initiator: initiator, target: target, dialling: handle, accepting: accepting)
        return (punch, relayed, forwarded, silent)
    }

    @Test("a relay-first punch returns its relayed connection once we verified the target, before the target confirms (its Finished never arrives there)")
    func relayedDialReturnsBeforeConfirmation() async throws {
        // A stand-in for the target's TURN allocation that passes only our Initial: the target never sees our
        // Finished, so it never confirms. Neither side's probes reach the other: the relayed dial is the only way
        // the punch can connect.
        let (punch, relay, _, silent) = try await Self.start(session: "early", strategy: RelayAtOnceStrategy()) {
            try SecondPort(to: $0, clientDatagramLimit: 1)
        }
        defer {
            relay.close()
            _ = silent
        }
        // Waiting for confirmation, the dial (and its retries) would time out and the punch fail.
        let connection = try await withDeadline(.seconds(10)) { try await punch.dialling.value() }
        #expect(connection.remoteAddress == relay.address)
        #expect(connection.peerNodeID == PunchIdentities.b.nodeID)
        await connection.close()
        await punch.end()
    }

    @Test("the relayed dial sends its handshake datagrams as many times as the plan's handshake copies, as punch dials do")
    func relayedDialSendsHandshakeCopies() async throws {
        // The relayed leg crosses the same lossy links as the punch: the copies a lossy plan asks for matter there too.
        var strategy = RelayAtOnceStrategy()
        strategy.handshakeCopies = 2
        let (punch, relay, _, silent) = try await Self.start(session: "copies", strategy: strategy) { try SecondPort(to: $0) }
        defer {
            relay.close()
            _ = silent
        }
        let connection = try await withDeadline(.seconds(10)) { try await punch.dialling.value() }
        #expect(connection.remoteAddress == relay.address)
        #expect(relay.copiesOfFirstClientDatagram == 2, "the Initial went through the relay \(relay.copiesOfFirstClientDatagram) time(s)")
        await connection.close()
        await punch.end()
    }

    @Test("a relay raced against a direct handshake the target completed first: both sides keep the direct connection (the relayed dial waits for confirmation while another dial runs)")
    func relayRacedAgainstDirectDialKeepsOneConnection() async throws {
        // The target's direct address: the handshake through it completes at the target at once, but its
        // confirmation (and every probe answer) reaches the initiator only after 2.5 s, so no pair is proven when the
        // relay's delay (1 s) has passed and the relayed dial starts beside the direct one. The delay leaves the
        // target's punch a second to end on its direct connection first (300 ms was too little in a loaded CI run).
        let (punch, relay, direct, silent) = try await Self.start(session: "race", strategy: RelayRaceStrategy(delay: .seconds(1)),
                                                                   relay: { try SecondPort(to: $0) },
                                                                   direct: { try SecondPort(to: $0, holdsSmallAnswers: .milliseconds(2_500)) })
        defer {
            relay.close()
            direct?.close()
            _ = silent
        }
        let dialled = try await withDeadline(.seconds(10)) { try await punch.dialling.value() }
        let accepted = try await withDeadline(.seconds(10)) { try await punch.accepting.value() }
        let same = try? await PunchCandidateLoopbackTests.sameConnection(dialled, accepted, "one connection")
        #expect(same == true, "the initiator holds \(dialled.remoteAddress) (relay \(relay.address)), the target \(accepted.remoteAddress): different connections")
        await dialled.close()
        await punch.end()
    }
}
