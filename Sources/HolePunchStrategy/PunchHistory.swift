public import HolePunchNet
public import Foundation

/// A failure to load or save a ``PunchHistory`` file.
public struct PunchHistoryError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure. Extensible: new codes are new static members.
    public struct Code: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
        /// The stable name.
        public var rawValue: String
        /// Wraps a name.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The raw value.
        public var description: String { rawValue }
        /// The file could not be read.
        public static let unreadable = Code(rawValue: "unreadable")
        /// The file is not a history document (bad JSON or wrong shape).
        public static let malformed = Code(rawValue: "malformed")
        /// The file was written by a newer format version.
        public static let unsupportedVersion = Code(rawValue: "unsupportedVersion")
        /// The file could not be written.
        public static let unwritable = Code(rawValue: "unwritable")
    }

    /// What kind of failure.
    public var code: Code
    /// What happened.
    public var message: String
    /// The file involved.
    public var path: String
    /// The underlying error's description, when there was one.
    public var cause: String?

    /// Creates an error.
    public init(code: Code, message: String, path: String, cause: String? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.cause = cause
    }

    /// `path: message (cause)`.
    public var description: String { "\(path): \(message)" + (cause.map { " (\($0))" } ?? "") }
}

/// Outcomes of earlier punches, keyed by NAT pair and by peer, summarised for ``PunchContext``. This is the
/// seed's "adaptive timing from previous attempts". In memory and thread-safe (a lock: every operation is
/// a few dictionary accesses, far too short to be worth an actor hop); optionally persisted as JSON.
public final class PunchHistory: @unchecked Sendable {
    // @unchecked Sendable: all mutable state is `entries`, only touched while holding `lock`.

    /// One recorded punch.
    public struct Record: Sendable, Hashable, Codable {
        /// How it ended.
        public var outcome: PunchOutcome
        /// Our NAT's legacy type then.
        public var localNAT: NATType
        /// The peer's NAT's legacy type then.
        public var remoteNAT: NATType
        /// The peer.
        public var peerID: String
    }

    private struct Document: Codable {
        var version: Int
        var records: [Record]
    }

    /// Current file format version.
    public static let formatVersion = 1

    private let lock = NSLock()
    private var entries: [Record] = []
    /// Most records kept; older ones are dropped first, so memory and file size stay bounded.
    public let capacity: Int

    /// An empty history keeping at most `capacity` records.
    public init(capacity: Int = 10_000) {
        self.capacity = max(1, capacity)
    }

    /// The NAT pair key, e.g. `full_cone/symmetric` (local first).
    public static func pairKey(local: NATType, remote: NATType) -> String { "\(local.rawValue)/\(remote.rawValue)" }

    /// Records one outcome.
    public func record(_ outcome: PunchOutcome, local: NATType, remote: NATType, peerID: String) {
        lock.withLock {
            entries.append(Record(outcome: outcome, localNAT: local, remoteNAT: remote, peerID: peerID))
            if entries.count > capacity { entries.removeFirst(entries.count - capacity) }
        }
    }

    /// Records the outcome of a punch planned with `ctx`.
    public func record(_ outcome: PunchOutcome, for ctx: PunchContext) {
        record(outcome, local: ctx.localNAT.type, remote: ctx.remoteNAT.type, peerID: ctx.peerID)
    }

    /// All records, oldest first.
    public var records: [Record] { lock.withLock { entries } }

    /// Summary over every peer with this NAT pair.
    public func summary(local: NATType, remote: NATType) -> HistorySummary {
        Self.summarise(lock.withLock { entries.filter { $0.localNAT == local && $0.remoteNAT == remote } })
    }

    /// Summary over every punch with this peer.
    public func summary(peerID: String) -> HistorySummary {
        Self.summarise(lock.withLock { entries.filter { $0.peerID == peerID } })
    }

    /// `ctx` with its two history summaries filled in from this history.
    public func fill(_ ctx: PunchContext) -> PunchContext {
        var c = ctx
        c.pairHistory = summary(local: ctx.localNAT.type, remote: ctx.remoteNAT.type)
        c.peerHistory = summary(peerID: ctx.peerID)
        return c
    }

    static func summarise(_ records: [Record]) -> HistorySummary {
        var times: [Duration] = []
        var lastOffset: Int?
        for r in records {
            if case .success(let ttc, _, let offset, _) = r.outcome {
                times.append(ttc)
                lastOffset = offset
            }
        }
        times.sort()
        let median: Duration? = times.isEmpty ? nil
            : times.count % 2 == 1 ? times[times.count / 2]
            : (times[times.count / 2 - 1] + times[times.count / 2]) / 2
        return HistorySummary(attempts: records.count, successes: times.count,
                              medianTimeToConnect: median, lastWinningOffset: lastOffset)
    }

    // MARK: persistence

    /// Writes the history as JSON, atomically.
    public func save(to url: URL) throws(PunchHistoryError) {
        let doc = Document(version: Self.formatVersion, records: records)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            try encoder.encode(doc).write(to: url, options: .atomic)
        } catch {
            throw PunchHistoryError(code: .unwritable, message: "cannot write history", path: url.path,
                                    cause: String(describing: error))
        }
    }

    /// Reads a history written by ``save(to:)``.
    public static func load(from url: URL, capacity: Int = 10_000) throws(PunchHistoryError) -> PunchHistory {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw PunchHistoryError(code: .unreadable, message: "cannot read history", path: url.path,
                                    cause: error.localizedDescription)
        }
        struct VersionProbe: Decodable { var version: Int }
        guard let probe = try? JSONDecoder().decode(VersionProbe.self, from: data) else {
            throw PunchHistoryError(code: .malformed, message: "not a history file (no version)", path: url.path)
        }
        guard probe.version <= formatVersion, probe.version >= 1 else {
            throw PunchHistoryError(code: .unsupportedVersion,
                                    message: "history format \(probe.version) is not supported (max \(formatVersion))",
                                    path: url.path)
        }
        let doc: Document
        do {
            doc = try JSONDecoder().decode(Document.self, from: data)
        } catch {
            throw PunchHistoryError(code: .malformed, message: "malformed history", path: url.path,
                                    cause: String(describing: error))
        }
        let history = PunchHistory(capacity: capacity)
        history.entries = Array(doc.records.suffix(history.capacity))
        return history
    }
}
