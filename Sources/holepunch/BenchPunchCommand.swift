import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch bench punch`: many simultaneous punches on loopback, and how fast a cancel really stops one.
struct BenchPunchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "punch",
        abstract: "Simultaneous punches on loopback: time to connect, peak RSS, CPU, and cancel latency.",
        discussion: """
            Every initiator has its own UDP socket (endpoint) and identity; one target endpoint serves all sessions.
            Time to connect runs from each punch's start instant to its authenticated QUIC connection. Cancel latency
            runs from `cancel(id)` to the delivered `cancelled` result with the punch's sockets closed, measured on
            punches probing silent ports.

            Examples:
              holepunch bench punch
              holepunch bench punch --concurrent 1000 --json bench-results/punch.json
            """
    )

    @Option(help: "How many punches run at once.")
    var concurrent = 1000

    @Option(help: "How many punches to cancel for the cancel-latency figures.")
    var cancels = 500

    @Option(help: "Write the figures as JSON to this file.")
    var json: String?

    func validate() throws {
        guard (1...5000).contains(concurrent) else { throw ValidationError("--concurrent must be 1...5000") }
        guard (1...10000).contains(cancels) else { throw ValidationError("--cancels must be 1...10000") }
    }

    func run() async throws {
        raiseDescriptorLimit()
        let report = try await PunchBenchmark.run(concurrent: concurrent, cancels: cancels)
        report.printTable()
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(report).write(to: URL(fileURLWithPath: json))
            print("wrote \(json)")
        }
    }

    /// Each initiator needs a socket: lift the soft descriptor limit to the hard one.
    private func raiseDescriptorLimit() {
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
    }
}

/// What `bench punch` measured.
struct PunchBenchReport: Codable {
    var concurrent: Int
    var succeeded: Int
    var failures: [String: Int]
    var timeToConnectMedianMs: Double
    var timeToConnectP95Ms: Double
    var wallSeconds: Double
    var cpuSeconds: Double
    /// Process CPU (user+sys, both sides of every punch, setup and teardown included) divided by the punches run.
    var cpuPerPunchMs: Double
    var peakRSSMB: Double
    var cancels: Int
    var cancelP50Ms: Double
    var cancelP99Ms: Double
    var cancelMaxMs: Double

    func printTable() {
        let rows: [(String, String, String)] = [
            ("punches succeeded", "\(succeeded) / \(concurrent)", "all"),
            ("time to connect, median", String(format: "%.1f ms", timeToConnectMedianMs), "< 100 ms"),
            ("time to connect, p95", String(format: "%.1f ms", timeToConnectP95Ms), ""),
            ("wall time for all", String(format: "%.2f s", wallSeconds), ""),
            ("CPU time (user+sys)", String(format: "%.2f s", cpuSeconds), ""),
            ("CPU per punch (both sides)", String(format: "%.2f ms", cpuPerPunchMs), "<= 1 ms"),
            ("peak RSS", String(format: "%.0f MB", peakRSSMB), "< 200 MB"),
            ("cancel latency, p50 (\(cancels) punches)", String(format: "%.3f ms", cancelP50Ms), ""),
            ("cancel latency, p99", String(format: "%.3f ms", cancelP99Ms), "< 2 ms"),
        ]
        let width = rows.map(\.0.count).max() ?? 0
        print("| measure".padding(toLength: width + 2, withPad: " ", startingAt: 0) + " | value        | goal     |")
        print("|" + String(repeating: "-", count: width + 1) + "|--------------|----------|")
        for (name, value, goal) in rows {
            print("| " + name.padding(toLength: width, withPad: " ", startingAt: 0) + " | "
                  + value.padding(toLength: 12, withPad: " ", startingAt: 0) + " | "
                  + goal.padding(toLength: 8, withPad: " ", startingAt: 0) + " |")
        }
        if !failures.isEmpty { print("failures: \(failures)") }
    }
}

enum PunchBenchmark {
    /// A plan for loopback: one port, probes every 20 ms, generous timeout so load cannot fake a failure.
    struct LoopbackStrategy: PunchStrategy {
        let name = "bench-loopback"
        func plan(_ ctx: PunchContext) throws -> PunchPlan {
            PunchPlan(
                ports: PortList(ports: ctx.candidatePorts), localSockets: 1, packetsPerRound: 1,
                interval: .milliseconds(20), rounds: 50, timeout: .seconds(30), connectTimeout: .seconds(10),
                startDelay: .zero, initialRTT: .milliseconds(20), dialCandidatesDirectly: false
            )
        }
    }

    /// The loopback plan with one extra local socket, so a cancel has a socket to close.
    struct TwoSocketStrategy: PunchStrategy {
        let name = "bench-two-sockets"
        func plan(_ ctx: PunchContext) throws -> PunchPlan {
            var plan = try LoopbackStrategy().plan(ctx)
            plan.localSockets = 2
            return plan
        }
    }

    static func run(concurrent: Int, cancels: Int) async throws -> PunchBenchReport {
        let cpuBefore = cpuSeconds()
        let targetIdentity = try Identity.generate(commonName: "bench-target")
        let initiatorIdentity = try Identity.generate(commonName: "bench-initiator")
        // One target serves every punch, and every initiator shares one NodeID and the loopback IP: the per-peer and
        // per-process punch caps and the per-host handshake cap (docs/security.md) are lifted to the load asked for,
        // or they, not the punch machinery, would be what this measures.
        var targetConfiguration = EndpointConfiguration(identity: targetIdentity, acceptPolicy: .none)
        targetConfiguration.maxPendingHandshakesPerHost = max(targetConfiguration.maxPendingHandshakesPerHost, concurrent)
        let target = try await Endpoint.bind(.loopbackV4(port: 0), configuration: targetConfiguration)
        var executorConfiguration = PunchExecutor.Configuration()
        executorConfiguration.maxConcurrentPunches = max(executorConfiguration.maxConcurrentPunches, concurrent)
        executorConfiguration.maxPunchesPerPeer = max(executorConfiguration.maxPunchesPerPeer, concurrent)
        let targetExecutor = PunchExecutor(endpoint: target, configuration: executorConfiguration)
        var initiators: [(Endpoint, PunchExecutor)] = []
        for _ in 0..<concurrent {
            let endpoint = try await Endpoint.bind(
                .loopbackV4(port: 0), configuration: EndpointConfiguration(identity: initiatorIdentity, acceptPolicy: .none)
            )
            initiators.append((endpoint, PunchExecutor(endpoint: endpoint)))
        }
        let strategy = LoopbackStrategy()
        let clock = ContinuousClock()
        let started = clock.now
        var times: [Double] = []
        var failures: [String: Int] = [:]
        var connections: [QUICConnection] = []
        try await withThrowingTaskGroup(of: Result<(QUICConnection, Duration), PunchError>.self) { group in
            for (index, (endpoint, executor)) in initiators.enumerated() {
                let key = (0..<32).map { _ in UInt8.random(in: 0...255) }
                let session = "bench\(index)"
                let targetHandle = await targetExecutor.startPunch(PunchOptions(
                    targetHost: "127.0.0.1", targetPorts: [endpoint.localAddress.port], sessionID: session, sessionKey: key,
                    role: .target, targetNodeID: initiatorIdentity.nodeID, strategy: strategy
                ))
                group.addTask {
                    let handle = await executor.startPunch(PunchOptions(
                        targetHost: "127.0.0.1", targetPorts: [target.localAddress.port], sessionID: session, sessionKey: key,
                        role: .initiator, targetNodeID: targetIdentity.nodeID, strategy: strategy
                    ))
                    var timeToConnect: Duration = .zero
                    for await event in handle.events {
                        if case .done(.success(let success)) = event { timeToConnect = success.timeToConnect }
                    }
                    _ = await targetHandle.result()
                    return await handle.result().map { ($0, timeToConnect) }
                }
            }
            for try await result in group {
                switch result {
                case .success(let (connection, time)):
                    times.append(Double(time.components.attoseconds) / 1e15 + Double(time.components.seconds) * 1000)
                    connections.append(connection)
                case .failure(let error):
                    failures[error.code.rawValue, default: 0] += 1
                }
            }
        }
        let wall = clock.now - started
        let rss = peakRSSMegabytes()
        for connection in connections { await connection.close() }
        for (endpoint, executor) in initiators {
            await executor.shutdown()
            await endpoint.close()
        }
        await targetExecutor.shutdown()
        await target.close()
        let cpu = cpuSeconds() - cpuBefore

        let cancelTimes = try await measureCancels(count: cancels)
        times.sort()
        return PunchBenchReport(
            concurrent: concurrent, succeeded: times.count, failures: failures,
            timeToConnectMedianMs: percentile(times, 0.5), timeToConnectP95Ms: percentile(times, 0.95),
            wallSeconds: Double(wall.components.seconds) + Double(wall.components.attoseconds) / 1e18,
            cpuSeconds: cpu, cpuPerPunchMs: cpu * 1000 / Double(concurrent), peakRSSMB: rss, cancels: cancelTimes.count,
            cancelP50Ms: percentile(cancelTimes, 0.5), cancelP99Ms: percentile(cancelTimes, 0.99),
            cancelMaxMs: cancelTimes.last ?? 0
        )
    }

    /// Cancels punches that probe a silent socket from two local sockets, one after another, and times cancel →
    /// result; the executor delivers the result only after the extra socket is closed.
    static func measureCancels(count: Int) async throws -> [Double] {
        let identity = try Identity.generate(commonName: "bench-cancel")
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
        let executor = PunchExecutor(endpoint: endpoint)
        let silent = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(silent) }
        _ = SocketAddress.loopbackV4(port: 0).withSockAddr { bind(silent, $0, $1) }
        let port = SocketAddress(boundTo: silent)?.port ?? 0
        let clock = ContinuousClock()
        var samples: [Double] = []
        for index in 0..<count {
            let handle = await executor.startPunch(PunchOptions(
                targetHost: "127.0.0.1", targetPorts: [port], sessionID: "cancel\(index)", sessionKey: [1, 2, 3, 4],
                role: .initiator, targetNodeID: identity.nodeID, strategy: TwoSocketStrategy()
            ))
            // Let it probe for a round or two, so cancel lands mid-probe.
            for await event in handle.events {
                if case .roundStarted(let round, _) = event, round >= 2 { break }
            }
            let start = clock.now
            await executor.cancel(handle.id)
            _ = await handle.result()
            let elapsed = clock.now - start
            samples.append(Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15)
        }
        await executor.shutdown()
        await endpoint.close()
        return samples.sorted()
    }

    static func percentile(_ sorted: [Double], _ p: Double) -> Double {
        guard !sorted.isEmpty else { return 0 }
        let index = min(sorted.count - 1, max(0, Int((Double(sorted.count) * p).rounded(.up)) - 1))
        return sorted[index]
    }

    static func cpuSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }

    /// Peak resident set size: the kernel's high-water mark, `ru_maxrss` (kilobytes on Linux).
    static func peakRSSMegabytes() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_maxrss) / 1024
    }
}
