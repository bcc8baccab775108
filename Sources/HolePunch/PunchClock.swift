/// The executor's one clock: `ContinuousClock`, read as nanoseconds since the executor was created, which is the
/// unit `PunchSession` counts its instants in.
///
/// One clock for start instants, timers, elapsed times and `PunchTime.at`, so that an instant computed from one
/// reading is never compared with another clock's reading (the executor used to mix `CLOCK_MONOTONIC`,
/// `ContinuousClock.now` and `Task.sleep(for:)`, which on Linux are not the same clock: continuous counts
/// suspended time, monotonic does not).
struct PunchClock: Sendable {
    /// The instant that reads as 0.
    let origin: ContinuousClock.Instant

    /// A clock that reads 0 now.
    init(origin: ContinuousClock.Instant = .now) {
        self.origin = origin
    }

    /// Nanoseconds since the origin.
    func now() -> UInt64 { nanoseconds(at: .now) }

    /// `instant` in nanoseconds since the origin (0 for an instant before it).
    func nanoseconds(at instant: ContinuousClock.Instant) -> UInt64 {
        instant <= origin ? 0 : HolePunch.nanoseconds(instant - origin)
    }

    /// The instant `nanoseconds` after the origin.
    func instant(at nanoseconds: UInt64) -> ContinuousClock.Instant {
        origin.advanced(by: .nanoseconds(Int64(min(nanoseconds, UInt64(Int64.max)))))
    }

    /// Time from `start` (nanoseconds since the origin) to now; zero before `start`.
    func elapsed(since start: UInt64) -> Duration {
        let now = now()
        return .nanoseconds(Int64(now > start ? now - start : 0))
    }

    /// Suspends until `deadline` (nanoseconds since the origin) on this clock. Throws when the task is cancelled.
    func sleep(until deadline: UInt64) async throws {
        try await Task.sleep(until: instant(at: deadline), clock: .continuous)
    }
}
