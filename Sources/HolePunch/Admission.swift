import HolePunchNet
import HolePunchQUIC
import Synchronization

/// The one table of live punch sessions, and the handshake admission decided from it.
///
/// Every punch holds an entry from the moment its options are accepted (while its strategy plans) until it ends:
/// the executor's caps, duplicate-session check and probe routing read it, and the endpoint's event loop reads it
/// during handshakes to admit the pinned peer of a live target punch, naming that punch's session in its TLS
/// server name, plus the configured others. Because the event loop reads it synchronously, it is a lock, not
/// actor state; the executor is its only writer. (It replaces a session index in the executor with a locked copy
/// here, which had to be kept in step by hand.)
final class Admission: Sendable {
    /// One live session: whose punch it is, whom it admits, how its handshake runs, and the peer addresses its
    /// probes proved.
    private struct Entry {
        /// The punch; nil only for entries made by ``expect(_:session:hints:)`` alone.
        var punch: PunchID?
        var node: NodeID
        /// Set once a target punch runs; nil while its plan is being made, again once it delivered a relayed
        /// connection, and always for an initiator. Only an entry with hints admits a handshake.
        var hints: HandshakeHints?
        var proven: Set<SocketAddress> = []
        /// Cancelled while its plan was being made: it ends as cancelled as soon as the plan arrives.
        var cancelledWhilePreparing = false
    }
    /// The sessions, and an index of the proven addresses to the sessions that proved them: the endpoint asks
    /// ``hints(for:)`` on every handshake datagram until it has hints, so the answer is a lookup, not a scan of
    /// every live session (a thousand of them at once made that scan a visible share of a punch's CPU).
    private struct Table {
        var sessions: [String: Entry] = [:]
        var proving: [SocketAddress: Set<String>] = [:]

        /// Removes `session` and its addresses from the index.
        mutating func remove(_ session: String) {
            guard let entry = sessions.removeValue(forKey: session) else { return }
            for address in entry.proven {
                proving[address]?.remove(session)
                if proving[address]?.isEmpty == true { proving[address] = nil }
            }
        }
    }
    private let table = Mutex(Table())
    /// Which handshakes that belong to no punch are admitted (the executor's `acceptOthers`, kept only here).
    let others: AcceptPolicy

    init(others: AcceptPolicy) { self.others = others }

    /// The accept policy every socket of the executor runs: this table's decision.
    var policy: AcceptPolicy { .decide { self.admits($0) } }

    /// Enters a new session for `punch`, to `node`, unless that would break a cap or the session is live already.
    /// Punches still being prepared count too: preparing awaits the strategy, and starts made meanwhile must not
    /// slip past the caps or start the same session twice.
    func reserve(
        _ session: String, punch: PunchID, node: NodeID, maxPunches: Int, maxPerPeer: Int
    ) throws(PunchError) {
        let refusal: PunchError? = table.withLock { table in
            guard table.sessions.count < maxPunches else {
                return PunchError(code: .tooManyPunches,
                                  message: "\(table.sessions.count) punches are running, the most this executor allows")
            }
            guard table.sessions.values.count(where: { $0.node == node }) < maxPerPeer else {
                return PunchError(code: .tooManyPunches,
                                  message: "\(maxPerPeer) punches to \(node.short) are running already")
            }
            guard table.sessions[session] == nil else {
                return PunchError(code: .invalidOptions, message: "session \(session) is already being punched")
            }
            table.sessions[session] = Entry(punch: punch, node: node)
            return nil
        }
        if let refusal { throw refusal }
    }

    /// The punch that owns `session`, if it is live.
    func punch(forSession session: String) -> PunchID? {
        table.withLock { $0.sessions[session]?.punch }
    }

    /// Marks the punch `punch`, if it is live, as cancelled while preparing; false when it holds no entry.
    func cancelPreparing(_ punch: PunchID) -> Bool {
        table.withLock { table in
            guard let session = table.sessions.first(where: { $0.value.punch == punch })?.key else { return false }
            table.sessions[session]?.cancelledWhilePreparing = true
            return true
        }
    }

    /// Marks every live session as cancelled while preparing (shutdown); running punches are cancelled by the
    /// executor and ignore the mark.
    func cancelAll() {
        table.withLock { table in
            for session in table.sessions.keys { table.sessions[session]?.cancelledWhilePreparing = true }
        }
    }

    /// Whether `session` was cancelled while its plan was being made.
    func wasCancelledWhilePreparing(_ session: String) -> Bool {
        table.withLock { $0.sessions[session]?.cancelledWhilePreparing ?? false }
    }

    /// Admits `node` for `session`; handshakes from addresses its probes prove (``proved(_:session:)``) run with
    /// `hints`. The executor calls it when a target punch starts running.
    func expect(_ node: NodeID, session: String, hints: HandshakeHints) {
        table.withLock { table in
            var entry = table.sessions[session] ?? Entry(punch: nil, node: node)
            entry.node = node
            entry.hints = hints
            table.sessions[session] = entry
        }
    }

    /// A probe of `session` proved that its peer sends from `address`; a no-op for a session that is not a live
    /// target punch.
    func proved(_ address: SocketAddress, session: String) {
        table.withLock { table in
            guard table.sessions[session]?.hints != nil else { return }
            table.sessions[session]?.proven.insert(address)
            table.proving[address, default: []].insert(session)
        }
    }

    /// Admits no more handshakes for `session`, whose punch goes on: a target that delivered its relayed connection
    /// reaches a direct path by moving that connection, never by a second handshake. A handshake admitted now would
    /// be confirmed and then closed as a duplicate, and an initiator that saw the confirmation but not the close
    /// (sent once, on a lossy path) would keep a connection the target dropped.
    func admitsNoMoreHandshakes(session: String) {
        table.withLock { $0.sessions[session]?.hints = nil }
    }

    /// Removes `session`: its punch has ended (or never started).
    func forget(session: String) { table.withLock { $0.remove(session) } }

    /// Hints for a handshake that `address` starts: those of a live target punch whose probes proved that exact
    /// address (IP and port). Asked before the accept policy sees the ClientHello, and the endpoint takes an answer
    /// as vouching for the address (copies, no Retry): so an address merely expected (the IP the rendezvous named),
    /// which anyone can spoof, gets nothing. With two live punches proving one address, either's hints apply.
    func hints(for address: SocketAddress) -> HandshakeHints? {
        table.withLock { table in
            guard let sessions = table.proving[address] else { return nil }
            for session in sessions {
                if let hints = table.sessions[session]?.hints { return hints }
            }
            return nil
        }
    }

    /// Whether the endpoint completes `handshake`: the pinned peer of a live target punch naming its session, or
    /// whatever ``others`` allows.
    func admits(_ handshake: IncomingHandshake) -> Bool {
        if let name = handshake.serverName, let session = PunchExecutor.sessionID(fromServerName: name),
           table.withLock({ table in table.sessions[session].map { $0.hints != nil && $0.node == handshake.nodeID } ?? false }) {
            return true
        }
        switch others {
        case .any: return true
        case .none: return false
        case .allow(let set): return set.contains(handshake.nodeID)
        case .decide(let decide): return decide(handshake)
        }
    }
}
