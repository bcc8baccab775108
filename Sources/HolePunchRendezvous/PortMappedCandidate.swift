public import HolePunchNet
public import HolePunchPortMapping
public import HolePunchQUIC
public import Logging

extension Candidate {
    /// The `mapped` candidate a router mapping publishes: the external address, with protocol and lease (the lease
    /// clamped into what a rendezvous accepts, `RendezvousMessageLimits.mappingLifetimeSeconds`).
    public init(mapping: PortMapping) {
        let bounds = RendezvousMessageLimits.mappingLifetimeSeconds
        let lifetime = min(max(mapping.lifetimeSeconds, bounds.lowerBound), bounds.upperBound)
        self.init(kind: .portMapped, address: mapping.external,
                  mapping: Mapping(protocolName: mapping.mappingProtocol.rawValue, lifetimeSeconds: lifetime))
    }
}

extension PortMapper {
    /// A mapper for the punch socket's port, or nil when a router mapping cannot help: with a loopback rendezvous
    /// every peer is on this host (and tests must send nothing past loopback), unless `configuration` names the
    /// route itself; a socket that reaches no IPv4 has no NAT to ask (the clients map IPv4 ports).
    ///
    /// - Parameters:
    ///   - endpoint: the punch socket; its port is mapped.
    ///   - rendezvous: the rendezvous the peer registers at.
    ///   - configuration: bounds and protocols.
    ///   - logger: where the mapper logs.
    public static func forPunchSocket(
        _ endpoint: Endpoint, rendezvous: SocketAddress, configuration: Configuration = Configuration(), logger: Logger
    ) -> PortMapper? {
        if rendezvous.scope == .loopback && configuration.route == nil { return nil }
        guard endpoint.reachableFamilies.contains(.ipv4) else { return nil }
        return PortMapper(internalPort: endpoint.localAddress.port, configuration: configuration, logger: logger)
    }
}

extension RendezvousClient {
    /// Registers again with `mapping` as the one `mapped` candidate (nil withdraws it), keeping the latest
    /// registration's other candidates and profile. A mapping the rendezvous would refuse is not sent, because a
    /// refused register would only cost a round trip: one whose external IP is not the address the rendezvous
    /// observes (the router sits behind another NAT, so the mapping is no door from outside) or one that would
    /// exceed `RendezvousMessageLimits.maxPublishedCandidates`.
    ///
    /// - Returns: whether the registration now carries the mapping (or, for nil, carries none).
    /// - Throws: ``RendezvousError`` when the register fails.
    @discardableResult
    public func publishPortMapping(_ mapping: PortMapping?) async throws(RendezvousError) -> Bool {
        var update = lastRegistration
        update.candidates.removeAll { $0.kind == .portMapped }
        if let mapping {
            let candidate = Candidate(mapping: mapping)
            guard let observed = registered?.observedAddress, CandidateFilter.isPublishable(candidate, observed: observed),
                  update.candidates.count < RendezvousMessageLimits.maxPublishedCandidates else { return false }
            update.candidates.append(candidate)
        }
        guard update != lastRegistration else { return true }
        _ = try await register(update)
        return true
    }

    /// Publishes the mapping `first` grants and keeps it published until the task is cancelled: each refresh,
    /// re-map (router restart) or loss registers again (``publishPortMapping(_:)``); on cancellation the mapper
    /// deletes the mapping before this returns. When `first` grants nothing (no router answered, or it refused),
    /// nothing more is asked: a router that ignored us once is not polled.
    ///
    /// - Parameters:
    ///   - mapper: the mapper `first` ran on.
    ///   - first: the first `PortMapper.map()`, started beside the registration so that it never delays it.
    ///   - logger: where outcomes are logged (info).
    public func keepPortMapping(_ mapper: PortMapper, first: Task<PortMapping?, Never>, logger: Logger) async {
        let firstGrant = await withTaskCancellationHandler { await first.value } onCancel: { first.cancel() }
        // A grant that arrives after cancellation is the mapper's to delete: keep() below does so at once.
        guard let granted = firstGrant else { return }
        await publishLogged(granted, logger: logger)
        let (changes, sink) = AsyncStream.makeStream(of: PortMapping?.self, bufferingPolicy: .bufferingNewest(1))
        async let kept: Void = {
            await mapper.keep(onChange: { sink.yield($0) })
            sink.finish()
        }()
        for await change in changes { await publishLogged(change, logger: logger) }
        await kept
    }

    private func publishLogged(_ mapping: PortMapping?, logger: Logger) async {
        do {
            let published = try await publishPortMapping(mapping)
            logger.info("port mapping published", metadata: [
                "portmap.mapping": "\(mapping.map(\.description) ?? "none")", "portmap.published": "\(published)",
            ])
        } catch {
            logger.info("port mapping not published", metadata: ["portmap.error": "\(error)"])
        }
    }
}
