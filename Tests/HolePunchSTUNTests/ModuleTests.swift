import Testing
@testable import HolePunchSTUN

@Suite struct HolePunchSTUNModuleTests {
    @Test func moduleLoads() {
        #expect(Bool(true))
    }
}
