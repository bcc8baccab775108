internal import Foundation
import HolePunch
public import HolePunchRendezvous
public import Logging
public import HolePunchQUIC

/// Settings for a ``NATSDirectory``.
public struct NATSDirectoryConfiguration: Sendable {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    public var url: String
    /// Every subject starts with this (several deployments, or tests, can share one NATS).
    public var subjectPrefix: String
    /// The first connection attempt gives up after this long.
    public var connectTimeout: Duration
    /// A routed punch request with no answer after this long fails with `unknownTarget`.
    public var requestTimeout: Duration
    /// After losing NATS, reconnect attempts are this far apart (forever).
    public var reconnectWait: Duration
    /// How often the client pings NATS; two unanswered pings count as a lost connection.
    public var pingInterval: Duration
    /// Messages waiting for delivery per subscription, at most; more are dropped by the library.
    public var pendingMessages: Int
    /// How long to wait before asking again when NATS says no instance subscribes a NodeID: a registration's
    /// subscription reaches NATS (and spreads through a NATS cluster) a moment after the peer was told it is
    /// registered, so an immediate request for it may find no responder yet. Empty: answer `unknownTarget` at once.
    public var noResponderRetries: [Duration]
    /// Routed requests and claims from other instances being handled at once, at most; more are dropped.
    public var maxAnswering: Int

    /// Creates a configuration.
    public init(url: String, subjectPrefix: String = "hp", connectTimeout: Duration = .seconds(2),
                requestTimeout: Duration = .seconds(2), reconnectWait: Duration = .milliseconds(500),
                pingInterval: Duration = .seconds(10), pendingMessages: Int = 10_000,
                noResponderRetries: [Duration] = [.milliseconds(20), .milliseconds(100)], maxAnswering: Int = 1024) {
        self.url = url
        self.subjectPrefix = subjectPrefix
        self.connectTimeout = connectTimeout
        self.requestTimeout = requestTimeout
        self.reconnectWait = reconnectWait
        self.pingInterval = pingInterval
        self.pendingMessages = pendingMessages
        self.noResponderRetries = noResponderRetries
        self.maxAnswering = maxAnswering
    }
}

/// What instances publish on a NodeID's subject (`PREFIX.node.NODEID`).
enum NodeSubjectMessage: Codable, Sendable {
    /// Coordinate a punch to the NodeID (a request: the answer goes to the reply subject).
    case punch(RemotePunchRequest)
    /// `instance` registered the NodeID at `since` (wall-clock ms): an older holder drops it (on a tie, the holder
    /// with the smaller instance id).
    case claim(instance: String, since: Int64)

    /// Decodes untrusted bytes: size-bounded, each field validated (`RemotePunchRequest/validate()`), instance ids
    /// short and printable.
    static func decode(_ data: [UInt8]) throws(RendezvousError) -> NodeSubjectMessage {
        guard data.count <= RendezvousFraming.maximumFrame else {
            throw RendezvousError(.protocolViolation, "cluster message of \(data.count) bytes")
        }
        let message = try RendezvousFraming.decode(NodeSubjectMessage.self, from: data)
        if case .claim(let instance, _) = message {
            try NATSDirectory.checkInstanceID(instance)
        }
        return message
    }
}

/// A `RendezvousDirectory` on NATS: the registry of which instance holds which NodeID is NATS's own subject
/// interest.
///
/// - Each held NodeID is a subscription to `PREFIX.node.NODEID`. A punch request for a NodeID not held locally is
///   a request on that subject; the holding instance answers (NATS routes it, whichever server the instances use).
/// - A new registration publishes a claim on the same subject: an instance still holding the NodeID from an older
///   registration drops it (the peer moved), so only the newest instance answers.
/// - Replies come back on `PREFIX.reply.INSTANCE.SEQ`, one wildcard subscription per instance.
/// - After NATS comes back, the library re-subscribes by itself and this re-publishes every claim.
///
/// Every payload from NATS is untrusted: size-bounded and validated like peer input before anything uses it.
public final class NATSDirectory: RendezvousDirectory, @unchecked Sendable {
    // @unchecked Sendable: every mutable field is guarded by `lock`; the NATS objects are thread-safe.

    /// This instance's random id (in claims and reply subjects).
    public let instanceID: String
    private let configuration: NATSDirectoryConfiguration
    private let logger: Logger
    private let lock = NSLock()
    private var connection: NATSConnection?
    private var replies: NATSSubscription?
    private var server: RendezvousServer?
    private var subscriptions: [NodeID: NATSSubscription] = [:]
    private var pending: [UInt64: CheckedContinuation<Result<RemotePunchReply, RendezvousError>, Never>] = [:]
    /// Each pending request's timeout, cancelled when its answer comes first.
    private var timers: [UInt64: Task<Void, Never>] = [:]
    private var nextRequest: UInt64 = 1
    private var answering = 0
    private var dropped = 0
    private var reconnects = 0
    private var noResponders = 0

    /// Connects to NATS and subscribes this instance's reply subject.
    ///
    /// - Throws: `RendezvousError` `connectionFailed` with a one-line reason when NATS cannot be reached.
    public static func connect(_ configuration: NATSDirectoryConfiguration,
                               logger: Logger = Logger(label: "holepunch.cluster", factory: { _ in SwiftLogNoOpLogHandler() })
    ) throws(RendezvousError) -> NATSDirectory {
        let directory = NATSDirectory(configuration: configuration, logger: logger)
        try directory.start()
        return directory
    }

    private init(configuration: NATSDirectoryConfiguration, logger: Logger) {
        var generator = SystemRandomNumberGenerator()
        self.instanceID = String(generator.next(), radix: 16)
        self.configuration = configuration
        self.logger = logger
    }

    private func start() throws(RendezvousError) {
        let events = NATSEvents(
            message: { [weak self] in self?.received($0) },
            reconnected: { [weak self] in self?.reconnected() },
            disconnected: { [weak self] in self?.logger.info("nats disconnected") })
        let connection = try NATSConnection(
            url: configuration.url, name: "holepunch-rendezvous-\(instanceID)", timeout: configuration.connectTimeout,
            reconnectWait: configuration.reconnectWait, pingInterval: configuration.pingInterval,
            maximumPayload: RendezvousFraming.maximumFrame, events: events)
        let replies = try connection.subscribe(replySubject(), pendingMessages: configuration.pendingMessages)
        lock.withLock {
            self.connection = connection
            self.replies = replies
        }
    }

    /// Counters since start: NATS messages dropped (undecodable, or over ``NATSDirectoryConfiguration/maxAnswering``),
    /// reconnects, and routed requests NATS answered with "no responders" (no instance holds the NodeID).
    public var statistics: (dropped: Int, reconnects: Int, noResponders: Int) {
        lock.withLock { (dropped, reconnects, noResponders) }
    }

    // MARK: RendezvousDirectory

    /// See `RendezvousDirectory/attach(_:)`.
    public func attach(_ server: RendezvousServer) { lock.withLock { self.server = server } }

    /// See `RendezvousDirectory/registered(_:since:)`: subscribes the NodeID's subject and claims it.
    public func registered(_ node: NodeID, since: Int64) {
        let subject = nodeSubject(node)
        let connection: NATSConnection? = lock.withLock {
            guard let connection = self.connection else { return nil }
            if subscriptions[node] == nil {
                do {
                    subscriptions[node] = try connection.subscribe(subject, pendingMessages: configuration.pendingMessages)
                } catch {
                    logger.info("nats subscribe failed", metadata: ["peer.node": "\(node.short)", "error": "\(error)"])
                }
            }
            return connection
        }
        publishClaim(node, since: since, on: connection)
    }

    /// See `RendezvousDirectory/unregistered(_:)`: drops the NodeID's subscription.
    public func unregistered(_ node: NodeID) {
        let gone = lock.withLock { subscriptions.removeValue(forKey: node) }
        _ = gone  // Unsubscribed when released, here, outside the lock.
    }

    /// See `RendezvousDirectory/requestPunch(_:)`: a request on the target's subject, answered by its holder.
    public func requestPunch(_ request: RemotePunchRequest) async throws(RendezvousError) -> RemotePunchReply {
        for wait in configuration.noResponderRetries {
            let result = await ask(request)
            guard case .failure(let error) = result, error == Self.noResponders else { return try result.get() }
            try? await Task.sleep(for: wait)
        }
        return try await ask(request).get()
    }

    /// What a request NATS answered with "no responders" fails with (distinct from the timeout's message).
    private static let noResponders = RendezvousError(.unknownTarget, "no peer is registered at any rendezvous instance under that NodeID")

    /// One request on the target's subject and its answer, the timeout's failure, or "no responders".
    private func ask(_ request: RemotePunchRequest) async -> Result<RemotePunchReply, RendezvousError> {
        let body = RendezvousFraming.frame(NodeSubjectMessage.punch(request)).dropFirst(4)
        let subject = nodeSubject(request.target)
        let timeout = configuration.requestTimeout
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<RemotePunchReply, RendezvousError>, Never>) in
            let (id, connection) = lock.withLock { () -> (UInt64, NATSConnection?) in
                let id = nextRequest
                nextRequest += 1
                pending[id] = continuation
                return (id, self.connection)
            }
            do throws(RendezvousError) {
                guard let connection else { throw RendezvousError(.shuttingDown, "the directory is closed") }
                // While NATS is down the library would buffer the request and deliver it after reconnecting, long
                // after this request timed out: the holder would then coordinate a session nobody joins.
                guard connection.isConnected else {
                    throw RendezvousError(.capacity, "the cluster's NATS is unreachable: peers registered at other instances cannot be reached now")
                }
                try connection.publish(subject, Array(body), reply: replySubject(id))
            } catch {
                resolve(id, .failure(error))
                return
            }
            let timer = Task {
                guard (try? await Task.sleep(for: timeout)) != nil else { return }
                self.resolve(id, .failure(RendezvousError(.unknownTarget,
                    "no peer \(request.target) is registered at any rendezvous instance (no answer in \(timeout))")))
            }
            // The answer may already have come: then the timer has nothing left to do.
            let answered = lock.withLock { () -> Bool in
                guard pending[id] != nil else { return true }
                timers[id] = timer
                return false
            }
            if answered { timer.cancel() }
        }
        return result
    }

    /// See `RendezvousDirectory/close()`: unsubscribes everything and closes the NATS connection.
    public func close() async {
        let (waiting, held) = lock.withLock { () -> ([CheckedContinuation<Result<RemotePunchReply, RendezvousError>, Never>], [Any]) in
            let waiting = Array(pending.values)
            pending.removeAll()
            for timer in timers.values { timer.cancel() }
            timers.removeAll()
            let held: [Any] = Array(subscriptions.values) + [replies as Any, connection as Any]
            subscriptions.removeAll()
            replies = nil
            connection = nil
            server = nil
            return (waiting, held)
        }
        for continuation in waiting {
            continuation.resume(returning: .failure(RendezvousError(.shuttingDown, "the directory is closed")))
        }
        _ = held  // Subscriptions, then the connection, are released here, outside the lock.
    }

    // MARK: Incoming

    private func received(_ message: NATSMessage) {
        let replyPrefix = replySubject() .dropLast(1)
        if message.subject.hasPrefix(replyPrefix) {
            guard let id = UInt64(message.subject.dropFirst(replyPrefix.count)) else { return countDrop() }
            // An empty reply is NATS saying that no instance subscribes the subject.
            guard !message.data.isEmpty else {
                lock.withLock { noResponders += 1 }
                return resolve(id, .failure(Self.noResponders))
            }
            do {
                guard message.data.count <= RendezvousFraming.maximumFrame else {
                    throw RendezvousError(.protocolViolation, "reply of \(message.data.count) bytes")
                }
                let reply = try RendezvousFraming.decode(RemotePunchReply.self, from: message.data)
                try reply.validate()
                resolve(id, .success(reply))
            } catch {
                countDrop()
                resolve(id, .failure(RendezvousError(.protocolViolation, "the holding instance sent an invalid reply")))
            }
            return
        }
        let nodePrefix = "\(configuration.subjectPrefix).node."
        guard message.subject.hasPrefix(nodePrefix),
              let node = try? NodeID(parsing: String(message.subject.dropFirst(nodePrefix.count))) else { return countDrop() }
        let decoded: NodeSubjectMessage
        do { decoded = try NodeSubjectMessage.decode(message.data) } catch { return countDrop() }
        switch decoded {
        case let .claim(instance, since):
            guard instance != instanceID else { return }
            guard let (server, _) = admit() else { return countDrop() }
            // The server keeps its registration only if strictly newer. Two registrations in the same millisecond
            // would then both be dropped: the larger instance id counts as the newer, the same way at both ends.
            let claimedAt = instance > instanceID || since == .min ? since : since - 1
            Task {
                await server.moved(node, claimedAt: claimedAt)
                self.lock.withLock { self.answering -= 1 }
            }
        case .punch(let request):
            guard request.target == node, let reply = message.reply, Self.isSubject(reply) else { return countDrop() }
            guard let (server, connection) = admit() else { return countDrop() }
            Task {
                let answer = await server.answerRemotePunch(request)
                try? connection.publish(reply, Array(RendezvousFraming.frame(answer).dropFirst(4)))
                self.lock.withLock { self.answering -= 1 }
            }
        }
    }

    private func reconnected() {
        let (server, connection) = lock.withLock {
            reconnects += 1
            return (self.server, self.connection)
        }
        logger.info("nats reconnected")
        guard let server else { return }
        // The library re-subscribed; claims re-published now settle any NodeID registered twice while apart.
        Task {
            for (node, since) in await server.announcedRegistrations() { self.publishClaim(node, since: since, on: connection) }
        }
    }

    /// Blocks until NATS has processed this instance's subscriptions so far (tests: a registration's subject
    /// has interest before something is published on it).
    func flush() throws(RendezvousError) {
        try lock.withLock { connection }?.flush(timeout: configuration.requestTimeout)
    }

    // MARK: Helpers

    private func publishClaim(_ node: NodeID, since: Int64, on connection: NATSConnection?) {
        let body = RendezvousFraming.frame(NodeSubjectMessage.claim(instance: instanceID, since: since)).dropFirst(4)
        do { try connection?.publish(nodeSubject(node), Array(body)) } catch {
            logger.info("nats claim failed", metadata: ["peer.node": "\(node.short)", "error": "\(error)"])
        }
    }

    /// Takes one of the ``NATSDirectoryConfiguration/maxAnswering`` slots for a message that needs the server
    /// (the caller gives it back); nil when all are taken or the directory is closed.
    private func admit() -> (RendezvousServer, NATSConnection)? {
        lock.withLock {
            guard let server, let connection, answering < configuration.maxAnswering else { return nil }
            answering += 1
            return (server, connection)
        }
    }

    private func resolve(_ id: UInt64, _ result: Result<RemotePunchReply, RendezvousError>) {
        let (continuation, timer) = lock.withLock { (pending.removeValue(forKey: id), timers.removeValue(forKey: id)) }
        timer?.cancel()
        continuation?.resume(returning: result)
    }

    private func countDrop() { lock.withLock { dropped += 1 } }

    private func nodeSubject(_ node: NodeID) -> String { "\(configuration.subjectPrefix).node.\(node)" }

    private func replySubject(_ id: UInt64? = nil) -> String {
        "\(configuration.subjectPrefix).reply.\(instanceID).\(id.map(String.init) ?? "*")"
    }

    /// A reply subject from another instance: short, printable, no spaces (NATS refuses the rest anyway).
    package static func isSubject(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 256 && text.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }
    }

    /// Instance ids: 1 to 64 printable characters.
    static func checkInstanceID(_ id: String) throws(RendezvousError) {
        guard id.utf8.count <= 64, isSubject(id) else {
            throw RendezvousError(.protocolViolation, "field instance: not 1 to 64 printable characters")
        }
    }
}
