import Foundation
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunch

@Suite("Punch executor on loopback", .serialized)
struct PunchExecutorTests {
    @Test("success with the target on the third of five ports; PunchInfo shows the ports tried")
    func thirdOfFive() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let silent = try (0..<4).map { _ in try SilentSocket() }
        let ports = [silent[0].port, silent[1].port, b.localAddress.port, silent[2].port, silent[3].port]
        let slow = FixedStrategy(perRound: 1, interval: .milliseconds(50), rounds: 10)
        let handle = await initiator.startPunch(options(to: b, ports: ports, session: "s1", key: key, role: .initiator,
                                                        expecting: PunchIdentities.b.nodeID, strategy: slow))
        // Watch the initiator walk the ports before the target even starts.
        let walked = await eventually { await initiator.activePunches().first?.portsTried.count ?? 0 >= 3 }
        #expect(walked)
        let info = try #require(await initiator.activePunches().first)
        #expect(Array(info.portsTried.prefix(3)) == Array(ports.prefix(3)))
        #expect(info.role == .initiator)
        #expect(info.round >= 3)
        let targetHandle = await target.startPunch(options(to: a, session: "s1", key: key, role: .target,
                                                           expecting: PunchIdentities.a.nodeID))
        let connection = try await handle.value()
        let accepted = try await targetHandle.value()
        #expect(connection.peerNodeID == PunchIdentities.b.nodeID)
        #expect(accepted.peerNodeID == PunchIdentities.a.nodeID)
        #expect(connection.remoteAddress == b.localAddress)
        // The connection works: a line goes across.
        let stream = try await connection.openStream()
        try await stream.write(Array("punched".utf8))
        try await stream.finish()
        let incoming = try #require(try await accepted.acceptStream())
        #expect(String(decoding: try await incoming.readToEnd(), as: UTF8.self) == "punched")
        #expect(await initiator.activePunches().isEmpty)
        #expect(await target.activePunches().isEmpty)
        await a.close()
        await b.close()
    }

    @Test("a target that refuses the initiator's certificate: the initiator's punch is no success")
    func refusedCertificateIsNoSuccess() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        var initiatorOptions = options(to: b, session: "refused", key: key, role: .initiator, expecting: PunchIdentities.b.nodeID)
        initiatorOptions.timeout = .seconds(1)
        // The target answers the session's probes but admits only C: it refuses A's certificate when A's Finished
        // arrives, after A's side of the handshake completed.
        var targetOptions = options(to: a, session: "refused", key: key, role: .target, expecting: PunchIdentities.c.nodeID)
        targetOptions.timeout = .seconds(1)
        let targetHandle = await target.startPunch(targetOptions)
        let handle = await initiator.startPunch(initiatorOptions)
        // A punch dial waits for the target's confirmation: success is never declared (nor recorded in metrics
        // and history) for a handshake the target refused.
        await #expect(throws: PunchError.self) { _ = try await handle.value() }
        _ = try? await targetHandle.value()
        await a.close()
        await b.close()
    }

    @Test("allPortsFailed: no port answers and the rounds run out before the deadline")
    func allPortsFailed() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try (0..<3).map { _ in try SilentSocket() }
        let opts = PunchOptions(
            targetHost: "127.0.0.1", targetPorts: silent.map(\.port), sessionID: "apf", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(perRound: 3, interval: .milliseconds(20), rounds: 3, timeout: .seconds(10))
        )
        let error = await #expect(throws: PunchError.self) { _ = try await executor.punch(opts) }
        #expect(error?.code == .allPortsFailed)
        #expect(error?.portsTried == silent.map(\.port))
        #expect(error?.rounds == 3)
        await a.close()
    }

    @Test("unreachable: nothing is bound, so ICMP comes back on loopback")
    func unreachable() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let opts = PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [unusedPort(), unusedPort()], sessionID: "unr", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(perRound: 2, interval: .milliseconds(50), rounds: 20, timeout: .seconds(10))
        )
        let error = await #expect(throws: PunchError.self) { _ = try await executor.punch(opts) }
        #expect(error?.code == .unreachable)
        #expect(error.map { $0.elapsed < .seconds(5) } == true)
        await a.close()
    }

    @Test("timeout: a silent peer that drops everything, with rounds outlasting the deadline")
    func timeout() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try SilentSocket()
        let opts = PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "to", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(perRound: 1, interval: .milliseconds(50), rounds: 100, timeout: .milliseconds(400))
        )
        let error = await #expect(throws: PunchError.self) { _ = try await executor.punch(opts) }
        #expect(error?.code == .timeout)
        #expect(error.map { $0.elapsed >= .milliseconds(400) } == true)
        await a.close()
    }

    @Test("cancelled: cancel mid-probe, by id and by task cancellation; a second cancel says the punch already finished")
    func cancelled() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try SilentSocket()
        let slow = FixedStrategy(perRound: 1, interval: .milliseconds(20), rounds: 1000, timeout: .seconds(30))
        let opts = PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "c1", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID, strategy: slow
        )
        let handle = await executor.startPunch(opts)
        #expect(await eventually { await executor.activePunches().first?.round ?? 0 >= 2 })
        await executor.cancel(handle.id)
        let result = await handle.result()
        guard case .failure(let error) = result else { Issue.record("expected cancelled"); return }
        #expect(error.code == .cancelled)
        #expect(error.rounds >= 2)
        #expect(await executor.cancel(handle.id) == .alreadyFinished)

        var second = opts
        second.sessionID = "c2"
        let task = Task { try await executor.punch(second) }
        #expect(await eventually { await executor.activePunches().count == 1 })
        task.cancel()
        let taskError = await #expect(throws: PunchError.self) { _ = try await task.value }
        #expect(taskError?.code == .cancelled)
        #expect(await executor.activePunches().isEmpty)
        await a.close()
    }

    @Test("peerAuthenticationFailed: the peer answers probes but is not the NodeID dialled; the description says the code once")
    func wrongNodeID() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let targetHandle = await target.startPunch(options(to: a, session: "auth", key: key, role: .target,
                                                           expecting: PunchIdentities.a.nodeID))
        let error = await #expect(throws: PunchError.self) {
            _ = try await initiator.punch(options(to: b, session: "auth", key: key, role: .initiator,
                                                  expecting: PunchIdentities.c.nodeID))
        }
        #expect(error?.code == .peerAuthenticationFailed)
        #expect(error?.message.contains(PunchIdentities.c.nodeID.description) == true)
        // The code once: the QUIC error's detail is carried, not its description (which repeats the code).
        let text = error?.description ?? ""
        #expect(text.components(separatedBy: "peerAuthenticationFailed").count == 2, "\(text)")
        await target.cancel(targetHandle.id)
        await a.close()
        await b.close()
    }

    @Test("invalid options give invalidOptions, not a crash", arguments: [
        ("not-an-ip", [UInt16(4000)], "s"), ("127.0.0.1", [], "s"), ("127.0.0.1", [0], "s"), ("127.0.0.1", [4000], ""),
    ])
    func invalidOptions(_ host: String, _ ports: [UInt16], _ session: String) async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let opts = PunchOptions(targetHost: host, targetPorts: ports, sessionID: session, sessionKey: [1],
                                role: .initiator, targetNodeID: PunchIdentities.b.nodeID)
        let error = await #expect(throws: PunchError.self) { _ = try await executor.punch(opts) }
        #expect(error?.code == .invalidOptions)
        await a.close()
    }

    @Test("the result is delivered exactly once under racing cancel and success (1,000 iterations)")
    func exactlyOnce() async throws {
        let (a, b, initiator, target, _) = try await punchPair()
        // The runtime creates its timer descriptor on the first sleep; make that happen before counting.
        try await Task.sleep(for: .milliseconds(1))
        let baselineFDs = openFileDescriptors()
        var successes = 0
        var cancels = 0
        for iteration in 0..<1000 {
            let key = sessionKey()
            let session = "race\(iteration)"
            let targetHandle = await target.startPunch(options(to: a, session: session, key: key, role: .target,
                                                               expecting: PunchIdentities.a.nodeID))
            let handle = await initiator.startPunch(options(to: b, session: session, key: key, role: .initiator,
                                                            expecting: PunchIdentities.b.nodeID))
            // Race a cancel against the handshake, at a varying point: right away, or once the dial is under way
            // (then the handshake and the cancel race to the result).
            if iteration % 2 == 0 {
                for _ in 0..<(iteration % 7) { await Task.yield() }
            } else {
                for await event in handle.events {
                    if case .connecting = event { break }
                    if case .done = event { break }
                }
                // Spread the cancel over the handshake's duration (0 to 20 ms), so it lands before, during and after.
                try await Task.sleep(for: .microseconds(iteration % 40 * 500))
            }
            await initiator.cancel(handle.id)
            switch await handle.result() {
            case .success(let connection):
                successes += 1
                await connection.close()
            case .failure(let error):
                #expect(error.code == .cancelled)
                cancels += 1
            }
            await target.cancel(targetHandle.id)
            if case .success(let connection) = await targetHandle.result() { await connection.close() }
            #expect(handle.box.deliveries == 1)
            #expect(targetHandle.box.deliveries == 1)
        }
        #expect(successes + cancels == 1000)
        #expect(successes > 0 && cancels > 0, "both sides of the race happened: \(successes) successes, \(cancels) cancels")
        #expect(await initiator.activePunches().isEmpty)
        #expect(await target.activePunches().isEmpty)
        #expect(await eventually {
            let counts = (await a.connectionCount, await b.connectionCount)
            return counts == (0, 0)
        })
        // A leak per iteration would show as a thousand descriptors; other suites running in parallel open and
        // close a few of their own meanwhile, hence the small allowance.
        let bounded = await eventually { openFileDescriptors() <= baselineFDs + 16 }
        #expect(bounded, "descriptors: \(baselineFDs) before, \(openFileDescriptors()) after: \(descriptorTargets())")
        await a.close()
        await b.close()
    }

    @Test("200 concurrent punches on loopback all succeed")
    func twoHundredConcurrent() async throws {
        let b = try await bindEndpoint(PunchIdentities.b)
        let target = PunchExecutor(endpoint: b)
        var initiators: [(Endpoint, PunchExecutor, Identity)] = []
        for index in 0..<200 {
            let identity = try Identity.generate(commonName: "peer-\(index)")
            let endpoint = try await bindEndpoint(identity)
            initiators.append((endpoint, PunchExecutor(endpoint: endpoint), identity))
        }
        let connected = try await withThrowingTaskGroup(of: Bool.self) { group in
            for (index, (endpoint, executor, identity)) in initiators.enumerated() {
                let key = sessionKey()
                let session = "load\(index)"
                let targetHandle = await target.startPunch(options(
                    to: endpoint, session: session, key: key, role: .target, expecting: identity.nodeID,
                    strategy: FixedStrategy(rounds: 100, timeout: .seconds(30))
                ))
                group.addTask {
                    let handle = await executor.startPunch(options(
                        to: b, session: session, key: key, role: .initiator, expecting: PunchIdentities.b.nodeID,
                        strategy: FixedStrategy(rounds: 100, timeout: .seconds(30))
                    ))
                    // Keep the progress so that a failure explains itself.
                    var log: [String] = []
                    let clock = ContinuousClock()
                    let started = clock.now
                    for await event in handle.events { log.append("\(clock.now - started) \(event)") }
                    if case .failure(let error) = await handle.result() {
                        Issue.record("""
                            \(session) failed: \(error); events \(log); initiator \(await endpoint.stats); \
                            target \(await b.stats) failures \(await b.recentHandshakeFailures.suffix(3)); \
                            target side \(await targetHandle.result())
                            """)
                    }
                    let connection = try await handle.value()
                    let accepted = try await targetHandle.value()
                    return connection.peerNodeID == PunchIdentities.b.nodeID && accepted.peerNodeID == identity.nodeID
                }
            }
            var count = 0
            for try await ok in group where ok { count += 1 }
            return count
        }
        #expect(connected == 200)
        for (endpoint, _, _) in initiators { await endpoint.close() }
        await b.close()
    }

    @Test("several local sockets: probes leave from each, the winner's socket stays and the rest close")
    func extraSockets() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let baseline = openFileDescriptors()
        let targetHandle = await target.startPunch(options(to: a, session: "multi", key: key, role: .target,
                                                           expecting: PunchIdentities.a.nodeID))
        let connection = try await initiator.punch(options(
            to: b, session: "multi", key: key, role: .initiator, expecting: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(perRound: 1, interval: .milliseconds(20), rounds: 10, sockets: 4)
        ))
        _ = try await targetHandle.value()
        // One extra socket may stay (if it won); the others are closed.
        #expect(await eventually { openFileDescriptors() <= baseline + 1 + 1 })
        await connection.close()
        await a.close()
        await b.close()
    }
}

extension PunchExecutorTests {
    @Test("a target that wins on an extra socket keeps that socket: data flows after the punch")
    func targetWinsOnExtraSocket() async throws {
        // The shape of a birthday punch whose random side is the target: the initiator only ever hears the target's
        // extra socket 1 (the target's socket 0 probes a silent port, and the initiator's only candidate is silent),
        // so the handshake lands on socket 1, which must stay open when the punch ends.
        let (a, b, initiator, target, key) = try await punchPair()
        let silentForTarget = try SilentSocket()
        let silentForInitiator = try SilentSocket()
        let targetHandle = await target.startPunch(options(
            to: a, ports: [silentForTarget.port, a.localAddress.port], session: "extra-win", key: key, role: .target,
            expecting: PunchIdentities.a.nodeID, strategy: FixedStrategy(perRound: 1, sockets: 2)
        ))
        let initiatorHandle = await initiator.startPunch(options(
            to: b, ports: [silentForInitiator.port], session: "extra-win", key: key, role: .initiator,
            expecting: PunchIdentities.b.nodeID
        ))
        let dialled = try await initiatorHandle.value()
        let accepted = try await targetHandle.value()
        #expect(dialled.remoteAddress.port != b.localAddress.port, "the handshake should have used the extra socket")
        let reply = try await withThrowingTaskGroup(of: [UInt8]?.self) { group in
            group.addTask {
                guard let stream = try await accepted.acceptStream() else { return nil }
                let line = try await stream.readToEnd(limit: 64)
                try await stream.write(line)
                try await stream.finish()
                return nil
            }
            group.addTask {
                let stream = try await dialled.openStream()
                try await stream.write(Array("over the extra socket".utf8))
                try await stream.finish()
                return try await stream.readToEnd(limit: 64)
            }
            group.addTask {
                try await Task.sleep(for: .seconds(10))
                throw Deadline()
            }
            defer { group.cancelAll() }
            while let result = try await group.next() {
                if let result { return result }
            }
            return []
        }
        #expect(reply == Array("over the extra socket".utf8))
        await dialled.close()
        await a.close()
        await b.close()
    }
}

/// Widens the ports after the first unanswered round, like a strategy's `on_probe` would.
struct WideningStrategy: PunchStrategy {
    let name = "test-widening"
    let extra: UInt16
    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        try FixedStrategy(perRound: 1, interval: .milliseconds(20), rounds: 20).plan(ctx)
    }
    func onProbe(_ ctx: PunchContext, _ event: ProbeEvent) throws -> PunchPlan? {
        guard event.round == 2, event.answeredPorts.isEmpty else { return nil }
        var plan = event.currentPlan
        plan.ports = PortList(ports: Array(plan.ports) + [extra])
        return plan
    }
}

extension PunchExecutorTests {
    @Test("a strategy's onProbe can widen the ports mid-punch, reaching a peer the first plan missed")
    func onProbeWidens() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let silent = try SilentSocket()
        // The target only listens and answers; it never probes the initiator (no ports to probe would be invalid,
        // so it probes a silent socket), so only the initiator's widened probes can find it.
        let targetHandle = await target.startPunch(options(to: a, ports: [silent.port], session: "widen", key: key,
                                                           role: .target, expecting: PunchIdentities.a.nodeID,
                                                           strategy: FixedStrategy(rounds: 100, timeout: .seconds(10))))
        let connection = try await initiator.punch(options(
            to: b, ports: [silent.port], session: "widen", key: key, role: .initiator,
            expecting: PunchIdentities.b.nodeID, strategy: WideningStrategy(extra: b.localAddress.port)
        ))
        #expect(connection.peerNodeID == PunchIdentities.b.nodeID)
        _ = try await targetHandle.value()
        await a.close()
        await b.close()
    }
}
