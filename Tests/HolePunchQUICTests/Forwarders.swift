import Foundation
import HolePunchNet
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A loopback UDP forwarder between one client and one server: a second path to the same peer for path-layer
/// tests. The first sender that is not the server becomes the client. Runs on its own thread until ``close()``;
/// ``kill()`` makes it drop everything from then on, like a path that died. With `swapsPairs` it reorders: each
/// datagram is held until the next one has gone (or the socket was quiet for a poll interval), so every pair leaves
/// in the opposite order.
final class UDPForwarder: Sendable {
    let address: SocketAddress
    private let fd: Int32
    private let server: SocketAddress
    private let swapsPairs: Bool
    private let state = Mutex<(client: SocketAddress?, killed: Bool, running: Bool, forwarded: Int, swapped: Int,
                               holdsBack: Bool, heldBack: Int)>((nil, false, true, 0, 0, false, 0))

    init(to server: SocketAddress, swapsPairs: Bool = false) throws {
        self.server = server
        self.swapsPairs = swapsPairs
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard SocketAddress.loopbackV4(port: 0).withSockAddr({ Glibc.bind(fd, $0, $1) }) == 0,
              let bound = SocketAddress(boundTo: fd)
        else {
            Glibc.close(fd)
            throw TimeoutError()
        }
        self.fd = fd
        address = bound
        let thread = Thread { [self] in run() }
        thread.start()
    }

    /// Datagrams forwarded so far, in either direction.
    var forwarded: Int { state.withLock { $0.forwarded } }

    /// Datagrams sent after the one that arrived behind them (`swapsPairs`).
    var swapped: Int { state.withLock { $0.swapped } }

    /// From now on every datagram is dropped.
    func kill() { state.withLock { $0.killed = true } }

    /// While on, datagrams from the server are dropped (and counted in ``droppedFromServer``); the other way passes.
    func dropFromServer(_ on: Bool) { state.withLock { $0.holdsBack = on } }

    /// Datagrams from the server dropped by ``dropFromServer(_:)``.
    var droppedFromServer: Int { state.withLock { $0.heldBack } }

    /// Stops the thread (within one poll interval) and closes the socket.
    func close() { state.withLock { $0.running = false } }

    private func run() {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var storage = sockaddr_storage()
        var held: (bytes: [UInt8], to: SocketAddress)?
        func send(_ bytes: [UInt8], to destination: SocketAddress) {
            let sent = destination.withSockAddr { sendto(fd, bytes, bytes.count, 0, $0, $1) }
            if sent > 0 { state.withLock { $0.forwarded += 1 } }
        }
        while state.withLock({ $0.running }) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, held == nil ? 20 : 2) > 0 else {
                if let (bytes, to) = held { send(bytes, to: to) }
                held = nil
                continue
            }
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let count = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &length) }
            }
            guard count > 0, let from = withUnsafePointer(to: &storage, {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
            }) else { continue }
            let destination: SocketAddress? = state.withLock { state in
                if state.killed { return nil }
                if from == server {
                    if state.holdsBack {
                        state.heldBack += 1
                        return nil
                    }
                    return state.client
                }
                state.client = from
                return server
            }
            guard let destination else { continue }
            let bytes = Array(buffer[..<count])
            guard swapsPairs else {
                send(bytes, to: destination)
                continue
            }
            if let (earlier, to) = held {
                send(bytes, to: destination)
                send(earlier, to: to)
                state.withLock { $0.swapped += 1 }
                held = nil
            } else {
                held = (bytes, destination)
            }
        }
        Glibc.close(fd)
    }
}

/// The in-memory twin of ``UDPForwarder``: a transport on an ``InMemoryDatagramNetwork`` that forwards between
/// the first sender that is not the server and the server. Kill a path with the network's condition hook.
final class InMemoryForwarder: @unchecked Sendable {
    // @unchecked: `buffer` and `client` are touched only by `pump()`, which runs on the network's one loop.
    private let transport: InMemoryDatagramTransport
    private let server: SocketAddress
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65_536, alignment: 16)
    private var client: SocketAddress?

    init(on network: InMemoryDatagramNetwork, to server: SocketAddress) throws {
        transport = try network.bind(.loopbackV4(port: 0))
        self.server = server
        try transport.start { [weak self] in self?.pump() }
    }

    deinit { buffer.deallocate() }

    var address: SocketAddress { transport.localAddress }

    func close() { transport.close() }

    private func pump() {
        while let input = transport.receive(into: buffer) {
            guard case .datagram(let datagram) = input else { continue }
            if datagram.from != server { client = datagram.from }
            guard let destination = datagram.from == server ? client : server else { continue }
            _ = try? transport.send(UnsafeRawBufferPointer(rebasing: buffer[0..<datagram.count]), to: destination)
        }
    }
}
