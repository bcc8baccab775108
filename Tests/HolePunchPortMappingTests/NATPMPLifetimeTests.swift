import Foundation
import HolePunchNet
import HolePunchPortMapping
import Synchronization
import Testing

/// A NAT-PMP (RFC 6886) gateway on a loopback address that answers every request with success and a lifetime of
/// its choosing: enough of a router to drive ``PortMapper`` over libnatpmp without one.
final class FakeNATPMPServer: Sendable {
    let socket: UDPDatagramSocket
    private let stopped = Mutex(false)
    /// The lifetime every mapping answer grants.
    let grantedLifetime: UInt32

    /// Binds `ip`:5351 and serves on a thread of its own until ``stop()``.
    init(ip: SocketAddress.IP, grantedLifetime: UInt32) throws {
        self.grantedLifetime = grantedLifetime
        socket = try UDPDatagramSocket(binding: SocketAddress(ip: ip, port: 5351))
        Thread { [self] in serve() }.start()
    }

    func stop() { stopped.withLock { $0 = true } }

    private func serve() {
        let epoch: [UInt8] = [0, 0, 0x03, 0xE8]
        while !stopped.withLock({ $0 }) {
            guard let (bytes, from) = socket.receive(timeoutMilliseconds: 20), bytes.count >= 2, bytes[0] == 0 else { continue }
            let answer: [UInt8]
            switch bytes[1] {
            case 0: answer = [0, 128, 0, 0] + epoch + [203, 0, 113, 10]
            case 1 where bytes.count == 12:
                let lifetime = grantedLifetime
                answer = [0, 129, 0, 0] + epoch + Array(bytes[4..<6]) + Array(bytes[4..<6])
                    + [UInt8(lifetime >> 24), UInt8(lifetime >> 16 & 0xFF), UInt8(lifetime >> 8 & 0xFF), UInt8(lifetime & 0xFF)]
            default: continue
            }
            _ = try? socket.send(answer, to: from)
        }
    }
}

@Suite struct NATPMPLifetimeTests {
    /// A gateway that grants 2^32−1 s would otherwise never be refreshed (and would be published as the longest
    /// lease): NAT-PMP grants are believed up to `maximumLifetime`, as PCP's are (docs/security.md, "Refresh rate").
    @Test func aNATPMPGrantIsBelievedOnlyUpToTheMaximumLifetime() async throws {
        let server = try FakeNATPMPServer(ip: .v4(127, 0, 0, 26), grantedLifetime: .max)
        defer { server.stop() }
        let mapper = loopbackMapper(port: 40_990, protocols: [.natpmp],
                                    gateway: .v4(127, 0, 0, 26), client: .v4(127, 0, 0, 1), bound: .seconds(2))
        let mapping = try await mapper.map()
        #expect(mapping.mappingProtocol == .natpmp)
        #expect(mapping.external == SocketAddress(ip: .v4(203, 0, 113, 10), port: 40_990))
        #expect(mapping.lifetimeSeconds == mapper.configuration.pcp.maximumLifetime)
        await mapper.delete()
    }
}
