import Dispatch
import HolePunchNet
import ProcessTestSupport
import Testing

/// What a transport handed over, copied out of the loop's buffer.
enum Arrival: Hashable, Sendable {
    case datagram([UInt8], from: SocketAddress)
    case unreachable(SocketAddress)
}

/// Starts `transport` and streams what it hands over. The callback reads at most `perCallback` inputs, so a test
/// can check that the transport calls again while input is left (level-triggered, like epoll).
func arrivals(of transport: any DatagramTransport, perCallback: Int = 64) throws -> AsyncStream<Arrival> {
    let (stream, sink) = AsyncStream.makeStream(of: Arrival.self)
    try transport.start { [weak transport] in
        guard let transport else { return }
        let buffer = transport.loop.receiveBuffer
        for _ in 0..<perCallback {
            switch transport.receive(into: buffer) {
            case nil: return
            case let .datagram(received)?: sink.yield(.datagram(Array(buffer.prefix(received.count)), from: received.from))
            case let .unreachable(address)?: sink.yield(.unreachable(address))
            }
        }
    }
    return stream
}

/// The next `count` arrivals, or a ``DeadlineExceeded`` failure after five seconds.
func next(_ count: Int, of stream: AsyncStream<Arrival>) async throws -> [Arrival] {
    try await withDeadline(.seconds(5)) {
        var taken: [Arrival] = []
        for await arrival in stream {
            taken.append(arrival)
            if taken.count == count { break }
        }
        return taken
    }
}

@Suite("UDP datagram transport")
struct UDPDatagramTransportTests {
    @Test("datagrams arrive on the loop with their source")
    func delivers() async throws {
        let a = try UDPDatagramTransport(binding: .loopbackV4(port: 0))
        let b = try UDPDatagramTransport(binding: .loopbackV4(port: 0))
        defer { a.close(); b.close() }
        let received = try arrivals(of: b, perCallback: 1)
        for byte in 0..<UInt8(5) { try a.send([byte], to: b.localAddress) }
        let got = try await next(5, of: received)
        #expect(Set(got) == Set((0..<UInt8(5)).map { Arrival.datagram([$0], from: a.localAddress) }))
    }

    @Test("a send to a closed port is reported as unreachable")
    func reportsUnreachable() async throws {
        let closed = try UDPDatagramSocket(binding: .loopbackV4(port: 0)).localAddress
        let a = try UDPDatagramTransport(binding: .loopbackV4(port: 0), options: .endpoint)
        defer { a.close() }
        let received = try arrivals(of: a)
        try a.send([0], to: closed)
        #expect(try await next(1, of: received) == [.unreachable(closed)])
    }

    @Test("close unregisters and releases the socket: sends fail as closed, the address is free again")
    func closeReleases() throws {
        let a = try UDPDatagramTransport(binding: .loopbackV4(port: 0))
        _ = try arrivals(of: a)
        a.close()
        a.close()
        let error = #expect(throws: DatagramError.self) { try a.send([1], to: .loopbackV4(port: 9)) }
        #expect(error?.code == .closed)
        #expect(throws: DatagramError.self) { try a.start {} }
        _ = try UDPDatagramSocket(binding: a.localAddress)
    }
}

@Suite("UDP transport close across loops")
struct CrossLoopCloseTests {
    @Test("closing a transport from another loop's thread does not wait for its loop (which may be waiting for us)")
    func closeFromAnotherLoopDoesNotBlock() async throws {
        let first = EventLoop(name: "test-loop-a")
        let second = EventLoop(name: "test-loop-b")
        let transport = try UDPDatagramTransport(binding: .loopbackV4(port: 0), loop: second)
        _ = try arrivals(of: transport)
        #expect(!EventLoop.onAnyLoop)
        #expect(second.executeAndWait { EventLoop.onAnyLoop })
        // The second loop waits for the first to finish its close: a close that waited for the second loop would
        // deadlock both.
        let closed = DispatchSemaphore(value: 0)
        second.execute { closed.wait() }
        let done = try await withDeadline(.seconds(5)) {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                first.execute {
                    transport.close()
                    closed.signal()
                    continuation.resume(returning: true)
                }
            }
        }
        #expect(done)
        // Once the second loop has run the queued unregistration, the socket is released and its port free again.
        let address = transport.localAddress
        #expect(await eventually { (try? UDPDatagramSocket(binding: address)) != nil })
    }
}

@Suite("In-memory datagram transport")
struct InMemoryDatagramTransportTests {
    @Test("two transports deliver to each other in send order, with the sender's address")
    func deliversInOrder() async throws {
        let network = InMemoryDatagramNetwork()
        let a = try network.bind(.loopbackV4(port: 0))
        let b = try network.bind(.loopbackV4(port: 0))
        #expect(a.localAddress == .loopbackV4(port: 49_152))
        #expect(b.localAddress == .loopbackV4(port: 49_153))
        // Sent before b starts: kept in its inbox, as a socket buffer would.
        try a.send([0], to: b.localAddress)
        let received = try arrivals(of: b, perCallback: 1)
        for byte in 1..<UInt8(20) { try a.send([byte], to: b.localAddress) }
        let got = try await next(20, of: received)
        #expect(got == (0..<UInt8(20)).map { .datagram([$0], from: a.localAddress) })
        #expect(network.statistics.delivered == 20)
    }

    @Test("binding a held address throws; closing frees it")
    func bindConflict() throws {
        let network = InMemoryDatagramNetwork()
        let a = try network.bind(.loopbackV4(port: 7))
        let error = #expect(throws: DatagramError.self) { _ = try network.bind(.loopbackV4(port: 7)) }
        #expect(error?.code == .bind)
        a.close()
        _ = try network.bind(.loopbackV4(port: 7))
    }

    @Test("a datagram to nobody comes back to the sender as unreachable; a closed transport cannot send")
    func unreachableAndClosed() async throws {
        let network = InMemoryDatagramNetwork()
        let a = try network.bind(.loopbackV4(port: 0))
        let b = try network.bind(.loopbackV4(port: 0))
        let received = try arrivals(of: a)
        b.close()
        try a.send([1], to: b.localAddress)
        #expect(try await next(1, of: received) == [.unreachable(b.localAddress)])
        #expect(network.statistics.unroutable == 1)
        let error = #expect(throws: DatagramError.self) { try b.send([1], to: a.localAddress) }
        #expect(error?.code == .closed)
    }

    @Test("the condition hook drops, and holds datagrams that a release delivers reversed")
    func dropHoldReorder() async throws {
        let network = InMemoryDatagramNetwork()
        let a = try network.bind(.loopbackV4(port: 0))
        let b = try network.bind(.loopbackV4(port: 0))
        let received = try arrivals(of: b)
        network.setCondition { datagram in
            switch datagram.bytes.first {
            case 0: .drop
            case 1, 2, 3: .hold
            default: .deliver
            }
        }
        for byte in 0..<UInt8(5) { try a.send([byte], to: b.localAddress) }
        #expect(try await next(1, of: received) == [.datagram([4], from: a.localAddress)])
        #expect(network.statistics.held == 3)
        #expect(network.statistics.dropped == 1)
        network.releaseHeld(reversed: true)
        let got = try await next(3, of: received)
        #expect(got == [3, 2, 1].map { .datagram([$0], from: a.localAddress) })
        #expect(network.statistics.held == 0)
        #expect(network.statistics.delivered == 4)
    }

    @Test("a full inbox drops new arrivals and counts them")
    func boundedInbox() async throws {
        let network = InMemoryDatagramNetwork(inboxCapacity: 2)
        let a = try network.bind(.loopbackV4(port: 0))
        let b = try network.bind(.loopbackV4(port: 0))
        for byte in 0..<UInt8(3) { try a.send([byte], to: b.localAddress) }
        #expect(network.statistics.dropped == 1)
        let got = try await next(2, of: try arrivals(of: b))
        #expect(got == [0, 1].map { .datagram([$0], from: a.localAddress) })
    }
}
