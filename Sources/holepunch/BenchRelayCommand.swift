import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchLab

/// `holepunch bench relay`: loopback throughput of one stream relayed through coturn against the same stream
/// direct, side by side in one run, and the time to the first byte of a connection made through the relay (the
/// allocation exists beforehand, as it does for a peer that allocated at registration).
///
/// coturn (`turnserver`, Debian's coturn package) is started on a free 127.0.0.1 port with a random shared secret,
/// and ended by its PID. The relay's owner is the accepting endpoint: our TURN client allocates on its socket, the
/// endpoint attaches it, and the dialling endpoint sends to the relayed address as a plain UDP address.
struct BenchRelayCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "relay",
        abstract: "Loopback throughput relayed through coturn vs direct, and time to first byte through the relay.",
        discussion: """
            Each run makes fresh endpoints: one stream of --bytes direct, then the same through a fresh coturn \
            allocation (ChannelData), then --ttfb connections direct and as many through the relay, each timed \
            from the dial to the first byte of a stream read by the accepting side (the allocation already \
            exists). Figures are medians over --runs. Throughput is in MB/s (10^6 bytes per second). Only \
            127.0.0.1 is used.

            Examples:
              holepunch bench relay
              holepunch bench relay --runs 5 --json bench-results/relay.json
            """
    )

    @Option(help: "Bytes sent on the one stream of each throughput test.")
    var bytes: Int = 64 << 20

    @Option(help: "Runs; the report shows the median.")
    var runs: Int = 3

    @Option(help: "Connections through the relay timed to their first byte, per run.")
    var ttfb: Int = 10

    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    func validate() throws {
        guard bytes >= 1 << 20 else { throw ValidationError("--bytes must be at least 1 MiB") }
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
        guard ttfb >= 1 else { throw ValidationError("--ttfb must be at least 1") }
    }

    func run() async throws {
        guard let turnserver = CoturnLauncher.binary else {
            throw QUICBenchError("turnserver is not installed (apt-get install coturn)")
        }
        let port = try Tools.freeUDPPort()
        let secret = (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        let directory = try Tools.temporaryDirectory("holepunch-bench-relay")
        defer { try? FileManager.default.removeItem(at: directory) }
        let coturn = try Tools.spawn(turnserver, CoturnLauncher.loopbackArguments(
            port: port, secret: secret, realm: "bench.holepunch", directory: directory))
        defer { Tools.kill(coturn) }
        let relay = RelaySetup(server: .loopbackV4(port: port), secret: secret)

        var report = RelayBenchReport(
            date: ISO8601DateFormatter().string(from: Date()), command: CommandLine.arguments.joined(separator: " "),
            host: QUICBenchReport.hostDescription(), bytes: bytes, runs: runs, ttfbConnections: ttfb
        )
        for run in 1...runs {
            note("run \(run)/\(runs): direct, \(bytes) bytes")
            report.directMBps.append(try await BenchQUICCommand.withEndpointPair { client, server, serverID in
                try await BenchQUICCommand.ourThroughput(bytes: bytes, client: client, server: server, serverID: serverID)
            })
            note("run \(run)/\(runs): relayed through coturn, \(bytes) bytes")
            report.relayedMBps.append(try await BenchQUICCommand.withEndpointPair { client, server, serverID in
                try await relay.with(owner: server, peer: client) { relayed in
                    try await BenchQUICCommand.ourThroughput(
                        bytes: bytes, client: client, server: server, serverID: serverID, target: relayed
                    )
                }
            })
            note("run \(run)/\(runs): \(ttfb) connections, direct and through the relay, to the first byte")
            report.ttfbDirectMilliseconds.append(try await BenchQUICCommand.withEndpointPair { client, server, serverID in
                try await Self.timeToFirstByte(
                    client: client, server: server, serverID: serverID, target: server.localAddress, count: ttfb
                )
            })
            report.ttfbMilliseconds.append(try await BenchQUICCommand.withEndpointPair { client, server, serverID in
                try await relay.with(owner: server, peer: client) { relayed in
                    try await Self.timeToFirstByte(client: client, server: server, serverID: serverID, target: relayed, count: ttfb)
                }
            })
        }
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

    /// The median, over `count` connections, of the time from starting the dial to the server reading the first
    /// byte of the client's first stream.
    static func timeToFirstByte(
        client: Endpoint, server: Endpoint, serverID: NodeID, target: SocketAddress, count: Int
    ) async throws -> Double {
        var samples: [Double] = []
        var incoming = server.incoming.makeAsyncIterator()
        let clock = ContinuousClock()
        for _ in 0..<count {
            let start = clock.now
            let connection = try await client.connect(to: target, expecting: serverID)
            let stream = try await connection.openStream()
            try await stream.write([1])
            guard let accepted = await incoming.next(), let first = try await accepted.acceptStream(),
                  try await first.read(maxBytes: 1) != nil
            else { throw QUICBenchError("the relay's owner read no first byte") }
            samples.append((clock.now - start).benchSeconds * 1e3)
            await connection.abort()
        }
        return samples.sorted()[samples.count / 2]
    }

    private func note(_ text: String) {
        FileHandle.standardError.write(Data(("bench relay: " + text + "\n").utf8))
    }
}

/// Allocations at one coturn for the benchmark: each ``with(owner:peer:_:)`` allocates on the owner's socket,
/// attaches the relay, binds a channel to the peer, runs the body with the relayed address, and deallocates.
private struct RelaySetup: Sendable {
    let server: SocketAddress
    let secret: String

    func with<T: Sendable>(
        owner: Endpoint, peer: Endpoint, _ body: @Sendable (SocketAddress) async throws -> T
    ) async throws -> T {
        let credentials = try TURNCredentials.rest(
            secret: Array(secret.utf8), user: "bench", expiresAt: Int64(Date().timeIntervalSince1970) + 600
        )
        return try await TURNClient.withAllocation(
            server: server, credentials: credentials, transport: EndpointNonQUICTransport(owner)
        ) { turn in
            try await owner.attachRelay(turn)
            try await turn.bindChannel(to: peer.localAddress)
            let result = try await body(turn.relayedAddress)
            await owner.detachRelay(server: server)
            return result
        }
    }
}

/// The figures of one `bench relay` run, as written by `--json`.
struct RelayBenchReport: Codable {
    var date: String
    var command: String
    var host: String
    var bytes: Int
    var runs: Int
    var ttfbConnections: Int
    /// One stream, direct, per run.
    var directMBps: [Double] = []
    /// The same stream through coturn, per run.
    var relayedMBps: [Double] = []
    /// Per run, the median time from dial to first byte through the relay.
    var ttfbMilliseconds: [Double] = []
    /// Per run, the same direct.
    var ttfbDirectMilliseconds: [Double] = []

    static func median(_ values: [Double]) -> Double {
        values.isEmpty ? .nan : values.sorted()[values.count / 2]
    }

    func printTable() {
        let direct = Self.median(directMBps)
        let relayed = Self.median(relayedMBps)
        print("bench relay: \(bytes) bytes per stream, median of \(runs) runs, loopback through coturn")
        print("  path      throughput MB/s")
        print("  direct    " + String(format: "%10.1f", direct))
        print("  relayed   " + String(format: "%10.1f", relayed) + String(format: "   (%.2f × direct)", relayed / direct))
        print("  time to first byte (dial to the peer reading the first stream byte, \(ttfbConnections) per run):")
        print("  direct    " + String(format: "%8.2f ms", Self.median(ttfbDirectMilliseconds)))
        print("  relayed   " + String(format: "%8.2f ms", Self.median(ttfbMilliseconds)))
    }
}
