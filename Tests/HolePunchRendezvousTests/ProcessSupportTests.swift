import Foundation
import ProcessTestSupport
import Synchronization
import Testing

/// The process and deadline helpers that every process-driving test relies on: if these are wrong, tests flake.
@Suite("test support: child processes and deadlines")
struct ProcessSupportTests {
    @Test("waitExit returns the output written after the process itself ended (the pipe is read to EOF)")
    func outputAfterExit() async throws {
        let dir = try scratchDirectory("hp-child")
        defer { try? FileManager.default.removeItem(at: dir) }
        // The shell exits at once; a background subshell that inherited its stdout writes 300 ms later. Reading
        // stdout when the process exits (the old behaviour) sees nothing.
        let child = try Child("/bin/sh", ["-c", "(sleep 0.3; echo late-line) & exit 0"], directory: dir)
        defer { child.stop() }
        #expect(await child.waitExit(.seconds(10)) == 0)
        #expect(child.stdout.text == "late-line\n")
        #expect(child.stdout.reachedEnd)
    }

    @Test("withDeadline ends at its limit even when the operation ignores cancellation")
    func deadlineStopsAHungOperation() async throws {
        let finished = Mutex<Bool>(false)
        let error = await #expect(throws: DeadlineExceeded.self) {
            try await withDeadline(.milliseconds(200)) {
                // A wait that cannot be cancelled, like a read that ignores task cancellation.
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    DispatchQueue.global().asyncAfter(deadline: .now() + 5) {
                        finished.withLock { $0 = true }
                        continuation.resume()
                    }
                }
            }
        }
        #expect(error?.limit == .milliseconds(200))
        let ended = finished.withLock { $0 }
        #expect(!ended, "withDeadline waited for the operation to end")
    }

    @Test("withDeadline returns the operation's value and rethrows its error")
    func deadlinePassesThrough() async throws {
        #expect(try await withDeadline(.seconds(5)) { 42 } == 42)
        struct Boom: Error {}
        await #expect(throws: Boom.self) { try await withDeadline(.seconds(5)) { throw Boom() } }
    }
}
