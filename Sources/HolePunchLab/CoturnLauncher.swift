package import Foundation

/// coturn's `turnserver` as HolePunch runs it on loopback, for `holepunch bench relay` and the tests
/// (Tests/ProcessTestSupport/Coturn.swift): one place for where it lives and how it is started. Each caller
/// starts and ends its own process by PID.
package enum CoturnLauncher {
    /// `turnserver` in a standard place, or nil.
    package static var binary: String? {
        ["/usr/bin", "/usr/sbin", "/usr/local/bin"].map { "\($0)/turnserver" }
            .first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Arguments for a `turnserver` in the foreground on 127.0.0.1:`port`: shared-secret REST authentication with
    /// `secret` in `realm`, UDP only (no TLS, DTLS or TCP), relaying only on 127.0.0.1 and to loopback peers, no
    /// CLI, and its pid file, database and log (`stdout`) in `directory`, so that nothing of a system coturn is
    /// touched.
    package static func loopbackArguments(port: UInt16, secret: String, realm: String, directory: URL) -> [String] {
        ownFiles(in: directory) + [
            "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port", "\(port)",
            "--use-auth-secret", "--static-auth-secret", secret, "--realm", realm,
            "--no-tls", "--no-dtls", "--no-tcp", "--no-tcp-relay", "--allow-loopback-peers", "--no-cli",
        ]
    }

    /// The arguments every run needs whatever else it asks for: foreground, and the pid file, database and log in
    /// `directory`.
    package static func ownFiles(in directory: URL) -> [String] {
        [
            "-n", "--pidfile", directory.appendingPathComponent("turnserver.pid").path,
            "--db", directory.appendingPathComponent("turndb").path, "--log-file", "stdout", "--simple-log",
        ]
    }
}
