public import ArgumentParser
import Foundation
public import HolePunch
public import HolePunchRendezvous

/// The punching half of the chat and file-send examples: identity, endpoint, executor and rendezvous client,
/// wired the way an application would wire them. One copy, shared by both examples.
public struct Peer {
    /// The rendezvous client, registered.
    public let client: RendezvousClient

    /// Loads or creates the identity, binds the punch socket, registers at the rendezvous.
    ///
    /// `allow` lists the NodeIDs that may make this peer punch; empty admits any registered peer.
    public static func start(rendezvous: String, rendezvousID: String, identity path: String, strategy: String?,
                      listen: String, allow: [String] = []) async throws -> Peer {
        let server: SocketAddress, local: SocketAddress
        do { server = try SocketAddress.resolving(rendezvous) } catch {
            throw fail("--rendezvous: \(error)", hint: "HOST:PORT such as 127.0.0.1:3478", code: usageExitCode)
        }
        do { local = try SocketAddress(parsing: listen) } catch {
            throw fail("--listen: \(error)", hint: "a numeric HOST:PORT such as 0.0.0.0:0", code: usageExitCode)
        }
        let serverID = try nodeID(rendezvousID, what: "--rendezvous-id")
        let allowed = try Set(allow.map { try nodeID($0, what: "--allow") })
        let identity: Identity
        do {
            if FileManager.default.fileExists(atPath: path) {
                identity = try Identity.load(from: path, warning: { say("warning: \($0)") })
            } else {
                identity = try Identity.generate()
                try identity.save(to: path)
            }
        } catch {
            throw fail("cannot load or create the identity \(path): \(error)", hint: "check the path and its permissions")
        }

        // The executor decides which punched connections to accept, so the endpoint itself accepts none.
        let endpoint: Endpoint
        do {
            endpoint = try await Endpoint.bind(local, configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
        } catch {
            throw fail("cannot bind \(local): \(error)", hint: "choose another --listen address")
        }
        var chosen: any PunchStrategy = DefaultStrategy()
        if let strategy {
            let loaded = FallbackStrategy.loading(path: strategy)
            if let problem = loaded.lastError { say("warning: \(strategy) failed to load, using the default strategy: \(problem)") }
            chosen = loaded
        }
        let executor = PunchExecutor(endpoint: endpoint, configuration: PunchExecutor.Configuration(strategy: chosen))
        var configuration = RendezvousClientConfiguration(server: server, serverNodeID: serverID)
        // Who may make us punch: a stranger on a public rendezvous could otherwise point our probes at will.
        configuration.admission = allowed.isEmpty ? .any : .allowList(allowed)
        let client = RendezvousClient(executor: executor, configuration: configuration)
        // A specific listen IP is worth publishing: a peer behind the same NAT can reach it directly.
        let lan = local.ipBytes.allSatisfy { $0 == 0 } ? [] : [endpoint.localAddress]
        do {
            let registered = try await client.connect(Registration(lanAddresses: lan))
            say("registered node=\(identity.nodeID) observed=\(registered.observedAddress)")
        } catch {
            throw fail("rendezvous \(error.code): \(error.message)",
                       hint: "check --rendezvous and --rendezvous-id (the rendezvous prints its NodeID at start)", code: 2)
        }
        return Peer(client: client)
    }

    /// Initiator: asks the rendezvous to coordinate, then punches.
    public func punch(to target: NodeID) async throws -> QUICConnection {
        let received: ReceivedCoordinate
        do { received = try await client.coordinate(to: target) } catch {
            throw fail("rendezvous \(error.code): \(error.message)",
                       hint: "is the other peer running and registered? check the NodeID it printed", code: 2)
        }
        return try await finish(await client.startPunch(received))
    }

    /// Target: the rendezvous starts punches for us; the first that succeeds wins, failures are reported.
    public func waitForPunch() async throws -> QUICConnection {
        for await punch in client.incomingPunches {
            if case .failure(let error) = await punch.handle.result() {
                // One failed attempt is not the end: the other peer may retry.
                say("punch-failed code=\(error.code.rawValue) message=\(error.message)")
                continue
            }
            return try await finish(punch.handle)
        }
        let reason = await client.failure.map { "\($0)" } ?? "the rendezvous connection ended"
        throw fail("stopped waiting: \(reason)", hint: "is the rendezvous still running?", code: 2)
    }

    private func finish(_ handle: PunchHandle) async throws -> QUICConnection {
        switch await handle.result() {
        case .success(let connection):
            say("connected peer=\(connection.peerNodeID) path=\(connection.remoteAddress)")
            return connection
        case .failure(let error):
            throw fail("punch failed: \(error.code.rawValue): \(error.message)",
                       hint: "the peer may have gone away, or the NATs need another --strategy", code: 3)
        }
    }
}

/// A status line on standard error, so standard output stays free for the data.
public func say(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// The exit status of a bad command-line argument (`EX_USAGE`), the same as ArgumentParser's own.
public let usageExitCode = ExitCode.validationFailure.rawValue

/// Prints one error line and a hint, and returns the exit status to throw.
public func fail(_ message: String, hint: String, code: Int32 = 1) -> ExitCode {
    say("error: \(message)")
    say("hint: \(hint)")
    return ExitCode(code)
}

/// A NodeID from text, or from the file after `@`.
public func nodeID(_ text: String, what: String) throws -> NodeID {
    var value = text
    if text.hasPrefix("@") {
        guard let contents = try? String(contentsOfFile: String(text.dropFirst()), encoding: .utf8) else {
            throw fail("\(what): cannot read \(text.dropFirst())", hint: "pass the NodeID itself or an existing file")
        }
        value = contents.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    do { return try NodeID(parsing: value) } catch {
        throw fail("\(what): \(error)", hint: "copy the NodeID exactly as it was printed", code: usageExitCode)
    }
}

/// The options every example peer shares: rendezvous, identity, strategy, punch socket.
public struct PeerOptions: ParsableArguments {
    @Option(help: "The rendezvous's QUIC address, numeric HOST:PORT.")
    public var rendezvous: String

    @Option(help: "The rendezvous's NodeID, or @FILE to read it from a file.")
    public var rendezvousId: String

    @Option(help: "This peer's identity file (created if missing).")
    public var identity: String

    @Option(help: "A Lua strategy file; the built-in default answers if it fails to load.")
    public var strategy: String?

    @Option(help: "Local address of the punch socket.")
    public var listen = "0.0.0.0:0"

    @Option(name: .customLong("allow"),
            help: ArgumentHelp("Only this NodeID may make this peer punch (repeatable; default: any).", valueName: "nodeid"))
    public var allow: [String] = []

    /// Creates the options (ArgumentParser fills them in).
    public init() {}

    /// Ignores SIGPIPE and starts the peer: identity, punch socket, rendezvous registration.
    public func start() async throws -> Peer {
        // A peer that vanishes must give us an error, not kill us with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        return try await Peer.start(rendezvous: rendezvous, rendezvousID: rendezvousId, identity: identity,
                                    strategy: strategy, listen: listen, allow: allow)
    }
}
