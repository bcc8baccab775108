import ArgumentParser
import Foundation
import HolePunch
import HolePunchCluster
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous
import HolePunchSTUN
import Logging

/// `holepunch rendezvous --listen ADDR:PORT …`: the rendezvous server plus its STUN responder.
struct RendezvousCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rendezvous",
        abstract: "Run a rendezvous: registers peers over QUIC and coordinates their punches; answers STUN.",
        discussion: """
            Prints one line `rendezvous NODEID quic ADDR stun ADDR…` (JSON with --json) once listening. Peers pin \
            that NodeID with `peer --rendezvous-id`; --identity keeps it stable across restarts and --node-id-file \
            writes it for scripts. STUN runs on --stun-port (default listen port + 1) with its alternate port \
            (--alt-port, default STUN port + 1) and, when given, the alternate IP (--alt-address). SIGTERM or \
            SIGINT shut down gracefully. With --cluster nats://HOST:PORT, instances sharing that NATS (and an identity) \
            form one rendezvous: a peer registered at any of them is reachable from all (docs/rendezvous.md).

            Examples:
              holepunch rendezvous --listen 127.0.0.1:7000 --node-id-file rdv.id
              holepunch rendezvous --listen 0.0.0.0:7000 --identity rdv.pem
              holepunch rendezvous --listen 0.0.0.0:7000 --identity rdv.pem --cluster nats://127.0.0.1:4222
            """
    )

    @Option(help: "QUIC listen address, numeric ADDR:PORT (port 0 picks one).")
    var listen: String

    @Option(help: "Identity file; created if missing. Without it the NodeID is new on every start.")
    var identity: String?

    @Option(help: "Write the NodeID to this file once listening.")
    var nodeIDFile: String?

    @Option(help: "STUN primary port (default: listen port + 1; 0 picks one).")
    var stunPort: UInt16?

    @Option(help: "STUN alternate port for RFC 5780 tests (default: STUN port + 1; 0 picks one).")
    var altPort: UInt16?

    @Option(help: "STUN alternate IP for RFC 5780 tests (same family as --listen), e.g. 127.0.0.2.")
    var altAddress: String?

    @Flag(help: "Run no STUN responder.")
    var noStun = false

    @Option(help: "A STUN responder of the other IP family, numeric ADDR:PORT (e.g. [2001:db8::1]:7001), advertised to peers so that one registered over one family learns its reflexive address on the other too. QUIC takes both families when --listen is [::]:PORT.")
    var stunOther: String?

    @Option(help: """
        Both peers start probing this many ms after receiving the coordinate message when the RTT measurements cannot vouch for less (see --min-start-delay-ms); the most any punch waits.
        """)
    var startDelayMs: Int = 150

    @Option(help: "The least start delay, ms: peers with RTT estimates get this plus their RTT spread.")
    var minStartDelayMs: Int = 20

    @Option(help: "Registration lifetime without keep-alives, in seconds (peers keep alive every third of it).")
    var registrationTtl: Int = 30

    @Option(help: "Punch requests a peer may make at once (token bucket size).")
    var rateBurst: Double = 10

    @Option(help: "Punch requests per second a peer regains.")
    var ratePerSecond: Double = 2

    @Option(help: "Messages of any kind one connection may send at once; a connection that runs out is closed.")
    var messageBurst: Double = RendezvousLimits().messageBurst

    @Option(help: "Messages per second one connection regains.")
    var messagesPerSecond: Double = RendezvousLimits().messagesPerSecond

    @Option(help: "Replies queued for a peer that is not reading before its connection is closed.")
    var maxQueuedReplies: Int = RendezvousLimits().maxQueuedFrames

    @Option(help: "Peer connections held at most (in any state).")
    var maxConnections: Int = RendezvousLimits().maxConnections

    @Option(help: "Join a cluster of instances through NATS at this URL (nats://HOST:PORT): peers registered at any instance are reachable from every other.")
    var cluster: String?

    @Flag(help: "With --cluster: when NATS is unreachable at start, run as a single instance instead of failing.")
    var clusterOptional = false

    @Option(help: "With --cluster: subject prefix shared by the instances of one deployment.")
    var clusterPrefix: String = "hp"

    @Option(help: "A TURN server (numeric ADDR:PORT) whose credentials registered peers receive; repeatable, at most 4. Needs --turn-secret-file.")
    var turnServer: [String] = []

    @Option(help: "File holding the secret shared with the TURN servers (coturn --static-auth-secret); it is never printed.")
    var turnSecretFile: String?

    @Option(help: "Lifetime of minted TURN credentials, in seconds; peers re-register for fresh ones.")
    var turnCredentialTtl: Int = 600

    @Flag(help: "Print the start line as JSON.")
    var json = false

    @Flag(help: "Log registrations, sessions and measured skews to standard error.")
    var verbose = false

    func validate() throws {
        // Refused rather than clamped: a rendezvous that runs with other limits than it was given misleads.
        guard registrationTtl >= 1 else { throw ValidationError("--registration-ttl must be at least 1 second") }
        guard startDelayMs >= 0, minStartDelayMs >= 0 else {
            throw ValidationError("--start-delay-ms and --min-start-delay-ms must be >= 0")
        }
        guard rateBurst >= 1, ratePerSecond > 0 else {
            throw ValidationError("--rate-burst must be >= 1 and --rate-per-second > 0")
        }
        guard messageBurst >= 1, messagesPerSecond > 0 else {
            throw ValidationError("--message-burst must be >= 1 and --messages-per-second > 0")
        }
        if clusterOptional, cluster == nil { throw ValidationError("--cluster-optional needs --cluster") }
        guard NATSDirectory.isSubject(clusterPrefix), !clusterPrefix.contains("*"), !clusterPrefix.contains(">") else {
            throw ValidationError("--cluster-prefix must be printable, without spaces or wildcards")
        }
        guard maxQueuedReplies >= 1, maxConnections >= 1 else {
            throw ValidationError("--max-queued-replies and --max-connections must be >= 1")
        }
        guard turnServer.isEmpty == (turnSecretFile == nil) else {
            throw ValidationError("--turn-server and --turn-secret-file go together")
        }
        guard turnServer.count <= TURNGrant.maximumServers else {
            throw ValidationError("at most \(TURNGrant.maximumServers) --turn-server")
        }
        guard turnCredentialTtl >= 60 else { throw ValidationError("--turn-credential-ttl must be at least 60 seconds") }
    }

    func run() async throws {
        let address: SocketAddress
        do { address = try SocketAddress(parsing: listen) } catch {
            throw usageFailure("\(error)", hint: "use a numeric address such as 127.0.0.1:3478")
        }
        let id: Identity
        do { id = try loadOrCreateIdentity(identity).0 } catch {
            throw cliFailure("cannot load or create the identity \(identity ?? ""): \(error)", hint: "check the path and its permissions")
        }
        var stun: STUNResponderConfiguration?
        if !noStun {
            let primaryPort = stunPort ?? (address.port == 0 ? 0 : address.port &+ 1)
            let alternate = altPort ?? (primaryPort == 0 ? 0 : primaryPort &+ 1)
            var altIP: SocketAddress.IP?
            if let altAddress {
                do { altIP = try SocketAddress(parsing: altAddress.contains(":") && !altAddress.hasPrefix("[") ? "[\(altAddress)]:0" : "\(altAddress):0").ip } catch {
                    throw usageFailure("\(error)", hint: "--alt-address takes a numeric IP such as 127.0.0.2")
                }
            }
            stun = STUNResponderConfiguration(primary: SocketAddress(ip: address.ip, port: primaryPort), alternatePort: alternate,
                                              alternateIP: altIP, software: "holepunch")
        }
        let logger = verbose ? Logger(label: "holepunch.rendezvous", factory: { StreamLogHandler.standardError(label: $0) })
                             : Logger(label: "holepunch.rendezvous", factory: { _ in SwiftLogNoOpLogHandler() })
        var otherFamily: STUNResponderConfiguration?
        if let stunOther, !noStun {
            let other: SocketAddress
            do { other = try SocketAddress(parsing: stunOther) } catch {
                throw usageFailure("--stun-other: \(error)", hint: "a numeric ADDR:PORT such as [::1]:7001")
            }
            guard other.family != address.family else {
                throw usageFailure("--stun-other \(stunOther) is of --listen's family", hint: "give an address of the other IP family")
            }
            otherFamily = STUNResponderConfiguration(primary: other, software: "holepunch")
        }
        var configuration = RendezvousServerConfiguration(
            listen: address, identity: id, stun: stun,
            state: RendezvousState.Configuration(registrationTTL: .seconds(registrationTtl),
                                                 startDelay: .milliseconds(startDelayMs),
                                                 minStartDelay: .milliseconds(minStartDelayMs),
                                                 rateBurst: rateBurst, ratePerSecond: ratePerSecond),
            limits: RendezvousLimits(messageBurst: messageBurst, messagesPerSecond: messagesPerSecond,
                                     maxQueuedFrames: maxQueuedReplies, maxConnections: maxConnections)
        )
        configuration.otherFamilySTUN = otherFamily
        configuration.turn = try turnMinting()
        let server: RendezvousServer
        do { server = try await RendezvousServer.bind(configuration: configuration, logger: logger) } catch {
            throw cliFailure("\(error.message)", hint: "is the port (or listen port + 1 for STUN) already in use? try --stun-port or --no-stun")
        }
        if let cluster {
            do {
                let directory = try NATSDirectory.connect(NATSDirectoryConfiguration(url: cluster, subjectPrefix: clusterPrefix),
                                                          logger: logger)
                await server.use(directory: directory)
            } catch where clusterOptional {
                FileHandle.standardError.write(Data("warning: \(error.message); running as a single instance\n".utf8))
            } catch {
                await server.shutdown()
                throw cliFailure(error.message, hint: "start nats-server, check --cluster, or add --cluster-optional")
            }
        }
        if let nodeIDFile {
            do { try (server.nodeID.description + "\n").write(toFile: nodeIDFile, atomically: true, encoding: .utf8) } catch {
                throw cliFailure("cannot write \(nodeIDFile): \(error)", hint: "check the path")
            }
        }
        if json {
            emitLine(jsonLine(["event": "listening", "nodeID": server.nodeID.description, "quic": server.address.description,
                            "stun": server.stunAddresses.map(\.description)]))
        } else {
            let stunText = server.stunAddresses.isEmpty ? "none" : server.stunAddresses.map(\.description).joined(separator: " ")
            emitLine("rendezvous \(server.nodeID) quic \(server.address) stun \(stunText)")
        }
        do { try await server.runUntilSignalled(logger: logger) } catch {
            throw cliFailure("the rendezvous stopped: \(error)", hint: nil)
        }
    }

    /// The TURN minting rule from the options, or nil without --turn-server.
    private func turnMinting() throws -> TURNMinting? {
        guard let turnSecretFile, !turnServer.isEmpty else { return nil }
        var servers: [SocketAddress] = []
        for text in turnServer {
            do { servers.append(try SocketAddress(parsing: text)) } catch {
                throw usageFailure("\(error)", hint: "--turn-server takes a numeric ADDR:PORT such as 127.0.0.1:3478")
            }
        }
        // Clients refuse a grant naming such an address (TURNGrant.validate), so every registration would fail.
        if let bad = servers.first(where: { $0.port == 0 || $0.scope.isNeverAProbeTarget }) {
            throw usageFailure("--turn-server \(bad) is not a TURN server address",
                               hint: "give the TURN server's unicast ADDR:PORT, such as 127.0.0.1:3478")
        }
        do {
            let secret = try TURNMinting.secret(fromFile: turnSecretFile)
            return TURNMinting(servers: servers, secret: secret, ttl: .seconds(turnCredentialTtl))
        } catch {
            throw cliFailure(error.message, hint: "write the secret shared with coturn (--static-auth-secret) into the file")
        }
    }
}
