import Foundation
import HolePunchPortMapping
import ProcessTestSupport
import Testing

/// A lab (lab/lab.sh) with a real miniupnpd on nat-a (lab/portmap.sh), and `holepunch nat map` run in peer-a.
///
/// Needs root and what `lab.sh check` checks; skips with the reason otherwise. Names its lab `pmt<pid>` and always
/// takes down what it brought up.
enum PortMapLab {
    static let repoRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let labScript = repoRoot.appendingPathComponent("lab/lab.sh").path
    static let portmapScript = repoRoot.appendingPathComponent("lab/portmap.sh").path
    static let name = "pmt\(ProcessInfo.processInfo.processIdentifier % 1_000_000)"

    /// Why the lab cannot run here, or nil.
    static let unavailableReason: String? = {
        guard geteuid() == 0 else { return "the port-mapping lab needs root (uid \(geteuid()))" }
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/miniupnpd") else {
            return "miniupnpd is not installed (apt-get install miniupnpd-nftables)"
        }
        return nil
    }()

    static var available: Bool { unavailableReason == nil }

    /// Runs a lab script with this lab's name.
    static func script(_ path: String, _ arguments: [String], limit: TimeInterval = 120) async throws -> ProcessOutcome {
        try await runToEnd("/usr/bin/env", ["HP_LAB=\(name)", "HP_LAB_QUIET=1", path] + arguments, limit: limit)
    }

    /// `KEY=value` lines as a dictionary.
    static func environment(_ text: String) -> [String: String] {
        Dictionary(text.split(separator: "\n").compactMap { line in
            line.firstIndex(of: "=").map { (String(line[..<$0]), String(line[line.index(after: $0)...])) }
        }, uniquingKeysWith: { $1 })
    }

    /// Brings up a lab with `nat-a` of `natType` (and `nat-b` of `natB`, if given) and miniupnpd on `router`, runs
    /// `body`, and takes both down again.
    static func with(natA natType: String, natB: String? = nil, router: String = "a",
                     _ body: ([String: String]) async throws -> Void) async throws {
        let check = try await script(labScript, ["check"])
        try #require(check.status == 0, "lab.sh check: \(check.out)\(check.err)")
        _ = try await script(portmapScript, ["down"])
        _ = try await script(labScript, ["down"])
        let up = try await script(labScript, ["up", "--nat-a", natType] + (natB.map { ["--nat-b", $0] } ?? []))
        defer { _ = try? runDown() }
        try #require(up.status == 0, "lab.sh up: \(up.err)")
        let portmap = try await script(portmapScript, ["up", "--router", router, "--min-lifetime", "4"])
        try #require(portmap.status == 0, "portmap.sh up: \(portmap.err)")
        let lab = environment(try await script(labScript, ["status", "--env"]).out)
            .merging(environment(portmap.out), uniquingKeysWith: { $1 })
        try await body(lab)
    }

    /// Takes both down, synchronously (from a `defer`).
    private static func runDown() throws {
        for (path, argument) in [(portmapScript, "down"), (labScript, "down")] {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["HP_LAB=\(name)", "HP_LAB_QUIET=1", path, argument]
            try process.run()
            process.waitUntilExit()
        }
    }

    /// Sends one datagram with `text` from the namespace `namespace` to `address`.
    static func send(_ text: String, from namespace: String, to address: String) async throws {
        let (host, port) = (address[..<address.lastIndex(of: ":")!], address[address.index(after: address.lastIndex(of: ":")!)...])
        let program = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'\(text)', ('\(host)', \(port)))"
        let outcome = try await runToEnd("/usr/sbin/ip", ["netns", "exec", namespace, "python3", "-c", program], limit: 10)
        #expect(outcome.status == 0, "\(outcome.err)")
    }

    /// The JSON events a `holepunch nat map` child printed so far.
    static func events(_ child: Child) -> [[String: String]] {
        child.stdout.text.split(separator: "\n").compactMap {
            try? JSONDecoder().decode([String: String].self, from: Data($0.utf8))
        }
    }

    /// Whether miniupnpd's DNAT chain on the router holds a rule for `port`.
    static func routerForwards(_ port: String, lab: [String: String]) async throws -> Bool {
        let list = try await runToEnd("/usr/sbin/ip", ["netns", "exec", lab["HP_LAB_NS_NAT_A"]!, "nft", "list", "chain",
                                                       "inet", "hpupnp", "miniupnpd_dnat"], limit: 10)
        return list.out.contains("dport \(port) dnat")
    }
}

@Suite(.serialized, .enabled(if: PortMapLab.available, Comment(rawValue: PortMapLab.unavailableReason ?? "")))
struct PortMappingLabTests {
    /// Each protocol against miniupnpd in front of a symmetric (fully random) NAT: the mapping is granted, datagrams
    /// from two public hosts (rdv, other) arrive through it, it is refreshed before its short lease ends, and it
    /// is gone from the router after the client deletes it.
    @Test func eachProtocolMapsRefreshesAndDeletesBehindASymmetricNAT() async throws {
        guard let holepunch = holepunchBinaryOrSkip() else { return }
        try await PortMapLab.with(natA: "symmetric_random") { lab in
            for (index, mappingProtocol) in PortMappingProtocol.allCases.enumerated() {
                _ = try await PortMapLab.script(PortMapLab.portmapScript, ["flush"])
                let port = 41_000 + index
                let child = try Child("/usr/sbin/ip", [
                    "netns", "exec", lab["HP_LAB_NS_PEER_A"]!, holepunch, "nat", "map", "--bind", "0.0.0.0:\(port)",
                    "--portmap-protocol", mappingProtocol.rawValue, "--lifetime", "4", "--portmap-timeout-ms", "2000",
                ], directory: URL(fileURLWithPath: "/tmp"))
                defer { child.stop() }
                let mapped = await eventually(.seconds(10)) { PortMapLab.events(child).contains { $0["event"] == "mapped" } }
                try #require(mapped, "\(mappingProtocol): no mapping: \(child.stdout.text) \(child.stderr.text)")
                let grant = try #require(PortMapLab.events(child).first { $0["event"] == "mapped" })
                #expect(grant["protocol"] == mappingProtocol.rawValue)
                let external = try #require(grant["external"])
                #expect(external.hasPrefix(lab["HP_LAB_NAT_A_PUBLIC"]! + ":"), "\(grant)")
                let externalPort = String(external[external.index(after: external.lastIndex(of: ":")!)...])
                #expect(try await PortMapLab.routerForwards(externalPort, lab: lab))

                try await PortMapLab.send("from-rdv", from: lab["HP_LAB_NS_RDV"]!, to: external)
                try await PortMapLab.send("from-other", from: lab["HP_LAB_NS_OTHER"]!, to: external)
                let both = await eventually(.seconds(5)) {
                    let texts = PortMapLab.events(child).filter { $0["event"] == "received" }.compactMap { $0["text"] }
                    return texts.contains("from-rdv") && texts.contains("from-other")
                }
                #expect(both, "\(mappingProtocol): \(child.stdout.text)")
                let senders = Set(PortMapLab.events(child).filter { $0["event"] == "received" }.compactMap {
                    $0["from"].map { String($0[..<$0.lastIndex(of: ":")!]) }
                })
                #expect(senders == [lab["HP_LAB_RDV_IP1"]!, lab["HP_LAB_OTHER_IP"]!])

                // A 4 s lease is refreshed every 2 s: after the second refresh the first lease has ended, so a
                // datagram that still arrives came through the refreshed mapping.
                let refreshes = await eventually(.seconds(12)) {
                    PortMapLab.events(child).filter { $0["event"] == "refreshed" }.count >= 2
                }
                #expect(refreshes, "\(mappingProtocol): not refreshed: \(child.stdout.text)")
                try await PortMapLab.send("after-refresh", from: lab["HP_LAB_NS_OTHER"]!, to: external)
                #expect(await eventually(.seconds(5)) {
                    PortMapLab.events(child).contains { $0["text"] == "after-refresh" }
                }, "\(mappingProtocol): mapping gone after its first lease: \(child.stdout.text)")

                child.closeInput()
                #expect(await child.waitExit(.seconds(10)) == 0, "\(child.stderr.text)")
                #expect(PortMapLab.events(child).last?["event"] == "deleted")
                #expect(try await !PortMapLab.routerForwards(externalPort, lab: lab), "\(mappingProtocol): not deleted")
            }
        }
    }

    /// miniupnpd restarted (its rules flushed, as on a reboot) multicasts a PCP ANNOUNCE; the client maps again at
    /// once instead of at its next refresh (an hour away with a 2-hour lease), and datagrams arrive again.
    @Test func aRouterRestartIsFollowedByAPCPRemap() async throws {
        guard let holepunch = holepunchBinaryOrSkip() else { return }
        try await PortMapLab.with(natA: "port_restricted") { lab in
            let child = try Child("/usr/sbin/ip", [
                "netns", "exec", lab["HP_LAB_NS_PEER_A"]!, holepunch, "nat", "map", "--bind", "0.0.0.0:42000",
                "--portmap-protocol", "pcp", "--lifetime", "7200", "--portmap-timeout-ms", "2000",
            ], directory: URL(fileURLWithPath: "/tmp"))
            defer { child.stop() }
            let mapped = await eventually(.seconds(10)) { PortMapLab.events(child).contains { $0["event"] == "mapped" } }
            try #require(mapped, "no mapping: \(child.stdout.text) \(child.stderr.text)")
            let external = try #require(PortMapLab.events(child).first { $0["event"] == "mapped" }?["external"])
            let port = String(external[external.index(after: external.lastIndex(of: ":")!)...])

            let restart = try await PortMapLab.script(PortMapLab.portmapScript, ["restart"])
            try #require(restart.status == 0, "portmap.sh restart: \(restart.err)")
            #expect(await eventually(.seconds(10)) { (try? await PortMapLab.routerForwards(port, lab: lab)) == true },
                    "the mapping was not made again after the restart: \(child.stdout.text)")
            // The router installs the rule before its answer reaches the client: wait for the client's event too.
            #expect(await eventually(.seconds(5)) { PortMapLab.events(child).contains { $0["event"] == "refreshed" } },
                    "no re-map event: \(child.stdout.text)")
            let now = try #require(PortMapLab.events(child).first { $0["event"] == "refreshed" }?["external"])
            try await PortMapLab.send("after-restart", from: lab["HP_LAB_NS_RDV"]!, to: now)
            #expect(await eventually(.seconds(5)) { PortMapLab.events(child).contains { $0["text"] == "after-restart" } })
            child.closeInput()
            #expect(await child.waitExit(.seconds(10)) == 0, "\(child.stderr.text)")
        }
    }

    /// `nat detect --port-mapping` reports each protocol that answered, with the external address and the lease,
    /// and leaves no mapping behind.
    @Test func natDetectReportsWhatTheRouterOffers() async throws {
        guard let holepunch = holepunchBinaryOrSkip() else { return }
        try await PortMapLab.with(natA: "symmetric_random") { lab in
            let detect = try await runToEnd("/usr/sbin/ip", [
                "netns", "exec", lab["HP_LAB_NS_PEER_A"]!, holepunch, "nat", "detect",
                "--stun", "\(lab["HP_LAB_RDV_IP1"]!):3490", "--bind", "0.0.0.0:43000", "--port-mapping",
            ], limit: 60)
            #expect(detect.status == 0, "\(detect.err)")
            let external = lab["HP_LAB_NAT_A_PUBLIC"]!
            for name in ["pcp", "natpmp", "upnp"] {
                #expect(detect.out.contains("  \(name): external \(external):"), "\(name): \(detect.out)")
            }
            #expect(detect.out.contains("lease 7200s"), "\(detect.out)")
            #expect(try await !PortMapLab.routerForwards("43000", lab: lab), "a probe left its mapping behind")
        }
    }

    /// Issue 17's case: both routers symmetric with random ports (no punch can meet), miniupnpd on b. The target
    /// (peer-b, `lab peer --port-mapping`) publishes its mapping before it reports ready; the initiator connects
    /// directly to the mapped candidate, three times out of three, with a line echoed each time.
    @Test func symmetricRandomPairConnectsDirectlyThroughTheMapping() async throws {
        guard let holepunch = holepunchBinaryOrSkip() else { return }
        try await PortMapLab.with(natA: "symmetric_random", natB: "symmetric_random", router: "b") { lab in
            let dir = try scratchDirectory("pm-pair")
            func identity(_ name: String) async throws -> String {
                let made = try await runToEnd(holepunch, ["identity", "create", dir.appendingPathComponent(name).path])
                return made.out.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            func inNamespace(_ key: String, _ arguments: [String]) -> [String] {
                ["netns", "exec", lab[key]!, holepunch] + arguments
            }
            _ = try await identity("rdv.pem")
            _ = try await identity("a.pem")
            let targetID = try await identity("b.pem")
            let rdvReady = dir.appendingPathComponent("rdv.ready").path
            let rendezvous = try Child("/usr/sbin/ip", inNamespace("HP_LAB_NS_RDV", [
                "lab", "rendezvous", "--identity", dir.appendingPathComponent("rdv.pem").path, "--ready-file", rdvReady,
            ]), directory: dir)
            defer { rendezvous.stop() }
            try #require(await eventually(.seconds(20)) { FileManager.default.fileExists(atPath: rdvReady) },
                         "rendezvous: \(rendezvous.stderr.text)")
            let rdvID = try String(contentsOfFile: rdvReady, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            for trial in 1...3 {
                let ready = dir.appendingPathComponent("target\(trial).ready").path
                let target = try Child("/usr/sbin/ip", inNamespace("HP_LAB_NS_PEER_B", [
                    "lab", "peer", "--rendezvous-id", rdvID, "--identity", dir.appendingPathComponent("b.pem").path,
                    "--nat", "symmetric_random", "--port-mapping", "--ready-file", ready, "--timeout", "30",
                ]), directory: dir)
                defer { target.stop() }
                try #require(await eventually(.seconds(15)) { FileManager.default.fileExists(atPath: ready) },
                             "target: \(target.stdout.text)\(target.stderr.text)")
                #expect(target.stdout.text.contains("\"port_mapping_published\":true"), "\(target.stdout.text)")
                let initiator = try await runToEnd("/usr/sbin/ip", inNamespace("HP_LAB_NS_PEER_A", [
                    "lab", "peer", "--rendezvous-id", rdvID, "--identity", dir.appendingPathComponent("a.pem").path,
                    "--nat", "symmetric_random", "--connect", targetID, "--timeout", "20",
                ]), limit: 40)
                let last = initiator.out.split(separator: "\n").last.map(String.init) ?? ""
                let result = (try? JSONSerialization.jsonObject(with: Data(last.utf8))) as? [String: Any] ?? [:]
                #expect(result["ok"] as? Bool == true, "trial \(trial): \(last) \(initiator.err)")
                #expect(result["candidate"] as? String == "mapped", "trial \(trial): \(last)")
                #expect(result["echo"] as? Bool == true, "trial \(trial): \(last)")
                _ = await target.waitExit(.seconds(10))
            }
        }
    }
}
