/// The closing state (RFC 9000 §10.2.1) of connections this endpoint closed after their handshake: their
/// CONNECTION_CLOSE datagram, kept for a while under every connection ID they used, so that a peer whose copy was
/// lost hears it again when its next packet arrives instead of retransmitting into silence until its idle timeout.
///
/// Answers are rate-limited as the RFC asks: to the 1st, 2nd, 4th, 8th… packet addressed to a closed connection, at
/// most ``maxAnswers`` times, and only until the entry expires. They go back on the route the packet came from,
/// which for a packet from anywhere but the connection's own path may be a spoofed address: there the close goes
/// only when it is at most three times the packet's size (the RFC's anti-amplification limit), so nobody can make
/// this side reflect more than it received. The table holds at most ``capacity`` connections (the oldest go
/// first), so a burst of closes costs bounded memory: a close datagram (its reason is at most 256 bytes) and a few
/// connection IDs each.
///
/// A value type driven by the endpoint with the current time: tests drive it without sockets.
struct ClosingTable {
    /// Closed connections kept at once.
    static let capacity = 1024
    /// Times one connection's close is sent again.
    static let maxAnswers = 8

    private struct Entry {
        var datagram: [UInt8]
        var cids: [CIDKey]
        /// The path the connection was on when it closed: answers there need no amplification check.
        var route: PathRoute
        var expiry: UInt64
        var packetsSeen = 0
        var answers = 0
    }

    private var entries: [UInt64: Entry] = [:]
    private var owners: [CIDKey: UInt64] = [:]
    /// Entry ids, oldest first.
    private var order: [UInt64] = []
    private var nextID: UInt64 = 0

    /// Connections held now.
    var count: Int { entries.count }

    /// Keeps `datagram` (a CONNECTION_CLOSE) for packets addressed to any of `cids` until `expiry` (monotonic ns);
    /// `route` is the connection's path when it closed.
    mutating func insert(cids: [CIDKey], datagram: [UInt8], route: PathRoute, expiry: UInt64, now: UInt64) {
        guard !cids.isEmpty, !datagram.isEmpty else { return }
        dropExpired(now: now)
        while entries.count >= Self.capacity, let oldest = order.first { remove(oldest) }
        let id = nextID
        nextID &+= 1
        entries[id] = Entry(datagram: datagram, cids: cids, route: route, expiry: expiry)
        for cid in cids { owners[cid] = id }
        order.append(id)
    }

    /// The close to send back for a packet of `size` bytes addressed to `cid` that came on `route`, or nil: not a
    /// closed connection's, expired, too large a reply to an address the connection was not on, or not a packet this
    /// side answers (rate limit).
    mutating func answer(to cid: CIDKey, on route: PathRoute, size: Int, now: UInt64) -> [UInt8]? {
        guard let id = owners[cid], var entry = entries[id] else { return nil }
        guard now < entry.expiry else {
            remove(id)
            return nil
        }
        guard route == entry.route || entry.datagram.count <= 3 * size else { return nil }
        entry.packetsSeen += 1
        let answers = entry.packetsSeen & (entry.packetsSeen - 1) == 0 && entry.answers < Self.maxAnswers
        if answers { entry.answers += 1 }
        entries[id] = entry
        return answers ? entry.datagram : nil
    }

    private mutating func dropExpired(now: UInt64) {
        // Entries expire roughly in insertion order (expiry = close time + a few PTOs), so checking the oldest is
        // enough to keep the table from holding dead entries for long; `answer` checks every entry it finds anyway.
        while let oldest = order.first, let entry = entries[oldest], entry.expiry <= now { remove(oldest) }
    }

    private mutating func remove(_ id: UInt64) {
        guard let entry = entries.removeValue(forKey: id) else { return }
        for cid in entry.cids where owners[cid] == id { owners[cid] = nil }
        if let index = order.firstIndex(of: id) { order.remove(at: index) }
    }
}
