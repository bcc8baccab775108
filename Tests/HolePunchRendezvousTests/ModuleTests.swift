import Testing
@testable import HolePunchRendezvous

@Suite struct HolePunchRendezvousModuleTests {
    @Test func moduleLoads() {
        #expect(Bool(true))
    }
}
