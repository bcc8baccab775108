import ProcessTestSupport
import HolePunchNet
import Testing
@testable import HolePunchSTUN

/// Parses whitespace-separated or contiguous hex into bytes.
func hex(_ text: String) -> [UInt8] {
    let digits = text.filter { $0.isHexDigit }
    var bytes: [UInt8] = []
    var index = digits.startIndex
    while index < digits.endIndex {
        let next = digits.index(index, offsetBy: 2)
        bytes.append(UInt8(digits[index..<next], radix: 16)!)
        index = next
    }
    return bytes
}


func addr(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

/// Runs `body` and returns the STUNError it throws, or nil.
func stunError(_ body: () throws -> Void) -> STUNError? {
    do {
        try body()
        return nil
    } catch let error as STUNError {
        return error
    } catch {
        return STUNError(.unexpectedMessage, "not a STUNError: \(error)")
    }
}

/// Every test that opens real sockets or runs other programs, serialized: they block threads while they wait,
/// and the timing bounds some of them check must not suffer from each other on a 2-core machine.
@Suite(.serialized) enum RealNetworkTests {}
