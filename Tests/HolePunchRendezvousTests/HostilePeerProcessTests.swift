import Foundation
import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
import ProcessTestSupport
import Testing
@testable import HolePunchRendezvous

/// The hardening issue's end-to-end check, as a user would meet it: a `holepunch rendezvous` process, a
/// `holepunch peer` process waiting for punches, and a hostile peer built on the public Swift API that tries the
/// bad-profile, bad-candidate and flood cases against it. The waiting peer must stay up, and an honest
/// `holepunch peer --connect` must still reach it afterwards.
@Suite("Hostile peer against a waiting holepunch peer process", .serialized)
struct HostilePeerProcessTests {
    /// A client of the rendezvous process at `quic`, made from the public API only.
    func hostileClient(quic: String, dir: URL) async throws -> RendezvousClient {
        let serverID = try NodeID(parsing: String(contentsOf: dir.appendingPathComponent("rdv.id"), encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines))
        let identity = try Identity.generate(commonName: "hostile")
        let endpoint = try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity))
        let executor = PunchExecutor(endpoint: endpoint)
        return RendezvousClient(executor: executor, configuration: RendezvousClientConfiguration(
            server: try SocketAddress(parsing: quic), serverNodeID: serverID, requestTimeout: .seconds(5)))
    }

    @Test("bad profiles, third-party candidates and a punch flood never crash the waiting peer; an honest punch still works")
    func hostileThenHonest() async throws {
        guard let binary = holepunchBinaryOrSkip() else { return }
        let rdv = try await LoopbackRendezvous(binary, prefix: "hp-hostile", extra: ["--no-stun"])
        defer { rdv.close() }
        let (dir, quic) = (rdv.dir, rdv.quic)
        let common = ["peer"] + rdv.peerArguments + ["--no-nat-detect"]
        let (victim, victimText) = try await startWaitingPeer(binary, common, identity: "victim.pem", in: dir)
        defer { victim.stop() }
        let victimID = try NodeID(parsing: victimText)

        // 1. NAT profiles no NAT produces: Int.max / Int.min deltas, a NaN confidence. Each is refused where the
        //    rendezvous decodes it; none reaches the victim's planner.
        for tamper in [{ (p: inout NATProfile) in p.portDelta = .max }, { p in p.portDelta = .min },
                       { p in p.confidence = .nan }] {
            let hostile = try await hostileClient(quic: quic, dir: dir)
            var profile = NATProfile.symmetricSequential
            tamper(&profile)
            do {
                _ = try await hostile.connect(Registration(nat: profile))
                // Accepted (the unhardened server did): ask for a punch, so the victim plans with the profile.
                _ = try? await hostile.coordinate(to: victimID)
                Issue.record("the rendezvous accepted the profile \(profile)")
            } catch {
                #expect(error.code == .protocolViolation || error.code == .disconnected, "\(error)")
            }
            await hostile.close()
            await hostile.executor.endpoint.close()
        }

        // 2. "LAN" candidates that would aim the victim's probes at third parties: refused at registration.
        for lan in ["224.0.0.251:5353", "255.255.255.255:9", "0.0.0.0:9", "203.0.113.9:443", "169.254.1.1:9"] {
            let hostile = try await hostileClient(quic: quic, dir: dir)
            do {
                _ = try await hostile.connect(Registration(lanAddresses: [try SocketAddress(parsing: lan)]))
                _ = try? await hostile.coordinate(to: victimID)
                Issue.record("the rendezvous accepted the LAN address \(lan)")
            } catch {
                #expect((error as? RendezvousError)?.code == .protocolViolation, "\(lan): \(error)")
            }
            await hostile.close()
            await hostile.executor.endpoint.close()
        }

        // 3. A flood of punch requests to the victim: the rendezvous rate-limits the requester, and the victim runs
        //    at most its per-peer cap of punches towards it.
        let flooder = try await hostileClient(quic: quic, dir: dir)
        _ = try await flooder.connect()
        var limited = 0, coordinated = 0
        for _ in 0..<30 {
            do {
                _ = try await flooder.coordinate(to: victimID)
                coordinated += 1
            } catch {
                if error.code == .rateLimited { limited += 1 }
            }
        }
        #expect(limited > 0, "no request was rate-limited (\(coordinated) coordinated)")
        #expect(coordinated > 0)
        #expect(victim.process.isRunning, "the victim died: \(victim.stderr.text)")

        // 4. The victim is alive, and an honest peer process punches to it and gets a line across.
        let honest = try Child(binary, common + ["--identity", "honest.pem", "--connect", victimID.description],
                               directory: dir)
        defer { honest.stop() }
        honest.write("hello victim\n")
        let crossed = await eventually(.seconds(30)) { victim.stdout.text.contains("hello victim") }
        #expect(crossed, "honest: \(honest.stderr.text) | victim: \(victim.stderr.text)")
        #expect(victim.process.isRunning)
        #expect(!victim.stderr.text.contains("Fatal error"))
        await flooder.close()
        await flooder.executor.endpoint.close()
    }
}
