// coturn's `turnserver` on loopback, for the tests that need a real TURN server: one place that knows how to start
// it on a free port, wait until it answers, and stop exactly the process that was started.
public import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// One `turnserver` process on 127.0.0.1, started by ``start(extra:ready:)``; ``stop()`` ends exactly its PID.
public final class Coturn: Sendable {
    /// The shared secret every instance uses (`--use-auth-secret --static-auth-secret`).
    public static let secret = "holepunch-test-secret"
    /// The realm every instance uses.
    public static let realm = "hp.test"

    /// The UDP port it listens on (127.0.0.1).
    public let port: UInt16
    /// The process.
    public let child: Child
    /// Its scratch directory (pid file, database, log), removed by ``stop()``.
    public let directory: URL

    private init(port: UInt16, child: Child, directory: URL) {
        self.port = port
        self.child = child
        self.directory = directory
    }

    /// `/usr/bin/turnserver` (or another standard place), or nil.
    public static var binary: String? {
        ["/usr/bin", "/usr/sbin", "/usr/local/bin"].map { "\($0)/turnserver" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Whether coturn tests run: always in CI (so a missing turnserver fails there), elsewhere when it is installed.
    public static var available: Bool {
        let ci = ProcessInfo.processInfo.environment["CI"]?.lowercased() ?? ""
        return ci == "true" || ci == "1" || binary != nil
    }

    /// Starts coturn on a free loopback port with shared-secret REST authentication, no TLS/DTLS/TCP, relaying
    /// only on 127.0.0.1 and allowing loopback peers, plus `extra` arguments; returns once `ready(port)` says it
    /// answers (polled for at most 10 s).
    public static func start(
        extra: [String] = [],
        ready: @escaping @Sendable (UInt16) async throws -> Bool
    ) async throws -> Coturn {
        let port = try #require(freeUDPPort(), "no free UDP port on 127.0.0.1")
        return try await start(port: port, arguments: [
            "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port", "\(port)",
            "--use-auth-secret", "--static-auth-secret", secret, "--realm", realm,
            "--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay", "--allow-loopback-peers", "--no-cli",
        ] + extra, ready: ready)
    }

    /// Starts coturn with `arguments` (which must make it listen on `port`), plus a pid file, a database and a log
    /// of its own; returns once `ready(port)` says it answers (polled for at most 10 s).
    public static func start(
        port: UInt16,
        arguments: [String],
        ready: @escaping @Sendable (UInt16) async throws -> Bool
    ) async throws -> Coturn {
        let binary = try #require(binary, "turnserver is missing (apt-get install coturn), and CI requires it")
        let directory = try scratchDirectory("holepunch-coturn")
        let own = [
            "-n", "--pidfile", directory.appendingPathComponent("turnserver.pid").path,
            "--db", directory.appendingPathComponent("turndb").path, "--log-file", "stdout", "--simple-log",
        ]
        let child = try Child(binary, own + arguments, directory: directory)
        let coturn = Coturn(port: port, child: child, directory: directory)
        var answering = false
        let clock = ContinuousClock()
        let end = clock.now + .seconds(10)
        while !answering && clock.now < end && child.process.isRunning {
            answering = (try? await ready(port)) ?? false
        }
        guard answering else {
            coturn.stop()
            throw CoturnDidNotStart(output: child.stdout.text.suffix(2000).description)
        }
        return coturn
    }

    /// Stops exactly the process we started (SIGTERM, then SIGKILL if it lingers) and removes its directory.
    public func stop() {
        if child.process.isRunning {
            child.process.terminate()
            let clock = ContinuousClock()
            let end = clock.now + .seconds(3)
            while child.process.isRunning && clock.now < end { usleep(20_000) }
        }
        child.stop()
        try? FileManager.default.removeItem(at: directory)
    }

    /// A UDP port that was free on 127.0.0.1 a moment ago.
    private static func freeUDPPort() -> UInt16? {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(fd, sa, length) == 0 && getsockname(fd, sa, &length) == 0
            }
        }
        return bound ? UInt16(bigEndian: address.sin_port) : nil
    }
}

/// coturn did not answer within its start-up bound; `output` is the end of its log.
public struct CoturnDidNotStart: Error, CustomStringConvertible {
    /// The end of coturn's log.
    public var output: String
    /// A one-line summary and the log.
    public var description: String { "coturn did not start answering within 10 s:\n\(output)" }
}
