import HolePunchNet
import HolePunchPortMapping
import ProcessTestSupport
import Testing

/// A mapper for `port` that asks `gateway` (a loopback address: tests send nowhere else) on behalf of `client`.
func loopbackMapper(port: UInt16, protocols: [PortMappingProtocol], gateway: SocketAddress.IP, client: SocketAddress.IP,
                    bound: Duration = .milliseconds(400)) -> PortMapper {
    var configuration = PortMapper.Configuration()
    configuration.protocols = protocols
    configuration.firstAnswerBound = bound
    configuration.route = GatewayRoute(gateway: gateway, client: client)
    return PortMapper(internalPort: port, configuration: configuration)
}

@Suite struct PortMapperTests {
    /// A gateway that never answers (nothing listens on 127.0.0.3:5351): PCP and NAT-PMP both time out, and the
    /// mapper reports a typed timeout within its first-answer bound, not after the RFCs' retransmission schedules.
    /// (UPnP is left out: SSDP is multicast, and tests send only to loopback.)
    @Test func aSilentRouterIsATypedTimeoutWithinTheBound() async throws {
        let mapper = loopbackMapper(port: 40_999, protocols: [.pcp, .natpmp],
                                    gateway: .v4(127, 0, 0, 3), client: .v4(127, 0, 0, 1), bound: .milliseconds(300))
        let started = ContinuousClock.now
        do {
            let mapping = try await mapper.map()
            Issue.record("a silent router granted \(mapping)")
        } catch {
            #expect(error.code == .timeout, "\(error)")
            #expect(error.message.contains("pcp"), "\(error)")
        }
        // The bound is 300 ms. This is not a timing measurement: it separates "returned at its own bound" from
        // "ran the protocols' schedules" (libnatpmp's nine tries take over two minutes; PCP's retransmissions go on
        // until told to stop), with room for a machine loaded enough to stretch 300 ms tenfold (seen: 3.8 s).
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(await mapper.mapping == nil)
    }

    /// A configured route whose client address is not one of ours is refused before anything is sent: we never map
    /// for another host (UPnP's NewInternalClient and PCP's client field could name any LAN host).
    @Test func aClientAddressThatIsNotOursIsRefused() async {
        let mapper = loopbackMapper(port: 40_998, protocols: [.natpmp],
                                    gateway: .v4(127, 0, 0, 3), client: .v4(192, 0, 2, 77))
        do {
            let mapping = try await mapper.map()
            Issue.record("mapped for another host: \(mapping)")
        } catch {
            #expect(error.code == .local, "\(error)")
            #expect(error.message.contains("not an address of this host"), "\(error)")
        }
    }

    @Test func theDefaultGatewayIsReadFromTheRouteTable() {
        let table = """
            Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
            eth0\t0001000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
            eth0\t00000000\t0101000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
            """
        #expect(GatewayRoute.defaultGateway(inRouteTable: table) == .v4(10, 0, 1, 1))
        #expect(GatewayRoute.defaultGateway(inRouteTable: "Iface\tDestination\tGateway\n") == nil)
    }
}

@Suite struct PortMapperLoopbackTests {
    /// Against a PCP server on loopback: two callers at once get one mapping (one MAP request), and deleting sends
    /// lifetime 0.
    @Test func concurrentCallersShareOneRequestAndDeleteSendsLifetimeZero() async throws {
        let server = try FakePCPServer(ip: .v4(127, 0, 0, 5))
        defer { server.stop() }
        let mapper = loopbackMapper(port: 40_997, protocols: [.pcp],
                                    gateway: .v4(127, 0, 0, 5), client: .v4(127, 0, 0, 1), bound: .seconds(2))
        async let first = mapper.map()
        async let second = mapper.map()
        let (a, b) = try await (first, second)
        #expect(a == b)
        #expect(a.mappingProtocol == .pcp)
        #expect(a.external == SocketAddress(ip: .v4(203, 0, 113, 10), port: 40_997))
        #expect(server.requests == [7200])
        await mapper.delete()
        #expect(server.requests == [7200, 0])
        #expect(await mapper.mapping == nil)
    }

    /// A router that answers after the bound: the caller gets its timeout on time, and the mapping the router made
    /// anyway is taken back (a MAP with lifetime 0 follows the request).
    @Test func aGrantAfterTheBoundIsTakenBack() async throws {
        let server = try FakePCPServer(ip: .v4(127, 0, 0, 6), answerDelay: .milliseconds(300))
        defer { server.stop() }
        let mapper = loopbackMapper(port: 40_996, protocols: [.pcp],
                                    gateway: .v4(127, 0, 0, 6), client: .v4(127, 0, 0, 1), bound: .milliseconds(100))
        await #expect(throws: PortMappingError.self) { try await mapper.map() }
        #expect(await eventually(.seconds(5)) { server.requests == [7200, 0] }, "\(server.requests)")
    }
}
