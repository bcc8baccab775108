import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy
import Logging
import ProcessTestSupport
import Synchronization
import Testing
@testable import HolePunchRendezvous

/// The log lines a node writes, for asserting what it said (and how often).
final class NodeLogLines: Sendable {
    private let lines = Mutex<[String]>([])

    var all: [String] { lines.withLock { $0 } }

    var logger: Logger {
        Logger(label: "node", factory: { _ in
            ClosureLogHandler { _, message, _ in self.lines.withLock { $0.append(message) } }
        })
    }
}

/// The built-in plan with `relay = .first` whenever the peer published a relayed address (until strategies say it
/// themselves); `directPorts` aims every direct probe at those ports instead (a silent socket: no direct path).
struct RelayFirstStrategy: PunchStrategy {
    let name = "relay-first-test"
    /// The plan's `relay` whenever the peer published a relayed address.
    var use: RelayUse = .first
    /// Where direct probes go, one a round, in order (nil: the built-in plan's ports).
    var directPorts: [UInt16]?
    var interval: Duration = .milliseconds(300)
    var timeout: Duration = .seconds(3)
    /// Probe rounds with `directPorts`: few make the punch end early (`allPortsFailed`), as macula.lua's do in the lab.
    var rounds = 50

    func plan(_ ctx: PunchContext) -> PunchPlan {
        var plan = DefaultStrategy().plan(ctx)
        if ctx.relayAvailable { plan.relay = use }
        if let directPorts {
            plan.ports = PortList(ports: directPorts)
            plan.packetsPerRound = 1
            plan.interval = interval
            plan.rounds = rounds
            plan.dialCandidatesDirectly = false
            plan.timeout = timeout
        }
        return plan
    }
}

/// A UDP path to `target` that drops everything until ``open()``: the direct pair of a relay-first test, so that
/// the test decides when the punch can prove it. It forwards between the last sender that is not `target` and
/// `target`, on its own thread, until ``close()``.
final class GatedForwarder: Sendable {
    let socket: UDPDatagramSocket
    let target: SocketAddress
    private let state = Mutex<(open: Bool, closed: Bool, client: SocketAddress?)>((false, false, nil))

    init(to target: SocketAddress) throws {
        socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        self.target = target
        Thread { [self] in
            while !state.withLock({ $0.closed }) {
                guard let (bytes, from) = socket.receive(timeoutMilliseconds: 50) else { continue }
                let (open, client) = state.withLock { state in
                    if from != target { state.client = from }
                    return (state.open, state.client)
                }
                guard open, let destination = from == target ? client : target else { continue }
                _ = try? socket.send(bytes, to: destination)
            }
        }.start()
    }

    var port: UInt16 { socket.localAddress.port }
    func open() { state.withLock { $0.open = true } }
    func close() { state.withLock { $0.closed = true } }
}

/// A node granted TURN by its rendezvous allocates on its punch socket and publishes the relayed address
/// (issue 15 item 3, docs/relay.md "The node's allocation").
@Suite("A node's TURN allocation", .serialized)
struct NodeRelayTests {
    static func rendezvous(turn servers: [SocketAddress], ttl: Duration = .seconds(600)) async throws -> Harness {
        var configuration = RendezvousServerConfiguration(listen: .loopbackV4(port: 0), identity: Identities.server,
                                                          housekeepingInterval: .milliseconds(100))
        configuration.turn = TURNMinting(servers: servers, secret: Array(Coturn.secret.utf8), ttl: ttl)
        let server = try await RendezvousServer.bind(configuration: configuration)
        return Harness(server: server, task: Task { try await server.run() })
    }

    /// Runs `body` with coturn on loopback and an in-process rendezvous granting it; skips when coturn is absent.
    static func withCoturn(_ body: (Harness, Coturn) async throws -> Void) async throws {
        guard Coturn.available else { return }
        let coturn = try await TURNGrantTests.coturn()
        defer { coturn.stop() }
        let harness = try await rendezvous(turn: [.loopbackV4(port: coturn.port)])
        defer { harness.task.cancel() }
        try await body(harness, coturn)
    }

    static func node(_ identity: Identity, _ harness: Harness, admission: PunchAdmission = .none,
                     strategy: (any PunchStrategy)? = nil,
                     logger: Logger = Logger(label: "quiet", factory: { _ in SwiftLogNoOpLogHandler() }))
        async throws -> HolePunchNode
    {
        // No host candidates: the observed address is the one direct candidate, so a strategy controls where
        // direct probes go.
        try await HolePunchNode.start(
            identity: identity, rendezvous: harness.server.address, rendezvousID: harness.server.nodeID,
            options: .init(bind: .loopbackV4(port: 0), strategy: strategy, admission: admission, lanAddresses: [],
                           logger: logger, discoversNAT: false))
    }

    static func payload(_ size: Int) -> [UInt8] {
        (0..<size).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
    }

    /// Sends `payload` on a new stream of `connection`; returns what `peer` read from that stream (within 30 s).
    static func transfer(_ payload: [UInt8], over connection: QUICConnection, to peer: QUICConnection) async throws -> [UInt8]? {
        let reader = Task { try await peer.acceptStream()?.readToEnd(limit: payload.count + 1) }
        let stream = try await connection.openStream()
        try await stream.write(payload)
        try await stream.finish()
        return try await withDeadline(.seconds(30)) { try await reader.value }
    }

    static func firstIncoming(_ node: HolePunchNode) async throws -> QUICConnection? {
        for try await connection in node.incoming { return connection }
        return nil
    }

    @Test("the node renews its TURN credentials, and its allocation outlives the first ones' expiry")
    func allocationOutlivesTheFirstCredentials() async throws {
        guard Coturn.available else { return }
        let coturn = try await TURNGrantTests.coturn()
        defer { coturn.stop() }
        // Credentials for 3 s: the node renews them after 1 s; the allocation is refreshed every 500 ms.
        let harness = try await Self.rendezvous(turn: [.loopbackV4(port: coturn.port)], ttl: .seconds(3))
        defer { harness.task.cancel() }
        let log = NodeLogLines()
        var options = HolePunchNode.Options(bind: .loopbackV4(port: 0), lanAddresses: [], logger: log.logger,
                                            discoversNAT: false)
        options.relayConfiguration.maximumRefreshInterval = .milliseconds(500)
        options.relayConfiguration.initialRTO = .milliseconds(100)
        options.relayConfiguration.transactionTimeout = .seconds(2)
        let node = try await HolePunchNode.start(identity: Identities.a, rendezvous: harness.server.address,
                                                 rendezvousID: harness.server.nodeID, options: options)
        #expect(await node.relayedAddress() != nil, "\(log.all)")
        let expiry = try #require(node.registration.turn?.credentials.restExpiry)
        let client = try #require(await node.relay?.client)
        let outlived = await eventually(.seconds(15)) {
            Int64(Date().timeIntervalSince1970) > expiry + 2 && client.counters.refreshes >= 6
        }
        #expect(outlived, "\(client.counters)")
        await #expect(throws: Never.self, "the allocation ended: \(log.all)") {
            try await client.createPermission(for: .loopbackV4(port: 9))
        }
        #expect(!log.all.contains("TURN allocation ended"), "\(log.all)")
        await node.stop()
    }

    @Test("relay first: the punch returns the connection through coturn at once, which moves to the direct path mid-transfer and back to the relay when the direct path dies, with every byte in order")
    func relayFirstThenDirect() async throws {
        try await Self.withCoturn { harness, _ in
            // A's probes never reach B, and B's reach A only through a forwarder the test opens after the first part of
            // the transfer: that part runs over the relay, the rest after the move.
            let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
            let log = NodeLogLines()
            let a = try await Self.node(Identities.a, harness, admission: .any,
                                        strategy: RelayFirstStrategy(directPorts: [silent.localAddress.port], timeout: .seconds(15)),
                                        logger: log.logger)
            let relayedA = try #require(await a.relayedAddress(), "\(log.all)")
            let gate = try GatedForwarder(to: a.endpoint.localAddress)
            defer { gate.close() }
            let b = try await Self.node(Identities.b, harness, strategy: RelayFirstStrategy(directPorts: [gate.port], timeout: .seconds(15)))
            let connection = try await b.connect(to: Identities.a.nodeID)
            #expect(connection.remoteAddress == relayedA, "the punch's result is the relayed connection")
            let changes = await connection.pathChanges()
            let peer = try #require(try await withDeadline(.seconds(10)) { try await Self.firstIncoming(a) })

            let payload = Self.payload(3 << 20)
            let third = 64 << 10
            let reader = Task { try await peer.acceptStream()?.readToEnd(limit: 8 << 20) }
            let stream = try await connection.openStream()
            try await stream.write(Array(payload[..<third]))
            try await stream.delivered()
            let early = await connection.paths()
            #expect(early.contains { $0.isActive && $0.route == .direct(relayedA) }, "still relayed after the first part: \(early)")
            gate.open()

            let move = try await withDeadline(.seconds(15)) { () -> PathChange? in
                for await change in changes where change.to != .direct(relayedA) { return change }
                return nil
            }
            #expect(move?.from == .direct(relayedA))
            #expect(move?.to == .direct(SocketAddress.loopbackV4(port: gate.port)))
            try await stream.write(Array(payload[third...]))
            try await stream.finish()
            let received = try #require(try await withDeadline(.seconds(30)) { try await reader.value })
            #expect(received.count == payload.count)
            #expect(received == payload, "bytes lost or reordered across the move")
            let after = await connection.paths()
            #expect(after.contains { $0.isActive && !$0.route.isRelayed && $0.route != .direct(relayedA) }, "\(after)")
            #expect(after.contains { $0.route == .direct(relayedA) }, "the relay path stays in the table: \(after)")

            // The direct path dies: the next data goes unanswered there, and the connection moves back to the relay.
            let backChanges = await connection.pathChanges()
            gate.close()
            let again = Self.payload(512 << 10)
            let secondReader = Task { try await peer.acceptStream()?.readToEnd(limit: 1 << 20) }
            let second = try await connection.openStream()
            try await second.write(again)
            try await second.finish()
            let back = try await withDeadline(.seconds(20)) { () -> PathChange? in
                for await change in backChanges where change.to == .direct(relayedA) { return change }
                return nil
            }
            #expect(back?.reason == .pathFailed, "\(String(describing: back))")
            #expect(try await withDeadline(.seconds(30)) { try await secondReader.value } == again, "bytes lost moving back")
            await b.stop()
            await a.stop()
        }
    }

    @Test("relay first, or after 500 ms without a direct path, with no direct path: the connection is relayed and carries data after the punch gave up",
          arguments: [RelayUse.first, .after(.milliseconds(500))])
    func relayFirstStaysRelayed(use: RelayUse) async throws {
        try await Self.withCoturn { harness, _ in
            // Every direct probe, both ways, goes to a socket that never answers.
            let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
            let blocked = RelayFirstStrategy(use: use, directPorts: [silent.localAddress.port])
            let a = try await Self.node(Identities.a, harness, admission: .any, strategy: blocked)
            let relayedA = try #require(await a.relayedAddress())
            let b = try await Self.node(Identities.b, harness, strategy: blocked)
            let connection = try await b.connect(to: Identities.a.nodeID)
            #expect(connection.remoteAddress == relayedA)
            let peer = try #require(try await withDeadline(.seconds(10)) { try await Self.firstIncoming(a) })
            // Past both punches' 3 s timeout: nothing proved a direct pair, and the connection is still the relayed one.
            #expect(await eventually(.seconds(10)) {
                let (left, right) = (await b.executor.activePunches(), await a.executor.activePunches())
                return left.isEmpty && right.isEmpty
            })
            let payload = Self.payload(256 << 10)
            #expect(try await Self.transfer(payload, over: connection, to: peer) == payload)
            let paths = await connection.paths()
            #expect(paths.filter(\.isActive).map(\.route) == [.direct(relayedA)], "\(paths)")
            await b.stop()
            await a.stop()
        }
    }

    @Test("punch, then relay (macula's order): the target's punch ran out of rounds long before the initiator dials the relay, and the connection is relayed all the same")
    func relayAfterTheTargetGaveUp() async throws {
        try await Self.withCoturn { harness, _ in
            // No direct path either way. The target's 3 rounds of 300 ms end its punch (allPortsFailed) after ~0.9 s;
            // the initiator probes on and dials the relay at 2 s. As in the lab, only the target allocates.
            let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
            let after = RelayUse.after(.seconds(2))
            let target = RelayFirstStrategy(use: after, directPorts: [silent.localAddress.port], rounds: 3)
            let a = try await Self.node(Identities.a, harness, admission: .any, strategy: target)
            let relayedA = try #require(await a.relayedAddress())
            var options = HolePunchNode.Options(bind: .loopbackV4(port: 0), strategy: RelayFirstStrategy(use: after, directPorts: [silent.localAddress.port]),
                                                lanAddresses: [], discoversNAT: false)
            options.usesRelay = false
            let b = try await HolePunchNode.start(identity: Identities.b, rendezvous: harness.server.address,
                                                  rendezvousID: harness.server.nodeID, options: options)
            let connection = try await b.connect(to: Identities.a.nodeID)
            #expect(connection.remoteAddress == relayedA, "the punch's result is the relayed connection")
            let peer = try #require(try await withDeadline(.seconds(10)) { try await Self.firstIncoming(a) })
            let payload = Self.payload(64 << 10)
            #expect(try await Self.transfer(payload, over: connection, to: peer) == payload)
            #expect(await eventually(.seconds(10)) { await a.executor.activePunches().isEmpty })
            await b.stop()
            await a.stop()
        }
    }

    @Test("a node granted TURN allocates at coturn on its punch socket and the rendezvous accepts its relay candidate")
    func allocatesAndPublishes() async throws {
        try await Self.withCoturn { harness, coturn in
            let log = NodeLogLines()
            let a = try await Self.node(Identities.a, harness, admission: .any, logger: log.logger)
            let b = try await Self.node(Identities.b, harness)
            let relayed = try #require(await a.relayedAddress(), "no allocation: \(log.all)")
            #expect(relayed.host == "127.0.0.1" && relayed.port != coturn.port)
            #expect(await a.rendezvousClient.relayCandidates == [Candidate(kind: .relayed, address: relayed)])
            // The rendezvous stored it, so another peer's coordinate carries it.
            let stored = await harness.server.state.peer(Identities.a.nodeID)?.registration.candidates ?? []
            #expect(stored.contains(Candidate(kind: .relayed, address: relayed)), "\(stored)")
            #expect(!log.all.contains { $0.contains("refused") }, "\(log.all)")
            // Punching works as before beside the allocation (the executor still reads the probes).
            let connection = try await b.connect(to: Identities.a.nodeID)
            #expect(connection.peerNodeID == Identities.a.nodeID)
            await b.stop()
            await a.stop()
        }
    }

    @Test("the allocation's mapping is the last port the node's NAT allocated: the node publishes it (a sequential NAT's peer counts from it)")
    func publishesTheAllocationsMappedPort() async throws {
        try await Self.withCoturn { harness, _ in
            let a = try await Self.node(Identities.a, harness)
            _ = try #require(await a.relayedAddress())
            // On loopback coturn sees the punch socket itself; behind a sequential NAT it sees the mapping made after
            // the registration's, which the peer's port prediction must start from (lab: symmetric_seq pairs).
            let stored = await harness.server.state.peer(Identities.a.nodeID)?.registration
            #expect(stored?.lastAllocatedPort == a.endpoint.localAddress.port, "\(String(describing: stored))")
            await a.stop()
        }
    }

    @Test("TURN server down: the node starts at once, punches only, and says so in one log line")
    func serverDownPunchesOnly() async throws {
        // A port nothing answers on: our own bound socket that never reads.
        let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let harness = try await Self.rendezvous(turn: [silent.localAddress])
        defer { harness.task.cancel() }
        let log = NodeLogLines()
        let a = try await Self.node(Identities.a, harness, admission: .any, logger: log.logger)
        let b = try await Self.node(Identities.b, harness)
        // The start did not wait for the allocation; the punch works meanwhile.
        let connection = try await b.connect(to: Identities.a.nodeID)
        #expect(connection.peerNodeID == Identities.a.nodeID)
        #expect(await a.relayedAddress() == nil)
        #expect(log.all.filter { $0 == "TURN allocation failed; punching only" }.count == 1, "\(log.all)")
        #expect(await a.rendezvousClient.relayCandidates.isEmpty)
        await b.stop()
        await a.stop()
    }
}
