import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchLab
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch bench initials`: a flood of client Initials that nobody follows up (what spoofed Initials look like),
/// aimed at a punch target on loopback while a real punch to that target runs.
///
/// Only 127.0.0.0/8 is used: the flood leaves from sockets bound to many loopback addresses, one per "source".
struct BenchInitialsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "initials",
        abstract: "Unanswered client Initials at a fixed rate against a punch target on loopback, with a real punch during the flood.",
        discussion: """
            For each address-validation mode: the target's endpoint is flooded for --seconds; after one second a real \
            punch (its own initiator endpoint) starts. The report gives whether the punch connected and how fast, \
            the CPU the target process spent besides the flood sender, and the endpoint's counters. Mode "off" \
            imitates the endpoint before address validation (no Retry, no per-host cap).

            Examples:
              holepunch bench initials
              holepunch bench initials --rate 20000 --json bench-results/initials.json
            """
    )

    /// An address-validation setting to measure.
    enum Mode: String, ExpressibleByArgument, CaseIterable, Codable {
        case off
        case underLoad = "under-load"
        case always
    }

    @Option(help: "Initials per second.")
    var rate: Int = 5000

    @Option(help: "Seconds of flood per mode.")
    var seconds: Double = 3

    @Option(help: "Source sockets, each on its own 127.x.y.z address.")
    var sources: Int = 256

    @Option(help: "Distinct Initials made before the flood (0: rate × seconds); the flood cycles through them.")
    var pool: Int = 0

    @Option(parsing: .upToNextOption, help: "Modes to measure: off, under-load, always.")
    var modes: [Mode] = Mode.allCases

    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        guard rate >= 1 else { throw ValidationError("--rate must be at least 1") }
        guard seconds >= 1.5 else { throw ValidationError("--seconds must be at least 1.5 (the punch starts after 1 s)") }
        guard (1...60_000).contains(sources) else { throw ValidationError("--sources must be 1–60000") }
        guard pool >= 0 else { throw ValidationError("--pool must not be negative") }
    }

    func run() async throws {
        var results: [InitialFloodResult] = []
        for mode in modes {
            results.append(try await InitialFlood.run(
                mode: mode, rate: rate, seconds: seconds, sources: sources,
                pool: pool > 0 ? pool : Int(Double(rate) * seconds)
            ))
        }
        InitialFloodResult.printTable(results)
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(results).write(to: URL(fileURLWithPath: json))
            print("wrote \(json)")
        }
    }
}

/// What one mode of `bench initials` measured.
struct InitialFloodResult: Codable {
    var mode: BenchInitialsCommand.Mode
    var initialsSent: Int
    var floodSeconds: Double
    var punchConnected: Bool
    var punchError: String?
    var timeToConnectMs: Double?
    /// CPU (user + system) of the process from the flood's start until both the flood and the punch ended, minus
    /// the flood sender thread's own: the target endpoint's work, plus the (small) initiator's.
    var endpointCPUSeconds: Double
    /// ``endpointCPUSeconds`` over that window, in % of one core.
    var endpointCPUPercent: Double
    var incomingHandshakesStarted: Int
    var retriesSent: Int
    var initialsRefused: Int
    var datagramsReceived: Int
    var datagramsDropped: Int
    var sendErrors: Int
    var handshakeFailures: Int
    var connectionsAccepted: Int
    var connectionsAtEnd: Int

    static func printTable(_ results: [InitialFloodResult]) {
        let header = ["mode", "sent/s", "punch", "connect ms", "target CPU", "TLS sessions", "retries", "refused", "conns at end"]
        var rows = [header]
        for r in results {
            rows.append([
                r.mode.rawValue,
                String(format: "%.0f", Double(r.initialsSent) / r.floodSeconds),
                r.punchConnected ? "connected" : "failed",
                r.timeToConnectMs.map { String(format: "%.1f", $0) } ?? "-",
                String(format: "%.2f s (%.0f %%)", r.endpointCPUSeconds, r.endpointCPUPercent),
                "\(r.incomingHandshakesStarted)", "\(r.retriesSent)", "\(r.initialsRefused)", "\(r.connectionsAtEnd)",
            ])
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        for (index, row) in rows.enumerated() {
            print("| " + row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: " | ") + " |")
            if index == 0 { print("|" + widths.map { String(repeating: "-", count: $0 + 2) }.joined(separator: "|") + "|") }
        }
        for r in results where r.punchError != nil { print("\(r.mode.rawValue): \(r.punchError!)") }
    }
}

enum InitialFlood {
    static func run(mode: BenchInitialsCommand.Mode, rate: Int, seconds: Double, sources: Int, pool: Int) async throws -> InitialFloodResult {
        let targetIdentity = try Identity.generate(commonName: "bench-target")
        let initiatorIdentity = try Identity.generate(commonName: "bench-initiator")
        var configuration = EndpointConfiguration(identity: targetIdentity, acceptPolicy: .none)
        switch mode {
        case .off:
            configuration.addressValidation = .underLoad(pendingHandshakes: .max)
            configuration.maxUnvalidatedHandshakesPerHost = .max
        case .underLoad: break
        case .always: configuration.addressValidation = .always
        }
        let target = try await Endpoint.bind(.loopbackV4(port: 0), configuration: configuration)
        let targetExecutor = PunchExecutor(endpoint: target)
        await targetExecutor.start()
        let initiator = try await Endpoint.bind(
            .loopbackV4(port: 0), configuration: EndpointConfiguration(identity: initiatorIdentity, acceptPolicy: .none)
        )
        let initiatorExecutor = PunchExecutor(endpoint: initiator)

        let forge = try InitialForge(identity: try Identity.generate(commonName: "bench-flood"))
        var initials: [[UInt8]] = []
        initials.reserveCapacity(pool)
        for _ in 0..<pool { initials.append(try forge.make(from: .loopbackV4(port: 9), to: target.localAddress)) }
        let sender = try FloodSender(sources: sources, to: target.localAddress, initials: initials, rate: rate, seconds: seconds)

        let cpuBefore = PunchBenchmark.cpuSeconds()
        let clock = ContinuousClock()
        let measureStart = clock.now
        sender.start()
        try await Task.sleep(for: .seconds(1))
        let key = (0..<32).map { _ in UInt8.random(in: 0...255) }
        let strategy = PunchBenchmark.LoopbackStrategy()
        let targetHandle = await targetExecutor.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [initiator.localAddress.port], sessionID: "flood", sessionKey: key,
            role: .target, targetNodeID: initiatorIdentity.nodeID, strategy: strategy, timeout: .seconds(10)
        ))
        let handle = await initiatorExecutor.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [target.localAddress.port], sessionID: "flood", sessionKey: key,
            role: .initiator, targetNodeID: targetIdentity.nodeID, strategy: strategy, timeout: .seconds(10)
        ))
        var timeToConnect: Duration?
        for await event in handle.events {
            if case .done(.success(let success)) = event { timeToConnect = success.timeToConnect }
        }
        let result = await handle.result()
        _ = await targetHandle.result()
        let (sent, floodSeconds, senderCPU) = await sender.finish()
        let cpu = PunchBenchmark.cpuSeconds() - cpuBefore - senderCPU
        let window = clock.now - measureStart
        let stats = await target.stats
        let connectionsAtEnd = await target.connectionCount
        var punchError: String?
        switch result {
        case .success(let connection): await connection.close()
        case .failure(let error): punchError = "\(error)"
        }
        await initiatorExecutor.shutdown()
        await targetExecutor.shutdown()
        await initiator.close()
        await target.close()
        // The window runs until both the flood and the punch ended (a failing punch outlasts the flood).
        let wall = max(Double(window.components.seconds) + Double(window.components.attoseconds) / 1e18, 0.001)
        return InitialFloodResult(
            mode: mode, initialsSent: sent, floodSeconds: floodSeconds, punchConnected: punchError == nil,
            punchError: punchError,
            timeToConnectMs: timeToConnect.map { Double($0.components.seconds) * 1000 + Double($0.components.attoseconds) / 1e15 },
            endpointCPUSeconds: cpu, endpointCPUPercent: cpu / wall * 100,
            incomingHandshakesStarted: stats.incomingHandshakesStarted, retriesSent: stats.retriesSent,
            initialsRefused: stats.initialsRefused, datagramsReceived: stats.datagramsReceived,
            datagramsDropped: stats.datagramsDropped, sendErrors: stats.sendErrors,
            handshakeFailures: stats.handshakeFailures, connectionsAccepted: stats.connectionsAccepted,
            connectionsAtEnd: connectionsAtEnd
        )
    }
}

/// Sends the Initials round-robin from `sources` sockets at a fixed rate on its own thread, for a fixed time.
/// The sockets never read: like spoofed sources, they ignore what the target answers.
final class FloodSender: @unchecked Sendable {
    // Safe: the thread reads only lets; `sent`, `elapsed` and `cpu` are written by the thread before it signals
    // `done`, and read by `finish` only after waiting on it.
    private let sockets: [Int32]
    private let destination: SocketAddress
    private let initials: [[UInt8]]
    private let rate: Int
    private let seconds: Double
    private let done = DispatchSemaphore(value: 0)
    private var sent = 0
    private var elapsed = 0.0
    private var cpu = 0.0

    init(sources: Int, to destination: SocketAddress, initials: [[UInt8]], rate: Int, seconds: Double) throws {
        var sockets: [Int32] = []
        for index in 0..<sources {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw QUICBenchError("socket(): \(String(cString: strerror(errno)))") }
            // 127.1.0.1, 127.1.0.2, …: distinct loopback sources, away from the target's 127.0.0.1.
            let source = SocketAddress(ip: .v4(127, 1, UInt8(index / 250), UInt8(index % 250 + 1)), port: 0)
            guard source.withSockAddr({ bind(fd, $0, $1) }) == 0 else {
                close(fd)
                throw QUICBenchError("bind(\(source)): \(String(cString: strerror(errno)))")
            }
            sockets.append(fd)
        }
        self.sockets = sockets
        self.destination = destination
        self.initials = initials
        self.rate = rate
        self.seconds = seconds
    }

    func start() {
        Thread { [self] in
            let startCPU = threadCPUSeconds()
            let start = monotonicSeconds()
            var index = 0
            while true {
                let now = monotonicSeconds() - start
                if now >= seconds { break }
                let due = Int(now * Double(rate))
                while sent < due {
                    let datagram = initials[index % initials.count]
                    let fd = sockets[index % sockets.count]
                    _ = datagram.withUnsafeBytes { bytes in
                        destination.withSockAddr { sendto(fd, bytes.baseAddress, bytes.count, 0, $0, $1) }
                    }
                    index += 1
                    sent += 1
                }
                usleep(500)
            }
            elapsed = monotonicSeconds() - start
            cpu = threadCPUSeconds() - startCPU
            done.signal()
        }.start()
    }

    /// Waits for the flood to end; returns the Initials sent, the seconds it took, and the sender thread's CPU.
    func finish() async -> (Int, Double, Double) {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async {
                self.done.wait()
                continuation.resume()
            }
        }
        for fd in sockets { close(fd) }
        return (sent, elapsed, cpu)
    }

    private func monotonicSeconds() -> Double {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
    }

    private func threadCPUSeconds() -> Double {
        var spec = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &spec)
        return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
    }
}
