import Synchronization

/// One datagram crossing an ``InMemoryDatagramNetwork``, as its condition hook sees it.
package struct InMemoryDatagram: Hashable, Sendable {
    /// The sender's address.
    package var from: SocketAddress
    /// The destination.
    package var to: SocketAddress
    /// The payload.
    package var bytes: [UInt8]

    /// Creates a datagram.
    package init(from: SocketAddress, to: SocketAddress, bytes: [UInt8]) {
        self.from = from
        self.to = to
        self.bytes = bytes
    }
}

/// What the network does with one datagram (``InMemoryDatagramNetwork/setCondition(_:)``).
package enum InMemoryDatagramVerdict: Hashable, Sendable {
    /// Deliver it now.
    case deliver
    /// Lose it.
    case drop
    /// Keep it back until ``InMemoryDatagramNetwork/releaseHeld(reversed:)``: with `reversed`, held datagrams arrive
    /// in the opposite order, which is how a test reorders.
    case hold
}

/// A small in-process network of ``InMemoryDatagramTransport``s that deliver to each other on one ``EventLoop``.
///
/// For tests: no sockets, no kernel, no ports taken. Every transport of a network shares its loop, and each
/// delivery is queued on that loop in send order, so a test that sends from one task sees the same arrivals every
/// run. A datagram to an address no transport holds comes back to its sender as `.unreachable`, as loopback's
/// ICMP port-unreachable does (turn off with `reportsUnreachable`). A condition hook may drop, hold or pass each
/// datagram; held ones are released, in order or reversed, when the test says.
package final class InMemoryDatagramNetwork: Sendable {
    /// The counters of a network.
    package struct Statistics: Hashable, Sendable {
        /// Datagrams put in a transport's inbox.
        package var delivered = 0
        /// Datagrams lost: dropped by the condition, or the destination's inbox was full.
        package var dropped = 0
        /// Datagrams currently held back.
        package var held = 0
        /// Datagrams to addresses nobody holds.
        package var unroutable = 0
    }

    private struct State {
        var transports: [SocketAddress: WeakTransport] = [:]
        var nextPort: UInt16 = 49_152
        var condition: (@Sendable (InMemoryDatagram) -> InMemoryDatagramVerdict)?
        var held: [InMemoryDatagram] = []
        var statistics = Statistics()
    }

    private struct WeakTransport {
        weak var transport: InMemoryDatagramTransport?
    }

    /// The loop every transport of this network runs on.
    package let loop: EventLoop
    /// Whether a datagram to an unbound address is reported back to its sender as unreachable.
    package let reportsUnreachable: Bool
    /// How many datagrams a transport's inbox holds before new ones are dropped (a socket buffer's role).
    package let inboxCapacity: Int
    private let state = Mutex(State())

    /// Creates an empty network on `loop`.
    package init(loop: EventLoop = EventLoopGroup.shared.next(), reportsUnreachable: Bool = true, inboxCapacity: Int = 4096) {
        self.loop = loop
        self.reportsUnreachable = reportsUnreachable
        self.inboxCapacity = inboxCapacity
    }

    /// Creates a transport at `address`; port 0 picks the next free port from 49152 up, in order.
    ///
    /// - Throws: ``DatagramError`` `.bind` when another open transport holds the address.
    package func bind(_ address: SocketAddress) throws(DatagramError) -> InMemoryDatagramTransport {
        try state.withLock { state throws(DatagramError) -> InMemoryDatagramTransport in
            var local = address
            if local.port == 0 {
                repeat {
                    local.port = state.nextPort
                    state.nextPort = state.nextPort == UInt16.max ? 49_152 : state.nextPort + 1
                } while state.transports[local]?.transport != nil
            }
            guard state.transports[local]?.transport == nil else {
                throw DatagramError(.bind, "bind \(local): address already in use")
            }
            let transport = InMemoryDatagramTransport(network: self, localAddress: local)
            state.transports[local] = WeakTransport(transport: transport)
            return transport
        }
    }

    /// Sets (or with `nil` removes) what decides each datagram's fate from now on. It runs on the sender's thread,
    /// once per datagram, before delivery.
    package func setCondition(_ condition: (@Sendable (InMemoryDatagram) -> InMemoryDatagramVerdict)?) {
        state.withLock { $0.condition = condition }
    }

    /// Delivers every held datagram, in the order they were sent or, with `reversed`, the opposite order.
    package func releaseHeld(reversed: Bool = false) {
        let held = state.withLock { state in
            defer {
                state.held.removeAll()
                state.statistics.held = 0
            }
            return state.held
        }
        for datagram in reversed ? held.reversed() : held {
            route(datagram)
        }
    }

    /// A snapshot of the counters.
    package var statistics: Statistics { state.withLock { $0.statistics } }

    /// Applies the condition, then routes.
    func send(_ datagram: InMemoryDatagram) {
        // The hook runs outside the lock, so it may call back into the network (release held datagrams, say).
        let condition = state.withLock { $0.condition }
        let verdict = condition?(datagram) ?? .deliver
        state.withLock { state in
            switch verdict {
            case .deliver: break
            case .drop: state.statistics.dropped += 1
            case .hold:
                state.held.append(datagram)
                state.statistics.held += 1
            }
        }
        if verdict == .deliver { route(datagram) }
    }

    private func route(_ datagram: InMemoryDatagram) {
        let (target, sender) = state.withLock { state in
            (state.transports[datagram.to]?.transport, state.transports[datagram.from]?.transport)
        }
        guard let target else {
            state.withLock { $0.statistics.unroutable += 1 }
            if reportsUnreachable { sender?.enqueue(.unreachable(datagram.to)) }
            return
        }
        let accepted = target.enqueue(.datagram(datagram.bytes, from: datagram.from))
        state.withLock {
            if accepted { $0.statistics.delivered += 1 } else { $0.statistics.dropped += 1 }
        }
    }

    /// Forgets a closed transport's address (unless a newer transport already holds it).
    func remove(_ transport: InMemoryDatagramTransport) {
        state.withLock { state in
            if state.transports[transport.localAddress]?.transport === transport {
                state.transports[transport.localAddress] = nil
            }
        }
    }
}

/// A ``DatagramTransport`` on an ``InMemoryDatagramNetwork``: sends go to the network, arrivals wait in a bounded
/// inbox that the owner pulls on the network's loop, exactly as it pulls a UDP socket.
package final class InMemoryDatagramTransport: DatagramTransport {
    fileprivate enum Item: Sendable {
        case datagram([UInt8], from: SocketAddress)
        case unreachable(SocketAddress)
    }

    private struct State {
        var inbox: [Item] = []
        var head = 0
        var onReadable: (@Sendable () -> Void)?
        /// A readability callback is queued on the loop and has not run yet.
        var scheduled = false
        var closed = false
        var waiting: Int { inbox.count - head }
    }

    /// The network's loop.
    package var loop: EventLoop { network.loop }
    /// The address this transport holds in its network.
    package let localAddress: SocketAddress
    private let network: InMemoryDatagramNetwork
    private let state = Mutex(State())

    fileprivate init(network: InMemoryDatagramNetwork, localAddress: SocketAddress) {
        self.network = network
        self.localAddress = localAddress
    }

    deinit {
        network.remove(self)
    }

    /// Hands the datagram to the network, which delivers (or drops or holds) it; never blocks.
    @discardableResult
    package func send(_ bytes: UnsafeRawBufferPointer, to destination: SocketAddress) throws(DatagramError) -> DatagramSendOutcome {
        guard !state.withLock({ $0.closed }) else { throw DatagramError(.closed, "send on a closed transport") }
        network.send(InMemoryDatagram(from: localAddress, to: destination, bytes: Array(bytes)))
        return .sent
    }

    /// Starts the readability callbacks; anything already in the inbox is announced at once.
    package func start(onReadable: @escaping @Sendable () -> Void) throws(DatagramError) {
        let schedule = try state.withLock { state throws(DatagramError) -> Bool in
            guard !state.closed else { throw DatagramError(.closed, "start on a closed transport") }
            guard state.onReadable == nil else { return false }
            state.onReadable = onReadable
            return claimSchedule(&state)
        }
        if schedule { announce() }
    }

    /// Takes the next item of the inbox.
    package func receive(into buffer: UnsafeMutableRawBufferPointer) -> DatagramInput? {
        let item = state.withLock { state -> Item? in
            guard state.waiting > 0 else { return nil }
            let item = state.inbox[state.head]
            state.head += 1
            if state.head == state.inbox.count {
                state.inbox.removeAll(keepingCapacity: true)
                state.head = 0
            }
            return item
        }
        switch item {
        case nil:
            return nil
        case let .unreachable(address):
            return .unreachable(address)
        case let .datagram(bytes, from):
            let count = min(bytes.count, buffer.count)
            bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
            return .datagram(ReceivedDatagram(count: count, from: from))
        }
    }

    /// Leaves the network and empties the inbox; idempotent.
    package func close() {
        state.withLock { state in
            state.closed = true
            state.onReadable = nil
            state.inbox.removeAll()
            state.head = 0
        }
        network.remove(self)
    }

    /// Puts an arrival in the inbox; `false` when the inbox is full or the transport closed (the arrival is lost).
    @discardableResult
    fileprivate func enqueue(_ item: Item) -> Bool {
        let (accepted, schedule) = state.withLock { state -> (Bool, Bool) in
            guard !state.closed, state.waiting < network.inboxCapacity else { return (false, false) }
            state.inbox.append(item)
            return (true, claimSchedule(&state))
        }
        if schedule { announce() }
        return accepted
    }

    /// Whether the caller should queue a callback: there is input, a callback to run, and none queued yet.
    private func claimSchedule(_ state: inout State) -> Bool {
        guard state.onReadable != nil, state.waiting > 0, !state.scheduled else { return false }
        state.scheduled = true
        return true
    }

    /// Queues one readability callback on the loop; after it, another if input is still waiting (level-triggered,
    /// like epoll on a socket the owner did not drain).
    private func announce() {
        loop.execute { [weak self] in
            guard let self else { return }
            let callback = self.state.withLock { state -> (@Sendable () -> Void)? in
                state.scheduled = false
                return state.onReadable
            }
            callback?()
            if self.state.withLock({ self.claimSchedule(&$0) }) { self.announce() }
        }
    }
}
