import ArgumentParser
import Foundation
import HolePunch
import HolePunchQUIC
import HolePunchLab
#if canImport(Glibc)
import Glibc
#endif

/// `holepunch lab matrix`: real punches for every ordered pair of lab NAT types, per strategy, in one lab.
///
/// One lab is brought up once; between pairs `lab.sh renat` re-makes both routers' NAT, and one rendezvous
/// runs in `rdv` for the whole run. Each trial starts two fresh `holepunch lab peer` processes with fresh
/// identities (fresh sockets, so fresh NAT mappings). A raw UDP punch (`probe.py punch`) per pair is the
/// physical reference. `--topology` adds rows for the lab's other topologies (one LAN, a carrier NAT, dual stack),
/// each run in a lab of its own after the pairs.
struct LabMatrixCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "matrix",
        abstract: "Punch every ordered pair of lab NAT types with each strategy; print tables, write JSON.",
        discussion: """
            Needs root; builds and removes its own lab. See docs/matrix.md for the results.

            Examples:
              sudo holepunch lab matrix --trials 3 --json bench-results/matrix.json
              sudo holepunch lab matrix --trials 40 --pair port_restricted:symmetric_random
              sudo holepunch lab matrix --trials 3 --topology all --only-topologies
            """
    )

    @Option(name: .customLong("strategy"), help: "A Lua strategy file (repeatable); default strategies/default.lua and strategies/macula.lua.")
    var strategies: [String] = []
    @Option(help: "Trials per pair and strategy.") var trials = 3
    @Option(help: "One-way delay on each WAN link, ms.") var delay: Double = 20
    @Option(help: "Loss on each WAN link, each way, percent.") var loss: Double = 0
    @Option(help: "Write the results as JSON to this file.") var json: String?
    @Option(help: "Write the markdown tables to this file as well.") var markdown: String?
    @Option(name: .customLong("pair"), help: "Only these pairs, A:B (repeatable); default all 25.") var pairs: [String] = []
    @Option(name: .customLong("topology"), help: ArgumentHelp(
        "Also run this lab topology (repeatable), or all of them: \(LabTopology.all.map(\.name).joined(separator: ", ")), all.",
        valueName: "name"))
    var topologyNames: [String] = []
    @Flag(help: "Run only the topologies given with --topology, not the NAT pairs.") var onlyTopologies = false
    @Option(help: "Punch timeout per trial, seconds.") var punchTimeout: Double = 5
    @Option(help: "The rendezvous's start delay ceiling, ms (its default: 150; measured peers get less).") var startDelay = 150
    @Option(help: "Lab name (default hpmx<pid>).") var name: String?
    @Flag(help: "Peers measure their NAT (RFC 5780) instead of being told the lab's configured type.") var discover = false
    @Flag(help: "With --discover: the initiator too waits for its discovery to be published before it asks for the punch.")
    var discoverFirst = false
    @Flag(help: "Skip the raw UDP reference punch.") var noRaw = false
    @Flag(help: "Run no coturn in the lab: peers punch only, as before issue 15.") var noRelay = false
    @Option(help: "Loss on the relayed leg (to and from coturn's relayed ports), percent each way.") var relayLoss: Double = 0
    @Option(help: "Bytes the initiator sends after its line, echoed and compared whole (0–4194304).") var transfer = 0
    @Flag(help: """
        Impostor check: a QUIC server with another identity runs in `other`, and router b DNATs every new inbound         UDP flow to it, so whatever the initiator dials first at b's address answers with the wrong identity.
        """)
    var impostor = false
    @Option(help: ArgumentHelp("""
        Run miniupnpd (lab/portmap.sh) on this router (a or b) for the NAT pairs; its peer maps its port and \
        publishes a 'mapped' candidate: the rows of "type + port mapping".
        """, valueName: "router"))
    var portMapping: String?

    func run() async throws {
        if let reason = LabScript.unavailableReason() { throw LabFailure(reason) }
        let labDir = try withLabScript { try LabScript.directory() }
        let repo = URL(fileURLWithPath: labDir).deletingLastPathComponent().path
        let files = strategies.isEmpty ? ["\(repo)/strategies/default.lua", "\(repo)/strategies/macula.lua"] : strategies
        for file in files where !FileManager.default.fileExists(atPath: file) { throw ValidationError("no strategy file \(file)") }
        var topologies: [LabTopology] = []
        for name in topologyNames {
            let chosen = name == "all" ? LabTopology.all : LabTopology.named(name).map { [$0] }
            guard let chosen else {
                throw ValidationError("bad --topology \(name): one of \(LabTopology.all.map(\.name).joined(separator: ", ")), all")
            }
            topologies += chosen.filter { !topologies.contains($0) }
        }
        if let portMapping, !["a", "b"].contains(portMapping) || onlyTopologies || !topologies.isEmpty || impostor {
            throw ValidationError("--port-mapping \(portMapping): a or b, for NAT pairs only (no --topology, no --impostor)")
        }
        if onlyTopologies && (topologies.isEmpty || !pairs.isEmpty) {
            throw ValidationError("--only-topologies needs --topology and no --pair")
        }
        var selected: [(String, String)] = []
        if onlyTopologies {
            // the topologies alone
        } else if pairs.isEmpty {
            for a in labNATTypes { for b in labNATTypes { selected.append((a, b)) } }
        } else {
            for pair in pairs {
                let parts = pair.split(separator: ":").map(String.init)
                guard parts.count == 2, labNATTypes.contains(parts[0]), labNATTypes.contains(parts[1]) else {
                    throw ValidationError("bad --pair \(pair): A:B with types \(labNATTypes.joined(separator: ", "))")
                }
                selected.append((parts[0], parts[1]))
            }
        }
        let lab = LabSession(script: "\(labDir)/lab.sh", labDir: labDir, name: name ?? "hpmx\(getpid())")
        LabSession.installInterruptCleanup(lab)
        defer { lab.down() }
        var runner = MatrixRunner(
            lab: lab, strategies: files, pairs: selected, trials: trials, delay: delay, loss: loss,
            punchTimeout: punchTimeout, discover: discover, raw: !noRaw, impostor: impostor, startDelay: startDelay,
            topologies: topologies, portMappingRouter: portMapping
        )
        runner.discoverFirst = discoverFirst
        runner.relay = !noRelay
        runner.relayLoss = relayLoss
        runner.transfer = transfer
        let report = try await runner.run()
        let tables = report.markdown()
        print(tables)
        if let markdown { try tables.write(toFile: markdown, atomically: true, encoding: .utf8) }
        if let json {
            let data = try JSONSerialization.data(withJSONObject: report.json(), options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: json))
        }
    }
}
