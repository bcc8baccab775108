internal import Foundation
internal import Glibc
import HolePunchNet

/// One non-blocking POSIX UDP socket bound to a concrete address; owns its file descriptor.
///
/// `@unchecked Sendable`: `fd` and `localAddress` never change after `init`; `close()` is guarded by `lock`
/// and the poll loop that reads the socket is always stopped before its owner closes it.
final class UDPSocket: @unchecked Sendable {
    private(set) var fd: Int32
    let localAddress: SocketAddress
    private let lock = NSLock()

    /// Binds a new socket to `address` (port 0 picks an ephemeral port).
    init(binding address: SocketAddress) throws(STUNError) {
        let family = address.isIPv6 ? AF_INET6 : AF_INET
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw UDPSocket.errno("socket") }
        if address.isIPv6 {
            // Keep IPv6 sockets IPv6-only, so that a v6 and a v4 socket on one port never steal each other's traffic.
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
        let rc = address.withSockAddr { Glibc.bind(fd, $0, $1) }
        guard rc == 0 else {
            let error = UDPSocket.errno("bind \(address)")
            Glibc.close(fd)
            throw error
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0, let local = withUnsafePointer(to: &storage, {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        }) else {
            let error = UDPSocket.errno("getsockname")
            Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.localAddress = local
    }

    deinit { close() }

    /// Sends one datagram; a full socket buffer counts as a loss, as it would on the wire.
    func send(_ bytes: [UInt8], to destination: SocketAddress) throws(STUNError) {
        let fd = lock.withLock { self.fd }
        guard fd >= 0 else { throw STUNError(.socket, "send on a closed socket") }
        let sent = bytes.withUnsafeBytes { buffer in
            destination.withSockAddr { sendto(fd, buffer.baseAddress, buffer.count, Int32(MSG_NOSIGNAL), $0, $1) }
        }
        if sent < 0 {
            let code = Glibc.errno
            if code == EAGAIN || code == EWOULDBLOCK { return }
            throw UDPSocket.errno("sendto \(destination)", code)
        }
    }

    /// Reads one pending datagram, or `nil` when none is waiting.
    func receive() -> (bytes: [UInt8], from: SocketAddress)? {
        var buffer = [UInt8](repeating: 0, count: 2048)
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let count = buffer.withUnsafeMutableBytes { raw in
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, raw.baseAddress, raw.count, 0, $0, &length) }
            }
        }
        guard count >= 0 else { return nil }
        guard let from = withUnsafePointer(to: &storage, {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        }) else { return nil }
        return (Array(buffer.prefix(count)), from)
    }

    /// Waits up to `timeoutMilliseconds` for a datagram (used by tests and simple clients, never by the loops).
    func receive(timeoutMilliseconds: Int32) -> (bytes: [UInt8], from: SocketAddress)? {
        var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&entry, 1, timeoutMilliseconds) > 0 else { return nil }
        return receive()
    }

    /// Closes the descriptor; idempotent.
    func close() {
        lock.withLock {
            if fd >= 0 {
                Glibc.close(fd)
                fd = -1
            }
        }
    }

    static func errno(_ call: String, _ code: Int32 = Glibc.errno) -> STUNError {
        STUNError(.socket, "\(call) failed: \(String(cString: strerror(code))) (errno \(code))")
    }
}

/// A background thread that polls a set of sockets and hands each datagram to `handler`.
///
/// It stops through a self-pipe, so `stop()` never waits for a timeout, and `stop()` returns only after the
/// thread has left `poll`, so the caller may then close the sockets safely.
///
/// `@unchecked Sendable`: the mutable state (`running`, pipe fds) is only touched under `lock`; the thread
/// reads the immutable `sockets` and `wakeRead`.
final class PollLoop: @unchecked Sendable {
    typealias Handler = @Sendable (_ index: Int, _ bytes: [UInt8], _ from: SocketAddress) -> Void

    private let sockets: [UDPSocket]
    private let handler: Handler
    private let lock = NSLock()
    private var wakeRead: Int32 = -1
    private var wakeWrite: Int32 = -1
    private var running = false
    private let exited = DispatchSemaphore(value: 0)

    init(sockets: [UDPSocket], handler: @escaping Handler) {
        self.sockets = sockets
        self.handler = handler
    }

    deinit { stop() }

    /// Starts the thread; a second call does nothing.
    func start() throws(STUNError) {
        lock.lock()
        defer { lock.unlock() }
        do {
            guard !running else { return }
            var fds: [Int32] = [-1, -1]
            guard pipe(&fds) == 0 else { throw UDPSocket.errno("pipe") }
            for fd in fds {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                _ = fcntl(fd, F_SETFL, O_NONBLOCK)
            }
            wakeRead = fds[0]
            wakeWrite = fds[1]
            running = true
            let wake = wakeRead
            let thread = Thread { [self] in
                self.run(wake: wake)
                self.exited.signal()
            }
            thread.name = "holepunch.stun.poll"
            thread.start()
        }
    }

    /// Stops the thread and waits until it has left `poll`; idempotent.
    func stop() {
        let wasRunning: Bool = lock.withLock {
            guard running else { return false }
            running = false
            var byte: UInt8 = 1
            _ = write(wakeWrite, &byte, 1)
            return true
        }
        guard wasRunning else { return }
        exited.wait()
        lock.withLock {
            Glibc.close(wakeRead)
            Glibc.close(wakeWrite)
            wakeRead = -1
            wakeWrite = -1
        }
    }

    private func run(wake: Int32) {
        var fds = sockets.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
        fds.append(pollfd(fd: wake, events: Int16(POLLIN), revents: 0))
        while true {
            for i in fds.indices { fds[i].revents = 0 }
            let ready = poll(&fds, nfds_t(fds.count), -1)
            if ready < 0 {
                if Glibc.errno == EINTR { continue }
                return
            }
            if fds[fds.count - 1].revents != 0 { return }
            for (index, socket) in sockets.enumerated() where fds[index].revents != 0 {
                // Drain, but bounded, so one busy socket cannot starve the wake pipe or the others.
                var budget = 64
                while budget > 0, let (bytes, from) = socket.receive() {
                    handler(index, bytes, from)
                    budget -= 1
                }
            }
        }
    }
}
