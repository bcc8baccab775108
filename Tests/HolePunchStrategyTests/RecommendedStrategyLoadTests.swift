import Testing
@testable import HolePunchStrategy

/// Every `PunchExecutor.Configuration()` gets `FallbackStrategy.recommended()`: its Lua state must cost nothing until
/// a punch plans with it (one executor per socket in `bench punch` made 1001 states and used none).
@Suite("The recommended strategy's Lua state")
struct RecommendedStrategyLoadTests {
    @Test("the recommended strategy makes its Lua state on first use, not when created")
    func loadsOnFirstUse() async {
        let strategy = FallbackStrategy.recommended()
        #expect(!strategy.hasLoadedPrimary)
        let decision = await strategy.detachedDecision(LuaTests.ctx)
        #expect(strategy.hasLoadedPrimary)
        #expect(decision.plannedBy == "default")
        #expect(strategy.primary is LuaStrategy)
        #expect(strategy.lastError == nil)
    }
}
