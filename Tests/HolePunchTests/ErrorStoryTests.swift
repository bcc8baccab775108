import Foundation
import HolePunchNet
import ProcessTestSupport
import Testing
@testable import HolePunch

/// One error story: messages say their code once, durations read like a person wrote them, and cancelling a
/// punch that already ended is a no-op that says so.
@Suite("Errors and cancellation")
struct ErrorStoryTests {
    @Test("durations print with three significant digits and a unit", arguments: [
        (Duration.nanoseconds(1_978_295), "1.98 ms"),
        (Duration.milliseconds(2300), "2.3 s"),
        (Duration.nanoseconds(740), "740 ns"),
        (Duration.microseconds(12), "12 µs"),
        (Duration.milliseconds(250), "250 ms"),
        (Duration.nanoseconds(999_700_000), "1 s"),
        (Duration.seconds(125), "125 s"),
        (Duration.zero, "0 s"),
    ])
    func humanDurations(_ duration: Duration, _ expected: String) {
        #expect(duration.humanDescription == expected)
    }

    @Test("a punch error prints its elapsed time humanly")
    func punchErrorDuration() {
        let error = PunchError(code: .timeout, message: "no answer", portsTried: [7], rounds: 3, elapsed: .nanoseconds(1_978_295))
        #expect(error.description == "timeout: no answer (ports tried 1, rounds 3, after 1.98 ms)")
    }

    @Test("cancel on a finished punch returns alreadyFinished, on an id never issued returns unknown; neither throws")
    func cancelFinished() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try SilentSocket()
        let handle = await executor.startPunch(PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "fin", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(rounds: 1000, timeout: .seconds(30))
        ))
        #expect(await executor.cancel(handle.id) == .cancelled)
        guard case .failure(let error) = await handle.result() else { Issue.record("expected cancelled"); return }
        #expect(error.code == .cancelled)
        #expect(await executor.cancel(handle.id) == .alreadyFinished)
        #expect(await executor.cancel(PunchID(rawValue: 9_999)) == .unknown)
        await a.close()
    }
}

@Suite("Human durations at the extremes")
struct HumanDurationExtremesTests {
    @Test("durations too long for three significant digits print whole seconds instead of trapping", arguments: [
        (Duration.seconds(Int64.max), "9223372036854775807 s"),
        (Duration.seconds(Int64.min), "-9223372036854775808 s"),
        (Duration.seconds(1_000_000), "1000000 s"),
    ])
    func extremes(_ duration: Duration, _ expected: String) {
        #expect(duration.humanDescription == expected)
    }
}

@Suite("Cancellation stops a punch's sockets", .serialized)
struct CancellationSocketTests {
    /// The source ports of the datagrams waiting on `silent`, read without blocking.
    static func sourcePorts(_ silent: SilentSocket) -> Set<UInt16> {
        var ports: Set<UInt16> = []
        var buffer = [UInt8](repeating: 0, count: 2048)
        while true {
            var storage = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let received = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(silent.fd, &buffer, buffer.count, Int32(MSG_DONTWAIT), $0, &length)
                }
            }
            guard received >= 0 else { return ports }
            // Punch probes only (STUN framing: the magic cookie at bytes 4-7): on a loopback shared with hundreds of
            // tests, another test's connection may still send a path challenge to an old address whose port this
            // socket now holds, from a socket that then closes (seen once in CI).
            guard received >= 20, buffer[0] <= 3, buffer[4..<8] == [0x21, 0x12, 0xA4, 0x42] else { continue }
            ports.insert(UInt16(bigEndian: storage.sin_port))
        }
    }

    /// Whether a fresh UDP socket can bind 127.0.0.1:`port`, i.e. nothing holds it any more.
    static func isFree(_ port: UInt16) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(fd) }
        return SocketAddress.loopbackV4(port: port).withSockAddr { bind(fd, $0, $1) } == 0
    }

    @Test("cancelling the task of a punch on four sockets: when the error arrives, its three extra sockets are closed")
    func cancelClosesExtraSockets() async throws {
        let a = try await bindEndpoint(PunchIdentities.a)
        let executor = PunchExecutor(endpoint: a)
        let silent = try SilentSocket()
        let options = PunchOptions(
            targetHost: "127.0.0.1", targetPorts: [silent.port], sessionID: "sockets", sessionKey: sessionKey(),
            role: .initiator, targetNodeID: PunchIdentities.b.nodeID,
            strategy: FixedStrategy(rounds: 1000, timeout: .seconds(30), sockets: 4))
        let task = Task { try await executor.punch(options) }
        var seen: Set<UInt16> = []
        #expect(await eventually(.seconds(10)) {
            seen.formUnion(Self.sourcePorts(silent))
            return seen.count == 4
        }, "probes came from \(seen)")
        let extra = seen.subtracting([a.localAddress.port])
        #expect(extra.count == 3)
        #expect(extra.allSatisfy { !Self.isFree($0) }, "the extra sockets should be open while the punch runs")
        task.cancel()
        let error = await #expect(throws: PunchError.self) { _ = try await task.value }
        #expect(error?.code == .cancelled)
        // No waiting: the result is delivered only once the losing sockets are closed.
        #expect(extra.filter { !Self.isFree($0) }.isEmpty, "still open after the result: \(extra.filter { !Self.isFree($0) })")
        #expect(await executor.activePunches().isEmpty)
        await a.close()
    }
}
