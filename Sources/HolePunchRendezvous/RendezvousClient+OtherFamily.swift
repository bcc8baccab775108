import HolePunch
import HolePunchNet
import HolePunchSTUN

/// The reflexive address of the family a peer did not register over (issue 14 item 2): one STUN binding from the
/// punch socket to the rendezvous's responder of that family, published as a `srflx` candidate.
extension RendezvousClient {
    /// How many times a binding is sent, and how long each waits for its answer.
    static let otherFamilyAttempts = 3
    static let otherFamilyWait = Duration.milliseconds(500)

    /// Learns the punch socket's reflexive address in every family it reaches but did not register over, from the
    /// STUN servers `confirmed` advertises, and registers again with them as `srflx` candidates. Does nothing when
    /// the socket reaches one family only (the common case) or the server advertises no other family.
    ///
    /// Runs before background NAT discovery, never beside it: both read the punch socket's STUN answers.
    func publishOtherFamilyReflexive(_ confirmed: Registered) async {
        let reach = executor.endpoint.reachableFamilies
        let servers = confirmed.stunServers.filter { $0.family != confirmed.observedAddress.family && reach.contains($0.family) }
        var learned: [Candidate] = []
        for server in servers where !learned.contains(where: { $0.family == server.family }) {
            if let mapped = await binding(to: server), mapped.family == server.family {
                learned.append(Candidate(kind: .serverReflexive, address: mapped))
            }
        }
        guard !learned.isEmpty, !Task.isCancelled else { return }
        var update = lastRegistration
        update.candidates += learned.filter { candidate in !update.candidates.contains { $0.address == candidate.address } }
        do {
            _ = try await register(update)
        } catch {
            logger.info("registering the other family's reflexive address failed", metadata: ["error": "\(error)"])
        }
    }

    /// One STUN binding from the punch socket to `server`, retransmitted; the mapped address, or nil.
    private func binding(to server: SocketAddress) async -> SocketAddress? {
        let transport = EndpointSTUNTransport(endpoint: executor.endpoint)
        await transport.install(executor: executor)
        defer { transport.finish() }
        for _ in 0..<Self.otherFamilyAttempts {
            let request = STUNMessage(.request)
            // A fresh stream per attempt: the wait below ends the previous one.
            let answers = transport.incoming()
            guard let bytes = try? request.encoded(), (try? await transport.send(bytes, to: server)) != nil else { return nil }
            let mapped = await withTaskGroup(of: SocketAddress?.self) { group in
                group.addTask {
                    for await datagram in answers where datagram.from == server {
                        guard let answer = try? STUNMessage.decode(datagram.bytes), answer.transactionID == request.transactionID,
                              answer.messageClass == .successResponse else { continue }
                        return answer.xorMappedAddress ?? answer.mappedAddress
                    }
                    return nil
                }
                group.addTask {
                    try? await Task.sleep(for: Self.otherFamilyWait)
                    return nil
                }
                let first = await group.next() ?? nil
                group.cancelAll()
                return first
            }
            if let mapped { return mapped }
            if Task.isCancelled { return nil }
        }
        return nil
    }
}
