import Foundation
import Testing

/// The built `holepunch` binary: `HOLEPUNCH_BINARY`, else next to the test bundle (SwiftPM puts executables and
/// the test bundle in the same `.build/<config>` directory).
enum HolepunchBinary {
    static var path: String? {
        if let explicit = ProcessInfo.processInfo.environment["HOLEPUNCH_BINARY"] { return explicit }
        let bundle = Bundle.main.bundleURL
        let candidates = [
            bundle.appendingPathComponent("holepunch"),
            bundle.deletingLastPathComponent().appendingPathComponent("holepunch"),
            URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("holepunch"),
        ]
        return candidates.map(\.path).first { FileManager.default.isExecutableFile(atPath: $0) }
    }
}

/// Collected output of one pipe. `@unchecked Sendable`: `text` is only touched under `lock`.
final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ chunk: Data) { lock.withLock { data.append(chunk) } }
    var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}

/// A child process we started, with its stdin, stdout and stderr; `stop()` kills it by its own PID only.
final class Child: @unchecked Sendable {
    // @unchecked Sendable: the Process and pipes are set up once in init and then only read.
    let process = Process()
    let stdin = Pipe()
    let stdout = Collected()
    let stderr = Collected()
    private let outPipe = Pipe()
    private let errPipe = Pipe()

    init(_ binary: String, _ arguments: [String], directory: URL) throws {
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.currentDirectoryURL = directory
        process.standardInput = stdin
        process.standardOutput = outPipe
        process.standardError = errPipe
        let out = stdout, err = stderr
        outPipe.fileHandleForReading.readabilityHandler = { out.append($0.availableData) }
        errPipe.fileHandleForReading.readabilityHandler = { err.append($0.availableData) }
        try process.run()
    }

    func write(_ line: String) { stdin.fileHandleForWriting.write(Data(line.utf8)) }
    func closeInput() { try? stdin.fileHandleForWriting.close() }
    var pid: Int32 { process.processIdentifier }

    /// Waits (bounded) for the process to exit; returns its status, or nil if it is still running.
    func waitExit(_ limit: Duration) async -> Int32? {
        let ok = await eventually(limit) { !self.process.isRunning }
        return ok ? process.terminationStatus : nil
    }

    /// SIGKILL to this PID if it still runs (Foundation may spawn children with SIGTERM blocked).
    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        outPipe.fileHandleForReading.readabilityHandler = nil
        errPipe.fileHandleForReading.readabilityHandler = nil
    }
}

@Suite("holepunch processes on loopback", .serialized)
struct ProcessTests {
    func binaryOrSkip() throws -> String? {
        if let path = HolepunchBinary.path { return path }
        if ProcessInfo.processInfo.environment["CI"] != nil {
            Issue.record("the holepunch binary was not found next to the test bundle (set HOLEPUNCH_BINARY)")
        } else {
            print("skipping: the holepunch binary was not found next to the test bundle (set HOLEPUNCH_BINARY)")
        }
        return nil
    }

    func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hp-rdv-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Starts a rendezvous on 127.0.0.1 (port 0) and returns it with its QUIC address and NodeID file.
    func startRendezvous(_ binary: String, in dir: URL, extra: [String] = []) async throws -> (Child, String) {
        let child = try Child(binary, ["rendezvous", "--listen", "127.0.0.1:0", "--node-id-file", "rdv.id"] + extra, directory: dir)
        let up = await eventually(.seconds(10)) { child.stdout.text.contains("\n") }
        try #require(up, "rendezvous did not start: \(child.stderr.text)")
        let words = child.stdout.text.split(separator: " ")
        let quic = try #require(words.firstIndex(of: "quic").map { String(words[$0 + 1]) })
        return (child, quic)
    }

    func nodeID(_ binary: String, _ file: String, in dir: URL) async throws -> String {
        let child = try Child(binary, ["identity", "show", file], directory: dir)
        defer { child.stop() }
        #expect(await child.waitExit(.seconds(10)) == 0)
        return child.stdout.text.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test("rendezvous + two peer processes: A connects to B by NodeID and a line goes both ways")
    func lineBothWays() async throws {
        guard let binary = try binaryOrSkip() else { return }
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (rendezvous, quic) = try await startRendezvous(binary, in: dir)
        defer { rendezvous.stop() }
        let common = ["peer", "--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"]
        let b = try Child(binary, common + ["--identity", "b.pem"], directory: dir)
        defer { b.stop() }
        let waiting = await eventually(.seconds(15)) { b.stderr.text.contains("waiting") }
        try #require(waiting, "B did not register: \(b.stderr.text)")
        let bID = try await nodeID(binary, "b.pem", in: dir)

        let a = try Child(binary, common + ["--identity", "a.pem", "--connect", bID], directory: dir)
        defer { a.stop() }
        a.write("hello from A\n")
        b.write("hello from B\n")
        let crossed = await eventually(.seconds(20)) {
            a.stdout.text.contains("hello from B") && b.stdout.text.contains("hello from A")
        }
        #expect(crossed, "A out: \(a.stdout.text) err: \(a.stderr.text) | B out: \(b.stdout.text) err: \(b.stderr.text)")
        #expect(a.stderr.text.contains("connected"))
        #expect(a.stderr.text.contains("timeToConnectMs="))
        a.closeInput()
        b.closeInput()
        #expect(await a.waitExit(.seconds(10)) == 0)
        #expect(await b.waitExit(.seconds(10)) == 0)
    }

    @Test("an unknown NodeID: one clear error line with a hint, exit status 2")
    func unknownNodeID() async throws {
        guard let binary = try binaryOrSkip() else { return }
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (rendezvous, quic) = try await startRendezvous(binary, in: dir)
        defer { rendezvous.stop() }
        let a = try Child(binary, ["peer", "--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--identity", "a.pem",
                                   "--no-nat-detect", "--connect", String(repeating: "a", count: 52)], directory: dir)
        defer { a.stop() }
        #expect(await a.waitExit(.seconds(15)) == 2)
        #expect(a.stderr.text.contains("error: rendezvous unknownTarget"))
        #expect(a.stderr.text.contains("hint:"))
        #expect(!a.stderr.text.contains("Fatal error"))
    }

    @Test("killing B mid-punch gives A timeout or unreachable, never a hang")
    func killTargetMidPunch() async throws {
        guard let binary = try binaryOrSkip() else { return }
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        // A long start delay opens a window between the coordinate message and the first probe.
        let (rendezvous, quic) = try await startRendezvous(binary, in: dir, extra: ["--start-delay-ms", "1500", "--no-stun"])
        defer { rendezvous.stop() }
        let common = ["peer", "--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0", "--no-nat-detect"]
        let b = try Child(binary, common + ["--identity", "b.pem"], directory: dir)
        defer { b.stop() }
        let waiting = await eventually(.seconds(15)) { b.stderr.text.contains("waiting") }
        try #require(waiting, "B did not register: \(b.stderr.text)")
        let bID = try await nodeID(binary, "b.pem", in: dir)
        let a = try Child(binary, common + ["--identity", "a.pem", "--connect", bID, "--timeout", "5"], directory: dir)
        defer { a.stop() }
        let coordinated = await eventually(.seconds(15)) { a.stderr.text.contains("coordinated") }
        try #require(coordinated, "A was not coordinated: \(a.stderr.text)")
        b.stop()
        let status = await a.waitExit(.seconds(30))
        #expect(status == 3, "A: \(a.stderr.text)")
        let text = a.stderr.text
        #expect(text.contains("punch failed: timeout") || text.contains("punch failed: unreachable"), "A: \(text)")
    }
}
