package import HolePunchNet
package import HolePunchQUIC
package import HolePunchSTUN

/// A `STUNTransport` on an endpoint's socket that reads the endpoint's non-QUIC datagrams itself: for a TURN or
/// STUN client on an endpoint nothing else reads (`holepunch bench relay`, the relayed-path tests). An endpoint a
/// `PunchExecutor` serves has its reader already (the executor; HolePunchRendezvous's transport goes through it):
/// a second reader would split the datagrams between the two.
package final class EndpointNonQUICTransport: STUNTransport {
    package let endpoint: Endpoint
    package let localAddress: SocketAddress

    package init(_ endpoint: Endpoint) {
        self.endpoint = endpoint
        localAddress = endpoint.localAddress
    }

    package func send(_ bytes: [UInt8], to destination: SocketAddress) async throws {
        try await endpoint.send(datagram: bytes, to: destination)
    }

    /// The endpoint's datagrams (not its unreachable reports) until the subscriber stops or the endpoint closes.
    package func incoming() -> AsyncStream<STUNDatagram> {
        let (stream, continuation) = AsyncStream.makeStream(of: STUNDatagram.self)
        let reader = Task { [endpoint] in
            for await case .datagram(let bytes, let from) in endpoint.nonQUICDatagrams {
                continuation.yield(STUNDatagram(bytes: bytes, from: from))
            }
            continuation.finish()
        }
        continuation.onTermination = { _ in reader.cancel() }
        return stream
    }

    /// Nothing to release: the endpoint belongs to its owner.
    package func close() async {}
}
