import Foundation
import HolePunchNet
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A unit-test stand-in for a TURN server (the real one, coturn, is for the acceptance tests): a loopback UDP relay
/// with a server socket, where its one client (named up front: the allocation's owner) sends framed datagrams, and
/// a relayed socket, which the peer sees as a plain UDP address. Framing (``TestRelayFraming``): `0x40`, the peer's IPv4 address (4 bytes) and port
/// (2 bytes), then the payload, both ways; any other datagram to or from the server is a control message.
/// Runs on its own thread until ``close()``; ``kill()`` makes it drop everything, like a relay that died.
final class TestRelay: Sendable {
    static let dataMarker: UInt8 = 0x40
    static let headerLength = 7

    /// Where the client sends (the TURN server's address).
    let server: SocketAddress
    /// What the peer sends to (the allocation's relayed address).
    let relayed: SocketAddress
    private let serverFD: Int32
    private let relayedFD: Int32
    private let client: SocketAddress
    private let state = Mutex<(killed: Bool, running: Bool, forwarded: Int)>((false, true, 0))

    init(client: SocketAddress) throws {
        self.client = client
        let serverFD = try Self.bindLoopback()
        let relayedFD: Int32
        do {
            relayedFD = try Self.bindLoopback()
        } catch {
            Glibc.close(serverFD)
            throw error
        }
        (self.serverFD, self.relayedFD) = (serverFD, relayedFD)
        server = SocketAddress(boundTo: serverFD)!
        relayed = SocketAddress(boundTo: relayedFD)!
        let thread = Thread { [self] in run() }
        thread.start()
    }

    private static func bindLoopback() throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard SocketAddress.loopbackV4(port: 0).withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else {
            Glibc.close(fd)
            throw TimeoutError()
        }
        return fd
    }

    /// A framing for the endpoint of the relay's client.
    func framing() -> TestRelayFraming { TestRelayFraming(server: server, relayedAddress: relayed) }

    /// Data datagrams forwarded so far, in either direction.
    var forwarded: Int { state.withLock { $0.forwarded } }

    /// From now on every datagram is dropped.
    func kill() { state.withLock { $0.killed = true } }

    /// Sends `bytes` as they are from the server to its client: a control message (what a TURN refresh response
    /// would be), or data framed by the test (``header(_:)``), as a lying server could.
    func sendFromServer(_ bytes: [UInt8]) {
        _ = client.withSockAddr { sendto(serverFD, bytes, bytes.count, 0, $0, $1) }
    }

    /// Stops the thread (within one poll interval) and closes the sockets.
    func close() { state.withLock { $0.running = false } }

    static func header(_ peer: SocketAddress) -> [UInt8] {
        [dataMarker] + peer.ipBytes + [UInt8(peer.port >> 8), UInt8(peer.port & 0xff)]
    }

    private func run() {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var pollers = [serverFD, relayedFD].map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        while state.withLock({ $0.running }) {
            guard poll(&pollers, 2, 20) > 0 else { continue }
            for index in 0..<2 where pollers[index].revents & Int16(POLLIN) != 0 {
                guard let (count, from) = receive(pollers[index].fd, into: &buffer) else { continue }
                if index == 0 {
                    fromClient(Array(buffer[0..<count]), from: from)
                } else {
                    fromPeer(Array(buffer[0..<count]), from: from)
                }
            }
        }
        Glibc.close(serverFD)
        Glibc.close(relayedFD)
    }

    private func receive(_ fd: Int32, into buffer: inout [UInt8]) -> (Int, SocketAddress)? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let count = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
        }
        guard count >= 0, let from = withUnsafePointer(to: &storage, {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        }) else { return nil }
        return (count, from)
    }

    /// Data from the client goes out of the relayed socket to the peer it names; control messages are ignored.
    private func fromClient(_ datagram: [UInt8], from: SocketAddress) {
        guard from == client, !state.withLock({ $0.killed }),
              datagram.count >= Self.headerLength, datagram[0] == Self.dataMarker,
              let peer = SocketAddress(ipBytes: Array(datagram[1..<5]), port: UInt16(datagram[5]) << 8 | UInt16(datagram[6]))
        else { return }
        let payload = Array(datagram[Self.headerLength...])
        if peer.withSockAddr({ sendto(relayedFD, payload, payload.count, 0, $0, $1) }) >= 0 {
            state.withLock { $0.forwarded += 1 }
        }
    }

    /// Data from a peer goes to the client, framed with the peer's address.
    private func fromPeer(_ payload: [UInt8], from: SocketAddress) {
        guard !state.withLock({ $0.killed }) else { return }
        let framed = Self.header(from) + payload
        if client.withSockAddr({ sendto(serverFD, framed, framed.count, 0, $0, $1) }) >= 0 {
            state.withLock { $0.forwarded += 1 }
        }
    }
}

/// The client side of ``TestRelay``'s framing, as the TURN client's framing would be: every peer is permitted.
final class TestRelayFraming: RelayFraming {
    let server: SocketAddress
    let relayedAddress: SocketAddress

    init(server: SocketAddress, relayedAddress: SocketAddress) {
        self.server = server
        self.relayedAddress = relayedAddress
    }

    func wrap(_ payload: UnsafeRawBufferPointer, to peer: SocketAddress) -> [UInt8]? {
        guard !peer.isIPv6 else { return nil }
        return TestRelay.header(peer) + Array(payload)
    }

    func unwrap(_ datagram: UnsafeRawBufferPointer) -> (peer: SocketAddress, payload: Range<Int>)? {
        guard datagram.count >= TestRelay.headerLength, datagram[0] == TestRelay.dataMarker,
              let peer = SocketAddress(ipBytes: Array(datagram[1..<5]), port: UInt16(datagram[5]) << 8 | UInt16(datagram[6]))
        else { return nil }
        return (peer, TestRelay.headerLength..<datagram.count)
    }
}
