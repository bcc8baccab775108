internal import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import Logging

/// A node's TURN allocation on its punch socket (issue 15): allocated with the credentials of the rendezvous's
/// ``TURNGrant``, attached to the endpoint as a relay (so a connection can run on `PathRoute.relay`), published as
/// a `relay` candidate, and kept alive with fresh credentials from re-registrations before the old ones expire.
///
/// A failure to allocate (coturn unreachable, wrong credentials, quota) is not a failure of the node: it logs one
/// info line and the node punches only. See docs/relay.md, "The node's allocation".
final class NodeRelay: Sendable {
    /// The relay client; the endpoint's attached framing.
    let client: TURNClient
    /// Our relayed address as a candidate to publish.
    let candidate: Candidate
    /// Our address as the TURN server saw it (the allocation's XOR-MAPPED-ADDRESS), when it said.
    let mapped: SocketAddress?
    private let running: Task<Void, Never>

    private init(client: TURNClient, candidate: Candidate, mapped: SocketAddress?, running: Task<Void, Never>) {
        self.client = client
        self.candidate = candidate
        self.mapped = mapped
        self.running = running
    }

    /// Allocates at the first server of `grant` the punch socket can reach and attaches it to `endpoint`; nil (after
    /// one log line) when there is none or allocation fails. Waits at most `configuration.transactionTimeout` per
    /// request, so a dead server costs a few seconds, never a hang.
    static func start(
        grant: TURNGrant, endpoint: Endpoint, executor: PunchExecutor,
        configuration: TURNAllocation.Configuration = NodeRelay.configuration, logger: Logger
    ) async -> NodeRelay? {
        guard let server = grant.servers.first(where: { $0.isIPv6 == endpoint.localAddress.isIPv6 }) else {
            logger.info("no TURN server of the punch socket's family; punching only", metadata: [
                "relay.servers": "\(grant.servers)",
            ])
            return nil
        }
        let transport = EndpointSTUNTransport(endpoint: endpoint)
        await transport.install(executor: executor, relayServer: server)
        let client = TURNClient(server: server, credentials: grant.credentials, transport: transport,
                                configuration: configuration)
        let running = Task {
            do {
                try await client.run()
            } catch {
                // The allocation failure itself is reported by `allocation()` below; a later one (expiry, server
                // gone) ends the relayed paths, which then move to a direct path or time out.
                logger.info("TURN allocation ended", metadata: ["relay.server": "\(server)", "error": "\(error)"])
            }
        }
        let allocation: TURNClient.Allocation
        do {
            // Stopping the node cancels this wait: the client's task is cancelled, deletes what it has and fails
            // the waiter, so a stop never waits out the transaction timeout.
            allocation = try await withTaskCancellationHandler {
                try await client.allocation()
            } onCancel: {
                running.cancel()
            }
            try await endpoint.attachRelay(client)
        } catch {
            running.cancel()
            await executor.relayDatagrams(from: server, nil)
            transport.finish()
            logger.info("TURN allocation failed; punching only", metadata: [
                "relay.server": "\(server)", "error": "\(error)",
            ])
            return nil
        }
        logger.info("TURN allocation ready", metadata: [
            "relay.server": "\(server)", "relay.address": "\(allocation.relayed)",
        ])
        return NodeRelay(client: client, candidate: Candidate(kind: .relayed, address: allocation.relayed),
                         mapped: allocation.mapped, running: running)
    }

    /// The TURN client's settings for a node: the defaults, with a channel bound to each peer it sends to, so
    /// relayed QUIC packets carry 4 bytes of ChannelData framing instead of a 36-byte Send indication.
    static var configuration: TURNAllocation.Configuration {
        var configuration = TURNAllocation.Configuration()
        configuration.bindsChannels = true
        return configuration
    }

    /// How long before the credentials' expiry a node registers again for fresh ones: coturn checks the expiry on
    /// every Refresh, and the client refreshes a minute before the allocation's lifetime ends.
    static let credentialMargin: Duration = .seconds(120)

    /// When to fetch fresh credentials for `credentials`, from now: `credentialMargin` before their expiry, at least
    /// half their remaining life; nil for credentials that do not say when they expire (static ones).
    static func renewalDelay(for credentials: TURNCredentials, now: Date = Date()) -> Duration? {
        guard let expiry = credentials.restExpiry else { return nil }
        let left = Duration.seconds(Double(expiry) - now.timeIntervalSince1970)
        return max(min(left - credentialMargin, left / 2), .seconds(1))
    }

    /// Most peer addresses one coordinate opens the allocation to (the TURN client holds at most 64 peers).
    static let maxPermissionsPerPunch = 4

    /// Gives `peers`' IPs (a coordinate's candidates) a permission, so that the peer can dial our relayed address;
    /// one IP of each, bounded, each request bounded by the TURN client's transaction timeout.
    func permit(_ peers: [SocketAddress]) async {
        var seen: Set<SocketAddress.IP> = []
        for peer in peers where peer.isIPv6 == client.server.isIPv6 && seen.insert(peer.ip).inserted {
            guard seen.count <= Self.maxPermissionsPerPunch else { break }
            try? await client.createPermission(for: peer)
        }
    }

    /// Deletes the allocation and stops its task.
    func stop(endpoint: Endpoint, executor: PunchExecutor) async {
        await endpoint.detachRelay(server: client.server)
        await client.close()
        running.cancel()
        await executor.relayDatagrams(from: client.server, nil)
    }
}
