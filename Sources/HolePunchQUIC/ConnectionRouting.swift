internal import CNgtcp2

/// Length of every connection ID this side issues. Fixed, because a short header does not carry the DCID length:
/// the demultiplexer must know it to read the DCID of any packet addressed to us.
let localCIDLength = 16

/// A connection ID as a cheap hashable key (up to 20 bytes, QUIC's maximum).
struct CIDKey: Hashable {
    var a: UInt64 = 0
    var b: UInt64 = 0
    var c: UInt32 = 0
    var length: UInt8 = 0

    init(_ bytes: UnsafeRawBufferPointer) {
        let count = min(bytes.count, 20)
        var words = (UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &words) { raw in
            for i in 0..<count { raw[i] = bytes[i] }
        }
        // Bytes past the ID stay zero, so equal IDs compare equal.
        a = words.0
        b = words.1
        c = words.2
        length = UInt8(count)
    }

    init(_ cid: ngtcp2_cid) {
        var copy = cid
        let count = cid.datalen
        self = withUnsafeBytes(of: &copy.data) { CIDKey(UnsafeRawBufferPointer(rebasing: $0.prefix(count))) }
    }
}

/// The routing table of one endpoint's socket: DCID → connection. Shared with callbacks, which add and retire
/// connection IDs while ngtcp2 runs.
final class ConnectionRouter {
    var routes: [CIDKey: ConnectionCore] = [:]
    var policy: AcceptPolicy

    init(policy: AcceptPolicy) { self.policy = policy }
}
