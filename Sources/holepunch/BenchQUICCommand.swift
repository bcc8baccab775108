import ArgumentParser
import Foundation
import HolePunchNet
import HolePunchQUIC
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch bench quic`: bulk throughput and handshake rate of HolePunchQUIC on loopback, optionally side by side
/// with ngtcp2's own C examples (Debian's `gtlsserver`/`gtlsclient`) and with aioquic.
///
/// Every figure is the median of `--runs` runs. Only 127.0.0.1 is used.
struct BenchQUICCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quic",
        abstract: "Loopback QUIC throughput (one stream) and handshakes per second; --compare adds ngtcp2's C examples and aioquic.",
        discussion: """
            Ours: two endpoints in this process, one stream from client to server. The C examples serve and \
            download a file over HTTP/3 (gtlsserver/gtlsclient, packages ngtcp2-server and ngtcp2-client); \
            aioquic runs bench/aioquic_bulk.py in two processes. Throughput is in MB/s (10^6 bytes per second).

            Examples:
              holepunch bench quic
              holepunch bench quic --compare --json bench-results/quic.json
            """
    )

    @Option(help: "Bytes sent on the one stream of the throughput test.")
    var bytes: Int = 256 << 20

    @Option(help: "Handshakes per run of the handshake test.")
    var handshakes: Int = 500

    @Option(help: "Handshakes in flight at once for the concurrent handshake test (0 skips it).")
    var concurrency: Int = 16

    @Option(help: "Runs per measurement; the report shows the median.")
    var runs: Int = 3

    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    @Flag(help: "Also measure ngtcp2's C examples (gtlsserver/gtlsclient) and aioquic on the same workload.")
    var compare = false

    @Option(help: "Python with aioquic (default: $HOLEPUNCH_PYTHON, else .build/venv/bin/python).")
    var python: String?

    @Option(help: "Directory holding aioquic_bulk.py.")
    var benchDir: String = "bench"

    @Option(help: "Handshakes per run for the C examples, one gtlsclient process each (spawn cost included).")
    var cHandshakes: Int = 50

    func validate() throws {
        guard bytes >= 1 << 20 else { throw ValidationError("--bytes must be at least 1 MiB") }
        guard handshakes >= 1 else { throw ValidationError("--handshakes must be at least 1") }
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
        guard concurrency >= 0 else { throw ValidationError("--concurrency must not be negative") }
    }

    func run() async throws {
        let started = Date()
        var report = QUICBenchReport(
            date: ISO8601DateFormatter().string(from: started),
            command: CommandLine.arguments.joined(separator: " "),
            host: QUICBenchReport.hostDescription(),
            bytes: bytes, handshakes: handshakes, concurrency: concurrency, runs: runs
        )

        note("holepunch: \(runs) × \(bytes) bytes over one stream")
        report.add("holepunch", "throughput_MBps", try await repeatRuns { try await Self.ourThroughput(bytes: bytes) })
        note("holepunch: \(runs) × \(handshakes) sequential handshakes")
        report.add("holepunch", "handshakes_per_s_sequential", try await repeatRuns {
            try await Self.ourHandshakes(count: handshakes, concurrency: 1)
        })
        if concurrency > 1 {
            note("holepunch: \(runs) × \(handshakes) handshakes, \(concurrency) in flight")
            report.add("holepunch", "handshakes_per_s_concurrent", try await repeatRuns {
                try await Self.ourHandshakes(count: handshakes, concurrency: concurrency)
            })
        }

        if compare {
            do {
                try runCExamples(into: &report)
            } catch {
                report.notes.append("ngtcp2 C examples: \(error)")
                note("ngtcp2 C examples skipped: \(error)")
            }
            do {
                try runAioquic(into: &report)
            } catch {
                report.notes.append("aioquic: \(error)")
                note("aioquic skipped: \(error)")
            }
        }
        report.computeRatios()
        report.printTable()
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            do {
                try encoder.encode(report).write(to: URL(fileURLWithPath: json))
            } catch {
                note("\(json): cannot write: \(error.localizedDescription)")
                throw ExitCode.failure
            }
        }
    }

    private func repeatRuns(_ body: () async throws -> Double) async throws -> [Double] {
        var values: [Double] = []
        for _ in 0..<runs { values.append(try await body()) }
        return values
    }

    // MARK: HolePunchQUIC

    /// One stream, client to server, in this process. The clock runs from opening the stream until the
    /// server has read the FIN, so every byte has crossed the socket and been consumed.
    static func ourThroughput(bytes: Int) async throws -> Double {
        try await withEndpointPair { client, server, serverID in
            try await ourThroughput(bytes: bytes, client: client, server: server, serverID: serverID)
        }
    }

    static func ourThroughput(bytes: Int, client: Endpoint, server: Endpoint, serverID: NodeID) async throws -> Double {
        let receiver = Task { () -> Int in
            for await connection in server.incoming {
                guard let stream = try await connection.acceptStream() else { return -1 }
                var count = 0
                while let chunk = try await stream.read(maxBytes: 1 << 20) { count += chunk.count }
                return count
            }
            return -1
        }
        let connection = try await client.connect(to: server.localAddress, expecting: serverID)
        let chunk = [UInt8](repeating: 0xa5, count: 256 << 10)
        let clock = ContinuousClock()
        let start = clock.now
        let stream = try await connection.openStream()
        var sent = 0
        while sent < bytes {
            let piece = min(chunk.count, bytes - sent)
            try await stream.write(piece == chunk.count ? chunk : Array(chunk[..<piece]))
            sent += piece
        }
        try await stream.finish()
        let received = try await receiver.value
        let elapsed = clock.now - start
        guard received == bytes else {
            throw QUICBenchError("the server received \(received) of \(bytes) bytes")
        }
        await connection.close()
        return Double(bytes) / elapsed.benchSeconds / 1e6
    }

    /// `count` handshakes from one client endpoint to one server endpoint, `concurrency` in flight at once.
    /// Each is a full mutually authenticated handshake (confirmed), then a close.
    static func ourHandshakes(count: Int, concurrency: Int) async throws -> Double {
        try await withEndpointPair { client, server, serverID in
            try await ourHandshakes(count: count, concurrency: concurrency, client: client, server: server, serverID: serverID)
        }
    }

    static func ourHandshakes(
        count: Int, concurrency: Int, client: Endpoint, server: Endpoint, serverID: NodeID
    ) async throws -> Double {
        // Drain accepted connections so the stream's buffer stays empty; the peer's close ends them.
        let acceptor = Task { for await _ in server.incoming {} }
        defer { acceptor.cancel() }
        let target = server.localAddress
        let clock = ContinuousClock()
        let start = clock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            var launched = 0
            func launch() {
                group.addTask {
                    let connection = try await client.connect(to: target, expecting: serverID)
                    await connection.close()
                }
                launched += 1
            }
            while launched < min(concurrency, count) { launch() }
            while try await group.next() != nil {
                if launched < count { launch() }
            }
        }
        return Double(count) / (clock.now - start).benchSeconds
    }

    /// Runs `body` with a fresh client and server endpoint on 127.0.0.1, and closes both afterwards, even on error.
    static func withEndpointPair<T>(_ body: (Endpoint, Endpoint, NodeID) async throws -> T) async throws -> T {
        let (client, server, serverID) = try await endpointPair()
        let result: Result<T, any Error>
        do {
            result = .success(try await body(client, server, serverID))
        } catch {
            result = .failure(error)
        }
        await client.close()
        await server.close()
        return try result.get()
    }

    static func endpointPair() async throws -> (Endpoint, Endpoint, NodeID) {
        let serverIdentity = try Identity.generate(commonName: "bench-server")
        let clientIdentity = try Identity.generate(commonName: "bench-client")
        // Both ends are told the path's RTT is about a millisecond, as a punch tells them the RTT the rendezvous
        // measured. ngtcp2 paces the handshake by the initial RTT until it has a sample, so the library's default
        // (100 ms, for unknown paths) costs ~5 ms per handshake on loopback: 132 instead of ~590 handshakes/s.
        let server = try await Endpoint.bind(
            .loopbackV4(port: 0),
            configuration: EndpointConfiguration(identity: serverIdentity, acceptPolicy: .any, initialRTT: .milliseconds(1))
        )
        let client = try await Endpoint.bind(
            .loopbackV4(port: 0),
            configuration: EndpointConfiguration(identity: clientIdentity, acceptPolicy: .none, initialRTT: .milliseconds(1))
        )
        return (client, server, serverIdentity.nodeID)
    }

    // MARK: ngtcp2's C examples

    /// Serves a `bytes`-long file with `gtlsserver` and downloads it with `gtlsclient` over HTTP/3, timing the
    /// client process. A small warm-up download first proves the server is up (no sleeping).
    func runCExamples(into report: inout QUICBenchReport) throws {
        let server = try Tools.find("gtlsserver")
        let client = try Tools.find("gtlsclient")
        let work = try Tools.temporaryDirectory("holepunch-bench-c")
        defer { try? FileManager.default.removeItem(at: work) }
        let served = work.appendingPathComponent("www")
        let downloads = work.appendingPathComponent("out")
        try FileManager.default.createDirectory(at: served, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: downloads, withIntermediateDirectories: true)
        try Tools.writeRandomFile(served.appendingPathComponent("blob"), bytes: bytes)
        try Data("ok\n".utf8).write(to: served.appendingPathComponent("small"))
        let identity = try Identity.generate(commonName: "127.0.0.1")
        let keyPath = work.appendingPathComponent("key.pem").path
        let certPath = work.appendingPathComponent("cert.pem").path
        try Data(identity.privateKeyPEM.utf8).write(to: URL(fileURLWithPath: keyPath))
        try Data(identity.certificatePEM.utf8).write(to: URL(fileURLWithPath: certPath))

        let port = try Tools.freeUDPPort()
        let serverProcess = try Tools.spawn(server, ["-q", "-d", served.path, "127.0.0.1", "\(port)", keyPath, certPath])
        defer { Tools.kill(serverProcess) }
        func download(_ file: String) throws -> Double {
            let target = downloads.appendingPathComponent(file)
            try? FileManager.default.removeItem(at: target)
            let seconds = try Tools.timed(client, [
                "-q", "--exit-on-all-streams-close", "--download=\(downloads.path)",
                "127.0.0.1", "\(port)", "https://127.0.0.1:\(port)/\(file)",
            ])
            let size = (try? FileManager.default.attributesOfItem(atPath: target.path)[.size] as? Int) ?? nil
            guard let size, size > 0 else { throw QUICBenchError("gtlsclient did not download \(file)") }
            return seconds
        }
        note("ngtcp2 C examples: warm-up")
        _ = try download("small")
        note("ngtcp2 C examples: \(runs) × \(bytes) bytes (HTTP/3 download)")
        var throughput: [Double] = []
        for _ in 0..<runs {
            let seconds = try download("blob")
            let size = try FileManager.default.attributesOfItem(atPath: downloads.appendingPathComponent("blob").path)[.size] as? Int
            guard size == bytes else { throw QUICBenchError("gtlsclient downloaded \(size ?? -1) of \(bytes) bytes") }
            throughput.append(Double(bytes) / seconds / 1e6)
        }
        report.add("ngtcp2-c-examples", "throughput_MBps", throughput)
        if cHandshakes > 0 {
            note("ngtcp2 C examples: \(runs) × \(cHandshakes) handshakes, one gtlsclient process each")
            var rates: [Double] = []
            for _ in 0..<runs {
                var total = 0.0
                for _ in 0..<cHandshakes { total += try download("small") }
                rates.append(Double(cHandshakes) / total)
            }
            report.add("ngtcp2-c-examples", "handshakes_per_s_process_each", rates)
        }
    }

    // MARK: aioquic

    func runAioquic(into report: inout QUICBenchReport) throws {
        let python = try self.python ?? Tools.defaultPython()
        let script = URL(fileURLWithPath: benchDir).appendingPathComponent("aioquic_bulk.py").path
        guard FileManager.default.fileExists(atPath: script) else {
            throw QUICBenchError("\(script) not found (run from the package root or pass --bench-dir)")
        }
        let (server, ready) = try Tools.spawnAndWaitForLine(python, ["-u", script, "server"], prefix: "READY")
        defer { Tools.kill(server) }
        guard let port = ready.split(separator: "=").last.flatMap({ UInt16($0) }) else {
            throw QUICBenchError("aioquic server printed '\(ready)'")
        }
        func client(_ arguments: [String]) throws -> [String: Double] {
            let output = try Tools.output(python, ["-u", script, "client", "--port", "\(port)"] + arguments)
            guard let line = output.split(separator: "\n").first(where: { $0.hasPrefix("RESULT ") }),
                  let object = try JSONSerialization.jsonObject(with: Data(line.dropFirst(7).utf8)) as? [String: Double]
            else { throw QUICBenchError("aioquic client printed: \(output)") }
            return object
        }
        note("aioquic: warm-up")
        _ = try client(["--handshakes", "1"])
        note("aioquic: \(runs) × \(bytes) bytes")
        var throughput: [Double] = []
        for _ in 0..<runs {
            let result = try client(["--bytes", "\(bytes)"])
            throughput.append(Double(bytes) / (result["seconds"] ?? .infinity) / 1e6)
        }
        report.add("aioquic", "throughput_MBps", throughput)
        note("aioquic: \(runs) × \(handshakes) sequential handshakes")
        var rates: [Double] = []
        for _ in 0..<runs {
            let result = try client(["--handshakes", "\(handshakes)"])
            rates.append(Double(handshakes) / (result["seconds"] ?? .infinity))
        }
        report.add("aioquic", "handshakes_per_s_sequential", rates)
    }

    private func note(_ text: String) {
        FileHandle.standardError.write(Data(("bench quic: " + text + "\n").utf8))
    }
}

/// A benchmark step that could not run or produced a wrong result.
struct QUICBenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// What `bench quic` measured; encoded as the `--json` file.
struct QUICBenchReport: Codable {
    struct Measurement: Codable {
        var runs: [Double]
        var median: Double
    }

    var date: String
    var command: String
    var host: String
    var bytes: Int
    var handshakes: Int
    var concurrency: Int
    var runs: Int
    /// implementation → metric → runs and median.
    var results: [String: [String: Measurement]] = [:]
    /// "ours / theirs" for each metric both measured.
    var ratios: [String: Double] = [:]
    var notes: [String] = []

    mutating func add(_ implementation: String, _ metric: String, _ values: [Double]) {
        let sorted = values.sorted()
        let middle = sorted.count / 2
        let median = sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
        results[implementation, default: [:]][metric] = Measurement(runs: values, median: median)
    }

    mutating func computeRatios() {
        guard let ours = results["holepunch"] else { return }
        for (other, label) in [("ngtcp2-c-examples", "c_examples"), ("aioquic", "aioquic")] {
            guard let theirs = results[other] else { continue }
            for (metric, measurement) in ours {
                if let their = theirs[metric], their.median > 0 {
                    ratios["\(metric)_ours_over_\(label)"] = measurement.median / their.median
                }
            }
        }
    }

    func printTable() {
        let order = ["holepunch", "ngtcp2-c-examples", "aioquic"]
        let metrics = [
            ("throughput_MBps", "throughput MB/s"),
            ("handshakes_per_s_sequential", "handshakes/s sequential"),
            ("handshakes_per_s_concurrent", "handshakes/s \(concurrency) in flight"),
            ("handshakes_per_s_process_each", "handshakes/s (1 process each)"),
        ]
        var rows = [["implementation", "metric", "median", "runs"]]
        for implementation in order {
            for (key, label) in metrics {
                guard let m = results[implementation]?[key] else { continue }
                rows.append([implementation, label, format(m.median), m.runs.map(format).joined(separator: ", ")])
            }
        }
        print("bench quic: \(bytes) bytes, \(handshakes) handshakes, median of \(runs) runs, \(host)")
        print(table(rows))
        if !ratios.isEmpty {
            print("")
            print(table([["ratio", "value"]] + ratios.keys.sorted().map { [$0, String(format: "%.2f×", ratios[$0]!)] }))
        }
        for note in notes { print("note: \(note)") }
    }

    private func format(_ value: Double) -> String { String(format: value >= 100 ? "%.0f" : "%.1f", value) }

    private func table(_ rows: [[String]]) -> String {
        var widths = [Int](repeating: 0, count: rows.map(\.count).max() ?? 0)
        for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
        return rows.map { row in
            row.enumerated().map { i, cell in cell.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }.joined(separator: "\n")
    }

    static func hostDescription() -> String {
        var name = utsname()
        uname(&name)
        let release = withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return "Linux \(release), \(ProcessInfo.processInfo.activeProcessorCount) CPUs"
    }
}

/// Process and file helpers for the comparison runs. Every process is ours, and is ended by its PID.
enum Tools {
    static func find(_ tool: String) throws -> String {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"] {
            let path = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        throw QUICBenchError("\(tool) is not installed (apt-get install ngtcp2-server ngtcp2-client)")
    }

    static func defaultPython() throws -> String {
        let candidates = [ProcessInfo.processInfo.environment["HOLEPUNCH_PYTHON"] ?? "", ".build/venv/bin/python"]
        guard let found = candidates.first(where: { !$0.isEmpty && FileManager.default.isExecutableFile(atPath: $0) })
        else { throw QUICBenchError("no Python with aioquic: run `make deps` or pass --python") }
        return found
    }

    static func temporaryDirectory(_ prefix: String) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Random content, so nothing along the way can take a shortcut on repetitive data.
    static func writeRandomFile(_ url: URL, bytes: Int) throws {
        guard FileManager.default.createFile(atPath: url.path, contents: nil) else {
            throw QUICBenchError("cannot create \(url.path)")
        }
        let handle = try FileHandle(forWritingTo: url)
        defer { try? handle.close() }
        var generator = SystemRandomNumberGenerator()
        var block = [UInt8](repeating: 0, count: 1 << 20)
        var written = 0
        while written < bytes {
            block.withUnsafeMutableBytes { raw in
                for i in stride(from: 0, to: raw.count, by: 8) {
                    raw.storeBytes(of: generator.next() as UInt64, toByteOffset: i, as: UInt64.self)
                }
            }
            let count = min(block.count, bytes - written)
            try handle.write(contentsOf: block[..<count])
            written += count
        }
    }

    /// A UDP port that was free on 127.0.0.1 a moment ago (for tools that cannot bind port 0 and report it).
    static func freeUDPPort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw QUICBenchError("socket(): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bound = SocketAddress.loopbackV4(port: 0).withSockAddr { Glibc.bind(fd, $0, $1) }
        guard bound == 0 else { throw QUICBenchError("bind: \(String(cString: strerror(errno)))") }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let address = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) } }
        guard let address else { throw QUICBenchError("getsockname failed") }
        return address.port
    }

    static func spawn(_ path: String, _ arguments: [String], stdout: Any? = FileHandle.nullDevice) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardOutput = stdout
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Ends a process we started: SIGKILL to its PID, because a child may inherit a mask that blocks SIGTERM.
    static func kill(_ process: Process) {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// Runs a tool to completion and returns the wall-clock seconds it took; a non-zero exit is an error.
    static func timed(_ path: String, _ arguments: [String]) throws -> Double {
        let clock = ContinuousClock()
        let start = clock.now
        let process = try spawn(path, arguments)
        process.waitUntilExit()
        let elapsed = clock.now - start
        guard process.terminationStatus == 0 else {
            throw QUICBenchError("\((path as NSString).lastPathComponent) exited with \(process.terminationStatus)")
        }
        return elapsed.benchSeconds
    }

    /// Runs a tool to completion and returns its stdout; a non-zero exit is an error.
    static func output(_ path: String, _ arguments: [String]) throws -> String {
        let pipe = Pipe()
        let process = try spawn(path, arguments, stdout: pipe)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw QUICBenchError("\((path as NSString).lastPathComponent) exited with \(process.terminationStatus): \(text)")
        }
        return text
    }

    /// Starts a process and blocks until it prints a line starting with `prefix` (or exits, which is an error).
    static func spawnAndWaitForLine(_ path: String, _ arguments: [String], prefix: String) throws -> (Process, String) {
        let pipe = Pipe()
        let process = try spawn(path, arguments, stdout: pipe)
        var pending = Data()
        while true {
            let chunk = pipe.fileHandleForReading.availableData
            if chunk.isEmpty {
                kill(process)
                throw QUICBenchError("\((path as NSString).lastPathComponent) exited before printing '\(prefix)'")
            }
            pending.append(chunk)
            let text = String(decoding: pending, as: UTF8.self)
            if let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) {
                return (process, String(line))
            }
        }
    }
}

extension Duration {
    /// The duration in fractional seconds.
    fileprivate var benchSeconds: Double {
        let parts = components
        return Double(parts.seconds) + Double(parts.attoseconds) / 1e18
    }
}
