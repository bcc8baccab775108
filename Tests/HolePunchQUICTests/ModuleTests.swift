import Testing
@testable import HolePunchQUIC

@Suite struct HolePunchQUICModuleTests {
    @Test func moduleLoads() {
        #expect(Bool(true))
    }
}
