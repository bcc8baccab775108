import Foundation
import ProcessTestSupport
import Testing

extension Child {
    /// The NodeID an example prints as `registered node=…`.
    var registeredNode: String? {
        guard let range = stderr.text.range(of: "registered node=") else { return nil }
        let id = stderr.text[range.upperBound...].prefix { $0.isLetter || $0.isNumber }
        return id.isEmpty ? nil : String(id)
    }

    /// Starts an example peer that waits to be punched to, and returns it once it has registered (bounded), with
    /// the NodeID it printed.
    static func waitingPeer(_ binary: String, _ arguments: [String], in dir: URL) async throws -> (Child, String) {
        let peer = try Child(binary, arguments, directory: dir)
        let registered = await eventually(.seconds(15)) { peer.registeredNode != nil && peer.stderr.text.contains("waiting") }
        if !registered { peer.stop() }
        try #require(registered, "the peer did not register: \(peer.stderr.text)")
        return (peer, try #require(peer.registeredNode))
    }
}

@Suite("examples end to end on loopback", .serialized)
struct ExamplesTests {
    @Test("hp-chat: B waits, A connects by NodeID, a line goes each way, both exit 0")
    func chat() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-chat", "HP_CHAT_BINARY")]) else { return }
        let (holepunch, chat) = (bins[0], bins[1])
        let rdv = try await LoopbackRendezvous(holepunch, prefix: "hp-examples")
        defer { rdv.close() }
        let (dir, common) = (rdv.dir, rdv.peerArguments)

        let (b, bID) = try await Child.waitingPeer(chat, common + ["--identity", "b.pem"], in: dir)
        defer { b.stop() }

        let a = try Child(chat, common + ["--identity", "a.pem", "--connect", bID], directory: dir)
        defer { a.stop() }
        await expectLinesCross(a, b)
        // Only the conversation is on stdout: the protocol's greeting line never shows.
        #expect(!b.stdout.text.contains("hp-chat/1"))
        a.closeInput()
        #expect(await a.waitExit(.seconds(10)) == 0, "A: \(a.stderr.text)")
        #expect(await b.waitExit(.seconds(10)) == 0, "B: \(b.stderr.text)")
        #expect(b.stderr.text.contains("peer left"))
    }

    @Test("hp-file-send: a few hundred KiB of random data arrives with a matching SHA-256")
    func fileSend() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-file-send", "HP_FILE_SEND_BINARY")]) else { return }
        let (holepunch, fileSend) = (bins[0], bins[1])
        let rdv = try await LoopbackRendezvous(holepunch, prefix: "hp-examples")
        defer { rdv.close() }
        let dir = rdv.dir
        var generator = SystemRandomNumberGenerator()
        let data = Data((0..<(300 << 10)).map { _ in UInt8.random(in: 0...255, using: &generator) })
        try data.write(to: dir.appendingPathComponent("payload.bin"))
        // No inbox/ yet: `receive --out` creates it, as the example's README promises.
        let (receiver, sender) = try await startTransfer(fileSend, "payload.bin", via: rdv)
        defer { sender.stop(); receiver.stop() }
        #expect(await sender.waitExit(.seconds(30)) == 0, "sender: \(sender.stderr.text)")
        #expect(await receiver.waitExit(.seconds(10)) == 0, "receiver: \(receiver.stderr.text)")

        let received = try Data(contentsOf: dir.appendingPathComponent("inbox/payload.bin"))
        #expect(received == data)
        // Both sides print the SHA-256 they checked; it must be the real digest of the data we wrote.
        let expected = try #require(try sha256sum(dir.appendingPathComponent("payload.bin")))
        #expect(receiver.stderr.text.contains("sha256=\(expected) verified"), "receiver: \(receiver.stderr.text)")
        #expect(sender.stderr.text.contains("sha256=\(expected) verified"), "sender: \(sender.stderr.text)")
        #expect(sender.stderr.text.contains("100%"))
        #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("inbox/payload.bin.part").path))
    }

    @Test("hp-file-send: the receiver vanishing mid-transfer gives the sender one clear error, not a hang")
    func fileSendDrop() async throws {
        guard let bins = binariesOrSkip([("holepunch", "HOLEPUNCH_BINARY"), ("hp-file-send", "HP_FILE_SEND_BINARY")]) else { return }
        let (holepunch, fileSend) = (bins[0], bins[1])
        let rdv = try await LoopbackRendezvous(holepunch, prefix: "hp-examples")
        defer { rdv.close() }
        let dir = rdv.dir
        // Large enough that the transfer is still running when the receiver is killed.
        try Data(count: 256 << 20).write(to: dir.appendingPathComponent("big.bin"))
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("inbox"), withIntermediateDirectories: true)
        let (receiver, sender) = try await startTransfer(fileSend, "big.bin", via: rdv)
        defer { sender.stop(); receiver.stop() }
        let flowing = await eventually(.seconds(20)) { receiver.stderr.text.contains("received [") }
        try #require(flowing, "no data arrived: \(sender.stderr.text)")
        receiver.stop()
        // The sender learns of the loss from QUIC's idle timeout at worst (30 s by default).
        let status = await sender.waitExit(.seconds(45))
        #expect(status == 3, "sender: \(sender.stderr.text)")
        #expect(sender.stderr.text.contains("error: the connection dropped after"))
        #expect(sender.stderr.text.contains("hint:"))
    }
}

/// Starts `hp-file-send receive --out inbox` as B, waits until it has registered, then starts `hp-file-send send
/// file` from A to B's NodeID; returns (receiver, sender), both for the caller to stop.
func startTransfer(_ fileSend: String, _ file: String, via rdv: LoopbackRendezvous) async throws -> (Child, Child) {
    let common = rdv.peerArguments
    let (receiver, bID) = try await Child.waitingPeer(
        fileSend, ["receive", "--out", "inbox", "--identity", "b.pem"] + common, in: rdv.dir)
    do {
        let sender = try Child(fileSend, ["send", file, "--to", bID, "--identity", "a.pem"] + common, directory: rdv.dir)
        return (receiver, sender)
    } catch {
        receiver.stop()
        throw error
    }
}

/// The SHA-256 by the system's `sha256sum`, an implementation independent of the example's own.
func sha256sum(_ file: URL) throws -> String? {
    let tool = ["/usr/bin/sha256sum", "/bin/sha256sum"].first { FileManager.default.isExecutableFile(atPath: $0) }
    guard let tool else { return nil }
    let process = Process()
    let out = Pipe()
    process.executableURL = URL(fileURLWithPath: tool)
    process.arguments = [file.path]
    process.standardOutput = out
    try process.run()
    let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    return text.split(separator: " ").first.map(String.init)
}
