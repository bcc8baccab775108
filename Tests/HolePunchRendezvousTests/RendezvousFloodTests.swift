import Foundation
import HolePunch
import HolePunchQUIC
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

/// Set once by the test body, read by a flooding task.
actor StopFlag {
    private(set) var isSet = false
    func set() { isSet = true }
}

@Suite("Rendezvous under a flooding client", .serialized)
struct RendezvousFloodTests {
    @Test("keep-alive floods, never reading: each flooder is closed as rateLimited, queues stay bounded, and an honest pair registers and punches meanwhile")
    func keepAliveFlood() async throws {
        let limits = RendezvousLimits()
        let harness = try await Harness.start(limits: limits)
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        _ = try await b.connect()
        let first = try await Flooder.connect(harness, identity: Identities.c)
        // The transport grants the one stream the protocol uses: a second cannot even be opened.
        await #expect(throws: QUICError.self) { _ = try await first.connection.openStream() }
        // Flood, and reconnect to flood again each time the server closes us, until the honest pair is done.
        let stop = StopFlag()
        let floods = Task { () -> [QUICError] in
            var flooder: Flooder? = first
            var closes: [QUICError] = []
            while let current = flooder {
                let written = await current.flood(.keepAlive, count: 400_000)
                guard written < 400_000 else { break }
                closes.append(await current.connection.waitClosed())
                await current.close()
                flooder = await stop.isSet ? nil : try? await Flooder.connect(harness, identity: Identities.c)
            }
            return closes
        }

        // During the flood: an honest registration and a punch to a registered peer.
        _ = try await withDeadline(.seconds(20)) { try await a.connect() }
        let connection = try await withDeadline(.seconds(20)) { try await a.requestPunch(to: Identities.b.nodeID) }
        #expect(connection.peerNodeID == Identities.b.nodeID)
        await stop.set()

        let closes = try await withDeadline(.seconds(30)) { await floods.value }
        #expect(!closes.isEmpty, "the server never closed a flooder")
        for closed in closes {
            #expect(closed.code == .connectionClosed, "\(closed)")
            #expect(closed.applicationErrorCode == RendezvousCloseCode.rateLimited, "\(closed)")
            #expect(closed.message.contains("rateLimited"), "\(closed)")
        }
        let statistics = await harness.server.statistics()
        #expect(statistics.closedForRate == closes.count)
        #expect(statistics.largestQueue <= limits.maxQueuedFrames)
        #expect(await harness.server.isRegistered(Identities.a.nodeID))
        // Nothing of the flooders stays behind: their queues and pings went with their connections.
        #expect(await eventually {
            let now = await harness.server.statistics()
            return now.connections == 2 && now.queuedFrames == 0 && now.pendingPings == 0
        })
        #expect(!(await harness.server.isRegistered(Identities.c.nodeID)))
        await connection.close()
        await harness.stop(a, b)
    }

    @Test("a peer that never reads: its reply queue hits the bound and the connection is closed as backlog")
    func neverReads() async throws {
        // Message rates effectively unlimited, so only the queue bound can stop it.
        let limits = RendezvousLimits(messageBurst: 1e12, messagesPerSecond: 1e12, maxQueuedFrames: 32, streamSendBuffer: 2_048)
        let harness = try await Harness.start(limits: limits)
        let flooder = try await Flooder.connect(harness, identity: Identities.c, receiveWindow: 1_024)
        let flood = Task { await flooder.flood(.keepAlive, count: 400_000) }
        let closed = try await withDeadline(.seconds(15)) { await flooder.connection.waitClosed() }
        #expect(closed.applicationErrorCode == RendezvousCloseCode.backlog, "\(closed)")
        #expect(await flood.value < 400_000)
        let statistics = await harness.server.statistics()
        #expect(statistics.closedForBacklog == 1)
        #expect(statistics.closedForRate == 0)
        #expect(statistics.largestQueue <= 32)
        #expect(await eventually { await harness.server.statistics().connections == 0 })
        await flooder.close()
        await harness.stop()
    }

    @Test("streams after the control stream, where the transport allows them, are reset unread")
    func extraStreams() async throws {
        let harness = try await Harness.start(limits: RendezvousLimits(streamsPerConnection: 3))
        let flooder = try await Flooder.connect(harness, identity: Identities.c)
        var extras: [QUICStream] = []
        for _ in 0..<2 {
            let extra = try await flooder.connection.openStream()
            try await extra.write([UInt8](repeating: 0x55, count: 1_000))
            extras.append(extra)
        }
        #expect(await eventually { await harness.server.statistics().streamsRefused == 2 })
        for extra in extras {
            let error = await #expect(throws: QUICError.self) {
                _ = try await withDeadline(.seconds(5)) { try await extra.read() }
            }
            #expect(error?.applicationErrorCode == RendezvousCloseCode.streamRefused, "\(String(describing: error))")
        }
        // The control stream still serves the peer.
        #expect(await eventually { await harness.server.isRegistered(Identities.c.nodeID) })
        await flooder.close()
        await harness.stop()
    }

    @Test("pings a peer never answers expire after pingTimeout, while its connection stays open")
    func unansweredPingsExpire() async throws {
        let harness = try await Harness.start(limits: RendezvousLimits(pingTimeout: .milliseconds(300)))
        // Registers, and never reads: the registration's first ping is never answered.
        let flooder = try await Flooder.connect(harness, identity: Identities.c)
        #expect(await eventually { await harness.server.statistics().pendingPings == 1 })
        #expect(await eventually { await harness.server.statistics().pendingPings == 0 })
        #expect(await harness.server.statistics().connections == 1)
        #expect(await harness.server.isRegistered(Identities.c.nodeID))
        await flooder.close()
        await harness.stop()
    }
}
