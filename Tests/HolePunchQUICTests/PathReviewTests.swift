import ProcessTestSupport
import Synchronization
import Testing
import HolePunchNet
@testable import HolePunchQUIC

/// Path-layer behaviour found in the review of the issue 13 redesign: copies of the peer's challenges, and a side
/// that moves back to a path it used before.
@Suite("Path layer: replayed challenges and switching back", .serialized)
struct PathReviewTests {
    /// Two endpoints on an in-memory network, `client` dialled to `server` through `first`, plus a second forwarder.
    /// (PathKeepingTests uses it too.)
    struct Pair {
        let network = InMemoryDatagramNetwork()
        let server: Endpoint
        let client: Endpoint
        let first: InMemoryForwarder
        let second: InMemoryForwarder
        let connection: QUICConnection
        let serverConnection: QUICConnection

        init() async throws {
            let network = network
            server = try await Endpoint.open(
                on: network.bind(.loopbackV4(port: 0)), configuration: EndpointConfiguration(identity: TestIdentities.b)
            )
            client = try await Endpoint.open(
                on: network.bind(.loopbackV4(port: 0)), configuration: EndpointConfiguration(identity: TestIdentities.a)
            )
            first = try InMemoryForwarder(on: network, to: server.localAddress)
            second = try InMemoryForwarder(on: network, to: server.localAddress)
            let (client, server, dial) = (client, server, first.address)
            connection = try await withDeadline(.seconds(10)) {
                try await client.connect(to: dial, expecting: TestIdentities.b.nodeID)
            }
            let accepted = try await withDeadline(.seconds(10)) {
                var incoming = server.incoming.makeAsyncIterator()
                return await incoming.next()
            }
            serverConnection = try #require(accepted)
        }

        func close() async {
            await connection.abort()
            first.close()
            second.close()
            await client.close()
            await server.close()
        }
    }

    @Test("a copy of the peer's path challenge, sent again from other addresses, is neither answered nor recorded")
    func replayedChallengeIsRefused() async throws {
        let pair = try await Pair()
        let serverAddress = pair.server.localAddress
        // Keep the first challenge the client sends the server, as anyone on its way could.
        let captured = Mutex<[UInt8]?>(nil)
        pair.network.setCondition { datagram in
            // A probe's size with our 16-byte connection IDs: 3 + 16 + 8 + 16 bytes.
            if datagram.to == serverAddress, datagram.bytes.count == 43, datagram.bytes[0] == PathProbe.marker,
               datagram.bytes[1] == PathProbe.Kind.challenge.rawValue, datagram.bytes[2] == 16 {
                captured.withLock { if $0 == nil { $0 = datagram.bytes } }
            }
            return .deliver
        }
        let route = PathRoute.direct(pair.second.address)
        try await pair.connection.addPath(route)
        try await pair.connection.validatePath(route)
        let challenge = try #require(captured.withLock { $0 })

        // Sent again from as many addresses as a table holds: without a memory of challenge values, each copy
        // would be answered and recorded until the table is full, and the last one named the path to follow.
        var copiers: [InMemoryDatagramTransport] = []
        for _ in 0..<PathTable.maxPaths { copiers.append(try pair.network.bind(.loopbackV4(port: 0))) }
        let before = await pair.server.stats.datagramsReceived
        for copier in copiers { try copier.send(challenge, to: serverAddress) }
        #expect(await eventually { await pair.server.stats.datagramsReceived >= before + copiers.count })

        let recorded = await pair.serverConnection.paths().map(\.route.address)
        #expect(recorded == [pair.first.address, pair.second.address])
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { buffer.deallocate() }
        var answered = 0
        for copier in copiers {
            while copier.receive(into: buffer) != nil { answered += 1 }
        }
        #expect(answered == 0)
        await pair.close()
    }

    @Test("a packet that fails decryption, from a path the peer validated but did not move to, moves nothing")
    func forgedPacketDoesNotMove() async throws {
        let pair = try await Pair()
        let serverAddress = pair.server.localAddress
        let firstAddress = pair.first.address
        // Keep a 1-RTT packet of the client's (short header: it carries the server's connection ID in clear).
        let captured = Mutex<[UInt8]?>(nil)
        pair.network.setCondition { datagram in
            // High bit clear: a short header (the fixed bit may be greased). Kept before any path probe is sent.
            if datagram.to == serverAddress, datagram.from == firstAddress, datagram.bytes.count > 32,
               datagram.bytes[0] & 0x80 == 0 {
                captured.withLock { if $0 == nil { $0 = datagram.bytes } }
            }
            return .deliver
        }
        let stream = try await pair.connection.openStream()
        #expect(await eventually {
            try? await stream.write([1])
            return captured.withLock { $0 } != nil
        })
        // The client proves a second path, and stays where it is: the server validates it back.
        let second = PathRoute.direct(pair.second.address)
        try await pair.connection.addPath(second)
        try await pair.connection.validatePath(second)
        #expect(await eventually { await pair.serverConnection.paths().contains { $0.route == second && $0.isValidated } })
        var forged = try #require(captured.withLock { $0 })
        forged[forged.count - 1] ^= 0xff
        // Sent through the second path's forwarder, so it arrives from that path's address.
        let forger = try pair.network.bind(.loopbackV4(port: 0))
        let before = await pair.server.stats.datagramsReceived
        try forger.send(forged, to: pair.second.address)
        #expect(await eventually { await pair.server.stats.datagramsReceived > before })
        // ngtcp2 returns 0 for the packet it discarded: only a decrypted packet may move the connection.
        #expect(await pair.serverConnection.paths().filter(\.isActive).map(\.route) == [.direct(firstAddress)])
        #expect(await pair.server.stats.pathSwitches == 0)
        await pair.close()
    }

    @Test("a side that switches back to a path it used before is followed there, and the path it left may die")
    func peerFollowsSwitchBack() async throws {
        let pair = try await Pair()
        let serverConnection = pair.serverConnection
        let changes = await serverConnection.pathChanges()
        let echo = Task {
            guard let stream = try await serverConnection.acceptStream() else { return }
            while let chunk = try await stream.read() { try await stream.write(chunk) }
            try await stream.finish()
        }
        defer { echo.cancel() }
        let stream = try await pair.connection.openStream()
        func roundTrip(_ byte: UInt8) async throws {
            try await stream.write([byte])
            let back = try await withDeadline(.seconds(10)) { try await stream.read() }
            #expect(back == [byte])
        }
        func nextChange() async throws -> PathChange? {
            try await withDeadline(.seconds(5)) {
                var iterator = changes.makeAsyncIterator()
                return await iterator.next()
            }
        }
        try await roundTrip(1)

        let first = PathRoute.direct(pair.first.address)
        let second = PathRoute.direct(pair.second.address)
        try await pair.connection.addPath(second)
        try await pair.connection.validatePath(second)
        try await pair.connection.switchPath(to: second)
        try await roundTrip(2)
        #expect(try await nextChange() == PathChange(from: first, to: second, isLocal: false))

        // Back to the first path, which both sides validated long ago: the server must follow here too.
        try await pair.connection.switchPath(to: first)
        try await roundTrip(3)
        #expect(try await nextChange() == PathChange(from: second, to: first, isLocal: false))
        let dead = pair.second.address
        pair.network.setCondition { $0.from == dead || $0.to == dead ? .drop : .deliver }
        try await roundTrip(4)
        await pair.close()
    }
}
