// The smallest HolePunch program: copy it into your app and adapt.
// Usage: hp-embed RENDEZVOUS_HOST:PORT RENDEZVOUS_NODEID [PEER_NODEID] [--strategy FILE]
import Foundation
import HolePunch
import HolePunchRendezvous

func say(_ text: String) { FileHandle.standardOutput.write(Data(text.utf8)) }  // unbuffered, even into a pipe
var args = Array(CommandLine.arguments.dropFirst())
var strategy: any PunchStrategy = DefaultStrategy()
if let i = args.firstIndex(of: "--strategy"), i + 1 < args.count {
    strategy = FallbackStrategy.loading(path: args[i + 1])  // falls back to the default if the script fails
    args.removeSubrange(i...i + 1)
}
guard args.count >= 2 else { print("usage: hp-embed RENDEZVOUS_HOST:PORT RENDEZVOUS_NODEID [PEER_NODEID] [--strategy FILE]"); exit(64) }

// 1. An identity: its public key is this peer's NodeID. Keep the file to keep the NodeID.
let path = "embed-identity.pem"
let identity = FileManager.default.fileExists(atPath: path) ? try Identity.load(from: path) : try Identity.generate()
try identity.save(to: path)
// 2. One UDP endpoint: it talks to the rendezvous and punches from the same port (the NAT mapping is shared).
let endpoint = try await Endpoint.bind(.anyV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
let executor = PunchExecutor(endpoint: endpoint, configuration: PunchExecutor.Configuration(strategy: strategy))
// 3. Register at the rendezvous, whose NodeID the TLS handshake proves.
let client = RendezvousClient(executor: executor, configuration: RendezvousClientConfiguration(
    server: try SocketAddress.resolving(args[0]), serverNodeID: try NodeID(parsing: args[1])))
_ = try await client.connect()
say("registered as \(identity.nodeID)\n")
// 4. Punch to a NodeID, or wait for someone to punch to us; either way an authenticated QUIC connection.
if args.count > 2 {
    let connection = try await client.requestPunch(to: try NodeID(parsing: args[2]))
    let stream = try await connection.openStream()
    try await stream.write(Array("hello from \(identity.nodeID.short)\n".utf8))
    try await stream.finish()
    _ = try await stream.readToEnd()  // the peer answers with its end of stream: our line arrived
    await connection.close()
} else {
    for await connection in client.incoming {
        guard let stream = try await connection.acceptStream() else { continue }
        say(String(decoding: try await stream.readToEnd(), as: UTF8.self))
        try await stream.finish()
        _ = await connection.waitClosed()  // the dialler closes once it has our end of stream
        break
    }
}
await endpoint.close()
