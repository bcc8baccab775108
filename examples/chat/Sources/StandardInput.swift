import Foundation

/// Standard input line by line, read on its own thread so no cooperative thread blocks in read(2).
func standardInputLines() -> AsyncStream<[UInt8]> {
    let (stream, continuation) = AsyncStream.makeStream(of: [UInt8].self)
    Thread {
        while let line = readLine(strippingNewline: false) { continuation.yield(Array(line.utf8)) }
        continuation.finish()
    }.start()
    return stream
}
