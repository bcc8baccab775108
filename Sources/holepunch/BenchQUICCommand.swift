import ArgumentParser
import Foundation
import HolePunchNet
import HolePunchQUIC
import HolePunchLab
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

    /// `target` is where the client dials (the server's address by default; `bench relay` passes a relayed address).
    static func ourThroughput(
        bytes: Int, client: Endpoint, server: Endpoint, serverID: NodeID, target: SocketAddress? = nil
    ) async throws -> Double {
        let receiver = Task { () -> Int in
            for await connection in server.incoming {
                guard let stream = try await connection.acceptStream() else { return -1 }
                var count = 0
                while let chunk = try await stream.read(maxBytes: 1 << 20) { count += chunk.count }
                return count
            }
            return -1
        }
        let connection = try await client.connect(to: target ?? server.localAddress, expecting: serverID)
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
