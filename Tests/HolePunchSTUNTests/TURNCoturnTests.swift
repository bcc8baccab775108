import Foundation
import HolePunchNet
import ProcessTestSupport
import Testing
@testable import HolePunchSTUN

/// Our TURN client against coturn on loopback.
enum TURNInterop {
    /// coturn with the test secret, `extra` arguments, answering Binding requests.
    static func start(_ extra: [String] = []) async throws -> Coturn {
        try await Coturn.start(extra: extra) { port in
            try await onOwnThread { try Interop.waitUntilAnswering(.loopbackV4(port: port), attempts: 1) }
        }
    }

    /// REST credentials for `user`, valid for ten minutes, minted with `secret`.
    static func credentials(_ user: String, secret: String = Coturn.secret) throws -> TURNCredentials {
        try .rest(secret: Array(secret.utf8), user: user, expiresAt: Int64(Date().timeIntervalSince1970) + 600)
    }

    static var quick: TURNAllocation.Configuration {
        var configuration = TURNAllocation.Configuration()
        configuration.initialRTO = .milliseconds(100)
        configuration.transactionTimeout = .seconds(2)
        return configuration
    }

    /// Runs a client on a fresh loopback socket in a child task of `group`; returns it once allocated.
    static func allocate(
        at server: SocketAddress, _ credentials: TURNCredentials, configuration: TURNAllocation.Configuration = quick,
        in group: inout ThrowingTaskGroup<Void, any Error>
    ) async throws -> (TURNClient, TURNClient.Allocation) {
        try await allocateWithTransport(at: server, credentials, configuration: configuration, in: &group).0
    }

    /// ``allocate(at:_:configuration:in:)``, also returning the client's transport (the group's task closes it).
    static func allocateWithTransport(
        at server: SocketAddress, _ credentials: TURNCredentials, configuration: TURNAllocation.Configuration = quick,
        in group: inout ThrowingTaskGroup<Void, any Error>
    ) async throws -> ((TURNClient, TURNClient.Allocation), UDPSTUNTransport) {
        let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        let client = TURNClient(server: server, credentials: credentials, transport: transport, configuration: configuration)
        group.addTask {
            defer { transport.closeNow() }
            try await client.run()
        }
        return ((client, try await client.allocation()), transport)
    }

    /// The next datagram `client` received through the relay, bounded.
    static func next(_ client: TURNClient) async throws -> TURNClient.Received? {
        try await withDeadline(.seconds(5)) {
            var iterator = client.received().makeAsyncIterator()
            return await iterator.next()
        }
    }
}

extension RealNetworkTests {
@Suite(.enabled(if: Coturn.available, "coturn's turnserver is not installed (apt-get install coturn)"))
struct TURNCoturnTests {
    @Test func twoClientsRelayBothWaysBySendIndicationAndChannelData() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (a, allocationA) = try await TURNInterop.allocate(at: server, try TURNInterop.credentials("a"), in: &group)
            let (b, allocationB) = try await TURNInterop.allocate(at: server, try TURNInterop.credentials("b"), in: &group)
            #expect(allocationA.relayed.host == "127.0.0.1" && allocationA.relayed != allocationB.relayed)
            #expect(a.relayedAddress == allocationA.relayed)
            try await a.createPermission(for: allocationB.relayed)
            try await b.createPermission(for: allocationA.relayed)

            // Send indications out, Data indications in.
            try await a.send(Array("a to b".utf8), to: allocationB.relayed)
            #expect(try await TURNInterop.next(b) == .init(peer: allocationA.relayed, payload: Array("a to b".utf8)))
            try await b.send(Array("b to a".utf8), to: allocationA.relayed)
            #expect(try await TURNInterop.next(a) == .init(peer: allocationB.relayed, payload: Array("b to a".utf8)))

            // ChannelData both ways.
            try await a.bindChannel(to: allocationB.relayed)
            try await b.bindChannel(to: allocationA.relayed)
            let big = (0..<1200).map { UInt8($0 & 0xFF) }
            #expect(big.withUnsafeBytes { a.wrap($0, to: allocationB.relayed) }?.first == 0x40, "ChannelData once bound")
            try await a.send(big, to: allocationB.relayed)
            #expect(try await TURNInterop.next(b) == .init(peer: allocationA.relayed, payload: big))
            try await b.send([1, 2, 3], to: allocationA.relayed)
            #expect(try await TURNInterop.next(a) == .init(peer: allocationB.relayed, payload: [1, 2, 3]))

            await a.close()
            await b.close()
            try await group.waitForAll()
        }
    }

    @Test func relayFramingRoundTripToAPlainPeer() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let peer = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        try await withThrowingTaskGroup(of: Void.self) { group in
            let ((client, allocation), transport) = try await TURNInterop.allocateWithTransport(
                at: server, try TURNInterop.credentials("f"), in: &group
            )
            let framing: any RelayFraming = client
            #expect(framing.server == server && framing.relayedAddress == allocation.relayed)
            try await client.bindChannel(to: peer.localAddress)
            // Framed by hand and sent on the allocation's own socket, as the endpoint does with its punch socket.
            let framed = try #require(Array("through the relay".utf8).withUnsafeBytes { framing.wrap($0, to: peer.localAddress) })
            #expect(framed.count == 4 + 17, "ChannelData, unpadded over UDP")
            try await transport.send(framed, to: framing.server)
            let arrived = try await onOwnThread { peer.receive(timeoutMilliseconds: 5000) }
            #expect(arrived?.from == allocation.relayed)
            #expect(arrived.map { String(decoding: $0.bytes, as: UTF8.self) } == "through the relay")
            _ = try peer.send(Array("reply".utf8), to: allocation.relayed)
            #expect(try await TURNInterop.next(client) == .init(peer: peer.localAddress, payload: Array("reply".utf8)))
            await client.close()
            try await group.waitForAll()
        }
    }

    @Test func sendingToAPermittedPeerBindsAChannelAndMovesToChannelData() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let peer = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let configuration = { var configuration = TURNInterop.quick; configuration.bindsChannels = true; return configuration }()
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (client, allocation) = try await TURNInterop.allocate(
                at: .loopbackV4(port: coturn.port), try TURNInterop.credentials("h"), configuration: configuration, in: &group
            )
            try await client.createPermission(for: peer.localAddress)
            let payload = Array("hello".utf8)
            // The first datagram goes as a Send indication (the channel is not bound yet) and arrives all the same.
            #expect(payload.withUnsafeBytes { client.wrap($0, to: peer.localAddress) }?.first == 0x00)
            try await client.send(payload, to: peer.localAddress)
            #expect(try await onOwnThread { peer.receive(timeoutMilliseconds: 5000) }?.bytes == payload)
            let channelData = await eventually(.seconds(5)) {
                payload.withUnsafeBytes { client.wrap($0, to: peer.localAddress) }?.count == 4 + payload.count
            }
            #expect(channelData, "no channel was bound after sending to a permitted peer")
            try await client.send(payload, to: peer.localAddress)
            #expect(try await onOwnThread { peer.receive(timeoutMilliseconds: 5000) }?.bytes == payload)
            // The peer's answer comes back as ChannelData on the bound channel.
            _ = try peer.send(Array("back".utf8), to: allocation.relayed)
            #expect(try await TURNInterop.next(client) == .init(peer: peer.localAddress, payload: Array("back".utf8)))
            await client.close()
            try await group.waitForAll()
        }
    }

    @Test func refreshesKeepTheAllocationAliveThroughStaleNonces() async throws {
        // coturn grants at least 10 minutes, so the client refreshes every second; coturn calls nonces stale after
        // 1 s, so refreshes meet 438s.
        let coturn = try await TURNInterop.start(["--stale-nonce=1"])
        defer { coturn.stop() }
        var configuration = TURNInterop.quick
        configuration.maximumRefreshInterval = .milliseconds(1500)
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (client, allocation) = try await TURNInterop.allocate(
                at: .loopbackV4(port: coturn.port), try TURNInterop.credentials("r"), configuration: configuration, in: &group
            )
            #expect(allocation.lifetime == .seconds(600))
            #expect(await eventually(.seconds(15)) { client.counters.refreshes >= 3 }, "\(client.counters)")
            #expect(client.counters.nonceRetries >= 1, "coturn's stale nonce was never met")
            try await client.createPermission(for: .loopbackV4(port: 9))
            await client.close()
            try await group.waitForAll()
        }
    }

    @Test func theAllocationOutlivesItsFirstCredentialsWhenTheyAreRenewed() async throws {
        // coturn 4.6 binds an allocation to its username (441 to another) and does not check a REST username's
        // expiry again once the allocation exists; the node renews its credentials all the same (HolePunchNode).
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        var configuration = TURNInterop.quick
        configuration.maximumRefreshInterval = .milliseconds(500)
        let expiry = Int64(Date().timeIntervalSince1970) + 2
        let first = try TURNCredentials.rest(secret: Array(Coturn.secret.utf8), user: "n", expiresAt: expiry)
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (client, _) = try await TURNInterop.allocate(
                at: .loopbackV4(port: coturn.port), first, configuration: configuration, in: &group
            )
            client.updateCredentials(try TURNInterop.credentials("n"))
            let refreshes = client.counters.refreshes
            let outlived = await eventually(.seconds(10)) {
                client.counters.refreshes >= refreshes + 4 && Int64(Date().timeIntervalSince1970) > expiry + 1
            }
            #expect(outlived, "\(client.counters)")
            try await client.createPermission(for: .loopbackV4(port: 9))
            await client.close()
            try await group.waitForAll()
        }
    }

    @Test func cancelledOperationsLeaveNothingBehind() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (client, _) = try await TURNInterop.allocate(
                at: .loopbackV4(port: coturn.port), try TURNInterop.credentials("k"), in: &group
            )
            coturn.stop()  // From now on every request waits for its timeout (2 s).
            let cancelled = (0..<20).map { index in
                Task { try await client.createPermission(for: .loopbackV4(port: UInt16(9000 + index))) }
            }
            #expect(await eventually { client.operationRecords == 20 })
            for task in cancelled { task.cancel() }
            for task in cancelled { await #expect(throws: CancellationError.self) { try await task.value } }
            // The same permission request: its completion comes after those of the 20 cancelled ones.
            await #expect(throws: TURNError.self) { try await client.createPermission(for: .loopbackV4(port: 9)) }
            #expect(client.operationRecords == 0, "completions of cancelled operations were kept")
            await client.close()
            try await group.waitForAll()
        }
    }

    @Test func wrongSecretIsATypedError() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { transport.closeNow() }
        let error = await #expect(throws: TURNError.self) {
            try await TURNClient.withAllocation(
                server: .loopbackV4(port: coturn.port), credentials: try TURNInterop.credentials("w", secret: "wrong"),
                transport: transport, configuration: TURNInterop.quick
            ) { _ in }
        }
        #expect(error?.code == .wrongCredentials)
    }

    @Test func serverNotRunningIsATypedErrorWithinTheBound() async throws {
        // A port that was just free: nothing answers there.
        let silent = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
        let server = silent.localAddress
        let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { transport.closeNow() }
        let clock = ContinuousClock()
        let started = clock.now
        let error = await #expect(throws: TURNError.self) {
            try await withDeadline(.seconds(10)) {
                try await TURNClient.withAllocation(
                    server: server, credentials: try TURNInterop.credentials("u"), transport: transport,
                    configuration: TURNInterop.quick
                ) { _ in }
            }
        }
        #expect(error?.code == .unreachable)
        #expect(clock.now - started < .seconds(10), "the wait is bounded by the transaction timeout (2 s)")
    }

    @Test func userQuotaRefusesASecondAllocation() async throws {
        let coturn = try await TURNInterop.start(["--user-quota", "1"])
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let credentials = try TURNInterop.credentials("q")
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (first, _) = try await TURNInterop.allocate(at: server, credentials, in: &group)
            let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
            defer { transport.closeNow() }
            let error = await #expect(throws: TURNError.self) {
                try await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                    configuration: TURNInterop.quick) { _ in }
            }
            #expect(error?.code == .quotaExceeded)
            await first.close()
            try await group.waitForAll()
        }
    }

    @Test func coturnSignsItsQuotaErrorSoItEndsTheAllocateAtOnce() async throws {
        // Errors without a valid MESSAGE-INTEGRITY count only at the transaction's timeout (a forger could have
        // sent them); coturn signs the errors to requests it authenticated (486 here), so they end the request as
        // soon as they arrive. The timeout is far beyond the deadline: an unsigned 486 would fail this test.
        let coturn = try await TURNInterop.start(["--user-quota", "1"])
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let credentials = try TURNInterop.credentials("s")
        let patient = { var configuration = TURNInterop.quick; configuration.transactionTimeout = .seconds(60); return configuration }()
        try await withThrowingTaskGroup(of: Void.self) { group in
            let (first, _) = try await TURNInterop.allocate(at: server, credentials, in: &group)
            let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
            defer { transport.closeNow() }
            let error = await #expect(throws: TURNError.self) {
                try await withDeadline(.seconds(20)) {
                    try await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                        configuration: patient) { _ in }
                }
            }
            #expect(error?.code == .quotaExceeded)
            await first.close()
            try await group.waitForAll()
        }
    }

    @Test func deleteFreesTheFiveTupleForANewAllocation() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { transport.closeNow() }
        let credentials = try TURNInterop.credentials("d")
        let first = try await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                        configuration: TURNInterop.quick) { try await $0.allocation() }
        // Without the deleting Refresh, coturn answers 437 (allocation mismatch) on the same 5-tuple for the whole
        // lifetime (600 s); after it, coturn frees the session on its next timer run, within a second or two.
        let reused = await eventually(.seconds(10)) {
            (try? await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                   configuration: TURNInterop.quick) { try await $0.allocation() }) != nil
        }
        #expect(reused, "the 5-tuple was not free again within 10 s of the deletion")
        #expect(first.relayed.host == "127.0.0.1")
    }

    @Test func cancellingRunEndsItAtOnceAndStillDeletesTheAllocation() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let transport = try UDPSTUNTransport(binding: .loopbackV4(port: 0))
        defer { transport.closeNow() }
        let credentials = try TURNInterop.credentials("c")
        let client = TURNClient(server: server, credentials: credentials, transport: transport, configuration: TURNInterop.quick)
        let run = Task { try await client.run() }
        _ = try await client.allocation()
        run.cancel()
        let ended = try await withDeadline(.seconds(2)) { await run.result }
        #expect(throws: CancellationError.self) { try ended.get() }
        // The one deleting Refresh sent on cancellation frees the 5-tuple (otherwise 437 for 600 s).
        let reused = await eventually(.seconds(10)) {
            (try? await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                   configuration: TURNInterop.quick) { try await $0.allocation() }) != nil
        }
        #expect(reused)
    }

    @Test func aSecondAllocationOnTheSameFiveTupleIsAMismatch() async throws {
        let coturn = try await TURNInterop.start()
        defer { coturn.stop() }
        let server = SocketAddress.loopbackV4(port: coturn.port)
        let credentials = try TURNInterop.credentials("m")
        try await withThrowingTaskGroup(of: Void.self) { group in
            let ((first, _), transport) = try await TURNInterop.allocateWithTransport(at: server, credentials, in: &group)
            let error = await #expect(throws: TURNError.self) {
                try await TURNClient.withAllocation(server: server, credentials: credentials, transport: transport,
                                                    configuration: TURNInterop.quick) { _ in }
            }
            #expect(error?.code == .allocationMismatch)
            await first.close()
            try await group.waitForAll()
        }
    }
}
}
