import Foundation
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Synchronization
import Testing
@testable import HolePunch

/// A second loopback address of the target: a relay that passes the initiator's datagrams to the target and the
/// target's answers back, so the initiator proves the target at two addresses, as behind a hairpinning router that
/// gives the second peer's packets another public port. Runs on its own thread until ``close()``.
///
/// With `clientDatagramLimit` it passes only that many of the initiator's datagrams (1: its Initial), and all of the
/// target's: the initiator can complete a handshake whose Finished never reaches the target. With `holdsQUIC` it
/// holds datagrams of 1,000 bytes or more (QUIC's Initials and the flights answering them; probes are far smaller)
/// for that long, in order, so that every probe through it is answered before a handshake through it completes.
/// With `holdsSmallAnswers` it holds the target's datagrams under 1,000 bytes (probe answers, and what follows its
/// padded handshake flight: HANDSHAKE_DONE, acknowledgements) that long: the target completes a handshake through it
/// that the initiator cannot see confirmed until then.
final class SecondPort: Sendable {
    let address: SocketAddress
    private let socket: UDPDatagramSocket
    private let target: SocketAddress
    private let clientDatagramLimit: Int
    private let holdsQUIC: Duration?
    private let holdsSmallAnswers: Duration?
    private let state = Mutex<(client: SocketAddress?, running: Bool, fromClient: Int)>((nil, true, 0))
    /// The initiator's first datagram (its Initial) and how many datagrams carried exactly those bytes.
    private let first = Mutex<(bytes: [UInt8], count: Int)>(([], 0))

    /// How many times the initiator's first datagram came through: its handshake's packet copies.
    var copiesOfFirstClientDatagram: Int { first.withLock { $0.count } }

    init(to target: SocketAddress, clientDatagramLimit: Int = .max, holdsQUIC: Duration? = nil,
         holdsSmallAnswers: Duration? = nil) throws {
        socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        address = socket.localAddress
        self.target = target
        self.clientDatagramLimit = clientDatagramLimit
        self.holdsQUIC = holdsQUIC
        self.holdsSmallAnswers = holdsSmallAnswers
        Thread { [self] in relay() }.start()
    }

    /// Stops the thread within one poll interval; the socket closes when the last reference goes.
    func close() { state.withLock { $0.running = false } }

    private func relay() {
        let clock = ContinuousClock()
        var held: [(due: ContinuousClock.Instant, bytes: [UInt8], to: SocketAddress)] = []
        while state.withLock({ $0.running }) {
            while let first = held.first, first.due <= clock.now {
                _ = try? socket.send(first.bytes, to: first.to)
                held.removeFirst()
            }
            guard let (bytes, from) = socket.receive(timeoutMilliseconds: held.isEmpty ? 20 : 1) else { continue }
            let destination: SocketAddress? = state.withLock { state in
                if from == target { return state.client }
                first.withLock { first in
                    if first.bytes.isEmpty { first.bytes = bytes }
                    if first.bytes == bytes { first.count += 1 }
                }
                guard state.fromClient < clientDatagramLimit else { return nil }
                state.fromClient += 1
                state.client = from
                return target
            }
            guard let destination else { continue }
            if let hold = holdsSmallAnswers, from == target, bytes.count < 1_000 {
                held.append((clock.now + hold, bytes, destination))
            } else if let hold = holdsQUIC, bytes.count >= 1_000 || !held.isEmpty {
                held.append((clock.now + hold, bytes, destination))
            } else {
                _ = try? socket.send(bytes, to: destination)
            }
        }
    }
}

@Suite("Punch candidates on loopback", .serialized)
struct PunchCandidateLoopbackTests {
    /// The punch's success event, from its handle.
    static func success(_ handle: PunchHandle) async -> PunchSuccess? {
        for await event in handle.events {
            if case .done(.success(let success)) = event { return success }
        }
        return nil
    }

    /// Sends a line on the initiator's connection and reads it on the target's: both hold the same connection.
    static func sameConnection(_ dialled: QUICConnection, _ accepted: QUICConnection, _ line: String) async throws -> Bool {
        let stream = try await dialled.openStream()
        try await stream.write(Array(line.utf8))
        try await stream.finish()
        let read = try await withDeadline(.seconds(5)) { () -> String? in
            guard let incoming = try await accepted.acceptStream() else { return nil }
            return String(decoding: try await incoming.readToEnd(), as: UTF8.self)
        }
        return read == line
    }

    @Test("the target proven at two addresses, dialled directly: both sides keep the same connection, every time")
    func twoProvenAddressesOneConnection() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let second = try SecondPort(to: b.localAddress)
        defer { second.close() }
        let direct = FixedStrategy(perRound: 2, interval: .milliseconds(20), rounds: 20, dialDirect: true)
        for run in 1...5 {
            let session = "two-\(run)"
            let dialling = await initiator.startPunch(options(
                to: b, ports: [second.address.port, b.localAddress.port], session: session, key: key,
                role: .initiator, expecting: PunchIdentities.b.nodeID, strategy: direct))
            let accepting = await target.startPunch(options(to: a, session: session, key: key, role: .target,
                                                            expecting: PunchIdentities.a.nodeID))
            let dialled = try await dialling.value()
            let accepted = try await accepting.value()
            #expect(try await Self.sameConnection(dialled, accepted, "run \(run)"), "run \(run): the sides hold different connections")
            await dialled.close()
        }
        await a.close()
        await b.close()
    }

    @Test("typed candidates: a silent LAN candidate and an unreachable family are skipped, a published pair wins and is reported; the other published pair becomes an extra path, proven or not yet")
    func typedCandidatesWin() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        // Two relayed addresses of the target, each holding QUIC's large datagrams for 50 ms, so that the proof of
        // the second arrives long before a handshake over the first completes (without the hold, a loopback
        // handshake could complete before the second pair was proven: 1 run in 6 in CI); the target probes a
        // silent port, so the initiator's proofs are answers only, each proving a pair both ways.
        let first = try SecondPort(to: b.localAddress, holdsQUIC: .milliseconds(50))
        let second = try SecondPort(to: b.localAddress, holdsQUIC: .milliseconds(50))
        defer {
            first.close()
            second.close()
        }
        let silent = try SilentSocket()
        var dialling = options(to: b, ports: [b.localAddress.port], session: "typed", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID)
        dialling.candidates = [
            Candidate(kind: .host, address: .loopbackV4(port: silent.port)),
            Candidate(kind: .host, address: try SocketAddress(host: "::1", port: b.localAddress.port)),
            Candidate(kind: .serverReflexive, address: first.address),
            Candidate(kind: .portMapped, address: second.address),
        ]
        let handle = await initiator.startPunch(dialling)
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: "typed", key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let won = try #require(await Self.success(handle))
        let dialled = try await handle.value()
        let accepted = try await accepting.value()
        #expect(try await Self.sameConnection(dialled, accepted, "typed"))
        #expect(won.candidate.address == won.remoteAddress)
        #expect([first.address, second.address].contains(won.remoteAddress), "won by \(won.candidate)")
        #expect(won.candidate.kind == (won.remoteAddress == first.address ? .serverReflexive : .portMapped))
        #expect(won.candidate.family == .ipv4)
        let other = won.remoteAddress == first.address ? second.address : first.address
        let added = await eventually { await dialled.paths().contains { $0.route == .direct(other) } }
        let paths = await dialled.paths()
        #expect(added, "paths: \(paths)")
        await dialled.close()
        await a.close()
        await b.close()
    }
}
