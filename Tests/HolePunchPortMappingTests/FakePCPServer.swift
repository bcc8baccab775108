import Foundation
import HolePunchNet
import HolePunchPortMapping
import Synchronization

/// A PCP server on a loopback address that grants every MAP (external 203.0.113.10, the requested port) and
/// remembers each request's lifetime, for driving ``PortMapper`` end to end without a router.
final class FakePCPServer: Sendable {
    let socket: UDPDatagramSocket
    private let lifetimes = Mutex<[UInt32]>([])
    private let stopped = Mutex(false)

    /// How long it waits before answering a request with a non-zero lifetime (a slow router).
    let answerDelay: Duration

    /// The external address every grant names.
    let external: SocketAddress.IP
    /// Added to the internal port to make the external one (0: the same port, as a port-preserving router).
    let portShift: UInt16

    /// Binds `ip`:5351 and serves on a thread of its own until ``stop()``.
    init(ip: SocketAddress.IP, answerDelay: Duration = .zero, external: SocketAddress.IP = .v4(203, 0, 113, 10),
         portShift: UInt16 = 0) throws {
        self.answerDelay = answerDelay
        self.external = external
        self.portShift = portShift
        socket = try UDPDatagramSocket(binding: SocketAddress(ip: ip, port: 5351))
        Thread { [self] in serve() }.start()
    }

    /// The requested lifetime of every MAP received, in order.
    var requests: [UInt32] { lifetimes.withLock { $0 } }

    func stop() { stopped.withLock { $0 = true } }

    private func serve() {
        while !stopped.withLock({ $0 }) {
            guard let (bytes, from) = socket.receive(timeoutMilliseconds: 20), bytes.count == 60, bytes[1] == 1 else { continue }
            let lifetime = UInt32(bytes[4]) << 24 | UInt32(bytes[5]) << 16 | UInt32(bytes[6]) << 8 | UInt32(bytes[7])
            lifetimes.withLock { $0.append(lifetime) }
            if lifetime > 0 && answerDelay > .zero {
                Thread.sleep(forTimeInterval: Double(answerDelay.components.attoseconds) / 1e18 + Double(answerDelay.components.seconds))
            }
            let internalPort = UInt16(bytes[40]) << 8 | UInt16(bytes[41])
            let answer = pcpMapResponse(nonce: Array(bytes[24..<36]), lifetime: lifetime, epoch: 1000,
                                        internalPort: internalPort, externalPort: internalPort &+ portShift,
                                        external: PCP.encode(external))
            _ = try? socket.send(answer, to: from)
        }
    }
}
