import Foundation
import ProcessTestSupport
import Synchronization
@testable import HolePunch
import HolePunchNet
import HolePunchQUIC
import HolePunchStrategy
#if canImport(Glibc)
import Glibc
#endif

enum PunchIdentities {
    static let a = try! Identity.generate(commonName: "punch-a")
    static let b = try! Identity.generate(commonName: "punch-b")
    static let c = try! Identity.generate(commonName: "punch-c")
}

/// A strategy with a fixed plan, so executor tests control ports, cadence and timeout exactly.
struct FixedStrategy: PunchStrategy {
    var name = "test-fixed"
    var perRound = 1
    var interval: Duration = .milliseconds(20)
    var rounds = 10
    var timeout: Duration = .seconds(5)
    var dialDirect = false
    var sockets = 1

    func plan(_ ctx: PunchContext) throws -> PunchPlan {
        PunchPlan(
            ports: PortList(ports: ctx.candidatePorts), localSockets: sockets, packetsPerRound: perRound,
            interval: interval, rounds: rounds, timeout: timeout, connectTimeout: .seconds(5), startDelay: .zero,
            initialRTT: .milliseconds(20), dialCandidatesDirectly: dialDirect
        )
    }
}

func bindEndpoint(_ identity: Identity) async throws -> Endpoint {
    try await Endpoint.bind(.loopbackV4(port: 0), configuration: EndpointConfiguration(identity: identity, acceptPolicy: .none))
}

/// A UDP socket bound on loopback that never answers: a silent peer.
final class SilentSocket {
    let fd: Int32
    let port: UInt16

    init() throws {
        let descriptor = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard SocketAddress.loopbackV4(port: 0).withSockAddr({ bind(descriptor, $0, $1) }) == 0 else {
            close(descriptor)
            throw PunchError(code: .invalidOptions, message: "bind failed")
        }
        fd = descriptor
        port = boundPort(descriptor)
    }

    deinit { close(fd) }
}

/// A loopback port with nothing bound to it (bound, read, then released): datagrams to it draw ICMP unreachable.
func unusedPort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
    defer { close(fd) }
    _ = SocketAddress.loopbackV4(port: 0).withSockAddr { bind(fd, $0, $1) }
    return boundPort(fd)
}

private func boundPort(_ fd: Int32) -> UInt16 {
    SocketAddress(boundTo: fd)?.port ?? 0
}

func sessionKey() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }

/// Two loopback endpoints (identities a and b), an executor on each and a fresh session key: the setup of most
/// executor tests. The caller closes the endpoints.
func punchPair() async throws -> (a: Endpoint, b: Endpoint, initiator: PunchExecutor, target: PunchExecutor, key: [UInt8]) {
    let a = try await bindEndpoint(PunchIdentities.a)
    let b = try await bindEndpoint(PunchIdentities.b)
    return (a, b, PunchExecutor(endpoint: a), PunchExecutor(endpoint: b), sessionKey())
}

func openFileDescriptors() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// Options for one side of a loopback punch.
func options(
    to host: Endpoint, ports: [UInt16]? = nil, session: String, key: [UInt8], role: PunchRole,
    expecting node: NodeID, strategy: any PunchStrategy = FixedStrategy()
) -> PunchOptions {
    PunchOptions(
        targetHost: "127.0.0.1", targetPorts: ports ?? [host.localAddress.port], sessionID: session, sessionKey: key,
        role: role, targetNodeID: node, strategy: strategy
    )
}

struct Deadline: Error {}

/// What each open descriptor points at, for leak reports.
func descriptorTargets() -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return names.sorted().map { name in
        let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)")) ?? "?"
        return "\(name)->\(target)"
    }
}
