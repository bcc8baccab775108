import Foundation
import HolePunchSTUN
import ProcessTestSupport
import Synchronization
import Testing
@testable import HolePunch
import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

@Suite("Probe ledger: replayed probes prove nothing")
struct ProbeLedgerTests {
    let peer = SocketAddress.loopbackV4(port: 4000)
    let other = SocketAddress.loopbackV4(port: 5000)

    @Test("a response counts once, only for a request we sent, from where it went, on the socket it left")
    func responses() {
        var ledger = ProbeLedger()
        let sent = STUNTransactionID.random()
        ledger.recordSent(sent, socket: 1, to: peer)
        let r1 = ledger.acceptResponse(STUNTransactionID.random(), socket: 1, from: peer)
        #expect(!r1, "never sent")
        let r2 = ledger.acceptResponse(sent, socket: 1, from: other)
        #expect(!r2, "copied from another source")
        let r3 = ledger.acceptResponse(sent, socket: 0, from: peer)
        #expect(!r3, "arrived on another socket")
        let r4 = ledger.acceptResponse(sent, socket: 1, from: peer)
        #expect(r4)
        let r5 = ledger.acceptResponse(sent, socket: 1, from: peer)
        #expect(!r5, "a second copy")
        #expect(ledger.outstanding == 0)
    }

    @Test("a request counts once per transaction")
    func requests() {
        var ledger = ProbeLedger()
        let request = STUNTransactionID.random()
        let r6 = ledger.acceptRequest(request)
        #expect(r6)
        let r7 = ledger.acceptRequest(request)
        #expect(!r7)
        let r8 = ledger.acceptRequest(STUNTransactionID.random())
        #expect(r8)
    }

    @Test("both tables stay within their capacity, oldest forgotten first")
    func bounded() {
        var ledger = ProbeLedger(capacity: 100)
        let ids = (0..<5_000).map { _ in STUNTransactionID.random() }
        for id in ids {
            ledger.recordSent(id, socket: 0, to: peer)
            _ = ledger.acceptRequest(id)
        }
        #expect(ledger.outstanding == 100)
        let r9 = ledger.acceptResponse(ids[0], socket: 0, from: peer)
        #expect(!r9, "the oldest was forgotten")
        let r10 = ledger.acceptResponse(ids[4_999], socket: 0, from: peer)
        #expect(r10)
        let r11 = ledger.acceptRequest(ids[4_999])
        #expect(!r11, "recent requests are still remembered")
    }
}

@Suite("Probe replay on loopback", .serialized)
struct ProbeReplayTests {
    @Test("a target does not answer, or believe, a captured request replayed from another source")
    func replayedRequest() async throws {
        let b = try await bindEndpoint(PunchIdentities.b)
        defer { Task { await b.close() } }
        let target = PunchExecutor(endpoint: b)
        let key = sessionKey()
        let peer = try RawUDP(), attacker = try RawUDP()
        let handle = await target.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [peer.port], sessionID: "replay1", sessionKey: key, role: .target,
            targetNodeID: PunchIdentities.a.nodeID,
            strategy: FixedStrategy(interval: .milliseconds(50), rounds: 100, timeout: .seconds(10))
        ))
        let captured = STUNTransactionID.random()
        let genuine = try PunchProbe.request(sessionID: "replay1", senderRole: "initiator", key: key, transactionID: captured)
        peer.send(genuine, to: b.localAddress)
        #expect(peer.receiveResponse(to: captured, key: key, session: "replay1") != nil, "the genuine request is answered")

        attacker.send(genuine, to: b.localAddress)
        let fresh = STUNTransactionID.random()
        attacker.send(try PunchProbe.request(sessionID: "replay1", senderRole: "initiator", key: key, transactionID: fresh),
                      to: b.localAddress)
        // The fresh request (sent after the copy) is answered; the copy is not.
        var answered: [STUNTransactionID] = []
        _ = attacker.receiveResponse(to: fresh, key: key, session: "replay1", seen: &answered)
        #expect(answered.contains(fresh))
        #expect(!answered.contains(captured), "the replayed request was answered")
        await target.cancel(handle.id)
    }

    @Test("an initiator does not take a captured response replayed from another source as a proven path")
    func replayedResponse() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        defer { Task { await a.close() } }
        let initiator = PunchExecutor(endpoint: a)
        let key = sessionKey()
        let peer = try RawUDP(), witness = try RawUDP(), attacker = try RawUDP()
        let handle = await initiator.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [peer.port, witness.port], sessionID: "replay2", sessionKey: key,
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(perRound: 2, interval: .milliseconds(50), rounds: 100, timeout: .seconds(10))
        ))
        let proven = Mutex<[SocketAddress]>([])
        let watcher = Task {
            for await event in handle.events {
                if case .probeAnswered(let from) = event { proven.withLock { $0.append(from) } }
            }
        }
        // The peer answers one of the initiator's requests; the attacker copies that answer.
        let request = try #require(peer.receiveRequest(key: key, session: "replay2"))
        let answer = try PunchProbe.response(transactionID: request, sessionID: "replay2", senderRole: "target", key: key,
                                             observedAddress: a.localAddress)
        peer.send(answer, to: a.localAddress)
        attacker.send(answer, to: a.localAddress)
        // A genuine answer from a third port, sent after the copy, marks the point by which the copy was handled.
        let later = try #require(witness.receiveRequest(key: key, session: "replay2"))
        witness.send(try PunchProbe.response(transactionID: later, sessionID: "replay2", senderRole: "target", key: key,
                                             observedAddress: a.localAddress), to: a.localAddress)
        let witnessed = await eventually(.seconds(5)) { proven.withLock { $0.contains(witness.address) } }
        #expect(witnessed, "the witness's genuine answer was not taken as proof")
        await initiator.cancel(handle.id)
        await watcher.value
        let addresses = proven.withLock { $0 }
        #expect(addresses.contains(peer.address))
        #expect(!addresses.contains(attacker.address), "the copied response proved the attacker's address")
    }
}

/// A plain UDP socket on loopback that plays a peer (or an attacker) with probes made by hand.
final class RawUDP {
    let fd: Int32
    let address: SocketAddress
    var port: UInt16 { address.port }

    init() throws {
        let descriptor = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard SocketAddress.loopbackV4(port: 0).withSockAddr({ bind(descriptor, $0, $1) }) == 0,
              let bound = SocketAddress(boundTo: descriptor)
        else {
            close(descriptor)
            throw PunchError(code: .invalidOptions, message: "bind failed")
        }
        fd = descriptor
        address = bound
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8], to destination: SocketAddress) {
        _ = destination.withSockAddr { sockaddr, length in
            bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, 0, sockaddr, length) }
        }
    }

    /// The next datagram within `limit`, or nil.
    func receive(within limit: Duration = .seconds(5)) -> [UInt8]? {
        var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let milliseconds = Int32(limit.components.seconds * 1000 + limit.components.attoseconds / 1_000_000_000_000_000)
        guard poll(&descriptor, 1, milliseconds) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 2048)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        return n > 0 ? Array(buffer[0..<n]) : nil
    }

    /// Reads until a verified probe request of `session` arrives; returns its transaction.
    func receiveRequest(key: [UInt8], session: String) -> STUNTransactionID? {
        for _ in 0..<200 {
            guard let bytes = receive() else { return nil }
            if let probe = try? PunchProbe.verify(bytes, sessionID: session, key: key), !probe.isResponse {
                return probe.transactionID
            }
        }
        return nil
    }

    /// Reads until the response to `transaction` arrives, collecting the transactions of every response seen.
    func receiveResponse(
        to transaction: STUNTransactionID, key: [UInt8], session: String, seen: inout [STUNTransactionID]
    ) -> PunchProbe.Verified? {
        for _ in 0..<200 {
            guard let bytes = receive() else { return nil }
            guard let probe = try? PunchProbe.verify(bytes, sessionID: session, key: key), probe.isResponse else { continue }
            seen.append(probe.transactionID)
            if probe.transactionID == transaction { return probe }
        }
        return nil
    }

    func receiveResponse(to transaction: STUNTransactionID, key: [UInt8], session: String) -> PunchProbe.Verified? {
        var seen: [STUNTransactionID] = []
        return receiveResponse(to: transaction, key: key, session: session, seen: &seen)
    }
}
