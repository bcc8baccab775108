import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

private func addr(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

/// Credentials minted by the rendezvous (coturn's shared-secret scheme) and used at a real coturn.
@Suite("TURN credentials from the rendezvous", .serialized)
struct TURNGrantTests {
    static let secret = Coturn.secret

    static func coturn() async throws -> Coturn {
        try await Coturn.start { port in
            try await onOwnThread {
                let probe = try UDPDatagramSocket(binding: .loopbackV4(port: 0))
                _ = try probe.send(try STUNMessage(.request).encoded(), to: .loopbackV4(port: port))
                return probe.receive(timeoutMilliseconds: 100) != nil
            }
        }
    }

    @Test("a grant's secret never shows in descriptions or reflection; its password is the coturn HMAC")
    func secretStaysPrivate() throws {
        let node = Identities.a.nodeID
        let minting = TURNMinting(servers: [addr("127.0.0.1:3478")], secret: Array(Self.secret.utf8), ttl: .seconds(600))
        let grant = try #require(minting.grant(for: node, unixTime: 1_700_000_000))
        #expect(grant.credentials.username == "1700000600:\(node)")
        #expect(grant.credentials == (try TURNCredentials.rest(secret: Array(Self.secret.utf8), user: "\(node)", expiresAt: 1_700_000_600)))
        var configuration = RendezvousServerConfiguration(listen: .loopbackV4(port: 0), identity: Identities.server)
        configuration.turn = minting
        let registered = Registered(observedAddress: addr("127.0.0.1:1"), ttlMilliseconds: 30_000, keepAliveMilliseconds: 10_000,
                                    stunServer: nil, turn: grant)
        // Reflection (`dump`, debuggers, default formatting of enclosing values) sees no byte array at all.
        #expect(!Mirror(reflecting: minting).children.contains { $0.value is [UInt8] })
        var dumped = ""
        dump(configuration, to: &dumped)
        let secretBytes = "\(Array(Self.secret.utf8))".dropFirst().dropLast()
        for text in ["\(configuration)", String(reflecting: configuration), dumped, "\(minting)", "\(registered)", "\(grant)"] {
            #expect(!text.contains(Self.secret) && !text.contains(secretBytes), "\(text)")
            #expect(!text.contains(grant.credentials.password), "\(text)")
        }
    }

    @Test("the client refuses a grant with too many servers, port 0, or oversized credentials")
    func validatesGrants() throws {
        let good = TURNGrant(servers: [addr("127.0.0.1:3478")], credentials: TURNCredentials(username: "1:n", password: "p"))
        let decoded = try JSONDecoder().decode(TURNGrant.self, from: try JSONEncoder().encode(good))
        #expect(decoded == good)
        let bad = [
            TURNGrant(servers: Array(repeating: addr("127.0.0.1:3478"), count: 5), credentials: good.credentials),
            TURNGrant(servers: [], credentials: good.credentials),
            TURNGrant(servers: [addr("127.0.0.1:0")], credentials: good.credentials),
            TURNGrant(servers: good.servers, credentials: TURNCredentials(username: String(repeating: "u", count: 513), password: "p")),
            TURNGrant(servers: good.servers, credentials: TURNCredentials(username: "1:n", password: String(repeating: "p", count: 129))),
        ]
        for grant in bad {
            let data = try JSONEncoder().encode(grant)
            #expect(throws: RendezvousError.self) { _ = try JSONDecoder().decode(TURNGrant.self, from: data) }
        }
    }

    /// A rendezvous names the TURN servers a client sends Allocates to: like its STUN servers, never an address where
    /// nothing listens or everything does (docs/security.md, "Where a rendezvous can send a client").
    @Test("the client refuses a grant naming an unspecified, multicast, broadcast or reserved TURN server")
    func refusesGrantsOutsideTheProbeTargetRules() throws {
        let credentials = TURNCredentials(username: "1:n", password: "p")
        for server in ["0.0.0.0:3478", "224.0.0.1:3478", "255.255.255.255:3478", "240.0.0.1:3478", "[ff02::1]:3478", "[::]:3478"] {
            let data = try JSONEncoder().encode(TURNGrant(servers: [addr(server)], credentials: credentials))
            #expect(throws: RendezvousError.self, "\(server)") { _ = try JSONDecoder().decode(TURNGrant.self, from: data) }
        }
    }

    @Test("a peer registered at `holepunch rendezvous --turn-server --turn-secret-file` allocates at coturn; stderr never shows the secret")
    func registeredPeerAllocatesWithMintedCredentials() async throws {
        guard Coturn.available, let holepunch = holepunchBinaryOrSkip() else { return }
        let coturn = try await Self.coturn()
        defer { coturn.stop() }
        let dir = try scratchDirectory("holepunch-turn-grant")
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data("\(Self.secret)\n".utf8).write(to: dir.appendingPathComponent("turn.secret"))
        let turnServer = "127.0.0.1:\(coturn.port)"
        let (rendezvous, quic) = try await startRendezvous(holepunch, in: dir, extra: [
            "--turn-server", turnServer, "--turn-secret-file", "turn.secret", "--verbose",
        ])
        defer { rendezvous.stop() }
        let rendezvousID = try NodeID(parsing: try String(contentsOf: dir.appendingPathComponent("rdv.id"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines))

        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        let executor = PunchExecutor(endpoint: endpoint)
        let client = RendezvousClient(executor: executor, configuration: RendezvousClientConfiguration(
            server: try SocketAddress(parsing: quic), serverNodeID: rendezvousID, requestTimeout: .seconds(5)))
        let registered = try await client.connect()
        let grant = try #require(registered.turn, "Registered carries no TURN grant")
        #expect(grant.servers == [try SocketAddress(parsing: turnServer)])
        #expect(grant.credentials.username.hasSuffix(":\(Identities.a.nodeID)"))
        let expiry = try #require(grant.credentials.restExpiry)
        let now = Int64(Date().timeIntervalSince1970)
        #expect((now + 590...now + 610).contains(expiry), "default TTL is 10 minutes")

        // On the punch socket, through the endpoint, as a node would.
        let transport = EndpointSTUNTransport(endpoint: endpoint)
        await transport.install(executor: executor)
        var configuration = TURNAllocation.Configuration()
        configuration.transactionTimeout = .seconds(3)
        let allocation = try await TURNClient.withAllocation(
            server: grant.servers[0], credentials: grant.credentials, transport: transport, configuration: configuration
        ) { turn in
            try await turn.createPermission(for: .loopbackV4(port: 9))
            return try await turn.allocation()
        }
        #expect(allocation.relayed.host == "127.0.0.1")
        #expect(allocation.mapped == endpoint.localAddress)
        await client.close()
        await executor.shutdown()
        await endpoint.close()

        rendezvous.stop()
        _ = await rendezvous.waitExit(.seconds(5))
        for text in [rendezvous.stderr.text, rendezvous.stdout.text] {
            #expect(!text.contains(Self.secret), "the secret leaked: \(text)")
            #expect(!text.contains(grant.credentials.password))
        }
        #expect(rendezvous.stderr.text.contains("peer registered"), "verbose logging was on: \(rendezvous.stderr.text)")
    }
}
