// The smallest HolePunch program: copy it into your app and adapt.
// Usage: hp-embed RENDEZVOUS_HOST:PORT RENDEZVOUS_NODEID [PEER_NODEID] [--strategy FILE]
import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous
import HolePunchStrategy

func say(_ text: String) { FileHandle.standardOutput.write(Data(text.utf8)) }  // unbuffered, even into a pipe
var args = Array(CommandLine.arguments.dropFirst())
// Who may punch to us: a node admits nobody by default. This demo waits for a peer it does not know yet, so it
// admits any peer registered at the rendezvous; an app should pass .allowList of the NodeIDs it expects.
// The strategy is the bundled strategies/default.lua unless --strategy names another file.
var options = HolePunchNode.Options(admission: .any)
if let i = args.firstIndex(of: "--strategy"), i + 1 < args.count {
    options.strategy = FallbackStrategy.loading(path: args[i + 1])  // the built-in plan answers if the script fails
    args.removeSubrange(i...i + 1)
}
guard args.count >= 2 else { print("usage: hp-embed RENDEZVOUS_HOST:PORT RENDEZVOUS_NODEID [PEER_NODEID] [--strategy FILE]"); exit(64) }

// 1. An identity: its public key is this peer's NodeID. Keep the file to keep the NodeID.
let path = "embed-identity.pem"
let identity = FileManager.default.fileExists(atPath: path) ? try Identity.load(from: path) : try Identity.generate()
try identity.save(to: path)
// 2. One node: one UDP socket for the rendezvous, probes and QUIC (the NAT mapping is shared), registered at the
//    rendezvous, whose NodeID the TLS handshake proves.
let node = try await HolePunchNode.start(identity: identity, rendezvous: try SocketAddress.resolving(args[0]),
                                         rendezvousID: try NodeID(parsing: args[1]), options: options)
say("registered as \(identity.nodeID)\n")
// 3. Punch to a NodeID, or wait for someone to punch to us; either way an authenticated QUIC connection.
if args.count > 2 {
    let connection = try await node.connect(to: try NodeID(parsing: args[2]))
    let stream = try await connection.openStream()
    try await stream.write(Array("hello from \(identity.nodeID.short)\n".utf8))
    try await stream.finish()
    _ = try await stream.readToEnd()  // the peer answers with its end of stream: our line arrived
    await connection.close()
} else {
    for try await connection in node.incoming {
        guard let stream = try await connection.acceptStream() else { continue }
        say(String(decoding: try await stream.readToEnd(), as: UTF8.self))
        try await stream.finish()
        _ = await connection.waitClosed()  // the dialler closes once it has our end of stream
        break
    }
}
await node.stop()
