import Foundation
#if canImport(Glibc)
import Glibc
#endif

// What the drivers `holepunch lab matrix` and the lab tests start inside the namespaces have in common: they print
// one JSON object per line and exit on their own, and their children are stopped with a plain SIGTERM.

/// Foundation's `Process` may start us with SIGTERM/SIGINT blocked (it inherits the spawning thread's mask).
/// Unblocking them before any other thread exists lets the harness stop us with a plain SIGTERM.
package func labUnblockTerminationSignals() {
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGTERM)
    sigaddset(&set, SIGINT)
    pthread_sigmask(SIG_UNBLOCK, &set, nil)
    signal(SIGTERM, SIG_DFL)
    signal(SIGINT, SIG_DFL)
}

/// Prints one JSON object on its own line and flushes (stdout is a file, not a terminal, under the harness).
package func labEmit(_ object: [String: Any]) {
    if var data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) {
        data.append(0x0A)
        // FileHandle writes straight to the descriptor: nothing sits in a stdio buffer when we exit.
        FileHandle.standardOutput.write(data)
    }
}

/// A JSON object crossing task boundaries (the values are plain JSON: strings, numbers, bools, arrays, objects).
package struct LabRecord: @unchecked Sendable {
    package var fields: [String: Any]

    /// Wraps `fields` (the memberwise initialiser is internal to this module).
    package init(fields: [String: Any]) { self.fields = fields }
}

/// Runs `body`, or gives up after `limit` with nil.
package func labWithin<T: Sendable>(_ limit: Duration, _ body: @escaping @Sendable () async -> T) async -> T? {
    await withTaskGroup(of: T?.self) { group in
        group.addTask { await body() }
        group.addTask { try? await Task.sleep(for: limit); return nil }
        let first = await group.next() ?? nil
        group.cancelAll()
        return first
    }
}

package func labMilliseconds(_ duration: Duration) -> Double {
    let parts = duration.components
    return ((Double(parts.seconds) * 1e3 + Double(parts.attoseconds) / 1e15) * 1000).rounded() / 1000
}
