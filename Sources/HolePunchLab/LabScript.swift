import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `lab/lab.sh` is nowhere to be found: a usage problem (run from the repository or set `HOLEPUNCH_LAB_DIR`),
/// which the CLI reports with exit code 64.
package struct LabScriptNotFound: Error, CustomStringConvertible {
    package let description: String
}

/// Locating and running `lab/lab.sh`.
package enum LabScript {
    /// A one-line reason why the lab cannot run here, or nil.
    package static func unavailableReason() -> String? {
        if geteuid() != 0 {
            return "the lab needs root (network namespaces and nftables); run it with sudo"
        }
        guard let ip = which("ip") else { return "`ip` (iproute2) is not installed; the lab needs `ip netns`" }
        if runQuietly(ip, ["netns", "list"]) != 0 {
            return "`ip netns` is unavailable on this machine (no network namespace support?)"
        }
        return nil
    }

    /// The path of `lab/lab.sh`.
    package static func path() throws -> String {
        var candidates: [String] = []
        if let dir = ProcessInfo.processInfo.environment["HOLEPUNCH_LAB_DIR"] { candidates.append(dir + "/lab.sh") }
        // Walk up from the working directory, then from the executable (…/.build*/release/holepunch).
        for start in [FileManager.default.currentDirectoryPath, executableDirectory()] {
            var url = URL(fileURLWithPath: start)
            for _ in 0..<6 {
                candidates.append(url.appendingPathComponent("lab/lab.sh").path)
                url.deleteLastPathComponent()
            }
        }
        if let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) { return found }
        throw LabScriptNotFound(description: "cannot find lab/lab.sh: run from the repository or set HOLEPUNCH_LAB_DIR")
    }

    /// The repository's `lab/` directory.
    package static func directory() throws -> String { URL(fileURLWithPath: try path()).deletingLastPathComponent().path }

    /// Replaces this process with `lab.sh ARGS` (so signals, exit codes and the terminal go straight through).
    package static func exec(_ arguments: [String], name: String?) throws -> Never {
        if let reason = unavailableReason() { throw LabFailure(reason) }
        let script = try path()
        if let name { setenv("HP_LAB", name, 1) }
        let argv = [script] + arguments
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cArgs.append(nil)
        execv(script, cArgs)
        throw LabFailure("cannot run \(script): \(String(cString: strerror(errno)))")
    }

    private static func executableDirectory() -> String {
        let path = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: path).deletingLastPathComponent().path
    }

    private static func which(_ tool: String) -> String? {
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":")
        for dir in dirs + ["/usr/sbin", "/sbin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(tool)") {
            return "\(dir)/\(tool)"
        }
        return nil
    }

    private static func runQuietly(_ tool: String, _ arguments: [String]) -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return -1 }
        process.waitUntilExit()
        return process.terminationStatus
    }
}
