// Over 500 lines on purpose: one state machine whose state (transactions, permissions, channels) is private to
// it; splitting its events, framing and requests over files would widen that state to the whole module.
public import HolePunchNet

/// One TURN allocation (RFC 8656) as a value-type state machine: events in, actions out, no I/O.
///
/// The driver (``TURNClient``, or a test) feeds ``start(now:)``, ``receive(_:now:)`` for STUN messages from the
/// server, ``tick(now:)`` at ``nextDeadline``, and the operations ``createPermission(for:operation:now:)``,
/// ``bindChannel(to:operation:now:)`` and ``deallocate(now:)``, and performs the returned actions. Time is a
/// `Duration` since an origin of the driver's choosing, so tests run on virtual time.
///
/// The machine authenticates with long-term credentials: the first Allocate goes without them, the server's 401
/// brings REALM and NONCE, and every later request carries USERNAME, REALM, NONCE and MESSAGE-INTEGRITY; a 438
/// brings a fresh nonce and the request is retried (a bounded number of times). It refreshes the allocation before
/// its lifetime ends, and every permission and channel before 5 and 10 minutes unless it carried no data for
/// `Configuration.idlePeerLimit` (those lapse, so a long-lived allocation does not run out of its bounded peers); ``wrap(_:to:)``
/// / ``unwrap(_:)`` frame data on the channels and permissions it holds. Everything from the server is bounded:
/// lifetimes are clamped, channel numbers checked, success responses must carry a valid MESSAGE-INTEGRITY, and so
/// must an error that is to end a request at once (see ``receive(_:now:)``).
public struct TURNAllocation: Sendable {
    /// What the driver must do.
    public enum Action: Hashable, Sendable {
        /// Send `bytes` to the server.
        case send([UInt8])
        /// The allocation exists: our relayed address, the server-reflexive address it saw, and the granted lifetime.
        case allocated(relayed: SocketAddress, mapped: SocketAddress?, lifetime: Duration)
        /// Operation `operation` (a permission or a channel) finished; `error` is nil on success.
        case completed(operation: Int, error: TURNError?)
        /// The allocation failed or was lost; the machine has ended.
        case failed(TURNError)
        /// The allocation was deleted on request; the machine has ended.
        case deallocated
    }

    private enum Phase: Hashable, Sendable {
        case idle, allocating, allocated, deallocating, ended
    }

    private enum Request: Hashable, Sendable {
        case allocate
        case refresh(lifetime: UInt32)
        case createPermission([SocketAddress])
        case channelBind(UInt16, SocketAddress)
    }

    private struct Transaction: Sendable {
        var request: Request
        var bytes: [UInt8]
        var firstSent: Duration
        var nextSend: Duration
        var rto: Duration
        var nonceRetries = 0
        /// Whether this transmission carried our credentials (a 401 to one that did means they are wrong).
        var authenticated: Bool
        /// An error answer without valid MESSAGE-INTEGRITY to this authenticated request: anyone who saw the
        /// transaction ID could have sent it, so it counts only if nothing else answers before the timeout.
        var unverifiedError: STUNMessage?
    }

    private struct Permission: Sendable {
        var installed = false
        var refreshAt: Duration = .zero
        var waiting: [Int] = []
        /// Whether data went to or came from the peer (or it was asked for again) since the last refresh.
        var used = false
        /// Since when (about: the refresh before the first idle interval) nothing was used; nil while in use.
        var idleSince: Duration?
    }

    private struct Channel: Sendable {
        var number: UInt16
        var bound = false
        var refreshAt: Duration = .zero
        var waiting: [Int] = []
        /// Whether data went to or came from the peer (or it was asked for again) since the last refresh.
        var used = false
        /// Since when (about: the refresh before the first idle interval) nothing was used; nil while in use.
        var idleSince: Duration?
    }

    /// The server's address (the driver sends every `.send` there and feeds only its datagrams back).
    public let server: SocketAddress
    private var credentials: TURNCredentials
    /// Credentials handed in after the allocation's own were first sent: used only if the server refuses those.
    private var renewed: TURNCredentials?
    private let configuration: Configuration
    private var phase: Phase = .idle
    private var realm: String?
    private var nonce: [UInt8]?
    private var key: STUNCredential?
    private var pending: [STUNTransactionID: Transaction] = [:]
    /// Refresh requests sent to keep the allocation (not counting retransmissions or deletion).
    package private(set) var refreshesSent = 0
    /// Requests retried with a fresh nonce after a 438.
    package private(set) var nonceRetries = 0
    /// Our relayed address once allocated.
    public private(set) var relayedAddress: SocketAddress?
    private var refreshAt: Duration = .zero
    private var expiresAt: Duration = .zero
    private var permissions: [SocketAddress.IP: Permission] = [:]
    private var channels: [SocketAddress: Channel] = [:]
    private var peerByChannel: [UInt16: SocketAddress] = [:]
    private var nextChannel: UInt16 = TURNChannelData.channelRange.lowerBound
    /// Numbers of lapsed channels and when they may name another peer (RFC 8656 12: 5 minutes after the binding
    /// expires on the server).
    private var retiredChannels: [UInt16: Duration] = [:]

    /// Creates a machine for an allocation at `server`.
    public init(server: SocketAddress, credentials: TURNCredentials, configuration: Configuration = Configuration()) {
        self.server = server
        self.credentials = credentials
        self.configuration = configuration
    }

    /// Whether the allocation exists and is usable.
    public var isAllocated: Bool { phase == .allocated }
    /// Whether the machine has ended (failed or deallocated).
    public var hasEnded: Bool { phase == .ended }

    // MARK: Events

    /// Sends the first Allocate (without credentials, to learn the realm and nonce).
    public mutating func start(now: Duration) -> [Action] {
        guard phase == .idle else { return [] }
        phase = .allocating
        return transmit(.allocate, now: now)
    }

    /// Asks for a permission for `peer`'s IP address; `.completed(operation:…)` follows.
    public mutating func createPermission(for peer: SocketAddress, operation: Int, now: Duration) -> [Action] {
        guard phase == .allocated else { return [.completed(operation: operation, error: notAllocated)] }
        if let existing = permissions[peer.ip] {
            permissions[peer.ip]?.used = true
            if existing.installed { return [.completed(operation: operation, error: nil)] }
            permissions[peer.ip]?.waiting.append(operation)
            return []
        }
        guard permissions.count < configuration.maximumPeers else {
            return [.completed(operation: operation, error: TURNError(.limit, "more than \(configuration.maximumPeers) peers"))]
        }
        permissions[peer.ip] = Permission(waiting: [operation])
        return transmit(.createPermission([peer]), now: now)
    }

    /// Binds a channel to `peer` (which also installs its permission); `.completed(operation:…)` follows.
    public mutating func bindChannel(to peer: SocketAddress, operation: Int, now: Duration) -> [Action] {
        guard phase == .allocated else { return [.completed(operation: operation, error: notAllocated)] }
        if let existing = channels[peer] {
            channels[peer]?.used = true
            if existing.bound { return [.completed(operation: operation, error: nil)] }
            channels[peer]?.waiting.append(operation)
            return []
        }
        guard channels.count < configuration.maximumPeers, let number = freeChannelNumber(now: now) else {
            return [.completed(operation: operation, error: TURNError(.limit, "no channel left for another peer"))]
        }
        channels[peer] = Channel(number: number, waiting: [operation])
        peerByChannel[number] = peer
        return transmit(.channelBind(number, peer), now: now)
    }

    /// Binds a channel to `peer` when ``Configuration/bindsChannels`` is on, the peer's IP has a permission, and it
    /// has no channel yet (requested or bound) and one is left; else nothing. Until the bind is answered,
    /// ``wrap(_:to:)`` goes on making Send indications.
    public mutating func bindChannelIfUseful(to peer: SocketAddress, operation: Int, now: Duration) -> [Action] {
        guard configuration.bindsChannels, phase == .allocated, channels[peer] == nil,
              permissions[peer.ip]?.installed == true, channels.count < configuration.maximumPeers else { return [] }
        return bindChannel(to: peer, operation: operation, now: now)
    }

    /// Deletes the allocation (Refresh with lifetime 0); `.deallocated` follows, also when the server is gone.
    public mutating func deallocate(now: Duration) -> [Action] {
        switch phase {
        case .allocated:
            var actions = abandonOperations(TURNError(.closed, "the allocation is being deleted"))
            pending.removeAll()
            phase = .deallocating
            actions += transmit(.refresh(lifetime: 0), now: now)
            return actions
        case .idle, .allocating:
            let actions = abandonOperations(TURNError(.closed, "the allocation was closed"))
            end()
            return actions + [.deallocated]
        case .deallocating, .ended:
            return []
        }
    }

    /// Hands in fresh credentials (REST credentials expire). Before the first authenticated Allocate they replace
    /// the old ones. After it, the allocation keeps its username (RFC 8656 binds an allocation to it; coturn 4.6
    /// answers 441 to another and does not check the old one's expiry again), and the fresh ones are used only when
    /// the server refuses the old ones with a 401, as a server that re-checks a REST expiry would.
    public mutating func updateCredentials(_ credentials: TURNCredentials) {
        if key == nil { self.credentials = credentials } else { renewed = credentials }
    }

    /// The earliest time ``tick(now:)`` has work, or nil when nothing is scheduled.
    public var nextDeadline: Duration? {
        var times: [Duration] = pending.values.flatMap { [$0.nextSend, $0.firstSent + configuration.transactionTimeout] }
        if phase == .allocated {
            times += [refreshAt, expiresAt]
            times += permissions.values.filter(\.installed).map(\.refreshAt)
            times += channels.values.filter(\.bound).map(\.refreshAt)
        }
        return times.min()
    }

    /// Retransmits, gives up on unanswered requests, and refreshes what is due.
    public mutating func tick(now: Duration) -> [Action] {
        var actions: [Action] = []
        for (id, transaction) in pending {
            if now >= transaction.firstSent + configuration.transactionTimeout {
                pending[id] = nil
                if let unverified = transaction.unverifiedError {
                    actions += errorResponse(transaction, unverified, now: now)
                } else {
                    actions += timedOut(transaction)
                }
                if phase == .ended { return actions }
            } else if now >= transaction.nextSend {
                actions.append(.send(transaction.bytes))
                pending[id]?.nextSend = now + transaction.rto * 2
                pending[id]?.rto = transaction.rto * 2
            }
        }
        guard phase == .allocated else { return actions }
        if now >= expiresAt {
            end()
            return actions + [.failed(TURNError(.expired, "the allocation's lifetime ran out before a refresh succeeded"))]
        }
        if now >= refreshAt && !pending.values.contains(where: { if case .refresh = $0.request { true } else { false } }) {
            refreshAt = expiresAt
            refreshesSent += 1
            actions += transmit(.refresh(lifetime: requestedLifetimeSeconds), now: now)
        }
        // What carried no data for `idlePeerLimit` is not refreshed: it lapses on the server and frees its place
        // among the `maximumPeers`.
        var duePermissions: [SocketAddress.IP] = []
        for (ip, permission) in permissions where permission.installed && now >= permission.refreshAt {
            let idleSince = permission.used ? nil : permission.idleSince ?? now - configuration.permissionRefresh
            if let idleSince, now - idleSince >= configuration.idlePeerLimit {
                permissions[ip] = nil
                continue
            }
            permissions[ip]?.used = false
            permissions[ip]?.idleSince = idleSince
            permissions[ip]?.refreshAt = now + configuration.permissionRefresh
            duePermissions.append(ip)
        }
        if !duePermissions.isEmpty {
            actions += transmit(.createPermission(duePermissions.map { SocketAddress(ip: $0, port: 0) }), now: now)
        }
        for (peer, channel) in channels where channel.bound && now >= channel.refreshAt {
            let idleSince = channel.used ? nil : channel.idleSince ?? now - configuration.channelRefresh
            if let idleSince, now - idleSince >= configuration.idlePeerLimit {
                channels[peer] = nil
                peerByChannel[channel.number] = nil
                // Bound last at `refreshAt - channelRefresh`, it lives 10 minutes on the server, then 5 more unusable.
                retiredChannels[channel.number] = now + .seconds(900) - configuration.channelRefresh
                continue
            }
            channels[peer]?.used = false
            channels[peer]?.idleSince = idleSince
            channels[peer]?.refreshAt = now + configuration.channelRefresh
            actions += transmit(.channelBind(channel.number, peer), now: now)
        }
        return actions
    }

    /// Handles a STUN message from the server (the driver passes only datagrams from ``server``).
    ///
    /// Anything that does not decode or does not answer a pending request is ignored: it may be spoofed, and the
    /// request's timeout covers a server that only sends junk. A success must carry a valid MESSAGE-INTEGRITY once
    /// we have a key. So must an error to a request that carried our credentials, except 438 (only a new nonce,
    /// retried a bounded number of times): an unsigned one (coturn's 401, or its 437 on Allocate) is kept, the
    /// request goes on being retransmitted, and the error counts only if nothing else answered by the timeout.
    public mutating func receive(_ bytes: [UInt8], now: Duration) -> [Action] {
        guard let message = try? STUNMessage.decode(bytes, options: STUNDecodingOptions(maximumSize: 0xFFFF + 20)),
              message.messageClass == .successResponse || message.messageClass == .errorResponse,
              let transaction = pending[message.transactionID] else { return [] }
        if message.messageClass == .successResponse {
            // A response without valid integrity may be forged by anyone who saw the transaction ID.
            if let key, (try? STUNMessage.verifyIntegrity(of: bytes, credential: key, require: .sha1)) == nil { return [] }
            pending[message.transactionID] = nil
            return succeeded(transaction, message, now: now)
        }
        // RFC 8489 9.2.5: 401 and 438 carry no integrity. A 438 only brings a new nonce (bounded retries); every
        // other error to a request that carried our credentials must be signed to end it at once.
        if transaction.authenticated, message.errorCode?.code != 438,
           key.map({ (try? STUNMessage.verifyIntegrity(of: bytes, credential: $0, require: .sha1)) == nil }) ?? true {
            pending[message.transactionID]?.unverifiedError = message
            return []
        }
        pending[message.transactionID] = nil
        return errorResponse(transaction, message, now: now)
    }

    // MARK: Data framing

    /// `payload` framed for `peer`: ChannelData on a bound channel, else a Send indication when the peer's IP has a
    /// permission, else nil.
    /// Marks the peer's permission and channel as used, so they are refreshed.
    public mutating func wrap(_ payload: UnsafeRawBufferPointer, to peer: SocketAddress) -> [UInt8]? {
        guard phase == .allocated else { return nil }
        markUsed(peer)
        if let channel = channels[peer], channel.bound {
            return TURNChannelData.encode(channel: channel.number, payload: payload)
        }
        guard permissions[peer.ip]?.installed == true else { return nil }
        let id = STUNTransactionID.random()
        let message = STUNMessage(.indication, method: .send, transactionID: id, attributes: [
            .xorPeerAddress(peer, transactionID: id), .data(Array(payload)),
        ])
        return try? message.encoded()
    }

    /// The peer and payload range of forwarded data from the server: ChannelData on a channel we bound, or a Data
    /// indication from a peer we permitted. Nil for control messages and for anything else. Marks the peer's
    /// permission and channel as used.
    public mutating func unwrap(_ datagram: UnsafeRawBufferPointer) -> (peer: SocketAddress, payload: Range<Int>)? {
        guard let first = datagram.first else { return nil }
        if first & 0xC0 == 0x40 {
            // A channel we asked for counts before its answer is handled: the server may forward on it at once.
            guard let (number, range) = TURNChannelData.decode(datagram), let peer = peerByChannel[number],
                  channels[peer] != nil else { return nil }
            markUsed(peer)
            return (peer, range)
        }
        // A Data indication: message type 0x0017. Only then is it worth decoding.
        guard datagram.count >= 20, first == 0x00, datagram[1] == 0x17 else { return nil }
        let bytes = Array(datagram)
        guard let message = try? STUNMessage.decode(bytes, options: STUNDecodingOptions(maximumSize: 0xFFFF + 20)),
              message.messageClass == .indication, message.method == .data,
              let peer = (try? message.xorPeerAddresses())?.first,
              permissions[peer.ip]?.installed == true || channels[peer]?.bound == true,
              let spans = try? STUNMessage.scan(bytes, options: STUNDecodingOptions(maximumSize: 0xFFFF + 20)),
              let span = spans.spans.first(where: { $0.type == STUNAttributeType.data }) else { return nil }
        markUsed(peer)
        return (peer, span.value)
    }

    private mutating func markUsed(_ peer: SocketAddress) {
        if permissions[peer.ip] != nil { permissions[peer.ip]?.used = true }
        if channels[peer] != nil { channels[peer]?.used = true }
    }

    /// The next unused channel number, else a lapsed one whose quarantine has passed; nil when none is free.
    private mutating func freeChannelNumber(now: Duration) -> UInt16? {
        if nextChannel <= TURNChannelData.channelRange.upperBound {
            defer { nextChannel += 1 }
            return nextChannel
        }
        guard let (number, _) = retiredChannels.first(where: { $0.value <= now }) else { return nil }
        retiredChannels[number] = nil
        return number
    }

    // MARK: Responses

    private mutating func succeeded(_ transaction: Transaction, _ message: STUNMessage, now: Duration) -> [Action] {
        switch transaction.request {
        case .allocate:
            guard let relayed = try? message.xorRelayedAddress() else {
                return fail(TURNError(.malformed, "Allocate success without a valid XOR-RELAYED-ADDRESS"))
            }
            let lifetime = clampedLifetime(message)
            phase = .allocated
            relayedAddress = relayed
            schedule(lifetime: lifetime, now: now)
            return [.allocated(relayed: relayed, mapped: message.xorMappedAddress, lifetime: lifetime)]
        case .refresh(lifetime: 0):
            end()
            return [.deallocated]
        case .refresh:
            schedule(lifetime: clampedLifetime(message), now: now)
            return []
        case let .createPermission(peers):
            var actions: [Action] = []
            for peer in peers {
                guard var permission = permissions[peer.ip] else { continue }
                if !permission.installed { permission.refreshAt = now + configuration.permissionRefresh }
                permission.installed = true
                actions += permission.waiting.map { .completed(operation: $0, error: nil) }
                permission.waiting = []
                permissions[peer.ip] = permission
            }
            return actions
        case let .channelBind(_, peer):
            guard var channel = channels[peer] else { return [] }
            if !channel.bound { channel.refreshAt = now + configuration.channelRefresh }
            channel.bound = true
            let actions = channel.waiting.map { Action.completed(operation: $0, error: nil) }
            channel.waiting = []
            channels[peer] = channel
            return actions
        }
    }

    private mutating func errorResponse(_ transaction: Transaction, _ message: STUNMessage, now: Duration) -> [Action] {
        let (code, reason) = message.errorCode ?? (0, "")
        switch code {
        case 401 where !transaction.authenticated:
            guard let realm = try? message.realm(), let nonce = try? message.nonce(), !realm.isEmpty, !nonce.isEmpty,
                  let key = try? STUNCredential.longTerm(username: credentials.username, realm: realm, password: credentials.password) else {
                return failRequest(transaction, TURNError(.malformed, "401 without a usable REALM and NONCE"))
            }
            self.realm = realm
            self.nonce = nonce
            self.key = key
            return transmit(transaction.request, now: now)
        case 401 where renewed != nil:
            // A server that re-checks a REST username's expiry: go on with the renewed credentials.
            guard let fresh = renewed, let realm,
                  let key = try? STUNCredential.longTerm(username: fresh.username, realm: realm, password: fresh.password) else {
                return failRequest(transaction, TURNError(.wrongCredentials, "the server rejected our credentials (401)"))
            }
            credentials = fresh
            renewed = nil
            self.key = key
            if let nonce = try? message.nonce(), !nonce.isEmpty { self.nonce = nonce }
            return transmit(transaction.request, now: now)
        case 401:
            return failRequest(transaction, TURNError(.wrongCredentials, "the server rejected our credentials (401)"))
        case 438 where transaction.nonceRetries < configuration.maximumNonceRetries:
            guard let nonce = try? message.nonce(), !nonce.isEmpty else {
                return failRequest(transaction, TURNError(.malformed, "438 without a NONCE"))
            }
            self.nonce = nonce
            nonceRetries += 1
            if let realm = try? message.realm(), !realm.isEmpty, realm != self.realm,
               let key = try? STUNCredential.longTerm(username: credentials.username, realm: realm, password: credentials.password) {
                self.realm = realm
                self.key = key
            }
            return transmit(transaction.request, now: now, nonceRetries: transaction.nonceRetries + 1)
        case 486:
            return failRequest(transaction, TURNError(.quotaExceeded, "the server refused another allocation (486)"))
        case 437:
            if case .allocate = transaction.request {
                return failRequest(transaction, TURNError(.allocationMismatch, "the server reports an allocation mismatch (437)"))
            }
            return failRequest(transaction, TURNError(.expired, "the server no longer has our allocation (437)"))
        default:
            let phrase = String(reason.unicodeScalars.prefix(80).filter { $0.value >= 0x20 && $0.value != 0x7F })
            return failRequest(transaction, TURNError(.rejected, "the server answered \(code) '\(phrase)'"))
        }
    }

    /// A request that will not succeed: Allocate and Refresh failures end the allocation (a failed deallocation
    /// still ends it); a permission or channel failure completes its waiters with the error.
    private mutating func failRequest(_ transaction: Transaction, _ error: TURNError) -> [Action] {
        switch transaction.request {
        case .allocate:
            return fail(error)
        case .refresh(lifetime: 0):
            end()
            return [.deallocated]
        case .refresh:
            return fail(error)
        case let .createPermission(peers):
            var actions: [Action] = []
            for peer in peers {
                guard let permission = permissions[peer.ip] else { continue }
                actions += permission.waiting.map { .completed(operation: $0, error: error) }
                if permission.installed { permissions[peer.ip]?.waiting = [] } else { permissions[peer.ip] = nil }
            }
            return error.code == .expired ? actions + fail(error) : actions
        case let .channelBind(number, peer):
            guard let channel = channels[peer] else { return [] }
            var actions = channel.waiting.map { Action.completed(operation: $0, error: error) }
            if channel.bound {
                channels[peer]?.waiting = []
            } else {
                channels[peer] = nil
                peerByChannel[number] = nil
            }
            if error.code == .expired { actions += fail(error) }
            return actions
        }
    }

    private mutating func timedOut(_ transaction: Transaction) -> [Action] {
        let seconds = Double(configuration.transactionTimeout.components.seconds)
            + Double(configuration.transactionTimeout.components.attoseconds) / 1e18
        return failRequest(transaction, TURNError(.unreachable, "\(server) did not answer within \(seconds) s"))
    }

    private mutating func fail(_ error: TURNError) -> [Action] {
        let actions = abandonOperations(error)
        end()
        return actions + [.failed(error)]
    }

    /// Completes every waiting operation with `error`.
    private mutating func abandonOperations(_ error: TURNError) -> [Action] {
        var actions: [Action] = []
        for (ip, permission) in permissions {
            actions += permission.waiting.map { .completed(operation: $0, error: error) }
            permissions[ip]?.waiting = []
        }
        for (peer, channel) in channels {
            actions += channel.waiting.map { .completed(operation: $0, error: error) }
            channels[peer]?.waiting = []
        }
        return actions
    }

    private mutating func end() {
        phase = .ended
        pending.removeAll()
        permissions.removeAll()
        channels.removeAll()
        peerByChannel.removeAll()
        retiredChannels.removeAll()
    }

    private var notAllocated: TURNError { TURNError(.closed, "there is no allocation") }

    // MARK: Requests

    private var requestedLifetimeSeconds: UInt32 {
        UInt32(clamping: configuration.requestedLifetime.components.seconds)
    }

    private func clampedLifetime(_ message: STUNMessage) -> Duration {
        let granted = (try? message.lifetimeSeconds()) ?? nil ?? requestedLifetimeSeconds
        let bounds = configuration.lifetimeBounds
        return .seconds(min(max(granted, bounds.lowerBound), bounds.upperBound))
    }

    /// Refresh at half the lifetime when it is short, else a minute before it ends.
    private mutating func schedule(lifetime: Duration, now: Duration) {
        expiresAt = now + lifetime
        refreshAt = now + min(lifetime < .seconds(120) ? lifetime / 2 : lifetime - .seconds(60), configuration.maximumRefreshInterval)
    }

    private mutating func transmit(_ request: Request, now: Duration, nonceRetries: Int = 0) -> [Action] {
        let id = STUNTransactionID.random()
        var attributes: [STUNAttribute] = []
        switch request {
        case .allocate:
            attributes += [.requestedTransport(), .lifetime(seconds: requestedLifetimeSeconds)]
            if let software = configuration.software { attributes.append(.software(software)) }
        case let .refresh(lifetime):
            attributes.append(.lifetime(seconds: lifetime))
        case let .createPermission(peers):
            attributes += peers.map { .xorPeerAddress($0, transactionID: id) }
        case let .channelBind(number, peer):
            attributes += [.channelNumber(number), .xorPeerAddress(peer, transactionID: id)]
        }
        if key != nil, let realm, let nonce {
            attributes += [.username(credentials.username), .realm(realm), .nonce(nonce)]
        }
        let method: STUNMessage.Method = switch request {
        case .allocate: .allocate
        case .refresh: .refresh
        case .createPermission: .createPermission
        case .channelBind: .channelBind
        }
        guard let bytes = try? STUNMessage(.request, method: method, transactionID: id, attributes: attributes)
            .encoded(integrity: key, fingerprint: true) else {
            return failRequest(
                Transaction(request: request, bytes: [], firstSent: now, nextSend: now, rto: .zero, authenticated: false),
                TURNError(.malformed, "a request could not be encoded (a username or nonce too long)")
            )
        }
        pending[id] = Transaction(
            request: request, bytes: bytes, firstSent: now,
            nextSend: now + configuration.initialRTO, rto: configuration.initialRTO,
            nonceRetries: nonceRetries, authenticated: key != nil
        )
        return [.send(bytes)]
    }
}
