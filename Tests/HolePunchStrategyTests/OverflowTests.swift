import HolePunchNet
import Testing
@testable import HolePunchStrategy

@Suite("Planner arithmetic never traps on peer-chosen values")
struct PlannerOverflowTests {
    @Test("DefaultStrategy plans with an extreme port delta set after construction")
    func extremeDeltaDefaultStrategy() {
        for delta in [Int.max, Int.min, Int.max - 1, Int.min + 1, 1 << 62, -(1 << 62)] {
            var remote = NATProfile.symmetricSequential
            remote.portDelta = delta
            let ctx = PunchContext(localNAT: .unknown, remoteNAT: remote, candidatePorts: [40000])
            let plan = DefaultStrategy().plan(ctx)
            #expect(plan.ports.ports.first == 40000)
            #expect(plan.ports.allSatisfy { $0 != 0 })
        }
    }
}
