extension TURNAllocation {
    /// Timers and bounds.
    public struct Configuration: Hashable, Sendable {
        /// The lifetime asked for in Allocate and Refresh.
        public var requestedLifetime: Duration = .seconds(600)
        /// The first retransmission timeout; it doubles after each transmission.
        public var initialRTO: Duration = .milliseconds(250)
        /// A request not answered within this long fails with `unreachable`: the bounded wait.
        public var transactionTimeout: Duration = .seconds(5)
        /// How often permissions are re-created (they last 5 minutes on the server).
        public var permissionRefresh: Duration = .seconds(240)
        /// How often channels are re-bound (they last 10 minutes on the server).
        public var channelRefresh: Duration = .seconds(480)
        /// A permission or channel that carried no data (`wrap`/`unwrap`) and was not asked for again for this long
        /// is not refreshed any more and lapses on the server, freeing its place among ``maximumPeers``. Checked at
        /// its refresh, so it lapses up to one refresh interval plus its server lifetime later. Long, because a
        /// connection that moved from the relay to a direct path sends nothing on the relayed one, which must
        /// still be there to move back to; its default, 30 minutes, bounds how long that fallback outlives its use.
        public var idlePeerLimit: Duration = .seconds(1800)
        /// Lifetimes granted by the server are clamped into this range of seconds, so a hostile server can make
        /// us neither refresh in a busy loop nor believe an allocation lives for days.
        public var lifetimeBounds: ClosedRange<UInt32> = 30...3600
        /// The allocation is refreshed at least this often, however long the granted lifetime (coturn grants at
        /// least 10 minutes; a shorter interval also notices a vanished server sooner).
        public var maximumRefreshInterval: Duration = .seconds(3600)
        /// At most this many peers hold a permission, and at most this many a channel, at a time (idle ones lapse).
        public var maximumPeers: Int = 64
        /// 438 (stale nonce) retries per request.
        public var maximumNonceRetries: Int = 3
        /// Whether sending to a permitted peer that has no channel yet also binds one (``TURNClient`` does it on
        /// its first `wrap`), so that later data goes as ChannelData (4 bytes of framing) instead of Send
        /// indications (36). Off by default; the node's relay turns it on.
        public var bindsChannels = false
        /// SOFTWARE sent in Allocate.
        public var software: String? = "HolePunch"

        /// The defaults.
        public init() {}
    }
}
