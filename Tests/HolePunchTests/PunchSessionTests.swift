import HolePunchNet
import HolePunchStrategy
import Testing
@testable import HolePunch

/// Drives the punch state machine synchronously: no sockets, no clock.
@Suite("Punch session state machine")
struct PunchSessionTests {
    static let ms: UInt64 = 1_000_000
    static let host = SocketAddress.loopbackV4(port: 0)
    static func address(_ port: UInt16) -> SocketAddress { .loopbackV4(port: port) }

    static func session(
        role: PunchRole = .initiator, ports: [UInt16] = [4000, 4001, 4002], rounds: Int = 3,
        perRound: Int = 3, dialDirect: Bool = false, timeout: UInt64 = 2000, sockets: Int = 1
    ) -> PunchSession {
        let plan = PunchPlan(
            ports: PortList(ports: ports), localSockets: sockets, packetsPerRound: perRound,
            interval: .milliseconds(100), rounds: rounds, timeout: .milliseconds(Int64(timeout)),
            connectTimeout: .milliseconds(500), startDelay: .zero, initialRTT: .milliseconds(50),
            dialCandidatesDirectly: dialDirect
        )
        return PunchSession(PunchSession.Configuration(
            role: role, candidates: ports.map(address), plan: plan, startAt: 1000 * ms, deadline: (1000 + timeout) * ms
        ))
    }

    @Test("scheduled → probing sends the first round and arms the next")
    func start() {
        var session = Self.session()
        #expect(session.phase == .scheduled)
        let actions = session.handle(.start(now: 1000 * Self.ms))
        #expect(session.phase == .probing)
        #expect(actions.contains(.sendProbes([4000, 4001, 4002].map { .init(socket: 0, to: Self.address($0)) })))
        #expect(actions.contains(.armTimer(at: 1100 * Self.ms)))
        #expect(session.portsTried == [4000, 4001, 4002])
        #expect(session.round == 1)
    }

    @Test("a peer probing from ever new source addresses is answered, but only 64 paths are remembered as proven")
    func provenPathsAreBounded() {
        var session = Self.session(role: .target)
        _ = session.handle(.start(now: 1000 * Self.ms))
        var answered = 0, proven = 0
        for port in UInt16(10_000)..<UInt16(10_200) {
            for action in session.handle(.probeRequest(from: Self.address(port), socket: 0)) {
                if case .respond = action { answered += 1 }
                if case .pathProven = action { proven += 1 }
            }
        }
        #expect(answered == 200)
        #expect(proven == PunchSession.maxProvenPaths)
        #expect(session.provenAddresses.count == PunchSession.maxProvenPaths)
    }

    @Test("a timer before the start instant starts the session")
    func timerStarts() {
        var session = Self.session()
        _ = session.handle(.timer(now: 1000 * Self.ms))
        #expect(session.phase == .probing)
    }

    @Test("probing → connecting on a verified answer; connecting → succeeded when the dial completes")
    func initiatorSuccess() {
        var session = Self.session()
        _ = session.handle(.start(now: 1000 * Self.ms))
        let answered = session.handle(.probeResponse(from: Self.address(4002), socket: 0))
        #expect(answered.contains(.dial(id: 1, socket: 0, to: Self.address(4002))))
        #expect(answered.contains(.pathProven(Self.address(4002))))
        #expect(session.phase == .connecting)
        let done = session.handle(.dialEstablished(id: 1))
        #expect(done == [.succeed(connection: 1)])
        #expect(session.phase == .succeeded)
    }

    @Test("a probe request is always answered, and proves the path")
    func requestAnswered() {
        var session = Self.session(role: .target)
        _ = session.handle(.start(now: 1000 * Self.ms))
        let actions = session.handle(.probeRequest(from: Self.address(4001), socket: 0))
        #expect(actions.first == .respond(socket: 0, to: Self.address(4001)))
        #expect(!actions.contains { if case .dial = $0 { return true } else { return false } }, "the target never dials")
        #expect(session.phase == .probing)
        #expect(session.handle(.accepted(id: 7)) == [.succeed(connection: 7)])
        #expect(session.phase == .succeeded)
    }

    @Test("rounds advance on the timer; the window walks the port list")
    func rounds() {
        var session = Self.session(ports: [1, 2, 3, 4, 5], rounds: 3, perRound: 2)
        _ = session.handle(.start(now: 1000 * Self.ms))
        #expect(session.portsTried == [1, 2])
        _ = session.handle(.timer(now: 1100 * Self.ms))
        #expect(session.round == 2)
        #expect(session.portsTried == [1, 2, 3, 4])
        _ = session.handle(.timer(now: 1200 * Self.ms))
        #expect(session.portsTried == [1, 2, 3, 4, 5])
    }

    @Test("rounds exhausted without an answer → allPortsFailed after a grace interval")
    func allPortsFailed() {
        var session = Self.session(rounds: 2)
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.timer(now: 1100 * Self.ms))
        #expect(session.phase == .probing)
        let actions = session.handle(.timer(now: 1200 * Self.ms))
        #expect(actions.last == .fail(.allPortsFailed))
        #expect(session.phase == .failed(.allPortsFailed))
    }

    @Test("the deadline fires timeout, even mid-probing")
    func timeout() {
        var session = Self.session(rounds: 50, timeout: 300)
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.timer(now: 1100 * Self.ms))
        let actions = session.handle(.timer(now: 1300 * Self.ms))
        #expect(actions.last == .fail(.timeout))
        #expect(session.phase == .failed(.timeout))
    }

    @Test("a proven path keeps the punch alive past the rounds, until the deadline")
    func provenWaitsForDeadline() {
        var session = Self.session(role: .target, rounds: 1, timeout: 1000)
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeRequest(from: Self.address(4000), socket: 0))
        let actions = session.handle(.timer(now: 1100 * Self.ms))
        #expect(actions == [.armTimer(at: 2000 * Self.ms)])
        #expect(session.handle(.timer(now: 2000 * Self.ms)).last == .fail(.timeout))
    }

    @Test("every candidate unreachable → unreachable")
    func unreachable() {
        var session = Self.session(ports: [1, 2])
        _ = session.handle(.start(now: 1000 * Self.ms))
        #expect(session.handle(.unreachable(Self.address(1))).isEmpty)
        #expect(session.handle(.unreachable(Self.address(99))).isEmpty, "addresses outside the candidates are ignored")
        #expect(session.handle(.unreachable(Self.address(2))) == [.fail(.unreachable)])
    }

    @Test("a dial that meets the wrong NodeID fails the punch with peerAuthenticationFailed")
    func authenticationFailure() {
        var session = Self.session()
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        #expect(session.handle(.dialFailed(id: 1, authentication: true)) == [.fail(.peerAuthenticationFailed)])
    }

    @Test("a failed handshake on a proven path is dialled again, at most three times, then probing resumes")
    func dialFailureRedials() {
        var session = Self.session()
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        for attempt in 1...PunchSession.maxRedials {
            let actions = session.handle(.dialFailed(id: attempt, authentication: false))
            #expect(actions == [.dial(id: attempt + 1, socket: 0, to: Self.address(4000))])
            #expect(session.phase == .connecting)
        }
        #expect(session.handle(.dialFailed(id: PunchSession.maxRedials + 1, authentication: false)).isEmpty)
        #expect(session.phase == .probing)
        // A fresh proof of the path dials it again.
        let again = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        #expect(again.contains(.dial(id: PunchSession.maxRedials + 2, socket: 0, to: Self.address(4000))))
    }

    @Test("a birthday punch dials from the local socket the proof arrived on, and retries on that socket")
    func dialFollowsTheProvingSocket() {
        // A birthday punch from a random-allocation NAT: socket 0's mapping is one of many, which the peer's
        // port-dependent filter most likely drops; the peer's probe then arrives on extra socket 7, the only one
        // with a mapping it lets in. So a punch with several sockets makes no direct dial (it would be the one
        // nomination in flight and hold the proven socket back) and dials socket 7 as soon as it is proven.
        var session = Self.session(ports: [4000], dialDirect: true, sockets: 8)
        let started = session.handle(.start(now: 1000 * Self.ms))
        #expect(!started.contains { if case .dial = $0 { true } else { false } })
        let proven = session.handle(.probeRequest(from: Self.address(4000), socket: 7))
        #expect(proven.contains(.dial(id: 1, socket: 7, to: Self.address(4000))))
        // A failed handshake on the proven path is retried on the same socket.
        #expect(session.handle(.dialFailed(id: 1, authentication: false)) == [.dial(id: 2, socket: 7, to: Self.address(4000))])
        #expect(session.handle(.dialEstablished(id: 2)) == [.succeed(connection: 2)])
    }

    @Test("the seed's direct mode dials the first candidate only; its failure without a proof leaves the punch probing")
    func directDialIsOneNomination() {
        var session = Self.session(ports: [4000, 4001, 4002], dialDirect: true)
        let started = session.handle(.start(now: 1000 * Self.ms))
        #expect(started.filter { if case .dial = $0 { true } else { false } } == [.dial(id: 1, socket: 0, to: Self.address(4000))])
        #expect(session.handle(.dialFailed(id: 1, authentication: false)).isEmpty)
        #expect(session.phase == .probing)
        // The next proof is dialled.
        #expect(session.handle(.probeResponse(from: Self.address(4002), socket: 0)).contains(.dial(id: 2, socket: 0, to: Self.address(4002))))
    }

    @Test("handshakes over proven paths run one at a time, oldest proof first; the next path is dialled when one is exhausted")
    func provenPathsOneAtATime() {
        // The target keeps the first handshake it completes: two racing handshakes over different paths could
        // leave the sides holding different connections.
        var session = Self.session(ports: [4000, 4001])
        _ = session.handle(.start(now: 1000 * Self.ms))
        #expect(session.handle(.probeRequest(from: Self.address(4000), socket: 3)).contains(.dial(id: 1, socket: 3, to: Self.address(4000))))
        let second = session.handle(.probeRequest(from: Self.address(4000), socket: 5))
        let third = session.handle(.probeResponse(from: Self.address(4001), socket: 0))
        #expect(!second.contains { if case .dial = $0 { true } else { false } })
        #expect(!third.contains { if case .dial = $0 { true } else { false } })
        // Path (3, 4000) fails, then its redials fail: the next proven path is (5, 4000).
        var id = 1
        for _ in 0..<PunchSession.maxRedials {
            #expect(session.handle(.dialFailed(id: id, authentication: false)) == [.dial(id: id + 1, socket: 3, to: Self.address(4000))])
            id += 1
        }
        #expect(session.handle(.dialFailed(id: id, authentication: false)) == [.dial(id: id + 1, socket: 5, to: Self.address(4000))])
        #expect(session.handle(.dialEstablished(id: id + 1)) == [.succeed(connection: id + 1)])
    }

    @Test("cancel ends the session in every phase, abandoning dials; twice is a no-op")
    func cancelEveryPhase() {
        var scheduled = Self.session()
        #expect(scheduled.handle(.cancel) == [.fail(.cancelled)])
        var probing = Self.session()
        _ = probing.handle(.start(now: 1000 * Self.ms))
        #expect(probing.handle(.cancel) == [.fail(.cancelled)])
        var connecting = Self.session()
        _ = connecting.handle(.start(now: 1000 * Self.ms))
        _ = connecting.handle(.probeResponse(from: Self.address(4000), socket: 0))
        #expect(connecting.handle(.cancel) == [.abandonDial(id: 1), .fail(.cancelled)])
        var succeeded = Self.session()
        _ = succeeded.handle(.start(now: 1000 * Self.ms))
        _ = succeeded.handle(.probeResponse(from: Self.address(4000), socket: 0))
        _ = succeeded.handle(.dialEstablished(id: 1))
        #expect(succeeded.handle(.cancel).isEmpty)
        #expect(succeeded.phase == .succeeded)
        #expect(probing.handle(.cancel).isEmpty)
    }

    @Test("a late probe after success is ignored")
    func lateProbe() {
        var session = Self.session()
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        _ = session.handle(.dialEstablished(id: 1))
        #expect(session.handle(.probeResponse(from: Self.address(4001), socket: 0)).isEmpty)
        #expect(session.handle(.probeRequest(from: Self.address(4001), socket: 0)).isEmpty)
        #expect(session.handle(.timer(now: 5000 * Self.ms)).isEmpty)
        #expect(session.phase == .succeeded)
    }

    @Test("duplicate connections are tie-broken: the first wins, others are closed")
    func duplicates() {
        var session = Self.session(dialDirect: true)
        let started = session.handle(.start(now: 1000 * Self.ms))
        let dials = started.filter { if case .dial = $0 { return true } else { return false } }
        #expect(dials.count == 1, "the seed's mode dials the first candidate directly, one nomination at a time")
        #expect(session.handle(.dialEstablished(id: 1)) == [.succeed(connection: 1)])
        // A connection that completes anyway after the end is closed, never delivered.
        #expect(session.handle(.dialEstablished(id: 3)) == [.closeDuplicate(id: 3)])
        var target = Self.session(role: .target)
        _ = target.handle(.start(now: 1000 * Self.ms))
        _ = target.handle(.accepted(id: 10))
        #expect(target.handle(.accepted(id: 11)) == [.closeDuplicate(id: 11)])
    }

    @Test("no candidates at all → unreachable at the start")
    func noCandidates() {
        var session = Self.session(ports: [])
        #expect(session.handle(.start(now: 1000 * Self.ms)) == [.fail(.unreachable)])
    }
}

extension PunchSessionTests {
    @Test("once the peer answered a probe, later rounds send nothing (but requests are still answered)")
    func quietWhenBothWaysOpen() {
        var session = Self.session(role: .target, rounds: 5)
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        let next = session.handle(.timer(now: 1100 * Self.ms))
        #expect(next.contains(.sendProbes([])))
        #expect(session.handle(.probeRequest(from: Self.address(4000), socket: 0)).first == .respond(socket: 0, to: Self.address(4000)))
    }
}

extension PunchSessionTests {
    @Test("a replaced plan takes effect from the next round: new ports, new deadline")
    func replacePlan() {
        var session = Self.session(ports: [1, 2], rounds: 5, perRound: 1, timeout: 1000)
        _ = session.handle(.start(now: 1000 * Self.ms))
        var wider = session.configuration.plan
        wider.ports = PortList(ports: [7, 8, 9])
        wider.timeout = .milliseconds(3000)
        session.replacePlan(wider, candidates: [7, 8, 9].map(Self.address))
        _ = session.handle(.timer(now: 1100 * Self.ms))
        #expect(session.portsTried == [1, 7])
        #expect(session.configuration.deadline == 4000 * Self.ms)
    }
}

extension PunchSessionTests {
    @Test("the session knows the winning path: a dial's socket and address, an accepted connection's socket")
    func winningPathIsTheSessions() {
        var initiator = Self.session()
        _ = initiator.handle(.start(now: 1000 * Self.ms))
        _ = initiator.handle(.probeResponse(from: Self.address(4001), socket: 0))
        #expect(initiator.winningSocket == nil)
        _ = initiator.handle(.dialEstablished(id: 1))
        #expect(initiator.winningSocket == 0)
        #expect(initiator.winningAddress == Self.address(4001))

        var target = Self.session(role: .target)
        _ = target.handle(.start(now: 1000 * Self.ms))
        let id = target.acceptedConnectionID()
        #expect(id != target.acceptedConnectionID(), "accept ids are never reused")
        #expect(target.handle(.accepted(id: id, socket: 2)) == [.succeed(connection: id)])
        #expect(target.winningSocket == 2)
        #expect(target.winningAddress == nil)
    }
}

extension PunchSessionTests {
    @Test("rounds pause while both ways are open and a dial is in flight, and resume where they stopped when it fails")
    func roundsPauseDuringTheHandshake() {
        var session = Self.session(rounds: 10)
        _ = session.handle(.start(now: 1000 * Self.ms))
        #expect(session.handle(.probeResponse(from: Self.address(4000), socket: 0)).contains(.dial(id: 1, socket: 0, to: Self.address(4000))))
        // The round already armed runs; it sends nothing and arms only the deadline.
        let quiet = session.handle(.timer(now: 1100 * Self.ms))
        #expect(quiet.contains(.sendProbes([])))
        #expect(quiet.contains(.armTimer(at: 3000 * Self.ms)), "armed: \(quiet)")
        #expect(!quiet.contains(.armTimer(at: 1200 * Self.ms)))
        // A redial keeps them paused; the last failure resumes them one interval after the last round.
        for attempt in 1...PunchSession.maxRedials {
            #expect(session.handle(.dialFailed(id: attempt, authentication: false)) == [.dial(id: attempt + 1, socket: 0, to: Self.address(4000))])
        }
        #expect(session.handle(.dialFailed(id: PunchSession.maxRedials + 1, authentication: false)) == [.armTimer(at: 1200 * Self.ms)])
        let resumed = session.handle(.timer(now: 1200 * Self.ms))
        #expect(resumed.contains(.roundStarted(3)))
        #expect(resumed.contains(.armTimer(at: 1300 * Self.ms)))
    }

    /// A target whose peer answered its first round: its second round (at 1100 ms) pauses the rounds.
    static func pausedTarget() -> (session: PunchSession, secondRound: [PunchSession.Action]) {
        var session = Self.session(role: .target, rounds: 10)
        _ = session.handle(.start(now: 1000 * Self.ms))
        _ = session.handle(.probeResponse(from: Self.address(4000), socket: 0))
        let secondRound = session.handle(.timer(now: 1100 * Self.ms))
        return (session, secondRound)
    }

    @Test("a target's rounds pause once both ways are open; the deadline still ends the punch")
    func targetRoundsPause() {
        var (session, secondRound) = Self.pausedTarget()
        #expect(secondRound.contains(.armTimer(at: 3000 * Self.ms)))
        #expect(session.handle(.timer(now: 3000 * Self.ms)) == [.fail(.timeout)])
    }

    @Test("a plan replaced while rounds are paused re-arms the timer at its deadline, so a shorter timeout still ends the punch on time")
    func replacedPlanWhilePaused() {
        var (session, secondRound) = Self.pausedTarget()
        #expect(secondRound.contains(.armTimer(at: 3000 * Self.ms)))
        var shorter = session.configuration.plan
        shorter.timeout = .milliseconds(500)
        #expect(session.replacePlan(shorter, candidates: session.configuration.candidates) == [.armTimer(at: 1500 * Self.ms)])
        #expect(session.handle(.timer(now: 1500 * Self.ms)) == [.fail(.timeout)])
    }
}
