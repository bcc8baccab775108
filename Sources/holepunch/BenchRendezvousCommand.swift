import ArgumentParser
import Foundation
import HolePunch
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
            acknowledge: no punches run). Goal: 10,000 registered peers and >= 1,000 coordinations/s.

            Examples:
              holepunch bench rendezvous
              holepunch bench rendezvous --peers 10000 --json bench-results/rendezvous.json
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

    @Option(help: "Also write the figures as JSON to this file.")
    var json: String?

    func validate() throws {
        guard peers >= 2, coordinations >= 1 else { throw ValidationError("--peers must be >= 2 and --coordinations >= 1") }
        guard quicPeers == 0 || quicPeers >= 2 else { throw ValidationError("--quic-peers must be 0 or >= 2") }
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
