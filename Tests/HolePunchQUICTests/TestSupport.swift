import ProcessTestSupport
import Foundation
import HolePunchNet
import Synchronization
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

/// A bounded wait ran out (tests that poll by hand; `withDeadline` comes from ProcessTestSupport).
struct TimeoutError: Error, CustomStringConvertible {
    var description: String { "timed out" }
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

/// A UDP relay on 127.0.0.1 between one client and `target` that drops datagrams: by default every other datagram
/// in each direction, starting with the first (a deterministic stand-in for a lossy path); with `lossRate`, each
/// datagram independently with that probability, drawn from a generator seeded with `seed` (reproducible).
///
/// With `clientDatagrams`, the client's first that many datagrams pass and its later ones are all dropped (the
/// target's all pass): a client can then complete its side of a handshake that the server never confirms.
///
/// Whoever sends to ``address`` first becomes the client; datagrams from `target` go back to it.
final class AlternateDropRelay: @unchecked Sendable {
    let address: SocketAddress
    private let fd: Int32
    private let target: SocketAddress
    private let lossRate: Double?
    private let seed: UInt64
    private let clientDatagrams: Int?
    private let stopped = Mutex(false)
    private let counts = Mutex((forwarded: 0, dropped: 0))
    private let finished = DispatchSemaphore(value: 0)

    init(to target: SocketAddress, lossRate: Double? = nil, seed: UInt64 = 1, clientDatagrams: Int? = nil) throws {
        self.target = target
        self.clientDatagrams = clientDatagrams
        self.lossRate = lossRate
        self.seed = seed
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw TimeoutError() }
        let bound = SocketAddress.loopbackV4(port: 0).withSockAddr { bind(fd, $0, $1) }
        guard bound == 0, let local = SocketAddress(boundTo: fd) else {
            close(fd)
            throw TimeoutError()
        }
        self.fd = fd
        address = local
        Thread { [self] in
            run()
            finished.signal()
        }.start()
    }

    /// Datagrams passed on and dropped so far, both directions.
    var forwarded: Int { counts.withLock { $0.forwarded } }
    var dropped: Int { counts.withLock { $0.dropped } }

    private func run() {
        var client: SocketAddress?
        var seen = [0, 0]  // datagrams per direction: 0 = towards target, 1 = towards client
        var random = SplitMix64(seed: seed)
        var buffer = [UInt8](repeating: 0, count: 65_536)
        while !stopped.withLock({ $0 }) {
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, 50) > 0 else { continue }
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let count = buffer.withUnsafeMutableBytes { bytes in
                withUnsafeMutablePointer(to: &storage) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, bytes.baseAddress, bytes.count, 0, $0, &length) }
                }
            }
            guard count > 0,
                  let from = withUnsafePointer(to: &storage, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) } })
            else { continue }
            let direction = from == target ? 1 : 0
            if direction == 0 { client = from }
            guard let destination = direction == 0 ? target : client else { continue }
            seen[direction] += 1
            let drop = if let clientDatagrams {
                direction == 0 && seen[0] > clientDatagrams
            } else {
                lossRate.map { Double(random.next() >> 11) / Double(1 << 53) < $0 } ?? (seen[direction] % 2 == 1)
            }
            if drop {
                counts.withLock { $0.dropped += 1 }
                continue
            }
            counts.withLock { $0.forwarded += 1 }
            _ = buffer.withUnsafeBytes { bytes in
                destination.withSockAddr { sendto(fd, bytes.baseAddress, count, 0, $0, $1) }
            }
        }
    }

    /// Stops the relay thread and closes the socket; later calls do nothing.
    func stop() {
        let first = stopped.withLock { wasStopped in
            defer { wasStopped = true }
            return !wasStopped
        }
        guard first else { return }
        finished.wait()
        close(fd)
    }

    deinit { stop() }
}

