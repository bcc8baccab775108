import Foundation
import HolePunch
import HolePunchLab
import HolePunchNet
import HolePunchQUIC
import HolePunchRendezvous
import Logging

// `lab peer` and the relay (issue 15, item 5): the target allocates at the lab's coturn and publishes its relayed
// address as a node does; the initiator reports which path the echoed data ended on and when the connection reached
// a direct path. Apart from LabDrivers.swift so that file stays within its size.

/// The first line of a connection that started relayed: the target echoes it and waits for the next stream (sent once
/// the connection moved to a direct path, or the wait for that ended), instead of closing at once.
let labRelayLine = Array("hello through the relay\n".utf8)

/// The line the last exchange carries: the target echoes it and closes at once (the graceful close of issue 18).
let labLastLine = Array("hello through the NAT\n".utf8)

/// `count` bytes of a fixed pattern that no single lost or reordered datagram leaves intact (`lab peer --transfer`).
func labTransferBytes(_ count: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8) }
}

/// Which path a lab connection is on: a connection that started on the relay is relayed while its active route is
/// the relay (the target's `.relay`, or the initiator's dial to the target's relayed address); the first move off it
/// is the time to the direct path.
struct LabPathWatch: Sendable {
    /// The peer's relayed address the initiator dialled; nil when the connection started on a direct path.
    let relayedAddress: SocketAddress?
    /// The first move to a direct route, when it happened; nil if the connection ended first (or never started relayed).
    let toDirect: Task<ContinuousClock.Instant?, Never>

    /// Starts watching `connection`, which connected with `success`.
    static func start(_ connection: QUICConnection, success: PunchSuccess) async -> LabPathWatch {
        guard success.candidate.kind == .relayed else {
            return LabPathWatch(relayedAddress: nil, toDirect: Task { nil })
        }
        let relayed = success.remoteAddress
        let changes = await connection.pathChanges()
        return LabPathWatch(relayedAddress: relayed, toDirect: Task {
            for await change in changes where !Self.isRelayed(change.to, relayedAddress: relayed) {
                return ContinuousClock.now
            }
            return nil
        })
    }

    /// Whether `route` goes through the relay.
    static func isRelayed(_ route: PathRoute, relayedAddress: SocketAddress?) -> Bool {
        if case .relay = route { return true }
        return route.address == relayedAddress
    }

    /// Whether the connection's active path is relayed now.
    func isRelayed(_ connection: QUICConnection) async -> Bool {
        guard let active = await connection.paths().first(where: \.isActive) else { return relayedAddress != nil }
        return Self.isRelayed(active.route, relayedAddress: relayedAddress)
    }

    /// Waits at most `limit` for the move to a direct path; its instant, or nil. Giving up ends the watch (awaiting a
    /// task's value does not end with the waiter's cancellation, so the watch itself is cancelled); a later call
    /// answers at once.
    func directReached(within limit: Duration) async -> ContinuousClock.Instant? {
        let task = toDirect
        return await labWithin(limit) {
            await withTaskCancellationHandler { await task.value } onCancel: { task.cancel() }
        } ?? nil
    }
}

extension LabPeerCommand {
    /// Most bytes `--transfer` sends (4 MiB): the target holds them in memory to echo them.
    static let transferLimit = 4 << 20

    /// The target's allocation: with a grant (the lab's rendezvous runs with `--turn-server`) and the relay not turned
    /// off, allocate on the punch socket and publish the relayed address before reporting ready, so that the
    /// initiator's coordinate carries it. Fields for the `registered` line: `relay` (the relayed address) or
    /// `relay_unavailable` (why the peer punches only, said once).
    static func startRelay(client: RendezvousClient, registered: Registered, enabled: Bool) async
        -> (PublishedRelay?, [String: Any])
    {
        guard enabled else { return (nil, ["relay_unavailable": "turned off (--no-relay)"]) }
        guard let grant = registered.turn else { return (nil, ["relay_unavailable": "no TURN grant from the rendezvous"]) }
        guard let relay = await client.startPublishedRelay(grant, logger: Logger(label: "holepunch.lab.relay")) else {
            return (nil, ["relay_unavailable": "allocation failed or refused at \(grant.servers.map { "\($0)" }); punching only"])
        }
        return (relay, ["relay": "\(relay.address)"])
    }

    /// The path fields of the initiator's result: `path` (`direct`, `relayed` or `relay→direct`), `path_end` (where
    /// the last echo went), `moved`, and `time_to_direct_ms` from the connect call (the connection's own time when
    /// it started direct; absent while it stayed relayed). `relayedAtEnd`: whether the last echo went over the relay,
    /// read while the connection was open (a closed connection has no paths).
    static func pathFields(watch: LabPathWatch, relayedAtEnd relayedNow: Bool, connectCalled: ContinuousClock.Instant,
                           connectedAt: ContinuousClock.Instant) async -> [String: Any]
    {
        let started = watch.relayedAddress != nil
        var fields: [String: Any] = ["path_start": started ? "relayed" : "direct", "path_end": relayedNow ? "relayed" : "direct",
                                     "moved": started && !relayedNow]
        fields["path"] = !started ? "direct" : (relayedNow ? "relayed" : "relay→direct")
        if !started {
            fields["time_to_direct_ms"] = labMilliseconds(connectedAt - connectCalled)
        } else if !relayedNow, let reached = await watch.directReached(within: .seconds(1)) {
            fields["time_to_direct_ms"] = labMilliseconds(reached - connectCalled)
        }
        return fields
    }
}
