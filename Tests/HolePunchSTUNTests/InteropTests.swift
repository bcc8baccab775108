import Foundation
import HolePunchNet
import ProcessTestSupport
import Testing
@testable import HolePunchSTUN

/// Helpers for tests that run real third-party STUN software on loopback.
enum Interop {
    static var isCI: Bool {
        let value = ProcessInfo.processInfo.environment["CI"]?.lowercased() ?? ""
        return value == "true" || value == "1"
    }

    static func path(of tool: String) -> String? {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"] {
            let candidate = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Runs outside CI only when the tool exists; in CI it always runs, so a missing tool fails.
    static func available(_ tool: String) -> Bool { isCI || path(of: tool) != nil }

    /// Two port numbers free on both 127.0.0.1 and 127.0.0.2 (UDP) at the time of the check.
    static func freePortPair() throws -> (UInt16, UInt16) {
        for _ in 0..<20 {
            var held: [UDPDatagramSocket] = []
            // Releasing the sockets closes them: the ports are free again for the caller.
            defer { held.removeAll() }
            do {
                let a = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
                held.append(a)
                held.append(try UDPDatagramSocket(binding: SocketAddress(ip: .v4(127, 0, 0, 2), port: a.localAddress.port)))
                let b = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
                held.append(b)
                held.append(try UDPDatagramSocket(binding: SocketAddress(ip: .v4(127, 0, 0, 2), port: b.localAddress.port)))
                return (a.localAddress.port, b.localAddress.port)
            } catch {
                continue
            }
        }
        throw STUNError(.socket, "no free port pair on 127.0.0.1 and 127.0.0.2")
    }

    /// Polls `address` with Binding requests until it answers, for at most `attempts` × 100 ms.
    static func waitUntilAnswering(_ address: SocketAddress, attempts: Int = 100) throws -> Bool {
        let probe = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        for _ in 0..<attempts {
            try probe.send(try STUNMessage(.request).encoded(fingerprint: true), to: address)
            if let (bytes, _) = probe.receive(timeoutMilliseconds: 100), (try? STUNMessage.decode(bytes)) != nil {
                return true
            }
        }
        return false
    }

    /// Waits up to `seconds` for `process` to exit; returns whether it did.
    static func waitForExit(_ process: Process, seconds: Double) -> Bool {
        let done = DispatchSemaphore(value: 0)
        let waiter = Thread {
            process.waitUntilExit()
            done.signal()
        }
        waiter.start()
        return done.wait(timeout: .now() + seconds) == .success
    }

    /// Stops exactly the process we started: SIGTERM, then SIGKILL if it lingers (coturn can take its time).
    static func stop(_ process: Process) {
        guard process.isRunning else { return }
        process.terminate()
        if waitForExit(process, seconds: 3) { return }
        kill(process.processIdentifier, SIGKILL)
        _ = waitForExit(process, seconds: 10)
    }
}

extension RealNetworkTests {
@Suite struct InteropTests {
    @Test(.enabled(if: Coturn.available, "coturn's turnserver is not installed (apt-get install coturn)"))
    func ourDiscoveryClientAgainstCoturn() async throws {
        let (port, altPort) = try Interop.freePortPair()
        let coturn = try await Coturn.start(port: port, arguments: [
            "--listening-ip", "127.0.0.1", "--listening-ip", "127.0.0.2",
            "--listening-port", "\(port)", "--alt-listening-port", "\(altPort)",
            "--no-tls", "--no-dtls", "--no-tcp", "--stun-only", "--no-cli",
        ]) { port in
            try await onOwnThread { try Interop.waitUntilAnswering(.loopbackV4(port: port), attempts: 1) }
        }
        // Only the PID we started.
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: port)
        #expect(try await onOwnThread { try Interop.waitUntilAnswering(SocketAddress(ip: .v4(127, 0, 0, 2), port: altPort)) })

        let result = try await NATDiscoveryClient.discover(server: server, bindAddress: .loopbackV4(port: 0))
        #expect(result.mapping == .endpointIndependent)
        #expect(result.filtering == .endpointIndependent)
        #expect(result.evidence.natDetected == false)
        #expect(result.evidence.otherAddress == SocketAddress(ip: .v4(127, 0, 0, 2), port: altPort))
        #expect(result.legacyLabel == "full_cone")
        #expect(result.evidence.tests.allSatisfy { $0.outcome == "answered" }, "\(result.evidence.tests)")
    }

    @Test(.enabled(if: Interop.available("stun"), "Debian's stun client is not installed (apt-get install stun-client)"))
    func debianStunClientAgainstOurServer() async throws {
        let stun = try #require(Interop.path(of: "stun"), "stun is missing, and CI requires it")
        let server = try STUNServer(configuration: .init(
            primary: .loopbackV4(port: 0), alternatePort: 0, alternateIP: .v4(127, 0, 0, 2), software: "HolePunch"
        ))
        try server.start()
        defer { server.stop() }

        let output = FileManager.default.temporaryDirectory.appendingPathComponent("holepunch-stun-\(server.primaryAddress.port).txt")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: output) }
        let handle = try FileHandle(forWritingTo: output)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: stun)
        process.arguments = ["\(server.primaryAddress)", "-v"]
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        defer { Interop.stop(process) }
        let exited = try await onOwnThread { Interop.waitForExit(process, seconds: 30) }
        if !exited { Interop.stop(process) }
        try handle.close()
        let text = try String(contentsOf: output, encoding: .utf8)
        #expect(exited, "stun did not finish within 30 s")
        // The client runs RFC 3489 tests I, II (change IP and port), III (change port) and I against the
        // changed address, and exits with 1 for "Open" (no NAT).
        for line in ["test I = 1", "test II = 1", "test III = 1", "test I(2) = 1", "is nat  = 0", "Primary: Open"] {
            #expect(text.contains(line), "missing '\(line)' in:\n\(text)")
        }
        #expect(text.contains("ChangedAddress = \(server.localAddresses[3])"))
        #expect(process.terminationStatus == 1, "stun exit status \(process.terminationStatus)\n\(text)")
        #expect(server.statistics.sent >= 4)
    }
}
}
