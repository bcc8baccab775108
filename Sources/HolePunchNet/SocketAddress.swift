#if canImport(Glibc)
public import Glibc
#elseif canImport(Darwin)
public import Darwin
#endif

/// An IPv4 or IPv6 transport address (IP and UDP port), as a plain value.
///
/// Every layer of HolePunch (QUIC endpoint, STUN, probes, rendezvous) speaks in this type, so that an address
/// learned from a STUN reply can be dialled without conversion.
public struct SocketAddress: Hashable, Sendable, CustomStringConvertible, Codable {
    /// The IP part of a socket address.
    public enum IP: Hashable, Sendable {
        /// An IPv4 address in network byte order, as four octets.
        case v4(UInt8, UInt8, UInt8, UInt8)
        /// An IPv6 address, as sixteen octets in network byte order.
        case v6([UInt8])
    }

    /// The IP address.
    public var ip: IP
    /// The UDP port.
    public var port: UInt16

    /// Creates an address from its parts.
    public init(ip: IP, port: UInt16) {
        self.ip = ip
        self.port = port
    }

    /// Parses `host:port` or `[v6]:port`, where host is a numeric IPv4 or IPv6 address.
    ///
    /// - Throws: ``SocketAddressError`` naming the text when it is not a numeric address with a port.
    public init(parsing text: String) throws {
        let hostPart: Substring
        let portPart: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"),
                  text.index(after: close) < text.endIndex,
                  text[text.index(after: close)] == ":"
            else { throw SocketAddressError(text: text, reason: "expected [IPv6]:port") }
            hostPart = text[text.index(after: text.startIndex)..<close]
            portPart = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw SocketAddressError(text: text, reason: "expected host:port")
            }
            hostPart = text[..<colon]
            portPart = text[text.index(after: colon)...]
        }
        guard let port = UInt16(portPart) else {
            throw SocketAddressError(text: text, reason: "port must be a number from 0 to 65535")
        }
        try self.init(host: String(hostPart), port: port)
    }

    /// Creates an address from a numeric IPv4 or IPv6 host string and a port.
    ///
    /// - Throws: ``SocketAddressError`` when `host` is not a numeric IP address.
    public init(host: String, port: UInt16) throws {
        var v4 = in_addr()
        var v6 = in6_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            let b = withUnsafeBytes(of: &v4) { Array($0) }
            self.init(ip: .v4(b[0], b[1], b[2], b[3]), port: port)
        } else if inet_pton(AF_INET6, host, &v6) == 1 {
            self.init(ip: .v6(withUnsafeBytes(of: &v6) { Array($0) }), port: port)
        } else {
            throw SocketAddressError(text: host, reason: "not a numeric IPv4 or IPv6 address")
        }
    }

    /// `127.0.0.1` with the given port.
    public static func loopbackV4(port: UInt16) -> SocketAddress {
        SocketAddress(ip: .v4(127, 0, 0, 1), port: port)
    }

    /// `0.0.0.0` with the given port.
    public static func anyV4(port: UInt16) -> SocketAddress {
        SocketAddress(ip: .v4(0, 0, 0, 0), port: port)
    }

    /// Whether this is an IPv6 address.
    public var isIPv6: Bool {
        if case .v6 = ip { return true }
        return false
    }

    /// The IP address as raw octets in network byte order (4 or 16 bytes).
    public var ipBytes: [UInt8] {
        switch ip {
        case let .v4(a, b, c, d): return [a, b, c, d]
        case let .v6(bytes): return bytes
        }
    }

    /// The numeric host, without the port (`198.51.100.1`, `::1`).
    public var host: String {
        switch ip {
        case let .v4(a, b, c, d):
            return "\(a).\(b).\(c).\(d)"
        case let .v6(bytes):
            var addr = in6_addr()
            withUnsafeMutableBytes(of: &addr) { raw in
                for i in 0..<16 { raw[i] = bytes[i] }
            }
            var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            _ = inet_ntop(AF_INET6, &addr, &buffer, socklen_t(buffer.count))
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// `host:port` for IPv4, `[host]:port` for IPv6.
    public var description: String {
        isIPv6 ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Creates an address from raw octets (4 or 16) and a port.
    ///
    /// Returns `nil` when `bytes` has another length.
    public init?(ipBytes bytes: [UInt8], port: UInt16) {
        switch bytes.count {
        case 4: self.init(ip: .v4(bytes[0], bytes[1], bytes[2], bytes[3]), port: port)
        case 16: self.init(ip: .v6(bytes), port: port)
        default: return nil
        }
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        try self.init(parsing: text)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// A socket address that could not be parsed.
public struct SocketAddressError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The text that was given.
    public var text: String
    /// Why it was rejected.
    public var reason: String

    /// Creates the error.
    public init(text: String, reason: String) {
        self.text = text
        self.reason = reason
    }

    public var description: String { "invalid address '\(text)': \(reason)" }
}

extension SocketAddress {
    /// Calls `body` with this address as a `sockaddr` pointer and its length.
    public func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        var storage = sockaddr_storage()
        let length = fill(&storage)
        return try withUnsafePointer(to: &storage) { pointer in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, length) }
        }
    }

    /// Writes this address into `storage` and returns the length of the filled `sockaddr`.
    @discardableResult
    public func fill(_ storage: inout sockaddr_storage) -> socklen_t {
        storage = sockaddr_storage()
        switch ip {
        case let .v4(a, b, c, d):
            return withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { sin in
                    sin.pointee.sin_family = sa_family_t(AF_INET)
                    sin.pointee.sin_port = port.bigEndian
                    withUnsafeMutableBytes(of: &sin.pointee.sin_addr) { raw in
                        raw[0] = a; raw[1] = b; raw[2] = c; raw[3] = d
                    }
                    return socklen_t(MemoryLayout<sockaddr_in>.size)
                }
            }
        case let .v6(bytes):
            return withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { sin6 in
                    sin6.pointee.sin6_family = sa_family_t(AF_INET6)
                    sin6.pointee.sin6_port = port.bigEndian
                    withUnsafeMutableBytes(of: &sin6.pointee.sin6_addr) { raw in
                        for i in 0..<16 { raw[i] = bytes[i] }
                    }
                    return socklen_t(MemoryLayout<sockaddr_in6>.size)
                }
            }
        }
    }

    /// Reads an address from a `sockaddr`; `nil` for families other than IPv4 and IPv6.
    public init?(_ address: UnsafePointer<sockaddr>) {
        switch Int32(address.pointee.sa_family) {
        case AF_INET:
            let sin = UnsafeRawPointer(address).assumingMemoryBound(to: sockaddr_in.self).pointee
            var addr = sin.sin_addr
            let b = withUnsafeBytes(of: &addr) { Array($0) }
            self.init(ip: .v4(b[0], b[1], b[2], b[3]), port: UInt16(bigEndian: sin.sin_port))
        case AF_INET6:
            let sin6 = UnsafeRawPointer(address).assumingMemoryBound(to: sockaddr_in6.self).pointee
            var addr = sin6.sin6_addr
            let bytes = withUnsafeBytes(of: &addr) { Array($0) }
            // IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) come back as plain IPv4.
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xff && bytes[11] == 0xff {
                self.init(ip: .v4(bytes[12], bytes[13], bytes[14], bytes[15]), port: UInt16(bigEndian: sin6.sin6_port))
            } else {
                self.init(ip: .v6(bytes), port: UInt16(bigEndian: sin6.sin6_port))
            }
        default:
            return nil
        }
    }
}

extension SocketAddress {
    /// The address a socket is bound to (`getsockname`), with the real port after binding port 0; nil when the
    /// call fails or the socket is not IPv4 or IPv6.
    public init?(boundTo fd: Int32) {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let named = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { return nil }
        let address = withUnsafePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { SocketAddress($0) }
        }
        guard let address else { return nil }
        self = address
    }
}
