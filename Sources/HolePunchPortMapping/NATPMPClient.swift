internal import CNatPMP
import Foundation
import HolePunchNet
#if canImport(Glibc)
import Glibc
#endif

/// A NAT-PMP (RFC 6886) client over libnatpmp: one `natpmp_t` (its socket toward the gateway) owned by this object
/// and closed in `deinit`.
///
/// `@unchecked Sendable`: the handle is used only inside the blocking calls below, which run on one dedicated thread
/// at a time because their only caller, the ``PortMapper`` actor, awaits each before the next.
final class NATPMPClient: @unchecked Sendable {
    /// What the gateway answered to a mapping request.
    struct Grant: Sendable {
        var external: SocketAddress
        var lifetime: UInt32
        /// Seconds since the gateway's state began (RFC 6886 §3.6).
        var epoch: UInt32
    }

    private var handle = natpmp_t()
    private let gateway: SocketAddress.IP

    /// Opens libnatpmp's socket toward `gateway` (forced: libnatpmp's own gateway lookup reads the same route table).
    init(gateway: SocketAddress.IP) throws(PortMappingError) {
        guard case let .v4(a, b, c, d) = gateway else {
            throw PortMappingError(.local, "NAT-PMP needs an IPv4 gateway", protocol: .natpmp)
        }
        self.gateway = gateway
        // in_addr_t in network byte order: the octets in memory order.
        let address = in_addr_t(a) | in_addr_t(b) << 8 | in_addr_t(c) << 16 | in_addr_t(d) << 24
        let result = initnatpmp(&handle, 1, address)
        guard result == 0 else { throw Self.error(result, "initnatpmp") }
    }

    deinit { closenatpmp(&handle) }

    /// Maps UDP `internalPort` (lifetime 0 deletes) and learns the public address; bounded by `deadline`.
    func map(internalPort: UInt16, lifetime: UInt32, deadline: ContinuousClock.Instant, stop: StopFlag)
        -> Result<Grant, PortMappingError>
    {
        var ip = SocketAddress.IP.v4(0, 0, 0, 0)
        if lifetime > 0 {
            guard sendpublicaddressrequest(&handle) >= 0 else { return .failure(Self.error(-10, "sendpublicaddressrequest")) }
            switch wait(deadline: deadline, stop: stop) {
            case let .failure(error): return .failure(error)
            case let .success(response):
                let raw = response.pnu.publicaddress.addr.s_addr
                ip = .v4(UInt8(raw & 0xff), UInt8(raw >> 8 & 0xff), UInt8(raw >> 16 & 0xff), UInt8(raw >> 24))
            }
        }
        let sent = sendnewportmappingrequest(&handle, NATPMP_PROTOCOL_UDP, internalPort, internalPort, lifetime)
        guard sent >= 0 else { return .failure(Self.error(sent, "sendnewportmappingrequest")) }
        switch wait(deadline: deadline, stop: stop) {
        case let .failure(error): return .failure(error)
        case let .success(response):
            let mapping = response.pnu.newportmapping
            guard lifetime == 0 || (mapping.mappedpublicport != 0 && mapping.lifetime != 0) else {
                return .failure(PortMappingError(.malformed, "port \(mapping.mappedpublicport) lifetime \(mapping.lifetime)",
                                                 protocol: .natpmp))
            }
            guard mapping.privateport == internalPort else {
                return .failure(PortMappingError(.malformed, "answer for port \(mapping.privateport)", protocol: .natpmp))
            }
            return .success(Grant(external: SocketAddress(ip: ip, port: mapping.mappedpublicport),
                                  lifetime: mapping.lifetime, epoch: response.epoch))
        }
    }

    /// Reads the pending request's answer, letting libnatpmp retransmit (250 ms doubling, RFC 6886 §3.1), until
    /// `deadline` or `stop`.
    private func wait(deadline: ContinuousClock.Instant, stop: StopFlag) -> Result<natpmpresp_t, PortMappingError> {
        var response = natpmpresp_t()
        while true {
            var pending = timeval()
            _ = getnatpmprequesttimeout(&handle, &pending)
            let untilRetry = Int(pending.tv_sec) * 1000 + Int(pending.tv_usec) / 1000
            let left = ContinuousClock.now.duration(to: deadline)
            let untilDeadline = Int(left.milliseconds)
            if untilDeadline <= 0 || stop.isSet {
                return .failure(PortMappingError(.timeout, "no NAT-PMP answer from \(SocketAddress(ip: gateway, port: 5351))",
                                                 protocol: .natpmp))
            }
            var entry = pollfd(fd: handle.s, events: Int16(POLLIN), revents: 0)
            _ = poll(&entry, 1, Int32(max(0, min(untilRetry, untilDeadline, 50))))
            let result = readnatpmpresponseorretry(&handle, &response)
            if result == NATPMP_TRYAGAIN { continue }
            guard result == 0 else { return .failure(Self.error(result, "readnatpmpresponseorretry")) }
            return .success(response)
        }
    }

    /// libnatpmp's negative results as typed errors.
    private static func error(_ result: Int32, _ call: String) -> PortMappingError {
        let code: PortMappingError.Code = switch result {
        case NATPMP_ERR_NOTAUTHORIZED, NATPMP_ERR_NETWORKFAILURE, NATPMP_ERR_OUTOFRESOURCES, NATPMP_ERR_UNDEFINEDERROR: .refused
        case NATPMP_ERR_UNSUPPORTEDVERSION, NATPMP_ERR_UNSUPPORTEDOPCODE, NATPMP_ERR_NOGATEWAYSUPPORT: .unsupported
        case NATPMP_ERR_WRONGPACKETSOURCE: .malformed
        default: .local
        }
        return PortMappingError(code, "\(call) returned \(result)", protocol: .natpmp)
    }
}
