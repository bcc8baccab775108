import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

/// A valid coordinate message, as the rendezvous would forward it.
func sampleCoordinate(nat: NATProfile = .symmetricSequential) -> Coordinate {
    Coordinate(
        requestID: nil, sessionID: "0123456789abcdef0123456789abcdef", sessionKey: [UInt8](repeating: 7, count: 32),
        peer: node(2), candidates: [Candidate(kind: .serverReflexive, address: addrA),
                                    Candidate(kind: .host, address: try! SocketAddress(parsing: "192.168.1.20:5000"))], peerNAT: nat,
        role: .target, startDelayMicroseconds: 150_000, peerRTTMicroseconds: 20_000
    )
}

/// The JSON body of `message` with every value stored under `key` (at any depth) replaced by `value`.
func body<M: Encodable>(_ message: M, setting key: String, to value: Any) throws -> [UInt8] {
    func replace(_ node: Any) -> Any {
        if var object = node as? [String: Any] {
            for (k, v) in object { object[k] = k == key ? value : replace(v) }
            return object
        }
        if let array = node as? [Any] { return array.map(replace) }
        return node
    }
    let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(message))
    return Array(try JSONSerialization.data(withJSONObject: replace(json)))
}

@Suite("Peer input: what a peer publishes is validated where it is decoded")
struct PeerInputTests {
    @Test("a coordinate carrying an Int.max port delta is refused at decode, never planned into a trap")
    func intMaxPortDeltaThroughCoordinate() throws {
        for delta in [Int.max, Int.min, Int.max / 2, 65536, -65536] {
            let bytes = try body(ServerMessage.coordinate(sampleCoordinate()), setting: "portDelta", to: delta)
            do {
                let message = try RendezvousFraming.decode(ServerMessage.self, from: bytes)
                // Unfixed code gets here and traps in DefaultStrategy.plan ("arithmetic overflow").
                if case .coordinate(let c) = message {
                    let ctx = PunchContext(localNAT: .unknown, remoteNAT: c.peerNAT, candidatePorts: c.candidates.map(\.address.port))
                    _ = DefaultStrategy().plan(ctx)
                }
                Issue.record("a port delta of \(delta) was accepted")
            } catch {
                #expect(error.code == .protocolViolation)
            }
        }
    }
}

@Suite("Peer input: decoders refuse values outside RendezvousMessageLimits")
struct DecoderLimitTests {
    func refused(_ bytes: [UInt8]) -> Bool {
        do {
            _ = try RendezvousFraming.decode(ServerMessage.self, from: bytes)
            return false
        } catch {
            return error.code == .protocolViolation
        }
    }

    @Test("a coordinate's start delay, RTT, confidence, session id and key and candidate count are range-checked")
    func coordinateFields() throws {
        let message = ServerMessage.coordinate(sampleCoordinate())
        #expect(!refused(Array(RendezvousFraming.frame(message).dropFirst(4))), "the sample itself is valid")
        #expect(refused(try body(message, setting: "startDelayMicroseconds", to: Int64.max)))
        #expect(refused(try body(message, setting: "startDelayMicroseconds", to: -1)))
        #expect(refused(try body(message, setting: "peerRTTMicroseconds", to: Int64.min)))
        #expect(refused(try body(message, setting: "confidence", to: 1e300)))
        #expect(refused(try body(message, setting: "confidence", to: -0.5)))
        #expect(refused(try body(message, setting: "sessionID", to: "abc:def")))
        #expect(refused(try body(message, setting: "sessionID", to: String(repeating: "a", count: 65))))
        #expect(refused(try body(message, setting: "sessionID", to: "")))
        #expect(refused(try body(message, setting: "sessionKey", to: [Int](repeating: 1, count: 4))))
        #expect(refused(try body(message, setting: "candidates", to: [String]())))
        let host: [String: Any] = ["kind": "host", "address": "192.168.1.2:5000",
                                   "priority": Candidate.priority(kind: .host, family: .ipv4)]
        #expect(refused(try body(message, setting: "candidates", to: [[String: Any]](repeating: host, count: 100))))
    }

    @Test("registered timers, error strings and client session ids and outcomes are range-checked")
    func otherMessages() throws {
        let registered = ServerMessage.registered(Registered(observedAddress: addrA, ttlMilliseconds: 30_000,
                                                             keepAliveMilliseconds: 10_000, stunServer: nil))
        #expect(refused(try body(registered, setting: "ttlMilliseconds", to: Int.max)))
        #expect(refused(try body(registered, setting: "keepAliveMilliseconds", to: 0)))
        let reply = ServerMessage.error(ErrorReply(requestID: 1, code: "rateLimited", message: "slow down"))
        #expect(refused(try body(reply, setting: "message", to: String(repeating: "x", count: 5000))))
        #expect(refused(try body(reply, setting: "code", to: String(repeating: "x", count: 65))))

        func clientRefused(_ message: ClientMessage) -> Bool {
            do {
                _ = try RendezvousFraming.decode(ClientMessage.self, from: Array(RendezvousFraming.frame(message).dropFirst(4)))
                return false
            } catch {
                return error.code == .protocolViolation
            }
        }
        #expect(!clientRefused(.punchResult(sessionID: "abc", outcome: "connected")))
        #expect(clientRefused(.punchResult(sessionID: "abc", outcome: String(repeating: "o", count: 1000))))
        #expect(clientRefused(.coordinateAck(sessionID: "a:b")))
        let lan = [SocketAddress](repeating: try SocketAddress(parsing: "192.168.1.2:5000"), count: 50)
        #expect(clientRefused(.register(Registration(lanAddresses: lan))))
        let nat = try body(ClientMessage.register(Registration(nat: .symmetricSequential)), setting: "portDelta", to: Int.min)
        #expect(throws: RendezvousError.self) { try RendezvousFraming.decode(ClientMessage.self, from: nat) }
    }
}

@Suite("Peer input: the server refuses dangerous LAN addresses and limits coordinations per target")
struct ServerPeerInputTests {
    @Test("registration with a multicast, broadcast, unspecified or foreign-scope LAN address is refused")
    func dangerousLAN() throws {
        let observed = try SocketAddress(parsing: "198.51.100.7:4000")
        for text in ["224.0.0.1:5000", "255.255.255.255:5000", "0.0.0.0:5000", "127.0.0.1:22", "169.254.1.1:80",
                     "[ff02::1]:5000", "[::ffff:127.0.0.1]:22", "8.8.8.8:53"] {
            var state = RendezvousState()
            let actions = state.register(node: node(1), connection: 1, observed: observed,
                                         registration: Registration(lanAddresses: [try SocketAddress(parsing: text)]), now: .zero)
            #expect(errorCode(actions) == RendezvousError.Code.protocolViolation.name, "\(text) was accepted")
            #expect(state.peer(node(1)) == nil)
        }
        var state = RendezvousState()
        let ok = state.register(node: node(1), connection: 1, observed: observed,
                                registration: Registration(lanAddresses: [try SocketAddress(parsing: "192.168.1.5:4000")]),
                                now: .zero)
        #expect(errorCode(ok) == nil)
    }

    @Test("many requesters cannot flood one target: coordinations to it are rate-limited per target")
    func perTargetRate() {
        var state = RendezvousState()
        _ = state.register(node: node(99), connection: 99, observed: addrB, registration: Registration(), now: .zero)
        var started = 0
        var limited = 0
        for i in 1...60 {
            let requester = node(UInt8(i))
            _ = state.register(node: requester, connection: UInt64(i), observed: addrA, registration: Registration(), now: .zero)
            let actions = state.requestPunch(from: requester, requestID: 1, target: node(99),
                                             secret: secret("s\(i)"), now: .zero)
            if !coordinates(actions).isEmpty { started += 1 }
            if errorCode(actions) == RendezvousError.Code.rateLimited.name { limited += 1 }
        }
        #expect(started == Int(RendezvousState.Configuration().targetRateBurst))
        #expect(limited == 60 - started)
        // One requester alone cannot use up a target's bucket: its own runs out first.
        var single = RendezvousState()
        _ = single.register(node: node(99), connection: 99, observed: addrB, registration: Registration(), now: .zero)
        _ = single.register(node: node(1), connection: 1, observed: addrA, registration: Registration(), now: .zero)
        for i in 1...20 {
            _ = single.requestPunch(from: node(1), requestID: UInt64(i), target: node(99), secret: secret("t\(i)"), now: .zero)
        }
        _ = single.register(node: node(2), connection: 2, observed: addrA, registration: Registration(), now: .zero)
        let honest = single.requestPunch(from: node(2), requestID: 1, target: node(99), secret: secret("h"), now: .zero)
        #expect(coordinates(honest).count == 2)
    }
}

@Suite("Peer input: the client never aims probes at addresses a peer cannot mean", .serialized)
struct ClientCandidateTests {
    func received(_ candidates: [String]) throws -> ReceivedCoordinate {
        var c = sampleCoordinate()
        c.candidates = try candidates.enumerated().map { index, text in
            Candidate(kind: index == 0 ? .serverReflexive : .host, address: try SocketAddress(parsing: text))
        }
        return ReceivedCoordinate(coordinate: c, receivedAt: .now)
    }

    func client(server: String) async throws -> RendezvousClient {
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.a, acceptPolicy: .none))
        return RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: RendezvousClientConfiguration(
            server: try SocketAddress(parsing: server), serverNodeID: node(9)))
    }

    @Test("with a public rendezvous, loopback, broadcast and multicast candidates are never chosen")
    func loopbackRefused() async throws {
        let client = try await client(server: "198.51.100.1:3478")
        for list in [["127.0.0.1:22"], ["255.255.255.255:9"], ["224.0.0.251:5353"], ["0.0.0.0:1"]] {
            var host: String?
            do { host = try await client.options(for: received(list)).targetHost } catch {}
            #expect(host == nil, "\(list) was chosen")
        }
        await client.executor.endpoint.close()
    }

    @Test("with a loopback rendezvous (tests, demos) the observed loopback address stays usable")
    func loopbackAllowedOnLoopback() async throws {
        let client = try await client(server: "127.0.0.1:3478")
        let options = try await client.options(for: received(["127.0.0.1:4000"]))
        #expect(options.targetHost == "127.0.0.1")
        #expect(options.targetPorts == [4000])
        await client.executor.endpoint.close()
    }
}

@Suite("Peer input: the target decides who may make it punch", .serialized)
struct AdmissionTests {
    @Test("a requester outside the target's allow-list starts no punch there, and the rendezvous hears 'refused'")
    func refusedByAllowList() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.b, acceptPolicy: .none))
        var configuration = RendezvousClientConfiguration(server: harness.server.address, serverNodeID: harness.server.nodeID,
                                                          requestTimeout: .seconds(5), punchTimeout: .seconds(10))
        configuration.admission = .allowList([Identities.c.nodeID])
        let b = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration)
        _ = try await a.connect()
        _ = try await b.connect()
        let received = try await a.coordinate(to: Identities.b.nodeID)
        #expect(await eventually(.seconds(10)) { await b.refusedCoordinates == 1 })
        #expect(await b.executor.activePunches().isEmpty)
        // B's 'refused' result ended the session on the server.
        #expect(await eventually(.seconds(10)) { await harness.server.statistics().sessions == 0 })
        _ = received
        await harness.stop(a, b)
    }

    @Test("an admission callback sees the requester's NodeID and its yes starts the punch")
    func admittedByCallback() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: Identities.b, acceptPolicy: .none))
        var configuration = RendezvousClientConfiguration(server: harness.server.address, serverNodeID: harness.server.nodeID,
                                                          requestTimeout: .seconds(5), punchTimeout: .seconds(10))
        let asked = Identities.a.nodeID
        configuration.admission = PunchAdmission { $0 == asked }
        let b = RendezvousClient(executor: PunchExecutor(endpoint: endpoint), configuration: configuration)
        _ = try await a.connect()
        _ = try await b.connect()
        let connection = try await withDeadline(.seconds(20)) { try await a.requestPunch(to: Identities.b.nodeID) }
        #expect(connection.peerNodeID == Identities.b.nodeID)
        #expect(await b.refusedCoordinates == 0)
        await connection.close()
        await harness.stop(a, b)
    }
}

@Suite("Peer input: a hostile peer on the public API cannot crash a waiting peer", .serialized)
struct HostilePeerTests {
    @Test("bad profile, bad LAN address and a request flood; then an honest punch to the same peer still works")
    func hostileThenHonest() async throws {
        let harness = try await Harness.start()
        let b = try await harness.client(Identities.b)
        _ = try await b.connect()
        let hostileIdentity = try Identity.generate(commonName: "hostile")

        // 1. A NAT profile no NAT produces: the rendezvous refuses it at decode and drops the connection.
        let h1 = try await harness.client(hostileIdentity)
        var profile = NATProfile.symmetricSequential
        profile.portDelta = .max
        let refusedProfile: Bool
        do {
            _ = try await h1.connect(Registration(nat: profile))
            refusedProfile = false
        } catch {
            refusedProfile = true
        }
        #expect(refusedProfile)
        #expect(await harness.server.statistics().registrations == 1)

        // 2. A "LAN" address that is a multicast group: refused with protocolViolation.
        let h2 = try await harness.client(hostileIdentity)
        let multicast = try SocketAddress(parsing: "224.0.0.251:5353")
        do {
            _ = try await h2.connect(Registration(lanAddresses: [multicast]))
            Issue.record("a multicast LAN address was accepted")
        } catch {
            #expect(error.code == .protocolViolation)
        }

        // 3. A flood of punch requests to B: the rendezvous rate-limits, B runs at most its per-peer cap.
        let h3 = try await harness.client(hostileIdentity)
        _ = try await h3.connect()
        // All at once: sent one after another, a loaded machine can space them out enough for the bucket (2/s,
        // burst 10) to refill, and then nothing is limited.
        let limited = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<14 {
                group.addTask {
                    do {
                        _ = try await h3.coordinate(to: Identities.b.nodeID)
                        return false
                    } catch let error as RendezvousError {
                        return error.code == .rateLimited
                    } catch {
                        return false
                    }
                }
            }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(limited > 0)
        #expect(await b.executor.activePunches().count <= 8)

        // 4. B is alive and an honest peer still punches to it.
        let a = try await harness.client(Identities.a)
        _ = try await a.connect()
        let connection = try await withDeadline(.seconds(30)) { try await a.requestPunch(to: Identities.b.nodeID) }
        #expect(connection.peerNodeID == Identities.b.nodeID)
        await connection.close()
        // Once its punches have ended, B keeps no per-punch task: only its reader and its keep-alive loop.
        #expect(await eventually(.seconds(30)) { await b.executor.activePunches().isEmpty })
        let settled = await eventually { await b.trackedTaskCount == 2 }
        let tracked = await b.trackedTaskCount
        #expect(settled, "B still tracks \(tracked) tasks")
        await harness.stop(a, b, h1, h2, h3)
    }
}
