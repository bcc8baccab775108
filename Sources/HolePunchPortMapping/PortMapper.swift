import Foundation
import HolePunchNet
public import Logging

/// Asks the router for a mapping of our socket's port (PCP, then NAT-PMP, then UPnP-IGD), keeps the lease, and
/// deletes it at the end.
///
/// ``map()`` returns the first grant within ``Configuration/firstAnswerBound`` (a few hundred ms: run it alongside a
/// punch, never before it), or a typed error. ``keep(onChange:)`` then refreshes at half the lifetime, maps again
/// when the router restarts (PCP ANNOUNCE, an epoch that went back) or the mapping is lost, and deletes it when the
/// task is cancelled. The mapping is always for our own address toward the gateway, never for another host.
public actor PortMapper {
    /// Bounds and choices.
    public struct Configuration: Sendable {
        /// The longest wait for a PCP or NAT-PMP grant (both together).
        public var firstAnswerBound: Duration = .milliseconds(400)
        /// The longest wait for a UPnP grant, counted from the start too. Longer than the others because an IGD
        /// delays its SSDP answer by a random time up to the search's MX, at least 1 s (UPnP Device Architecture
        /// 1.1 §1.3.3; miniupnpd does so): a shorter bound would miss about half the answers.
        public var upnpBound: Duration = .milliseconds(1500)
        /// The protocols to try, in order of preference.
        public var protocols: [PortMappingProtocol] = PortMappingProtocol.allCases
        /// The lifetime to ask for, in seconds.
        public var requestedLifetime: UInt32 = 7200
        /// Gateway and own address; `nil` reads the default route (``GatewayRoute/discover()``).
        public var route: GatewayRoute?
        /// How long SSDP listens for IGDs (per device type; within `upnpBound`).
        public var upnpDiscovery: Duration = .milliseconds(1100)
        /// How long to wait before mapping again after the mapping was lost and re-mapping failed.
        public var retryAfterLoss: Duration = .seconds(30)
        /// The bound on deleting at the end.
        public var deleteBound: Duration = .seconds(2)
        /// PCP's retransmission settings (RFC 6887 §8.1.1 defaults); its lifetime is `requestedLifetime`.
        public var pcp = PCPMapClient.Configuration()

        /// The defaults.
        public init() {}
    }

    /// One protocol's answer in a ``probe()``: a mapping or why not.
    public struct Answer: Sendable {
        /// The protocol asked.
        public var mappingProtocol: PortMappingProtocol
        /// What it said.
        public var result: Result<PortMapping, PortMappingError>
    }

    private enum Held {
        case pcp(PCPSession)
        case natpmp(NATPMPClient, epoch: UInt32, at: ContinuousClock.Instant)
        case upnp(UPnPClient.Gateway, client: String)
    }

    /// The port mapped: our punch socket's.
    public nonisolated let internalPort: UInt16
    /// The configuration.
    public nonisolated let configuration: Configuration
    private let logger: Logger
    private var route: GatewayRoute?
    private var held: Held?
    /// The mapping held now, if any.
    public private(set) var mapping: PortMapping?
    /// The ``map()`` under way, which later callers wait for.
    private var inFlight: Task<Result<PortMapping, PortMappingError>, Never>?
    /// How many times the router was seen to lose its state and the mapping was made again.
    public private(set) var restarts = 0

    /// Creates a mapper for `internalPort` (our socket's port). Nothing is sent until ``map()``.
    public init(internalPort: UInt16, configuration: Configuration = Configuration(),
                logger: Logger = Logger(label: "holepunch.portmap")) {
        self.internalPort = internalPort
        self.configuration = configuration
        self.logger = logger
    }

    /// Asks for a mapping: the first grant in order of preference (PCP and NAT-PMP within ``Configuration/firstAnswerBound``,
    /// UPnP within ``Configuration/upnpBound``), or an error naming what each protocol said.
    ///
    /// - Throws: ``PortMappingError`` (`.timeout` when nobody answered in time).
    @discardableResult
    public func map() async throws(PortMappingError) -> PortMapping {
        if let mapping { return mapping }
        // One request at a time: a second caller (actor re-entrancy at the awaits below) shares the first one's
        // answer instead of asking the router for a second mapping.
        if let inFlight { return try await inFlight.value.get() }
        let attempt = Task { () async -> Result<PortMapping, PortMappingError> in
            do throws(PortMappingError) { return .success(try await self.firstGrant()) } catch { return .failure(error) }
        }
        inFlight = attempt
        defer { inFlight = nil }
        return try await withTaskCancellationHandler { await attempt.value } onCancel: { attempt.cancel() }.get()
    }

    private func firstGrant() async throws(PortMappingError) -> PortMapping {
        let route = try resolvedRoute()
        let start = ContinuousClock.now
        let deadline = start + configuration.firstAnswerBound
        let upnpDeadline = start + max(configuration.firstAnswerBound, configuration.upnpBound)
        var errors: [PortMappingError] = []
        // SSDP takes its whole delay, so discovery starts at once; mapping through UPnP waits for the others' verdict.
        let upnpDiscovery: Task<Result<UPnPClient.Gateway, PortMappingError>, Never>? =
            configuration.protocols.contains(.upnp) ? Task {
                let delay = min(configuration.upnpDiscovery, configuration.upnpBound)
                return await onDedicatedThread("hp-upnp-discover", until: upnpDeadline) { _ in UPnPClient.discover(delay: delay) }
                    ?? .failure(PortMappingError(.timeout, "no Internet gateway device answered SSDP in time", protocol: .upnp))
            } : nil
        defer { upnpDiscovery?.cancel() }
        for mappingProtocol in configuration.protocols {
            do {
                let granted = try await attempt(mappingProtocol, route: route,
                                                deadline: mappingProtocol == .upnp ? upnpDeadline : deadline,
                                                upnp: upnpDiscovery)
                mapping = granted
                logger.info("port mapped", metadata: [
                    "portmap.protocol": "\(granted.mappingProtocol)", "portmap.external": "\(granted.external)",
                    "portmap.lifetime": "\(granted.lifetimeSeconds)",
                ])
                return granted
            } catch {
                errors.append(error)
            }
        }
        throw Self.summary(errors)
    }

    /// Asks every protocol on its own (no preference, nothing kept): what the router offers, for `nat detect`.
    /// Each mapping granted is deleted again before this returns.
    public func probe() async -> [Answer] {
        var answers: [Answer] = []
        for mappingProtocol in configuration.protocols {
            let single = PortMapper(internalPort: internalPort, configuration: with { $0.protocols = [mappingProtocol] },
                                    logger: logger)
            do {
                answers.append(Answer(mappingProtocol: mappingProtocol, result: .success(try await single.map())))
                await single.delete()
            } catch {
                answers.append(Answer(mappingProtocol: mappingProtocol, result: .failure(error)))
            }
        }
        return answers
    }

    /// Keeps the mapping until the task is cancelled, then deletes it: refreshes at half the lifetime, maps again after
    /// a router restart or a lost lease. `onChange` hears each grant (new, refreshed or made again; `nil`: lost).
    public func keep(onChange: @escaping @Sendable (PortMapping?) -> Void = { _ in }) async {
        while !Task.isCancelled {
            guard let current = mapping, let held else {
                // Lost: try again after a pause (bounded retries, never a tight loop).
                try? await Task.sleep(for: configuration.retryAfterLoss)
                if Task.isCancelled { break }
                if let granted = try? await map() { onChange(granted) }
                continue
            }
            let next = await refresh(current, held)
            if Task.isCancelled { break }
            switch next {
            case let .success((granted, restarted)):
                if restarted { restarts += 1 }
                mapping = granted
                onChange(granted)
            case let .failure(error):
                logger.info("port mapping lost", metadata: ["portmap.error": "\(error)"])
                mapping = nil
                self.held = nil
                onChange(nil)
            }
        }
        await delete()
    }

    /// Deletes the mapping (bounded); afterwards ``map()`` may map again.
    public func delete() async {
        guard let held, let current = mapping else { return }
        self.held = nil
        mapping = nil
        let bound = ContinuousClock.now + configuration.deleteBound
        switch held {
        case let .pcp(session):
            _ = await onDedicatedThread("hp-pcp-delete", until: bound) { session.delete(stop: $0) }
        case let .natpmp(client, _, _):
            _ = await onDedicatedThread("hp-natpmp-delete", until: bound) { [internalPort] stop in
                client.map(internalPort: internalPort, lifetime: 0, deadline: bound, stop: stop)
            }
        case let .upnp(gateway, _):
            _ = await onDedicatedThread("hp-upnp-delete", until: bound) { _ in
                UPnPClient.delete(gateway, externalPort: current.external.port)
            }
        }
        logger.info("port mapping deleted", metadata: ["portmap.protocol": "\(current.mappingProtocol)"])
    }

    // MARK: - Steps

    private func resolvedRoute() throws(PortMappingError) -> GatewayRoute {
        if let route { return route }
        let resolved: GatewayRoute
        if let configured = configuration.route { resolved = configured } else { resolved = try GatewayRoute.discover() }
        // We map only for ourselves: a configured client address must be one this host can bind (nothing is sent).
        do { _ = try UDPDatagramSocket(binding: SocketAddress(ip: resolved.client, port: 0)) } catch {
            throw PortMappingError(.local, "\(SocketAddress(ip: resolved.client, port: 0).host) is not an address of this "
                                   + "host; a mapping is only ever made for ourselves")
        }
        route = resolved
        return resolved
    }

    private func attempt(_ mappingProtocol: PortMappingProtocol, route: GatewayRoute, deadline: ContinuousClock.Instant,
                         upnp: Task<Result<UPnPClient.Gateway, PortMappingError>, Never>?) async throws(PortMappingError) -> PortMapping {
        guard ContinuousClock.now < deadline else {
            throw PortMappingError(.timeout, "no time left in the first-answer bound", protocol: mappingProtocol)
        }
        switch mappingProtocol {
        case .pcp:
            var pcp = configuration.pcp
            pcp.requestedLifetime = configuration.requestedLifetime
            let session = try PCPSession(route: route, internalPort: internalPort, configuration: pcp)
            // The router may still grant what we stopped waiting for: take it back (lifetime 0, bounded by the delete
            // bound) once the exchange's thread is done with the machine, without holding up the caller.
            let takeBack: @Sendable () -> Void = { _ = session.delete(stop: StopFlag()) }
            let outcome = await onDedicatedThread("hp-pcp", until: deadline, late: { _ in takeBack() }) {
                session.start(until: deadline, stop: $0)
            }
            switch outcome {
            case let .mapped(granted, _)?:
                held = .pcp(session)
                return granted
            case let .failed(error)?: throw error
            case .deleted?, .stopped?:
                Thread { takeBack() }.start()
                throw PortMappingError(.timeout, "no PCP answer from \(session.machine.server)", protocol: .pcp)
            case nil:
                // The deadline came first; `late` takes the mapping back when the exchange's thread ends.
                throw PortMappingError(.timeout, "no PCP answer from \(session.machine.server)", protocol: .pcp)
            }
        case .natpmp:
            let client = try NATPMPClient(gateway: route.gateway)
            let lifetime = configuration.requestedLifetime
            let result = await onDedicatedThread("hp-natpmp", until: deadline, late: { [internalPort] late in
                // Granted after we stopped waiting: give it back.
                if case .success = late { _ = client.map(internalPort: internalPort, lifetime: 0, deadline: .now + .seconds(1), stop: StopFlag()) }
            }) { [internalPort] stop in
                client.map(internalPort: internalPort, lifetime: lifetime, deadline: deadline, stop: stop)
            }
            switch result {
            case let .success(grant)?:
                held = .natpmp(client, epoch: grant.epoch, at: .now)
                return PortMapping(mappingProtocol: .natpmp, external: grant.external, internalPort: internalPort,
                                   lifetimeSeconds: believed(grant.lifetime), grantedAt: .now)
            case let .failure(error)?: throw error
            case nil: throw PortMappingError(.timeout, "no NAT-PMP answer within the bound", protocol: .natpmp)
            }
        case .upnp:
            guard let discovery = await upnp?.value else {
                throw PortMappingError(.local, "UPnP discovery was not started", protocol: .upnp)
            }
            let gateway = try discovery.get()
            let client = SocketAddress(ip: route.client, port: 0).host
            let lifetime = configuration.requestedLifetime
            let result = await onDedicatedThread("hp-upnp", until: deadline, late: { late in
                if case let .success(granted) = late { UPnPClient.delete(gateway, externalPort: granted.external.port) }
            }) { [internalPort] _ in
                UPnPClient.map(gateway, internalPort: internalPort, client: client, lifetime: lifetime)
            }
            switch result {
            case let .success(granted)?:
                held = .upnp(gateway, client: client)
                return granted
            case let .failure(error)?: throw error
            case nil: throw PortMappingError(.timeout, "AddPortMapping not answered within the bound", protocol: .upnp)
            }
        }
    }

    /// Waits until the refresh time (PCP: or an ANNOUNCE) and refreshes; the result says whether the router had
    /// lost its state.
    private func refresh(_ current: PortMapping, _ held: Held) async
        -> Result<(PortMapping, restarted: Bool), PortMappingError>
    {
        switch held {
        case let .pcp(session):
            switch await onDedicatedThread("hp-pcp-keep", { session.keep(stop: $0) }) {
            case let .mapped(granted, restarted)?: return .success((granted, restarted))
            case let .failed(error)?: return .failure(error)
            default: return .failure(PortMappingError(.cancelled, "stopped", protocol: .pcp))
            }
        case let .natpmp(client, epoch, at):
            do { try await Task.sleep(until: current.refreshAt) } catch {
                return .failure(PortMappingError(.cancelled, "stopped", protocol: .natpmp))
            }
            let bound = min(current.expiresAt, .now + .seconds(10))
            let lifetime = configuration.requestedLifetime
            let result = await onDedicatedThread("hp-natpmp-keep", until: bound) { [internalPort] stop in
                client.map(internalPort: internalPort, lifetime: lifetime, deadline: bound, stop: stop)
            }
            guard case let .success(grant)? = result else {
                if case let .failure(error)? = result { return .failure(error) }
                return .failure(PortMappingError(.timeout, "refresh not answered", protocol: .natpmp))
            }
            let now = ContinuousClock.now
            // RFC 6886 §3.6: the epoch must advance by at least 7/8 of our elapsed time (less 2 s); otherwise the
            // router restarted, and the refresh just made the mapping again.
            let elapsed = UInt32(clamping: (now - at).components.seconds)
            let restarted = UInt64(grant.epoch) + 2 < UInt64(epoch) + UInt64(elapsed) * 7 / 8
            self.held = .natpmp(client, epoch: grant.epoch, at: now)
            return .success((PortMapping(mappingProtocol: .natpmp, external: grant.external, internalPort: internalPort,
                                         lifetimeSeconds: believed(grant.lifetime), grantedAt: now), restarted))
        case let .upnp(gateway, client):
            do { try await Task.sleep(until: current.refreshAt) } catch {
                return .failure(PortMappingError(.cancelled, "stopped", protocol: .upnp))
            }
            let lifetime = configuration.requestedLifetime
            let result = await onDedicatedThread("hp-upnp-keep", until: .now + .seconds(10)) { [internalPort] _ in
                UPnPClient.map(gateway, internalPort: internalPort, client: client, lifetime: lifetime)
            }
            switch result {
            case let .success(granted)?: return .success((granted, false))
            case let .failure(error)?: return .failure(error)
            case nil: return .failure(PortMappingError(.timeout, "refresh not answered", protocol: .upnp))
            }
        }
    }

    /// A router-granted lifetime as believed: at most `pcp.maximumLifetime` for NAT-PMP as for PCP, so that a liar's
    /// 2^32−1 s still gets refreshed.
    private func believed(_ lifetime: UInt32) -> UInt32 { min(lifetime, configuration.pcp.maximumLifetime) }

    private func with(_ change: (inout Configuration) -> Void) -> Configuration {
        var copy = configuration
        change(&copy)
        return copy
    }

    /// One error for all protocols: refused beats unsupported beats timeout (the most telling answer), and the
    /// message lists each protocol's.
    private static func summary(_ errors: [PortMappingError]) -> PortMappingError {
        let code: PortMappingError.Code =
            errors.contains { $0.code == .refused } ? .refused
            : errors.contains { $0.code == .malformed } ? .malformed
            : errors.allSatisfy { $0.code == .timeout } ? .timeout : .unsupported
        return PortMappingError(code, errors.map(\.description).joined(separator: "; "))
    }
}
