import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous
import HolePunchPortMapping
import HolePunchSTUN
import HolePunchStrategy
import Logging

/// `holepunch peer …`: register at a rendezvous, then punch to a peer (`--connect`) or accept punches, and pipe
/// standard input and output over the punched QUIC connection.
struct PeerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "peer",
        abstract: "Register at a rendezvous; punch to a NodeID (--connect) or wait for punches; then pipe stdin/stdout.",
        discussion: """
            Status lines go to standard error (JSON objects with --json): registered, nat, coordinated, progress, \
            connected, error. Standard output carries only the bytes received from the other peer, so the command \
            can be piped. Standard input is sent to the other peer; the command exits once both directions have \
            ended (stdin EOF and the peer's end of stream) and the peer has acknowledged everything sent, then \
            closes the connection. With --echo, what arrives is sent back instead of stdin. \
            Exit status: 0 success (both directions ended cleanly, everything sent was acknowledged), 1 local \
            error, 64 bad arguments, 2 rendezvous error, 3 punch failure or a connection that failed before both directions \
            ended cleanly (one error line).

            Examples:
              holepunch peer --rendezvous 127.0.0.1:7000 --rendezvous-id @rdv.id \\
                  --identity b.pem --echo
              echo hello | holepunch peer --rendezvous 127.0.0.1:7000 \\
                  --rendezvous-id @rdv.id --identity a.pem --connect NODEID
              holepunch peer --rendezvous rdv.example.org:7000 --rendezvous-id @rdv.id \\
                  --identity b.pem --allow NODEID
            """
    )

    @Option(help: "The rendezvous's QUIC address, HOST:PORT (a host name is resolved once at start).")
    var rendezvous: String

    @Option(help: "The rendezvous's NodeID (it prints it at start), or @FILE to read it from its --node-id-file.")
    var rendezvousId: String

    @Option(help: "This peer's identity file; created if missing.")
    var identity: String

    @Option(help: "Local address of the punch socket (default: port 0 on the IPv6 wildcard (dual-stack) when this host has a usable IPv6 address and the rendezvous is not on loopback, else the wildcard of the rendezvous's family). A specific IP is published as a host candidate; a wildcard publishes the addresses of the usable interfaces.")
    var listen: String?

    @Option(name: .customLong("exclude-address"),
            help: ArgumentHelp("An interface address never to publish as a candidate (repeatable; e.g. a VPN's).",
                               valueName: "ip"))
    var excludeAddress: [String] = []

    @Option(help: "A Lua strategy file (default: the bundled default.lua; the built-in Swift plan answers when a script fails).")
    var strategy: String?

    @Option(help: "Punch to this NodeID instead of waiting for punches.")
    var connect: String?

    @Option(name: .customLong("allow"),
            help: ArgumentHelp("Only this NodeID may make this peer punch (repeatable; default: any registered peer).",
                               valueName: "nodeid"))
    var allow: [String] = []

    @Flag(inversion: .prefixedNo, help: "Measure this NAT against the rendezvous's STUN responder, beside registering and punching (the result refines the registration).")
    var natDetect = true

    @Flag(inversion: .prefixedNo, help: "Ask the router for a mapping of the punch port (PCP, NAT-PMP, UPnP-IGD) beside registering, and publish it as a 'mapped' candidate (never with a loopback rendezvous).")
    var portMapping = true

    @Flag(help: "Send back whatever arrives instead of reading standard input.")
    var echo = false

    @Option(help: "Overall punch timeout in seconds (default: the strategy's).")
    var timeout: Int?

    @Option(help: "Seconds between keep-alives on an idle connection: below the shortest UDP mapping timeout of the NATs on the way (default 25; 0 disables).")
    var keepAlive: Int?

    @Flag(help: "Status lines as JSON objects.")
    var json = false

    @Flag(help: "Debug logs to standard error.")
    var verbose = false

    func validate() throws {
        // The side that connects opens the stream; with nothing to send it would wait for the other side's data
        // forever, while the other side waits for a stream that never carries a byte.
        if echo && connect != nil {
            throw ValidationError("--echo is for the waiting side; the side that --connects sends its standard input")
        }
        if let timeout, timeout < 1 { throw ValidationError("--timeout must be at least 1 second") }
        // The connection's idle timeout is 30 s: keep-alives any rarer would let an idle connection end.
        if let keepAlive, !(0..<30).contains(keepAlive) {
            throw ValidationError("--keep-alive must be 0 (off) to 29 seconds, below the 30 s idle timeout")
        }
    }

    func run() async throws {
        signal(SIGPIPE, SIG_IGN)
        let server: SocketAddress
        do { server = try SocketAddress.resolving(rendezvous) } catch {
            throw usageFailure("--rendezvous: \(error)", hint: "use HOST:PORT, e.g. 127.0.0.1:3478 or rendezvous.example.org:3478")
        }
        let serverID = try parseNodeID(rendezvousId, what: "--rendezvous-id",
                                       hint: "copy the NodeID printed by `holepunch rendezvous`, or pass @FILE from its --node-id-file")
        let target = try connect.map { try parseNodeID($0, what: "--connect", hint: "copy the NodeID the other peer printed") }
        let allowed = try Set(allow.map { try parseNodeID($0, what: "--allow", hint: "copy the NodeID the other peer printed") })
        let excluded = try Set(excludeAddress.map { text in
            do { return try SocketAddress(host: text, port: 0).ip } catch {
                throw usageFailure("--exclude-address: \(error)", hint: "give a numeric IPv4 or IPv6 address, e.g. 10.8.0.2")
            }
        })
        let local: SocketAddress
        if let listen {
            do { local = try SocketAddress(parsing: listen) } catch { throw usageFailure("\(error)", hint: "e.g. --listen 127.0.0.1:0") }
        } else {
            // An IPv6 wildcard socket is dual-stack (it reaches IPv4 peers too), so a host with a usable IPv6 address
            // binds one even for an IPv4 rendezvous: the peer's IPv6 path (often un-NATed) can then be checked. A
            // loopback rendezvous keeps the plain IPv4 socket (tests and local runs see no change).
            let wantsDualStack = server.isIPv6 || (server.scope != .loopback
                && HostCandidates.hasUsableAddress(of: .ipv6))
            local = wantsDualStack ? SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0) : .anyV4(port: 0)
        }
        let id: Identity
        do { id = try loadOrCreateIdentity(identity).0 } catch {
            throw cliFailure("cannot load or create the identity \(identity): \(error)", hint: "check the path and its permissions")
        }
        let logger = verbose ? Logger(label: "holepunch.peer", factory: { StreamLogHandler.standardError(label: $0) })
                             : Logger(label: "holepunch.peer", factory: { _ in SwiftLogNoOpLogHandler() })
        let endpoint: Endpoint
        do {
            var configuration = EndpointConfiguration(identity: id, acceptPolicy: .none)
            if let keepAlive { configuration.keepAliveInterval = keepAlive == 0 ? nil : .seconds(keepAlive) }
            endpoint = try await Endpoint.bind(local, configuration: configuration, logger: logger)
        } catch {
            throw cliFailure("cannot bind \(local): \(error)", hint: "choose another --listen address or port")
        }
        let chosen: FallbackStrategy
        if let strategy {
            chosen = FallbackStrategy.loading(path: strategy, logger: logger)
            if let problem = chosen.lastError {
                warn("strategy \(strategy) failed to load, using the built-in default: \(problem)")
            }
        } else {
            chosen = FallbackStrategy.recommended(logger: logger)
        }
        let executor = PunchExecutor(endpoint: endpoint, configuration: PunchExecutor.Configuration(strategy: chosen),
                                     logger: logger)
        var clientConfiguration = RendezvousClientConfiguration(server: server, serverNodeID: serverID,
                                                                punchTimeout: timeout.map { .seconds($0) })
        clientConfiguration.admission = allowed.isEmpty ? .any : .allowList(allowed)
        // Discovery runs beside registration and the punch, not before them (it waits out filtering timeouts).
        clientConfiguration.backgroundNATDiscovery = natDetect ? NATDiscovery.Configuration() : nil
        let client = RendezvousClient(executor: executor, configuration: clientConfiguration, logger: logger)
        defer { endpoint.closeSoon() }

        // Started before the registration, which never waits for it; a grant is published by a re-register.
        let mapper = portMapping ? PortMapper.forPunchSocket(endpoint, rendezvous: server, logger: logger) : nil
        let firstMapping = mapper.map { mapper in Task { try? await mapper.map() } }
        let hosts = Registration.hostCandidates(of: endpoint, rendezvous: server, excluding: excluded)
        // The initiator's punch request leaves right behind its register (one flight, no round trip between).
        let registration = Registration(candidates: hosts)
        let outcome: Result<(registered: Registered, coordinate: ReceivedCoordinate?), RendezvousError>
        do {
            if let target {
                let both = try await client.connect(registration, coordinatingWith: target)
                outcome = .success((both.registered, both.coordinate))
            } else {
                outcome = .success((try await client.connect(registration), nil))
            }
        } catch {
            outcome = .failure(error)
        }
        // A refused request (say, an unknown target) still registered: report that first, as before.
        let registered: Registered
        var refusal: RendezvousError?
        var pipelined: ReceivedCoordinate?
        switch outcome {
        case .success(let both):
            registered = both.registered
            pipelined = both.coordinate
        case .failure(let error):
            guard let confirmed = await client.registered else { throw rendezvousFailure(error) }
            registered = confirmed
            refusal = error
        }
        status("registered", ["node": id.nodeID.description, "observed": registered.observedAddress.description,
                              "local": endpoint.localAddress.description])
        if let refusal { throw rendezvousFailure(refusal) }
        let mappingKeeper = mapper.flatMap { mapper in
            firstMapping.map { first in Task { await client.keepPortMapping(mapper, first: first, logger: logger) } }
        }
        if let firstMapping {
            Task {
                guard let granted = await firstMapping.value else { return }
                self.status("port-mapped", ["protocol": granted.mappingProtocol.rawValue,
                                       "external": granted.external.description, "lease": Int(granted.lifetimeSeconds)])
            }
        }
        Task {
            switch await client.natDiscoveryResult() {
            case .success(let behaviour):
                let profile = NATProfile(behaviour)
                status("nat", ["type": profile.type.rawValue, "mapping": profile.mapping.rawValue, "filtering": profile.filtering.rawValue,
                               "allocation": profile.allocation.rawValue, "confidence": profile.confidence])
            case .failure(let error):
                // After close() discovery merely stopped: nothing to warn about.
                if await client.failure == nil {
                    status("warning", ["message": "NAT discovery failed, punching with an unknown profile: \(error)"])
                }
            case nil:
                break
            }
        }

        let ended: Result<Void, any Error>
        do {
            let connection: QUICConnection
            if let target {
                connection = try await punch(to: target, client: client, received: pipelined)
            } else {
                status("waiting", ["message": "waiting for punches"])
                connection = try await acceptPunch(client: client)
            }
            await client.close()
            try await pipe(connection)
            ended = .success(())
        } catch {
            ended = .failure(error)
        }
        // The connection may have run over the mapping: it is deleted only now (bounded), before exit.
        mappingKeeper?.cancel()
        await mappingKeeper?.value
        try ended.get()
    }

    // MARK: Steps

    private func punch(to target: NodeID, client: RendezvousClient, received pipelined: ReceivedCoordinate?)
        async throws -> QUICConnection
    {
        let received: ReceivedCoordinate
        if let pipelined {
            received = pipelined
        } else {
            do { received = try await client.coordinate(to: target) } catch { throw rendezvousFailure(error) }
        }
        report(received)
        let handle = await client.startPunch(received)
        let progress = Task { for await event in handle.events { self.report(event) } }
        let result = await handle.result()
        await progress.value
        switch result {
        case .success(let connection): return connection
        case .failure(let error): throw punchFailure(error)
        }
    }

    private func acceptPunch(client: RendezvousClient) async throws -> QUICConnection {
        for await punch in client.incomingPunches {
            report(punch.coordinate)
            let handle = punch.handle
            let progress = Task { for await event in handle.events { self.report(event) } }
            let result = await handle.result()
            await progress.value
            switch result {
            case .success(let connection): return connection
            case .failure(let error):
                // A failed incoming punch is reported; the peer keeps waiting for the next one.
                status("punch-failed", ["code": error.code.rawValue, "message": error.message])
            }
        }
        let reason = await client.failure.map { "\($0)" } ?? "the rendezvous connection ended"
        throw cliFailure("stopped waiting: \(reason)", hint: "is the rendezvous still running?", code: 2)
    }

    /// Pipes stdin (or the echo) to the stream and the stream to stdout until both directions end, then closes
    /// gracefully. Succeeds only when the peer's end of stream arrived after all its bytes and the peer acknowledged
    /// everything this side sent; anything else is a punch-connection failure (exit 3, one error line).
    private func pipe(_ connection: QUICConnection) async throws {
        let stream: QUICStream
        do {
            if connection.isClient {
                stream = try await connection.openStream()
            } else {
                guard let accepted = try await connection.acceptStream() else {
                    throw QUICError(.connectionClosed, "the peer closed the connection before opening a stream")
                }
                stream = accepted
            }
        } catch {
            throw connectionFailure("\(error)")
        }
        let echo = self.echo
        // A move of the connection to another path (the NAT rebound, the path died) is reported, nothing more.
        let changes = await connection.pathChanges()
        let pathWatcher = Task {
            for await change in changes {
                status("path-changed", ["from": "\(change.from.address)", "to": "\(change.to.address)",
                                        "reason": change.reason.name])
            }
        }
        defer { pathWatcher.cancel() }
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                if !echo {
                    group.addTask {
                        for await line in standardInputLines() { try await stream.write(line) }
                        try await stream.finish()
                    }
                }
                group.addTask {
                    while let chunk = try await stream.read() {
                        FileHandle.standardOutput.write(Data(chunk))
                        if echo { try await stream.write(chunk) }
                    }
                    if echo { try await stream.finish() }
                }
                // The first failure ends both directions.
                try await group.waitForAll()
            }
        } catch {
            await connection.abort(errorCode: 1, reason: "transfer failed")
            throw connectionFailure("\(error)")
        }
        // The graceful close waits for the peer to acknowledge what we wrote, our end of stream included.
        guard await connection.close() else {
            throw connectionFailure("the peer did not acknowledge everything sent before the connection ended")
        }
    }

    /// The punched connection failed after it was made: exit 3 with one error line.
    private func connectionFailure(_ message: String) -> ExitCode {
        if json { status("error", ["code": "connection", "message": message]) }
        return cliFailure("the punched connection failed: \(message)", hint: nil, code: 3)
    }

    // MARK: Output

    private func report(_ received: ReceivedCoordinate) {
        let c = received.coordinate
        status("coordinated", ["session": c.sessionID, "role": c.role.rawValue, "peer": c.peer.description,
                               "candidates": c.candidates.map(\.address.description), "peerNAT": c.peerNAT.type.rawValue,
                               "startInMs": Double(c.startDelayMicroseconds) / 1000])
    }

    private func report(_ event: PunchEvent) {
        switch event {
        case let .planned(strategy): status("planned", ["strategy": strategy])
        case let .strategyFellBack(strategy, reason):
            warn(fallbackWarning(strategy, reason))
        case let .roundStarted(round, ports): status("round", ["round": round, "ports": ports])
        case let .probeAnswered(from): status("probe-answered", ["from": from.description])
        case let .connecting(to): status("connecting", ["to": to.description])
        case let .done(.success(success)):
            status("connected", ["path": "\(success.localPort)->\(success.remoteAddress)", "remote": success.remoteAddress.description,
                                 "localPort": Int(success.localPort), "timeToConnectMs": milliseconds(success.timeToConnect),
                                 "rounds": success.rounds, "candidate": success.candidate.kind.rawValue,
                                 "family": success.candidate.family.rawValue])
        case .done(.failure): break  // reported once, with a hint, by the caller
        }
    }

    /// A fault the user must see whatever the verbosity: one `warning: …` line (a JSON status with --json).
    private func warn(_ message: String) {
        if json { status("warning", ["message": message]) } else { emitStatus("warning: \(message)") }
    }

    private func status(_ event: String, _ fields: [String: Any]) {
        if json {
            var object = fields
            object["event"] = event
            emitStatus(jsonLine(object))
        } else {
            let text = fields.sorted { $0.key < $1.key }.map { key, value -> String in
                if let list = value as? [String] { return "\(key)=\(list.joined(separator: ","))" }
                return "\(key)=\(value)"
            }.joined(separator: " ")
            emitStatus("\(event) \(text)")
        }
    }

    private func rendezvousFailure(_ error: RendezvousError) -> ExitCode {
        let hint: String = switch error.code {
        case .unknownTarget: "is the other peer running and registered at this rendezvous? check the NodeID it printed"
        case .connectionFailed: "check --rendezvous HOST:PORT and --rendezvous-id (the rendezvous prints its NodeID at start)"
        case .rateLimited: "wait a few seconds before asking again"
        case .timeout, .disconnected: "is the rendezvous still running and reachable over UDP?"
        default: "see the rendezvous's log (--verbose)"
        }
        if json { status("error", ["code": error.code.name, "message": error.message]) }
        return cliFailure("rendezvous \(error.code): \(error.message)", hint: hint, code: 2)
    }

    private func punchFailure(_ error: PunchError) -> ExitCode {
        if json { status("error", ["code": error.code.rawValue, "message": error.message, "portsTried": error.portsTried.count,
                                   "rounds": error.rounds]) }
        return cliFailure("punch failed: \(error.code.rawValue): \(error.message)",
                          hint: "the peer may have gone away, or the NATs need another strategy (--strategy)", code: 3)
    }
}

private func milliseconds(_ duration: Duration) -> Double {
    (duration / .microseconds(1)).rounded() / 1000
}

/// Parses a NodeID, or reads it from the file after `@`.
func parseNodeID(_ text: String, what: String, hint: String) throws -> NodeID {
    var value = text
    if text.hasPrefix("@") {
        let path = String(text.dropFirst())
        guard let contents = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw cliFailure("\(what): cannot read \(path)", hint: hint)
        }
        value = contents.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    do { return try NodeID(parsing: value) } catch {
        throw usageFailure("\(what): \(error)", hint: hint)
    }
}

/// Standard input, line by line (newline kept), read on a dedicated thread so no cooperative thread blocks.
func standardInputLines() -> AsyncStream<[UInt8]> {
    let (stream, continuation) = AsyncStream.makeStream(of: [UInt8].self)
    let thread = Thread {
        while let line = readLine(strippingNewline: false) { continuation.yield(Array(line.utf8)) }
        continuation.finish()
    }
    thread.start()
    return stream
}

extension Endpoint {
    /// Closes the endpoint from a synchronous context (a `defer`).
    nonisolated func closeSoon() {
        Task { await self.close() }
    }
}
