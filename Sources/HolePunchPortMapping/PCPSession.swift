import Foundation
import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

/// The I/O around one ``PCPMapClient``: a UDP socket of its own toward the gateway's PCP port, and (when the port is
/// free) a socket on 5350 that hears the gateway's ANNOUNCE after a restart.
///
/// `@unchecked Sendable`: the machine is mutated only inside ``drive(_:until:stop:)``, which runs on one dedicated
/// thread at a time because its only caller, the ``PortMapper`` actor, awaits each call before the next.
final class PCPSession: @unchecked Sendable {
    /// How a drive ended.
    enum Outcome: Sendable {
        case mapped(PortMapping, restarted: Bool)
        case failed(PortMappingError)
        case deleted
        /// The bound passed (or the caller stopped) with nothing decided.
        case stopped
    }

    private let socket: UDPDatagramSocket
    private let announceSocket: UDPDatagramSocket?
    private(set) var machine: PCPMapClient
    private var wakeAt: ContinuousClock.Instant?

    /// Opens the sockets; the request socket is bound to our address toward the gateway, so the client address in
    /// each request is the packet's source (otherwise the server answers ADDRESS_MISMATCH).
    init(route: GatewayRoute, internalPort: UInt16, configuration: PCPMapClient.Configuration) throws(PortMappingError) {
        do {
            socket = try UDPDatagramSocket(binding: SocketAddress(ip: route.client, port: 0))
        } catch {
            throw PortMappingError(.local, "cannot open the PCP socket: \(error)", protocol: .pcp)
        }
        // Best effort: another PCP client on this host may hold 5350; then restarts show at the next refresh (epoch).
        announceSocket = try? UDPDatagramSocket(binding: .anyV4(port: PCP.clientPort))
        machine = PCPMapClient(gateway: route.gateway, client: route.client, internalPort: internalPort,
                               configuration: configuration)
    }

    /// Whether ANNOUNCEs can be heard.
    var hearsAnnouncements: Bool { announceSocket != nil }

    /// Starts the mapping and drives it until it is granted, fails, or `deadline` passes.
    func start(until deadline: ContinuousClock.Instant?, stop: StopFlag) -> Outcome {
        let now = ContinuousClock.now
        return drive(machine.start(now: now), until: deadline, stop: stop)
    }

    /// Keeps the mapping: sleeps until the refresh (or an ANNOUNCE), refreshes, and returns the next grant or loss.
    func keep(stop: StopFlag) -> Outcome {
        drive(.wait(wakeAt: machine.mapping?.refreshAt), until: nil, stop: stop)
    }

    /// Deletes the mapping, bounded by the machine's delete bound.
    func delete(stop: StopFlag) -> Outcome {
        drive(machine.delete(now: .now), until: nil, stop: stop)
    }

    /// Applies actions and feeds datagrams and timers to the machine until something is decided.
    private func drive(_ first: PCPMapClient.Action, until deadline: ContinuousClock.Instant?, stop: StopFlag) -> Outcome {
        var action = first
        while true {
            switch action {
            case let .send(bytes, next):
                _ = try? socket.send(bytes, to: machine.server)
                wakeAt = next
            case let .mapped(mapping, restarted, next):
                wakeAt = next
                return .mapped(mapping, restarted: restarted)
            case let .failed(error):
                return .failed(error)
            case .deleted:
                return .deleted
            case let .wait(next):
                if let next { wakeAt = next }
            case .ignored:
                break
            }
            if stop.isSet { return .stopped }
            let now = ContinuousClock.now
            if let deadline, now >= deadline { return .stopped }
            if let wake = wakeAt, now >= wake {
                action = machine.timerFired(now: now)
                continue
            }
            // Wait for a datagram, the machine's timer or the bound, in slices short enough to notice `stop`.
            var limit = now + .milliseconds(50)
            if let wake = wakeAt { limit = min(limit, wake) }
            if let deadline { limit = min(limit, deadline) }
            guard let (bytes, from) = receive(until: limit) else {
                action = .wait(wakeAt: nil)
                continue
            }
            action = machine.received(bytes, from: from, now: .now)
        }
    }

    /// One datagram from either socket, or `nil` at `limit`.
    private func receive(until limit: ContinuousClock.Instant) -> (bytes: [UInt8], from: SocketAddress)? {
        let left = ContinuousClock.now.duration(to: limit)
        let milliseconds = Int32(max(0, min(1000, left.milliseconds)))
        var fds = [pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)]
        if let announceSocket { fds.append(pollfd(fd: announceSocket.fd, events: Int16(POLLIN), revents: 0)) }
        guard poll(&fds, nfds_t(fds.count), milliseconds) > 0 else { return nil }
        for (index, entry) in fds.enumerated() where entry.revents & Int16(POLLIN) != 0 {
            let source = index == 0 ? socket : announceSocket
            if let received = source?.receive(timeoutMilliseconds: 0) { return received }
        }
        return nil
    }
}
