package import Foundation
import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

/// Process and file helpers for the comparison runs. Every process is ours, and is ended by its PID.
package enum Tools {
    package static func find(_ tool: String) throws -> String {
        for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin"] {
            let path = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        throw QUICBenchError("\(tool) is not installed (apt-get install ngtcp2-server ngtcp2-client)")
    }

    package static func defaultPython() throws -> String {
        let candidates = [ProcessInfo.processInfo.environment["HOLEPUNCH_PYTHON"] ?? "", ".build/venv/bin/python"]
        guard let found = candidates.first(where: { !$0.isEmpty && FileManager.default.isExecutableFile(atPath: $0) })
        else { throw QUICBenchError("no Python with aioquic: run `make deps` or pass --python") }
        return found
    }

    package static func temporaryDirectory(_ prefix: String) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Random content, so nothing along the way can take a shortcut on repetitive data.
    package static func writeRandomFile(_ url: URL, bytes: Int) throws {
        guard FileManager.default.createFile(atPath: url.path, contents: nil) else {
            throw QUICBenchError("cannot create \(url.path)")
        }
        let handle = try FileHandle(forWritingTo: url)
        defer { try? handle.close() }
        var generator = SystemRandomNumberGenerator()
        var block = [UInt8](repeating: 0, count: 1 << 20)
        var written = 0
        while written < bytes {
            block.withUnsafeMutableBytes { raw in
                for i in stride(from: 0, to: raw.count, by: 8) {
                    raw.storeBytes(of: generator.next() as UInt64, toByteOffset: i, as: UInt64.self)
                }
            }
            let count = min(block.count, bytes - written)
            try handle.write(contentsOf: block[..<count])
            written += count
        }
    }

    /// A UDP port that was free on 127.0.0.1 a moment ago (for tools that cannot bind port 0 and report it).
    package static func freeUDPPort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw QUICBenchError("socket(): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let bound = SocketAddress.loopbackV4(port: 0).withSockAddr { Glibc.bind(fd, $0, $1) }
        guard bound == 0 else { throw QUICBenchError("bind: \(String(cString: strerror(errno)))") }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        let address = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) } }
        guard let address else { throw QUICBenchError("getsockname failed") }
        return address.port
    }

    package static func spawn(_ path: String, _ arguments: [String], stdout: Any? = FileHandle.nullDevice) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardOutput = stdout
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Ends a process we started: SIGKILL to its PID, because a child may inherit a mask that blocks SIGTERM.
    package static func kill(_ process: Process) {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    /// Runs a tool to completion and returns the wall-clock seconds it took; a non-zero exit is an error.
    package static func timed(_ path: String, _ arguments: [String]) throws -> Double {
        let clock = ContinuousClock()
        let start = clock.now
        let process = try spawn(path, arguments)
        process.waitUntilExit()
        let elapsed = clock.now - start
        guard process.terminationStatus == 0 else {
            throw QUICBenchError("\((path as NSString).lastPathComponent) exited with \(process.terminationStatus)")
        }
        return elapsed.benchSeconds
    }

    /// Runs a tool to completion and returns its stdout; a non-zero exit is an error.
    package static func output(_ path: String, _ arguments: [String]) throws -> String {
        let pipe = Pipe()
        let process = try spawn(path, arguments, stdout: pipe)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw QUICBenchError("\((path as NSString).lastPathComponent) exited with \(process.terminationStatus): \(text)")
        }
        return text
    }

    /// Starts a process and blocks until it prints a line starting with `prefix` (or exits, which is an error).
    package static func spawnAndWaitForLine(_ path: String, _ arguments: [String], prefix: String) throws -> (Process, String) {
        let pipe = Pipe()
        let process = try spawn(path, arguments, stdout: pipe)
        var pending = Data()
        while true {
            let chunk = pipe.fileHandleForReading.availableData
            if chunk.isEmpty {
                kill(process)
                throw QUICBenchError("\((path as NSString).lastPathComponent) exited before printing '\(prefix)'")
            }
            pending.append(chunk)
            let text = String(decoding: pending, as: UTF8.self)
            if let line = text.split(separator: "\n").first(where: { $0.hasPrefix(prefix) }) {
                return (process, String(line))
            }
        }
    }
}

extension Duration {
    /// The duration in fractional seconds.
    package var benchSeconds: Double {
        let parts = components
        return Double(parts.seconds) + Double(parts.attoseconds) / 1e18
    }
}
