import ArgumentParser
import Foundation
import HolePunch
import HolePunchExampleSupport
import HolePunchQUIC
import HolePunchRendezvous

/// `hp-chat`: two peers register at a rendezvous, one punches to the other by NodeID, and then each side's
/// standard input goes to the other side's standard output, line by line.
@main
struct Chat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hp-chat",
        abstract: "Punch to another peer through a rendezvous, then chat line by line.",
        discussion: """
            Start one peer without --connect (it waits), then the other with --connect and the first one's NodeID \
            (printed as `registered node=…`). Status lines go to standard error; standard output carries only what \
            the other peer typed. Exit status: 0 done (both sides ended and everything typed was acknowledged), \
            1 local error, 2 rendezvous error, 3 punch failed or connection lost.
            """
    )

    @OptionGroup var peerOptions: PeerOptions

    @Option(help: "Punch to this NodeID instead of waiting for the other peer.")
    var connect: String?

    func run() async throws {
        let peer = try await peerOptions.start()
        let connection: QUICConnection
        if let connect {
            connection = try await peer.punch(to: try nodeID(connect, what: "--connect"))
        } else {
            say("waiting for a peer to connect to node=\(peer.node.nodeID)")
            connection = try await peer.waitForPunch()
        }
        // The rendezvous is only needed to meet; the punched connection stands on its own.
        await peer.node.rendezvousClient.close()
        try await chat(over: connection)
    }
}

/// The line the dialling side sends first: QUIC streams only reach the other side once they carry bytes, and
/// the dialler's user may not type for a while. It also tells a chat peer from some other program.
let greeting = Array("hp-chat/1\n".utf8)

/// How one direction of the chat ended.
enum Ended: Sendable {
    case inputDone
    case peerDone
    case lost(String)
}

/// Pipes standard input to the stream and the stream to standard output until both directions end.
func chat(over connection: QUICConnection) async throws {
    let stream: QUICStream
    var pending: [UInt8] = []
    do {
        if connection.isClient {
            stream = try await connection.openStream()
            try await stream.write(greeting)
        } else {
            guard let accepted = try await connection.acceptStream() else { throw lost("the peer closed before saying hello") }
            stream = accepted
            // Strip the greeting; whatever follows it is already chat text.
            while !pending.starts(with: greeting) {
                guard pending.count < greeting.count, let chunk = try await stream.read() else {
                    throw lost("the peer is not an hp-chat peer")
                }
                pending += chunk
            }
            pending.removeFirst(greeting.count)
        }
    } catch let error as ExitCode {
        throw error
    } catch {
        throw lost("\(error)")
    }
    say("chatting with node=\(connection.peerNodeID) via \(connection.remoteAddress) (Ctrl-D to leave)")
    if !pending.isEmpty { FileHandle.standardOutput.write(Data(pending)) }

    let input = standardInputLines()
    let outcome = await withTaskGroup(of: Ended.self) { group -> Ended in
        group.addTask {
            for await line in input {
                do { try await stream.write(line) } catch { return .lost("\(error)") }
            }
            return .inputDone
        }
        group.addTask {
            do {
                while let chunk = try await stream.read() { FileHandle.standardOutput.write(Data(chunk)) }
                return .peerDone
            } catch {
                return .lost("\(error)")
            }
        }
        let first = await group.next() ?? .lost("no direction ran")
        switch first {
        case .inputDone:
            // We are done talking; keep printing until the peer is done too.
            do { try await stream.finish() } catch {
                group.cancelAll()
                return .lost("\(error)")
            }
            return await group.next() ?? .peerDone
        case .peerDone:
            // The peer left: stop reading stdin (the task ends on cancellation) and say goodbye.
            group.cancelAll()
            do { try await stream.finish() } catch { return .lost("\(error)") }
            return .peerDone
        case .lost:
            group.cancelAll()
            return first
        }
    }
    switch outcome {
    case .lost(let reason):
        await connection.abort(errorCode: 1, reason: "connection lost")
        throw lost(reason)
    case .peerDone, .inputDone:
        say("peer left")
        // The graceful close waits until the peer has acknowledged everything we typed and our end of stream, so
        // whichever side closes first loses nothing: the other still reads it all after the close arrives.
        guard await connection.close() else { throw lost("the peer did not acknowledge everything we sent") }
    }
}

func lost(_ reason: String) -> ExitCode {
    fail("connection lost: \(reason)", hint: "the other peer quit or its network went away", code: 3)
}
