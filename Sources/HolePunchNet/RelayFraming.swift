/// How datagrams travel through one relay allocation: the seam between a relay client (TURN, in HolePunchSTUN) and
/// the endpoint's path layer (HolePunchQUIC), which carries a connection's path "via relay R to peer P".
///
/// The endpoint calls both methods on its event loop for every datagram of a relayed path, so they must be cheap and
/// must not block; the relay client updates its permissions and channels from its own task, hence `Sendable`.
public protocol RelayFraming: AnyObject, Sendable {
    /// The relay server's address, as the endpoint's socket sends to it: every datagram from it is relay traffic
    /// (forwarded data or the client's own control messages), never a peer's QUIC packet.
    var server: SocketAddress { get }

    /// The relayed address the server allocated for us (what the peer sends to).
    var relayedAddress: SocketAddress { get }

    /// `payload` wrapped for delivery to `peer` through the relay (a ChannelData message when a channel is bound,
    /// else a Send indication); nil when the allocation has no permission for `peer` yet or has ended.
    func wrap(_ payload: UnsafeRawBufferPointer, to peer: SocketAddress) -> [UInt8]?

    /// The peer and payload of a datagram that arrived from ``server``, when it is forwarded data (ChannelData or a
    /// Data indication); nil when it is a control message, which the endpoint hands on as a non-QUIC datagram. The
    /// range indexes `datagram`.
    func unwrap(_ datagram: UnsafeRawBufferPointer) -> (peer: SocketAddress, payload: Range<Int>)?
}
