import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous

/// `holepunch bench rendezvous-flood`: hostile clients flood a rendezvous (its own child process, or one given)
/// with keep-alives and streams and never read, while an honest pair keeps coordinating; prints the server's RSS
/// before, during and after, what happened to the flooders and how the honest pair fared.
struct BenchRendezvousFloodCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rendezvous-flood",
        abstract: "Flood a rendezvous with keep-alives and streams, never reading; report its RSS and honest coordinations.",
        discussion: """
            Without --rendezvous, starts `holepunch rendezvous --listen 127.0.0.1:0 --no-stun` as a child process (so \
            its RSS is the server's alone) and stops it at the end; --no-limits gives that child effectively unlimited \
            message rates and reply queues, to compare. Each of --flooders connections registers, tries to open more \
            streams, then writes keep-alive frames as fast as QUIC takes them with a 4 KiB receive window it never \
            reads; when the server closes one, it reconnects. Meanwhile an honest pair (two RendezvousClients) \
            requests a coordination every --interval-ms. Loopback only.

            Examples:
              holepunch bench rendezvous-flood --seconds 10
              holepunch bench rendezvous-flood --seconds 10 --no-limits
            """
    )

    @Option(help: "Flood a running rendezvous at this numeric ADDR:PORT instead of starting one.")
    var rendezvous: String?

    @Option(help: "The NodeID of --rendezvous (or @FILE).")
    var rendezvousId: String?

    @Option(help: "PID of the --rendezvous process, to read its VmRSS from /proc.")
    var pid: Int32?

    @Option(help: "How long to flood, in seconds.")
    var seconds: Int = 10

    @Option(help: "Concurrent flooding connections.")
    var flooders: Int = 4

    @Option(help: "The honest pair asks for a coordination this often, in ms (the default stays under the rendezvous's 2/s per peer).")
    var intervalMs: Int = 600

    @Flag(help: "Start the child rendezvous with effectively unlimited message rates and reply queues.")
    var noLimits = false

    @Option(help: "Also write the figures as JSON to this file.")
    var json: String?

    func validate() throws {
        guard seconds >= 1, flooders >= 1, intervalMs >= 1 else {
            throw ValidationError("--seconds, --flooders and --interval-ms must be >= 1")
        }
        guard (rendezvous == nil) == (rendezvousId == nil) else {
            throw ValidationError("--rendezvous and --rendezvous-id go together")
        }
    }

    func run() async throws {
        let target = try startTarget()
        defer { target.child?.terminate() }
        guard isLoopback(target.address) else {
            throw usageFailure("--rendezvous must be a loopback address", hint: "this bench floods; point it at 127.0.0.1")
        }
        let clock = ContinuousClock()
        var samples: [(Duration, Int)] = []
        let start = clock.now
        func sample() { samples.append((clock.now - start, residentKiB(pid: target.pid))) }

        // The honest pair registers first.
        let a = try await honestClient(target)
        let b = try await honestClient(target)
        do {
            _ = try await a.connect()
            _ = try await b.connect()
        } catch {
            throw cliFailure("the honest pair could not register: \(error)", hint: nil)
        }
        sample()
        let before = samples.last?.1 ?? 0

        let stop = clock.now.advanced(by: .seconds(seconds))
        let tally = FloodTally()
        let floodTasks = (0..<flooders).map { _ in
            Task { await flood(target, until: stop, tally: tally) }
        }
        var honestOK = 0
        var honestFailed: [String] = []
        var worstHonest = Duration.zero
        while clock.now < stop {
            let asked = clock.now
            do {
                _ = try await a.coordinate(to: b.nodeID)
                honestOK += 1
                worstHonest = max(worstHonest, clock.now - asked)
            } catch {
                honestFailed.append("\(error)")
            }
            sample()
            try? await Task.sleep(for: .milliseconds(intervalMs))
        }
        for task in floodTasks { await task.value }
        let during = samples.map(\.1).max() ?? 0
        // Let the server finish closing the flooders, then measure again.
        try? await Task.sleep(for: .seconds(2))
        sample()
        let after = samples.last?.1 ?? 0
        let registeredAfter: Bool
        do { _ = try await a.coordinate(to: b.nodeID); registeredAfter = true } catch { registeredAfter = false }
        await a.close()
        await b.close()
        await a.executor.endpoint.close()
        await b.executor.endpoint.close()
        let figures = await tally.figures()

        print("bench rendezvous-flood (\(target.child == nil ? "given server" : "child server")\(noLimits ? ", limits off" : ""), "
              + "\(flooders) flooders, \(seconds) s, loopback)")
        print(row("server RSS before", "\(before) KiB"))
        print(row("server RSS peak during", "\(during) KiB"))
        print(row("server RSS after", "\(after) KiB"))
        print(row("flood connections", "\(figures.connections) (closed by the server: \(figures.closeCodes.map { "code \($0.key) ×\($0.value)" }.sorted().joined(separator: ", ")))"))
        print(row("keep-alives queued", "\(figures.frames) by the flooders' QUIC stacks (\((figures.frames * 21) >> 20) MiB; most never left them)"))
        print(row("extra streams opened", "\(figures.extraStreams) (4 KiB written on each; the transport refused the rest)"))
        print(row("honest coordinations", "\(honestOK) ok, \(honestFailed.count) failed, slowest \(worstHonest)"))
        print(row("honest pair after", registeredAfter ? "still coordinates" : "FAILED"))
        if let first = honestFailed.first { print(row("first honest failure", first)) }
        if let json {
            let object: [String: Any] = [
                "rssKiB": ["before": before, "peakDuring": during, "after": after],
                "samples": samples.map { ["seconds": Double($0.0 / .milliseconds(1)) / 1000, "rssKiB": $0.1] },
                "floodConnections": figures.connections, "extraStreamsOpened": figures.extraStreams, "framesQueuedByFlooders": figures.frames,
                "closeCodes": Dictionary(uniqueKeysWithValues: figures.closeCodes.map { ("\($0.key)", $0.value) }),
                "honestOK": honestOK, "honestFailed": honestFailed.count, "honestAfter": registeredAfter,
                "limits": !noLimits,
            ]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            do { try data.write(to: URL(fileURLWithPath: json)) } catch {
                throw cliFailure("cannot write \(json): \(error)", hint: "check the path")
            }
        }
    }

    /// The server to flood: the given one, or a child `holepunch rendezvous`.
    private func startTarget() throws -> Target {
        if let rendezvous, let rendezvousId {
            let address: SocketAddress
            do { address = try SocketAddress(parsing: rendezvous) } catch {
                throw usageFailure("\(error)", hint: "use a numeric address such as 127.0.0.1:3478")
            }
            let id = try parseNodeID(rendezvousId, what: "--rendezvous-id", hint: "copy the NodeID the rendezvous printed")
            return Target(address: address, nodeID: id, pid: pid, child: nil)
        }
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var arguments = ["rendezvous", "--listen", "127.0.0.1:0", "--no-stun", "--json"]
        if noLimits { arguments += ["--message-burst", "1e12", "--messages-per-second", "1e12", "--max-queued-replies", "1000000000"] }
        child.arguments = arguments
        let output = Pipe()
        child.standardOutput = output
        do { try child.run() } catch {
            throw cliFailure("cannot start the child rendezvous: \(error)", hint: nil)
        }
        // The child prints one JSON line once listening.
        var line: [UInt8] = []
        while !line.contains(UInt8(ascii: "\n")) {
            let data = output.fileHandleForReading.availableData
            guard !data.isEmpty else { break }
            line += data
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(line)) as? [String: Any],
              let quic = object["quic"] as? String, let node = object["nodeID"] as? String,
              let address = try? SocketAddress(parsing: quic), let id = try? NodeID(parsing: node) else {
            child.terminate()
            throw cliFailure("the child rendezvous printed no listening line", hint: nil)
        }
        return Target(address: address, nodeID: id, pid: child.processIdentifier, child: child)
    }

    private func honestClient(_ target: Target) async throws -> RendezvousClient {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(
            identity: try Identity.generate(), acceptPolicy: .none))
        var configuration = RendezvousClientConfiguration(server: target.address, serverNodeID: target.nodeID,
                                                          requestTimeout: .seconds(5))
        configuration.acceptsPunches = false
        return RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration)
    }

    /// One flooder: connects, registers, floods keep-alives never reading, and reconnects when closed.
    private func flood(_ target: Target, until stop: ContinuousClock.Instant, tally: FloodTally) async {
        let keepAlive = RendezvousFraming.frame(ClientMessage.keepAlive)
        var batch: [UInt8] = []
        for _ in 0..<256 { batch += keepAlive }
        guard let identity = try? Identity.generate(),
              let endpoint = try? await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(
                  identity: identity, acceptPolicy: .none, streamReceiveWindow: 4_096, connectionReceiveWindow: 4_096))
        else { return }
        defer { Task { await endpoint.close() } }
        while ContinuousClock.now < stop {
            guard let connection = try? await endpoint.connect(to: target.address, expecting: target.nodeID),
                  let stream = try? await connection.openStream() else {
                try? await Task.sleep(for: .milliseconds(50))
                continue
            }
            await tally.connected()
            var frames = 0
            do {
                // Register first, so the control stream is the first the server sees.
                try await stream.write(RendezvousFraming.frame(ClientMessage.register(Registration())))
                // Then every stream the transport allows beyond it, each with data the server would have to park.
                var extras = 0
                while extras < 1_024, let extra = try? await connection.openStream() {
                    try? await extra.write([UInt8](repeating: 0x55, count: 4_096))
                    extras += 1
                }
                await tally.openedExtraStreams(extras)
                while ContinuousClock.now < stop {
                    try await stream.write(batch)
                    frames += 256
                }
                await connection.close()
            } catch {
                let closed = await connection.waitClosed()
                await tally.closed(code: closed.applicationErrorCode)
            }
            await tally.wrote(frames)
        }
    }
}

private struct Target {
    var address: SocketAddress
    var nodeID: NodeID
    var pid: Int32?
    var child: Process?
}

/// What the flooders saw.
private actor FloodTally {
    var connections = 0
    var frames = 0
    var extraStreams = 0
    var closeCodes: [UInt64: Int] = [:]

    func connected() { connections += 1 }
    func wrote(_ count: Int) { frames += count }
    func openedExtraStreams(_ count: Int) { extraStreams += count }
    func closed(code: UInt64?) { closeCodes[code ?? 0, default: 0] += 1 }
    func figures() -> (connections: Int, frames: Int, extraStreams: Int, closeCodes: [UInt64: Int]) {
        (connections, frames, extraStreams, closeCodes)
    }
}

private func row(_ name: String, _ value: String) -> String {
    "  " + name.padding(toLength: 26, withPad: " ", startingAt: 0) + value
}

/// VmRSS of `pid` (or of this process) from /proc, in KiB; 0 where /proc is missing.
private func residentKiB(pid: Int32?) -> Int {
    let path = pid.map { "/proc/\($0)/status" } ?? "/proc/self/status"
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }
    return 0
}

/// Whether `address` is 127.0.0.0/8 or ::1: the only places this bench may send to.
private func isLoopback(_ address: SocketAddress) -> Bool {
    switch address.ip {
    case .v4(let first, _, _, _): first == 127
    case .v6(let bytes): bytes == [UInt8](repeating: 0, count: 15) + [1]
    }
}
