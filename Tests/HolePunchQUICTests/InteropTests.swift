import ProcessTestSupport
import Foundation
import Testing
@testable import HolePunchQUIC
import HolePunchNet

/// Runs the aioquic peers in `Tests/interop/` with the Python from `make deps`.
///
/// aioquic is an independent QUIC and TLS stack (Python, `cryptography`), so a handshake with it checks our wire
/// format, our mutual TLS and our NodeID definition against code that shares nothing with ngtcp2 or GnuTLS.
enum AioquicPeer {
    /// The package root, found from this file's path: `Tests/HolePunchQUICTests/InteropTests.swift`.
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static var isCI: Bool {
        let value = ProcessInfo.processInfo.environment["CI"]?.lowercased() ?? ""
        return value == "true" || value == "1"
    }

    /// `HOLEPUNCH_PYTHON` (set by `make test`), else the venv that `make deps` creates under `.build/`.
    static var python: String? {
        let candidates: [String?] = [
            ProcessInfo.processInfo.environment["HOLEPUNCH_PYTHON"],
            packageRoot.appendingPathComponent(".build/venv/bin/python").path,
        ]
        return candidates.compactMap { $0 }.first { !$0.isEmpty && FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Outside CI the tests skip without the venv; in CI they always run, so a missing venv fails them.
    static var available: Bool { isCI || python != nil }

    static func script(_ name: String) -> String {
        packageRoot.appendingPathComponent("Tests/interop/\(name)").path
    }
}

/// Why a peer script did not do what the test waited for.
struct PeerScriptError: Error, CustomStringConvertible {
    var description: String
}

/// One Python process started by a test, with its stdout as an async sequence of lines.
///
/// Readiness and results come from lines the script prints (`READY port=…`), never from sleeping.
/// ``terminate()`` signals exactly the PID this object started.
final class PeerScript: Sendable {
    private let process: Process
    private let input: FileHandle
    /// Lines from stdout, in order; finishes when the process closes stdout.
    let lines: AsyncStream<String>
    private let exitStatus: AsyncStream<Int32>
    /// Everything the process printed (stdout and stderr), for failure messages.
    let transcript: Transcript

    /// A thread-safe log of a process's output.
    final class Transcript: @unchecked Sendable {
        private let lock = NSLock()
        private var text = ""
        func append(_ line: String) { lock.withLock { text += line + "\n" } }
        var contents: String { lock.withLock { text } }
    }

    init(python: String, script: String, arguments: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        // -u: unbuffered, so every protocol line arrives as soon as it is printed.
        process.arguments = ["-u", script] + arguments
        process.currentDirectoryURL = URL(fileURLWithPath: script).deletingLastPathComponent()
        let stdout = Pipe()
        let stderr = Pipe()
        let stdin = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = stdin
        let transcript = Transcript()
        let (lines, lineContinuation) = AsyncStream.makeStream(of: String.self)
        let (exitStatus, exitContinuation) = AsyncStream.makeStream(of: Int32.self)
        process.terminationHandler = { finished in
            exitContinuation.yield(finished.terminationStatus)
            exitContinuation.finish()
        }
        try process.run()
        self.process = process
        self.input = stdin.fileHandleForWriting
        self.lines = lines
        self.exitStatus = exitStatus
        self.transcript = transcript
        // Blocking reads on dedicated threads: they end at EOF, when the process exits.
        Self.pump(stdout.fileHandleForReading) { line in
            transcript.append(line)
            lineContinuation.yield(line)
        } atEnd: {
            lineContinuation.finish()
        }
        Self.pump(stderr.fileHandleForReading) { line in
            transcript.append("stderr: " + line)
        } atEnd: {}
    }

    private static func pump(
        _ handle: FileHandle, line: @escaping @Sendable (String) -> Void, atEnd: @escaping @Sendable () -> Void
    ) {
        Thread {
            var pending = Data()
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                pending.append(chunk)
                while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                    line(String(decoding: pending[pending.startIndex..<newline], as: UTF8.self))
                    pending = Data(pending[pending.index(after: newline)...])
                }
            }
            if !pending.isEmpty { line(String(decoding: pending, as: UTF8.self)) }
            atEnd()
        }.start()
    }

    /// Waits for the next stdout line starting with `prefix`, skipping others.
    ///
    /// - Throws: ``PeerScriptError`` when the process exits first, or ``TimeoutError`` after `limit`.
    func expectLine(_ prefix: String, within limit: Duration = .seconds(30)) async throws -> String {
        let lines = self.lines
        do {
            return try await withDeadline(limit) {
                for await line in lines where line.hasPrefix(prefix) { return line }
                throw PeerScriptError(description: "the script ended without printing '\(prefix)…'")
            }
        } catch {
            throw PeerScriptError(description: "waiting for '\(prefix)…': \(error)\n--- transcript ---\n\(transcript.contents)")
        }
    }

    /// Writes one line to the process's stdin.
    func send(_ line: String) throws {
        try input.write(contentsOf: Data((line + "\n").utf8))
    }

    /// Waits for the process to exit by itself and returns its status.
    func waitForExit(within limit: Duration = .seconds(30)) async throws -> Int32 {
        let exitStatus = self.exitStatus
        return try await withDeadline(limit) {
            for await status in exitStatus { return status }
            return -1
        }
    }

    /// Ends the process this object started (SIGTERM to its PID only) and reaps it.
    func terminate() {
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        try? input.close()
    }
}

/// The value of `name=value` in a space-separated protocol line.
func field(_ name: String, of line: String) -> String? {
    line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
}

/// Random bytes for an echo payload.
func randomPayload(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        for i in stride(from: 0, to: count - count % 8, by: 8) {
            raw.storeBytes(of: generator.next() as UInt64, toByteOffset: i, as: UInt64.self)
        }
    }
    return bytes
}

@Suite(
    "Interop with aioquic",
    .serialized,
    .enabled(if: AioquicPeer.available, "no aioquic venv (run `make deps`, or set HOLEPUNCH_PYTHON); CI requires it")
)
struct QUICInteropTests {
    static let payloadSize = 1 << 20

    func python() throws -> String {
        try #require(AioquicPeer.python, "the aioquic venv is missing (HOLEPUNCH_PYTHON or .build/venv/bin/python)")
    }

    /// Starts the aioquic echo server pinned to `client` and returns its port and announced NodeID.
    /// `alpn` "" makes the server negotiate no protocol at all.
    func startServer(expecting client: NodeID, alpn: String? = nil) async throws -> (PeerScript, UInt16, NodeID) {
        let server = try PeerScript(
            python: try python(), script: AioquicPeer.script("aioquic_echo_server.py"),
            arguments: ["--expect-client", client.description] + (alpn.map { ["--alpn", $0] } ?? [])
        )
        do {
            let ready = try await server.expectLine("READY")
            let port = try #require(field("port", of: ready).flatMap { UInt16($0) }, "bad READY line: \(ready)")
            let nodeID = try NodeID(parsing: try #require(field("nodeid", of: ready), "bad READY line: \(ready)"))
            return (server, port, nodeID)
        } catch {
            server.terminate()
            throw error
        }
    }

    /// Sends `payload` on a fresh stream while reading the echo, and returns what came back.
    func echo(_ payload: [UInt8], over connection: QUICConnection) async throws -> [UInt8] {
        let stream = try await connection.openStream()
        return try await withDeadline(.seconds(30)) {
            try await withThrowingTaskGroup(of: [UInt8]?.self) { group in
                group.addTask {
                    // Several writes, so the echo starts flowing back while we still send.
                    for start in stride(from: 0, to: payload.count, by: 64 << 10) {
                        try await stream.write(Array(payload[start..<min(start + (64 << 10), payload.count)]))
                    }
                    try await stream.finish()
                    return nil
                }
                group.addTask { try await stream.readToEnd() }
                var reply: [UInt8] = []
                for try await result in group { if let result { reply = result } }
                return reply
            }
        }
    }

    @Test("our client → aioquic server: mutual TLS, both NodeIDs pinned, 1 MiB echo")
    func ourClientToAioquicServer() async throws {
        let client = try await makeEndpoint(TestIdentities.a, policy: .none)
        let (server, port, serverID) = try await startServer(expecting: TestIdentities.a.nodeID)
        defer { server.terminate() }

        let connection = try await withDeadline(.seconds(15)) {
            try await client.connect(to: .loopbackV4(port: port), expecting: serverID)
        }
        #expect(connection.peerNodeID == serverID)
        // aioquic computed our NodeID from the certificate GnuTLS generated: both definitions agree.
        _ = try await server.expectLine("VERIFIED client nodeid=\(TestIdentities.a.nodeID)")

        let payload = randomPayload(Self.payloadSize)
        let reply = try await echo(payload, over: connection)
        #expect(reply.count == payload.count)
        #expect(SHA256.hash(reply) == SHA256.hash(payload), "the echo differs from what was sent")
        _ = try await server.expectLine("ECHOED stream=0 bytes=\(payload.count)")

        await connection.close()
        await client.close()
    }

    @Test("aioquic client → our server: accept policy allows exactly its NodeID, 1 MiB echo (also through a Retry)",
          arguments: [false, true])
    func aioquicClientToOurServer(retry: Bool) async throws {
        let peer = try PeerScript(
            python: try python(), script: AioquicPeer.script("aioquic_echo_client.py"),
            arguments: ["--bytes", "\(Self.payloadSize)"]
        )
        defer { peer.terminate() }
        let identity = try await peer.expectLine("IDENTITY")
        let clientID = try NodeID(parsing: try #require(field("nodeid", of: identity), "bad IDENTITY line: \(identity)"))

        let server = try await makeEndpoint(TestIdentities.b, policy: .allow([clientID])) {
            if retry { $0.addressValidation = .always }
        }
        // Echo the first stream of the first connection, and report who it came from.
        let echoTask = Task { () -> (NodeID, Int)? in
            for await connection in server.incoming {
                guard let stream = try? await connection.acceptStream() else { return (connection.peerNodeID, -1) }
                var count = 0
                do {
                    while let chunk = try await stream.read() {
                        count += chunk.count
                        try await stream.write(chunk)
                    }
                    try await stream.finish()
                } catch {
                    return (connection.peerNodeID, -1)
                }
                return (connection.peerNodeID, count)
            }
            return nil
        }
        defer { echoTask.cancel() }

        try peer.send("CONNECT \(server.localAddress.port) \(TestIdentities.b.nodeID)")
        _ = try await peer.expectLine("VERIFIED server nodeid=\(TestIdentities.b.nodeID)")
        let result = try await peer.expectLine("ECHO ok")
        #expect(field("bytes", of: result) == "\(Self.payloadSize)")
        let status = try await peer.waitForExit()
        #expect(status == 0, "aioquic client exited with \(status)\n\(peer.transcript.contents)")

        let echoed = await echoTask.value
        #expect(echoed?.0 == clientID, "our server saw \(String(describing: echoed?.0)), not the aioquic client")
        #expect(echoed?.1 == Self.payloadSize)
        let stats = await server.stats
        #expect(stats.connectionsAccepted == 1)
        #expect(stats.retriesSent == (retry ? 1 : 0))
        await server.close()
    }

    @Test("aioquic server with another certificate: our connect fails with peerAuthenticationFailed")
    func wrongServerCertificateIsRejected() async throws {
        let client = try await makeEndpoint(TestIdentities.a, policy: .none)
        let (server, port, serverID) = try await startServer(expecting: TestIdentities.a.nodeID)
        defer { server.terminate() }

        // We dial expecting c, but the server presents its own, freshly generated certificate.
        let expected = TestIdentities.c.nodeID
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(15)) {
                try await client.connect(to: .loopbackV4(port: port), expecting: expected)
            }
        }
        #expect(error?.code == .peerAuthenticationFailed, "got \(String(describing: error))")
        #expect(error?.expectedNodeID == expected)
        #expect(error?.receivedNodeID == serverID, "the NodeID we computed differs from aioquic's")
        #expect(await client.connectionCount == 0)
        await client.close()
    }

    @Test("aioquic server pinned to another client: it rejects our certificate and our connect fails")
    func aioquicServerRejectsOurCertificate() async throws {
        let client = try await makeEndpoint(TestIdentities.a, policy: .none)
        // The server expects b; we present a.
        let (server, port, serverID) = try await startServer(expecting: TestIdentities.b.nodeID)
        defer { server.terminate() }

        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(15)) {
                try await client.connect(to: .loopbackV4(port: port), expecting: serverID)
            }
        }
        #expect(error?.code == .handshakeFailed, "got \(String(describing: error))")
        _ = try await server.expectLine("REJECTED client received=\(TestIdentities.a.nodeID)")
        #expect(await client.connectionCount == 0)
        await client.close()
    }

    @Test("aioquic server that negotiates no ALPN: our connect fails, it does not get a protocol it never agreed to")
    func serverWithoutALPNIsRefused() async throws {
        let client = try await makeEndpoint(TestIdentities.a, policy: .none)
        let (server, port, serverID) = try await startServer(expecting: TestIdentities.a.nodeID, alpn: "")
        defer { server.terminate() }

        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(15)) {
                try await client.connect(to: .loopbackV4(port: port), expecting: serverID)
            }
        }
        #expect(error?.code == .handshakeFailed, "got \(String(describing: error))")
        #expect(await client.connectionCount == 0)
        await client.close()
    }

    @Test("aioquic client that offers no ALPN: our server refuses the handshake and accepts nothing")
    func clientWithoutALPNIsRefused() async throws {
        let peer = try PeerScript(
            python: try python(), script: AioquicPeer.script("aioquic_echo_client.py"),
            arguments: ["--bytes", "16", "--alpn", "", "--timeout", "10"]
        )
        defer { peer.terminate() }
        let identity = try await peer.expectLine("IDENTITY")
        let clientID = try NodeID(parsing: try #require(field("nodeid", of: identity), "bad IDENTITY line: \(identity)"))
        let server = try await makeEndpoint(TestIdentities.b, policy: .allow([clientID]))

        try peer.send("CONNECT \(server.localAddress.port) \(TestIdentities.b.nodeID)")
        let status = try await peer.waitForExit()
        #expect(status != 0, "the aioquic client got through without ALPN\n\(peer.transcript.contents)")
        #expect(!peer.transcript.contents.contains("ECHO ok"), "\(peer.transcript.contents)")
        #expect(await server.stats.connectionsAccepted == 0)
        await server.close()
    }
}
