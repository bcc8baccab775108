public import HolePunchNet

/// Runs ``NATDiscovery`` over real transports.
///
/// It opens ``NATDiscovery/Configuration/allocationSamples`` fresh transports with `makeExtraTransport` for
/// the allocation test (each is a new local socket, hence a new NAT mapping), runs the state machine with a
/// timer on `ContinuousClock`, and closes every transport it opened. The primary transport is the caller's
/// and stays open. Cancelling the task that awaits ``run()`` stops discovery at once: timers and readers are
/// cancelled, extra sockets closed, and ``run()`` throws `CancellationError`.
public struct NATDiscoveryClient: Sendable {
    /// Opens one fresh transport for the allocation test.
    public typealias TransportFactory = @Sendable () async throws -> any STUNTransport

    /// The server's primary address.
    public var server: SocketAddress
    /// The primary transport (for a punch, the endpoint's shared socket).
    public var transport: any STUNTransport
    /// Opens extra transports; `nil` skips the allocation test.
    public var makeExtraTransport: TransportFactory?
    /// Timers and sample counts.
    public var configuration: NATDiscovery.Configuration

    /// Creates a client.
    public init(
        server: SocketAddress,
        transport: any STUNTransport,
        makeExtraTransport: TransportFactory?,
        configuration: NATDiscovery.Configuration = NATDiscovery.Configuration()
    ) {
        self.server = server
        self.transport = transport
        self.makeExtraTransport = makeExtraTransport
        self.configuration = configuration
    }

    /// Discovery over plain UDP sockets bound to `bindAddress` (port 0 for ephemeral); all of them are closed
    /// before this returns.
    public static func discover(
        server: SocketAddress,
        bindAddress: SocketAddress,
        configuration: NATDiscovery.Configuration = NATDiscovery.Configuration()
    ) async throws -> NATBehaviour {
        let primary = try UDPSTUNTransport(binding: bindAddress)
        defer { primary.closeNow() }
        let fresh = SocketAddress(ip: bindAddress.ip, port: 0)
        let client = NATDiscoveryClient(
            server: server, transport: primary,
            makeExtraTransport: { try UDPSTUNTransport(binding: fresh) },
            configuration: configuration
        )
        return try await client.run()
    }

    private enum Event: Sendable {
        case datagram(socket: Int, STUNDatagram)
        case timer(generation: Int)
    }

    /// Runs discovery to the end.
    ///
    /// - Throws: `CancellationError` when the task is cancelled; errors from opening extra transports are not
    ///   thrown (allocation is then reported as unknown).
    public func run() async throws -> NATBehaviour {
        var extras: [any STUNTransport] = []
        if let makeExtraTransport {
            for _ in 0..<configuration.allocationSamples {
                guard !Task.isCancelled, let extra = try? await makeExtraTransport() else { break }
                extras.append(extra)
            }
        }
        if Task.isCancelled {
            for extra in extras { await extra.close() }
            throw CancellationError()
        }
        let transports: [any STUNTransport] = [transport] + extras
        let result = await drive(transports)
        for extra in extras { await extra.close() }
        guard let result else { throw CancellationError() }
        return result
    }

    private func drive(_ transports: [any STUNTransport]) async -> NATBehaviour? {
        var machine = NATDiscovery(server: server, localAddresses: transports.map(\.localAddress), configuration: configuration)
        let (events, sink) = AsyncStream.makeStream(of: Event.self)
        let clock = ContinuousClock()
        let origin = clock.now
        return await withDiscardingTaskGroup { group -> NATBehaviour? in
            defer {
                sink.finish()
                group.cancelAll()
            }
            for (index, transport) in transports.enumerated() {
                let stream = transport.incoming()
                group.addTask {
                    for await datagram in stream { sink.yield(.datagram(socket: index, datagram)) }
                }
            }
            var generation = 0
            var iterator = events.makeAsyncIterator()
            var actions = machine.start(now: .zero)
            while true {
                for action in actions {
                    switch action {
                    case let .send(bytes, to, socket):
                        // A failed send is a lost packet; retransmission and the verdicts already handle loss.
                        try? await transports[socket].send(bytes, to: to)
                    case let .armTimer(at):
                        generation += 1
                        let current = generation
                        group.addTask {
                            guard (try? await clock.sleep(until: origin.advanced(by: at))) != nil else { return }
                            sink.yield(.timer(generation: current))
                        }
                    case let .done(result):
                        return result
                    }
                }
                guard !Task.isCancelled, let event = await iterator.next() else { return nil }
                switch event {
                case let .datagram(socket, datagram):
                    actions = machine.receive(datagram.bytes, from: datagram.from, socket: socket, now: origin.duration(to: clock.now))
                case let .timer(fired) where fired == generation:
                    actions = machine.timerFired(now: origin.duration(to: clock.now))
                case .timer:
                    actions = []
                }
            }
        }
    }
}
