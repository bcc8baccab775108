internal import CMiniUPnPc
import Foundation
import HolePunchNet

/// A UPnP-IGD client over miniupnpc: SSDP discovery, then WANIPConnection's SOAP calls. Every call blocks (SSDP
/// waits its delay, SOAP is HTTP), so callers run them on a dedicated thread with a bound.
enum UPnPClient {
    /// A discovered gateway: the control URL and service type the SOAP calls need (copied out of miniupnpc's structs,
    /// which are freed at once), and our LAN address as the IGD's link saw it.
    struct Gateway: Sendable, Hashable {
        var controlURL: String
        var serviceType: String
        var lanAddress: String
        /// Whether the IGD said its WAN side is connected (result 1) or not (2: the lab's reserved addresses).
        var connected: Bool
    }

    /// SSDP search (`delay` bounds the wait for answers) and the description fetch. Accepts GetValidIGD's result 2
    /// ("not connected"): the lab's routers have documentation-range WAN addresses, which miniupnpd reports so.
    static func discover(delay: Duration) -> Result<Gateway, PortMappingError> {
        let milliseconds = Int32(max(10, min(60_000, delay.milliseconds)))
        var error: Int32 = 0
        // IGDv2 first, then v1; the first type that answers ends the search (each type waits up to `delay`), where
        // miniupnpc's default list starts with v1 and so costs an IGDv2-only router (miniupnpd) a whole delay.
        let types = ["urn:schemas-upnp-org:device:InternetGatewayDevice:2", "urn:schemas-upnp-org:device:InternetGatewayDevice:1"]
        let devices = withCStrings(types) { upnpDiscoverDevices($0, milliseconds, nil, nil, 0, 0, 2, &error, 0) }
        guard let devices else {
            return .failure(PortMappingError(.timeout, "no SSDP answer within \(milliseconds) ms (error \(error))", protocol: .upnp))
        }
        defer { freeUPNPDevlist(devices) }
        var urls = UPNPUrls()
        var data = IGDdatas()
        var lan = [CChar](repeating: 0, count: 64)
        let found = UPNP_GetValidIGD(devices, &urls, &data, &lan, Int32(lan.count))
        defer { if found != 0 { FreeUPNPUrls(&urls) } }
        guard found == 1 || found == 2, let control = urls.controlURL else {
            return .failure(PortMappingError(.unsupported, "no Internet gateway device (GetValidIGD \(found))", protocol: .upnp))
        }
        let service = withUnsafeBytes(of: data.first.servicetype) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        return .success(Gateway(controlURL: String(cString: control), serviceType: service,
                                lanAddress: cText(lan),
                                connected: found == 1))
    }

    /// AddPortMapping for UDP `internalPort` to `client` (ours: never another host), external port = internal
    /// first, then any port the IGD picks (AddAnyPortMapping, IGDv2) when that one is taken.
    static func map(_ gateway: Gateway, internalPort: UInt16, client: String, lifetime: UInt32)
        -> Result<PortMapping, PortMappingError>
    {
        let port = String(internalPort)
        var externalPort = internalPort
        var result = UPNP_AddPortMapping(gateway.controlURL, gateway.serviceType, port, port, client, "holepunch", "UDP",
                                         nil, String(lifetime))
        if result != 0 {
            var reserved = [CChar](repeating: 0, count: 8)
            result = UPNP_AddAnyPortMapping(gateway.controlURL, gateway.serviceType, port, port, client, "holepunch",
                                            "UDP", nil, String(lifetime), &reserved)
            externalPort = UInt16(cText(reserved)) ?? 0
        }
        guard result == 0 else {
            return .failure(PortMappingError(.refused, "AddPortMapping failed: \(String(cString: strupnperror(result))) (\(result))",
                                             protocol: .upnp))
        }
        guard externalPort != 0 else { return .failure(PortMappingError(.malformed, "external port 0", protocol: .upnp)) }
        var external = [CChar](repeating: 0, count: 64)
        let status = UPNP_GetExternalIPAddress(gateway.controlURL, gateway.serviceType, &external)
        guard status == 0, let address = try? SocketAddress(host: cText(external), port: externalPort),
              !address.isIPv6
        else {
            _ = delete(gateway, externalPort: externalPort)
            return .failure(PortMappingError(.malformed, "no usable external address (\(status))", protocol: .upnp))
        }
        return .success(PortMapping(mappingProtocol: .upnp, external: address, internalPort: internalPort,
                                    lifetimeSeconds: lifetime, grantedAt: .now))
    }

    /// DeletePortMapping for UDP `externalPort`; returns whether the IGD said yes.
    @discardableResult
    static func delete(_ gateway: Gateway, externalPort: UInt16) -> Bool {
        UPNP_DeletePortMapping(gateway.controlURL, gateway.serviceType, String(externalPort), "UDP", nil) == 0
    }
}

/// The text of a NUL-terminated C buffer.
private func cText(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Calls `body` with a NULL-terminated array of C strings (miniupnpc's device-type lists), valid only inside it.
private func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer($0) } + [nil]
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
