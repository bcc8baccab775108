import Foundation
import HolePunchNet
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A loopback UDP forwarder that behaves like a NAT which can drop and re-make its mapping: the client dials
/// ``frontAddress``, the forwarder sends to the server from a second socket (``backAddress``). ``rebindBack()``
/// replaces the server-facing socket (the server sees the client arrive from a new port: the client's NAT
/// rebound); ``rebindFront()`` replaces the client-facing one (the client sees the server answer from a new port:
/// the server's NAT rebound). The old socket is closed, so packets to the old port are lost, as with a NAT whose
/// mapping is gone.
final class RebindingForwarder: Sendable {
    private struct State {
        var front: Int32
        var back: Int32
        var client: SocketAddress?
        var running = true
        var forwarded = 0
    }

    private let server: SocketAddress
    private let state: Mutex<State>

    init(to server: SocketAddress) throws {
        self.server = server
        let front = try Self.bindLoopback()
        let back: Int32
        do { back = try Self.bindLoopback() } catch {
            Glibc.close(front)
            throw error
        }
        state = Mutex(State(front: front, back: back))
        let thread = Thread { [self] in run() }
        thread.start()
    }

    /// Where the client sends.
    var frontAddress: SocketAddress { state.withLock { SocketAddress(boundTo: $0.front)! } }
    /// Where the server sees the client.
    var backAddress: SocketAddress { state.withLock { SocketAddress(boundTo: $0.back)! } }
    /// Datagrams forwarded so far, in either direction.
    var forwarded: Int { state.withLock { $0.forwarded } }

    /// The server-facing mapping is dropped and re-made on a new port.
    func rebindBack() throws {
        let fresh = try Self.bindLoopback()
        state.withLock { state in
            Glibc.close(state.back)
            state.back = fresh
        }
    }

    /// The client-facing mapping is dropped and re-made on a new port.
    func rebindFront() throws {
        let fresh = try Self.bindLoopback()
        state.withLock { state in
            Glibc.close(state.front)
            state.front = fresh
        }
    }

    /// Stops the thread (within one poll interval) and closes both sockets.
    func close() { state.withLock { $0.running = false } }

    private static func bindLoopback() throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0, SocketAddress.loopbackV4(port: 0).withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0 else {
            if fd >= 0 { Glibc.close(fd) }
            throw TimeoutError()
        }
        return fd
    }

    private func run() {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var storage = sockaddr_storage()
        while true {
            // The sockets are read and replaced under the lock, so a rebind never closes a socket mid-read.
            let done = state.withLock { state -> Bool in
                guard state.running else {
                    Glibc.close(state.front)
                    Glibc.close(state.back)
                    return true
                }
                var pollers = [
                    pollfd(fd: state.front, events: Int16(POLLIN), revents: 0),
                    pollfd(fd: state.back, events: Int16(POLLIN), revents: 0),
                ]
                guard poll(&pollers, 2, 0) > 0 else { return false }
                for poller in pollers where poller.revents & Int16(POLLIN) != 0 {
                    var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                    let count = withUnsafeMutablePointer(to: &storage) { pointer in
                        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            recvfrom(poller.fd, &buffer, buffer.count, 0, $0, &length)
                        }
                    }
                    guard count > 0, let from = withUnsafePointer(to: &storage, {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
                    }) else { continue }
                    let out: (Int32, SocketAddress)?
                    if poller.fd == state.front {
                        state.client = from
                        out = (state.back, server)
                    } else {
                        out = from == server ? state.client.map { (state.front, $0) } : nil
                    }
                    guard let (fd, destination) = out else { continue }
                    if destination.withSockAddr({ sendto(fd, buffer, count, 0, $0, $1) }) > 0 { state.forwarded += 1 }
                }
                return false
            }
            if done { return }
            // Wait outside the lock for either socket to be readable (at most 5 ms, so a rebind is seen soon).
            let fds = state.withLock { [$0.front, $0.back] }
            var pollers = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&pollers, 2, 5)
        }
    }
}
