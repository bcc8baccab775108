import ArgumentParser
import Foundation
import HolePunchNet
import HolePunchSTUN

/// `holepunch nat …`
struct NATCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nat", abstract: "Measure what this host's NAT does.",
        discussion: """
            Mapping, filtering and port allocation (RFC 5780), measured against a STUN server; and what the router \
            offers on request (PCP, NAT-PMP, UPnP-IGD port mappings).

            Examples:
              holepunch nat detect --stun 127.0.0.1:7001
              holepunch nat detect --stun 127.0.0.1:7001 --port-mapping
              holepunch nat map --bind 0.0.0.0:4000 --hold-seconds 60
            """,
        subcommands: [NATDetectCommand.self, NATMapCommand.self])
}

/// `holepunch nat detect --stun HOST:PORT [--json]`
struct NATDetectCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detect",
        abstract: "RFC 5780 NAT behaviour discovery against a STUN server: mapping, filtering, allocation, evidence.",
        discussion: """
            Works against `holepunch rendezvous` (its STUN port, by default the listen port + 1) and any RFC 5780 \
            server (e.g. coturn with two addresses). Verdicts the server cannot support are reported as unknown.

            Examples:
              holepunch nat detect --stun 127.0.0.1:7001
              holepunch nat detect --stun 127.0.0.1:7001 --bind 127.0.0.1:0 --json
            """
    )

    @Option(help: "The STUN server's primary address, numeric HOST:PORT.")
    var stun: String

    @Option(help: "Local address to bind (default: the wildcard address of the server's family, port 0).")
    var bind: String?

    @Option(help: "Overall time limit in milliseconds.")
    var timeoutMs: Int = 8000

    @Flag(help: "Print the full verdict and evidence as JSON.")
    var json = false

    @Flag(help: "Also ask the router for a port mapping with each protocol (deleted at once) and report what answered.")
    var portMapping = false

    @OptionGroup var portMappingOptions: PortMappingOptions

    func validate() throws {
        guard timeoutMs >= 1 else { throw ValidationError("--timeout-ms must be at least 1") }
    }

    func run() async throws {
        let server: SocketAddress
        do { server = try SocketAddress(parsing: stun) } catch {
            throw usageFailure("\(error)", hint: "use a numeric address such as 127.0.0.1:3479 or [::1]:3479")
        }
        let local: SocketAddress
        if let bind {
            do { local = try SocketAddress(parsing: bind) } catch { throw usageFailure("\(error)", hint: "e.g. --bind 127.0.0.1:0") }
        } else {
            local = server.isIPv6 ? SocketAddress(ip: .v6([UInt8](repeating: 0, count: 16)), port: 0) : .anyV4(port: 0)
        }
        var configuration = NATDiscovery.Configuration()
        configuration.overallTimeout = .milliseconds(timeoutMs)
        let behaviour: NATBehaviour
        do {
            behaviour = try await NATDiscoveryClient.discover(server: server, bindAddress: local, configuration: configuration)
        } catch {
            throw cliFailure("discovery failed: \(error)", hint: "check --stun and that UDP to it is allowed")
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: (try? encoder.encode(behaviour)) ?? Data(), as: UTF8.self))
            if portMapping { try await printPortMappingOffer(port: local.port, options: portMappingOptions, json: true) }
            return
        }
        let evidence = behaviour.evidence
        print("server       \(evidence.server)  other-address \(evidence.otherAddress.map { "\($0)" } ?? "none")")
        print("local        \(evidence.localAddress)  reflexive \(behaviour.reflexiveAddress.map { "\($0)" } ?? "unknown")"
              + "  nat \(evidence.natDetected.map { $0 ? "yes" : "no" } ?? "unknown")")
        print("mapping      \(behaviour.mapping.rawValue) (confidence \(evidence.mappingConfidence))")
        print("filtering    \(behaviour.filtering.rawValue) (confidence \(evidence.filteringConfidence))")
        let delta = behaviour.portDelta.map { ", delta \($0)" } ?? ""
        print("allocation   \(behaviour.allocation.rawValue)\(delta) (confidence \(evidence.allocationConfidence))")
        print("type         \(behaviour.legacyLabel) (confidence \(behaviour.confidence))")
        print("tests:")
        for test in evidence.tests {
            var flags = ""
            if test.changeIP || test.changePort {
                flags = " change-request(" + [test.changeIP ? "ip" : nil, test.changePort ? "port" : nil].compactMap { $0 }.joined(separator: "+") + ")"
            }
            let mapped = test.mappedAddress.map { " mapped \($0)" } ?? ""
            let from = test.responseFrom.map { " from \($0)" } ?? ""
            let code = test.errorCode.map { " error \($0)" } ?? ""
            print("  \(test.name): socket \(test.socket) → \(test.destination)\(flags): \(test.outcome)\(mapped)\(from)\(code) (\(test.transmissions) sent)")
        }
        for note in evidence.notes { print("note: \(note)") }
        if portMapping { try await printPortMappingOffer(port: local.port, options: portMappingOptions, json: false) }
    }
}
