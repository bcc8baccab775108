import Foundation
import HolePunch
@testable import HolePunchCluster
import HolePunchQUIC
import HolePunchNet
import HolePunchRendezvous
import ProcessTestSupport
import Testing

// The cluster logic that needs no NATS traffic of its own (routing in the state machine) and the start-skew
// timing suite; the NATS cluster behaviour is in ClusterTests.swift, whose fixtures these use.

@Suite("Cluster routing in the state machine")
struct RemotePunchStateTests {
    @Test("the holder plans for the initiator's RTT plus the directory round trip; the far peer goes first")
    func remoteSchedule() throws {
        var state = RendezvousState(configuration: .init(startDelay: .milliseconds(150)))
        let target = ClusterIdentities.b.nodeID
        _ = state.register(node: target, connection: 1, observed: .loopbackV4(port: 5000), registration: Registration(), now: .zero)
        state.rttSample(node: target, rtt: .milliseconds(10))
        let request = RemotePunchRequest(requestID: 9, sessionID: "s1", sessionKey: Array(repeating: 1, count: 32),
                                         initiator: ClusterIdentities.a.nodeID, target: target,
                                         candidates: [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 6000))], nat: .unknown,
                                         initiatorRTTMicroseconds: 30_000, directoryRTTMicroseconds: 10_000)
        let (actions, reply) = state.acceptRemotePunch(request, now: .zero)
        // Initiator effectively 40 ms away, target 10 ms: the target's copy waits (40 - 10) / 2 = 15 ms.
        guard case let .coordinate(toInitiator, delay) = reply else { Issue.record("refused: \(reply)"); return }
        #expect(delay == 0)
        #expect(toInitiator.requestID == 9 && toInitiator.peer == target && toInitiator.role == .initiator)
        #expect(toInitiator.candidates == [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 5000))])
        let sends = actions.compactMap { action -> (NodeID, Duration, Coordinate)? in
            if case let .send(.coordinate(c), node, after) = action { return (node, after, c) }
            return nil
        }
        #expect(sends.count == 1)
        #expect(sends.first?.0 == target && sends.first?.1 == .milliseconds(15))
        #expect(sends.first?.2.candidates == [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 6000))] && sends.first?.2.role == .target)
    }

    @Test("a forwarded punch request naming port 0 as the initiator's last allocated port is refused where it is decoded")
    func remoteRequestLastPortZero() throws {
        var request = RemotePunchRequest(requestID: 3, sessionID: "s3", sessionKey: Array(repeating: 1, count: 32),
                                         initiator: ClusterIdentities.a.nodeID, target: ClusterIdentities.b.nodeID,
                                         candidates: [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 6000))], nat: .unknown,
                                         initiatorRTTMicroseconds: 1_000, directoryRTTMicroseconds: 1_000, lastAllocatedPort: 0)
        let encoded = try JSONEncoder().encode(request)
        #expect(throws: RendezvousError.self) { try JSONDecoder().decode(RemotePunchRequest.self, from: encoded) }
        request.lastAllocatedPort = 20_001
        #expect(try JSONDecoder().decode(RemotePunchRequest.self, from: JSONEncoder().encode(request)).lastAllocatedPort == 20_001)
    }

    @Test("a requester RTT or directory round trip over the 60 s message limit is capped: the forwarded request validates")
    func forwardedRTTsCapped() throws {
        // A round trip measured across a suspended process (or a peer that delays its pong) exceeds the limit the
        // holding instance checks; uncapped, every later routed request from this instance would be dropped there.
        var state = RendezvousState()
        let node = ClusterIdentities.a.nodeID
        _ = state.register(node: node, connection: 1, observed: .loopbackV4(port: 5000), registration: Registration(), now: .zero)
        state.rttSample(node: node, rtt: .seconds(61))
        let lookup = state.prepareRemotePunch(from: node, requestID: 1, target: ClusterIdentities.b.nodeID,
                                              secret: SessionSecret(id: "s3", key: Array(repeating: 1, count: 32)),
                                              directoryRTT: .seconds(90), now: .zero)
        guard case .forward(let request) = lookup else { Issue.record("refused: \(lookup)"); return }
        #expect(throws: Never.self) { try request.validate() }
        #expect(request.initiatorRTTMicroseconds == RendezvousMessageLimits.maxRTTMicroseconds)
        #expect(request.directoryRTTMicroseconds == RendezvousMessageLimits.maxRTTMicroseconds)
    }

    @Test("a target not held here is refused with unknownTarget, carrying the request id")
    func remoteUnknown() {
        var state = RendezvousState()
        let request = RemotePunchRequest(requestID: 4, sessionID: "s2", sessionKey: Array(repeating: 1, count: 32),
                                         initiator: ClusterIdentities.a.nodeID, target: ClusterIdentities.b.nodeID,
                                         candidates: [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 6000))], nat: .unknown,
                                         initiatorRTTMicroseconds: nil, directoryRTTMicroseconds: 0)
        let (actions, reply) = state.acceptRemotePunch(request, now: .zero)
        #expect(actions.isEmpty)
        guard case .refused(let error) = reply else { Issue.record("not refused"); return }
        #expect(error.code == RendezvousError.Code.unknownTarget.name && error.requestID == 4)
    }
}

/// Run with the other timing suites (Makefile `TIMING_SUITES`), not beside the load tests.
@Suite("Cluster start skew", .serialized)
struct ClusterStartSkewTests {
    @Test("clock-free start across instances: 40 ms and 2 ms one-way delays at two instances, both peers start within 10 ms")
    func startSkewAcrossInstances() async throws {
        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        let cluster = Cluster(nats: nats)
        let far = ClusterIdentities.a.nodeID
        try await cluster.addInstance(linkDelay: { $0 == far ? .milliseconds(40) : .zero })
        try await cluster.addInstance(linkDelay: { _ in .milliseconds(2) })
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        let sampled = await eventually(.seconds(10)) {
            let samplesA = await cluster.servers[0].rttSamples(of: ClusterIdentities.a.nodeID)
            let samplesB = await cluster.servers[1].rttSamples(of: ClusterIdentities.b.nodeID)
            return samplesA >= 4 && samplesB >= 4
        }
        #expect(sampled)
        // Uncompensated, B (the target, 4 ms away) would start (80 − 4)/2 = 38 ms before A (80 ms away). The first
        // request also gives the requesting instance its NATS round-trip estimate.
        var skews: [Duration] = []
        for round in 0..<4 {
            let targetStart = Task { () -> ContinuousClock.Instant? in
                for await punch in b.incomingPunches {
                    _ = await b.executor.cancel(punch.handle.id)
                    return punch.coordinate.startAt
                }
                return nil
            }
            let received = try await a.coordinate(to: ClusterIdentities.b.nodeID)
            _ = await a.executor.cancel((await a.startPunch(received)).id)
            let startB = try #require(await targetStart.value, "round \(round)")
            if round > 0 { skews.append(received.startAt > startB ? received.startAt - startB : startB - received.startAt) }
        }
        let median = skews.sorted()[skews.count / 2]
        #expect(median < .milliseconds(10), "start skews \(skews)")
        #expect(skews.allSatisfy { $0 < .milliseconds(25) }, "start skews \(skews)")
        #expect(await cluster.servers[0].statistics().routedCoordinations == 4)
        await cluster.stop()
    }
}
