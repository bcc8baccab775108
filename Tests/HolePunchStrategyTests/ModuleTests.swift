import Testing
@testable import HolePunchStrategy

@Suite struct HolePunchStrategyModuleTests {
    @Test func moduleLoads() {
        #expect(Bool(true))
    }
}
