import Foundation
public import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

/// Where to ask for a mapping, and for whom: the IPv4 default gateway and our address toward it.
public struct GatewayRoute: Sendable, Hashable, CustomStringConvertible {
    /// The router's LAN address.
    public var gateway: SocketAddress.IP
    /// Our address on the gateway's link (the source of our requests, and the only host we map for).
    public var client: SocketAddress.IP

    /// Creates a route from known addresses.
    public init(gateway: SocketAddress.IP, client: SocketAddress.IP) {
        self.gateway = gateway
        self.client = client
    }

    /// `gateway 10.0.1.1 via 10.0.1.2`.
    public var description: String {
        "gateway \(SocketAddress(ip: gateway, port: 0).host) from \(SocketAddress(ip: client, port: 0).host)"
    }

    /// The default IPv4 gateway (Linux `/proc/net/route`) and the local address the kernel picks toward it.
    ///
    /// - Throws: ``PortMappingError`` `.local` when there is no default route or no address toward it.
    public static func discover() throws(PortMappingError) -> GatewayRoute {
        guard let table = try? String(contentsOfFile: "/proc/net/route", encoding: .utf8),
              let gateway = defaultGateway(inRouteTable: table)
        else { throw PortMappingError(.local, "no IPv4 default route") }
        return GatewayRoute(gateway: gateway, client: try localAddress(toward: gateway))
    }

    /// The gateway of the first default route in a `/proc/net/route` table (little-endian hex fields).
    package static func defaultGateway(inRouteTable table: String) -> SocketAddress.IP? {
        for line in table.split(separator: "\n").dropFirst() {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count > 3, fields[1] == "00000000", let raw = UInt32(fields[2], radix: 16), raw != 0 else { continue }
            return .v4(UInt8(raw & 0xff), UInt8(raw >> 8 & 0xff), UInt8(raw >> 16 & 0xff), UInt8(raw >> 24))
        }
        return nil
    }

    /// The source address the kernel would use toward `gateway`: a connected UDP socket's name (no packet is sent).
    static func localAddress(toward gateway: SocketAddress.IP) throws(PortMappingError) -> SocketAddress.IP {
        let target = SocketAddress(ip: gateway, port: PCP.serverPort)
        let fd = socket(target.isIPv6 ? AF_INET6 : AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw PortMappingError(.local, "socket failed (errno \(errno))") }
        defer { close(fd) }
        guard target.withSockAddr({ connect(fd, $0, $1) }) == 0, let local = SocketAddress(boundTo: fd) else {
            throw PortMappingError(.local, "no route to the gateway \(target.host) (errno \(errno))")
        }
        return local.ip
    }
}
