import ProcessTestSupport
import Testing
import HolePunchNet
@testable import HolePunchQUIC

@Suite("Path layer below QUIC", .serialized)
struct PathLayerTests {
    @Test("a live connection moves to a second path mid-stream; the first path then dies and no byte is lost or reordered")
    func switchMidStream() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        // Two loopback paths between the same two sockets, each through its own forwarder.
        let first = try UDPForwarder(to: server.localAddress)
        let second = try UDPForwarder(to: server.localAddress)
        defer {
            first.close()
            second.close()
        }
        let forwardedBefore = second.forwarded
        let switchTime = try await moveMidStream(
            client: client, server: server, first: first.address, second: second.address, size: 4 << 20,
            killFirst: { first.kill() }
        )
        #expect(second.forwarded > forwardedBefore)
        let probes = await client.stats.pathProbesReceived + server.stats.pathProbesReceived
        print("path switch (UDP): both sides on the new path after \(switchTime); \(probes) path probes received")
        await client.close()
        await server.close()
    }

    @Test("the same move on an in-memory network")
    func switchMidStreamInMemory() async throws {
        let network = InMemoryDatagramNetwork()
        let server = try await Endpoint.open(
            on: network.bind(.loopbackV4(port: 0)), configuration: EndpointConfiguration(identity: TestIdentities.b)
        )
        let client = try await Endpoint.open(
            on: network.bind(.loopbackV4(port: 0)), configuration: EndpointConfiguration(identity: TestIdentities.a)
        )
        let first = try InMemoryForwarder(on: network, to: server.localAddress)
        let second = try InMemoryForwarder(on: network, to: server.localAddress)
        defer {
            first.close()
            second.close()
        }
        let dead = first.address
        _ = try await moveMidStream(
            client: client, server: server, first: first.address, second: second.address, size: 1 << 20,
            killFirst: { network.setCondition { $0.from == dead || $0.to == dead ? .drop : .deliver } }
        )
        await client.close()
        await server.close()
    }

    /// Dials `server` through `first`, writes half of `size` bytes, validates and switches to `second`, waits for
    /// the server to follow, calls `killFirst`, writes the rest, and checks that every byte arrived in order.
    /// Returns how long the switch took, from adding the path to the server following.
    private func moveMidStream(
        client: Endpoint, server: Endpoint, first: SocketAddress, second: SocketAddress, size: Int,
        killFirst: () -> Void
    ) async throws -> Duration {
        let payload = (0..<size).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: first, expecting: TestIdentities.b.nodeID)
        }
        let accepted = try await withDeadline(.seconds(10)) {
            var incoming = server.incoming.makeAsyncIterator()
            return await incoming.next()
        }
        let serverConnection = try #require(accepted)
        let serverChanges = await serverConnection.pathChanges()
        let reader = Task {
            guard let stream = try await serverConnection.acceptStream() else { return [UInt8]() }
            return try await stream.readToEnd(limit: 8 << 20)
        }
        let stream = try await connection.openStream()
        let half = payload.count / 2
        for start in stride(from: 0, to: half, by: 65_536) {
            try await stream.write(Array(payload[start..<min(start + 65_536, half)]))
        }

        // Mid-stream (much of the first half still in flight): validate the second path and move onto it.
        let clock = ContinuousClock()
        let began = clock.now
        let route = PathRoute.direct(second)
        try await connection.addPath(route)
        try await connection.validatePath(route)
        try await connection.switchPath(to: route)
        let followed = try await withDeadline(.seconds(10)) {
            var changes = serverChanges.makeAsyncIterator()
            return await changes.next()
        }
        let switchTime = clock.now - began
        // The server saw the client first at the first forwarder's address, now at the second's.
        #expect(followed == PathChange(from: .direct(first), to: .direct(second), isLocal: false))
        killFirst()
        for start in stride(from: half, to: payload.count, by: 65_536) {
            try await stream.write(Array(payload[start..<min(start + 65_536, payload.count)]))
        }
        try await stream.finish()
        let received = try await withDeadline(.seconds(30)) { try await reader.value }
        #expect(received.count == payload.count)
        #expect(received == payload)
        #expect(await connection.paths().filter(\.isActive).map(\.route) == [route])
        #expect(await client.stats.pathSwitches == 1)
        #expect(await server.stats.pathSwitches == 1)
        await connection.close()
        return switchTime
    }

    @Test("a path that does not reach the peer fails validation, and cannot be switched to")
    func deadPathFailsValidation() async throws {
        let server = try await makeEndpoint(TestIdentities.b)
        let client = try await makeEndpoint(TestIdentities.a)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let dead = try UDPForwarder(to: server.localAddress)
        defer { dead.close() }
        dead.kill()
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let route = PathRoute.direct(dead.address)
        try await connection.addPath(route)
        await #expect(throws: QUICError.self) { try await connection.switchPath(to: route) }
        do {
            try await connection.validatePath(route, timeout: .milliseconds(300))
            Issue.record("a dead path validated")
        } catch let error as QUICError {
            #expect(error.code == .pathValidationFailed)
        }
        #expect(await connection.paths().map(\.isValidated) == [true, false])
        await connection.abort()
        await client.close()
        await server.close()
    }

    @Test("the path table follows the peer only to a path it validated, and never back to an old one")
    func tableFollowsPeer() {
        let a = PathRoute.direct(.loopbackV4(port: 1000))
        let b = PathRoute.direct(.loopbackV4(port: 2000))
        var table = PathTable(stable: a)
        // The peer challenges from b: answered, challenged back; packets from b are QUIC's, but not yet followed.
        let (answer, back) = table.challengeReceived(on: b, challenge: 1, now: 1_000_000_000)
        #expect(answer && back)
        #expect(table.carries(b))
        let early = table.packetReceived(on: b)
        #expect(early == nil)
        table.challengeSent(on: b, challenge: 7, now: 1_000_000_000)
        let wrong = table.responseReceived(on: b, challenge: 8)
        let right = table.responseReceived(on: b, challenge: 7)
        #expect(!wrong && right)
        let followed = table.packetReceived(on: b)
        #expect(followed == PathChange(from: a, to: b, isLocal: false))
        // A late packet on the old path does not move it back.
        let late = table.packetReceived(on: a)
        #expect(late == nil)
        #expect(table.active == b)
        let local = table.activate(a)
        #expect(local == PathChange(from: b, to: a, isLocal: true))
        let afterLocal = table.packetReceived(on: b)
        #expect(afterLocal == nil)
    }

    @Test("a connection keeps at most eight paths, however many the peer challenges from")
    func tableIsBounded() {
        var table = PathTable(stable: .direct(.loopbackV4(port: 1)))
        for port in 2...20 {
            _ = table.challengeReceived(on: .direct(.loopbackV4(port: UInt16(port))), challenge: UInt64(port), now: 0)
        }
        #expect(table.statuses.count == PathTable.maxPaths)
        let added = table.add(.direct(.loopbackV4(port: 99)))
        #expect(!added)
    }
}
