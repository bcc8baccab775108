import HolePunch
import HolePunchSTUN
import Synchronization
import HolePunchNet
import HolePunchQUIC

/// A ``STUNTransport`` over the punch endpoint's shared socket: sends with ``Endpoint/send(datagram:to:)`` and
/// receives the STUN-range datagrams that are not punch probes.
///
/// Datagrams arrive through ``PunchExecutor/otherDatagrams(_:)``, which installs the executor on the endpoint if
/// no punch has yet.
final class EndpointSTUNTransport: STUNTransport {
    let endpoint: Endpoint
    let localAddress: SocketAddress
    private let sink = Mutex<AsyncStream<STUNDatagram>.Continuation?>(nil)

    init(endpoint: Endpoint) {
        self.endpoint = endpoint
        self.localAddress = endpoint.localAddress
    }

    func install(executor: PunchExecutor) async {
        let handler: @Sendable ([UInt8], SocketAddress) -> Void = { [self] bytes, from in
            deliver(STUNDatagram(bytes: bytes, from: from))
        }
        // The executor is the one reader of the endpoint's non-QUIC datagrams (punch probes) and forwards the rest
        // here; reading the endpoint directly as well would split the datagrams between two readers.
        await executor.otherDatagrams(handler)
    }

    /// Like ``install(executor:)``, for the datagrams from `server` only (a TURN server): they no longer go to the
    /// other STUN clients (NAT discovery) that take ``install(executor:)``'s slot after this one.
    func install(executor: PunchExecutor, relayServer server: SocketAddress) async {
        let handler: @Sendable ([UInt8], SocketAddress) -> Void = { [self] bytes, from in
            deliver(STUNDatagram(bytes: bytes, from: from))
        }
        await executor.relayDatagrams(from: server, handler)
    }

    private func deliver(_ datagram: STUNDatagram) {
        _ = sink.withLock { $0?.yield(datagram) }
    }

    func send(_ bytes: [UInt8], to destination: SocketAddress) async throws {
        try await endpoint.send(datagram: bytes, to: destination)
    }

    func incoming() -> AsyncStream<STUNDatagram> {
        let (stream, continuation) = AsyncStream.makeStream(of: STUNDatagram.self, bufferingPolicy: .bufferingNewest(256))
        let previous = sink.withLock { current in
            defer { current = continuation }
            return current
        }
        previous?.finish()
        return stream
    }

    func close() async {
        finish()
    }

    func finish() {
        sink.withLock { current in
            current?.finish()
            current = nil
        }
    }
}
