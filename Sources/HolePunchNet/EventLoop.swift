#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Foundation
internal import CHolePunchNetShims

/// One thread running `epoll`: it drives sockets, timers and the jobs of every actor that uses it as executor.
///
/// Every datagram transport (``UDPDatagramTransport``, ``InMemoryDatagramTransport``), the QUIC endpoints and the
/// STUN server and clients run on these loops: one I/O stack per process.
///
/// ngtcp2 connections and GnuTLS sessions are not thread-safe, so every endpoint pins all of its C state to one
/// loop: the endpoint actor's executor *is* the loop, and socket readiness and timer callbacks run on the same
/// thread, where they may `assumeIsolated` into the actor without a hop.
///
/// `@unchecked Sendable`: the mutable state is either behind `pending` (a `Mutex`) or touched only on the loop
/// thread (`timers`, `handlers`), which `preconditionInLoop()` guards in debug builds.
package final class EventLoop: SerialExecutor, @unchecked Sendable {
    private struct Pending {
        var jobs: [UnownedJob] = []
        var closures: [() -> Void] = []
    }

    private struct Timer {
        var deadline: UInt64
        var id: UInt64
    }

    private let epollFD: Int32
    private let wakeFD: Int32
    /// Timers need sub-millisecond precision (ngtcp2 paces packets in microseconds), which `epoll_wait`'s
    /// millisecond timeout cannot give: a timerfd armed to the earliest deadline can.
    private let timerFD: Int32
    private var armedTimerDeadline: UInt64 = 0
    private let pending = Mutex(Pending())
    private var threadID: pthread_t?
    private let started = DispatchSemaphore(value: 0)

    /// Scratch space for one datagram in and one out, shared by every endpoint on this loop: only the loop's
    /// thread touches them, and no endpoint holds them across a suspension. (Per-endpoint buffers cost 128 KiB
    /// each, which dominated memory with a thousand sockets.)
    package let receiveBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
    package let sendBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)

    // Loop-thread only.
    private var timerHeap: [Timer] = []
    private var timerCallbacks: [UInt64: () -> Void] = [:]
    private var nextTimerID: UInt64 = 1
    private var handlers: [Int32: (UInt32) -> Void] = [:]

    /// Starts a loop on a new thread.
    package init(name: String) {
        epollFD = epoll_create1(Int32(EPOLL_CLOEXEC))
        precondition(epollFD >= 0, "epoll_create1 failed: \(errno)")
        wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        precondition(wakeFD >= 0, "eventfd failed: \(errno)")
        timerFD = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_NONBLOCK | TFD_CLOEXEC))
        precondition(timerFD >= 0, "timerfd_create failed: \(errno)")
        for fd in [wakeFD, timerFD] {
            var event = epoll_event()
            event.events = EPOLLIN.rawValue
            event.data.fd = fd
            precondition(epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) == 0)
        }
        let thread = Thread { [unowned self] in
            self.threadID = pthread_self()
            pthread_setspecific(EventLoop.loopThreadKey, UnsafeRawPointer(bitPattern: 1))
            self.started.signal()
            self.run()
        }
        thread.name = name
        thread.stackSize = 1 << 20
        thread.start()
        started.wait()
    }

    /// Marks the threads of every loop (a non-nil value), so code can tell that blocking would stall a loop.
    private static let loopThreadKey: pthread_key_t = {
        var key = pthread_key_t()
        precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
        return key
    }()

    /// Whether the caller runs on the thread of any event loop (this one or another).
    package static var onAnyLoop: Bool {
        pthread_getspecific(loopThreadKey) != nil
    }

    /// Whether the caller runs on this loop's thread.
    package var inLoop: Bool {
        guard let threadID else { return false }
        return pthread_equal(threadID, pthread_self()) != 0
    }

    // MARK: SerialExecutor

    /// Queues an actor job to run on the loop thread.
    package func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        pending.withLock { $0.jobs.append(unowned) }
        wake()
    }

    /// This loop as the executor of the actors pinned to it.
    package func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    /// Traps unless called on the loop thread (what `assumeIsolated` relies on).
    package func checkIsolated() {
        precondition(inLoop, "not on the endpoint's event loop")
    }

    /// Whether the caller runs on the loop thread.
    package func isIsolatingCurrentContext() -> Bool? {
        inLoop
    }

    // MARK: Scheduling

    /// Runs `work` on the loop thread, soon.
    package func execute(_ work: @escaping @Sendable () -> Void) {
        pending.withLock { $0.closures.append(work) }
        wake()
    }

    /// Arms a one-shot timer at `deadline` (monotonic ns). Loop thread only. Returns an id for `cancelTimer`.
    @discardableResult
    package func schedule(at deadline: UInt64, _ callback: @escaping () -> Void) -> UInt64 {
        checkIsolated()
        let id = nextTimerID
        nextTimerID += 1
        timerCallbacks[id] = callback
        timerHeap.append(Timer(deadline: deadline, id: id))
        siftUp(timerHeap.count - 1)
        return id
    }

    /// Disarms a timer; a no-op when it already fired. Loop thread only.
    package func cancelTimer(_ id: UInt64) {
        timerCallbacks[id] = nil
    }

    /// Watches `fd` for readability; `handler` runs on the loop thread. Loop thread only.
    package func register(fd: Int32, _ handler: @escaping (UInt32) -> Void) throws(DatagramError) {
        checkIsolated()
        var event = epoll_event()
        event.events = EPOLLIN.rawValue
        event.data.fd = fd
        guard epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) == 0 else {
            throw DatagramError(.socket, call: "epoll_ctl(ADD)")
        }
        handlers[fd] = handler
    }

    /// Stops watching `fd`. Loop thread only. The caller still owns and closes the descriptor.
    package func unregister(fd: Int32) {
        checkIsolated()
        var event = epoll_event()
        _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, fd, &event)
        handlers[fd] = nil
    }

    /// Runs `work` on the loop thread and returns when it has run: at once when called on the loop, otherwise
    /// by queueing it and blocking the caller. Only for short set-up and teardown steps (registering or releasing
    /// a socket) whose caller must know they are done, never from a job the loop itself is waiting for.
    package func executeAndWait<T: Sendable>(_ work: @escaping @Sendable () -> T) -> T {
        if inLoop { return work() }
        let result = Mutex<T?>(nil)
        let done = DispatchSemaphore(value: 0)
        execute {
            let value = work()
            result.withLock { $0 = value }
            done.signal()
        }
        done.wait()
        return result.withLock { $0! }
    }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeFD, &one, 8)
    }

    // MARK: The loop

    /// Runs for the life of the process: loops belong to the shared group, and endpoints come and go on them.
    private func run() {
        var events = [epoll_event](repeating: epoll_event(), count: 64)
        while true {
            let timeout = nextTimeoutMilliseconds()
            let count = epoll_wait(epollFD, &events, Int32(events.count), timeout)
            if count > 0 {
                for i in 0..<Int(count) {
                    let fd = events[i].data.fd
                    if fd == wakeFD || fd == timerFD {
                        var value: UInt64 = 0
                        _ = read(fd, &value, 8)
                    } else if let handler = handlers[fd] {
                        handler(events[i].events)
                    }
                }
            }
            fireTimers()
            runPending()
        }
    }

    /// Runs queued jobs and closures until none are left.
    private func runPending() {
        while true {
            let batch = pending.withLock { state -> Pending in
                let taken = state
                state.jobs.removeAll(keepingCapacity: true)
                state.closures.removeAll(keepingCapacity: true)
                return taken
            }
            if batch.jobs.isEmpty && batch.closures.isEmpty { return }
            for job in batch.jobs {
                job.runSynchronously(on: asUnownedSerialExecutor())
            }
            for closure in batch.closures {
                closure()
            }
        }
    }

    private func nextTimeoutMilliseconds() -> Int32 {
        let hasWork = pending.withLock { !$0.jobs.isEmpty || !$0.closures.isEmpty }
        if hasWork { return 0 }
        while let top = timerHeap.first, timerCallbacks[top.id] == nil {
            popTimer()
        }
        guard let top = timerHeap.first else { return -1 }
        let now = hp_now_ns()
        if top.deadline <= now { return 0 }
        if top.deadline != armedTimerDeadline {
            armedTimerDeadline = top.deadline
            var spec = itimerspec()
            spec.it_value.tv_sec = Int(top.deadline / 1_000_000_000)
            spec.it_value.tv_nsec = Int(top.deadline % 1_000_000_000)
            _ = timerfd_settime(timerFD, Int32(TFD_TIMER_ABSTIME), &spec, nil)
        }
        return -1
    }

    private func fireTimers() {
        let now = hp_now_ns()
        while let top = timerHeap.first, top.deadline <= now {
            popTimer()
            if let callback = timerCallbacks.removeValue(forKey: top.id) {
                callback()
            }
        }
    }

    private func popTimer() {
        let last = timerHeap.removeLast()
        if !timerHeap.isEmpty {
            timerHeap[0] = last
            siftDown(0)
        }
    }

    private func siftUp(_ index: Int) {
        var child = index
        while child > 0 {
            let parent = (child - 1) / 2
            if timerHeap[parent].deadline <= timerHeap[child].deadline { break }
            timerHeap.swapAt(parent, child)
            child = parent
        }
    }

    private func siftDown(_ index: Int) {
        var parent = index
        let count = timerHeap.count
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var smallest = parent
            if left < count && timerHeap[left].deadline < timerHeap[smallest].deadline { smallest = left }
            if right < count && timerHeap[right].deadline < timerHeap[smallest].deadline { smallest = right }
            if smallest == parent { return }
            timerHeap.swapAt(parent, smallest)
            parent = smallest
        }
    }
}

/// The process-wide set of event loops, one per core, that endpoints are spread over.
package final class EventLoopGroup: Sendable {
    /// The shared group used by endpoints that are not given a loop.
    package static let shared = EventLoopGroup(count: max(1, ProcessInfo.processInfo.activeProcessorCount))

    private let loops: [EventLoop]
    private let counter = Atomic<Int>(0)

    package init(count: Int) {
        loops = (0..<count).map { EventLoop(name: "holepunch-loop-\($0)") }
    }

    /// The next loop, round-robin.
    package func next() -> EventLoop {
        let index = counter.wrappingAdd(1, ordering: .relaxed).oldValue
        return loops[index % loops.count]
    }
}
