import Foundation
import Testing

/// A built executable: `$<ENV>` if set, else next to the test bundle, where SwiftPM puts executables and the
/// test bundle alike (`.build/<config>`).
func builtBinary(_ name: String, env: String) -> String? {
    if let explicit = ProcessInfo.processInfo.environment[env] { return explicit }
    let bundle = Bundle.main.bundleURL
    let candidates = [
        bundle.appendingPathComponent(name),
        bundle.deletingLastPathComponent().appendingPathComponent(name),
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent(name),
    ]
    return candidates.map(\.path).first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// The binaries, or nil after a skip message (a recorded failure under `CI`, where they must exist).
func binariesOrSkip(_ names: [(String, String)]) -> [String]? {
    var found: [String] = []
    for (name, env) in names {
        guard let path = builtBinary(name, env: env) else {
            let message = "the \(name) binary was not found next to the test bundle (run `swift build`, or set \(env))"
            if ProcessInfo.processInfo.environment["CI"] != nil { Issue.record(Comment(rawValue: message)) } else { print("skipping: \(message)") }
            return nil
        }
        found.append(path)
    }
    return found
}

func eventually(_ limit: Duration, _ condition: () -> Bool) async -> Bool {
    let clock = ContinuousClock()
    let end = clock.now + limit
    while clock.now < end {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return condition()
}

/// Collected output of one pipe. `@unchecked Sendable`: `data` is only touched under `lock`.
final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ chunk: Data) { lock.withLock { data.append(chunk) } }
    var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}

/// A child process we started; `stop()` kills it by its own PID only.
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

    /// Waits (bounded) for the process to exit; its status, or nil if it still runs.
    func waitExit(_ limit: Duration) async -> Int32? {
        let ok = await eventually(limit) { !self.process.isRunning }
        return ok ? process.terminationStatus : nil
    }

    /// SIGKILL to this PID if it still runs.
    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        outPipe.fileHandleForReading.readabilityHandler = nil
        errPipe.fileHandleForReading.readabilityHandler = nil
    }

    /// The NodeID an example prints as `registered node=…`.
    var registeredNode: String? {
        guard let range = stderr.text.range(of: "registered node=") else { return nil }
        let id = stderr.text[range.upperBound...].prefix { $0.isLetter || $0.isNumber }
        return id.isEmpty ? nil : String(id)
    }
}

@Suite("examples end to end on loopback", .serialized)
struct ExamplesTests {
    func scratch() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("hp-examples-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    /// A `holepunch rendezvous` on 127.0.0.1 (port 0); returns it and its QUIC address. Its NodeID is in `rdv.id`.
    func startRendezvous(_ holepunch: String, in dir: URL) async throws -> (Child, String) {
        let child = try Child(holepunch, ["rendezvous", "--listen", "127.0.0.1:0", "--node-id-file", "rdv.id"], directory: dir)
        let up = await eventually(.seconds(10)) { child.stdout.text.contains("\n") }
        try #require(up, "rendezvous did not start: \(child.stderr.text)")
        let words = child.stdout.text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        let quic = try #require(words.firstIndex(of: "quic").map { String(words[$0 + 1]) })
        return (child, quic)
    }

    @Test("hp-chat: B waits, A connects by NodeID, a line goes each way, both exit 0")
    func chat() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-chat", "HP_CHAT_BINARY")]) else { return }
        let (holepunch, chat) = (bins[0], bins[1])
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        let (rendezvous, quic) = try await startRendezvous(holepunch, in: dir)
        defer { rendezvous.stop() }
        let common = ["--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"]

        let b = try Child(chat, common + ["--identity", "b.pem"], directory: dir)
        defer { b.stop() }
        let registered = await eventually(.seconds(15)) { b.registeredNode != nil && b.stderr.text.contains("waiting") }
        try #require(registered, "B did not register: \(b.stderr.text)")
        let bID = try #require(b.registeredNode)

        let a = try Child(chat, common + ["--identity", "a.pem", "--connect", bID], directory: dir)
        defer { a.stop() }
        a.write("hello from A\n")
        b.write("hello from B\n")
        let crossed = await eventually(.seconds(20)) {
            a.stdout.text.contains("hello from B") && b.stdout.text.contains("hello from A")
        }
        #expect(crossed, "A out: \(a.stdout.text) err: \(a.stderr.text) | B out: \(b.stdout.text) err: \(b.stderr.text)")
        // Only the conversation is on stdout: the protocol's greeting line never shows.
        #expect(!b.stdout.text.contains("hp-chat/1"))
        a.closeInput()
        #expect(await a.waitExit(.seconds(10)) == 0, "A: \(a.stderr.text)")
        #expect(await b.waitExit(.seconds(10)) == 0, "B: \(b.stderr.text)")
        #expect(b.stderr.text.contains("peer left"))
    }

    @Test("hp-file-send: a few hundred KiB of random data arrives with a matching SHA-256")
    func fileSend() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-file-send", "HP_FILE_SEND_BINARY")]) else { return }
        let (holepunch, fileSend) = (bins[0], bins[1])
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        var generator = SystemRandomNumberGenerator()
        let data = Data((0..<(300 << 10)).map { _ in UInt8.random(in: 0...255, using: &generator) })
        try data.write(to: dir.appendingPathComponent("payload.bin"))
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("inbox"), withIntermediateDirectories: true)
        let (rendezvous, quic) = try await startRendezvous(holepunch, in: dir)
        defer { rendezvous.stop() }
        let common = ["--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"]

        let receiver = try Child(fileSend, ["receive", "--out", "inbox", "--identity", "b.pem"] + common, directory: dir)
        defer { receiver.stop() }
        let registered = await eventually(.seconds(15)) { receiver.registeredNode != nil && receiver.stderr.text.contains("waiting") }
        try #require(registered, "receiver did not register: \(receiver.stderr.text)")
        let bID = try #require(receiver.registeredNode)

        let sender = try Child(fileSend, ["send", "payload.bin", "--to", bID, "--identity", "a.pem"] + common, directory: dir)
        defer { sender.stop() }
        #expect(await sender.waitExit(.seconds(30)) == 0, "sender: \(sender.stderr.text)")
        #expect(await receiver.waitExit(.seconds(10)) == 0, "receiver: \(receiver.stderr.text)")

        let received = try Data(contentsOf: dir.appendingPathComponent("inbox/payload.bin"))
        #expect(received == data)
        // Both sides print the SHA-256 they checked; it must be the real digest of the data we wrote.
        let expected = try #require(try sha256sum(dir.appendingPathComponent("payload.bin")))
        #expect(receiver.stderr.text.contains("sha256=\(expected) verified"), "receiver: \(receiver.stderr.text)")
        #expect(sender.stderr.text.contains("sha256=\(expected) verified"), "sender: \(sender.stderr.text)")
        #expect(sender.stderr.text.contains("100%"))
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("inbox/payload.bin.part").path))
    }

    @Test("hp-file-send: the receiver vanishing mid-transfer gives the sender one clear error, not a hang")
    func fileSendDrop() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-file-send", "HP_FILE_SEND_BINARY")]) else { return }
        let (holepunch, fileSend) = (bins[0], bins[1])
        let dir = try scratch()
        defer { try? FileManager.default.removeItem(at: dir) }
        // Large enough that the transfer is still running when the receiver is killed.
        try Data(count: 256 << 20).write(to: dir.appendingPathComponent("big.bin"))
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("inbox"), withIntermediateDirectories: true)
        let (rendezvous, quic) = try await startRendezvous(holepunch, in: dir)
        defer { rendezvous.stop() }
        let common = ["--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"]
        let receiver = try Child(fileSend, ["receive", "--out", "inbox", "--identity", "b.pem"] + common, directory: dir)
        defer { receiver.stop() }
        let registered = await eventually(.seconds(15)) { receiver.registeredNode != nil && receiver.stderr.text.contains("waiting") }
        try #require(registered, "receiver did not register: \(receiver.stderr.text)")
        let bID = try #require(receiver.registeredNode)
        let sender = try Child(fileSend, ["send", "big.bin", "--to", bID, "--identity", "a.pem"] + common, directory: dir)
        defer { sender.stop() }
        let flowing = await eventually(.seconds(20)) { receiver.stderr.text.contains("received [") }
        try #require(flowing, "no data arrived: \(sender.stderr.text)")
        receiver.stop()
        // The sender learns of the loss from QUIC's idle timeout at worst (30 s by default).
        let status = await sender.waitExit(.seconds(45))
        #expect(status == 3, "sender: \(sender.stderr.text)")
        #expect(sender.stderr.text.contains("error: the connection dropped after"))
        #expect(sender.stderr.text.contains("hint:"))
    }
}

/// The SHA-256 by the system's `sha256sum`, an implementation independent of the example's own.
func sha256sum(_ file: URL) throws -> String? {
    let tool = ["/usr/bin/sha256sum", "/bin/sha256sum"].first { FileManager.default.isExecutableFile(atPath: $0) }
    guard let tool else { return nil }
    let process = Process()
    let out = Pipe()
    process.executableURL = URL(fileURLWithPath: tool)
    process.arguments = [file.path]
    process.standardOutput = out
    try process.run()
    let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    return text.split(separator: " ").first.map(String.init)
}
