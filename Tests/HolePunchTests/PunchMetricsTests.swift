import HolePunchNet
import HolePunchStrategy
import MetricsTestKit
import Testing
@testable import HolePunch

@Suite("Punch metrics", .serialized)
struct PunchMetricsTests {
    @Test("attempts are counted by outcome, strategy and NAT pair; time to connect and active punches are recorded")
    func recorded() async throws {
        let metrics = TestMetrics()
        let a = try await bindEndpoint(PunchIdentities.a)
        let b = try await bindEndpoint(PunchIdentities.b)
        let initiator = PunchExecutor(endpoint: a, metricsFactory: metrics)
        let target = PunchExecutor(endpoint: b)
        let key = sessionKey()
        var targetOptions = options(to: a, session: "m1", key: key, role: .target, expecting: PunchIdentities.a.nodeID)
        targetOptions.localNAT = NATProfile(legacy: .fullCone)
        let targetHandle = await target.startPunch(targetOptions)
        var initiatorOptions = options(to: b, session: "m1", key: key, role: .initiator, expecting: PunchIdentities.b.nodeID)
        initiatorOptions.localNAT = NATProfile(legacy: .portRestricted)
        initiatorOptions.remoteNAT = NATProfile(legacy: .fullCone)
        _ = try await initiator.punch(initiatorOptions)
        _ = try await targetHandle.value()

        let success = try metrics.expectCounter("holepunch.punch.attempts", [
            ("outcome", "success"), ("strategy", "test-fixed"), ("nat_pair", "port_restricted/full_cone"),
        ])
        #expect(success.totalValue == 1)
        let timer = try metrics.expectTimer("holepunch.punch.time_to_connect")
        #expect(timer.values.count == 1)
        let active = try metrics.expectMeter("holepunch.punch.active")
        #expect(active.lastValue == 0)

        // A failure is counted under its code.
        let silent = try SilentSocket()
        var failing = options(to: b, ports: [silent.port], session: "m2", key: key, role: .initiator,
                              expecting: PunchIdentities.b.nodeID,
                              strategy: FixedStrategy(perRound: 1, interval: .milliseconds(10), rounds: 2))
        failing.localNAT = NATProfile(legacy: .portRestricted)
        failing.remoteNAT = NATProfile(legacy: .fullCone)
        await #expect(throws: PunchError.self) { _ = try await initiator.punch(failing) }
        let failed = try metrics.expectCounter("holepunch.punch.attempts", [
            ("outcome", "allPortsFailed"), ("strategy", "test-fixed"), ("nat_pair", "port_restricted/full_cone"),
        ])
        #expect(failed.totalValue == 1)
        await a.close()
        await b.close()
    }
}
