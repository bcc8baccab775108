// Helpers shared by the test targets that drive our executables as a user would (the CLI, the examples), and the
// one bounded wait every test target uses. A plain library target: test targets cannot depend on each other.
public import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Polls `condition` until it holds or `limit` passes: a bounded wait, not a fixed sleep.
public func eventually(_ limit: Duration = .seconds(5), _ condition: () async -> Bool) async -> Bool {
    let clock = ContinuousClock()
    let end = clock.now + limit
    while clock.now < end {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(2))
    }
    return await condition()
}

/// A built executable: `$<env>` if set, else next to the test bundle, where SwiftPM puts executables and the test
/// bundle alike (`.build/<config>`).
public func builtBinary(_ name: String, env: String) -> String? {
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
public func binariesOrSkip(_ names: [(name: String, env: String)]) -> [String]? {
    var found: [String] = []
    for (name, env) in names {
        guard let path = builtBinary(name, env: env) else {
            let message = "the \(name) binary was not found next to the test bundle (run `swift build`, or set \(env))"
            if ProcessInfo.processInfo.environment["CI"] != nil {
                Issue.record(Comment(rawValue: message))
            } else {
                print("skipping: \(message)")
            }
            return nil
        }
        found.append(path)
    }
    return found
}

/// The `holepunch` binary (`HOLEPUNCH_BINARY`), or nil after a skip message.
public func holepunchBinaryOrSkip() -> String? {
    binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY")])?.first
}

/// A fresh directory under the temporary directory; the caller removes it.
public func scratchDirectory(_ prefix: String) throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir
}

/// Collected output of one pipe. `@unchecked Sendable`: `data` is only touched under `lock`.
public final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    func append(_ chunk: Data) { lock.withLock { data.append(chunk) } }
    /// Everything read so far, as UTF-8.
    public var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}

/// A child process we started, with its stdin, stdout and stderr; `stop()` kills it by its own PID only.
public final class Child: @unchecked Sendable {
    // @unchecked Sendable: the Process and pipes are set up once in init and then only read.
    public let process = Process()
    public let stdin = Pipe()
    public let stdout = Collected()
    public let stderr = Collected()
    private let outPipe = Pipe()
    private let errPipe = Pipe()

    /// Starts `binary` with `arguments` in `directory`.
    public init(_ binary: String, _ arguments: [String], directory: URL) throws {
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

    /// Writes `line` to the child's stdin.
    public func write(_ line: String) { stdin.fileHandleForWriting.write(Data(line.utf8)) }
    /// Closes the child's stdin (EOF).
    public func closeInput() { try? stdin.fileHandleForWriting.close() }
    /// The child's PID.
    public var pid: Int32 { process.processIdentifier }

    /// Waits (bounded) for the process to exit; returns its status, or nil if it is still running.
    public func waitExit(_ limit: Duration) async -> Int32? {
        let ok = await eventually(limit) { !self.process.isRunning }
        return ok ? process.terminationStatus : nil
    }

    /// SIGKILL to this PID if it still runs (Foundation may spawn children with SIGTERM blocked).
    public func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        outPipe.fileHandleForReading.readabilityHandler = nil
        errPipe.fileHandleForReading.readabilityHandler = nil
    }
}

/// Starts `holepunch rendezvous` on 127.0.0.1 (port 0) in `dir`, its NodeID in `dir/rdv.id`; returns it with its
/// QUIC address.
public func startRendezvous(_ holepunch: String, in dir: URL, extra: [String] = []) async throws -> (Child, String) {
    let child = try Child(holepunch, ["rendezvous", "--listen", "127.0.0.1:0", "--node-id-file", "rdv.id"] + extra,
                          directory: dir)
    let up = await eventually(.seconds(10)) { child.stdout.text.contains("\n") }
    try #require(up, "rendezvous did not start: \(child.stderr.text)")
    let words = child.stdout.text.split(whereSeparator: { $0 == " " || $0 == "\n" })
    let quic = try #require(words.firstIndex(of: "quic").map { String(words[$0 + 1]) })
    return (child, quic)
}
