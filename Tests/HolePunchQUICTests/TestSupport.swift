import Foundation
import HolePunchNet
@testable import HolePunchQUIC

/// Identities are slow-ish to generate (key generation + signing), so tests share a few.
enum TestIdentities {
    static let a = try! Identity.generate(commonName: "a")
    static let b = try! Identity.generate(commonName: "b")
    static let c = try! Identity.generate(commonName: "c")
}

/// Binds an endpoint on 127.0.0.1 with an ephemeral port.
func makeEndpoint(
    _ identity: Identity, policy: AcceptPolicy = .any, configure: (inout EndpointConfiguration) -> Void = { _ in }
) async throws -> Endpoint {
    var configuration = EndpointConfiguration(identity: identity, acceptPolicy: policy)
    configure(&configuration)
    return try await Endpoint.bind(.loopbackV4(port: 0), configuration: configuration)
}

/// Runs `body` with a deadline: fails with `TimeoutError` instead of hanging a test forever.
struct TimeoutError: Error, CustomStringConvertible {
    var description: String { "timed out" }
}

func withDeadline<T: Sendable>(
    _ duration: Duration, _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: duration)
            throw TimeoutError()
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}

/// Counts this process's open file descriptors.
func openFileDescriptorCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// Echo server: for every accepted connection, echo each stream back and finish it.
func startEchoServer(_ endpoint: Endpoint) -> Task<Void, Never> {
    Task {
        await withTaskGroup(of: Void.self) { group in
            for await connection in endpoint.incoming {
                group.addTask {
                    while let stream = try? await connection.acceptStream() {
                        do {
                            while let chunk = try await stream.read() {
                                try await stream.write(chunk)
                            }
                            try await stream.finish()
                        } catch {}
                    }
                }
            }
        }
    }
}
