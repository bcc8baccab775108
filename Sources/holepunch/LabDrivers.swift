import ArgumentParser
import Foundation
import HolePunch
import HolePunchRendezvous
import HolePunchPortMapping
import HolePunchSTUN
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import HolePunchLab
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// The small programs `holepunch lab matrix` and the lab tests start inside the namespaces. They print one JSON
// object per line (machine-readable progress and a final result) and exit on their own, so a harness never has
// to interpret human output or guess when a punch ended.

/// The profile a lab NAT type is built to have (docs/lab.md), for peers told their NAT instead of measuring it.
/// The lab's own names only: `preset(named:)` also takes the alias `symmetric`, which lab commands never accepted.
func labProfile(_ type: String) -> NATProfile? {
    type == "symmetric" ? nil : NATProfile.preset(named: type)
}

// MARK: - lab rendezvous

/// `holepunch lab rendezvous`: the rendezvous server plus its RFC 5780 STUN responder, for the lab's rdv host.
struct LabRendezvousCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rendezvous",
        abstract: "Lab driver: run a rendezvous with a STUN responder and write a ready file once listening.",
        discussion: """
            Run by the lab scripts inside the lab's rendezvous namespace; not meant for direct use.

            Examples:
              holepunch lab rendezvous --identity rdv.pem --ready-file rdv.ready
            """
    )

    @Option(help: "QUIC listen address, numeric ADDR:PORT.") var listen = "198.51.100.10:7000"
    @Option(help: "Identity file (made with the same format as `identity create`).") var identity: String
    @Option(help: "STUN primary address.") var stun = "198.51.100.10:3480"
    @Option(help: "STUN alternate port.") var stunAltPort: UInt16 = 3481
    @Option(help: "STUN alternate IP.") var stunAltIP = "198.51.100.11"
    @Option(help: "Start delay ceiling of coordinated punches, ms (measured peers get less).") var startDelay = 150
    @Option(help: "Written (with the NodeID) once listening.") var readyFile: String?
    @Flag(help: "Run no STUN responder (e.g. for an impostor QUIC server).") var noStun = false
    @Option(help: "A STUN responder of the other IP family, numeric ADDR:PORT, advertised to peers (dual-stack topology).")
    var stunOther: String?
    @Option(help: "A TURN server (numeric ADDR:PORT, the lab's coturn) whose credentials registered peers receive.")
    var turnServer: String?
    @Option(help: "File holding the secret shared with that TURN server; needs --turn-server.") var turnSecretFile: String?

    func run() async throws {
        labUnblockTerminationSignals()
        let id = try Identity.load(from: identity)
        guard (turnServer == nil) == (turnSecretFile == nil) else {
            throw ValidationError("--turn-server and --turn-secret-file go together")
        }
        let primary = try SocketAddress(parsing: stun)
        let alternate = try SocketAddress(parsing: "\(stunAltIP):\(stunAltPort)")
        var configuration = RendezvousServerConfiguration(
            listen: try SocketAddress(parsing: listen), identity: id,
            stun: noStun ? nil : STUNResponderConfiguration(primary: primary, alternatePort: stunAltPort, alternateIP: alternate.ip),
            // The matrix registers a fresh pair of identities per trial, quickly: no rate limit worth the name.
            state: RendezvousState.Configuration(startDelay: .milliseconds(startDelay), rateBurst: 10_000, ratePerSecond: 10_000),
            housekeepingInterval: .milliseconds(500)
        )
        if let stunOther, !noStun {
            configuration.otherFamilySTUN = STUNResponderConfiguration(primary: try SocketAddress(parsing: stunOther))
        }
        if let turnServer, let turnSecretFile {
            // The lab's coturn (lab.sh up --turn): peers get credentials as from `rendezvous --turn-server`.
            configuration.turn = TURNMinting(servers: [try SocketAddress(parsing: turnServer)],
                                             secret: try TURNMinting.secret(fromFile: turnSecretFile))
        }
        let server = try await RendezvousServer.bind(configuration: configuration)
        let task = Task { try await server.run() }
        labEmit(["event": "listening", "address": "\(server.address)", "node": "\(server.nodeID)",
                 "stun": server.stunAddresses.map { "\($0)" }])
        if let readyFile { try "\(server.nodeID)\n".write(toFile: readyFile, atomically: true, encoding: .utf8) }
        _ = await task.result
    }
}

// MARK: - lab detect

/// `holepunch lab detect`: RFC 5780 NAT behaviour discovery printed as one JSON object (the `NATBehaviour`).
struct LabDetectCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detect",
        abstract: "Lab driver: classify this host's NAT against a STUN responder; print the verdict as JSON.",
        discussion: """
            Run by the lab scripts inside a peer's namespace; `nat detect` is the command for other hosts.

            Examples:
              holepunch lab detect --stun 198.51.100.10:3480
            """
    )

    @Option(help: "STUN primary address.") var stun = "198.51.100.10:3480"
    @Option(help: "Local address to bind.") var bind = "0.0.0.0:0"

    func run() async throws {
        labUnblockTerminationSignals()
        let behaviour = try await NATDiscoveryClient.discover(server: try SocketAddress(parsing: stun),
                                                              bindAddress: try SocketAddress(parsing: bind))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        print(String(decoding: try encoder.encode(behaviour), as: UTF8.self))
    }
}

// MARK: - lab peer

/// `holepunch lab peer`: one peer of one punch, through the rendezvous; exits when the punch has ended.
///
/// Without `--connect` it is the target: it registers, writes `--ready-file`, and waits for the punch the
/// rendezvous coordinates. With `--connect NODEID` it is the initiator: it registers and requests the punch
/// (retrying while the target is not registered yet). Both print `{"event": "result", …}` with the time to
/// connect from the coordinated start, rounds and error code; after a success a line goes both ways over a
/// stream, which proves the connection carries data.
struct LabPeerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "peer",
        abstract: "Lab driver: register at a rendezvous, punch once, print JSON lines, exit.",
        discussion: """
            Run by the lab scripts inside a peer's namespace; `holepunch peer` is the command for other hosts.

            Examples:
              holepunch lab peer --rendezvous-id @rdv.id --identity b.pem
              holepunch lab peer --rendezvous-id @rdv.id --identity a.pem --connect NODEID
            """
    )

    @Option(help: "The rendezvous, numeric HOST:PORT.") var rendezvous = "198.51.100.10:7000"
    @Option(help: "The rendezvous's NodeID.") var rendezvousID: String
    @Option(help: "This peer's identity file.") var identity: String
    @Option(help: "Punch to this NodeID (initiator); without it, wait for a punch (target).") var connect: String?
    @Option(help: "Lua strategy file; default: the bundled default.lua.") var strategy: String?
    @Option(help: "Tell the rendezvous this NAT type (full_cone … symmetric_random) instead of measuring it.")
    var nat: String?
    @Flag(help: """
        Measure the NAT (RFC 5780, from the punch socket) in the background and publish the result; the target \
        waits for it before it reports ready (a peer that has waited a while), the initiator punches at once.
        """)
    var discover = false
    @Flag(help: """
        With --discover, the initiator too waits until its discovery has ended and been published (with the last         port its NAT allocated) before it asks for the punch, instead of punching at once.
        """)
    var discoverFirst = false
    @Option(help: "Give up after this many seconds (whole run).") var timeout: Double = 15
    @Option(help: "Punch timeout in seconds (overrides the plan's).") var punchTimeout: Double?
    @Option(help: "Local address to bind.") var bind = "0.0.0.0:0"
    @Option(help: "Written once registered.") var readyFile: String?
    @Flag(help: """
        Ask the router for a port mapping (lab/portmap.sh) beside registering and publish it as a 'mapped' \
        candidate; the target waits for the first answer before it reports ready.
        """)
    var portMapping = false
    @Flag(help: "Allocate no relay even when the rendezvous grants one (the target then publishes no relayed address).")
    var noRelay = false
    @Option(help: "After a first echo over the relay, wait up to this many seconds for the move to a direct path, then echo again.")
    var directWait: Double = 5
    @Option(help: "Send this many bytes more after the last line (and expect them echoed whole), 0–4194304.") var transfer = 0
    @Flag(help: "Log the endpoint's and the punch's debug lines to standard error (the JSON lines stay on standard output).")
    var verbose = false

    /// Seconds become whole milliseconds below: a non-finite or huge value would trap there.
    func validate() throws {
        guard timeout.isFinite, (0.1...3_600).contains(timeout) else { throw ValidationError("--timeout is 0.1–3600 s") }
        if let punchTimeout, !(punchTimeout.isFinite && (0.1...600).contains(punchTimeout)) {
            throw ValidationError("--punch-timeout is 0.1–600 s")
        }
        guard directWait.isFinite, (0...600).contains(directWait) else { throw ValidationError("--direct-wait is 0–600 s") }
    }

    func run() async throws {
        labUnblockTerminationSignals()
        let started = ContinuousClock.now
        let role = connect == nil ? "target" : "initiator"
        let chosen = try strategy.map { path throws(StrategyError) in try LuaStrategy(path: path) } ?? LuaStrategy.bundledDefault()
        let strategyName = chosen.name
        var profile: NATProfile?
        if let nat {
            guard let known = labProfile(nat) else { throw ValidationError("unknown NAT type \(nat)") }
            profile = known
        }
        let logs = verbose
        var logger = Logger(label: "holepunch.lab.peer", factory: { label in
            logs ? StreamLogHandler.standardError(label: label) as any LogHandler : SwiftLogNoOpLogHandler()
        })
        logger.logLevel = .debug
        let endpoint = try await Endpoint.bind(try SocketAddress(parsing: bind),
                                               configuration: EndpointConfiguration(identity: try Identity.load(from: identity),
                                                                                    acceptPolicy: .none),
                                               logger: logger)
        let executor = PunchExecutor(endpoint: endpoint, configuration: .init(strategy: chosen), logger: logger)
        let server = try SocketAddress(parsing: rendezvous)
        // What `holepunch peer` publishes: without its host candidates, two peers on one LAN have no path.
        let hosts = Registration.hostCandidates(of: endpoint, rendezvous: server)
        var clientConfiguration = RendezvousClientConfiguration(
            server: server, serverNodeID: try NodeID(parsing: rendezvousID),
            requestTimeout: .seconds(5), strategy: chosen, punchTimeout: punchTimeout.map { .milliseconds(Int($0 * 1000)) })
        clientConfiguration.backgroundNATDiscovery = discover ? NATDiscovery.Configuration() : nil
        let client = RendezvousClient(executor: executor, configuration: clientConfiguration)
        let limit = Duration.milliseconds(Int(timeout * 1000))
        // Started before the registration, as `holepunch peer` does.
        let mapper = portMapping ? PortMapper.forPunchSocket(endpoint, rendezvous: clientConfiguration.server,
                                                             logger: Logger(label: "holepunch.lab.portmap")) : nil
        let mapping = mapper.flatMap { mapper in LabMapping(mapper: mapper, first: Task { try? await mapper.map() }) }
        let (target, nat, measure, ready, first) = (connect, profile, discover, readyFile, discover && discoverFirst)
        guard (0...LabPeerCommand.transferLimit).contains(transfer) else { throw ValidationError("--transfer is 0–\(LabPeerCommand.transferLimit)") }
        let relaying = LabRelaying(enabled: !noRelay, directWait: .milliseconds(Int(directWait * 1000)),
                                   lastLine: labLastLine + labTransferBytes(transfer))
        let outcome = await labWithin(limit) {
            LabRecord(fields: await Self.punch(client: client, role: role, target: target,
                                               registration: Registration(candidates: hosts, nat: nat), discover: measure,
                                               discoverFirst: first, readyFile: ready, started: started, mapping: mapping,
                                               relaying: relaying))
        }
        var result = outcome?.fields ?? ["ok": false, "error": "harnessTimeout", "message": "no result within \(timeout) s"]
        result["event"] = "result"
        result["role"] = role
        result["strategy"] = strategyName
        result["wall_ms"] = labMilliseconds(ContinuousClock.now - started)
        labEmit(result)
        // The allocation goes first (bounded): left behind, it would count against coturn's quotas for its lifetime.
        if let relay = relaying.published.value { _ = await labWithin(.seconds(1)) { await relay.stop() } }
        // Exit at once: the result is out, and a graceful QUIC teardown would only add time to every trial.
        Glibc.exit((result["ok"] as? Bool) == true ? 0 : 1)
    }

    private static func punch(client: RendezvousClient, role: String, target: String?, registration: Registration,
                              discover: Bool, discoverFirst: Bool, readyFile: String?, started: ContinuousClock.Instant,
                              mapping: LabMapping?, relaying: LabRelaying) async -> [String: Any]
    {
        do {
            let connectCalled = ContinuousClock.now
            let plannedNAT = await client.natProfile
            // The initiator sends its punch request right behind the register (one flight); a target that is not
            // registered yet is asked again below.
            let (registered, pipelined) = try await Self.register(client: client, registration, target: discoverFirst ? nil : target)
            let registeredAt = ContinuousClock.now
            var coordinated: ReceivedCoordinate?
            var relayFields: [String: Any] = [:]
            var line: [String: Any] = ["event": "registered", "observed": "\(registered.observedAddress)",
                                       "node": "\(client.nodeID)", "role": role]
            if discover, target == nil || discoverFirst, let outcome = await client.natDiscoveryResult() {
                let behaviour = try outcome.get()
                line["nat"] = ["mapping": behaviour.mapping.rawValue, "filtering": behaviour.filtering.rawValue,
                               "allocation": behaviour.allocation.rawValue]
            }
            if let mapping {
                // The target's mapping must be in the coordinate the initiator is about to get; the initiator
                // never waits for its own.
                if target == nil, let granted = await mapping.first.value {
                    line["port_mapped"] = "\(granted)"
                    line["port_mapping_published"] = (try? await client.publishPortMapping(granted)) ?? false
                }
                Task { await client.keepPortMapping(mapping.mapper, first: mapping.first, logger: Logger(label: "holepunch.lab")) }
            }
            if target == nil {
                // The target's allocation carries a relayed connection (docs/relay.md): the initiator needs none. It
                // lives (its task refreshes it) until the process exits.
                let (started, fields) = await Self.startRelay(client: client, registered: registered, enabled: relaying.enabled)
                relaying.published.set(started)
                line.merge(fields) { a, _ in a }
                relayFields = fields
            }
            labEmit(line)
            if let readyFile { try "\(client.nodeID)\n".write(toFile: readyFile, atomically: true, encoding: .utf8) }

            let handle: PunchHandle
            if let target {
                let peer = try NodeID(parsing: target)
                var received: ReceivedCoordinate
                if let pipelined { received = pipelined } else { received = try await coordinate(client: client, to: peer) }
                var first = await client.startPunch(received)
                // As requestPunch(to:) does: a punch planned before discovery ended is retried once it has.
                if case .failure(let error) = await first.result(), await client.profileRefined(since: plannedNAT, after: error) {
                    received = try await coordinate(client: client, to: peer)
                    first = await client.startPunch(received)
                }
                coordinated = received
                handle = first
            } else {
                var iterator = client.incomingPunches.makeAsyncIterator()
                guard let incoming = await iterator.next() else {
                    return ["ok": false, "error": "disconnected", "message": "\(await client.failure.map { "\($0)" } ?? "closed")"]
                }
                var accepted = incoming.handle
                // The initiator retries a punch it planned before its discovery ended (requestPunch's rule): wait a
                // little for that second punch after a failed first one.
                if discover, case .failure = await accepted.result() {
                    let punches = client.incomingPunches
                    let retry = await labWithin(.seconds(6)) { () -> IncomingPunch? in
                        for await punch in punches { return punch }
                        return nil
                    }
                    if let retry = retry ?? nil { accepted = retry.handle }
                }
                handle = accepted
            }
            var rounds = 0
            var ports = 0
            var done: Result<PunchSuccess, PunchError>?
            var planned: [String: Any] = [:]
            // Read up to `.done`: a relayed punch's probing goes on (and sends events) after its connection exists.
            events: for await event in handle.events {
                switch event {
                case .planned(let name):
                    planned["planned_by"] = name
                case .strategyFellBack(let name, let reason):
                    planned["strategy_fallback"] = reason.description
                    printError("warning: " + fallbackWarning(name, reason))
                case .roundStarted(let round, let tried):
                    rounds = max(rounds, round)
                    ports = max(ports, tried)
                case .done(let result):
                    done = result
                    break events
                default:
                    break
                }
            }
            let final: Result<PunchSuccess, PunchError> = done ?? .failure(PunchError(code: .cancelled, message: "no result event"))
            switch final {
            case .success(let success):
                var line: [String: Any] = [
                    "ok": true, "time_ms": labMilliseconds(success.timeToConnect), "rounds": success.rounds,
                    "ports": ports, "remote": "\(success.remoteAddress)", "local_port": Int(success.localPort),
                    "candidate": success.candidate.kind.rawValue, "candidate_family": success.candidate.family.rawValue,
                ].merging(planned) { a, _ in a }
                if case .success(let connection) = await handle.result() {
                    line["peer_node"] = "\(connection.peerNodeID)"
                    let watch = await LabPathWatch.start(connection, success: success)
                    let initiator = target != nil
                    // A connection that started relayed echoes once at once (the first byte), waits a while for the
                    // move to a direct path, then echoes the closing line on whichever path it is on.
                    var (outcome, firstByte) = await exchangeLine(connection, initiator: initiator,
                                                                  line: watch.relayedAddress == nil ? relaying.lastLine : labRelayLine)
                    // Where the last echo goes, read while the connection is open (the last exchange closes it).
                    var relayedAtEnd = watch.relayedAddress != nil
                    if initiator, watch.relayedAddress != nil, outcome == "delivered" {
                        _ = await watch.directReached(within: relaying.directWait)
                        relayedAtEnd = await watch.isRelayed(connection)
                        (outcome, _) = await exchangeLine(connection, initiator: true, line: relaying.lastLine)
                    }
                    if initiator, let coordinated {
                        let connectedAt = coordinated.startAt.advanced(by: success.timeToConnect)
                        line.merge(await Self.pathFields(watch: watch, relayedAtEnd: relayedAtEnd, connectCalled: connectCalled,
                                                         connectedAt: connectedAt)) { a, _ in a }
                    }
                    watch.toDirect.cancel()
                    line["echo"] = outcome == "delivered"
                    line["echo_outcome"] = outcome
                    // Start-to-first-byte: what a user waits for, from the process (or the connect call) to the
                    // first echoed byte, discovery, registration, coordination and punch included.
                    if let firstByte {
                        line["first_byte_ms"] = labMilliseconds(firstByte - started)
                        line["connect_first_byte_ms"] = labMilliseconds(firstByte - connectCalled)
                        // Where the time goes, each from the connect() call.
                        if let coordinated {
                            line["phases_ms"] = [
                                "registered": labMilliseconds(registeredAt - connectCalled),
                                "coordinated": labMilliseconds(coordinated.receivedAt - connectCalled),
                                "start": labMilliseconds(coordinated.startAt - connectCalled),
                                "connected": labMilliseconds(coordinated.startAt.advanced(by: success.timeToConnect) - connectCalled),
                                "first_byte": labMilliseconds(firstByte - connectCalled),
                            ]
                        }
                    }
                }
                return line.merging(relayFields) { a, _ in a }
            case .failure(let error):
                return ["ok": false, "error": error.code.rawValue, "message": error.message,
                        "time_ms": labMilliseconds(error.elapsed), "rounds": max(rounds, error.rounds),
                        "ports": max(ports, error.portsTried.count)].merging(planned) { a, _ in a }.merging(relayFields) { a, _ in a }
            }
        } catch let error as RendezvousError {
            return ["ok": false, "error": "rendezvous." + error.code.name, "message": error.message]
        } catch let error as PunchError {
            return ["ok": false, "error": error.code.rawValue, "message": error.message]
        } catch {
            return ["ok": false, "error": "other", "message": "\(error)"]
        }
    }

    /// Registers; the initiator sends its punch request in the same flight and gets its coordinate message back,
    /// unless the target is not registered yet (then nil: ``coordinate(client:to:)`` asks again).
    private static func register(client: RendezvousClient, _ registration: Registration, target: String?)
        async throws -> (Registered, ReceivedCoordinate?)
    {
        guard let target else { return (try await client.connect(registration), nil) }
        let peer = try NodeID(parsing: target)
        let result: Result<(registered: Registered, coordinate: ReceivedCoordinate), RendezvousError>
        do { result = .success(try await client.connect(registration, coordinatingWith: peer)) } catch {
            result = .failure(error)
        }
        switch result {
        case .success(let both):
            return (both.registered, both.coordinate)
        case .failure(let error):
            guard error.code == .unknownTarget, let confirmed = await client.registered else { throw error }
            return (confirmed, nil)
        }
    }

    /// Asks for the punch; the target may register a moment after us, so retry while the rendezvous does not
    /// know it (the caller's overall timeout bounds this).
    private static func coordinate(client: RendezvousClient, to peer: NodeID) async throws -> ReceivedCoordinate {
        while true {
            let result: Result<ReceivedCoordinate, RendezvousError>
            do { result = .success(try await client.coordinate(to: peer)) } catch { result = .failure(error) }
            switch result {
            case .success(let received):
                return received
            case .failure(let error) where error.code == .unknownTarget:
                try await Task.sleep(for: .milliseconds(20))
            case .failure(let error):
                throw error
            }
        }
    }

    /// The initiator sends a line and reads the echo; the target echoes it, finishes and closes at once, as
    /// `holepunch peer --echo` does: the graceful close must carry the echo to the initiator over a lossy path.
    /// Returns `delivered` (the whole line and a clean end), `silentLoss` (a clean end with bytes missing: the bug
    /// of issue 18), `error: …` or `timeout`, and (initiator) when the first echoed byte arrived.
    private static func exchangeLine(_ connection: QUICConnection, initiator: Bool, line: [UInt8])
        async -> (String, ContinuousClock.Instant?)
    {
        // The target may echo the relay line first, then the last one after the initiator's wait for the direct path.
        let outcome = await labWithin(initiator ? .seconds(8) : .seconds(16) + .seconds(30)) { () async -> LabEcho in
            do {
                if initiator {
                    let stream = try await connection.openStream()
                    try await stream.write(line)
                    try await stream.finish()
                    var echo = try await stream.read() ?? []
                    let firstByte = echo.isEmpty ? nil : ContinuousClock.now
                    if !echo.isEmpty { echo += try await stream.readToEnd(limit: Self.transferLimit + 1024) }
                    if line != labRelayLine { await connection.close() }
                    return LabEcho(outcome: echo == line ? "delivered" : "silentLoss", firstByte: firstByte)
                } else {
                    while true {
                        guard let stream = try await connection.acceptStream() else { return LabEcho(outcome: "error: no stream") }
                        let received = try await stream.readToEnd(limit: Self.transferLimit + 1024)
                        try await stream.write(received)
                        try await stream.finish()
                        if received != labRelayLine {
                            // A `--transfer` echo may need longer than the close's bounded wait on a lossy path: wait
                            // for its acknowledgement first. The plain line still relies on the close (issue 18).
                            if received.count > labLastLine.count { try await stream.delivered() }
                            return LabEcho(outcome: await connection.close() ? "delivered" : "error: echo not acknowledged")
                        }
                    }
                }
            } catch {
                return LabEcho(outcome: "error: \(error)")
            }
        }
        return (outcome?.outcome ?? "timeout", outcome?.firstByte)
    }
}

/// `lab peer --port-mapping`: the mapper and its first request, started before the registration.
private struct LabMapping: Sendable {
    let mapper: PortMapper
    let first: Task<PortMapping?, Never>
}

/// `lab peer`'s use of the relay: whether the target allocates, and how long a relayed initiator waits for a direct path.
private struct LabRelaying: Sendable {
    var enabled: Bool
    var directWait: Duration
    /// What the last exchange sends: the line, plus `--transfer` bytes.
    var lastLine: [UInt8]
    /// The target's allocation once started, for `run` to delete before it exits.
    let published = LabPublishedRelay()
}

/// Where the punch task leaves the target's allocation for `run`.
private final class LabPublishedRelay: Sendable {
    private let state = Mutex<PublishedRelay?>(nil)
    var value: PublishedRelay? { state.withLock { $0 } }
    func set(_ relay: PublishedRelay?) { state.withLock { $0 = relay } }
}

/// How the line exchange ended, and when the first echoed byte arrived (initiator only).
private struct LabEcho: Sendable {
    var outcome: String
    var firstByte: ContinuousClock.Instant? = nil
}
