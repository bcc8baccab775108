import ArgumentParser
import Foundation
import HolePunchQUIC

/// `holepunch identity …`: create and inspect the key pairs whose hash is a peer's NodeID.
struct IdentityCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "identity",
        abstract: "Create or show an identity (a key pair and certificate; its NodeID is the hash of the public key).",
        discussion: """
            An identity file is a PEM key pair and certificate, readable by its owner only.

            Examples:
              holepunch identity create a.pem
              holepunch identity show a.pem
            """,
        subcommands: [IdentityCreateCommand.self, IdentityShowCommand.self]
    )
}

/// `holepunch identity create FILE`
struct IdentityCreateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Generate a new identity, save it to FILE (PEM, mode 0600) and print its NodeID.",
        discussion: """
            Refuses to replace an existing file unless --force is given.

            Examples:
              holepunch identity create a.pem
              holepunch identity create a.pem --force
            """
    )

    @Argument(help: "Where to save the identity.")
    var file: String

    @Flag(help: "Overwrite FILE if it exists.")
    var force = false

    func run() async throws {
        if FileManager.default.fileExists(atPath: file) && !force {
            throw cliFailure("\(file) already exists", hint: "pass --force to replace it, or `holepunch identity show \(file)`")
        }
        do {
            let identity = try Identity.generate()
            try identity.save(to: file)
            print(identity.nodeID)
        } catch {
            throw cliFailure("cannot create the identity: \(error)", hint: "check that the directory exists and is writable")
        }
    }
}

/// `holepunch identity show FILE [--json]`
struct IdentityShowCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "show",
        abstract: "Print the NodeID of the identity in FILE.",
        discussion: """
            The NodeID is what another peer passes to `peer --connect` or `--allow`.

            Examples:
              holepunch identity show a.pem
              holepunch identity show a.pem --json
            """
    )

    @Argument(help: "An identity file made by `identity create`.")
    var file: String

    @Flag(help: "Print {\"nodeID\": …, \"file\": …} as JSON.")
    var json = false

    func run() async throws {
        let identity: Identity
        do { identity = try Identity.load(from: file, warning: warnIdentity) } catch {
            throw cliFailure("cannot load \(file): \(error)", hint: "create one with `holepunch identity create \(file)`")
        }
        if json {
            print(jsonLine(["nodeID": identity.nodeID.description, "file": file]))
        } else {
            print(identity.nodeID)
        }
    }
}

/// Prints `error: MESSAGE` and `hint: HINT` to standard error and returns the exit code to throw: every
/// command of the rendezvous family fails with one clear line and a hint, never a stack trace.
func cliFailure(_ message: String, hint: String?, code: Int32 = 1) -> ExitCode {
    var text = "error: \(message)\n"
    if let hint { text += "hint: \(hint)\n" }
    FileHandle.standardError.write(Data(text.utf8))
    return ExitCode(code)
}

/// `cliFailure` for a bad command-line argument: exit status 64 (`EX_USAGE`), the same status ArgumentParser gives
/// its own parse and validation errors, so every bad argument exits alike.
func usageFailure(_ message: String, hint: String?) -> ExitCode {
    cliFailure(message, hint: hint, code: ExitCode.validationFailure.rawValue)
}

/// One JSON object on one line, keys sorted (for scripts).
func jsonLine(_ object: [String: Any]) -> String {
    guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return "{}" }
    return String(decoding: data, as: UTF8.self)
}

/// Loads an identity, creating (and saving) one when the file does not exist yet.
func loadOrCreateIdentity(_ path: String?) throws -> (Identity, created: Bool) {
    guard let path else { return (try Identity.generate(), true) }
    if FileManager.default.fileExists(atPath: path) { return (try Identity.load(from: path, warning: warnIdentity), false) }
    let identity = try Identity.generate()
    try identity.save(to: path)
    return (identity, true)
}

/// Prints an identity file's permission problem as a `warning:` line on standard error.
func warnIdentity(_ problem: String) {
    emitStatus("warning: \(problem)")
}

/// Writes one line to standard output at once (unbuffered), so scripts reading a pipe see it immediately.
func emitLine(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

/// Writes one line to standard error at once.
func emitStatus(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}
