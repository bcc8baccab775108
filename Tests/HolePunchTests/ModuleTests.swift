import Testing
@testable import HolePunch

@Suite struct HolePunchModuleTests {
    @Test func moduleLoads() {
        #expect(Bool(true))
    }
}
