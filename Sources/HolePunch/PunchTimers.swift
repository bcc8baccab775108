/// The executor's timers: one min-heap of every punch's next deadline and one sleeping task for the earliest.
///
/// A punch re-arms its timer every probe interval (20 ms in the bench): with a sleeping `Task` per arm, one target
/// executor running 1,000 punches created and woke 50,000 tasks a second, more than a core does, and answers waited
/// behind them. Here an arm is a heap push; one task sleeps until the earliest deadline plus
/// ``PunchExecutor/timerSlack`` and then fires, in one turn of the actor, every timer that is due, so timers that
/// fall within the slack of each other share one wake-up (a timer fires at most that much late, never early).
///
/// A punch's newer arm supersedes its older ones through ``PunchRuntime/timerGeneration``: entries of an older
/// generation stay in the heap until they come due (or a compaction drops them) and are then skipped.
struct PunchTimerQueue {
    /// One armed timer.
    struct Entry {
        var deadline: UInt64
        var punch: PunchID
        var generation: Int
    }

    private var heap: [Entry] = []

    /// Armed entries, superseded ones included.
    var count: Int { heap.count }

    /// The earliest deadline armed, if any.
    var earliest: UInt64? { heap.first?.deadline }

    /// Arms an entry.
    mutating func push(_ entry: Entry) {
        heap.append(entry)
        siftUp(heap.count - 1)
    }

    /// Removes and returns the entries due at `now` (deadline ≤ now), earliest first.
    mutating func popDue(now: UInt64) -> [Entry] {
        var due: [Entry] = []
        while let first = heap.first, first.deadline <= now {
            due.append(first)
            let last = heap.removeLast()
            if !heap.isEmpty {
                heap[0] = last
                siftDown(0)
            }
        }
        return due
    }

    /// Keeps only the entries for which `isLive` holds (drops superseded arms and those of ended punches).
    mutating func keep(where isLive: (Entry) -> Bool) {
        heap.removeAll { !isLive($0) }
        for index in stride(from: heap.count / 2 - 1, through: 0, by: -1) { siftDown(index) }
    }

    private mutating func siftUp(_ start: Int) {
        var child = start
        while child > 0 {
            let parent = (child - 1) / 2
            guard heap[child].deadline < heap[parent].deadline else { return }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    private mutating func siftDown(_ start: Int) {
        var parent = start
        while true {
            let left = 2 * parent + 1
            guard left < heap.count else { return }
            let right = left + 1
            let child = right < heap.count && heap[right].deadline < heap[left].deadline ? right : left
            guard heap[child].deadline < heap[parent].deadline else { return }
            heap.swapAt(child, parent)
            parent = child
        }
    }
}

extension PunchExecutor {
    /// How late a timer may fire so that it shares a wake-up with earlier ones: 1 ms, a twentieth of the shortest
    /// probe interval the bundled strategies use, and far below a punch's timeouts.
    static let timerSlack: UInt64 = 1_000_000

    /// Arms `runtime`'s timer for `deadline` (nanoseconds on ``clock``), superseding the one it had.
    func arm(_ runtime: PunchRuntime, at deadline: UInt64) {
        runtime.timerGeneration += 1
        timers.push(PunchTimerQueue.Entry(deadline: deadline, punch: runtime.id, generation: runtime.timerGeneration))
        // While due timers fire, the batch reschedules once at its end.
        if !firingTimers { scheduleTimerSleeper() }
    }

    /// Disarms `runtime`'s timer: its armed entry is skipped when it comes due. When no punch runs, the heap empties
    /// and the sleeper stops, so an idle executor keeps no task (nor itself) alive.
    func disarm(_ runtime: PunchRuntime) {
        runtime.timerGeneration += 1
        if runtimes.isEmpty {
            timers = PunchTimerQueue()
            stopTimerSleeper()
        }
    }

    /// Makes sure one task sleeps until the earliest armed deadline plus the slack: a new one only when none sleeps
    /// or the one that does would wake too late.
    private func scheduleTimerSleeper() {
        guard let earliest = timers.earliest else { return stopTimerSleeper() }
        let (sum, overflow) = earliest.addingReportingOverflow(PunchExecutor.timerSlack)
        let wake = overflow ? UInt64.max : sum
        if timerSleeper != nil && timerSleeperDeadline <= wake { return }
        timerSleeper?.cancel()
        timerSleeperGeneration += 1
        timerSleeperDeadline = wake
        let (generation, clock) = (timerSleeperGeneration, self.clock)
        timerSleeper = Task {
            if wake > clock.now() {
                do { try await clock.sleep(until: wake) } catch { return }
            }
            self.timersDue(sleeper: generation)
        }
    }

    private func stopTimerSleeper() {
        timerSleeper?.cancel()
        timerSleeper = nil
        timerSleeperGeneration += 1
        timerSleeperDeadline = .max
    }

    /// Fires every due timer whose punch still runs and still wants it, then sleeps until the next.
    private func timersDue(sleeper generation: Int) {
        // A sleeper replaced (or stopped) while it woke fires nothing: its successor owns the heap.
        guard generation == timerSleeperGeneration else { return }
        timerSleeper = nil
        timerSleeperDeadline = .max
        firingTimers = true
        for entry in timers.popDue(now: clock.now()) {
            guard let runtime = runtimes[entry.punch], runtime.timerGeneration == entry.generation else { continue }
            apply(runtime, runtime.session.handle(.timer(now: clock.now())))
        }
        firingTimers = false
        // Superseded entries (a punch paused its rounds, or ended) wait for their deadlines; drop them once they
        // outnumber the live ones, so the heap stays about one entry per punch.
        if timers.count > 2 * runtimes.count + 64 {
            let runtimes = self.runtimes
            timers.keep { runtimes[$0.punch]?.timerGeneration == $0.generation }
        }
        scheduleTimerSleeper()
    }
}
