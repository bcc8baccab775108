import Foundation
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Synchronization
import Testing
@testable import HolePunch

/// A stand-in for the target's TURN allocation that lets through only the initiator's first datagram (its Initial)
/// and everything the target sends back: the initiator can complete its handshake, but its Finished never reaches
/// the target, which therefore never confirms. Runs on its own thread until ``close()``.
final class FirstDatagramOnly: Sendable {
    let address: SocketAddress
    private let socket: UDPDatagramSocket
    private let target: SocketAddress
    private let state = Mutex<(client: SocketAddress?, forwarded: Int, running: Bool)>((nil, 0, true))

    init(to target: SocketAddress) throws {
        socket = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        address = socket.localAddress
        self.target = target
        Thread { [self] in relay() }.start()
    }

    /// Stops the thread within one poll interval.
    func close() { state.withLock { $0.running = false } }

    private func relay() {
        while state.withLock({ $0.running }) {
            guard let (bytes, from) = socket.receive(timeoutMilliseconds: 20) else { continue }
            let destination: SocketAddress? = state.withLock { state in
                if from == target { return state.client }
                guard state.forwarded == 0 else { return nil }
                state.client = from
                state.forwarded += 1
                return target
            }
            if let destination { _ = try? socket.send(bytes, to: destination) }
        }
    }
}

/// The plan of ``FixedStrategy`` with the relay at once.
struct RelayAtOnceStrategy: PunchStrategy {
    let name = "test-relay-first"

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        var plan = try FixedStrategy(interval: .milliseconds(50), rounds: 40, timeout: .seconds(4)).plan(ctx)
        plan.relay = .first
        plan.connectTimeout = .seconds(2)
        return plan
    }
}

@Suite("Relay-first punches")
struct PunchRelayFirstTests {
    @Test("a relay-first punch returns its relayed connection once we verified the target, before the target confirms (its Finished never arrives there)")
    func relayedDialReturnsBeforeConfirmation() async throws {
        let (a, b, initiator, target, key) = try await punchPair()
        let relay = try FirstDatagramOnly(to: b.localAddress)
        defer { relay.close() }
        // Neither side's probes reach the other: the relayed dial is the only way the punch can connect.
        let silent = try SilentSocket()
        var dialling = options(to: b, ports: [silent.port], session: "early", key: key, role: .initiator,
                               expecting: PunchIdentities.b.nodeID, strategy: RelayAtOnceStrategy())
        dialling.candidates = [Candidate(kind: .serverReflexive, address: .loopbackV4(port: silent.port)),
                               Candidate(kind: .relayed, address: relay.address)]
        let accepting = await target.startPunch(options(to: a, ports: [silent.port], session: "early", key: key,
                                                        role: .target, expecting: PunchIdentities.a.nodeID))
        let handle = await initiator.startPunch(dialling)
        // Waiting for confirmation, the dial (and its retries) would time out and the punch fail.
        let connection = try await withDeadline(.seconds(10)) { try await handle.value() }
        #expect(connection.remoteAddress == relay.address)
        #expect(connection.peerNodeID == PunchIdentities.b.nodeID)
        _ = await initiator.cancel(handle.id)
        _ = await target.cancel(accepting.id)
        await connection.close()
        await a.close()
        await b.close()
    }
}
