import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchSTUN
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

enum Identities {
    static let server = try! Identity.generate(commonName: "rdv-server")
    static let a = try! Identity.generate(commonName: "rdv-a")
    static let b = try! Identity.generate(commonName: "rdv-b")
    static let c = try! Identity.generate(commonName: "rdv-c")
}


/// A running server plus helpers to make clients.
struct Harness {
    let server: RendezvousServer
    let task: Task<Void, any Error>

    static func start(
        state: RendezvousState.Configuration = .init(), limits: RendezvousLimits = .init(), stun: Bool = false,
        linkDelay: (@Sendable (NodeID) -> Duration)? = nil
    ) async throws -> Harness {
        let configuration = RendezvousServerConfiguration(
            listen: .loopbackV4(port: 0), identity: Identities.server,
            stun: stun ? STUNResponderConfiguration(primary: .loopbackV4(port: 0), alternatePort: 0) : nil,
            state: state, limits: limits, housekeepingInterval: .milliseconds(100), linkDelay: linkDelay
        )
        let server = try await RendezvousServer.bind(configuration: configuration)
        let task = Task { try await server.run() }
        return Harness(server: server, task: task)
    }

    func client(
        _ identity: Identity, strategy: (any PunchStrategy)? = nil, admission: PunchAdmission = .any,
        punchTimeout: Duration = .seconds(10)
    ) async throws -> RendezvousClient {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
        let executor = PunchExecutor(endpoint: endpoint)
        var configuration = RendezvousClientConfiguration(
            server: server.address, serverNodeID: server.nodeID, requestTimeout: .seconds(5), strategy: strategy,
            punchTimeout: punchTimeout)
        configuration.admission = admission
        return RendezvousClient(executor: executor, configuration: configuration)
    }

    func stop(_ clients: RendezvousClient...) async {
        for client in clients {
            await client.close()
            await client.executor.shutdown()
            await client.executor.endpoint.close()
        }
        await server.shutdown()
        _ = await task.result
    }
}

@Suite("Rendezvous on loopback", .serialized)
struct RendezvousLoopbackTests {
    @Test("register: the observed address is the punch socket's; A punches to B by NodeID and a line goes both ways")
    func punchByNodeID() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        let registeredA = try await a.connect()
        _ = try await b.connect()
        #expect(registeredA.observedAddress == a.executor.endpoint.localAddress)
        #expect(await harness.server.isRegistered(Identities.b.nodeID))

        let accepted = Task { () -> QUICConnection? in
            for await connection in b.incoming { return connection }
            return nil
        }
        let connection = try await withDeadline(.seconds(20)) { try await a.requestPunch(to: Identities.b.nodeID) }
        let inbound = try #require(try await withDeadline(.seconds(20)) { await accepted.value })
        #expect(connection.peerNodeID == Identities.b.nodeID)
        #expect(inbound.peerNodeID == Identities.a.nodeID)
        #expect(connection.remoteAddress == b.executor.endpoint.localAddress)

        let stream = try await connection.openStream()
        try await stream.write(Array("hello from A\n".utf8))
        let incoming = try #require(try await inbound.acceptStream())
        let line = try #require(try await incoming.read())
        #expect(String(decoding: line, as: UTF8.self) == "hello from A\n")
        try await incoming.write(Array("hello from B\n".utf8))
        let reply = try #require(try await stream.read())
        #expect(String(decoding: reply, as: UTF8.self) == "hello from B\n")

        #expect(await harness.server.statistics().coordinations == 1)
        await harness.stop(a, b)
    }

    @Test("a punch request pipelined behind the register: coordinated with the handshake RTT as the requester's estimate")
    func pipelinedRequest() async throws {
        let far = Identities.a.nodeID
        let harness = try await Harness.start(linkDelay: { $0 == far ? .milliseconds(30) : .zero })
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        _ = try await b.connect()
        #expect(await eventually(.seconds(10)) { await harness.server.rttSamples(of: Identities.b.nodeID) >= 4 })

        let (registered, received) = try await a.connect(coordinatingWith: Identities.b.nodeID)
        #expect(registered.observedAddress == a.executor.endpoint.localAddress)
        #expect(received.coordinate.role == .initiator && received.coordinate.peer == Identities.b.nodeID)
        // A answered no ping before its request was handled: without a provisional RTT it would count as
        // unmeasured and get the 150 ms ceiling; with the handshake's (≥ 60 ms here) the session gets the floor.
        #expect(received.coordinate.startDelay < .milliseconds(150), "start delay \(received.coordinate.startDelay)")
        #expect(try #require(received.coordinate.peerRTTMicroseconds) >= 30_000)

        // A target that is not registered: the registration stands, the request is refused with its code.
        let c = try await harness.client(Identities.c)
        let error = await #expect(throws: RendezvousError.self) {
            _ = try await c.connect(coordinatingWith: Identities.server.nodeID)
        }
        #expect(error?.code == .unknownTarget)
        #expect(await harness.server.isRegistered(Identities.c.nodeID))
        await harness.stop(a, b, c)
    }

    @Test("a refused re-register with a punch request behind it coordinates nothing: the register's error is the whole outcome")
    func refusedReregisterCoordinatesNothing() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        _ = try await b.connect()
        _ = try await a.connect()
        // A multicast "LAN" address: the rendezvous refuses the register and keeps A's earlier registration.
        let multicast = try SocketAddress(parsing: "224.0.0.251:5353")
        let error = await #expect(throws: RendezvousError.self) {
            _ = try await a.connect(Registration(lanAddresses: [multicast]), coordinatingWith: Identities.b.nodeID)
        }
        #expect(error?.code == .protocolViolation)
        // The rendezvous handles a stream's messages in order: once this request is answered, anything A wrote
        // before it was handled. Only this request may have started a session.
        _ = try await a.coordinate(to: Identities.b.nodeID)
        #expect(await harness.server.statistics().coordinations == 1)
        await harness.stop(a, b)
    }

    @Test("a fresh connection whose register was refused cannot ask for punches on the NodeID's older registration")
    func refusedRegisterOnNewConnection() async throws {
        let harness = try await Harness.start()
        let b = try await harness.client(Identities.b)
        let old = try await harness.client(Identities.a)
        _ = try await b.connect()
        _ = try await old.connect()
        // A's new connection (a restart, a new network) registers with a multicast "LAN" address: refused, and the
        // request written behind it would otherwise be coordinated from the old connection's registration.
        let fresh = try await harness.client(Identities.a)
        let multicast = try SocketAddress(parsing: "224.0.0.251:5353")
        let error = await #expect(throws: RendezvousError.self) {
            _ = try await fresh.connect(Registration(lanAddresses: [multicast]), coordinatingWith: Identities.b.nodeID)
        }
        #expect(error?.code == .protocolViolation)
        let again = await #expect(throws: RendezvousError.self) {
            _ = try await fresh.coordinate(to: Identities.b.nodeID)
        }
        #expect(again?.code == .notRegistered)
        // The rendezvous handles a stream's messages in order: both requests were handled by now.
        #expect(await harness.server.statistics().coordinations == 0)
        await harness.stop(old, fresh, b)
    }

    @Test("the late refusal of an abandoned punch request is not taken for the answer to a register")
    func lateRefusalIsNotTheRegisters() async throws {
        let slow = Identities.c.nodeID
        let harness = try await Harness.start(linkDelay: { $0 == slow ? .milliseconds(200) : .zero })
        let c = try await harness.client(Identities.c)
        _ = try await c.connect()
        let refusals = await harness.server.statistics().refusals
        let abandoned = Task { try await c.coordinate(to: Identities.server.nodeID) }
        // The server has refused the request; its answer is still on the (slow) way back when the caller gives up
        // and registers again.
        #expect(await eventually(.seconds(10)) { await harness.server.statistics().refusals > refusals })
        abandoned.cancel()
        _ = await abandoned.result
        let registered = try await c.register(Registration())
        #expect(registered.observedAddress == c.executor.endpoint.localAddress)
        await harness.stop(c)
    }

    @Test("unknown NodeID: a clear unknownTarget error naming the NodeID, and nothing sent to anyone else")
    func unknownTarget() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        _ = try await a.connect()
        let error = await #expect(throws: RendezvousError.self) {
            _ = try await a.requestPunch(to: Identities.c.nodeID)
        }
        #expect(error?.code == .unknownTarget)
        #expect(error?.message.contains(Identities.c.nodeID.description) == true)
        #expect(await harness.server.statistics().refusals == 1)
        #expect(await harness.server.statistics().sessions == 0)
        await harness.stop(a)
    }

    @Test("a wrong rendezvous NodeID fails the connection with connectionFailed")
    func wrongServerID() async throws {
        let harness = try await Harness.start()
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        let client = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: harness.server.address, serverNodeID: Identities.c.nodeID, requestTimeout: .seconds(3)))
        let error = await #expect(throws: RendezvousError.self) { _ = try await client.connect() }
        #expect(error?.code == .connectionFailed)
        await harness.stop(client)
    }

    @Test("start synchronisation: with 40 ms and 2 ms one-way delays injected, both peers start within 10 ms")
    func startSkew() async throws {
        let far = Identities.a.nodeID
        let harness = try await Harness.start(linkDelay: { $0 == far ? .milliseconds(40) : .milliseconds(2) })
        let a = try await harness.client(Identities.a)
        let b = try await harness.client(Identities.b)
        _ = try await a.connect()
        _ = try await b.connect()
        // Wait for the registration pings (4 each) so both RTT estimates exist.
        let sampled = await eventually(.seconds(10)) {
            let samplesA = await harness.server.rttSamples(of: Identities.a.nodeID)
            let samplesB = await harness.server.rttSamples(of: Identities.b.nodeID)
            return samplesA >= 4 && samplesB >= 4
        }
        #expect(sampled)
        let rttA = try #require(await harness.server.rtt(of: Identities.a.nodeID))
        let rttB = try #require(await harness.server.rtt(of: Identities.b.nodeID))
        #expect(rttA >= .milliseconds(80))
        #expect(rttB < .milliseconds(40))

        // Uncompensated, B would start (80 − 4)/2 = 38 ms before A; B is the target here, A the initiator.
        var skews: [Duration] = []
        for round in 0..<3 {
            let targetStart = Task { () -> ContinuousClock.Instant? in
                for await punch in b.incomingPunches {
                    await b.executor.cancel(punch.handle.id)
                    return punch.coordinate.startAt
                }
                return nil
            }
            let received = try await a.coordinate(to: Identities.b.nodeID)
            await a.executor.cancel((await a.startPunch(received)).id)
            let startB = try #require(await targetStart.value, "round \(round)")
            let skew = received.startAt > startB ? received.startAt - startB : startB - received.startAt
            skews.append(skew)
        }
        #expect(skews.allSatisfy { $0 < .milliseconds(10) }, "start skews \(skews)")
        // The server measured it too, from the coordinate acks.
        #expect(await eventually { await harness.server.statistics().recentSkews.count == 3 })
        // The server's figure is an estimate (midpoint of send and ack), so one sample can carry a scheduling
        // hiccup of a loaded machine: the median must be within 10 ms, and every sample well under the 38 ms an
        // uncompensated start would show.
        let measured = await harness.server.statistics().recentSkews
        let median = measured.sorted().dropFirst(measured.count / 2).first ?? .seconds(1)
        #expect(median < .milliseconds(10), "server-measured skews \(measured)")
        #expect(measured.allSatisfy { $0 < .milliseconds(25) }, "server-measured skews \(measured)")
        await harness.stop(a, b)
    }

    @Test("keep-alives hold a registration past its TTL; a closed client's registration goes away")
    func keepAlive() async throws {
        let harness = try await Harness.start(state: .init(registrationTTL: .milliseconds(600)))
        let a = try await harness.client(Identities.a)
        let confirmed = try await a.connect()
        #expect(confirmed.keepAliveMilliseconds == 200)
        // Three TTLs later it is still registered thanks to keep-alives.
        let start = ContinuousClock.now
        #expect(await eventually(.seconds(3)) { ContinuousClock.now - start > .milliseconds(1800) })
        #expect(await harness.server.isRegistered(Identities.a.nodeID))
        await a.close()
        #expect(await eventually { !(await harness.server.isRegistered(Identities.a.nodeID)) })
        await harness.stop(a)
    }

    @Test("NAT discovery over the punch socket against the rendezvous's STUN responder: no NAT on loopback")
    func discovery() async throws {
        let harness = try await Harness.start(stun: true)
        let a = try await harness.client(Identities.a)
        let confirmed = try await a.connect()
        let stun = try #require(confirmed.stunServer)
        #expect(stun == harness.server.stunAddresses.first)
        let behaviour = try await withDeadline(.seconds(15)) { try await a.discoverNAT() }
        #expect(behaviour.reflexiveAddress == a.executor.endpoint.localAddress)
        #expect(behaviour.evidence.natDetected == false)
        // Publish it: the registration carries the profile.
        _ = try await a.register(Registration(nat: NATProfile(behaviour)))
        await harness.stop(a)
    }
}
