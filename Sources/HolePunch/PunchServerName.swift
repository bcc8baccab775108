/// How a punch's session id travels in the TLS server name, so the target can tell which punch a handshake
/// belongs to before it admits it.
extension PunchExecutor {
    /// The TLS server name that carries a session id: its UTF-8 in hex, in DNS labels of at most 60 characters,
    /// under `.punch.holepunch` (so any session id fits the SNI's character rules).
    static func serverName(forSession session: String) -> String {
        let hex = session.utf8.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        var labels: [String] = []
        var rest = Substring(hex)
        while !rest.isEmpty {
            labels.append(String(rest.prefix(60)))
            rest = rest.dropFirst(60)
        }
        return (labels + ["punch", "holepunch"]).joined(separator: ".")
    }

    /// The session id in a server name made by ``serverName(forSession:)``; nil for any other name.
    static func sessionID(fromServerName name: String) -> String? {
        guard name.hasSuffix(".punch.holepunch") else { return nil }
        let hex = String(name.dropLast(".punch.holepunch".count).filter { $0 != "." })
        guard hex.count % 2 == 0, !hex.isEmpty else { return nil }
        var bytes: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return String(bytes: bytes, encoding: .utf8)
    }
}
