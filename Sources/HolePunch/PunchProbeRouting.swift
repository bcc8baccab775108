package import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN

/// Routing what the sockets receive: probes to the punch whose session they name, ICMP errors to the punches
/// that probe the address, accepted connections to the target punch whose session their server name carries;
/// everything else to ``otherDatagrams(_:)`` and ``otherConnections``. The endpoint wiring is here, in one place.
extension PunchExecutor {
    /// Takes over the endpoint's accept policy, handshake hints and the reading of its non-QUIC datagrams, once.
    func installIfNeeded() async {
        guard !installed else { return }
        installed = true
        let admission = self.admission
        await endpoint.setAcceptPolicy(admission.policy)
        await endpoint.setHandshakeHintProvider { admission.hints(for: $0) }
        readNonQUICDatagrams(from: endpoint, socket: 0, punch: nil)
        acceptTask = acceptConnections(from: endpoint, socket: 0)
    }

    /// Hands the punch socket's non-QUIC datagrams from `server` (that are not punch probes) to `handler` rather
    /// than to ``otherDatagrams(_:)``: a relay client's responses, which must not go to whichever STUN client took
    /// that slot last. nil removes the reader. Installs the executor on its endpoint, as ``otherDatagrams(_:)`` does.
    package func relayDatagrams(from server: SocketAddress, _ handler: (@Sendable ([UInt8], SocketAddress) -> Void)?) async {
        relayDatagramHandlers[server] = handler
        await installIfNeeded()
    }

    /// Reads `endpoint`'s non-QUIC datagrams (probes, STUN) and unreachable reports until it closes: one reader
    /// task per socket, not a task per datagram.
    func readNonQUICDatagrams(from endpoint: Endpoint, socket: Int, punch: PunchID?) {
        let received = endpoint.nonQUICDatagrams
        Task { [weak self] in
            for await item in received {
                guard let self else { return }
                switch item {
                case .datagram(let bytes, let from): await self.datagram(bytes, from: from, socket: socket)
                case .unreachable(let address): await self.unreachable(address, punch: punch)
                }
            }
        }
    }

    /// Hands every connection `endpoint` accepts to ``accepted(_:socket:)`` until its stream ends.
    @discardableResult
    func acceptConnections(from endpoint: Endpoint, socket: Int) -> Task<Void, Never> {
        let incoming = endpoint.incoming
        return Task { [weak self] in
            for await connection in incoming {
                guard let self else { return }
                await self.accepted(connection, socket: socket)
            }
        }
    }

    private func datagram(_ bytes: [UInt8], from: SocketAddress, socket: Int) {
        guard let message = try? STUNMessage.decode(bytes),
              let username = message.username,
              let separator = username.firstIndex(of: ":"),
              let id = admission.punch(forSession: String(username[..<separator])),
              let runtime = runtimes[id]
        else {
            if socket == 0 { (relayDatagramHandlers[from] ?? otherDatagramHandler)?(bytes, from) }
            return
        }
        guard let probe = try? PunchProbe.verify(message, bytes: bytes, sessionID: runtime.options.sessionID, credential: runtime.credential),
              probe.senderRole != runtime.options.role.rawValue
        else {
            // Forged, for another key, or our own probe reflected back: ignore.
            return
        }
        // A copy of a genuine probe, replayed from elsewhere or again, proves nothing (see ProbeLedger).
        let fresh = probe.isResponse
            ? runtime.session.ledger.acceptResponse(probe.transactionID, socket: socket, from: from)
            : runtime.session.ledger.acceptRequest(probe.transactionID)
        guard fresh else { return }
        let event: PunchSession.Event = probe.isResponse
            ? .probeResponse(from: from, socket: socket)
            : .probeRequest(from: from, socket: socket)
        apply(runtime, runtime.session.handle(event), replyTo: probe.transactionID)
    }

    private func unreachable(_ address: SocketAddress, punch: PunchID?) {
        if let punch {
            // A report on a punch's own extra socket concerns that punch only; once it has ended (a kept extra
            // socket outlives it), the report concerns no other punch, which probes from different sockets.
            if let runtime = runtimes[punch] { apply(runtime, runtime.session.handle(.unreachable(address))) }
            return
        }
        for runtime in runtimes.values where runtime.session.configuration.candidates.contains(address) {
            apply(runtime, runtime.session.handle(.unreachable(address)))
        }
    }

    /// A handshake from the pinned peer completed on local socket `socket` (0: the endpoint; more: a target's extra
    /// socket in a birthday punch, which must then be the one kept open).
    private func accepted(_ connection: QUICConnection, socket: Int) async {
        // The initiator names the session in the TLS server name, so a late handshake from an earlier session of
        // the same peer can never be mistaken for this one.
        guard let serverName = connection.serverName,
              let session = PunchExecutor.sessionID(fromServerName: serverName),
              let punchID = admission.punch(forSession: session), let runtime = runtimes[punchID],
              runtime.options.role == .target, runtime.options.targetNodeID == connection.peerNodeID
        else {
            otherConnectionsContinuation.yield(connection)
            return
        }
        if await acceptRelayed(runtime, connection: connection) { return }
        let id = runtime.session.acceptedConnectionID()
        runtime.connections[id] = connection
        if runtime.failureAwaitingRelay != nil, runtime.relayed == nil, runtimes[runtime.id] === runtime {
            // Past its punch and waiting for the relayed dial (`awaitRelayedDial`), the target still admits the
            // session's handshakes: one the initiator had under way (a redial) completed now, and the initiator's dial
            // returned at its confirmation. Its session has ended, so it would call this a duplicate and close it,
            // leaving the initiator a dead connection; it is the punch's connection instead.
            stopAwaitingRelayedDial(runtime)
            succeed(runtime, connection: id)
            return
        }
        apply(runtime, runtime.session.handle(.accepted(id: id, socket: socket)))
    }
}
