#if canImport(Glibc)
internal import Glibc
#elseif canImport(Darwin)
internal import Darwin
#endif

extension SocketAddress {
    /// Parses `host:port` where host is a numeric address or a host name, resolving a name once.
    ///
    /// A numeric address (`127.0.0.1:7000`, `[::1]:7000`) is taken as it is, without asking a resolver. Anything
    /// else must be a syntactically valid host name (letters, digits and hyphens in dot-separated labels of at most
    /// 63 characters, 253 in all, not ending in an all-numeric label), and only then goes to the system resolver
    /// (`/etc/hosts`, then DNS). Of the addresses it returns, the first IPv4 one is preferred, because endpoints bind
    /// IPv4 wildcards by default and an IPv6 answer would be unreachable from them; an IPv6 address is used only
    /// when the name has no IPv4 address.
    ///
    /// The result is a snapshot: a caller that wants to follow a name's changes resolves it again.
    ///
    /// - Throws: ``SocketAddressError`` when there is no port, the name is not a valid host name, or it does not
    ///   resolve.
    public static func resolving(_ text: String) throws(SocketAddressError) -> SocketAddress {
        do { return try SocketAddress(parsing: text) } catch {}
        guard !text.hasPrefix("["), let colon = text.lastIndex(of: ":") else {
            throw SocketAddressError(text: text, reason: "expected host:port or [IPv6]:port")
        }
        let host = String(text[..<colon])
        guard let port = UInt16(text[text.index(after: colon)...]) else {
            throw SocketAddressError(text: text, reason: "port must be a number from 0 to 65535")
        }
        // Checked before the resolver sees it: a typo never becomes a DNS query.
        guard isValidHostName(host) else {
            throw SocketAddressError(text: text, reason: "'\(host)' is neither a numeric IP address nor a valid host name")
        }
        return try resolve(host: host, port: port, text: text)
    }

    /// Whether `name` is a host name by RFC 1123 syntax (trailing dot allowed) whose last label is not all digits
    /// (RFC 3696), so that a mistyped IPv4 address such as `300.1.1.1` is rejected instead of looked up.
    static func isValidHostName(_ name: String) -> Bool {
        let trimmed = name.hasSuffix(".") ? String(name.dropLast()) : name
        guard (1...253).contains(trimmed.utf8.count) else { return false }
        let labels = trimmed.split(separator: ".", omittingEmptySubsequences: false)
        for label in labels {
            let bytes = Array(label.utf8)
            guard (1...63).contains(bytes.count), bytes.first != UInt8(ascii: "-"), bytes.last != UInt8(ascii: "-"),
                  bytes.allSatisfy({ isLetterOrDigit($0) || $0 == UInt8(ascii: "-") })
            else { return false }
        }
        guard let last = labels.last, !last.utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) })
        else { return false }
        return true
    }

    private static func isLetterOrDigit(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }

    /// One `getaddrinfo` call for UDP addresses of `host`; the first IPv4 answer, else the first IPv6 one.
    private static func resolve(host: String, port: UInt16, text: String) throws(SocketAddressError) -> SocketAddress {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Glibc)
        hints.ai_socktype = Int32(SOCK_DGRAM.rawValue)
        #else
        hints.ai_socktype = SOCK_DGRAM
        #endif
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, nil, &hints, &list)
        guard status == 0, let list else {
            let reason = String(cString: gai_strerror(status))
            throw SocketAddressError(text: text, reason: "host name '\(host)' does not resolve: \(reason)")
        }
        defer { freeaddrinfo(list) }
        var firstV6: SocketAddress?
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            if let sockaddr = current.pointee.ai_addr, var address = SocketAddress(sockaddr) {
                address.port = port
                if !address.isIPv6 { return address }
                if firstV6 == nil { firstV6 = address }
            }
            entry = current.pointee.ai_next
        }
        guard let firstV6 else {
            throw SocketAddressError(text: text, reason: "host name '\(host)' has no IPv4 or IPv6 address")
        }
        return firstV6
    }
}
