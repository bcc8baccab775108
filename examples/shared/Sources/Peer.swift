public import ArgumentParser
import Foundation
import HolePunch
import HolePunchNet
public import HolePunchQUIC
public import HolePunchRendezvous
import HolePunchStrategy

/// The punching half of the chat and file-send examples: a ``HolePunchNode`` (identity, punch socket, strategy,
/// rendezvous registration) with the examples' error lines and hints. One copy, shared by both examples.
public struct Peer {
    /// The node, registered.
    public let node: HolePunchNode

    /// Loads or creates the identity, binds the punch socket, registers at the rendezvous.
    ///
    /// `allow` lists the NodeIDs that may make this peer punch; empty admits any registered peer (the examples
    /// wait for a peer whose NodeID they do not know yet; an app should name its peers).
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
        // The bundled default.lua unless a file is named; a script that fails at run time is replaced by the
        // built-in plan for that call, and says so at once.
        let warn: @Sendable (StrategyError) -> Void = { say("warning: strategy failed, the built-in plan answers: \($0)") }
        var options = HolePunchNode.Options(bind: local, admission: allowed.isEmpty ? .any : .allowList(allowed))
        options.strategy = FallbackStrategy.recommended(onFallback: warn)
        if let strategy {
            let loaded = FallbackStrategy.loading(path: strategy, onFallback: warn)
            if let problem = loaded.lastError { say("warning: \(strategy) failed to load, using the built-in plan: \(problem)") }
            options.strategy = loaded
        }
        do throws(NodeError) {
            let node = try await HolePunchNode.start(identity: identity, rendezvous: server, rendezvousID: serverID, options: options)
            say("registered node=\(identity.nodeID) observed=\(node.registration.observedAddress)")
            return Peer(node: node)
        } catch where error.code == .bindFailed {
            throw fail(error.message, hint: "choose another --listen address")
        } catch {
            throw fail("rendezvous \(error.code): \(error.message)",
                       hint: "check --rendezvous and --rendezvous-id (the rendezvous prints its NodeID at start)", code: 2)
        }
    }

    /// Initiator: asks the rendezvous to coordinate, then punches.
    public func punch(to target: NodeID) async throws -> QUICConnection {
        do throws(NodeError) {
            let connection = try await node.connect(to: target)
            say("connected peer=\(connection.peerNodeID) path=\(connection.remoteAddress)")
            return connection
        } catch where error.punch != nil {
            throw fail("punch failed: \(error)", hint: "the peer may have gone away, or the NATs need another --strategy", code: 3)
        } catch {
            throw fail("rendezvous \(error.code): \(error.message)",
                       hint: "is the other peer running and registered? check the NodeID it printed", code: 2)
        }
    }

    /// Target: the rendezvous starts punches for us; the first that succeeds wins, failures are reported.
    public func waitForPunch() async throws -> QUICConnection {
        for await punch in node.rendezvousClient.incomingPunches {
            switch await punch.handle.result() {
            case .failure(let error):
                // One failed attempt is not the end: the other peer may retry.
                say("punch-failed code=\(error.code.rawValue) message=\(error.message)")
            case .success(let connection):
                say("connected peer=\(connection.peerNodeID) path=\(connection.remoteAddress)")
                return connection
            }
        }
        let reason = await node.rendezvousClient.failure.map { "\($0)" } ?? "the rendezvous connection ended"
        throw fail("stopped waiting: \(reason)", hint: "is the rendezvous still running?", code: 2)
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
    @Option(help: "The rendezvous's QUIC address, HOST:PORT (a host name is resolved once at start).")
    public var rendezvous: String

    @Option(help: "The rendezvous's NodeID, or @FILE to read it from a file.")
    public var rendezvousId: String

    @Option(help: "This peer's identity file (created if missing).")
    public var identity: String

    @Option(help: "A Lua strategy file (default: the bundled default.lua; the built-in plan answers when a script fails).")
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
