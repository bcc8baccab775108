import HolePunchNet
import ArgumentParser
import Foundation
import HolePunch
import HolePunchQUIC
import HolePunchStrategy

/// `holepunch demo`: a real punch between two peers, with its progress, time to connect and a message exchanged.
struct DemoCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Show a real punch: two peers, live progress, time to connect, a message each way.",
        discussion: """
            As root, where network namespaces work, the demo builds the real-NAT lab (lab/demo.sh): two Linux NAT
            routers of the chosen types, a rendezvous on the public side, and a peer behind each router; peer A
            punches to peer B through the rendezvous and a line goes across and back. Elsewhere (or with
            --loopback) it says so and runs two peers in this process on loopback instead, each with its own socket
            and identity.

            Examples:
              holepunch demo
              holepunch demo --nat-a restricted --nat-b symmetric_random
              holepunch demo --strategy strategies/aggressive.lua
              holepunch demo --loopback --json
            """
    )

    @Option(help: "A Lua strategy file (default: the bundled default.lua).")
    var strategy: String?

    @Option(help: "Peer A's NAT: full_cone, restricted, port_restricted, symmetric_seq or symmetric_random.")
    var natA: String = "port_restricted"

    @Option(help: "Peer B's NAT (same choices).")
    var natB: String = "symmetric_seq"

    @Option(help: "One-way delay on each router's public link in the lab, in milliseconds.")
    var delay: Int = 20

    @Flag(help: "Print one JSON object with the outcome instead of the narrated run.")
    var json = false

    @Flag(help: "Run in this process on loopback, even where the real-NAT lab could run.")
    var loopback = false

    static let labTypes = NATProfile.labPresets.map(\.name)

    func validate() throws {
        for value in [natA, natB] where !Self.labTypes.contains(value) {
            throw ValidationError("unknown NAT type '\(value)'; use one of: \(Self.labTypes.joined(separator: ", "))")
        }
        guard (0...1000).contains(delay) else { throw ValidationError("--delay must be 0...1000 ms") }
        if let strategy, !FileManager.default.fileExists(atPath: strategy) {
            throw ValidationError("strategy file '\(strategy)' does not exist")
        }
    }

    func run() async throws {
        let strategyPath = strategy
        if !loopback {
            switch LabDemo.availability() {
            case .available(let script):
                let binary = Bundle.main.executablePath ?? CommandLine.arguments[0]
                var arguments = [script, binary, "--nat-a", natA, "--nat-b", natB, "--delay", String(delay)]
                if let strategyPath { arguments += ["--strategy", strategyPath] }
                let status = try LabDemo.run(arguments)
                if status != 0 { throw ExitCode(status) }
                return
            case .unavailable(let reason):
                if !json { print("The real-NAT lab is not available here (\(reason)); running the loopback demo instead.") }
            }
        }
        let quiet = json
        let narrate: @Sendable (String) -> Void = { line in
            if !quiet { print(line) }
        }
        let outcome = try await LoopbackDemo.run(
            strategyPath: strategyPath,
            natA: NATProfile.preset(named: natA) ?? NATProfile(legacy: .unknown),
            natB: NATProfile.preset(named: natB) ?? NATProfile(legacy: .unknown),
            narrate: narrate
        )
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(outcome), as: UTF8.self))
        }
        if !outcome.success { throw ExitCode(3) }  // a failed punch, as in every other command
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
    /// The strategy that planned peer A's punch: `strategy`'s name, or `builtin-default` after a fallback.
    var plannedBy: String?
    /// Each failure of the script that the built-in plan stood in for (`A: file:line: message`); empty when none.
    var strategyFallbacks: [String] = []
    var messageRoundTrip: Bool
    var error: String?
}

enum LoopbackDemo {
    static func run(
        strategyPath: String?, natA: NATProfile, natB: NATProfile, narrate: @escaping @Sendable (String) -> Void
    ) async throws -> DemoOutcome {
        narrate("HolePunch demo (loopback): two peers in one process, each with its own socket and identity.")
        let identityA = try Identity.generate(commonName: "demo-a")
        let identityB = try Identity.generate(commonName: "demo-b")
        let a = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identityA, acceptPolicy: .none))
        let b = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identityB, acceptPolicy: .none))
        narrate("  peer A  \(identityA.nodeID.short)…  on \(a.localAddress)")
        narrate("  peer B  \(identityB.nodeID.short)…  on \(b.localAddress)")
        let strategy = strategyPath.map { FallbackStrategy.loading(path: $0) } ?? FallbackStrategy.recommended()
        let strategyLabel = strategyPath ?? "default.lua (bundled)"
        narrate("  strategy: \(strategyLabel); NAT profiles as declared: A=\(natA.type) B=\(natB.type) (no real NAT on loopback)")
        let executorA = PunchExecutor(endpoint: a, configuration: .init(strategy: strategy))
        let executorB = PunchExecutor(endpoint: b, configuration: .init(strategy: strategy))
        let key = (0..<32).map { _ in UInt8.random(in: 0...255) }
        let session = "demo-\(UInt32.random(in: 0...UInt32.max))"
        // As the rendezvous would: both start together, 50 ms from now.
        let start = PunchTime.at(ContinuousClock.now + .milliseconds(50))
        let targetHandle = await executorB.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [a.localAddress.port], sessionID: session, sessionKey: key,
            punchTime: start, role: .target, localNAT: natB, remoteNAT: natA,
            targetNodeID: identityA.nodeID
        ))
        let handle = await executorA.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [b.localAddress.port], sessionID: session, sessionKey: key,
            punchTime: start, role: .initiator, localNAT: natA, remoteNAT: natB,
            targetNodeID: identityB.nodeID
        ))
        // B plans too: its fallbacks are reported beside A's.
        let targetFallbacks = Task {
            var reasons: [String] = []
            for await event in targetHandle.events {
                if case .strategyFellBack(let name, let reason) = event {
                    reasons.append("B: \(reason)")
                    printError("warning: " + fallbackWarning(name, reason))
                }
            }
            return reasons
        }
        var outcome = DemoOutcome(mode: "loopback", success: false, strategy: strategyLabel, messageRoundTrip: false)
        for await event in handle.events {
            switch event {
            case .planned(let name):
                outcome.plannedBy = name
                narrate("  planned by: \(name)")
            case .strategyFellBack(let name, let reason):
                outcome.strategyFallbacks.append("A: \(reason)")
                printError("warning: " + fallbackWarning(name, reason))
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
        let targetResult = await targetHandle.result()
        outcome.strategyFallbacks += await targetFallbacks.value
        guard case .success(let connection) = await handle.result(), case .success(let accepted) = targetResult
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
        let planner = outcome.strategyFallbacks.isEmpty ? "" : " (planned by the built-in fallback: \(strategyLabel) failed)"
        narrate(outcome.messageRoundTrip ? "demo: punch succeeded\(planner), messages exchanged." : "demo: messages did not match.")
        return outcome
    }
}

/// The real-NAT lab demo: `lab/demo.sh`, found next to the working directory or the binary's package.
enum LabDemo {
    enum Availability {
        case available(String)
        case unavailable(String)
    }

    static func availability() -> Availability {
        guard getuid() == 0 else { return .unavailable("not root") }
        guard FileManager.default.fileExists(atPath: "/dev/net/tun") else { return .unavailable("no /dev/net/tun") }
        guard let script = findScript() else { return .unavailable("lab/demo.sh not found; run from the package root") }
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/bin/sh")
        probe.arguments = ["-c", "command -v ip >/dev/null && command -v nft >/dev/null && ip netns list >/dev/null"]
        probe.standardOutput = FileHandle.nullDevice
        probe.standardError = FileHandle.nullDevice
        guard (try? probe.run()) != nil else { return .unavailable("cannot run /bin/sh") }
        probe.waitUntilExit()
        guard probe.terminationStatus == 0 else { return .unavailable("ip netns or nft is not available") }
        return .available(script)
    }

    private static func findScript() -> String? {
        var candidates = [FileManager.default.currentDirectoryPath + "/lab/demo.sh"]
        // The binary lives in <package>/.build/<triple>/<config>/holepunch.
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<4 {
            directory = directory.deletingLastPathComponent()
            candidates.append(directory.appendingPathComponent("lab/demo.sh").path)
        }
        return candidates.first { FileManager.default.fileExists(atPath: $0) }
    }

    /// Runs the script with this terminal's output; returns its exit status.
    static func run(_ arguments: [String]) throws -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = arguments
        try process.run()
        process.waitUntilExit()
        return process.terminationStatus
    }
}
