import ArgumentParser
import Foundation
import HolePunch
import HolePunchExampleSupport
import HolePunchQUIC
import HolePunchRendezvous

/// `hp-file-send`: send one file to a peer over a punched QUIC connection, verified by SHA-256.
///
/// Wire format on one bidirectional stream opened by the sender: the line `hp-file-send/1`, a JSON header line
/// `{"name":…,"size":…}`, exactly `size` bytes of data, then the 32-byte SHA-256 of the data and end of stream.
/// The receiver answers `ok` or `mismatch` and ends its side. The digest goes last so the sender reads the
/// file only once.
@main
struct FileSend: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hp-file-send",
        abstract: "Send a file to another peer through a punched QUIC connection.",
        discussion: """
            Start the receiver first (it prints `registered node=…` and waits), then the sender with --to and that \
            NodeID. Progress goes to standard error. Exit status: 0 delivered and verified, 1 local error, \
            2 rendezvous error, 3 punch failed or connection dropped, 4 SHA-256 mismatch.
            """,
        subcommands: [Send.self, Receive.self]
    )
}

let magic = Array("hp-file-send/1\n".utf8)

struct Header: Codable {
    var name: String
    var size: Int
}

struct Send: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Punch to a receiver and send it FILE.")

    @Argument(help: "The file to send.")
    var file: String

    @Option(help: "The receiver's NodeID (it prints it as `registered node=…`).")
    var to: String

    @OptionGroup var peer: PeerOptions

    func run() async throws {
        guard let input = FileHandle(forReadingAtPath: file),
              let size = (try? FileManager.default.attributesOfItem(atPath: file)[.size]) as? Int else {
            throw fail("cannot read \(file)", hint: "check the path and its permissions")
        }
        defer { try? input.close() }
        let target = try nodeID(to, what: "--to")
        let started = try await peer.start()
        let connection = try await started.punch(to: target)
        await started.node.rendezvousClient.close()

        let header = try JSONEncoder().encode(Header(name: (file as NSString).lastPathComponent, size: size))
        var hash = SHA256()
        var progress = Progress(total: size, verb: "sent")
        let reply: String
        do {
            let stream = try await connection.openStream()
            try await stream.write(magic + Array(header) + [0x0A])
            while let chunk = try input.read(upToCount: 64 << 10), !chunk.isEmpty {
                let bytes = [UInt8](chunk)
                hash.update(bytes)
                try await stream.write(bytes)
                progress.advance(by: bytes.count)
            }
            guard progress.done == size else { throw fail("\(file) changed while sending", hint: "send it again") }
            try await stream.write(hash.finalize())
            try await stream.finish()
            progress.end()
            reply = String(decoding: try await stream.readToEnd(limit: 64), as: UTF8.self)
        } catch let error as ExitCode {
            throw error
        } catch {
            progress.end()
            await connection.abort(errorCode: 1, reason: "transfer failed")
            throw dropped(error, progress)
        }
        // The receiver's answer means it has everything; the graceful close still lets our last
        // acknowledgements go out before CONNECTION_CLOSE.
        await connection.close()
        guard reply == "ok\n" else {
            throw fail("the receiver reports a SHA-256 mismatch", hint: "the data was damaged on the way; send it again", code: 4)
        }
        say("delivered \(file) bytes=\(size) sha256=\(hash.finalize().hex) verified")
    }
}

struct Receive: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Wait for a sender, receive one file into DIR.")

    @Option(help: "Directory to write the received file to (created if missing).")
    var out: String

    @OptionGroup var peer: PeerOptions

    func run() async throws {
        // A missing directory is made (with its parents) before waiting, so a typo in --out fails at once.
        do { try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true) } catch {
            throw fail("--out \(out): cannot create the directory: \(error.localizedDescription)",
                       hint: "pick a directory you can write to")
        }
        let started = try await peer.start()
        say("waiting for a sender to connect to node=\(started.node.nodeID)")
        let connection = try await started.waitForPunch()
        await started.node.rendezvousClient.close()

        var progress = Progress(total: 0, verb: "received")
        var partial: String?
        do {
            guard let stream = try await connection.acceptStream() else {
                throw QUICError(.connectionClosed, "the sender closed before sending anything")
            }
            var reader = StreamReader(stream)
            guard try await reader.read(exactly: magic.count) == magic else {
                throw fail("the peer is not an hp-file-send sender", hint: "run `hp-file-send send` on the other side")
            }
            let header = try JSONDecoder().decode(Header.self, from: Data(try await reader.line(limit: 4096)))
            // Only the last path component is trusted: a sender must not choose where we write.
            let name = (header.name as NSString).lastPathComponent
            guard !name.isEmpty, name != ".", name != "..", header.size >= 0 else {
                throw fail("the sender proposed a bad file name or size", hint: "check the sender")
            }
            let path = (out as NSString).appendingPathComponent(name)
            partial = path + ".part"
            guard FileManager.default.createFile(atPath: partial!, contents: nil),
                  let output = FileHandle(forWritingAtPath: partial!) else {
                throw fail("cannot write \(partial!)", hint: "check --out and its permissions")
            }
            defer { try? output.close() }
            progress = Progress(total: header.size, verb: "received")
            var hash = SHA256()
            while progress.done < header.size {
                let chunk = try await reader.read(upTo: header.size - progress.done)
                hash.update(chunk)
                try output.write(contentsOf: chunk)
                progress.advance(by: chunk.count)
            }
            progress.end()
            let digest = hash.finalize()
            let claimed = try await reader.read(exactly: 32)
            guard digest == claimed else {
                do {
                    try await stream.write(Array("mismatch\n".utf8))
                    try await stream.finish()
                } catch {
                    say("could not tell the sender about the mismatch: \(error)")
                }
                await connection.close()
                try? FileManager.default.removeItem(atPath: partial!)
                throw fail("SHA-256 mismatch: computed \(digest.hex), sender says \(claimed.hex)",
                           hint: "the data was damaged on the way; ask for it again", code: 4)
            }
            try? FileManager.default.removeItem(atPath: path)
            try FileManager.default.moveItem(atPath: partial!, toPath: path)
            partial = nil
            try await stream.write(Array("ok\n".utf8))
            try await stream.finish()
            say("received \(path) bytes=\(header.size) sha256=\(digest.hex) verified")
        } catch let error as ExitCode {
            if let partial { try? FileManager.default.removeItem(atPath: partial) }
            throw error
        } catch {
            progress.end()
            if let partial { try? FileManager.default.removeItem(atPath: partial) }
            await connection.abort(errorCode: 1, reason: "transfer failed")
            throw dropped(error, progress)
        }
        // The graceful close waits until the sender has acknowledged our answer and end of stream, so closing
        // first loses nothing: the sender still reads the answer after our close arrives.
        guard await connection.close() else {
            throw fail("the file was received, but the sender did not acknowledge our answer",
                       hint: "the sender may report a failure although the file is here", code: 3)
        }
    }
}

/// The error for a connection that went away mid-transfer.
func dropped(_ error: any Error, _ progress: Progress) -> ExitCode {
    fail("the connection dropped after \(progress.done) of \(progress.total) bytes: \(error)",
         hint: "the other peer quit or the network path went away; run both sides again", code: 3)
}

/// Reads a stream in exact amounts: QUIC delivers bytes in whatever chunks arrived.
struct StreamReader {
    let stream: QUICStream
    private var buffer: [UInt8] = []

    init(_ stream: QUICStream) { self.stream = stream }

    /// Up to `limit` bytes (at least one); throws at an early end of stream.
    mutating func read(upTo limit: Int) async throws -> [UInt8] {
        if buffer.isEmpty {
            guard let chunk = try await stream.read() else {
                throw QUICError(.connectionClosed, "the stream ended early")
            }
            buffer = chunk
        }
        let taken = Array(buffer.prefix(limit))
        buffer.removeFirst(taken.count)
        return taken
    }

    mutating func read(exactly count: Int) async throws -> [UInt8] {
        var result: [UInt8] = []
        while result.count < count { result += try await read(upTo: count - result.count) }
        return result
    }

    /// One line without its newline.
    mutating func line(limit: Int) async throws -> [UInt8] {
        var result: [UInt8] = []
        while true {
            let byte = try await read(exactly: 1)[0]
            if byte == 0x0A { return result }
            result.append(byte)
            if result.count > limit { throw QUICError(.limitExceeded, "a header line is longer than \(limit) bytes") }
        }
    }
}

/// A one-line progress bar on standard error: bytes, rate and ETA, redrawn at most ten times a second.
struct Progress {
    let total: Int
    let verb: String
    private(set) var done = 0
    private let start = ContinuousClock.now
    private var lastDraw: ContinuousClock.Instant?
    private var ended = false

    init(total: Int, verb: String) {
        self.total = total
        self.verb = verb
    }

    mutating func advance(by count: Int) {
        done += count
        let now = ContinuousClock.now
        if let lastDraw, now - lastDraw < .milliseconds(100) { return }
        lastDraw = now
        draw(final: false)
    }

    /// Draws the final state and ends the line.
    mutating func end() {
        guard !ended else { return }
        draw(final: true)
        ended = true
    }

    private func draw(final: Bool) {
        let seconds = max(Double((ContinuousClock.now - start) / .milliseconds(1)) / 1000, 0.001)
        let rate = Double(done) / seconds
        let fraction = total > 0 ? Double(done) / Double(total) : 1
        let filled = Int(fraction * 30)
        let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: 30 - filled)
        let eta = rate > 0 ? Double(total - done) / rate : 0
        let line = "\r\(verb) [\(bar)] \(Int(fraction * 100))% \(bytes(done))/\(bytes(total)) \(bytes(Int(rate)))/s ETA \(Int(eta.rounded()))s"
        FileHandle.standardError.write(Data((line + (final ? "\n" : "")).utf8))
    }
}

func bytes(_ count: Int) -> String {
    let units = ["B", "KiB", "MiB", "GiB"]
    var value = Double(count), unit = 0
    while value >= 1024, unit < units.count - 1 { value /= 1024; unit += 1 }
    return unit == 0 ? "\(count) B" : String(format: "%.1f %@", value, units[unit])
}
