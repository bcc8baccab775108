import Foundation
import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// Wraps a transport and counts closes, to prove the client releases what it opened.
final class CountingTransport: STUNTransport, @unchecked Sendable {
    let inner: UDPSTUNTransport
    private let lock = NSLock()
    private var closes = 0
    var closeCount: Int { lock.withLock { closes } }

    init(_ inner: UDPSTUNTransport) { self.inner = inner }
    var localAddress: SocketAddress { inner.localAddress }
    func send(_ bytes: [UInt8], to destination: SocketAddress) async throws { try await inner.send(bytes, to: destination) }
    func incoming() -> AsyncStream<STUNDatagram> { inner.incoming() }
    func close() async {
        lock.withLock { closes += 1 }
        await inner.close()
    }
}

final class Opened: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [CountingTransport] = []
    func add(_ t: CountingTransport) { lock.withLock { list.append(t) } }
    var all: [CountingTransport] { lock.withLock { list } }
}

extension RealNetworkTests {
@Suite struct LoopbackDiscoveryTests {
    @Test func ourClientAgainstOurServerSeesNoNAT() async throws {
        let server = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0, alternateIP: .v4(127, 0, 0, 2)))
        try server.start()
        defer { server.stop() }
        let result = try await NATDiscoveryClient.discover(server: server.primaryAddress, bindAddress: .loopbackV4(port: 0))
        #expect(result.mapping == .endpointIndependent)
        #expect(result.filtering == .endpointIndependent)
        #expect(result.allocation == .portPreserving)
        #expect(result.evidence.natDetected == false)
        #expect(result.evidence.otherAddress == server.localAddresses[3])
        #expect(result.legacyLabel == "full_cone")
        #expect(result.confidence == 1)
        #expect(result.evidence.tests.allSatisfy { $0.outcome == "answered" })
    }

    @Test func primaryTransportStaysUsableAndExtrasAreClosed() async throws {
        let server = try STUNServer(configuration: .init(primary: .loopbackV4(port: 0), alternatePort: 0, alternateIP: .v4(127, 0, 0, 2)))
        try server.start()
        defer { server.stop() }
        let primary = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { primary.closeNow() }
        let opened = Opened()
        let client = NATDiscoveryClient(server: server.primaryAddress, transport: primary, makeExtraTransport: {
            let t = CountingTransport(try UDPSTUNTransport(binding: .loopbackV4(port: 0)))
            opened.add(t)
            return t
        })
        let first = try await client.run()
        let second = try await client.run()
        #expect(first.mapping == .endpointIndependent)
        #expect(second.reflexiveAddress == primary.localAddress)
        #expect(opened.all.count == 6)
        #expect(opened.all.allSatisfy { $0.closeCount == 1 })
    }

    @Test func cancellationStopsDiscoveryPromptly() async throws {
        // A bound socket that never answers: loopback, so no ICMP either; discovery would wait its full timeout.
        let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let primary = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { primary.closeNow() }
        let opened = Opened()
        let client = NATDiscoveryClient(
            server: silent.localAddress, transport: primary,
            makeExtraTransport: {
                let t = CountingTransport(try UDPSTUNTransport(binding: .loopbackV4(port: 0)))
                opened.add(t)
                return t
            },
            configuration: .init(initialRTO: .seconds(5), maxTransmissions: 7, overallTimeout: .seconds(120))
        )
        let task = Task { try await client.run() }
        // Synchronise on the first request actually arriving, not on a sleep.
        let first = silent.receive(timeoutMilliseconds: 5000)
        #expect(first != nil)
        let clock = ContinuousClock()
        let started = clock.now
        task.cancel()
        let outcome = await task.result
        #expect(started.duration(to: clock.now) < .seconds(2))
        #expect(throws: CancellationError.self) { try outcome.get() }
        #expect(opened.all.count == 3)
        #expect(opened.all.allSatisfy { $0.closeCount == 1 })
        // Nothing else is sent after cancellation.
        #expect(silent.receive(timeoutMilliseconds: 300) == nil)
    }
}
}
