import Testing
@testable import HolePunch

@Suite("Punch clock")
struct PunchClockTests {
    @Test("instants and session nanoseconds convert both ways on the one clock; before the origin reads 0")
    func conversions() {
        let origin = ContinuousClock.now
        let clock = PunchClock(origin: origin)
        #expect(clock.nanoseconds(at: origin.advanced(by: .milliseconds(250))) == 250_000_000)
        #expect(clock.instant(at: 250_000_000) == origin.advanced(by: .milliseconds(250)))
        #expect(clock.nanoseconds(at: origin.advanced(by: .seconds(-1))) == 0)
        #expect(clock.elapsed(since: UInt64.max) == .zero, "a start in the future has no elapsed time")
    }
}
