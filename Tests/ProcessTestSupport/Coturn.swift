// coturn's `turnserver` on loopback, for the tests that need a real TURN server: one place that knows how to start
// it on a free port, wait until it answers, and stop exactly the process that was started.
public import Foundation
import HolePunchLab
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
    public static var binary: String? { CoturnLauncher.binary }

    /// Whether coturn tests run: always in CI (so a missing turnserver fails there), elsewhere when it is installed.
    public static var available: Bool {
        let ci = ProcessInfo.processInfo.environment["CI"]?.lowercased() ?? ""
        return ci == "true" || ci == "1" || binary != nil
    }

    /// Starts coturn on a free loopback port as `CoturnLauncher.loopbackArguments` has it (shared-secret REST
    /// authentication, UDP only, relaying only on 127.0.0.1 to loopback peers), plus `extra` arguments; returns
    /// once `ready(port)` says it answers (polled for at most 10 s).
    public static func start(
        extra: [String] = [],
        ready: @escaping @Sendable (UInt16) async throws -> Bool
    ) async throws -> Coturn {
        let port = try Tools.freeUDPPort()
        let directory = try scratchDirectory("holepunch-coturn")
        let arguments = CoturnLauncher.loopbackArguments(port: port, secret: secret, realm: realm, directory: directory)
        return try await launch(port: port, arguments: arguments + extra, directory: directory, ready: ready)
    }

    /// Starts coturn with `arguments` (which must make it listen on `port`), plus a pid file, a database and a log
    /// of its own; returns once `ready(port)` says it answers (polled for at most 10 s).
    public static func start(
        port: UInt16,
        arguments: [String],
        ready: @escaping @Sendable (UInt16) async throws -> Bool
    ) async throws -> Coturn {
        let directory = try scratchDirectory("holepunch-coturn")
        return try await launch(port: port, arguments: CoturnLauncher.ownFiles(in: directory) + arguments,
                                directory: directory, ready: ready)
    }

    private static func launch(
        port: UInt16, arguments: [String], directory: URL, ready: @escaping @Sendable (UInt16) async throws -> Bool
    ) async throws -> Coturn {
        let binary = try #require(binary, "turnserver is missing (apt-get install coturn), and CI requires it")
        let child = try Child(binary, arguments, directory: directory)
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
}

/// coturn did not answer within its start-up bound; `output` is the end of its log.
public struct CoturnDidNotStart: Error, CustomStringConvertible {
    /// The end of coturn's log.
    public var output: String
    /// A one-line summary and the log.
    public var description: String { "coturn did not start answering within 10 s:\n\(output)" }
}
