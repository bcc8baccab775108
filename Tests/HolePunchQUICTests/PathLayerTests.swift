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
        let payload = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: first.address, expecting: TestIdentities.b.nodeID)
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
        let probesBefore = await client.stats.datagramsSent + server.stats.datagramsSent
        let route = PathRoute.direct(second.address)
        try await connection.addPath(route)
        try await connection.validatePath(route)
        try await connection.switchPath(to: route)
        let followed = try await withDeadline(.seconds(10)) {
            var changes = serverChanges.makeAsyncIterator()
            return await changes.next()
        }
        let switchTime = clock.now - began
        // The server saw the client first at the first forwarder's address, now at the second's.
        #expect(followed == PathChange(from: .direct(first.address), to: .direct(second.address), isLocal: false))
        first.kill()
        let forwardedBefore = second.forwarded
        for start in stride(from: half, to: payload.count, by: 65_536) {
            try await stream.write(Array(payload[start..<min(start + 65_536, payload.count)]))
        }
        try await stream.finish()
        let received = try await withDeadline(.seconds(30)) { try await reader.value }
        #expect(received.count == payload.count)
        #expect(received == payload)
        #expect(second.forwarded > forwardedBefore)
        #expect(await connection.paths().filter(\.isActive).map(\.route) == [route])
        #expect(await client.stats.pathSwitches == 1)
        #expect(await server.stats.pathSwitches == 1)
        let probes = await client.stats.pathProbesReceived + server.stats.pathProbesReceived
        let datagrams = await client.stats.datagramsSent + server.stats.datagramsSent - probesBefore
        print("path switch: both sides on the new path after \(switchTime); \(probes) path probes received; \(datagrams) datagrams sent meanwhile, stream data included")
        await connection.close()
        await client.close()
        await server.close()
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
        let (answer, back) = table.challengeReceived(on: b, now: 1_000_000_000)
        #expect(answer && back)
        #expect(table.carries(b.address) == b)
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
        for port in 2...20 { _ = table.challengeReceived(on: .direct(.loopbackV4(port: UInt16(port))), now: 0) }
        #expect(table.statuses.count == PathTable.maxPaths)
        let added = table.add(.direct(.loopbackV4(port: 99)))
        #expect(!added)
    }
}
