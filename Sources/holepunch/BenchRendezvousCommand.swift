import ArgumentParser
import Foundation
import HolePunch
import HolePunchCluster
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous
import Logging

/// `holepunch bench rendezvous`: how many registrations the rendezvous holds, at what memory cost, and how many
/// coordinations per second it makes, in one process.
struct BenchRendezvousCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rendezvous",
        abstract: "Registrations held, memory per registration and coordinations/s of the rendezvous, in one process.",
        discussion: """
            Two parts, reported separately. (1) State machine: --peers registrations fed straight into \
            RendezvousState (no sockets), memory per registration from the RSS delta, then --coordinations punch \
            requests between random registered pairs, each drawing a session secret and encoding both coordinate \
            frames as the server does. (2) Real QUIC: --quic-peers peers, each with its own endpoint, executor and \
            client, register at an in-process RendezvousServer on 127.0.0.1; half of them then request \
            --quic-coordinations punches to the other half over their control streams (the targets only \
            acknowledge: no punches run). Goal: 10,000 registered peers and >= 1,000 coordinations/s. \
            (3) With --instances 1,2,4: for each count, a nats-server child on 127.0.0.1 and that many in-process \
            instances joined through it; the --quic-peers peers are spread over the instances so that every \
            initiator's target is held by another instance (when there are several), and the share of each \
            coordination's latency spent on the NATS round trip is reported. All instances share this process's \
            cores: the figures show the routing's cost, not a scale-out.

            Examples:
              holepunch bench rendezvous
              holepunch bench rendezvous --peers 10000 --json bench-results/rendezvous.json
              holepunch bench rendezvous --quic-peers 32 --instances 1,2,4
            """
    )

    @Option(help: "Registrations for the state-machine part.")
    var peers: Int = 10_000

    @Option(help: "Coordinations for the state-machine part.")
    var coordinations: Int = 50_000

    @Option(help: "Peers with real QUIC connections (each has its own endpoint thread).")
    var quicPeers: Int = 32

    @Option(help: "Coordinations over real QUIC.")
    var quicCoordinations: Int = 4_000

    @Option(help: "Instance counts for the cluster part, e.g. 1,2,4 (needs nats-server; none: skip it).")
    var instances: String?

    @Option(help: "Also write the figures as JSON to this file.")
    var json: String?

    func validate() throws {
        guard peers >= 2, coordinations >= 1 else { throw ValidationError("--peers must be >= 2 and --coordinations >= 1") }
        guard quicPeers == 0 || quicPeers >= 2 else { throw ValidationError("--quic-peers must be 0 or >= 2") }
        if let counts = instanceCounts {
            guard !counts.isEmpty, counts.allSatisfy({ (1...16).contains($0) }), quicPeers >= 2 else {
                throw ValidationError("--instances takes counts from 1 to 16, e.g. 1,2,4, and needs --quic-peers >= 2")
            }
        } else if instances != nil {
            throw ValidationError("--instances takes comma-separated counts, e.g. 1,2,4")
        }
    }

    func run() async throws {
        let clock = ContinuousClock()

        // MARK: (1) State machine
        var generator = SystemRandomNumberGenerator()
        let nodes: [NodeID] = (0..<peers).map { _ in
            try! NodeID(bytes: (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) })
        }
        let addresses: [SocketAddress] = (0..<peers).map { (i: Int) -> SocketAddress in
            let b1 = UInt8(truncatingIfNeeded: 1 + ((i >> 16) & 0x7F))
            let b2 = UInt8(truncatingIfNeeded: i >> 8)
            let b3 = UInt8(truncatingIfNeeded: i)
            let port = UInt16(10_000 + i % 50_000)
            return SocketAddress(ip: .v4(127, b1, b2, b3), port: port)
        }
        let lan = Registration(lanAddresses: [SocketAddress(ip: .v4(127, 0, 0, 1), port: 4000)], nat: .portRestricted)
        var state = RendezvousState(configuration: .init(
            sessionTTL: .seconds(3600), maxRegistrations: peers + 1, maxSessions: coordinations + 1,
            rateBurst: Double(coordinations), ratePerSecond: 1e9,
            targetRateBurst: Double(coordinations), targetRatePerSecond: 1e9))
        let rssBefore = residentBytes()
        let registerStart = clock.now
        for i in 0..<peers {
            _ = state.register(node: nodes[i], connection: UInt64(i), observed: addresses[i], registration: lan, now: .zero)
        }
        let registerTime = clock.now - registerStart
        let rssAfter = residentBytes()
        let perRegistration = Double(max(0, rssAfter - rssBefore)) / Double(peers)

        var frameBytes = 0
        let coordinateStart = clock.now
        for i in 0..<coordinations {
            let a = Int.random(in: 0..<peers, using: &generator)
            var b = Int.random(in: 0..<(peers - 1), using: &generator)
            if b >= a { b += 1 }
            let actions = state.requestPunch(from: nodes[a], requestID: UInt64(i), target: nodes[b],
                                             secret: SessionSecret.random(using: &generator), now: .milliseconds(i))
            for action in actions {
                if case let .send(message, _, _) = action { frameBytes += RendezvousFraming.frame(message).count }
            }
        }
        let coordinateTime = clock.now - coordinateStart
        let stateRate = Double(coordinations) / seconds(coordinateTime)
        let registered = state.registrationCount

        // MARK: (2) Real QUIC
        var quic: [String: Any] = [:]
        if quicPeers >= 2 {
            quic = try await realQUIC(clock: clock)
        }

        var cluster: [[String: Any]] = []
        for count in instanceCounts ?? [] {
            cluster.append(try await clusterRun(instances: count, clock: clock))
        }

        // MARK: Report
        print("bench rendezvous (one process)")
        print("state machine: in-memory registrations, no sockets")
        print(row("registered peers", "\(registered)"))
        print(row("register time", String(format: "%.1f ms (%.0f/s)", seconds(registerTime) * 1000, Double(peers) / seconds(registerTime))))
        print(row("memory per registration", String(format: "%.0f B (RSS delta %.2f MiB for %d)", perRegistration,
                                                      Double(rssAfter - rssBefore) / 1_048_576, peers)))
        print(row("coordinations/s", String(format: "%.0f (%d in %.1f ms; secret + 2 JSON frames, avg %d B each)", stateRate,
                                              coordinations, seconds(coordinateTime) * 1000, frameBytes / max(1, 2 * coordinations))))
        if !quic.isEmpty {
            print("real QUIC: \(quicPeers) peers with their own endpoints, in-process server on 127.0.0.1")
            print(row("registrations", String(format: "%d in %.1f ms (handshake + register, concurrent)",
                                                quic["registrations"] as? Int ?? 0, quic["registerMs"] as? Double ?? 0)))
            print(row("coordinations/s", String(format: "%.0f (%d requests by %d initiators; request → coordinate at the initiator)",
                                                  quic["coordinationsPerSecond"] as? Double ?? 0, quic["coordinations"] as? Int ?? 0,
                                                  quicPeers / 2)))
            print(row("target copies received", "\(quic["targetCopies"] as? Int ?? 0)"))
            print(row("server sessions created", "\(quic["serverCoordinations"] as? Int ?? 0)"))
        }
        if !cluster.isEmpty {
            print("cluster over NATS: \(quicPeers) peers spread over the instances, one nats-server, all on 127.0.0.1, one process")
            print("  instances  registrations  coordinations/s  mean latency  mean NATS round trip  NATS share")
            for run in cluster {
                let latency = run["meanLatencyMs"] as? Double ?? 0
                let nats = run["meanNATSRoundTripMs"] as? Double ?? 0
                print(String(format: "  %9d  %13d  %15.0f  %9.2f ms  %17.2f ms  %9.0f%%", run["instances"] as? Int ?? 0,
                             run["registrations"] as? Int ?? 0, run["coordinationsPerSecond"] as? Double ?? 0, latency, nats,
                             latency > 0 ? 100 * nats / latency : 0))
            }
        }
        let goalPeers = registered >= 10_000
        let goalRate = stateRate >= 1000 && (quic.isEmpty || (quic["coordinationsPerSecond"] as? Double ?? 0) >= 1000)
        print("goal: 10,000 registered peers \(goalPeers ? "met" : "NOT met"), >= 1,000 coordinations/s \(goalRate ? "met" : "NOT met")")

        if let json {
            let object: [String: Any] = [
                "stateMachine": [
                    "registeredPeers": registered, "registerMs": seconds(registerTime) * 1000,
                    "bytesPerRegistration": perRegistration, "rssDeltaBytes": rssAfter - rssBefore,
                    "coordinations": coordinations, "coordinationsPerSecond": stateRate,
                    "averageFrameBytes": frameBytes / max(1, 2 * coordinations),
                ],
                "quic": quic,
                "cluster": cluster,
                "goalMet": goalPeers && goalRate,
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            do { try data.write(to: URL(fileURLWithPath: json)) } catch {
                throw cliFailure("cannot write \(json): \(error)", hint: "check the path")
            }
        }
    }

    /// Registers `quicPeers` real clients and runs `quicCoordinations` requests from half of them to the other half.
    private func realQUIC(clock: ContinuousClock) async throws -> [String: Any] {
        let serverConfiguration = RendezvousServerConfiguration(
            listen: .loopbackV4(port: 0), identity: try Identity.generate(),
            state: .init(maxSessions: quicCoordinations + 16, rateBurst: Double(quicCoordinations), ratePerSecond: 1e9,
                         targetRateBurst: Double(quicCoordinations), targetRatePerSecond: 1e9),
            // A throughput bench, not a hostile one: lift the per-connection message rate and queue bounds.
            limits: RendezvousLimits(messageBurst: 1e12, messagesPerSecond: 1e12, maxQueuedFrames: 4 * quicCoordinations + 64))
        let server: RendezvousServer
        do { server = try await RendezvousServer.bind(configuration: serverConfiguration) } catch {
            throw cliFailure("cannot start the in-process rendezvous: \(error)", hint: nil)
        }
        let serverTask = Task { try await server.run() }
        var clients: [RendezvousClient] = []
        for _ in 0..<quicPeers {
            let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(
                identity: try Identity.generate(), acceptPolicy: .none))
            var configuration = RendezvousClientConfiguration(server: server.address, serverNodeID: server.nodeID, requestTimeout: .seconds(30))
            configuration.acceptsPunches = false
            clients.append(RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration))
        }
        let registerStart = clock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in clients { group.addTask { _ = try await client.connect() } }
            try await group.waitForAll()
        }
        let registerTime = clock.now - registerStart

        let half = quicPeers / 2
        let perInitiator = max(1, quicCoordinations / half)
        let start = clock.now
        let done = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<half {
                let initiator = clients[i]
                let target = clients[half + i].nodeID
                group.addTask {
                    for _ in 0..<perInitiator { _ = try await initiator.coordinate(to: target) }
                    return perInitiator
                }
            }
            return try await group.reduce(0, +)
        }
        let elapsed = clock.now - start
        // Target copies may trail the initiators' by the (loopback-small) compensation delay: a bounded wait.
        var targetCopies = 0
        for _ in 0..<500 {
            targetCopies = 0
            for client in clients[half...] { targetCopies += await client.targetCoordinates }
            if targetCopies >= done { break }
            try? await Task.sleep(for: .milliseconds(2))
        }
        let statistics = await server.statistics()
        for client in clients {
            await client.close()
            await client.executor.endpoint.close()
        }
        await server.shutdown()
        _ = await serverTask.result
        return [
            "peers": quicPeers, "registrations": statistics.registrations == 0 ? quicPeers : statistics.registrations,
            "registerMs": seconds(registerTime) * 1000, "coordinations": done,
            "coordinationsPerSecond": Double(done) / seconds(elapsed), "targetCopies": targetCopies,
            "serverCoordinations": statistics.coordinations,
        ]
    }
}

extension BenchRendezvousCommand {
    /// The parsed --instances list, nil when absent or malformed.
    var instanceCounts: [Int]? {
        guard let instances else { return nil }
        let counts = instances.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        return counts.contains(nil) ? nil : counts.compactMap { $0 }
    }

    /// One cluster run: a nats-server child, `instances` in-process rendezvous instances joined through it,
    /// `quicPeers` clients spread over them; initiator i's target is held by the next instance.
    private func clusterRun(instances: Int, clock: ContinuousClock) async throws -> [String: Any] {
        guard let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw cliFailure("nats-server is not installed", hint: "make deps installs it (apt-get install nats-server)")
        }
        let nats = Process()
        let log = Pipe()
        nats.executableURL = URL(fileURLWithPath: binary)
        nats.arguments = ["-a", "127.0.0.1", "-p", "-1"]
        nats.standardError = log
        nats.standardOutput = FileHandle.nullDevice
        try nats.run()
        defer {
            kill(nats.processIdentifier, SIGKILL)
            nats.waitUntilExit()
        }
        // The port nats-server picked is in its "Listening for client connections on HOST:PORT" line.
        var text = ""
        while !text.contains("Server is ready") {
            let chunk = log.fileHandleForReading.availableData
            guard !chunk.isEmpty else { throw cliFailure("nats-server exited: \(text)", hint: nil) }
            text += String(decoding: chunk, as: UTF8.self)
        }
        guard let line = text.split(separator: "\n").first(where: { $0.contains("Listening for client connections on") }),
              let port = line.split(separator: ":").last.map(String.init) else {
            throw cliFailure("cannot read nats-server's port from its log", hint: nil)
        }
        let url = "nats://127.0.0.1:\(port)"
        var servers: [RendezvousServer] = []
        var tasks: [Task<Void, any Error>] = []
        for _ in 0..<instances {
            let server = try await RendezvousServer.bind(configuration: RendezvousServerConfiguration(
                listen: .loopbackV4(port: 0), identity: try Identity.generate(),
                state: .init(maxSessions: quicCoordinations + 16, rateBurst: Double(quicCoordinations), ratePerSecond: 1e9,
                             targetRateBurst: Double(quicCoordinations), targetRatePerSecond: 1e9),
                limits: RendezvousLimits(messageBurst: 1e12, messagesPerSecond: 1e12, maxQueuedFrames: 4 * quicCoordinations + 64)))
            let directory: NATSDirectory
            do { directory = try NATSDirectory.connect(NATSDirectoryConfiguration(url: url, subjectPrefix: "bench")) } catch {
                throw cliFailure(error.message, hint: nil)
            }
            await server.use(directory: directory)
            servers.append(server)
            tasks.append(Task { try await server.run() })
        }
        let half = quicPeers / 2
        var clients: [RendezvousClient] = []
        for i in 0..<quicPeers {
            // Initiator i sits at instance i % n, its target (half + i) at the next one.
            let server = servers[(i < half ? i : i - half + 1) % instances]
            let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(
                identity: try Identity.generate(), acceptPolicy: .none))
            var configuration = RendezvousClientConfiguration(server: server.address, serverNodeID: server.nodeID, requestTimeout: .seconds(30))
            configuration.acceptsPunches = false
            clients.append(RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in clients { group.addTask { _ = try await client.connect() } }
            try await group.waitForAll()
        }
        var registrations = 0
        for server in servers { registrations += await server.statistics().registrations }
        let perInitiator = max(1, quicCoordinations / half)
        let start = clock.now
        let (done, latency) = try await withThrowingTaskGroup(of: (Int, Duration).self) { group in
            for i in 0..<half {
                let initiator = clients[i]
                let target = clients[half + i].nodeID
                group.addTask {
                    var total = Duration.zero
                    for _ in 0..<perInitiator {
                        let sent = clock.now
                        _ = try await initiator.coordinate(to: target)
                        total += sent.duration(to: clock.now)
                    }
                    return (perInitiator, total)
                }
            }
            return try await group.reduce((0, Duration.zero)) { ($0.0 + $1.0, $0.1 + $1.1) }
        }
        let elapsed = clock.now - start
        var roundTripTotal = Duration.zero
        var routed = 0
        for server in servers {
            let statistics = await server.statistics()
            roundTripTotal += statistics.directoryRoundTripTotal
            routed += statistics.routedCoordinations
        }
        for client in clients {
            await client.close()
            await client.executor.endpoint.close()
        }
        for server in servers { await server.shutdown() }
        for task in tasks { _ = await task.result }
        let meanNATS = routed == 0 ? 0 : seconds(roundTripTotal) / Double(routed) * 1000
        return [
            "instances": instances, "peers": quicPeers, "registrations": registrations, "coordinations": done,
            "coordinationsPerSecond": Double(done) / seconds(elapsed), "meanLatencyMs": seconds(latency) / Double(max(1, done)) * 1000,
            "meanNATSRoundTripMs": meanNATS, "routedCoordinations": routed,
        ]
    }
}

private func row(_ name: String, _ value: String) -> String {
    "  " + name.padding(toLength: 26, withPad: " ", startingAt: 0) + value
}

private func seconds(_ duration: Duration) -> Double {
    let parts = duration.components
    return Double(parts.seconds) + Double(parts.attoseconds) / 1e18
}

/// Resident set size from /proc/self/statm (Linux), in bytes; 0 elsewhere.
private func residentBytes() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = text.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}
