import ArgumentParser
import Foundation
import HolePunchNet
import HolePunchPortMapping
import Logging

/// Options shared by `nat detect --port-mapping` and `nat map`.
struct PortMappingOptions: ParsableArguments {
    @Option(name: .customLong("portmap-protocol"),
            help: "Ask only this protocol (pcp, natpmp, upnp); default: all, in that order.")
    var protocols: [String] = []

    @Option(help: "Lifetime to ask the router for, in seconds.")
    var lifetime: UInt32 = 7200

    @Option(help: "Bound on the first PCP or NAT-PMP answer, in milliseconds (UPnP has its own, 1500 ms).")
    var portmapTimeoutMs: Int = 400

    @Option(help: "The router's LAN address (default: the IPv4 default route's gateway).")
    var gateway: String?

    func validate() throws {
        guard lifetime >= 1 else { throw ValidationError("--lifetime must be at least 1") }
        guard portmapTimeoutMs >= 1 else { throw ValidationError("--portmap-timeout-ms must be at least 1") }
        for name in protocols where PortMappingProtocol(rawValue: name) == nil {
            throw ValidationError("--portmap-protocol must be pcp, natpmp or upnp, not '\(name)'")
        }
    }

    /// The mapper configuration these options describe.
    func configuration() throws -> PortMapper.Configuration {
        var configuration = PortMapper.Configuration()
        if !protocols.isEmpty { configuration.protocols = protocols.compactMap(PortMappingProtocol.init(rawValue:)) }
        configuration.requestedLifetime = lifetime
        configuration.firstAnswerBound = .milliseconds(portmapTimeoutMs)
        if let gateway {
            let ip: SocketAddress.IP
            do { ip = try SocketAddress(host: gateway, port: 0).ip } catch {
                throw usageFailure("\(error)", hint: "use a numeric IPv4 address such as 192.168.1.1")
            }
            configuration.route = try GatewayRoute(gateway: ip, client: GatewayRoute.discover().client)
        }
        return configuration
    }
}

/// `holepunch nat map --bind ADDR [--hold-seconds N]`: map a port, keep it, print what arrives, delete it.
struct NATMapCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Ask the router to map a UDP port (PCP, NAT-PMP, UPnP-IGD), keep it, and print datagrams that arrive.",
        discussion: """
            Prints one JSON line per event: {"event":"mapped"|"refreshed"|"lost"|"received"|"deleted", …}. The \
            mapping is refreshed at half its lifetime and deleted on exit (after --hold-seconds, or on EOF on stdin).

            Examples:
              holepunch nat map --bind 0.0.0.0:4000 --hold-seconds 60
              holepunch nat map --bind 0.0.0.0:4000 --portmap-protocol natpmp --lifetime 30
            """
    )

    @Option(help: "Local address to bind and map, numeric HOST:PORT (port 0 picks one).")
    var bind: String = "0.0.0.0:0"

    @Option(help: "How long to keep the mapping, in seconds (0: until stdin closes).")
    var holdSeconds: Int = 0

    @OptionGroup var mapping: PortMappingOptions

    func run() async throws {
        let local: SocketAddress
        do { local = try SocketAddress(parsing: bind) } catch { throw usageFailure("\(error)", hint: "e.g. --bind 0.0.0.0:4000") }
        let socket: UDPDatagramSocket
        do { socket = try UDPDatagramSocket(binding: local) } catch { throw cliFailure("\(error)", hint: nil) }
        let mapper = PortMapper(internalPort: socket.localAddress.port, configuration: try mapping.configuration(),
                                logger: stderrLogger)
        let granted: PortMapping
        do { granted = try await mapper.map() } catch {
            emit(["event": "failed", "code": "\(error.code)", "error": "\(error)"])
            throw ExitCode(3)
        }
        emit(event(granted, "mapped"))
        let keeper = Task { await mapper.keep { change in emit(change.map { event($0, "refreshed") } ?? ["event": "lost"]) } }
        let reader = Thread {
            while !keeper.isCancelled {
                guard let (bytes, from) = socket.receive(timeoutMilliseconds: 100) else { continue }
                emit(["event": "received", "from": "\(from)", "text": String(decoding: bytes, as: UTF8.self)])
            }
        }
        reader.start()
        if holdSeconds > 0 {
            try? await Task.sleep(for: .seconds(holdSeconds))
        } else {
            await waitForEndOfInput()
        }
        keeper.cancel()
        await keeper.value
        emit(["event": "deleted"])
    }
}

/// The mapper's log goes to stderr: stdout carries the command's own output (JSON lines for `nat map`).
private let stderrLogger = Logger(label: "holepunch.portmap") { StreamLogHandler.standardError(label: $0) }

/// The fields of a mapping event.
private func event(_ mapping: PortMapping, _ name: String) -> [String: String] {
    ["event": name, "protocol": "\(mapping.mappingProtocol)", "external": "\(mapping.external)",
     "internal_port": "\(mapping.internalPort)", "lifetime": "\(mapping.lifetimeSeconds)"]
}

/// One JSON object per line on stdout, flushed (tests and scripts read it as it comes).
func emit(_ fields: [String: String]) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    guard let data = try? encoder.encode(fields) else { return }
    FileHandle.standardOutput.write(data + Data("\n".utf8))
}

/// Returns when stdin reaches end of file (read on a thread of its own, not the concurrency pool).
private func waitForEndOfInput() async {
    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
        Thread {
            while !FileHandle.standardInput.availableData.isEmpty {}
            continuation.resume()
        }.start()
    }
}

/// Binds `port`, which discovery has just released: a descriptor it closed may still be held for a moment by a send
/// or a loop finishing with it (CI saw "Address already in use" once), so an in-use port is tried again for up to
/// one second before the error stands.
private func bindReleasedPort(_ port: UInt16) async throws(DatagramError) -> UDPDatagramSocket {
    let clock = ContinuousClock()
    let giveUp = clock.now + .seconds(1)
    while true {
        do {
            return try UDPDatagramSocket(binding: .anyV4(port: port))
        } catch where error.errno == EADDRINUSE && port != 0 && clock.now < giveUp {
            try? await Task.sleep(for: .milliseconds(20))
        }
    }
}

/// Prints what the router offers (`nat detect --port-mapping`): each protocol asked on its own, each mapping deleted
/// again at once.
func printPortMappingOffer(port requested: UInt16, options: PortMappingOptions, json: Bool) async throws {
    // Hold the port while asking (port 0: a fresh one), so a mapping never points at a port someone else owns.
    let socket: UDPDatagramSocket
    do { socket = try await bindReleasedPort(requested) } catch {
        throw cliFailure("cannot bind a port to map: \(error)", hint: "pass a free port with --bind")
    }
    defer { withExtendedLifetime(socket) {} }
    let port = socket.localAddress.port
    let mapper = PortMapper(internalPort: port, configuration: try options.configuration(), logger: stderrLogger)
    let answers = await mapper.probe()
    if json {
        for answer in answers {
            switch answer.result {
            case let .success(mapping): emit(event(mapping, "offered"))
            case let .failure(error):
                emit(["event": "refused", "protocol": "\(answer.mappingProtocol)", "code": "\(error.code)", "error": error.message])
            }
        }
        return
    }
    print("port mapping (port \(port)):")
    for answer in answers {
        switch answer.result {
        case let .success(mapping):
            print("  \(answer.mappingProtocol): external \(mapping.external), lease \(mapping.lifetimeSeconds)s")
        case let .failure(error):
            print("  \(answer.mappingProtocol): no (\(error.code): \(error.message))")
        }
    }
}
