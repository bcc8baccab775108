import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// A scripted TURN server for the state machine: decodes what the machine sends and builds answers to it.
struct FakeServer {
    let credentials = TURNCredentials(username: "1700000000:node", password: "pw")
    var realm = "hp.test"
    var nonce = Array("nonce-1".utf8)
    var key: STUNCredential { try! .longTerm(username: credentials.username, realm: realm, password: credentials.password) }
    let relayed = addr("127.0.0.1:50000")
    let mapped = addr("127.0.0.1:40000")

    func request(_ actions: [TURNAllocation.Action]) throws -> (STUNMessage, [UInt8]) {
        let sends = actions.compactMap { if case let .send(bytes) = $0 { bytes } else { nil } }
        let bytes = try #require(sends.last, "no request in \(actions)")
        return (try STUNMessage.decode(bytes, options: STUNDecodingOptions(maximumSize: 70_000)), bytes)
    }

    /// An error response; `integrity` signs it with the long-term key, as coturn signs errors to requests it
    /// authenticated (486, 403…), but not 401, 438 or its 437 on Allocate.
    func error(_ code: Int, to request: STUNMessage, realmAndNonce: Bool = true, integrity: Bool = false) throws -> [UInt8] {
        var attributes: [STUNAttribute] = [.errorCode(code: code, reason: "scripted")]
        if realmAndNonce { attributes += [.realm(realm), .nonce(nonce)] }
        return try STUNMessage(.errorResponse, method: request.method, transactionID: request.transactionID, attributes: attributes)
            .encoded(integrity: integrity ? key : nil)
    }

    func success(to request: STUNMessage, _ attributes: [STUNAttribute] = [], integrity: Bool = true) throws -> [UInt8] {
        try STUNMessage(.successResponse, method: request.method, transactionID: request.transactionID, attributes: attributes)
            .encoded(integrity: integrity ? key : nil, fingerprint: true)
    }

    func allocateSuccess(to request: STUNMessage, lifetime: UInt32 = 600) throws -> [UInt8] {
        try success(to: request, [
            .xorRelayedAddress(relayed, transactionID: request.transactionID),
            .xorMappedAddress(mapped), .lifetime(seconds: lifetime),
        ])
    }

    /// Runs the 401 dance and a successful Allocate; returns the allocated machine.
    func allocated(_ configuration: TURNAllocation.Configuration = .init(), lifetime: UInt32 = 600) throws -> TURNAllocation {
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: credentials, configuration: configuration)
        let (first, _) = try request(machine.start(now: .zero))
        let (second, _) = try request(machine.receive(try error(401, to: first), now: .zero))
        let actions = machine.receive(try allocateSuccess(to: second, lifetime: lifetime), now: .zero)
        try #require(machine.isAllocated, "\(actions)")
        return machine
    }
}

private func failure(_ actions: [TURNAllocation.Action]) -> TURNError? {
    for case let .failed(error) in actions { return error }
    return nil
}

private func completion(_ actions: [TURNAllocation.Action]) -> TURNError?? {
    for case let .completed(_, error) in actions { return .some(error) }
    return nil
}

@Suite struct TURNAllocationTests {
    let server = FakeServer()

    @Test func allocatesAfterTheUnauthenticatedFirstTry() throws {
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: server.credentials)
        let (first, _) = try server.request(machine.start(now: .zero))
        #expect(first.method == .allocate && first.messageClass == .request)
        #expect(first.username == nil, "the first Allocate goes without credentials")
        #expect(first.rawValue(STUNAttributeType.requestedTransport) == [17, 0, 0, 0])

        let (second, bytes) = try server.request(machine.receive(try server.error(401, to: first), now: .zero))
        #expect(second.username == server.credentials.username)
        #expect(try second.realm() == "hp.test")
        #expect(try second.nonce() == server.nonce)
        try STUNMessage.verifyIntegrity(of: bytes, credential: server.key, require: .sha1)

        let actions = machine.receive(try server.allocateSuccess(to: second), now: .zero)
        #expect(actions == [.allocated(relayed: server.relayed, mapped: server.mapped, lifetime: .seconds(600))])
        #expect(machine.relayedAddress == server.relayed)
    }

    @Test func rejectsCredentialsOnASecond401() throws {
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: server.credentials)
        let (first, _) = try server.request(machine.start(now: .zero))
        let (second, _) = try server.request(machine.receive(try server.error(401, to: first), now: .zero))
        // A 401 carries no integrity (RFC 8489 9.2.5), so anyone could send it: it counts only if the server does
        // not answer otherwise before the transaction's timeout.
        #expect(machine.receive(try server.error(401, to: second), now: .zero).isEmpty)
        let actions = machine.tick(now: TURNAllocation.Configuration().transactionTimeout)
        #expect(failure(actions)?.code == .wrongCredentials)
        #expect(machine.hasEnded)
    }

    @Test func retriesAStaleNonceWithTheNewOneABoundedNumberOfTimes() throws {
        var server = self.server
        var configuration = TURNAllocation.Configuration()
        configuration.maximumNonceRetries = 2
        var machine = try server.allocated(configuration)
        let peer = addr("127.0.0.1:9")
        var (request, _) = try server.request(machine.createPermission(for: peer, operation: 1, now: .zero))
        for round in 1...2 {
            server.nonce = Array("nonce-\(round + 1)".utf8)
            let (retry, bytes) = try server.request(machine.receive(try server.error(438, to: request), now: .zero))
            #expect(try retry.nonce() == server.nonce)
            #expect(retry.transactionID != request.transactionID)
            try STUNMessage.verifyIntegrity(of: bytes, credential: server.key)
            request = retry
        }
        let actions = machine.receive(try server.error(438, to: request), now: .zero)
        #expect(completion(actions)??.code == .rejected, "\(actions)")
    }

    @Test(arguments: [(486, TURNError.Code.quotaExceeded), (437, .allocationMismatch), (500, .rejected)])
    func mapsAllocateErrors(code: Int, expected: TURNError.Code) throws {
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: server.credentials)
        let (first, _) = try server.request(machine.start(now: .zero))
        let (second, _) = try server.request(machine.receive(try server.error(401, to: first), now: .zero))
        let actions = machine.receive(try server.error(code, to: second, integrity: true), now: .zero)
        #expect(failure(actions)?.code == expected)
    }

    @Test func anUnsignedErrorToAnAuthenticatedRefreshDoesNotEndTheAllocation() throws {
        var machine = try server.allocated()
        let (refresh, _) = try server.request(machine.tick(now: .seconds(540)))
        // Forged by someone who saw (or guessed) the transaction ID: no MESSAGE-INTEGRITY.
        let forged = machine.receive(try server.error(437, to: refresh, realmAndNonce: false), now: .seconds(540))
        #expect(forged.isEmpty, "an unsigned 437 ended the refresh: \(forged)")
        #expect(machine.isAllocated)
        #expect(machine.receive(try server.success(to: refresh, [.lifetime(seconds: 600)]), now: .seconds(541)).isEmpty)
        #expect(machine.isAllocated && machine.nextDeadline == .seconds(541 + 540), "the genuine answer still counts")
    }

    @Test func anUnsignedErrorCountsOnlyWhenNothingElseAnsweredByTheTimeout() throws {
        var machine = try server.allocated()
        let (refresh, _) = try server.request(machine.tick(now: .seconds(540)))
        #expect(machine.receive(try server.error(437, to: refresh, realmAndNonce: false), now: .seconds(540)).isEmpty)
        let retransmitted = try server.request(machine.tick(now: .seconds(540) + .milliseconds(250))).0
        #expect(retransmitted.transactionID == refresh.transactionID, "the request is still being retransmitted")
        let actions = machine.tick(now: .seconds(545))
        #expect(failure(actions)?.code == .expired, "the remembered 437, not 'unreachable': \(actions)")
    }

    @Test func refreshAnswered437MeansTheAllocationExpired() throws {
        var machine = try server.allocated()
        let (refresh, _) = try server.request(machine.tick(now: .seconds(540)))
        #expect(refresh.method == .refresh)
        let actions = machine.receive(try server.error(437, to: refresh, integrity: true), now: .seconds(541))
        #expect(failure(actions)?.code == .expired)
    }

    @Test func ignoresSuccessWithoutIntegrityAndFailsOnAMissingRelayedAddress() throws {
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: server.credentials)
        let (first, _) = try server.request(machine.start(now: .zero))
        let (second, _) = try server.request(machine.receive(try server.error(401, to: first), now: .zero))
        #expect(machine.receive(try server.success(to: second, integrity: false), now: .zero).isEmpty)
        #expect(machine.receive(Array(repeating: 0xFF, count: 40), now: .zero).isEmpty)
        let actions = machine.receive(try server.success(to: second, [.lifetime(seconds: 600)]), now: .zero)
        #expect(failure(actions)?.code == .malformed)
    }

    @Test func retransmitsThenGivesUpWithinTheBound() throws {
        var configuration = TURNAllocation.Configuration()
        configuration.initialRTO = .milliseconds(100)
        configuration.transactionTimeout = .seconds(2)
        var machine = TURNAllocation(server: addr("127.0.0.1:3478"), credentials: server.credentials, configuration: configuration)
        let (first, _) = try server.request(machine.start(now: .zero))
        #expect(machine.nextDeadline == .milliseconds(100))
        let (again, _) = try server.request(machine.tick(now: .milliseconds(100)))
        #expect(again.transactionID == first.transactionID)
        #expect(machine.nextDeadline == .milliseconds(300))
        let actions = machine.tick(now: .seconds(2))
        #expect(failure(actions)?.code == .unreachable)
        #expect(machine.hasEnded && machine.nextDeadline == nil)
    }

    @Test(arguments: [(UInt32(600), Duration.seconds(540)), (1, .seconds(15)), (4_000_000_000, .seconds(3540))])
    func refreshesBeforeTheClampedLifetimeEnds(granted: UInt32, refreshAt: Duration) throws {
        var machine = try server.allocated(lifetime: granted)
        #expect(machine.nextDeadline == refreshAt)
        let (refresh, _) = try server.request(machine.tick(now: refreshAt))
        #expect(try refresh.lifetimeSeconds() == 600)
        #expect(machine.receive(try server.success(to: refresh, [.lifetime(seconds: 600)]), now: refreshAt).isEmpty)
        #expect(machine.nextDeadline == refreshAt + .seconds(540))
    }

    @Test func permissionsAndChannelsAreRefreshedBeforeTheyLapse() throws {
        var machine = try server.allocated(lifetime: 3600)
        let peer = addr("127.0.0.1:7000")
        let (permission, _) = try server.request(machine.createPermission(for: peer, operation: 1, now: .zero))
        #expect(try permission.xorPeerAddresses() == [peer])
        #expect(completion(machine.receive(try server.success(to: permission), now: .zero)) == .some(nil))
        let (bind, _) = try server.request(machine.bindChannel(to: peer, operation: 2, now: .zero))
        #expect(try bind.channelNumber() == 0x4000)
        #expect(completion(machine.receive(try server.success(to: bind), now: .zero)) == .some(nil))

        // Only what is used is refreshed: the peer sends one datagram in each interval.
        let payload: [UInt8] = [1]
        _ = payload.withUnsafeBytes { machine.wrap($0, to: peer) }
        #expect(machine.nextDeadline == .seconds(240), "permissions last 5 minutes; refresh before")
        let (again, _) = try server.request(machine.tick(now: .seconds(240)))
        #expect(again.method == .createPermission)
        _ = machine.receive(try server.success(to: again), now: .seconds(240))
        _ = payload.withUnsafeBytes { machine.wrap($0, to: peer) }
        let rebind = try server.request(machine.tick(now: .seconds(480))).0
        #expect(rebind.method == .channelBind, "channels last 10 minutes; refresh before")
        #expect(try rebind.channelNumber() == 0x4000)
    }

    @Test func wrapsAsSendIndicationThenChannelDataAndUnwrapsOnlyKnownPeers() throws {
        var machine = try server.allocated()
        let peer = addr("127.0.0.1:7000")
        let payload: [UInt8] = [1, 2, 3, 4, 5]
        #expect(payload.withUnsafeBytes { machine.wrap($0, to: peer) } == nil, "no permission yet")

        let (permission, _) = try server.request(machine.createPermission(for: peer, operation: 1, now: .zero))
        _ = machine.receive(try server.success(to: permission), now: .zero)
        let indication = try STUNMessage.decode(try #require(payload.withUnsafeBytes { machine.wrap($0, to: peer) }))
        #expect(indication.method == .send && indication.messageClass == .indication)
        #expect(try indication.xorPeerAddresses() == [peer] && indication.dataPayload == payload)

        let dataID = STUNTransactionID.random()
        let data = try STUNMessage(.indication, method: .data, transactionID: dataID, attributes: [
            .xorPeerAddress(peer, transactionID: dataID), .data(payload),
        ]).encoded()
        let unwrapped = try #require(data.withUnsafeBytes { machine.unwrap($0) })
        #expect(unwrapped.peer == peer && Array(data[unwrapped.payload]) == payload)
        let strangerID = STUNTransactionID.random()
        let stranger = try STUNMessage(.indication, method: .data, transactionID: strangerID, attributes: [
            .xorPeerAddress(addr("127.0.0.2:7000"), transactionID: strangerID), .data(payload),
        ]).encoded()
        #expect(stranger.withUnsafeBytes { machine.unwrap($0) } == nil, "data from a peer without permission")
        let channelData = payload.withUnsafeBytes { TURNChannelData.encode(channel: 0x4000, payload: $0)! }
        #expect(channelData.withUnsafeBytes { machine.unwrap($0) } == nil, "no channel bound yet")

        let (bind, _) = try server.request(machine.bindChannel(to: peer, operation: 2, now: .zero))
        _ = machine.receive(try server.success(to: bind), now: .zero)
        #expect(payload.withUnsafeBytes { machine.wrap($0, to: peer) } == [0x40, 0x00, 0x00, 0x05] + payload)
        let fromChannel = try #require(channelData.withUnsafeBytes { machine.unwrap($0) })
        #expect(fromChannel.peer == peer && Array(channelData[fromChannel.payload]) == payload)
    }

    @Test func boundsPeersAndChannelNumbers() throws {
        var configuration = TURNAllocation.Configuration()
        configuration.maximumPeers = 1
        var machine = try server.allocated(configuration)
        _ = machine.bindChannel(to: addr("127.0.0.1:7000"), operation: 1, now: .zero)
        let actions = machine.bindChannel(to: addr("127.0.0.1:7001"), operation: 2, now: .zero)
        #expect(completion(actions)??.code == .limit)
    }

    @Test func idlePermissionsAndChannelsLapseSoThe65thPeerGetsOne() throws {
        var configuration = TURNAllocation.Configuration()
        configuration.idlePeerLimit = .seconds(240)
        var machine = try server.allocated(configuration, lifetime: 3600)
        let limit = TURNAllocation.Configuration().maximumPeers
        let busy = addr("127.0.0.2:7000")
        for index in 0..<limit {
            let peer = index == 0 ? busy : addr("127.0.\(1 + index / 200).\(3 + index % 200):7000")
            let (permission, _) = try server.request(machine.createPermission(for: peer, operation: index, now: .zero))
            #expect(completion(machine.receive(try server.success(to: permission), now: .zero)) == .some(nil))
        }
        let (bind, _) = try server.request(machine.bindChannel(to: busy, operation: 100, now: .zero))
        _ = machine.receive(try server.success(to: bind), now: .zero)
        let full = machine.createPermission(for: addr("10.0.0.1:1"), operation: 200, now: .zero)
        #expect(completion(full)??.code == .limit, "the bound holds while every peer is fresh")

        // Only `busy` exchanges data; the others are not refreshed again and lapse.
        let payload: [UInt8] = [1]
        _ = payload.withUnsafeBytes { machine.wrap($0, to: busy) }
        let refresh = try server.request(machine.tick(now: .seconds(240))).0
        #expect(try refresh.xorPeerAddresses().map(\.ip) == [busy.ip], "only the used permission is refreshed")
        _ = machine.receive(try server.success(to: refresh), now: .seconds(240))
        let (next, _) = try server.request(machine.createPermission(for: addr("10.0.0.1:1"), operation: 201, now: .seconds(241)))
        #expect(next.method == .createPermission, "the 65th peer got a permission once the idle ones lapsed")
        #expect(payload.withUnsafeBytes { machine.wrap($0, to: addr("127.0.1.4:7000")) } == nil, "a lapsed peer is not framed")

        // A channel lapses the same way, one refresh interval after its last use, and its number is not reused at once.
        let rebound = try server.request(machine.tick(now: .seconds(480))).0
        #expect(rebound.method == .channelBind, "the channel was used before 240 s, so it is re-bound once")
        _ = machine.receive(try server.success(to: rebound), now: .seconds(480))
        let idle = machine.tick(now: .seconds(960))
        #expect(idle.isEmpty, "the idle channel is not re-bound: \(idle)")
        #expect(payload.withUnsafeBytes { machine.wrap($0, to: busy) } == nil, "neither channel nor permission is left")
        let (other, _) = try server.request(machine.bindChannel(to: addr("127.0.0.9:1"), operation: 300, now: .seconds(961)))
        #expect(try other.channelNumber() != 0x4000, "a lapsed channel's number waits before it is reused")
    }

    @Test func anIdlePermissionIsKeptUntilTheIdleLimit() throws {
        var configuration = TURNAllocation.Configuration()
        configuration.idlePeerLimit = .seconds(720)
        var machine = try server.allocated(configuration, lifetime: 3600)
        let peer = addr("127.0.0.1:7000")
        let (permission, _) = try server.request(machine.createPermission(for: peer, operation: 1, now: .zero))
        _ = machine.receive(try server.success(to: permission), now: .zero)
        // Idle from the start: refreshed at 240 and 480 s (a standby relayed path stays usable), not at 720 s.
        for at in [240, 480] {
            let (refresh, _) = try server.request(machine.tick(now: .seconds(at)))
            #expect(refresh.method == .createPermission, "at \(at) s")
            _ = machine.receive(try server.success(to: refresh), now: .seconds(at))
        }
        #expect(machine.tick(now: .seconds(720)).isEmpty)
        #expect([UInt8]([1]).withUnsafeBytes { machine.wrap($0, to: peer) } == nil, "lapsed after the idle limit")
    }

    @Test func aLiveAllocationKeepsItsUsernameAndTurnsToRenewedCredentialsOnlyWhenRefused() throws {
        var machine = try server.allocated()
        let fresh = TURNCredentials(username: "1700000600:node", password: "pw2")
        machine.updateCredentials(fresh)
        // RFC 8656 binds the allocation to its username: coturn answers 441 to any other (TURNCoturnTests).
        let (refresh, _) = try server.request(machine.tick(now: .seconds(540)))
        #expect(refresh.username == server.credentials.username, "the renewed username went out on a live allocation")
        // A server that also checks a REST username's expiry on Refresh answers 401 once it passed.
        #expect(machine.receive(try server.error(401, to: refresh), now: .seconds(540)).isEmpty)
        let (retry, bytes) = try server.request(machine.tick(now: .seconds(545)))
        #expect(retry.method == .refresh && retry.username == fresh.username)
        try STUNMessage.verifyIntegrity(
            of: bytes, credential: try .longTerm(username: fresh.username, realm: server.realm, password: fresh.password), require: .sha1
        )
        #expect(machine.isAllocated)
    }

    @Test func deallocatesWithLifetimeZero() throws {
        var machine = try server.allocated()
        let (refresh, _) = try server.request(machine.deallocate(now: .seconds(1)))
        #expect(try refresh.lifetimeSeconds() == 0)
        #expect(machine.receive(try server.success(to: refresh, [.lifetime(seconds: 0)]), now: .seconds(1)) == [.deallocated])
        #expect(machine.hasEnded)
    }

    @Test func restCredentialsFollowCoturnsSharedSecretScheme() throws {
        let credentials = try TURNCredentials.rest(secret: Array("S".utf8), user: "node", expiresAt: 1_700_000_000)
        #expect(credentials.username == "1700000000:node")
        // base64(HMAC-SHA1("S", "1700000000:node")), computed independently with Python's hmac module.
        #expect(credentials.password == "zo9gapdQqe+vaAV17XtICYBo7+I=")
        #expect(credentials.restExpiry == 1_700_000_000)
        #expect(!"\(credentials)".contains(credentials.password) && !String(reflecting: credentials).contains(credentials.password))
    }
}

@Suite struct TURNCodecTests {
    @Test func channelDataRoundTripsWithAndWithoutPadding() throws {
        let payload: [UInt8] = [9, 8, 7]
        let plain = try #require(payload.withUnsafeBytes { TURNChannelData.encode(channel: 0x4001, payload: $0) })
        #expect(plain == [0x40, 0x01, 0x00, 0x03, 9, 8, 7])
        let padded = try #require(payload.withUnsafeBytes { TURNChannelData.encode(channel: 0x4001, payload: $0, padded: true) })
        #expect(padded.count == 8)
        for bytes in [plain, padded] {
            let decoded = try #require(bytes.withUnsafeBytes { TURNChannelData.decode($0) })
            #expect(decoded.channel == 0x4001 && Array(bytes[decoded.payload]) == payload)
        }
    }

    @Test(arguments: [
        [0x40, 0x00, 0x00, 0x08, 1, 2, 3],          // claims more than it has
        [0x40, 0x00, 0xFF, 0xFF],                   // claims 65535, has nothing
        [0x50, 0x00, 0x00, 0x00],                   // channel above 0x4FFF
        [0x3F, 0xFF, 0x00, 0x00],                   // channel below 0x4000
        [0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0, 0],    // more than the three padding bytes
        [0x40, 0x00, 0x00],                         // shorter than the header
    ] as [[UInt8]])
    func channelDataRejectsHostileLengthsAndChannels(bytes: [UInt8]) {
        #expect(bytes.withUnsafeBytes { TURNChannelData.decode($0) } == nil)
    }

    @Test func channelDataRefusesChannelsOutsideTheRange() {
        #expect([UInt8]().withUnsafeBytes { TURNChannelData.encode(channel: 0x5000, payload: $0) } == nil)
    }

    @Test func turnAttributesRoundTripAndRejectBadValues() throws {
        let id = STUNTransactionID.random()
        let peer = addr("[::1]:4000")
        let message = try STUNMessage.decode(STUNMessage(.request, method: .channelBind, transactionID: id, attributes: [
            .xorPeerAddress(peer, transactionID: id), .xorRelayedAddress(addr("127.0.0.1:5"), transactionID: id),
            .channelNumber(0x4FFF), .lifetime(seconds: 77), .data([1]),
        ]).encoded())
        #expect(message.method == .channelBind)
        #expect(try message.xorPeerAddresses() == [peer])
        #expect(try message.xorRelayedAddress() == addr("127.0.0.1:5"))
        #expect(try message.channelNumber() == 0x4FFF)
        #expect(try message.lifetimeSeconds() == 77)
        #expect(message.dataPayload == [1])

        let bad = STUNMessage(.successResponse, method: .channelBind, transactionID: id, attributes: [
            .raw(type: STUNAttributeType.channelNumber, value: [0x30, 0, 0, 0]),
            .raw(type: STUNAttributeType.lifetime, value: [0, 0, 1]),
            .raw(type: STUNAttributeType.xorPeerAddress, value: [0, 3, 0, 0, 1, 2, 3, 4]),
            .raw(type: STUNAttributeType.nonce, value: [UInt8](repeating: 0x61, count: 800)),
        ])
        #expect(stunError { _ = try bad.channelNumber() }?.code == .badAttribute)
        #expect(stunError { _ = try bad.lifetimeSeconds() }?.code == .badAttribute)
        #expect(stunError { _ = try bad.xorPeerAddresses() }?.code == .badAttribute)
        #expect(stunError { _ = try bad.nonce() }?.code == .badAttribute)
    }
}
