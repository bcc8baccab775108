public import HolePunch
import HolePunchSTUN
public import Logging
public import CoreMetrics
public import ServiceLifecycle
public import HolePunchStrategy
public import HolePunchQUIC
public import HolePunchNet
public import HolePunchPortMapping

/// A peer in one object: identity, punch socket, executor, strategy and rendezvous registration.
///
/// ```swift
/// let node = try await HolePunchNode.start(identity: identity, rendezvous: server, rendezvousID: serverID)
/// let connection = try await node.connect(to: peerID)
/// for try await connection in node.incoming { … }
/// await node.stop()
/// ```
///
/// The node punches out to any NodeID it is asked to, and lets others punch in only as its
/// ``Options/admission`` allows: by default nobody, so a stranger on a public rendezvous cannot make it probe.
/// One node serves several protocols: ``Options/alpns`` lists those it accepts, ``connect(to:alpn:)`` picks the
/// one to dial with, and `QUICConnection.alpn` says which one a connection speaks.
///
/// The lower layers stay reachable (``endpoint``, ``executor``, ``rendezvousClient``) for whoever needs them. As a
/// ServiceLifecycle `Service`, ``run()`` keeps the node until graceful shutdown, then stops it.
public actor HolePunchNode: Service {
    /// Settings for a node; every field has a sane default.
    public struct Options: Sendable {
        /// The local address of the punch socket (default: every IPv4 interface, a port the kernel picks).
        public var bind: SocketAddress
        /// The strategy for punches; nil uses `PunchExecutor.Configuration`'s default.
        public var strategy: (any PunchStrategy)?
        /// Who may punch to this node (default ``PunchAdmission/none``: only outgoing connections; pass
        /// ``PunchAdmission/allowList(_:)`` with the NodeIDs you expect, or ``PunchAdmission/any`` for a public
        /// service). Every connection still proves the NodeID the rendezvous named.
        public var admission: PunchAdmission
        /// The application protocols (TLS ALPN) this node speaks; the first is the one ``connect(to:alpn:)`` uses
        /// when none is named. Incoming connections may use any of them. At most 8 names of 1 to 31 bytes
        /// (`EndpointConfiguration.maxALPNs`, `maxALPNLength`); ``start(identity:rendezvous:rendezvousID:options:)``
        /// refuses others with `unsupportedALPN`.
        public var alpns: [String]
        /// LAN addresses to publish besides the observed one (peers behind the same NAT dial them directly);
        /// nil publishes the bind address when it names a specific IP, and the addresses of the host's usable
        /// interfaces when it is a wildcard (`Registration.hostCandidates(of:rendezvous:excluding:)`).
        public var lanAddresses: [SocketAddress]?
        /// Interface addresses never to publish when the node gathers its own (``lanAddresses`` nil): a VPN's, a
        /// management network's.
        public var excludedAddresses: Set<SocketAddress.IP>
        /// How long to wait for the rendezvous to answer a registration or punch request.
        public var requestTimeout: Duration
        /// An overall limit on each punch; nil keeps the strategy's plan.
        public var punchTimeout: Duration?
        /// Where the node and its layers log (info and below).
        public var logger: Logger
        /// Where punch metrics go; nil uses the process's bootstrapped factory.
        public var metricsFactory: (any MetricsFactory)?
        /// Whether to measure this node's NAT (RFC 5780, from the punch socket, against the rendezvous's STUN
        /// server) after registering (default true). It runs in the background: registration never waits for it,
        /// punches before it ends plan with an unknown profile, and the node registers again with the measured one.
        public var discoversNAT: Bool
        /// How often an idle connection sends a keep-alive, so the NATs on its path keep their mappings (and a dead
        /// path is noticed); nil disables them. Keep it below the shortest UDP mapping timeout on the way and below
        /// the 30 s idle timeout. Default `EndpointConfiguration.defaultKeepAliveInterval` (25 s).
        public var keepAliveInterval: Duration? = EndpointConfiguration.defaultKeepAliveInterval
        /// Whether to ask the router for a mapping of the punch socket's port (PCP, NAT-PMP, UPnP-IGD) and publish
        /// it as a `mapped` candidate (default true). It runs beside the registration, never delaying it; the node
        /// registers again when the mapping is granted, refreshed or lost, and deletes it on
        /// ``HolePunchNode/stop()``. Skipped with a loopback rendezvous unless ``portMapper`` names a route
        /// (`PortMapper.forPunchSocket`).
        public var portMapping = true
        /// Bounds, protocols and route for ``portMapping``.
        public var portMapper = PortMapper.Configuration()
        /// Whether to allocate at the rendezvous's TURN server when it grants one (``Registered/turn``), attach the
        /// allocation to the punch socket and publish the relayed address as a `relay` candidate (default true).
        /// A failed allocation is logged once and the node punches only.
        public var usesRelay = true
        /// The TURN client's timers and bounds for the node's allocation (tests shorten them).
        var relayConfiguration = NodeRelay.configuration

        /// Creates options.
        public init(
            bind: SocketAddress = .anyV4(port: 0), strategy: (any PunchStrategy)? = nil,
            admission: PunchAdmission = .none, alpns: [String] = ["holepunch/1"], lanAddresses: [SocketAddress]? = nil,
            requestTimeout: Duration = .seconds(10), punchTimeout: Duration? = nil,
            logger: Logger = Logger(label: "holepunch.node", factory: { _ in SwiftLogNoOpLogHandler() }),
            metricsFactory: (any MetricsFactory)? = nil, discoversNAT: Bool = true,
            excludedAddresses: Set<SocketAddress.IP> = []
        ) {
            self.excludedAddresses = excludedAddresses
            self.bind = bind
            self.strategy = strategy
            self.admission = admission
            self.alpns = alpns
            self.lanAddresses = lanAddresses
            self.requestTimeout = requestTimeout
            self.punchTimeout = punchTimeout
            self.logger = logger
            self.metricsFactory = metricsFactory
            self.discoversNAT = discoversNAT
        }
    }

    /// This node's NodeID (its identity's public key).
    public nonisolated let nodeID: NodeID
    /// The punch socket: rendezvous traffic, probes and QUIC all share it.
    public nonisolated let endpoint: Endpoint
    /// The executor that runs this node's punches.
    public nonisolated let executor: PunchExecutor
    /// The registration at the rendezvous.
    public nonisolated let rendezvousClient: RendezvousClient
    /// Authenticated connections other peers punched to this node (as ``Options/admission`` allowed). The
    /// stream ends when the node stops, and throws ``NodeError`` when the rendezvous connection is lost.
    public nonisolated let incoming: AsyncThrowingStream<QUICConnection, any Error>
    /// What the rendezvous saw at registration: this node's public address among others.
    public nonisolated let registration: Registered

    /// Connections ``incoming`` holds for a reader that has not taken them yet; beyond it the oldest is closed.
    public static let incomingBuffer = 64

    private let options: Options
    private let incomingContinuation: AsyncThrowingStream<QUICConnection, any Error>.Continuation
    private var forwarder: Task<Void, Never>?
    /// Keeps the router mapping published (``Options/portMapping``); cancelled by ``stop()``, which waits for the
    /// mapping's deletion.
    private var portMapping: Task<Void, Never>?
    private var stopped = false
    /// The TURN allocation on the punch socket, when the rendezvous granted one and it succeeded.
    private(set) var relay: NodeRelay?
    private var relayStart: Task<SocketAddress?, Never>?
    private var relayRenewal: Task<Void, Never>?
    private var stopWaiters: [CheckedContinuation<Void, Never>] = []

    private init(
        endpoint: Endpoint, executor: PunchExecutor, client: RendezvousClient, registration: Registered, options: Options
    ) {
        self.nodeID = endpoint.nodeID
        self.endpoint = endpoint
        self.executor = executor
        self.rendezvousClient = client
        self.registration = registration
        self.options = options
        // Bounded: an app that never reads `incoming` must not hold every connection peers punch in.
        (incoming, incomingContinuation) = AsyncThrowingStream.makeStream(
            of: QUICConnection.self, bufferingPolicy: .bufferingNewest(HolePunchNode.incomingBuffer))
    }

    /// Binds the punch socket and registers at the rendezvous; returns once registered.
    ///
    /// - Parameters:
    ///   - identity: this node's identity (`Identity.load(from:)` or `Identity.generate()`).
    ///   - rendezvous: the rendezvous's QUIC address.
    ///   - rendezvousID: the rendezvous's NodeID: the handshake must prove it.
    ///   - options: socket, strategy, admission, protocols, logging.
    /// - Throws: ``NodeError`` `unsupportedALPN`, `bindFailed`, `connectionFailed`, `timeout`, `cancelled` or another
    ///   rendezvous code.
    public static func start(
        identity: Identity, rendezvous: SocketAddress, rendezvousID: NodeID, options: Options = Options()
    ) async throws(NodeError) -> HolePunchNode {
        guard let primary = options.alpns.first else {
            throw NodeError(.unsupportedALPN, "the node needs at least one ALPN")
        }
        if let problem = EndpointConfiguration.alpnProblem(options.alpns) { throw NodeError(.unsupportedALPN, problem) }
        // The executor decides which punched connections to accept, so the endpoint itself accepts none.
        var endpointConfiguration = EndpointConfiguration(identity: identity, acceptPolicy: .none, alpn: primary)
        endpointConfiguration.additionalALPNs = Array(options.alpns.dropFirst())
        endpointConfiguration.keepAliveInterval = options.keepAliveInterval
        let endpoint: Endpoint
        do {
            endpoint = try await Endpoint.bind(options.bind, configuration: endpointConfiguration)
        } catch {
            throw NodeError(.bindFailed, "cannot bind \(options.bind): \(error)")
        }
        var executorConfiguration = PunchExecutor.Configuration()
        if let strategy = options.strategy { executorConfiguration.strategy = strategy }
        let executor = PunchExecutor(endpoint: endpoint, configuration: executorConfiguration, logger: options.logger,
                                     metricsFactory: options.metricsFactory)
        var clientConfiguration = RendezvousClientConfiguration(
            server: rendezvous, serverNodeID: rendezvousID, requestTimeout: options.requestTimeout,
            punchTimeout: options.punchTimeout)
        clientConfiguration.admission = options.admission
        clientConfiguration.backgroundNATDiscovery = options.discoversNAT ? NATDiscovery.Configuration() : nil
        let client = RendezvousClient(executor: executor, configuration: clientConfiguration, logger: options.logger)
        let hosts = options.lanAddresses.map { $0.map { Candidate(kind: .host, address: $0) } }
            ?? Registration.hostCandidates(of: endpoint, rendezvous: rendezvous, excluding: options.excludedAddresses)
        let mapper = options.portMapping
            ? PortMapper.forPunchSocket(endpoint, rendezvous: rendezvous, configuration: options.portMapper,
                                        logger: options.logger) : nil
        // Started before the registration, which never waits for it: the mapping is published by a re-register.
        let firstMapping = mapper.map { mapper in Task { try? await mapper.map() } }
        let registered: Registered
        do {
            registered = try await client.connect(Registration(candidates: hosts))
        } catch {
            // Not cancelled: a router may grant a request already sent, and only a finished `map()` knows what to
            // delete (bounded by `PortMapper.Configuration.upnpBound`).
            _ = await firstMapping?.value
            if let mapper { await mapper.delete() }
            await client.close()
            await executor.shutdown()
            await endpoint.close()
            throw NodeError(error)
        }
        let node = HolePunchNode(endpoint: endpoint, executor: executor, client: client, registration: registered,
                                 options: options)
        await node.forwardIncoming()
        if let mapper, let firstMapping { await node.keepPortMapping(mapper, first: firstMapping) }
        if options.usesRelay, let grant = registered.turn { await node.startRelayInBackground(grant) }
        options.logger.info("node registered", metadata: [
            "node.id": "\(endpoint.nodeID.short)", "node.observed": "\(registered.observedAddress)",
        ])
        return node
    }

    /// Punches to `peer` through the rendezvous and returns the authenticated connection.
    ///
    /// Cancelling the calling task stops the punch (probes, timers, extra sockets) and throws `cancelled`.
    ///
    /// - Parameters:
    ///   - peer: the NodeID to connect to; the connection proves it in the TLS handshake.
    ///   - alpn: the protocol to speak; one of ``Options/alpns``, the first when nil.
    /// - Throws: ``NodeError``: `unknownTarget`, `timeout`, `cancelled`, `peerAuthenticationFailed`, `stopped`…
    public func connect(to peer: NodeID, alpn: String? = nil) async throws(NodeError) -> QUICConnection {
        guard !stopped else { throw NodeError(.stopped, "the node was stopped") }
        if let alpn, !options.alpns.contains(alpn) {
            throw NodeError(.unsupportedALPN, "\(alpn) is not one of this node's protocols \(options.alpns)")
        }
        do {
            return try await rendezvousClient.requestPunch(to: peer, alpn: alpn)
        } catch {
            // stop() cancels the punch or closes the registration under this call: say why, not how.
            if stopped { throw NodeError(.stopped, "the node was stopped during the punch") }
            throw NodeError(error)
        }
    }

    /// Stops the node: running punches are cancelled, the registration closes, ``incoming`` ends and the socket
    /// is released. Connections already handed out close with the socket. Calling it again does nothing.
    public func stop() async {
        guard !stopped else { return }
        stopped = true
        forwarder?.cancel()
        relayStart?.cancel()
        _ = await relayStart?.value
        relayRenewal?.cancel()
        if let relay { await relay.stop(endpoint: endpoint, executor: executor) }
        incomingContinuation.finish()
        // The mapping is deleted (bounded by `PortMapper.Configuration.deleteBound`) before the socket closes.
        portMapping?.cancel()
        await portMapping?.value
        await rendezvousClient.close()
        await executor.shutdown()
        await endpoint.close()
        for waiter in stopWaiters { waiter.resume() }
        stopWaiters.removeAll()
    }

    /// Runs until graceful shutdown (or cancellation), then stops the node: the ServiceLifecycle entry point.
    public func run() async throws {
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                await self.waitUntilStopped()
            } onCancel: {
                Task { await self.stop() }
            }
        } onGracefulShutdown: {
            Task { await self.stop() }
        }
    }

    /// The relayed address this node publishes, once its TURN allocation is ready; nil when the rendezvous granted
    /// none, ``Options/usesRelay`` is off, or allocating failed. Waits for an allocation in progress (bounded by the
    /// TURN client's transaction timeout, 5 s per request).
    public func relayedAddress() async -> SocketAddress? {
        await relayStart?.value
    }

    // MARK: Internals

    /// Allocates in the background, so that a TURN server that does not answer never delays the node's start.
    private func startRelayInBackground(_ grant: TURNGrant) {
        relayStart = Task { await self.startRelay(grant) }
    }

    /// Allocates at the granted TURN server, publishes the relayed address and keeps the credentials fresh; on any
    /// failure the node punches only (NodeRelay logs why, once). Returns the relayed address.
    private func startRelay(_ grant: TURNGrant) async -> SocketAddress? {
        guard let relay = await NodeRelay.start(grant: grant, endpoint: endpoint, executor: executor,
                                                configuration: options.relayConfiguration,
                                                logger: options.logger) else { return nil }
        guard !stopped, !Task.isCancelled else {
            await relay.stop(endpoint: endpoint, executor: executor)
            return nil
        }
        self.relay = relay
        await rendezvousClient.setRelayPermitter { peers in await relay.permit(peers) }
        do {
            _ = try await rendezvousClient.publishRelayed([relay.candidate], mapped: relay.mapped)
        } catch {
            options.logger.info("the rendezvous refused the relayed address", metadata: ["error": "\(error)"])
            return nil
        }
        let client = rendezvousClient
        let logger = options.logger
        relayRenewal = Task {
            var credentials = grant.credentials
            while let delay = NodeRelay.renewalDelay(for: credentials) {
                do { try await Task.sleep(for: delay) } catch { return }
                // Every registration mints fresh credentials; keep-alives carry none.
                guard let fresh = try? await client.publishRelayed([relay.candidate]).turn?.credentials else {
                    logger.info("no fresh TURN credentials; the allocation ends at the old ones' expiry")
                    return
                }
                relay.client.updateCredentials(fresh)
                credentials = fresh
            }
        }
        return relay.candidate.address
    }

    private func waitUntilStopped() async {
        guard !stopped else { return }
        await withCheckedContinuation { stopWaiters.append($0) }
    }

    private func keepPortMapping(_ mapper: PortMapper, first: Task<PortMapping?, Never>) {
        let client = rendezvousClient
        let logger = options.logger
        portMapping = Task { await client.keepPortMapping(mapper, first: first, logger: logger) }
    }

    /// Passes the rendezvous client's punched connections on to ``incoming``; when the client ends before the
    /// node stops, the stream ends with the client's reason.
    private func forwardIncoming() {
        let source = rendezvousClient.incoming
        let sink = incomingContinuation
        let client = rendezvousClient
        forwarder = Task {
            for await connection in source {
                if case .dropped(let oldest) = sink.yield(connection) {
                    await oldest.close(errorCode: 0, reason: "not accepted in time")
                }
            }
            // After stop() the stream is already finished and this changes nothing.
            if let failure = await client.failure {
                sink.finish(throwing: NodeError(failure))
            } else {
                sink.finish()
            }
        }
    }
}
