/// A session's id and probe key, drawn by the driver (the state machine itself draws no randomness, so tests
/// can script it).
public struct SessionSecret: Sendable, Hashable {
    /// The session id: lowercase hex, usable in a TLS server name and in a probe's USERNAME.
    public var id: String
    /// 32 random bytes that authenticate the session's probes.
    public var key: [UInt8]

    /// Creates a secret.
    public init(id: String, key: [UInt8]) {
        self.id = id
        self.key = key
    }

    /// A fresh random secret: a 128-bit id and a 256-bit key from the system generator.
    public static func random() -> SessionSecret {
        var generator = SystemRandomNumberGenerator()
        return random(using: &generator)
    }

    /// A fresh secret from `generator`.
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> SessionSecret {
        let digits: [Character] = Array("0123456789abcdef")
        var id = ""
        id.reserveCapacity(32)
        for _ in 0..<2 {
            var word = generator.next()
            for _ in 0..<16 {
                id.append(digits[Int(word & 0xF)])
                word >>= 4
            }
        }
        var key: [UInt8] = []
        key.reserveCapacity(32)
        for _ in 0..<4 {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { key.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return SessionSecret(id: id, key: key)
    }
}
