// Helpers shared by the test targets that drive our executables as a user would (the CLI, the examples), and the
// one bounded wait every test target uses. A plain library target: test targets cannot depend on each other.
public import Foundation
public import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Polls `condition` until it holds or `limit` passes: a bounded wait, not a fixed sleep. `condition` must not
/// block; to bound an operation that may hang, use ``withDeadline(_:_:)``.
public func eventually(_ limit: Duration = .seconds(5), _ condition: () async -> Bool) async -> Bool {
    let clock = ContinuousClock()
    let end = clock.now + limit
    while clock.now < end {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(2))
    }
    return await condition()
}

/// The deadline of a ``withDeadline(_:_:)`` passed before its operation ended.
public struct DeadlineExceeded: Error, CustomStringConvertible {
    /// The limit that passed.
    public var limit: Duration
    public var description: String { "timed out after \(limit)" }
}

/// Runs `body` and returns its result, or throws ``DeadlineExceeded`` once `limit` passes, even when `body`
/// ignores cancellation (a read that never returns): the body's task is cancelled and left to end on its own,
/// so a hung operation fails the test instead of hanging the suite.
public func withDeadline<T: Sendable>(
    _ limit: Duration, _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    let outcome = DeadlineOutcome<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            outcome.install(continuation)
            let work = Task {
                do { outcome.resolve(.success(try await body())) } catch { outcome.resolve(.failure(error)) }
            }
            outcome.onResolve { work.cancel() }
            Task {
                try? await Task.sleep(for: limit)
                outcome.resolve(.failure(DeadlineExceeded(limit: limit)))
            }
        }
    } onCancel: {
        outcome.resolve(.failure(CancellationError()))
    }
}

/// Resumes a ``withDeadline(_:_:)`` continuation exactly once, whichever of body, timer or cancellation comes
/// first. `@unchecked Sendable`: every field is only touched under `lock`.
private final class DeadlineOutcome<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var continuation: CheckedContinuation<T, any Error>?
    private var early: Result<T, any Error>?
    private var cleanup: (@Sendable () -> Void)?

    func install(_ continuation: CheckedContinuation<T, any Error>) {
        let pending: Result<T, any Error>? = lock.withLock {
            if let early { return early }
            self.continuation = continuation
            return nil
        }
        if let pending { continuation.resume(with: pending) }
    }

    func onResolve(_ body: @escaping @Sendable () -> Void) {
        let resolved = lock.withLock { () -> Bool in
            if early != nil { return true }
            cleanup = body
            return false
        }
        if resolved { body() }
    }

    func resolve(_ result: Result<T, any Error>) {
        let (waiting, body): (CheckedContinuation<T, any Error>?, (@Sendable () -> Void)?) = lock.withLock {
            guard early == nil else { return (nil, nil) }
            early = result
            defer { continuation = nil; cleanup = nil }
            return (continuation, cleanup)
        }
        waiting?.resume(with: result)
        body?()
    }
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

/// Collected output of one pipe, read to end of file by a thread of its own. `@unchecked Sendable`: `data` and
/// `ended` are only touched under `lock`.
///
/// A blocking reader rather than `readabilityHandler`: Foundation on Linux never reports EOF to the handler, so
/// nobody could tell "the child printed nothing more" from "its last lines are still in the pipe".
public final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    private var ended = false

    /// Starts reading `handle` until end of file.
    init(reading handle: FileHandle) {
        let fd = handle.fileDescriptor
        let thread = Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 65_536)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n > 0 {
                    let chunk = Data(buffer[0..<n])
                    lock.withLock { data.append(chunk) }
                } else if n < 0 && errno == EINTR {
                    continue
                } else {
                    break
                }
            }
            lock.withLock { ended = true }
        }
        thread.start()
    }

    /// Everything read so far, as UTF-8.
    public var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
    /// Whether the pipe reached end of file: after that `text` is complete.
    public var reachedEnd: Bool { lock.withLock { ended } }
}

/// Runs a blocking `body` (a wait, a poll with timeouts) on a thread of its own and returns its result, so that it
/// never holds one of the concurrency pool's few threads (one per core) while other tests' tasks wait for them.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}

/// What a process run to its end printed, and how it ended.
public struct ProcessOutcome: Sendable {
    /// The exit status (or the signal's number, for a killed process).
    public var status: Int32
    /// Standard output, complete.
    public var out: String
    /// Standard error, complete.
    public var err: String
    /// Whether it outlived its limit and was killed.
    public var hung: Bool
}

/// Runs `binary` to the end of both outputs, killing it (by its own PID) if it outlives `limit`.
///
/// The waiting happens on a thread of its own, never on the concurrency pool: that pool has one thread per core,
/// and a test blocked in a wait there would stall every other test's tasks for as long as the child runs.
public func runToEnd(_ binary: String, _ arguments: [String], limit: TimeInterval = 60,
                     directory: URL? = nil) async throws -> ProcessOutcome {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: binary)
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = directory }
    let outPipe = Pipe(), errPipe = Pipe()
    process.standardOutput = outPipe
    process.standardError = errPipe
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let out = Collected(reading: outPipe.fileHandleForReading)
    let err = Collected(reading: errPipe.fileHandleForReading)
    let hung = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
        Thread {
            let deadline = Date().addingTimeInterval(limit)
            var hung = false
            while process.isRunning || !out.reachedEnd || !err.reachedEnd {
                if !hung, Date() >= deadline {
                    hung = true
                    kill(process.processIdentifier, SIGKILL)
                }
                // A grandchild may hold the pipes open after the child died: give up on their EOF 5 s later.
                if hung, !process.isRunning, Date() >= deadline.addingTimeInterval(5) { break }
                usleep(2_000)  // its own thread: polling here blocks no test
            }
            process.waitUntilExit()
            continuation.resume(returning: hung)
        }.start()
    }
    return ProcessOutcome(status: process.terminationStatus, out: out.text, err: err.text, hung: hung)
}

/// A child process we started, with its stdin, stdout and stderr; `stop()` kills it by its own PID only.
public final class Child: @unchecked Sendable {
    // @unchecked Sendable: the Process and pipes are set up once in init and then only read.
    public let process = Process()
    public let stdin = Pipe()
    public let stdout: Collected
    public let stderr: Collected
    private let outPipe: Pipe
    private let errPipe: Pipe

    /// Starts `binary` with `arguments` in `directory`.
    public init(_ binary: String, _ arguments: [String], directory: URL) throws {
        let outPipe = Pipe(), errPipe = Pipe()
        self.outPipe = outPipe
        self.errPipe = errPipe
        stdout = Collected(reading: outPipe.fileHandleForReading)
        stderr = Collected(reading: errPipe.fileHandleForReading)
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        process.currentDirectoryURL = directory
        process.standardInput = stdin
        process.standardOutput = outPipe
        process.standardError = errPipe
        // Our copies of the write ends must be closed, or the readers never see EOF (`run()` closes them through
        // the same handles once the child has them; closing again is then a no-op).
        defer {
            try? outPipe.fileHandleForWriting.close()
            try? errPipe.fileHandleForWriting.close()
        }
        try process.run()
    }

    /// Writes `line` to the child's stdin.
    public func write(_ line: String) { stdin.fileHandleForWriting.write(Data(line.utf8)) }
    /// Closes the child's stdin (EOF).
    public func closeInput() { try? stdin.fileHandleForWriting.close() }
    /// The child's PID.
    public var pid: Int32 { process.processIdentifier }

    /// Waits (bounded) for the process to exit and for its stdout and stderr to reach end of file; returns its
    /// status, or nil if it is still running.
    ///
    /// The process can end before its pipes have been drained: reading `stdout.text` right after the exit alone
    /// could miss the last lines (a flaky empty NodeID once). If the pipes never reach EOF within `limit` (a
    /// grandchild holds them open), the status is still returned, with whatever output arrived.
    public func waitExit(_ limit: Duration) async -> Int32? {
        let clock = ContinuousClock()
        let end = clock.now + limit
        guard await eventually(limit, { !self.process.isRunning }) else { return nil }
        _ = await eventually(max(.zero, end - clock.now)) { self.stdout.reachedEnd && self.stderr.reachedEnd }
        return process.terminationStatus
    }

    /// SIGKILL to this PID if it still runs (Foundation may spawn children with SIGTERM blocked).
    public func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
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

/// A scratch directory with a loopback rendezvous running in it (see ``startRendezvous(_:in:extra:)``): the
/// fixture of every test that starts peers as processes. The test calls ``close()`` (in a `defer`).
public struct LoopbackRendezvous: Sendable {
    /// The scratch directory, the peers' working directory: identities and the server's `rdv.id` live here.
    public let dir: URL
    /// The `holepunch rendezvous` process.
    public let server: Child
    /// The server's QUIC address.
    public let quic: String

    /// Starts `holepunch rendezvous` (with `extra` arguments) in a fresh scratch directory named after `prefix`.
    public init(_ holepunch: String, prefix: String, extra: [String] = []) async throws {
        let dir = try scratchDirectory(prefix)
        do {
            (server, quic) = try await startRendezvous(holepunch, in: dir, extra: extra)
        } catch {
            try? FileManager.default.removeItem(at: dir)
            throw error
        }
        self.dir = dir
    }

    /// The arguments that point a peer or an example at this server, listening on a loopback port of its own.
    public var peerArguments: [String] {
        ["--rendezvous", quic, "--rendezvous-id", "@rdv.id", "--listen", "127.0.0.1:0"]
    }

    /// Stops the server and removes the directory.
    public func close() {
        server.stop()
        try? FileManager.default.removeItem(at: dir)
    }
}

/// Has each of two connected chat peers (`holepunch peer`, `hp-chat`) write a line, and expects each to print
/// the other's within `limit`.
public func expectLinesCross(_ a: Child, _ b: Child, within limit: Duration = .seconds(20),
                             sourceLocation: SourceLocation = #_sourceLocation) async {
    a.write("hello from A\n")
    b.write("hello from B\n")
    let crossed = await eventually(limit) {
        a.stdout.text.contains("hello from B") && b.stdout.text.contains("hello from A")
    }
    #expect(crossed, "A out: \(a.stdout.text) err: \(a.stderr.text) | B out: \(b.stdout.text) err: \(b.stderr.text)",
            sourceLocation: sourceLocation)
}

/// The NodeID of identity file `file` in `dir`, as `holepunch identity show` prints it.
public func identityNodeID(_ binary: String, _ file: String, in dir: URL) async throws -> String {
    let child = try Child(binary, ["identity", "show", file], directory: dir)
    defer { child.stop() }
    #expect(await child.waitExit(.seconds(10)) == 0)
    return child.stdout.text.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Starts `holepunch` with `arguments` (a `peer` command without `--connect`) and waits until it has registered
/// and waits for punches; returns it with the NodeID of `identity`.
public func startWaitingPeer(
    _ binary: String, _ arguments: [String], identity: String, in dir: URL
) async throws -> (Child, String) {
    let child = try Child(binary, arguments + ["--identity", identity], directory: dir)
    let waiting = await eventually(.seconds(15)) { child.stderr.text.contains("waiting") }
    if !waiting { child.stop() }
    try #require(waiting, "the peer did not register: \(child.stderr.text)")
    return (child, try await identityNodeID(binary, identity, in: dir))
}

/// A small seeded generator (SplitMix64), so fuzz runs and lossy relays behave the same on every run of a seed.
public struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64

    /// Starts the sequence at `seed`.
    public init(seed: UInt64) { state = seed }

    /// The next 64 random bits.
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

