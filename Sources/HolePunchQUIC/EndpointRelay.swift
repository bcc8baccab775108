public import HolePunchNet

// The relayed route below QUIC: attaching relay allocations, unwrapping what their servers forward, and sending on
// any route (direct, or wrapped for a relay). See docs/design-notes.md, "The relayed route".
extension Endpoint {
    /// Attaches a relay allocation: from now on every datagram from `framing.server` is relay traffic. Forwarded
    /// data is unwrapped on the event loop and handled as arriving on ``PathRoute/relay(server:peer:)`` (a QUIC
    /// packet, a path probe, or a peer's Initial to our relayed address); the server's own messages (TURN
    /// responses, refreshes) go to ``nonQUICDatagrams`` for the relay client to read. Sends on a relayed route
    /// whose server is this one are wrapped by `framing`. Attaching again for the same server replaces the framing.
    ///
    /// - Throws: ``QUICError`` (`invalidArgument`) when the server's family is not the socket's, or
    ///   (`endpointClosed`).
    public func attachRelay(_ framing: any RelayFraming) throws {
        guard !isClosed else { throw QUICError(.endpointClosed, "the endpoint is closed") }
        guard framing.server.isIPv6 == localAddress.isIPv6 else {
            throw QUICError(.invalidArgument, "cannot reach relay \(framing.server) from a socket bound to \(localAddress)")
        }
        relays[framing.server] = framing
    }

    /// Whether a relay allocation is attached: a peer can then reach this endpoint at its relayed address (a target
    /// punch accepts the initiator's relayed dial by it, `PunchRelay.swift`).
    package var hasRelay: Bool { !relays.isEmpty }

    /// Detaches the relay at `server`: its datagrams are plain datagrams again, and sends on relayed routes through
    /// it are refused (counted in ``EndpointStats/relaySendsRefused``). Connections on such a route stay open: they
    /// move to another validated path, or end at their idle timeout.
    public func detachRelay(server: SocketAddress) {
        relays[server] = nil
    }

    /// A datagram from an attached relay's server: forwarded data is dispatched on its relayed route, anything else
    /// is the relay client's.
    func receiveFromRelay(_ datagram: UnsafeRawBufferPointer, relay: any RelayFraming) {
        guard let (peer, range) = relay.unwrap(datagram),
              range.lowerBound >= 0, range.upperBound <= datagram.count
        else {
            deliverNonQUIC(.datagram(Array(datagram), from: relay.server))
            return
        }
        counters.relayedDatagramsReceived += 1
        dispatch(UnsafeRawBufferPointer(rebasing: datagram[range]), on: .relay(server: relay.server, peer: peer))
    }

    /// Sends `bytes` on `route`: straight to a direct path's address, or wrapped for the peer and sent to the relay
    /// server. Counts what it sent; false when the transport or the framing refused.
    func send(_ bytes: UnsafeRawBufferPointer, on route: PathRoute) -> Bool {
        let outcome: DatagramSendOutcome?
        switch route {
        case .direct(let address):
            outcome = try? transport.send(bytes, to: address)
        case .relay(let server, let peer):
            guard let framed = relays[server]?.wrap(bytes, to: peer) else {
                counters.relaySendsRefused += 1
                counters.sendErrors += 1
                return false
            }
            outcome = try? transport.send(framed, to: server)
            if outcome == .sent { counters.relayedDatagramsSent += 1 }
        }
        guard outcome == .sent else {
            counters.sendErrors += 1
            return false
        }
        counters.datagramsSent += 1
        return true
    }
}
