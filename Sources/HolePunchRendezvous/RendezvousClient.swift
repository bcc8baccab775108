public import HolePunch
public import HolePunchSTUN
public import Logging
public import HolePunchNet
public import HolePunchQUIC
import HolePunchStrategy
import Synchronization

/// A peer's side of the rendezvous, on the peer's punch `Endpoint` and its `PunchExecutor`.
///
/// The client dials the rendezvous from the punch socket (so the server sees the punch mapping), opens one
/// control stream, registers and keeps the registration alive. ``requestPunch(to:alpn:)`` asks for a punch and runs
/// it as the initiator; coordinate messages for the target role start punches on their own, announced on
/// ``incomingPunches`` and, once connected, on ``incoming``. Pings are answered and coordinate messages acked
/// at once, which is what lets the server time the clock-free start.
public actor RendezvousClient {
    /// The executor punches run on.
    public nonisolated let executor: PunchExecutor
    /// Connections punched for the target role.
    public nonisolated let incoming: AsyncStream<QUICConnection>
    /// Target-role punches as they start (with live events).
    public nonisolated let incomingPunches: AsyncStream<IncomingPunch>

    let configuration: RendezvousClientConfiguration
    let logger: Logger
    let incomingContinuation: AsyncStream<QUICConnection>.Continuation
    let punchesContinuation: AsyncStream<IncomingPunch>.Continuation
    var connection: QUICConnection?
    var stream: QUICStream?
    /// Work this client started and cancels on close; each entry removes itself when it ends, so a long-lived
    /// client that is asked for many punches does not keep one task per punch forever.
    private var tasks: [UInt64: Task<Void, Never>] = [:]
    private var nextTaskID: UInt64 = 0
    private var nextRequest: UInt64 = 1
    var registerWaiter: CheckedContinuation<Result<Registered, RendezvousError>, Never>?
    /// Counts register calls, so a cancelled one never ends the wait of a newer one that superseded it.
    private var registerGeneration: UInt64 = 0
    var requestWaiters: [UInt64: CheckedContinuation<Result<ReceivedCoordinate, RendezvousError>, Never>] = [:]
    /// A punch request to write right behind the next register, in the same write (``connect(_:coordinatingWith:)``).
    private var pipelinedRequest: ClientMessage?
    /// Pipelined requests whose answer may arrive before anyone waits for it (the register's confirmation comes
    /// first, and the coordinate can follow before ``connect(_:coordinatingWith:)`` resumes), and those answers.
    var pipelinedIDs: Set<UInt64> = []
    var unclaimedAnswers: [UInt64: Result<ReceivedCoordinate, RendezvousError>] = [:]
    var closedReason: RendezvousError?
    private var localNAT: NATProfile = .unknown
    /// The latest registration sent, so that a profile refinement keeps its candidates.
    var lastRegistration = Registration()
    /// `relay` candidates of this node's TURN allocations, added to every registration sent (so that a later
    /// registration, e.g. with a measured NAT profile, keeps them).
    var relayCandidates: [Candidate] = []
    /// Opens this node's TURN allocation to a peer's addresses before it dials our relayed address (set by
    /// `HolePunchNode` when it holds an allocation).
    var relayPermitter: (@Sendable ([SocketAddress]) async -> Void)?
    private var natDiscovery: Task<Result<NATBehaviour, RendezvousError>, Never>?
    /// Target-role coordinate messages received so far.
    public internal(set) var targetCoordinates = 0
    /// Target-role coordinate messages refused so far (by ``RendezvousClientConfiguration/admission``, or because
    /// none of the requester's candidates may be probed).
    public internal(set) var refusedCoordinates = 0
    /// Messages from the rendezvous dropped because they failed validation (`RendezvousMessageLimits`).
    public internal(set) var invalidMessages = 0
    /// The last confirmation from the server.
    public internal(set) var registered: Registered?

    /// Creates a client; nothing is sent until ``connect(_:)``.
    public init(
        executor: PunchExecutor, configuration: RendezvousClientConfiguration,
        logger: Logger = Logger(label: "holepunch.rendezvous.client", factory: { _ in SwiftLogNoOpLogHandler() })
    ) {
        self.executor = executor
        self.configuration = configuration
        self.logger = logger
        (incoming, incomingContinuation) = AsyncStream.makeStream(of: QUICConnection.self)
        // Newest 64: an app that never reads the stream must not make it grow with every punch a peer asks for.
        (incomingPunches, punchesContinuation) = AsyncStream.makeStream(of: IncomingPunch.self, bufferingPolicy: .bufferingNewest(64))
    }

    /// This peer's NodeID.
    public nonisolated var nodeID: NodeID { executor.endpoint.nodeID }

    /// Dials the rendezvous from the punch socket, opens the control stream and registers.
    ///
    /// - Returns: the server's confirmation with the observed (public) address.
    /// - Throws: ``RendezvousError`` `connectionFailed`, `timeout`, `disconnected`, `cancelled` or a refusal code.
    public func connect(_ registration: Registration = Registration()) async throws(RendezvousError) -> Registered {
        guard connection == nil else { return try await register(registration) }
        do {
            let quic = try await executor.endpoint.connect(to: configuration.server, expecting: configuration.serverNodeID,
                                                           options: ConnectOptions(handshakeTimeout: configuration.requestTimeout,
                                                                                   alpn: configuration.alpn,
                                                                                   // The register leaves with our Finished.
                                                                                   returnsBeforeConfirmation: true))
            connection = quic
            stream = try await quic.openStream()
        } catch {
            if Task.isCancelled { throw RendezvousError(.cancelled, "connecting to the rendezvous was cancelled") }
            throw RendezvousError(.connectionFailed, "cannot reach the rendezvous at \(configuration.server): \(error)")
        }
        let reader = Task { await self.readLoop() }
        track(reader)
        let confirmed = try await register(registration)
        track(Task { await self.keepAliveLoop() })
        let discovery = configuration.backgroundNATDiscovery.flatMap { discovery in
            registration.nat == nil ? (configuration.natDiscoveryServer ?? confirmed.stunServer).map { (discovery, $0) } : nil
        }
        if confirmed.stunServers.contains(where: { $0.family != confirmed.observedAddress.family }),
           executor.endpoint.reachableFamilies.count > 1 {
            // Discovery waits for the binding: both read the punch socket's STUN answers.
            track(Task {
                await self.publishOtherFamilyReflexive(confirmed)
                if let (configuration, server) = discovery { self.startNATDiscovery(server: server, configuration: configuration) }
            })
        } else if let (configuration, server) = discovery {
            startNATDiscovery(server: server, configuration: configuration)
        }
        return confirmed
    }

    /// Dials the rendezvous, registers and asks for a punch to `target` in one flight: the punch request is
    /// written right behind the register, on the same stream, so the rendezvous (which handles a stream's
    /// messages in order) coordinates as soon as it has registered this peer, without a round trip between.
    /// A client that is already connected registers again and asks only once that register is confirmed: the
    /// rendezvous would coordinate a request written behind a refused re-register from the earlier registration.
    ///
    /// Cancelling the calling task ends the wait for the coordinate message with `cancelled`.
    ///
    /// - Returns: the server's confirmation and this side's coordinate message (start it with
    ///   ``startPunch(_:alpn:)``).
    /// - Throws: ``RendezvousError``: as ``connect(_:)``, then as ``coordinate(to:)``.
    public func connect(_ registration: Registration = Registration(), coordinatingWith target: NodeID)
        async throws(RendezvousError) -> (registered: Registered, coordinate: ReceivedCoordinate)
    {
        if connection != nil {
            // A refused re-register leaves the earlier registration in force, so a request written behind it would
            // still be coordinated (the target told to punch) while the caller hears only the register's error.
            let confirmed = try await register(registration)
            return (confirmed, try await coordinate(to: target))
        }
        let id = nextRequest
        nextRequest += 1
        pipelinedIDs.insert(id)
        pipelinedRequest = .requestPunch(requestID: id, target: target)
        defer {
            pipelinedIDs.remove(id)
            unclaimedAnswers[id] = nil
        }
        let confirmed: Registered
        do {
            confirmed = try await connect(registration)
        } catch {
            pipelinedRequest = nil
            throw error
        }
        let received = try await awaitCoordinate(id) { _ in }
        return (confirmed, received)
    }

    /// Registers again with new candidates or NAT profile (the NodeID and observed address stay).
    ///
    /// Cancelling the calling task ends the wait at once with `cancelled`.
    ///
    /// - Throws: ``RendezvousError``.
    public func register(_ registration: Registration) async throws(RendezvousError) -> Registered {
        if let closedReason { throw closedReason }
        guard !Task.isCancelled else { throw RendezvousError(.cancelled, "the registration was cancelled") }
        if let nat = registration.nat { localNAT = nat }
        lastRegistration = registration
        registerGeneration += 1
        let generation = registerGeneration
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<Registered, RendezvousError>, Never>) in
                registerWaiter?.resume(returning: .failure(RendezvousError(.protocolViolation, "superseded by a newer register")))
                registerWaiter = continuation
                armTimeout { client in
                    // Only this call's wait: a newer register has its own timeout.
                    guard client.registerGeneration == generation else { return }
                    client.registerWaiter?.resume(returning: .failure(RendezvousError(.timeout, "the rendezvous did not confirm the registration")))
                    client.registerWaiter = nil
                }
                // A pipelined punch request leaves in the same write, so it cannot overtake the register.
                let messages = [ClientMessage.register(withRelayCandidates(registration))] + [pipelinedRequest].compactMap { $0 }
                pipelinedRequest = nil
                Task { await self.send(messages) }
            }
        } onCancel: {
            // Runs on the actor after the waiter above is stored (the body holds the actor until it suspends).
            Task { await self.abandonRegister(generation) }
        }
        let confirmed = try result.get()
        registered = confirmed
        return confirmed
    }

    /// Asks the rendezvous to coordinate a punch to `target` and waits for this side's coordinate message.
    ///
    /// Cancelling the calling task ends the wait at once with `cancelled`.
    ///
    /// - Throws: ``RendezvousError`` (`unknownTarget`, `rateLimited`, `timeout`, `disconnected`, `cancelled`…).
    public func coordinate(to target: NodeID) async throws(RendezvousError) -> ReceivedCoordinate {
        let id = nextRequest
        nextRequest += 1
        return try await awaitCoordinate(id) { client in
            Task { await client.send([.requestPunch(requestID: id, target: target)]) }
        }
    }

    /// Waits for the answer to punch request `id`; `send` runs once the waiter is in place (an answer to a
    /// pipelined request may already be here).
    private func awaitCoordinate(_ id: UInt64, send: @escaping (isolated RendezvousClient) -> Void)
        async throws(RendezvousError) -> ReceivedCoordinate
    {
        if let early = unclaimedAnswers.removeValue(forKey: id) { return try early.get() }
        if let closedReason { throw closedReason }
        guard !Task.isCancelled else { throw RendezvousError(.cancelled, "the punch request was cancelled") }
        let result = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Result<ReceivedCoordinate, RendezvousError>, Never>) in
                requestWaiters[id] = continuation
                armTimeout { client in
                    client.requestWaiters.removeValue(forKey: id)?.resume(returning: .failure(
                        RendezvousError(.timeout, "the rendezvous did not answer the punch request")))
                }
                send(self)
            }
        } onCancel: {
            // Runs on the actor after the waiter above is stored (the body holds the actor until it suspends).
            Task { await self.abandonRequest(id) }
        }
        return try result.get()
    }

    /// Ends the wait of the `generation`th register call, unless a newer call has already superseded it.
    private func abandonRegister(_ generation: UInt64) {
        guard generation == registerGeneration, let waiter = registerWaiter else { return }
        registerWaiter = nil
        waiter.resume(returning: .failure(RendezvousError(.cancelled, "the registration was cancelled")))
    }

    private func abandonRequest(_ id: UInt64) {
        requestWaiters.removeValue(forKey: id)?.resume(returning: .failure(
            RendezvousError(.cancelled, "the punch request was cancelled")))
    }

    /// Starts the punch a coordinate message describes, on the executor; the outcome is reported to the server.
    ///
    /// When none of the peer's candidates may be probed (`CandidateFilter`), nothing starts: the handle fails
    /// at once with `refused`.
    ///
    /// - Parameters:
    ///   - received: the coordinate message, as ``coordinate(to:)`` returned it.
    ///   - alpn: the protocol the initiator dials with; nil uses the endpoint's.
    public func startPunch(_ received: ReceivedCoordinate, alpn: String? = nil) async -> PunchHandle {
        let handle: PunchHandle
        do {
            var options = try options(for: received)
            options.alpn = alpn
            if received.coordinate.role == .target, let permit = relayPermitter {
                // The initiator may dial our relayed address: the allocation forwards only from permitted IPs.
                // Not awaited: a TURN server that stopped answering must not hold the punch back (the initiator's
                // Initial is retransmitted until the permission is there).
                let peers = received.coordinate.candidates.filter { $0.kind != .relayed }.map(\.address)
                Task { await permit(peers) }
            }
            handle = await executor.startPunch(options)
        } catch {
            logger.info("punch refused: no candidate may be probed", metadata: [
                "peer.node": "\(received.coordinate.peer.short)", "session.id": "\(received.coordinate.sessionID)",
            ])
            if received.coordinate.role == .target { refusedCoordinates += 1 }
            handle = .failed(error)
        }
        let session = received.coordinate.sessionID
        track(Task {
            let outcome: String
            switch await handle.result() {
            case .success: outcome = "connected"
            case .failure(let error): outcome = error.code.rawValue
            }
            await self.send(.punchResult(sessionID: session, outcome: outcome))
        })
        return handle
    }

    /// Requests a punch to `target`, runs it as the initiator and returns the authenticated connection.
    ///
    /// Cancelling the calling task cancels the request or the punch (probes, timers and extra sockets stop) and
    /// throws `cancelled`.
    ///
    /// A punch that planned before background discovery ended (unknown profile) and failed is tried once more
    /// when discovery has since measured a profile (``profileRefined(since:after:)``).
    ///
    /// - Parameters:
    ///   - target: the peer's NodeID; the connection proves it in the TLS handshake.
    ///   - alpn: the application protocol to dial with; nil uses the endpoint's.
    /// - Throws: ``RendezvousError``: a rendezvous code (`unknownTarget`, `rateLimited`, `timeout`…) when the
    ///   rendezvous refuses or fails; the punch's code with ``RendezvousError/punch`` set when the punch fails.
    public func requestPunch(to target: NodeID, alpn: String? = nil) async throws(RendezvousError) -> QUICConnection {
        let planned = localNAT
        do throws(RendezvousError) {
            return try await punchOnce(to: target, alpn: alpn)
        } catch {
            guard let punch = error.punch, !Task.isCancelled, await profileRefined(since: planned, after: punch) else {
                throw error
            }
        }
        return try await punchOnce(to: target, alpn: alpn)
    }

    /// One coordinate and one punch; task cancellation cancels either.
    private func punchOnce(to target: NodeID, alpn: String?) async throws(RendezvousError) -> QUICConnection {
        let received = try await coordinate(to: target)
        let handle = await startPunch(received, alpn: alpn)
        let id = handle.id
        let executor = self.executor
        // Also fires at once when the task was cancelled while the punch was being started.
        let result = await withTaskCancellationHandler {
            await handle.result()
        } onCancel: {
            Task { await executor.cancel(id) }
        }
        return try result.mapError { RendezvousError(punch: $0) }.get()
    }

    /// Whether a punch that planned with `planned` and failed with `error` is worth one more attempt: it planned
    /// with an unknown profile while background discovery ran, failed for want of a path (`allPortsFailed`,
    /// `timeout`), and discovery, awaited here, has since measured a profile. Some pairs need it: a NAT that
    /// allocates randomly punches through a port-restricted one only when its side knows to open many sockets.
    public func profileRefined(since planned: NATProfile, after error: PunchError) async -> Bool {
        guard planned == .unknown, error.code == .allPortsFailed || error.code == .timeout,
              let discovery = natDiscovery else { return false }
        guard case .success = await discovery.value else { return false }
        return localNAT != planned
    }

    /// Runs RFC 5780 NAT behaviour discovery from the punch socket against `server` (by default the STUN
    /// responder the rendezvous advertised), and remembers the profile for later punches.
    ///
    /// Extra sockets for the allocation test bind to the punch socket's IP, port 0 (a wildcard punch socket: the
    /// wildcard of the server's family).
    ///
    /// - Throws: ``RendezvousError`` `protocolViolation` when no STUN server is known; `CancellationError`.
    public func discoverNAT(server: SocketAddress? = nil, configuration discovery: NATDiscovery.Configuration = .init())
        async throws -> NATBehaviour
    {
        guard let target = server ?? registered?.stunServer else {
            throw RendezvousError(.protocolViolation, "the rendezvous advertises no STUN responder; pass one")
        }
        let transport = EndpointSTUNTransport(endpoint: executor.endpoint)
        await transport.install(executor: executor)
        defer { transport.finish() }
        let local = executor.endpoint.localAddress
        // A wildcard punch socket may be dual-stack (`::`) while the server is IPv4: the extra sockets are plain
        // single-family ones, so they bind the wildcard of the server's family.
        let wildcard = local.ipBytes.allSatisfy { $0 == 0 }
        let fresh = !wildcard ? SocketAddress(ip: local.ip, port: 0)
            : target.isIPv6 ? SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0) : .anyV4(port: 0)
        let client = NATDiscoveryClient(server: target, transport: transport,
                                        makeExtraTransport: { try UDPSTUNTransport(binding: fresh) },
                                        configuration: discovery)
        let behaviour = try await client.run()
        localNAT = NATProfile(behaviour)
        return behaviour
    }

    /// Starts ``discoverNAT(server:configuration:)`` in the background and, when it ends, registers again with
    /// the measured profile and last allocated port (and the latest registration's candidates), so that punches coordinated from then
    /// on carry it. Returns at once; ``natDiscoveryResult()`` waits for the outcome. A discovery already started
    /// is kept (this call then does nothing).
    ///
    /// Punches may start meanwhile: they plan with the profile known so far (unknown unless registered with one).
    /// Discovery shares the punch socket with them; its mapping tests come last, seconds in, by which time a punch
    /// between easy NATs has long connected.
    public func startNATDiscovery(server: SocketAddress? = nil, configuration discovery: NATDiscovery.Configuration = .init()) {
        guard natDiscovery == nil else { return }
        natDiscovery = Task { () -> Result<NATBehaviour, RendezvousError> in
            let behaviour: NATBehaviour
            do {
                behaviour = try await self.discoverNAT(server: server, configuration: discovery)
            } catch let error as RendezvousError {
                return .failure(error)
            } catch {
                return .failure(RendezvousError(.disconnected, "NAT discovery stopped: \(error)"))
            }
            do throws(RendezvousError) {
                _ = try await self.refineRegistration(with: behaviour)
            } catch {
                return .failure(error)
            }
            return .success(behaviour)
        }
    }

    /// The outcome of the discovery ``startNATDiscovery(server:configuration:)`` (or ``connect(_:)``, with
    /// ``RendezvousClientConfiguration/backgroundNATDiscovery``) started, once it and the registration that
    /// publishes its profile have ended; nil when none was started.
    public func natDiscoveryResult() async -> Result<NATBehaviour, RendezvousError>? {
        await natDiscovery?.value
    }

    /// The NAT profile this client's punches plan with: the registered or discovered one, unknown until either.
    public var natProfile: NATProfile { localNAT }

    /// Registers again with the latest registration's candidates, the measured profile and the last port the NAT
    /// was seen to allocate (discovery's own mappings come after the first registration, so that one's port is stale).
    private func refineRegistration(with behaviour: NATBehaviour) async throws(RendezvousError) -> Registered {
        var update = lastRegistration
        update.nat = NATProfile(behaviour)
        update.lastAllocatedPort = behaviour.evidence.lastAllocatedPort ?? update.lastAllocatedPort
        return try await register(update)
    }

    /// Closes the control connection and ends ``incoming``; running punches continue to their end.
    public func close() async {
        natDiscovery?.cancel()
        fail(RendezvousError(.disconnected, "the client was closed"))
        for task in tasks.values { task.cancel() }
        tasks.removeAll()
        await connection?.close()
    }

    // MARK: Internals

    /// Turns a coordinate message into punch options: which candidates to check, when to start, what to expect.
    ///
    /// Candidate rule: ``CandidateFilter`` (docs/security.md) with the families our endpoint reaches; every
    /// permitted candidate goes into `PunchOptions.candidates`, by priority, for the executor to check in parallel.
    /// `targetHost` and `targetPorts` name the best permitted `srflx` candidate (or the best candidate when none
    /// is `srflx`), with the other permitted ports of its IP after it, for an executor that dials one host.
    ///
    /// - Throws: ``PunchError`` `refused` when no candidate may be probed.
    func options(for received: ReceivedCoordinate) throws(PunchError) -> PunchOptions {
        let coordinate = received.coordinate
        let filter = CandidateFilter(rendezvous: configuration.server, ourObserved: registered?.observedAddress,
                                     families: executor.endpoint.reachableFamilies)
        let usable = filter.permitted(coordinate.candidates)
        guard let best = usable.first(where: { $0.kind == .serverReflexive }) ?? usable.first else {
            throw PunchError(code: .refused, message: "none of the peer's candidates may be probed from here: "
                             + coordinate.candidates.prefix(RendezvousMessageLimits.maxCandidates).map(\.description).joined(separator: ", "))
        }
        // The peer's relayed addresses (the rendezvous accepted them on its own TURN servers) go along for a
        // relay-first dial; the executor never probes them.
        let relayed = coordinate.candidates.filter { $0.kind == .relayed && filter.isProbeable($0.address) }
        let chosen = best.address
        var ports = [chosen.port]
        for candidate in usable where candidate.address.ip == chosen.ip && !ports.contains(candidate.address.port) {
            ports.append(candidate.address.port)
        }
        return PunchOptions(
            targetHost: chosen.host, targetPorts: ports, sessionID: coordinate.sessionID, sessionKey: coordinate.sessionKey,
            punchTime: .at(received.startAt), role: coordinate.role, localNAT: localNAT, remoteNAT: coordinate.peerNAT,
            targetNodeID: coordinate.peer, strategy: configuration.strategy,
            rtt: coordinate.peerRTTMicroseconds.map { .microseconds($0) }, timeout: configuration.punchTimeout,
            candidates: usable + relayed, remoteLastAllocatedPort: coordinate.peerLastAllocatedPort
        )
    }

    /// Keeps `task` until it ends (or the client closes).
    func track(_ task: Task<Void, Never>) {
        nextTaskID += 1
        let id = nextTaskID
        tasks[id] = task
        Task { [weak self] in
            await task.value
            await self?.forget(task: id)
        }
    }

    private func forget(task id: UInt64) { tasks[id] = nil }

    /// Tasks this client is still tracking (for tests: it must not grow with the punches it served).
    var trackedTaskCount: Int { tasks.count }

    private func armTimeout(_ body: @escaping @Sendable (isolated RendezvousClient) -> Void) {
        let limit = configuration.requestTimeout
        // Not kept in `tasks`: it ends by itself after `limit` and does nothing if the waiter is gone.
        Task {
            guard (try? await Task.sleep(for: limit)) != nil else { return }
            body(self)
        }
    }

    /// Why the client stopped, once it has (nil while connected).
    public var failure: RendezvousError? { closedReason }
}
