import Foundation
import HolePunch
@testable import HolePunchCluster
import HolePunchQUIC
import HolePunchNet
import HolePunchRendezvous
import ProcessTestSupport
import Testing

enum ClusterIdentities {
    static let instance = try! Identity.generate(commonName: "cluster-instance")
    static let a = try! Identity.generate(commonName: "cluster-a")
    static let b = try! Identity.generate(commonName: "cluster-b")
    static let c = try! Identity.generate(commonName: "cluster-c")
}

/// A `nats-server` child on 127.0.0.1 (a port it picks, or the one given), killed by PID.
final class NATSServerProcess: @unchecked Sendable {
    // @unchecked Sendable: set once in init, then only read.
    let child: Child
    let port: Int
    var url: String { "nats://127.0.0.1:\(port)" }

    /// Nil (with a note) when nats-server is not installed.
    static func startOrSkip(port: Int? = nil) async throws -> NATSServerProcess? {
        guard let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            print("skipped: nats-server is not installed (make deps installs it)")
            return nil
        }
        return try await NATSServerProcess(binary: binary, port: port)
    }

    private init(binary: String, port: Int?) async throws {
        let dir = try scratchDirectory("nats")
        let child = try Child(binary, ["-a", "127.0.0.1", "-p", String(port ?? -1)], directory: dir)
        self.child = child
        let ready = await eventually(.seconds(10)) { child.stderr.text.contains("Server is ready") }
        if !ready { child.stop() }
        try #require(ready, "nats-server did not start: \(child.stderr.text)")
        let text = child.stderr.text
        let line = try #require(text.split(separator: "\n").first { $0.contains("Listening for client connections on") })
        self.port = try #require(line.split(separator: ":").last.flatMap { Int($0) })
    }

    func stop() { child.stop() }

    /// A test that fails half-way still leaves no nats-server behind.
    deinit { child.stop() }
}

/// Rendezvous instances sharing one NATS, each with its own directory, and clients registered at them.
final class Cluster: @unchecked Sendable {
    // @unchecked Sendable: the arrays are only touched by the test's own task.
    let nats: NATSServerProcess
    let prefix = "t\(UInt32.random(in: 0...UInt32.max))"
    var servers: [RendezvousServer] = []
    var directories: [NATSDirectory] = []
    var tasks: [Task<Void, any Error>] = []
    var clients: [RendezvousClient] = []
    static let ttl = Duration.seconds(3)

    init(nats: NATSServerProcess) { self.nats = nats }

    /// A NATS server and `instances` instances joined through it; nil (skipped) without nats-server.
    static func startOrSkip(instances: Int) async throws -> Cluster? {
        guard let nats = try await NATSServerProcess.startOrSkip() else { return nil }
        let cluster = Cluster(nats: nats)
        for _ in 0..<instances { try await cluster.addInstance() }
        return cluster
    }

    func configuration() -> NATSDirectoryConfiguration {
        NATSDirectoryConfiguration(url: nats.url, subjectPrefix: prefix, connectTimeout: .seconds(2),
                                   requestTimeout: .seconds(2), reconnectWait: .milliseconds(100),
                                   pingInterval: .milliseconds(500))
    }

    @discardableResult
    func addInstance(linkDelay: (@Sendable (NodeID) -> Duration)? = nil) async throws -> RendezvousServer {
        let server = try await RendezvousServer.bind(configuration: RendezvousServerConfiguration(
            listen: .loopbackV4(port: 0), identity: ClusterIdentities.instance,
            state: .init(registrationTTL: Self.ttl, rateBurst: 100), housekeepingInterval: .milliseconds(100), linkDelay: linkDelay))
        let directory = try NATSDirectory.connect(configuration())
        await server.use(directory: directory)
        servers.append(server)
        directories.append(directory)
        tasks.append(Task { try await server.run() })
        return server
    }

    func client(_ identity: Identity, at server: RendezvousServer) async throws -> RendezvousClient {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
        let client = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: server.address, serverNodeID: server.nodeID, requestTimeout: .seconds(5), punchTimeout: .seconds(10)))
        clients.append(client)
        _ = try await client.connect()
        return client
    }

    func stop() async {
        for client in clients {
            await client.close()
            await client.executor.shutdown()
            await client.executor.endpoint.close()
        }
        for server in servers { await server.shutdown() }
        for task in tasks { _ = await task.result }
        nats.stop()
    }
}

/// `from` punches to `to` through their rendezvous instances; a line goes each way on the punched connection.
func punchCarriesLine(from: RendezvousClient, to: RendezvousClient) async throws {
    let accepted = Task { () -> QUICConnection? in
        for await connection in to.incoming { return connection }
        return nil
    }
    let target = to.executor.endpoint.nodeID
    let connection = try await withDeadline(.seconds(20)) { try await from.requestPunch(to: target) }
    let inbound = try #require(try await withDeadline(.seconds(20)) { await accepted.value })
    #expect(connection.peerNodeID == target)
    #expect(inbound.peerNodeID == from.executor.endpoint.nodeID)
    let stream = try await connection.openStream()
    try await stream.write(Array("ping\n".utf8))
    let incoming = try #require(try await inbound.acceptStream())
    #expect(try await incoming.read().map { String(decoding: $0, as: UTF8.self) } == "ping\n")
    try await incoming.write(Array("pong\n".utf8))
    #expect(try await stream.read().map { String(decoding: $0, as: UTF8.self) } == "pong\n")
}

@Suite("Rendezvous cluster over NATS", .serialized)
struct ClusterTests {
    @Test("three instances, peers at different ones: punches routed through NATS connect and carry a line")
    func threeInstances() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 3) else { return }
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        let c = try await cluster.client(ClusterIdentities.c, at: cluster.servers[2])
        try await punchCarriesLine(from: a, to: b)
        try await punchCarriesLine(from: c, to: a)
        #expect(await cluster.servers[0].statistics().routedCoordinations == 1)
        #expect(await cluster.servers[1].statistics().coordinations == 1)
        #expect(await cluster.servers[2].statistics().routedCoordinations == 1)
        #expect(await cluster.servers[0].statistics().coordinations == 1)
        await cluster.stop()
    }

    @Test("a NodeID registered at no instance: unknownTarget naming it, from NATS's no-responders status")
    func unknownEverywhere() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 2) else { return }
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        let error = await #expect(throws: RendezvousError.self) {
            _ = try await a.requestPunch(to: ClusterIdentities.c.nodeID)
        }
        #expect(error?.code == .unknownTarget)
        #expect(error?.message.contains(ClusterIdentities.c.nodeID.description) == true)
        // NATS's no-responders status answered, not the directory's request timeout.
        #expect(await cluster.servers[0].statistics().refusals == 1)
        // Asked three times: at once, and after each of the two default retry waits.
        #expect(cluster.directories[0].statistics.noResponders == 3)
        await cluster.stop()
    }

    @Test("a peer that has just registered at one instance is reachable from another at once (its subscription may lag)")
    func justRegistered() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 2) else { return }
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        for round in 0..<20 {
            let fresh = try Identity.generate(commonName: "cluster-fresh-\(round)")
            _ = try await cluster.client(fresh, at: cluster.servers[1])
            do { _ = try await a.coordinate(to: fresh.nodeID) } catch { Issue.record("round \(round): \(error)") }
        }
        #expect(await cluster.servers[1].statistics().coordinations == 20)
        await cluster.stop()
    }

    @Test("a peer moved from instance 1 to 2 is dropped at 1 and reached at 2 only")
    func moved() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 3) else { return }
        _ = try await cluster.client(ClusterIdentities.b, at: cluster.servers[0])
        #expect(await cluster.servers[0].isRegistered(ClusterIdentities.b.nodeID))
        // Instance 1's subscription must have reached NATS for it to hear instance 2's claim (see design-notes.md).
        try cluster.directories[0].flush()
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        let dropped = await eventually(.seconds(5)) { await !cluster.servers[0].isRegistered(ClusterIdentities.b.nodeID) }
        #expect(dropped, "instance 1 still holds the peer that moved to instance 2")
        #expect(await cluster.servers[0].statistics().movedAway == 1)
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[2])
        try await punchCarriesLine(from: a, to: b)
        #expect(await cluster.servers[1].statistics().coordinations == 1)
        #expect(await cluster.servers[0].statistics().coordinations == 0)
        await cluster.stop()
    }

    @Test("an instance dies: its peer re-registers at another and is reachable at once (no stale entry to wait out)")
    func instanceDies() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 3) else { return }
        _ = try await cluster.client(ClusterIdentities.b, at: cluster.servers[0])
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[2])
        await cluster.servers[0].shutdown()
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        try await punchCarriesLine(from: a, to: b)
        #expect(await cluster.servers[1].statistics().coordinations == 1)
        await cluster.stop()
    }

    @Test("NATS restarts: while it is down, routed requests fail at once; instances reconnect, re-subscribe, and routing works again")
    func natsRestarts() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 2) else { return }
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        cluster.nats.stop()
        // While NATS is down, a request for a peer held elsewhere fails at once with a typed error, instead of
        // being buffered by the library and delivered after the reconnect, long after it timed out.
        let refused = await eventually(.seconds(10)) {
            do {
                _ = try await withDeadline(.seconds(5)) { try await a.coordinate(to: ClusterIdentities.b.nodeID) }
                return false
            } catch let error as RendezvousError {
                return error.code == .capacity && error.message.contains("NATS is unreachable")
            } catch { return false }
        }
        #expect(refused, "a request while NATS was down did not fail with capacity")
        guard let restarted = try await NATSServerProcess.startOrSkip(port: cluster.nats.port) else { return }
        defer { restarted.stop() }
        let back = await eventually(.seconds(10)) { cluster.directories.allSatisfy { $0.statistics.reconnects >= 1 } }
        #expect(back, "the instances did not reconnect to the restarted NATS")
        // Re-subscription is asynchronous in the library: the first request may still find no responder.
        let routed = await eventually(.seconds(10)) {
            (try? await withDeadline(.seconds(5)) { try await a.coordinate(to: ClusterIdentities.b.nodeID) }) != nil
        }
        #expect(routed, "no punch request was routed after NATS came back")
        _ = b
        await cluster.stop()
    }

    @Test("a peer that moved while NATS was down is held by the newer instance only, once NATS is back")
    func movedWhileNATSDown() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 2) else { return }
        let node = ClusterIdentities.b.nodeID
        _ = try await cluster.client(ClusterIdentities.b, at: cluster.servers[0])
        cluster.nats.stop()
        // Instance 0 cannot hear this claim now: the library's reconnect buffer, or the claims every instance
        // re-publishes after reconnecting, must settle it once NATS is back.
        _ = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        #expect(await cluster.servers[0].isRegistered(node))
        guard let restarted = try await NATSServerProcess.startOrSkip(port: cluster.nats.port) else { return }
        defer { restarted.stop() }
        let settled = await eventually(.seconds(10)) { await !cluster.servers[0].isRegistered(node) }
        #expect(settled, "the older instance still holds the peer after NATS came back")
        #expect(await cluster.servers[1].isRegistered(node))
        #expect(await cluster.servers[0].statistics().movedAway == 1)
        await cluster.stop()
    }

    @Test("NATS unreachable at start: connect fails with connectionFailed naming the URL")
    func unreachable() async throws {
        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        nats.stop()  // Its port is now free: nothing listens there.
        let url = nats.url
        let error = #expect(throws: RendezvousError.self) {
            _ = try NATSDirectory.connect(NATSDirectoryConfiguration(url: url, connectTimeout: .milliseconds(500)))
        }
        #expect(error?.code == .connectionFailed)
        #expect(error?.message.contains(url) == true)
    }

    @Test("a NATS URL's password never appears in an error: nats://user:secret@… is reported as user:***@…")
    func credentialsRedacted() async throws {
        #expect(redactedNATSURL("nats://alice:s3cret@127.0.0.1:4222") == "nats://alice:***@127.0.0.1:4222")
        #expect(redactedNATSURL("nats://t0ken@127.0.0.1:4222") == "nats://***@127.0.0.1:4222")
        #expect(redactedNATSURL("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222")
        #expect(redactedNATSURL("nats://a:x@127.0.0.1:1,nats://b:y@127.0.0.2:2") == "nats://a:***@127.0.0.1:1,nats://b:***@127.0.0.2:2")

        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        nats.stop()  // Its port is now free: nothing listens there.
        let url = nats.url.replacingOccurrences(of: "nats://", with: "nats://alice:s3cret@")
        let error = #expect(throws: RendezvousError.self) {
            _ = try NATSDirectory.connect(NATSDirectoryConfiguration(url: url, connectTimeout: .milliseconds(500)))
        }
        #expect(error?.code == .connectionFailed)
        #expect(error?.message.contains("alice:***@") == true)
        #expect(error?.message.contains("s3cret") == false)
    }

    @Test("CLI: --cluster to an unreachable NATS exits 1 with one error line; --cluster-optional runs single-instance")
    func cliUnreachable() async throws {
        guard let holepunch = holepunchBinaryOrSkip() else { return }
        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        nats.stop()
        let dir = try scratchDirectory("cluster-cli")
        let failing = try Child(holepunch, ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--cluster", nats.url],
                                directory: dir)
        defer { failing.stop() }
        #expect(await failing.waitExit(.seconds(15)) == 1)
        let lines = failing.stderr.text.split(separator: "\n")
        #expect(lines.first?.hasPrefix("error: cannot connect to NATS at \(nats.url)") == true, "\(failing.stderr.text)")
        #expect(failing.stdout.text.isEmpty)

        let (optional, _) = try await startRendezvous(holepunch, in: dir, extra: ["--no-stun", "--cluster", nats.url,
                                                                                 "--cluster-optional"])
        defer { optional.stop() }
        #expect(optional.stderr.text.contains("single instance"))
    }

    @Test("a registration's subscription costs no thread of its own: 300 registered NodeIDs add a few threads, not 300")
    func subscriptionsShareThreads() async throws {
        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        defer { nats.stop() }
        let directory = try NATSDirectory.connect(NATSDirectoryConfiguration(url: nats.url, subjectPrefix: "threads"))
        func threads() -> Int { (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? 0 }
        let before = threads()
        for i in 0..<300 {
            directory.registered(try NodeID(bytes: [UInt8(i % 256), UInt8(i / 256)] + Array(repeating: 0, count: 30)), since: 1)
        }
        try directory.flush()
        let added = threads() - before
        // nats.c gives each asynchronous subscription its own delivery thread unless told to use its shared pool:
        // 10,000 registrations would be 10,000 threads. Other suites running beside this one add a few.
        #expect(added < 50, "\(added) threads added by 300 subscriptions")
        await directory.close()
    }

    @Test("the C callbacks' context is freed once the connection and its subscriptions are gone, after a delivery")
    func callbackContextFreed() async throws {
        guard let nats = try await NATSServerProcess.startOrSkip() else { return }
        defer { nats.stop() }
        let received = Flag()
        let freed = Flag()
        do {
            let probe = Probe(freed)
            let connection = try NATSConnection(url: nats.url, name: "lifetime", timeout: .seconds(2), reconnectWait: .seconds(1),
                                                pingInterval: .seconds(10), maximumPayload: 1024,
                                                events: NATSEvents(message: { _ in probe.touch(); received.set() },
                                                                   reconnected: {}, disconnected: {}))
            var subscriptions = [try connection.subscribe("lifetime.a", pendingMessages: 10),
                                 try connection.subscribe("lifetime.b", pendingMessages: 10)]
            try connection.publish("lifetime.a", [1])
            #expect(await eventually(.seconds(5)) { received.isSet }, "the message was not delivered")
            subscriptions.removeAll()
        }
        // Each subscription's completion callback and the connection's closed callback each drop one retain.
        #expect(await eventually(.seconds(5)) { freed.isSet }, "the callbacks' context (and what it captured) leaked")
    }

    @Test("a claim made in the same millisecond as the holder's registration: the larger instance id keeps the NodeID")
    func claimTie() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 1) else { return }
        let node = ClusterIdentities.b.nodeID
        _ = try await cluster.client(ClusterIdentities.b, at: cluster.servers[0])
        try cluster.directories[0].flush()  // The holder's own claim has passed before the watcher subscribes.
        let since = try #require(await cluster.servers[0].announcedRegistrations()[node])
        let claims = Claims()
        let raw = try NATSConnection(url: cluster.nats.url, name: "tie", timeout: .seconds(2), reconnectWait: .seconds(1),
                                     pingInterval: .seconds(10), maximumPayload: 1 << 16,
                                     events: NATSEvents(message: { claims.note($0) }, reconnected: {}, disconnected: {}))
        let subject = "\(cluster.prefix).node.\(node)"
        let watching = try raw.subscribe(subject, pendingMessages: 100)
        try raw.flush(timeout: .seconds(2))
        func claim(_ instance: String) throws {
            try raw.publish(subject, Array(RendezvousFraming.frame(NodeSubjectMessage.claim(instance: instance, since: since)).dropFirst(4)))
        }
        // Instance ids are hex without leading zeros: "0" sorts before any other, "~" after every one.
        try claim("0")
        let holder = cluster.directories[0].instanceID
        #expect(await eventually(.seconds(5)) { claims.count(by: holder) >= 1 }, "the holder did not claim the NodeID again")
        #expect(await cluster.servers[0].isRegistered(node), "both sides of a tie dropped the NodeID")
        try claim("~")
        #expect(await eventually(.seconds(5)) { await !cluster.servers[0].isRegistered(node) }, "neither side dropped it")
        _ = watching
        await cluster.stop()
    }

    @Test("hostile NATS payloads (garbage, oversized, out-of-range fields, forged claims) are dropped; routing still works")
    func hostilePayloads() async throws {
        guard let cluster = try await Cluster.startOrSkip(instances: 2) else { return }
        let a = try await cluster.client(ClusterIdentities.a, at: cluster.servers[0])
        let b = try await cluster.client(ClusterIdentities.b, at: cluster.servers[1])
        // B's subscription must have reached NATS, or the payloads below would go nowhere.
        try cluster.directories[1].flush()
        let raw = try NATSConnection(url: cluster.nats.url, name: "hostile", timeout: .seconds(2), reconnectWait: .seconds(1),
                                     pingInterval: .seconds(10), maximumPayload: 1 << 20,
                                     events: NATSEvents(message: { _ in }, reconnected: {}, disconnected: {}))
        let subject = "\(cluster.prefix).node.\(ClusterIdentities.b.nodeID)"
        let valid = RemotePunchRequest(requestID: 1, sessionID: "abc", sessionKey: Array(repeating: 7, count: 32),
                                       initiator: ClusterIdentities.c.nodeID, target: ClusterIdentities.b.nodeID,
                                       candidates: [Candidate(kind: .serverReflexive, address: .loopbackV4(port: 9))], nat: .unknown, initiatorRTTMicroseconds: 1000,
                                       directoryRTTMicroseconds: 0)
        func body(_ message: NodeSubjectMessage) -> [UInt8] { Array(RendezvousFraming.frame(message).dropFirst(4)) }
        var tooMany = valid
        tooMany.candidates = Array(repeating: Candidate(kind: .serverReflexive, address: .loopbackV4(port: 9)), count: 100)
        var badKey = valid
        badKey.sessionKey = [1]
        var selfPunch = valid
        selfPunch.initiator = ClusterIdentities.b.nodeID
        let hostile: [[UInt8]] = [
            Array("not json".utf8), Array(repeating: 0x7B, count: 200_000), body(.punch(tooMany)), body(.punch(badKey)),
            body(.punch(selfPunch)), body(.claim(instance: String(repeating: "x", count: 500), since: .max)),
        ]
        for payload in hostile { try raw.publish(subject, payload, reply: "\(cluster.prefix).evil") }
        // A well-formed claim that is older than B's registration: B stays, and is claimed again by its holder.
        try raw.publish(subject, body(.claim(instance: "old", since: 0)))
        let dropped = await eventually(.seconds(5)) { cluster.directories[1].statistics.dropped >= hostile.count }
        #expect(dropped, "dropped \(cluster.directories[1].statistics.dropped) of \(hostile.count) hostile payloads")
        #expect(await cluster.servers[1].isRegistered(ClusterIdentities.b.nodeID))
        #expect(await cluster.servers[1].statistics().coordinations == 0)
        try await punchCarriesLine(from: a, to: b)
        await cluster.stop()
    }
}

/// A flag set once from any thread.
final class Flag: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// Sets its flag when freed: shows that whatever holds it was freed.
final class Probe: Sendable {
    let freed: Flag
    init(_ freed: Flag) { self.freed = freed }
    func touch() {}
    deinit { freed.set() }
}

/// The claims heard on a subject, by instance id.
final class Claims: @unchecked Sendable {
    // @unchecked Sendable: `byInstance` is only touched under `lock`.
    private let lock = NSLock()
    private var byInstance: [String: Int] = [:]
    func note(_ message: NATSMessage) {
        guard case .claim(let instance, _)? = try? NodeSubjectMessage.decode(message.data) else { return }
        lock.withLock { byInstance[instance, default: 0] += 1 }
    }
    func count(by instance: String) -> Int { lock.withLock { byInstance[instance] ?? 0 } }
}
