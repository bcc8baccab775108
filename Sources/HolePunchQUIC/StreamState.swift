/// The state of one stream, owned by its connection.
final class StreamState {
    let id: Int64
    // Send side. Queued chunks stay allocated until ngtcp2 reports them acknowledged, because ngtcp2
    // does not copy stream data: it retransmits from the application's buffers.
    var chunks: [UnsafeMutableRawBufferPointer] = []
    var chunksBaseOffset: UInt64 = 0  // stream offset of chunks[0]
    var queuedEnd: UInt64 = 0  // stream offset after the last queued byte
    var sentOffset: UInt64 = 0  // bytes handed to ngtcp2
    var ackedOffset: UInt64 = 0
    var finRequested = false
    var finSent = false
    /// The peer acknowledged the FIN.
    var finAcked = false
    /// When the last of the stream's data was acknowledged after its FIN had gone out, while the FIN's own
    /// acknowledgement was not seen: ngtcp2 merges a lost FIN into retransmitted data, and the acknowledgement of
    /// that merged frame does not say it carried the FIN (see `Endpoint.settleFins`). Monotonic ns.
    var unconfirmedFinSince: UInt64?
    let writeWaiters = WaitList()
    var writeClosedError: QUICError?
    // Receive side.
    var received: [UInt8] = []
    var receivedStart = 0
    var finReceived = false
    var resetError: QUICError?
    let readWaiters = WaitList()
    /// The application has been told how the receive side ended (nil returned, or the reset thrown).
    var endReported = false
    /// ngtcp2 closed the stream: both sides ended cleanly, or one was reset.
    var closedByStack = false

    init(id: Int64) { self.id = id }

    var unacked: UInt64 { queuedEnd - ackedOffset }
    var hasUnsent: Bool { sentOffset < queuedEnd || (finRequested && !finSent) }
    /// Everything written was acknowledged, and the FIN too once `finish` asked for it.
    var isDelivered: Bool { ackedOffset >= queuedEnd && (!finRequested || finAcked) }

    func releaseAcked() {
        while let first = chunks.first, chunksBaseOffset + UInt64(first.count) <= ackedOffset {
            chunksBaseOffset += UInt64(first.count)
            first.deallocate()
            chunks.removeFirst()
        }
    }

    func freeAll() {
        for chunk in chunks { chunk.deallocate() }
        chunks.removeAll()
    }

    deinit { freeAll() }
}
