public import HolePunchNet
import Synchronization

/// A TURN allocation kept alive over a ``STUNTransport``: drives ``TURNAllocation`` with real time, and frames data
/// for the path layer as a `RelayFraming`.
///
/// ``run()`` is the long-running work (it allocates, retransmits, refreshes, and returns after ``close()`` has
/// deleted the allocation); the other methods may be called from any task while it runs. ``withAllocation(server:credentials:transport:configuration:_:)``
/// wraps that in a scope. On a plain socket, data from peers arrives on ``received()``; on the endpoint's socket the
/// endpoint calls ``unwrap(_:)`` itself and hands only control messages to the transport.
public final class TURNClient: RelayFraming, Sendable {
    /// What the server granted.
    public struct Allocation: Hashable, Sendable {
        /// Our relayed address (what peers send to).
        public var relayed: SocketAddress
        /// Our address as the server saw it, when it said.
        public var mapped: SocketAddress?
        /// The granted lifetime, clamped.
        public var lifetime: Duration
    }

    /// Data a peer sent through the relay.
    public struct Received: Hashable, Sendable {
        /// The peer.
        public var peer: SocketAddress
        /// The payload.
        public var payload: [UInt8]
    }

    /// The server's address.
    public let server: SocketAddress
    private let transport: any STUNTransport
    private let clock = ContinuousClock()
    private let origin: ContinuousClock.Instant
    private let state: Mutex<State>
    private let events: AsyncStream<Event>
    private let sink: AsyncStream<Event>.Continuation
    private let data: AsyncStream<Received>
    private let dataSink: AsyncStream<Received>.Continuation

    private enum Event: Sendable {
        case datagram(STUNDatagram)
        case timer(generation: Int)
        case poke
        case close
        /// Actions the machine asked for outside the run loop (a channel bound from `wrap`).
        case perform([TURNAllocation.Action])
    }

    private struct State: ~Copyable {
        var machine: TURNAllocation
        var allocation: Result<Allocation, TURNError>?
        var allocationWaiters: [CheckedContinuation<Allocation, any Error>] = []
        /// Operations whose caller is still there: waiting (a continuation) or about to (nil). A cancelled caller
        /// removes its entry, so its completion, when it comes, is dropped instead of kept.
        var operations: [Int: CheckedContinuation<Void, any Error>?] = [:]
        /// Completions that arrived before their caller waited.
        var results: [Int: Result<Void, TURNError>] = [:]
        var nextOperation = 0
        var ended: TURNError??
    }

    /// Creates a client for an allocation at `server` over `transport` (which the caller owns and closes).
    public init(
        server: SocketAddress,
        credentials: TURNCredentials,
        transport: any STUNTransport,
        configuration: TURNAllocation.Configuration = TURNAllocation.Configuration()
    ) {
        self.server = server
        self.transport = transport
        self.origin = clock.now
        self.state = Mutex(State(machine: TURNAllocation(server: server, credentials: credentials, configuration: configuration)))
        (events, sink) = AsyncStream.makeStream(of: Event.self)
        (data, dataSink) = AsyncStream.makeStream(of: Received.self, bufferingPolicy: .bufferingNewest(256))
    }

    /// Runs `body` with an allocation at `server`, then deletes it. Throws ``TURNError`` when allocation fails.
    public static func withAllocation<T: Sendable>(
        server: SocketAddress,
        credentials: TURNCredentials,
        transport: any STUNTransport,
        configuration: TURNAllocation.Configuration = TURNAllocation.Configuration(),
        _ body: @Sendable (TURNClient) async throws -> T
    ) async throws -> T {
        let client = TURNClient(server: server, credentials: credentials, transport: transport, configuration: configuration)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            do {
                _ = try await client.allocation()
                let result = try await body(client)
                await client.close()
                try await group.waitForAll()
                return result
            } catch {
                await client.close()
                group.cancelAll()
                throw error
            }
        }
    }

    // MARK: RelayFraming

    /// Our relayed address, or `0.0.0.0:0` before the allocation exists.
    public var relayedAddress: SocketAddress {
        state.withLock { $0.machine.relayedAddress } ?? .anyV4(port: 0)
    }

    /// `payload` as ChannelData (bound channel) or a Send indication (permission); nil otherwise. With
    /// `bindsChannels`, a Send indication also starts binding a channel to `peer` (nobody waits for it).
    public func wrap(_ payload: UnsafeRawBufferPointer, to peer: SocketAddress) -> [UInt8]? {
        let now = self.now
        let (framed, bind) = state.withLock { state in
            let framed = state.machine.wrap(payload, to: peer)
            // A STUN message (Send indication) starts with two zero bits; ChannelData with 01.
            guard let first = framed?.first, first & 0xC0 == 0 else { return (framed, [TURNAllocation.Action]()) }
            return (framed, state.machine.bindChannelIfUseful(to: peer, operation: Self.unawaited, now: now))
        }
        if !bind.isEmpty { sink.yield(.perform(bind)) }
        return framed
    }

    /// The operation number of requests nobody waits for: their completion finds no caller and is dropped.
    private static let unawaited = -1

    /// The peer and payload range of forwarded data; nil for control messages.
    public func unwrap(_ datagram: UnsafeRawBufferPointer) -> (peer: SocketAddress, payload: Range<Int>)? {
        state.withLock { $0.machine.unwrap(datagram) }
    }

    /// Refreshes sent and stale-nonce retries so far, for tests and diagnostics.
    package var counters: (refreshes: Int, nonceRetries: Int) {
        state.withLock { ($0.machine.refreshesSent, $0.machine.nonceRetries) }
    }

    /// Operations waited for or completed but not yet collected, for tests (a cancelled one leaves nothing).
    package var operationRecords: Int {
        state.withLock { $0.operations.count + $0.results.count }
    }

    // MARK: Operations

    /// Waits until the allocation exists (or failed).
    ///
    /// - Throws: ``TURNError`` when allocation failed, `CancellationError` when the caller is cancelled.
    public func allocation() async throws -> Allocation {
        try await withCheckedThrowingContinuation { continuation in
            let ready: Result<Allocation, TURNError>? = state.withLock { state in
                if let result = state.allocation { return result }
                if let ended = state.ended { return .failure(ended ?? TURNError(.closed, "the client was closed")) }
                state.allocationWaiters.append(continuation)
                return nil
            }
            if let ready { continuation.resume(with: ready.mapError { $0 as any Error }) }
        }
    }

    /// Installs a permission for `peer`'s IP address (refreshed while the allocation lives).
    ///
    /// - Throws: ``TURNError``.
    public func createPermission(for peer: SocketAddress) async throws {
        try await operation { machine, id, now in machine.createPermission(for: peer, operation: id, now: now) }
    }

    /// Binds a channel to `peer` (refreshed while the allocation lives); data to it then goes as ChannelData.
    ///
    /// - Throws: ``TURNError``.
    public func bindChannel(to peer: SocketAddress) async throws {
        try await operation { machine, id, now in machine.bindChannel(to: peer, operation: id, now: now) }
    }

    /// Sends `payload` to `peer` through the relay.
    ///
    /// - Throws: ``TURNError`` `.closed` when the peer has neither permission nor channel or the allocation ended.
    public func send(_ payload: [UInt8], to peer: SocketAddress) async throws {
        guard let framed = payload.withUnsafeBytes({ wrap($0, to: peer) }) else {
            throw TURNError(.closed, "no permission for \(peer), or no allocation")
        }
        try await transport.send(framed, to: server)
    }

    /// Uses `credentials` for every later request (see ``TURNAllocation/updateCredentials(_:)``).
    public func updateCredentials(_ credentials: TURNCredentials) {
        state.withLock { $0.machine.updateCredentials(credentials) }
    }

    /// Data from peers that arrived on the transport (a plain socket); the newest 256 are buffered. One consumer at a
    /// time: every call returns the same stream, which ends when ``run()`` does.
    public func received() -> AsyncStream<Received> { data }

    /// Deletes the allocation (bounded by the transaction timeout) and makes ``run()`` return.
    public func close() async {
        sink.yield(.close)
    }

    // MARK: Driving

    /// Allocates and keeps the allocation alive until ``close()`` (then returns) or a failure (then throws
    /// ``TURNError``). When the task is cancelled, it sends one deleting Refresh without waiting and throws
    /// `CancellationError`.
    public func run() async throws {
        let incoming = transport.incoming()
        let reader = Task { [sink, server] in
            for await datagram in incoming where datagram.from == server { sink.yield(.datagram(datagram)) }
        }
        var sleeper: Task<Void, Never>?
        defer {
            reader.cancel()
            sleeper?.cancel()
            dataSink.finish()
        }
        var armed: Duration?
        var generation = 0
        var iterator = events.makeAsyncIterator()
        var outcome = await perform(step { $0.start(now: $1) })
        while outcome == nil {
            let deadline = state.withLock { $0.machine.nextDeadline }
            if deadline != armed {
                armed = deadline
                generation += 1
                sleeper?.cancel()
                sleeper = deadline.map { [sink, clock, origin, generation] at in
                    Task {
                        guard (try? await clock.sleep(until: origin.advanced(by: at))) != nil else { return }
                        sink.yield(.timer(generation: generation))
                    }
                }
            }
            guard let event = await iterator.next(), !Task.isCancelled else {
                let goodbye = step { machine, now in machine.deallocate(now: now) }
                for case let .send(bytes) in goodbye { try? await transport.send(bytes, to: server) }
                _ = await perform(goodbye.filter { if case .send = $0 { false } else { true } })
                throw CancellationError()
            }
            switch event {
            case let .datagram(datagram):
                if let (peer, range) = datagram.bytes.withUnsafeBytes({ unwrap($0) }) {
                    dataSink.yield(Received(peer: peer, payload: Array(datagram.bytes[range])))
                } else {
                    outcome = await perform(step { $0.receive(datagram.bytes, now: $1) })
                }
            case let .timer(fired) where fired == generation:
                armed = nil
                outcome = await perform(step { $0.tick(now: $1) })
            case .timer, .poke:
                break
            case .close:
                outcome = await perform(step { $0.deallocate(now: $1) })
            case let .perform(actions):
                outcome = await perform(actions)
            }
        }
        if case let .some(.some(error)) = outcome { throw error }
    }

    private var now: Duration { origin.duration(to: clock.now) }

    private func step(_ body: (inout TURNAllocation, Duration) -> [TURNAllocation.Action]) -> [TURNAllocation.Action] {
        let now = self.now
        return state.withLock { body(&$0.machine, now) }
    }

    private func operation(_ body: (inout TURNAllocation, Int, Duration) -> [TURNAllocation.Action]) async throws {
        let id = state.withLock { state in
            defer { state.nextOperation += 1 }
            state.operations[state.nextOperation] = .some(nil)
            return state.nextOperation
        }
        // The request goes out first; a completion that arrives before the wait below is parked in `results`.
        await perform(step { body(&$0, id, $1) })
        sink.yield(.poke)
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let ready: Result<Void, any Error>? = state.withLock { state in
                    if let result = state.results.removeValue(forKey: id) { return result.mapError { $0 } }
                    if let ended = state.ended {
                        state.operations[id] = nil
                        return .failure(ended ?? TURNError(.closed, "the allocation was deleted"))
                    }
                    // Cancelled before it waited: the handler below found no continuation to resume.
                    guard state.operations[id] != nil else { return .failure(CancellationError()) }
                    state.operations[id] = continuation
                    return nil
                }
                if let ready { continuation.resume(with: ready) }
            }
        } onCancel: {
            let continuation = state.withLock { state in
                state.results[id] = nil
                return state.operations.removeValue(forKey: id) ?? nil
            }
            continuation?.resume(throwing: CancellationError())
        }
    }

    /// Sends and resolves what the machine asked for; returns the end of the allocation when it ended (the inner
    /// nil for a clean deallocation).
    @discardableResult
    private func perform(_ actions: [TURNAllocation.Action]) async -> TURNError?? {
        var end: TURNError??
        for action in actions {
            switch action {
            case let .send(bytes):
                // A failed send is a lost datagram: retransmission and the transaction timeout handle it.
                try? await transport.send(bytes, to: server)
            case let .allocated(relayed, mapped, lifetime):
                let allocation = Allocation(relayed: relayed, mapped: mapped, lifetime: lifetime)
                let waiters = state.withLock { state in
                    state.allocation = .success(allocation)
                    defer { state.allocationWaiters = [] }
                    return state.allocationWaiters
                }
                for waiter in waiters { waiter.resume(returning: allocation) }
            case let .completed(operation, error):
                let result: Result<Void, TURNError> = error.map { .failure($0) } ?? .success(())
                let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                    switch state.operations.removeValue(forKey: operation) {
                    case .some(.some(let waiter)): return waiter
                    case .some(.none): state.results[operation] = result  // The caller is about to wait.
                    case .none: break  // The caller was cancelled: nobody will collect it.
                    }
                    return nil
                }
                waiter?.resume(with: result.mapError { $0 as any Error })
            case let .failed(error):
                end = .some(error)
                finish(error)
            case .deallocated:
                end = .some(nil)
                finish(nil)
            }
        }
        return end
    }

    private func finish(_ error: TURNError?) {
        let (waiters, operations) = state.withLock { state in
            state.ended = .some(error)
            if state.allocation == nil { state.allocation = .failure(error ?? TURNError(.closed, "the client was closed")) }
            defer {
                state.allocationWaiters = []
                state.operations = [:]
            }
            return (state.allocationWaiters, state.operations.values.compactMap { $0 })
        }
        let failure = error ?? TURNError(.closed, "the allocation was deleted")
        for waiter in waiters { waiter.resume(throwing: failure) }
        for operation in operations { operation.resume(throwing: failure) }
    }
}
