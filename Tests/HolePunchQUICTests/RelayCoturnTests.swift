import Foundation
import ProcessTestSupport
import Testing
import HolePunch
import HolePunchNet
import HolePunchSTUN
@testable import HolePunchQUIC

/// The acceptance tests of the relayed path (issue 15): our TURN client on the endpoint's socket, coturn on loopback.
@Suite(
    "Relayed path through coturn", .serialized,
    .enabled(if: Coturn.available, "coturn's turnserver is not installed (apt-get install coturn)")
)
struct RelayCoturnTests {
    /// coturn, endpoint `a` with an allocation on it (attached as its relay, with a channel to `b`), and `b`.
    struct Setup {
        let coturn: Coturn
        let a: Endpoint
        let b: Endpoint
        let turn: TURNClient
        let allocation: TURNClient.Allocation
        let runner: Task<Void, any Error>

        init(idleTimeout: Duration = .seconds(30)) async throws {
            // Readiness is the allocation itself: the client retransmits until coturn answers.
            coturn = try await Coturn.start { _ in true }
            do {
                a = try await makeEndpoint(TestIdentities.a) { $0.idleTimeout = idleTimeout }
                b = try await makeEndpoint(TestIdentities.b) { $0.idleTimeout = idleTimeout }
                let credentials = try TURNCredentials.rest(
                    secret: Array(Coturn.secret.utf8), user: "a", expiresAt: Int64(Date().timeIntervalSince1970) + 600
                )
                let turn = TURNClient(
                    server: .loopbackV4(port: coturn.port), credentials: credentials,
                    transport: EndpointNonQUICTransport(a)
                )
                self.turn = turn
                runner = Task { try await turn.run() }
                allocation = try await withDeadline(.seconds(10)) { try await turn.allocation() }
                try await a.attachRelay(turn)
                try await turn.createPermission(for: b.localAddress)
                try await turn.bindChannel(to: b.localAddress)
            } catch {
                coturn.stop()
                throw error
            }
        }

        var route: PathRoute { .relay(server: turn.server, peer: b.localAddress) }

        /// `b` dials the relayed address; `a` accepts through the allocation.
        func acceptOverRelay() async throws -> (a: QUICConnection, b: QUICConnection) {
            let dialled = try await withDeadline(.seconds(10)) { [b, allocation] in
                try await b.connect(to: allocation.relayed, expecting: TestIdentities.a.nodeID)
            }
            let accepted = try await withDeadline(.seconds(10)) { [a] in
                var incoming = a.incoming.makeAsyncIterator()
                return await incoming.next()
            }
            let connection = try #require(accepted)
            #expect(await connection.paths().map(\.route) == [route])
            return (connection, dialled)
        }

        func close() async {
            runner.cancel()
            coturn.stop()
            await a.close()
            await b.close()
        }
    }

    @Test("a connection established over coturn moves to direct and back mid-transfer: the SHA-256 of what arrived is the sender's")
    func relayToDirectAndBack() async throws {
        let setup = try await Setup()
        let direct = try UDPForwarder(to: setup.b.localAddress)
        defer { direct.close() }
        let (connection, peer) = try await setup.acceptOverRelay()
        let digests = try await RelayMoves.relayToDirectAndBack(
            connection: connection, peer: peer, relayRoute: setup.route, relayed: setup.allocation.relayed,
            direct: direct, size: 3 << 20
        )
        #expect(digests.sentDigest == digests.receivedDigest)
        let stats = await setup.a.stats
        #expect(stats.relayToDirectMoves == 1 && stats.directToRelayMoves == 1)
        #expect(stats.relayedDatagramsSent > 0 && stats.relayedDatagramsReceived > 0)
        await peer.close()
        await setup.close()
    }

    @Test("a relay path that reorders datagrams (every pair swapped, both ways): the relayed connection carries 1 MiB intact")
    func reorderingRelay() async throws {
        let setup = try await Setup()
        // Between the dialling peer and its peer's relayed address on coturn: the relayed leg reorders.
        let reordering = try UDPForwarder(to: setup.allocation.relayed, swapsPairs: true)
        defer { reordering.close() }
        let dialled = try await withDeadline(.seconds(10)) { [b = setup.b] in
            try await b.connect(to: reordering.address, expecting: TestIdentities.a.nodeID)
        }
        let next = try await withDeadline(.seconds(10)) { [a = setup.a] () async -> QUICConnection? in
            var incoming = a.incoming.makeAsyncIterator()
            return await incoming.next()
        }
        let accepted = try #require(next)
        let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        let reader = Task { try await accepted.acceptStream()?.readToEnd(limit: 4 << 20) }
        let stream = try await dialled.openStream()
        try await stream.write(payload)
        try await stream.finish()
        let received = try #require(try await withDeadline(.seconds(30)) { try await reader.value })
        #expect(RelayMoves.sha256(received) == RelayMoves.sha256(payload))
        #expect(reordering.swapped > 100, "only \(reordering.swapped) pairs were swapped")
        await dialled.close()
        await setup.close()
    }

    @Test("coturn killed while the connection is on the direct path: the connection stays up")
    func coturnDiesWhileDirect() async throws {
        let setup = try await Setup()
        let (connection, peer) = try await setup.acceptOverRelay()
        try await RelayMoves.relayDiesWhileDirect(
            connection: connection, peer: peer, direct: .direct(setup.b.localAddress), kill: setup.coturn.stop
        )
        await peer.close()
        await setup.close()
    }

    @Test("coturn killed while the connection is relayed: it ends with an idle-timeout error within the timeout")
    func coturnDiesWhileRelayed() async throws {
        let setup = try await Setup(idleTimeout: .seconds(2))
        let (connection, peer) = try await setup.acceptOverRelay()
        let stream = try await connection.openStream()
        try await stream.write([1, 2, 3])
        let clock = ContinuousClock()
        let began = clock.now
        // Stopping takes a while (SIGTERM, then SIGKILL after 3 s): the connection may end before it returns.
        setup.coturn.stop()
        // A margin over the timeout: ngtcp2 ends an idle connection at max(idle timeout, 3 PTO).
        let error = try await withDeadline(.seconds(5)) { await connection.waitClosed() }
        #expect(error.code == .idleTimeout)
        // The time includes stop()'s own wait for the process.
        print("coturn killed while relayed: waitClosed returned \(clock.now - began) after the kill began: \(error)")
        _ = try await withDeadline(.seconds(5)) { await peer.waitClosed() }
        await setup.close()
    }
}
