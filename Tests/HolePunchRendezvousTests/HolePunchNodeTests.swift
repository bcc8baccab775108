import HolePunchNet
import HolePunch
import HolePunchQUIC
import HolePunchStrategy
import Logging
import ProcessTestSupport
import ServiceLifecycle
import Testing
@testable import HolePunchRendezvous

@Suite("HolePunchNode on loopback", .serialized)
struct HolePunchNodeTests {
    static func node(
        _ identity: Identity, _ harness: Harness, admission: PunchAdmission = .none, alpns: [String] = ["holepunch/1"],
        punchTimeout: Duration? = nil
    ) async throws -> HolePunchNode {
        try await HolePunchNode.start(
            identity: identity, rendezvous: harness.server.address, rendezvousID: harness.server.nodeID,
            options: .init(bind: .loopbackV4(port: 0), admission: admission, alpns: alpns, punchTimeout: punchTimeout))
    }

    /// The first connection `node.incoming` yields, or nil when the stream ends.
    static func firstIncoming(_ node: HolePunchNode) async throws -> QUICConnection? {
        for try await connection in node.incoming { return connection }
        return nil
    }

    /// Starts A's connect to B (B's default admission refuses the punch, so it runs towards A's 60 s punch timeout),
    /// runs `interrupt` once the punch is under way, and returns the error connect ended with (within 3 s); expects
    /// the punch gone by then.
    static func interruptedConnect(
        _ interrupt: (HolePunchNode, Task<QUICConnection, any Error>) async -> Void,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws -> (any Error)? {
        let harness = try await Harness.start()
        let b = try await node(Identities.b, harness)
        let a = try await node(Identities.a, harness, punchTimeout: .seconds(60))
        let request = Task { try await a.connect(to: Identities.b.nodeID) }
        #expect(await eventually(.seconds(10)) { await a.executor.activePunches().count == 1 }, sourceLocation: sourceLocation)
        await interrupt(a, request)
        let result = try await withDeadline(.seconds(3)) { await request.result }
        var failure: (any Error)?
        if case .failure(let error) = result { failure = error } else { Issue.record("expected a failure", sourceLocation: sourceLocation) }
        #expect(await a.executor.activePunches().isEmpty, sourceLocation: sourceLocation)
        await a.stop()
        await b.stop()
        await harness.stop()
        return failure
    }

    @Test("two nodes: A connects to B by NodeID with a chosen ALPN, a line goes each way, stop ends incoming")
    func connectAndIncoming() async throws {
        let harness = try await Harness.start()
        let b = try await Self.node(Identities.b, harness, admission: .allowList([Identities.a.nodeID]),
                                    alpns: ["chat/1", "file/1"])
        let a = try await Self.node(Identities.a, harness, alpns: ["chat/1", "file/1"])
        let accepted = Task { try await Self.firstIncoming(b) }
        let connection = try await withDeadline(.seconds(20)) { try await a.connect(to: Identities.b.nodeID, alpn: "file/1") }
        let inbound = try #require(try await withDeadline(.seconds(20)) { try await accepted.value })
        #expect(connection.peerNodeID == Identities.b.nodeID)
        #expect(inbound.peerNodeID == Identities.a.nodeID)
        #expect(connection.alpn == "file/1")
        #expect(inbound.alpn == "file/1")

        let stream = try await connection.openStream()
        try await stream.write(Array("hello from A\n".utf8))
        let incoming = try #require(try await inbound.acceptStream())
        #expect(String(decoding: try #require(try await incoming.read()), as: UTF8.self) == "hello from A\n")
        try await incoming.write(Array("hello from B\n".utf8))
        #expect(String(decoding: try #require(try await stream.read()), as: UTF8.self) == "hello from B\n")

        await b.stop()
        // After stop the stream ends without an error, and the node refuses new work.
        #expect(try await withDeadline(.seconds(5)) { try await Self.firstIncoming(b) } == nil)
        let stopped = await #expect(throws: NodeError.self) { _ = try await b.connect(to: Identities.a.nodeID) }
        #expect(stopped?.code == .stopped)
        await a.stop()
        await harness.stop()
    }

    @Test("a node measures its NAT after registering, in the background, and registers again with the profile")
    func discoversNATInTheBackground() async throws {
        let harness = try await Harness.start(stun: true)
        let node = try await Self.node(Identities.a, harness)
        // start() returned with the registration; discovery's outcome arrives later and is published.
        let result = try await withDeadline(.seconds(20)) { await node.rendezvousClient.natDiscoveryResult() }
        let behaviour = try #require(result).get()
        #expect(await node.rendezvousClient.natProfile == NATProfile(behaviour))
        #expect(await node.rendezvousClient.natProfile != .unknown)

        // Told not to, a node starts no discovery.
        let quiet = try await HolePunchNode.start(
            identity: Identities.b, rendezvous: harness.server.address, rendezvousID: harness.server.nodeID,
            options: .init(bind: .loopbackV4(port: 0), discoversNAT: false))
        #expect(await quiet.rendezvousClient.natDiscoveryResult() == nil)
        await quiet.stop()
        await node.stop()
        await harness.stop()
    }

    @Test("default admission: a node lets nobody punch in; the caller's punch fails, nothing arrives")
    func defaultAdmissionRefuses() async throws {
        let harness = try await Harness.start()
        let b = try await Self.node(Identities.b, harness)
        let a = try await Self.node(Identities.a, harness, punchTimeout: .seconds(1))
        let error = await #expect(throws: NodeError.self) {
            _ = try await withDeadline(.seconds(20)) { try await a.connect(to: Identities.b.nodeID) }
        }
        #expect(error?.code == .timeout, "\(String(describing: error))")
        #expect(error?.punch != nil)
        #expect(await b.rendezvousClient.refusedCoordinates == 1)
        await a.stop()
        await b.stop()
        await harness.stop()
    }

    @Test("an ALPN the node does not list is refused before anything is sent; an unknown NodeID is unknownTarget")
    func refusals() async throws {
        let harness = try await Harness.start()
        let a = try await Self.node(Identities.a, harness)
        let alpn = await #expect(throws: NodeError.self) { _ = try await a.connect(to: Identities.b.nodeID, alpn: "other/1") }
        #expect(alpn?.code == .unsupportedALPN)
        let unknown = await #expect(throws: NodeError.self) { _ = try await a.connect(to: Identities.c.nodeID) }
        #expect(unknown?.code == .unknownTarget)
        #expect(unknown?.description.hasPrefix("unknownTarget: ") == true)
        await a.stop()
        await harness.stop()
    }

    @Test("cancelling connect's task: cancelled, the punch stops")
    func cancelConnect() async throws {
        let failure = try await Self.interruptedConnect { _, request in request.cancel() }
        #expect((failure as? NodeError)?.code == .cancelled, "\(String(describing: failure))")
    }

    @Test("as a Service: graceful shutdown of its ServiceGroup stops the node")
    func service() async throws {
        let harness = try await Harness.start()
        let a = try await Self.node(Identities.a, harness)
        let group = ServiceGroup(services: [a], logger: Logger(label: "test"))
        let running = Task { try await group.run() }
        await group.triggerGracefulShutdown()
        try await withDeadline(.seconds(10)) { try await running.value }
        #expect(try await withDeadline(.seconds(5)) { try await Self.firstIncoming(a) } == nil)
        let error = await #expect(throws: NodeError.self) { _ = try await a.connect(to: Identities.b.nodeID) }
        #expect(error?.code == .stopped)
        await harness.stop()
    }

    @Test("a node whose protocols GnuTLS cannot carry (9 names, an empty or a 32-byte name) is refused at start",
          arguments: [(1...9).map { "p/\($0)" }, [""], [String(repeating: "p", count: 32)]])
    func unusableALPNsRefused(_ alpns: [String]) async throws {
        let harness = try await Harness.start()
        let error = await #expect(throws: NodeError.self) {
            let node = try await Self.node(Identities.a, harness, alpns: alpns)
            await node.stop()
        }
        #expect(error?.code == .unsupportedALPN, "\(String(describing: error))")
        await harness.stop()
    }

    @Test("cancelling start's task while the rendezvous has not confirmed the registration: cancelled at once")
    func cancelStart() async throws {
        // A QUIC endpoint posing as the rendezvous: the handshake succeeds, the register request is never answered.
        let silent = try await Endpoint.bind(.loopbackV4(port: 0),
                                             configuration: EndpointConfiguration(identity: Identities.c, acceptPolicy: .any))
        let registerArrived = Task { () -> Bool in
            for await connection in silent.incoming {
                guard let stream = try? await connection.acceptStream() else { return false }
                return (try? await stream.read()) != nil
            }
            return false
        }
        let start = Task {
            try await HolePunchNode.start(identity: Identities.a, rendezvous: silent.localAddress,
                                          rendezvousID: Identities.c.nodeID,
                                          options: .init(bind: .loopbackV4(port: 0), requestTimeout: .seconds(60)))
        }
        #expect(try await withDeadline(.seconds(10)) { await registerArrived.value })
        start.cancel()
        // Far below the request timeout: a registration wait that ignored the cancellation would outlast this.
        let result = try await withDeadline(.seconds(3)) { await start.result }
        guard case .failure(let failure) = result else { Issue.record("expected a failure, got a node"); return }
        #expect((failure as? NodeError)?.code == .cancelled, "\(failure)")
        await silent.close()
    }

    @Test("stop() while connect is punching: connect ends with stopped, not a cancellation the caller never asked for")
    func stopDuringConnect() async throws {
        let failure = try await Self.interruptedConnect { a, _ in await a.stop() }
        #expect((failure as? NodeError)?.code == .stopped, "\(String(describing: failure))")
    }

    @Test("incoming holds at most incomingBuffer unread connections: beyond it the oldest is closed, not kept")
    func incomingIsBounded() async throws {
        // One punch per buffered connection plus one: the rendezvous's request rate must not be what stops them.
        let harness = try await Harness.start(state: .init(startDelay: .milliseconds(10), rateBurst: 1000, ratePerSecond: 1000,
                                                           targetRateBurst: 1000, targetRatePerSecond: 1000))
        let b = try await Self.node(Identities.b, harness, admission: .allowList([Identities.a.nodeID]))
        let a = try await Self.node(Identities.a, harness)
        var outgoing: [QUICConnection] = []
        for _ in 0...HolePunchNode.incomingBuffer {
            outgoing.append(try await withDeadline(.seconds(20)) { try await a.connect(to: Identities.b.nodeID) })
        }
        // B never read: the first connection is the one dropped, and A sees it closed.
        let first = outgoing[0]
        _ = try await withDeadline(.seconds(20)) { await first.waitClosed() }
        // The rest wait in order: the session in each TLS server name pairs both sides' connections.
        let buffered = try await withDeadline(.seconds(10)) { () -> [String?] in
            var names: [String?] = []
            for try await connection in b.incoming {
                names.append(connection.serverName)
                if names.count == HolePunchNode.incomingBuffer { break }
            }
            return names
        }
        #expect(buffered == outgoing.dropFirst().map(\.serverName))
        #expect(Set(buffered).count == HolePunchNode.incomingBuffer)
        await b.stop()
        await a.stop()
        await harness.stop()
    }
}
