import HolePunchNet
import HolePunchQUIC

/// The socket set of a birthday punch: extra local sockets beside the endpoint, each with the same identity and
/// protocols, whose probes are routed to the punch that opened them.
extension PunchExecutor {
    /// Opens `count` extra sockets for the punch `id`. They get local socket numbers 1 through `count` (0 is the
    /// endpoint). When one cannot be bound, those already open are closed and the punch fails `invalidOptions`.
    func openExtraSockets(_ count: Int, for options: PunchOptions, punch id: PunchID) async throws(PunchError) -> [Endpoint] {
        var bindAddress = endpoint.localAddress
        bindAddress.port = 0
        let identity = await endpoint.identity
        let alpns = await endpoint.alpns
        var sockets: [Endpoint] = []
        for index in 1...count {
            do {
                // A target's extra sockets accept its peer too: in a birthday punch the initiator dials whichever
                // of our random mappings its probes found.
                let policy: AcceptPolicy = options.role == .target ? admission.policy : .none
                // The same protocols as the main socket: a punch may win on any of its sockets.
                var extraConfiguration = EndpointConfiguration(identity: identity, acceptPolicy: policy, alpn: alpns[0])
                extraConfiguration.additionalALPNs = Array(alpns.dropFirst())
                let extra = try await Endpoint.bind(bindAddress, configuration: extraConfiguration)
                readNonQUICDatagrams(from: extra, socket: index, punch: id)
                if options.role == .target {
                    let admission = self.admission
                    await extra.setHandshakeHintProvider { admission.hints(for: $0) }
                    acceptConnections(from: extra, socket: index)
                }
                sockets.append(extra)
            } catch {
                for socket in sockets { await socket.close() }
                throw PunchError(code: .invalidOptions, message: "cannot open local socket \(index): \(error)")
            }
        }
        return sockets
    }

    /// Closes a punch's extra sockets (never the endpoint), e.g. when it ends before it started.
    func closeExtraSockets(of runtime: PunchRuntime) async {
        for socket in runtime.sockets.dropFirst() { await socket.close() }
    }
}
