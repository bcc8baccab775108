import Foundation
import HolePunchNet
import ProcessTestSupport
import Testing
@testable import HolePunchSTUN

/// STUN on the shared datagram layer: the server and clients run on the event loops, and the same code runs over
/// the in-memory network.
@Suite struct STUNDatagramLayerTests {
    @Test("NAT discovery over an in-memory network against our server sees no NAT, with no socket involved")
    func discoveryInMemory() async throws {
        let network = InMemoryDatagramNetwork()
        let server = try STUNServer(
            configuration: .init(primary: .loopbackV4(port: 3478), alternatePort: 3479, alternateIP: .v4(127, 0, 0, 2))
        ) { address throws(STUNError) in
            do throws(DatagramError) { return try network.bind(address) } catch { throw STUNError(.socket, error.message) }
        }
        try server.start()
        defer { server.stop() }
        let primary = UDPSTUNTransport(over: try network.bind(.loopbackV4(port: 0)))
        defer { primary.closeNow() }
        let client = NATDiscoveryClient(
            server: server.primaryAddress, transport: primary,
            makeExtraTransport: { UDPSTUNTransport(over: try network.bind(.loopbackV4(port: 0))) }
        )
        let result = try await withDeadline(.seconds(20)) { try await client.run() }
        #expect(result.mapping == .endpointIndependent)
        #expect(result.filtering == .endpointIndependent)
        #expect(result.reflexiveAddress == primary.localAddress)
        #expect(result.evidence.otherAddress == SocketAddress(ip: .v4(127, 0, 0, 2), port: 3479))
        #expect(server.statistics.received > 0)
    }

    @Test("a server that stops closes its transports: its addresses are free again")
    func stopReleasesTransports() throws {
        let network = InMemoryDatagramNetwork()
        let configuration = STUNResponderConfiguration(primary: .loopbackV4(port: 3478), alternatePort: 3479)
        let bind = { (address: SocketAddress) throws(STUNError) -> any DatagramTransport in
            do throws(DatagramError) { return try network.bind(address) } catch { throw STUNError(.socket, error.message) }
        }
        let server = try STUNServer(configuration: configuration, bind: bind)
        #expect(throws: STUNError.self) { _ = try STUNServer(configuration: configuration, bind: bind) }
        server.stop()
        _ = try STUNServer(configuration: configuration, bind: bind)
    }
}

extension RealNetworkTests {
@Suite struct STUNSharedLoopTests {
    /// How many threads this process has (`/proc/self/task`).
    func threadCount() throws -> Int {
        try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count
    }

    @Test("started STUN servers and clients answer on the shared event loops, with no thread of their own")
    func noThreadPerSocket() async throws {
        // The shared loops start with their first use; that is not what this test counts.
        _ = EventLoopGroup.shared.next()
        let before = try threadCount()
        var servers: [STUNServer] = []
        for _ in 0..<64 {
            let server = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0))
            try server.start()
            servers.append(server)
        }
        let client = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { client.closeNow() }
        let replies = client.incoming()
        try await client.send(try STUNMessage(.request).encoded(fingerprint: true), to: servers[7].primaryAddress)
        let reply = try await withDeadline(.seconds(5)) { () -> STUNDatagram? in
            for await datagram in replies { return datagram }
            return nil
        }
        #expect(reply?.from == servers[7].primaryAddress)
        // Before the shared loops, each started server and each subscribed client had a poll thread: 65 here. The
        // bound still catches one thread per server and leaves room for threads the parallel suite (dispatch
        // workers, process monitors) starts meanwhile in the same process.
        #expect(try threadCount() - before < 60)
        for server in servers { server.stop() }
    }
}
}
