import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
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
        Logger(label: "node", factory: { _ in Handler(sink: self) })
    }

    struct Handler: LogHandler {
        let sink: NodeLogLines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            sink.lines.withLock { $0.append(event.message.description) }
        }
    }
}

/// A node granted TURN by its rendezvous allocates on its punch socket and publishes the relayed address
/// (issue 15 item 3, docs/relay.md "The node's allocation").
@Suite("A node's TURN allocation", .serialized)
struct NodeRelayTests {
    static func rendezvous(turn servers: [SocketAddress]) async throws -> Harness {
        var configuration = RendezvousServerConfiguration(listen: .loopbackV4(port: 0), identity: Identities.server,
                                                          housekeepingInterval: .milliseconds(100))
        configuration.turn = TURNMinting(servers: servers, secret: Array(Coturn.secret.utf8))
        let server = try await RendezvousServer.bind(configuration: configuration)
        return Harness(server: server, task: Task { try await server.run() })
    }

    static func node(_ identity: Identity, _ harness: Harness, admission: PunchAdmission = .none,
                     logger: Logger = Logger(label: "quiet", factory: { _ in SwiftLogNoOpLogHandler() }))
        async throws -> HolePunchNode
    {
        try await HolePunchNode.start(
            identity: identity, rendezvous: harness.server.address, rendezvousID: harness.server.nodeID,
            options: .init(bind: .loopbackV4(port: 0), admission: admission, logger: logger, discoversNAT: false))
    }

    @Test("a node granted TURN allocates at coturn on its punch socket and the rendezvous accepts its relay candidate")
    func allocatesAndPublishes() async throws {
        guard Coturn.available else { return }
        let coturn = try await TURNGrantTests.coturn()
        defer { coturn.stop() }
        let harness = try await Self.rendezvous(turn: [.loopbackV4(port: coturn.port)])
        defer { harness.task.cancel() }
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
