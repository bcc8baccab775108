import Foundation
import HolePunch
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

/// A hostile client built on the public API: it registers on its control stream, then writes frames as fast as
/// the transport takes them and never reads what the server sends.
struct Flooder {
    let endpoint: Endpoint
    let connection: QUICConnection
    let stream: QUICStream

    /// Dials the server; `receiveWindow` small makes the server's writes back up quickly (the flooder never reads).
    static func connect(_ harness: Harness, identity: Identity, receiveWindow: Int = 4_096) async throws -> Flooder {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(
            identity: identity, acceptPolicy: .none, streamReceiveWindow: receiveWindow, connectionReceiveWindow: receiveWindow))
        let connection = try await endpoint.connect(to: harness.server.address, expecting: harness.server.nodeID)
        let stream = try await connection.openStream()
        try await stream.write(RendezvousFraming.frame(ClientMessage.register(Registration())))
        return Flooder(endpoint: endpoint, connection: connection, stream: stream)
    }

    /// Writes `message` up to `count` times, `batch` frames per write; stops early once the connection fails.
    /// Returns how many frames were written.
    func flood(_ message: ClientMessage, count: Int, batch: Int = 256) async -> Int {
        let frame = RendezvousFraming.frame(message)
        var chunk: [UInt8] = []
        for _ in 0..<batch { chunk += frame }
        var written = 0
        while written < count {
            do { try await stream.write(chunk) } catch { break }
            written += batch
            await Task.yield()
        }
        return written
    }

    func close() async {
        await connection.close()
        await endpoint.close()
    }
}

@Suite("Rendezvous under a flooding client", .serialized)
struct RendezvousFloodTests {
    @Test("keep-alive flood, never reading: the flooder is closed, and an honest pair still registers and punches")
    func keepAliveFlood() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        _ = try await b.connect()
        let flooder = try await Flooder.connect(harness, identity: Identities.c)
        let flood = Task { await flooder.flood(.keepAlive, count: 400_000) }

        // During the flood: an honest registration and a punch to a registered peer.
        _ = try await within(.seconds(20)) { try await a.connect() }
        let connection = try await within(.seconds(20)) { try await a.requestPunch(to: Identities.b.nodeID) }
        #expect(connection.peerNodeID == Identities.b.nodeID)

        let closed = try await within(.seconds(15)) { await flooder.connection.waitClosed() }
        #expect(closed.code == .connectionClosed, "\(closed)")
        _ = await flood.value
        #expect(await harness.server.isRegistered(Identities.a.nodeID))
        await flooder.close()
        await connection.close()
        await harness.stop(a, b)
    }
}
