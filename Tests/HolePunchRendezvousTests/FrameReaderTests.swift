import HolePunch
import Testing
@testable import HolePunchRendezvous

@Suite("Frame reader")
struct FrameReaderTests {
    /// `count` frames with distinct small bodies, concatenated.
    private func frames(_ count: Int) -> (bytes: [UInt8], bodies: [[UInt8]]) {
        var bytes: [UInt8] = []
        var bodies: [[UInt8]] = []
        for i in 0..<count {
            let body = Array("frame \(i)".utf8)
            bodies.append(body)
            let n = UInt32(body.count)
            bytes += [UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)] + body
        }
        return (bytes, bodies)
    }

    @Test("many frames in one chunk: every body comes out in order, and bytes moved stay linear in bytes received")
    func linearInOneChunk() throws {
        let (bytes, bodies) = frames(5_000)
        var reader = FrameReader()
        reader.append(bytes)
        var out: [[UInt8]] = []
        while let body = try reader.next() { out.append(body) }
        #expect(out == bodies)
        // Dropping each consumed frame by shifting the rest is quadratic (about 5,000²/2 frames' worth here).
        #expect(reader.bytesMoved <= bytes.count, "moved \(reader.bytesMoved) bytes for \(bytes.count) received")
    }

    @Test("frames split at every byte boundary reassemble; a streamed megabyte moves at most what it received")
    func linearWhenStreamed() throws {
        let (bytes, bodies) = frames(20_000)
        var reader = FrameReader()
        var out: [[UInt8]] = []
        var offset = 0
        var step = 1
        while offset < bytes.count {
            let end = min(bytes.count, offset + step)
            reader.append(Array(bytes[offset..<end]))
            while let body = try reader.next() { out.append(body) }
            offset = end
            step = step % 4_099 + 7
        }
        #expect(out == bodies)
        #expect(reader.bytesMoved <= bytes.count, "moved \(reader.bytesMoved) bytes for \(bytes.count) received")
        #expect(reader.buffered < 4_200)
    }

    @Test("an oversized length is a protocolViolation")
    func oversized() {
        var reader = FrameReader()
        reader.append([0, 1, 0, 0])
        #expect(throws: RendezvousError.self) { _ = try reader.next() }
    }
}
