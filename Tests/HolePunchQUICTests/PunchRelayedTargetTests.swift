import ProcessTestSupport
import Testing
import HolePunchNet
import HolePunchStrategy
import HolePunchQUIC
@testable import HolePunch

/// A relay-first plan on loopback: probes every 50 ms for 2 s, the relay at once.
private struct RelayFirstPlan: PunchStrategy {
    let name = "test-relayed-target"

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        PunchPlan(ports: PortList(ports: ctx.candidatePorts), packetsPerRound: 1, interval: .milliseconds(50), rounds: 40,
                  timeout: .seconds(4), connectTimeout: .seconds(2), startDelay: .zero, initialRTT: .milliseconds(20),
                  dialCandidatesDirectly: false, relay: .first)
    }
}

/// A plan whose probing ends at once against a silent port (5 rounds of 50 ms) and whose relay comes after 3 s: a
/// target with a relay then waits for the initiator's relayed dial until 3 + 2 + 1 s (`PunchPlan.relayAcceptEnd`).
private struct RelayAfterPlan: PunchStrategy {
    let name = "test-relay-after"

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        PunchPlan(ports: PortList(ports: ctx.candidatePorts), packetsPerRound: 1, interval: .milliseconds(50), rounds: 5,
                  timeout: .seconds(4), connectTimeout: .seconds(2), startDelay: .zero, initialRTT: .milliseconds(20),
                  dialCandidatesDirectly: false, relay: .after(.seconds(3)))
    }
}

/// The target's side of a relayed punch, through ``TestRelay`` (the target owns the allocation, as with coturn).
@Suite("A target punch with a relayed connection", .serialized)
struct PunchRelayedTargetTests {
    /// The initiator's endpoint `a`, the target's `b` with ``TestRelay`` attached (its allocation), a silent endpoint
    /// both sides' probes aim at, and a session key.
    static func relayedTarget() async throws -> (a: Endpoint, b: Endpoint, relay: TestRelay, silent: Endpoint, key: [UInt8]) {
        let a = try await makeEndpoint(TestIdentities.a, policy: .none)
        let b = try await makeEndpoint(TestIdentities.b, policy: .none)
        let relay = try TestRelay(client: b.localAddress)
        try await b.attachRelay(relay.framing())
        let silent = try await makeEndpoint(TestIdentities.c, policy: .none)
        return (a, b, relay, silent, (0..<32).map { _ in UInt8.random(in: 0...255) })
    }

    @Test("once the target delivered its relayed connection, it refuses another handshake of that punch's session (the direct path comes by a move): no connection the target confirms and then closes as a duplicate")
    func targetRefusesHandshakesAfterRelayed() async throws {
        let (a, b, relay, silent, key) = try await Self.relayedTarget()
        defer { relay.close() }
        let (initiator, target) = (PunchExecutor(endpoint: a), PunchExecutor(endpoint: b))
        let session = "relayed-target"
        let accepting = await target.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.localAddress.port], sessionID: session, sessionKey: key,
            role: .target, targetNodeID: TestIdentities.a.nodeID, strategy: RelayFirstPlan()))
        // Neither side's probes reach the other (both aim at a silent endpoint): only the relayed dial connects. The
        // target starts first, as a coordinate makes it (an Initial that arrives before its session is admitted is
        // refused: 1 run in 17 when the initiator started first).
        let dialling = await initiator.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.localAddress.port], sessionID: session, sessionKey: key,
            role: .initiator, targetNodeID: TestIdentities.b.nodeID, strategy: RelayFirstPlan(),
            candidates: [Candidate(kind: .serverReflexive, address: silent.localAddress),
                         Candidate(kind: .relayed, address: relay.relayed)]))
        let dialled = try await withDeadline(.seconds(10)) { try await dialling.value() }
        let accepted = try await withDeadline(.seconds(10)) { try await accepting.value() }
        #expect(await accepted.paths().contains { $0.isActive && $0.route.isRelayed }, "the target's connection is not relayed")
        // What a direct dial of the initiator begun before the relayed one would bring, arriving now: the target
        // must refuse it, not complete it. Completed, it is confirmed and then closed as a duplicate; that close is
        // sent once, and an initiator that saw only the confirmation (a lossy path) keeps a connection the target
        // has dropped. On loopback the close arrives: the dial fails either way, but only a refusal is a handshake
        // failure.
        let late: Result<QUICConnection, QUICError> = try await withDeadline(.seconds(10)) {
            do {
                return .success(try await a.connect(to: b.localAddress, expecting: TestIdentities.b.nodeID, options: ConnectOptions(
                    initialRTT: .milliseconds(20), handshakeTimeout: .seconds(3),
                    serverName: PunchExecutor.serverName(forSession: session))))
            } catch let error as QUICError {
                return .failure(error)
            }
        }
        switch late {
        case .success(let connection):
            Issue.record("the target completed a second handshake of its relayed session")
            await connection.abort()
        case .failure(let error):
            #expect(error.code == .handshakeFailed, "the target completed the handshake, then: \(error)")
        }
        _ = await initiator.cancel(dialling.id)
        _ = await target.cancel(accepting.id)
        await dialled.abort()
        await silent.close()
        await a.close()
        await b.close()
    }

    @Test("a target past its punch, waiting for the relayed dial, that completes a direct handshake of its session takes it as the punch's connection instead of closing it as a duplicate")
    func waitingTargetKeepsADirectHandshake() async throws {
        let (a, b, relay, silent, key) = try await Self.relayedTarget()
        defer { relay.close() }
        let target = PunchExecutor(endpoint: b)
        let session = "waiting-target"
        let accepting = await target.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.localAddress.port], sessionID: session, sessionKey: key,
            role: .target, targetNodeID: TestIdentities.a.nodeID, strategy: RelayAfterPlan()))
        // Its probing has ended (nothing answers); it now waits for the relayed dial.
        #expect(await eventually(.seconds(5)) { await target.activePunches().first?.phase == "failed(allPortsFailed)" })
        // A direct handshake of the initiator that was under way (a redial) completes now.
        let dialled = try await withDeadline(.seconds(10)) {
            try await a.connect(to: b.localAddress, expecting: TestIdentities.b.nodeID, options: ConnectOptions(
                initialRTT: .milliseconds(20), handshakeTimeout: .seconds(3), serverName: PunchExecutor.serverName(forSession: session)))
        }
        // Before: closed as a duplicate of nothing, and the punch failed at the window's end (6 s).
        let accepted = try await withDeadline(.seconds(3)) { try await accepting.value() }
        #expect(accepted.remoteAddress == a.localAddress)
        #expect(await dialled.isOpen)
        #expect(await target.activePunches().isEmpty)
        await dialled.abort()
        await silent.close()
        await a.close()
        await b.close()
    }
}
