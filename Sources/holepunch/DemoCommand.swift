import ArgumentParser
import Foundation
import HolePunch

/// `holepunch demo`: a real punch between two peers, with its progress, time to connect and a message exchanged.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Show a real punch: two peers, live progress, time to connect, a message each way.",
        discussion: """
            The loopback demo runs two peers in this process, each with its own UDP socket and identity: both
            probe, the initiator dials the first proven path, and the mutually authenticated QUIC connection carries
            a message each way.

            Examples:
              holepunch demo
              holepunch demo --strategy strategies/aggressive.lua
              holepunch demo --json
            """
    )

    @Option(help: "A Lua strategy file for the initiator (default: the built-in strategy).")
    var strategy: String?

    @Option(help: "The NAT type the initiator believes it is behind (full_cone, restricted, port_restricted, symmetric, unknown).")
    var natA: String = "unknown"

    @Option(help: "The NAT type the initiator believes the target is behind.")
    var natB: String = "unknown"

    @Flag(help: "Print one JSON object with the outcome instead of the narrated run.")
    var json = false

    func validate() throws {
        for value in [natA, natB] where NATType(rawValue: value) == nil {
            throw ValidationError("unknown NAT type '\(value)'; use one of: \(NATType.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let strategy, !FileManager.default.fileExists(atPath: strategy) {
            throw ValidationError("strategy file '\(strategy)' does not exist")
        }
    }

    func run() async throws {
        let quiet = json
        let narrate: @Sendable (String) -> Void = { line in
            if !quiet { print(line) }
        }
        let outcome = try await LoopbackDemo.run(
            strategyPath: strategy,
            natA: NATType(rawValue: natA) ?? .unknown,
            natB: NATType(rawValue: natB) ?? .unknown,
            narrate: narrate
        )
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(outcome), as: UTF8.self))
        }
        if !outcome.success { throw ExitCode(1) }
    }
}

/// What the demo reports.
struct DemoOutcome: Codable {
    var mode: String
    var success: Bool
    var timeToConnectMs: Double?
    var rounds: Int?
    var path: String?
    var strategy: String
    var messageRoundTrip: Bool
    var error: String?
}

enum LoopbackDemo {
    static func run(
        strategyPath: String?, natA: NATType, natB: NATType, narrate: @escaping @Sendable (String) -> Void
    ) async throws -> DemoOutcome {
        narrate("HolePunch demo (loopback): two peers in one process, each with its own socket and identity.")
        let identityA = try Identity.generate(commonName: "demo-a")
        let identityB = try Identity.generate(commonName: "demo-b")
        let a = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identityA, acceptPolicy: .none))
        let b = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identityB, acceptPolicy: .none))
        narrate("  peer A  \(identityA.nodeID.short)…  on \(a.localAddress)")
        narrate("  peer B  \(identityB.nodeID.short)…  on \(b.localAddress)")
        let strategy: any PunchStrategy
        if let strategyPath {
            strategy = FallbackStrategy.loading(path: strategyPath)
        } else {
            strategy = DefaultStrategy()
        }
        narrate("  strategy: \(strategyPath ?? "built-in default"); NAT types A=\(natA) B=\(natB)")
        let executorA = PunchExecutor(endpoint: a, configuration: .init(strategy: strategy))
        let executorB = PunchExecutor(endpoint: b, configuration: .init(strategy: strategy))
        let key = (0..<32).map { _ in UInt8.random(in: 0...255) }
        let session = "demo-\(UInt32.random(in: 0...UInt32.max))"
        // As the rendezvous would: both start together, 50 ms from now.
        let start = PunchTime.at(ContinuousClock.now + .milliseconds(50))
        let targetHandle = await executorB.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [a.localAddress.port], sessionID: session, sessionKey: key,
            punchTime: start, role: .target, localNAT: NATProfile(legacy: natB), remoteNAT: NATProfile(legacy: natA),
            targetNodeID: identityA.nodeID
        ))
        let handle = await executorA.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [b.localAddress.port], sessionID: session, sessionKey: key,
            punchTime: start, role: .initiator, localNAT: NATProfile(legacy: natA), remoteNAT: NATProfile(legacy: natB),
            targetNodeID: identityB.nodeID
        ))
        var outcome = DemoOutcome(mode: "loopback", success: false, strategy: strategyPath ?? "built-in default", messageRoundTrip: false)
        for await event in handle.events {
            switch event {
            case .roundStarted(let round, let ports):
                narrate("  round \(round): probing (\(ports) port(s) tried so far)")
            case .probeAnswered(let from):
                narrate("  probe answered by \(from): the path is open")
            case .connecting(let to):
                narrate("  QUIC handshake to \(to) (mutual TLS, NodeID pinned)")
            case .done(.success(let success)):
                outcome.success = true
                outcome.timeToConnectMs = Double(success.timeToConnect.components.attoseconds) / 1e15
                    + Double(success.timeToConnect.components.seconds) * 1000
                outcome.rounds = success.rounds
                outcome.path = "\(a.localAddress) -> \(success.remoteAddress)"
                narrate(String(format: "  connected in %.1f ms after %d round(s), path %@", outcome.timeToConnectMs ?? 0,
                               success.rounds, outcome.path ?? ""))
            case .done(.failure(let error)):
                outcome.error = "\(error)"
                narrate("  punch failed: \(error)")
            }
        }
        defer { Task { await a.close(); await b.close() } }
        guard case .success(let connection) = await handle.result(),
              case .success(let accepted) = await targetHandle.result()
        else { return outcome }
        let stream = try await connection.openStream()
        try await stream.write(Array("hello from A".utf8))
        try await stream.finish()
        guard let incoming = try await accepted.acceptStream() else { return outcome }
        let fromA = String(decoding: try await incoming.readToEnd(), as: UTF8.self)
        narrate("  B received: \"\(fromA)\"")
        try await incoming.write(Array("hello back from B".utf8))
        try await incoming.finish()
        let fromB = String(decoding: try await stream.readToEnd(), as: UTF8.self)
        narrate("  A received: \"\(fromB)\"")
        outcome.messageRoundTrip = fromA == "hello from A" && fromB == "hello back from B"
        await connection.close()
        await accepted.close()
        narrate(outcome.messageRoundTrip ? "demo: punch succeeded, messages exchanged." : "demo: messages did not match.")
        return outcome
    }
}
