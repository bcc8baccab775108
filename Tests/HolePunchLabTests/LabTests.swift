import Foundation
import Testing

/// The real-NAT lab (lab/lab.sh): topology, NAT behaviour, impairments and cleanup.
///
/// Needs root, network namespaces, nftables and /dev/net/tun; otherwise every test is skipped
/// with the reason printed by `lab.sh check`. Serialized: the labs are cheap, but the delay-line
/// measurements should not compete for the CPU with other labs.
@Suite(
    "Real-NAT lab",
    .serialized,
    .enabled(if: LabSupport.available, "needs root, network namespaces (ip netns), nftables and /dev/net/tun")
)
struct LabTests {
    static let rdv1 = "198.51.100.10"
    static let rdv2 = "198.51.100.11"
    static let natAPublic = "203.0.113.10"
    static let natBPublic = "203.0.113.20"

    // MARK: NAT behaviour

    struct NATCase: Sendable, CustomTestStringConvertible {
        var type: String
        var extra: [String] = []
        var mapping: String
        var filtering: String
        var allocation: String
        /// Whether the first mapping of a socket keeps its local port.
        var preserving: Bool
        var delta: Int? = nil

        var testDescription: String { ([type] + extra).joined(separator: " ") }

        static let eim = "endpoint-independent"
        static let adf = "address-dependent"
        static let apd = "address-and-port-dependent"

        static let all: [NATCase] = [
            NATCase(type: "full_cone", mapping: eim, filtering: eim, allocation: "preserving", preserving: true),
            NATCase(type: "restricted", mapping: eim, filtering: adf, allocation: "preserving", preserving: true),
            NATCase(type: "port_restricted", mapping: eim, filtering: apd, allocation: "preserving", preserving: true),
            NATCase(type: "symmetric_seq", mapping: apd, filtering: apd, allocation: "sequential", preserving: false, delta: 1),
            NATCase(type: "symmetric_random", mapping: apd, filtering: apd, allocation: "random", preserving: false),
            // the options change allocation, never mapping or filtering
            NATCase(type: "full_cone", extra: ["--port-preservation-a", "off"], mapping: eim, filtering: eim,
                    allocation: "random", preserving: false),
            NATCase(type: "restricted", extra: ["--port-preservation-a", "off"], mapping: eim, filtering: adf,
                    allocation: "random", preserving: false),
            NATCase(type: "symmetric_seq", extra: ["--port-preservation-a", "on"], mapping: apd, filtering: apd,
                    allocation: "sequential", preserving: true, delta: 1),
        ]
    }

    /// Classifies the NAT in front of `host`. Today: lab/probe.py classify. When
    /// `HOLEPUNCH_LAB_CLASSIFIER` is set (e.g. to `holepunch nat detect --json`), that command runs
    /// instead, with the same `--server/--alt` arguments, and must print the same JSON fields.
    static func classify(_ lab: Lab, _ host: String) throws -> Classification {
        let args = ["--server", "\(rdv1):3478", "--alt", "\(rdv2):3479"]
        if let custom = ProcessInfo.processInfo.environment["HOLEPUNCH_LAB_CLASSIFIER"], !custom.isEmpty {
            let argv = custom.split(separator: " ").map(String.init) + args
            let r = try lab.exec(host, argv, timeout: 60)
            let line = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
            return try JSONDecoder().decode(Classification.self, from: Data(line.utf8))
        }
        // no delay or loss in these labs: short timeouts keep the "nothing came back" cases fast
        return try lab.probe(host, ["classify", "--timeout", "0.3", "--tries", "2"] + args, as: Classification.self)
    }

    @Test("each NAT type classifies as configured", .timeLimit(.minutes(2)), arguments: NATCase.all)
    func natTypeBehavesAsConfigured(_ c: NATCase) throws {
        try withLab(["--nat-a", c.type, "--nat-b", "port_restricted", "--probe-server"] + c.extra) { lab in
            let r = try Self.classify(lab, "peer-a")
            #expect(r.error == nil, "classification failed: \(r.error ?? "")")
            #expect(r.mapping == c.mapping, "mapping")
            #expect(r.filtering == c.filtering, "filtering")
            #expect(r.mapped_address?.hasPrefix(Self.natAPublic + ":") == true, "mapped address \(r.mapped_address ?? "nil")")
            let a = try #require(r.allocation)
            #expect(a.kind == c.allocation, "allocation, ports \(a.ports) for local \(a.local_ports)")
            #expect(a.first_mapping_preserved == c.preserving, "port preservation, ports \(a.ports) for local \(a.local_ports)")
            if let d = c.delta { #expect(a.delta == d, "sequential delta, ports \(a.ports)") }
            // The other router is untouched by router a's options.
            let b = try Self.classify(lab, "peer-b")
            #expect(b.mapping == NATCase.eim && b.filtering == NATCase.apd, "nat-b is port_restricted")
        }
    }

    @Test("sequential ports are contiguous, random ones are not", .timeLimit(.minutes(1)))
    func allocationPatterns() throws {
        try withLab(["--nat-a", "symmetric_seq", "--nat-b", "symmetric_random", "--probe-server"]) { lab in
            let a = try #require(try Self.classify(lab, "peer-a").allocation)
            let b = try #require(try Self.classify(lab, "peer-b").allocation)
            #expect(a.ports.count == 4 && b.ports.count == 4)
            // symmetric_seq: ports allocated one after the other (4096-port window from 20000)
            #expect(zip(a.ports, a.ports.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(a.ports)")
            #expect(a.ports.allSatisfy { (20000..<24096).contains($0) }, "\(a.ports)")
            #expect(Set(b.ports).count == 4, "symmetric_random gave a repeated port: \(b.ports)")
            #expect(!zip(b.ports, b.ports.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(b.ports)")
        }
    }

    /// Issue 14's "NAT whose port counter is shared by all of a router's mappings": lab.sh's `numgen inc` sits in one
    /// snat rule, so every new flow of the router, from any inside socket, takes the next port.
    @Test("symmetric_seq: one counter for all of a router's mappings (three sockets get consecutive ports)",
          .timeLimit(.minutes(1)))
    func sharedSequentialCounter() throws {
        try withLab(["--nat-a", "symmetric_seq", "--probe-server"]) { lab in
            var ports: [Int] = []
            for _ in 0..<3 {
                let r = try lab.probe("peer-a", ["query", "--server", "\(Self.rdv1):3478"], as: QueryResult.self)
                ports.append(try #require(r.mapped.flatMap { Int($0.split(separator: ":").last ?? "") }))
            }
            #expect(zip(ports, ports.dropFirst()).allSatisfy { $1 == $0 + 1 }, "ports of three sockets: \(ports)")
        }
    }

    @Test("mapping timeout: an idle mapping expires, a refreshed one does not", .timeLimit(.minutes(1)))
    func mappingTimeout() throws {
        // symmetric_seq shows expiry directly: the same socket and destination get a new port.
        try withLab(["--nat-a", "symmetric_seq", "--mapping-timeout-a", "2", "--probe-server"]) { lab in
            let q = try lab.probe("peer-a", ["query", "--server", "\(Self.rdv1):3478", "--again", "1", "--again", "4.5"],
                                  as: QueryResult.self)
            let first = try #require(port(of: q.mapped))
            let again = q.again ?? []
            #expect(again.count == 2)
            #expect(port(of: again.first ?? nil) == first, "refreshed within the timeout: same mapping")
            #expect(port(of: again.last ?? nil) == first + 1, "idle longer than the timeout: a new mapping")
            let st = try lab.status()
            #expect(st.nat["a"]?.mapping_timeout == 2)
        }
    }

    @Test("cone filtering: who gets in while the mapping lives, nobody after it expired", .timeLimit(.minutes(1)))
    func coneFilteringAndExpiry() throws {
        try withLab(["--nat-a", "full_cone", "--nat-b", "restricted", "--mapping-timeout", "3", "--probe-server"]) { lab in
            for (peer, pub, admitted) in [("peer-a", Self.natAPublic, ["198.51.100.20:6001", "\(Self.rdv1):6001"]),
                                          ("peer-b", Self.natBPublic, ["\(Self.rdv1):6001"])] {
                // The peer contacts rdv:3478 once from port 40010, then only listens.
                let listener = try lab.backgroundWhenReady(peer, ["python3", LabSupport.probeScript, "query",
                                                                  "--server", "\(Self.rdv1):3478", "--bind", "0.0.0.0:40010",
                                                                  "--listen", "6"])
                defer { _ = listener.stop() }
                let start = Date()
                // within the mapping's life: another host, and the contacted host from another port
                for src in ["other:198.51.100.20:6001", "rdv:\(Self.rdv1):6001"] {
                    let parts = src.split(separator: ":", maxSplits: 1).map(String.init)
                    _ = try lab.probe(parts[0], ["send", "--to", "\(pub):40010", "--bind", parts[1], "--count", "1", "--wait", "0"],
                                      as: SendResult.self)
                }
                // after it (3 s idle timeout, counted from the peer's only packet): nobody
                usleep(useconds_t(max(0, 5.0 - Date().timeIntervalSince(start)) * 1_000_000))
                for src in ["other:198.51.100.20:6002", "rdv:\(Self.rdv1):6002"] {
                    let parts = src.split(separator: ":", maxSplits: 1).map(String.init)
                    _ = try lab.probe(parts[0], ["send", "--to", "\(pub):40010", "--bind", parts[1], "--count", "1", "--wait", "0"],
                                      as: SendResult.self)
                }
                let r = listener.wait(timeout: 15)
                let got = try JSONDecoder().decode(ListenResult.self, from: Data((r.stdout.split(separator: "\n").last ?? "").utf8))
                #expect(got.received.map(\.from).sorted() == admitted.sorted(), "\(peer) received \(got.received.map(\.from))")
            }
        }
    }

    // MARK: Unsolicited traffic

    @Test("unsolicited inbound to a router's public address is dropped silently", .timeLimit(.minutes(1)))
    func unsolicitedInboundIsDropped() throws {
        try withLab(["--nat-a", "full_cone", "--nat-b", "port_restricted"]) { lab in
            for (peer, pub) in [("peer-a", Self.natAPublic), ("peer-b", Self.natBPublic)] {
                let listener = try lab.backgroundWhenReady(peer, ["python3", LabSupport.probeScript, "listen",
                                                                  "--bind", "0.0.0.0:40002", "--timeout", "1.5"])
                defer { _ = listener.stop() }
                let sent = try lab.probe("other", ["send", "--to", "\(pub):40002", "--count", "5", "--wait", "0.5"],
                                         as: SendResult.self)
                #expect(sent.sent == 5)
                #expect(sent.replies == 0, "\(pub) answered")
                #expect(sent.icmp_errors == 0, "\(pub) sent ICMP errors instead of dropping")
                let heard = listener.wait(timeout: 10)
                let got = try JSONDecoder().decode(ListenResult.self, from: Data(heard.stdout.utf8))
                #expect(got.received.isEmpty, "\(peer) received unsolicited datagrams: \(got.received.map(\.from))")
                // no echo replies from the router either
                let ping = try lab.exec("other", ["python3", LabSupport.probeScript, "ping", "--to", pub, "--timeout", "0.6"])
                #expect(ping.status != 0, "\(pub) answered ICMP echo")
            }
        }
    }

    @Test("an early unsolicited packet does not steal the mapping's port", .timeLimit(.minutes(1)))
    func earlyPacketDoesNotOccupyTheTuple() throws {
        try withLab(["--nat-a", "port_restricted", "--nat-b", "restricted"]) { lab in
            for (peer, pub) in [("peer-a", Self.natAPublic), ("peer-b", Self.natBPublic)] {
                // The server first "punches" at the router's port 40001, then waits for the peer.
                let server = try lab.backgroundWhenReady("rdv", ["python3", LabSupport.probeScript, "serve",
                                                                 "--bind", "\(Self.rdv1):5000", "--knock", "\(pub):40001",
                                                                 "--lifetime", "10"])
                defer { _ = server.stop() }
                let q = try lab.probe(peer, ["query", "--server", "\(Self.rdv1):5000", "--bind", "0.0.0.0:40001"],
                                      as: QueryResult.self)
                #expect(q.mapped == "\(pub):40001", "\(peer) was mapped to \(q.mapped ?? "nothing")")
            }
        }
    }

    // MARK: Impairments

    /// The RTT from `host` to the rendezvous over 40 probes 10 ms apart, printed under `label`; expects every
    /// probe answered.
    static func rttToRendezvous(_ lab: Lab, from host: String, _ label: String,
                                sourceLocation: SourceLocation = #_sourceLocation) throws -> RTTResult.Stats {
        let r = try lab.probe(host, ["rtt", "--server", "\(rdv1):3478", "--count", "40", "--interval", "10"],
                              as: RTTResult.self)
        let rtt = try #require(r.rtt_ms, sourceLocation: sourceLocation)
        print("\(label): RTT median \(rtt.median) ms, min \(rtt.min), max \(rtt.max), stdev \(rtt.stdev)")
        #expect(r.received == r.sent, sourceLocation: sourceLocation)
        return rtt
    }

    @Test("the delay line delays by the amount asked (±20%)", .timeLimit(.minutes(1)))
    func delayLine() throws {
        try withLab(["--delay-a", "20", "--delay-b", "50", "--jitter-b", "10", "--probe-server"]) { lab in
            let st = try lab.status()
            #expect(st.nat["a"]?.delay_line == true && st.nat["b"]?.delay_line == true)
            // 20 ms each way on nat-a's link only: RTT peer-a <-> rendezvous ≈ 40 ms
            let ra = try Self.rttToRendezvous(lab, from: "peer-a", "delay 20 ms one-way")
            #expect(ra.median >= 32 && ra.median <= 48, "median RTT \(ra.median) ms, want 40 ± 20%")
            // 50 ± 10 ms each way: RTT ≈ 100, spread between 80 and 120
            let rb = try Self.rttToRendezvous(lab, from: "peer-b", "delay 50±10 ms one-way")
            #expect(rb.median >= 80 && rb.median <= 120, "median RTT \(rb.median) ms, want 100 ± 20%")
            #expect(rb.min >= 79, "min RTT \(rb.min) below 2 × (50 - 10)")
            #expect(rb.max <= 140, "max RTT \(rb.max) far above 2 × (50 + 10)")
            #expect(rb.stdev >= 2, "jitter asked but RTT stdev is \(rb.stdev) ms")
        }
    }

    @Test("loss drops about the share asked, each way", .timeLimit(.minutes(1)))
    func loss() throws {
        try withLab(["--loss-a", "20", "--probe-server"]) { lab in
            // 20% each way on nat-a's link: a request and its reply both cross it, 1 - 0.8² = 36% lost
            let a = try lab.probe("peer-a", ["rtt", "--server", "\(Self.rdv1):3478", "--count", "600", "--interval", "2",
                                             "--timeout", "0.5"], as: RTTResult.self)
            print("loss 20% each way: \(a.loss_pct)% of round trips lost (expect 36%)")
            #expect(a.loss_pct >= 26 && a.loss_pct <= 46, "round-trip loss \(a.loss_pct)%, want 36 ± 10")
            let b = try lab.probe("peer-b", ["rtt", "--server", "\(Self.rdv1):3478", "--count", "200", "--interval", "2",
                                             "--timeout", "0.5"], as: RTTResult.self)
            #expect(b.loss_pct <= 1, "nat-b has no loss configured but lost \(b.loss_pct)%")
        }
    }

    struct PunchCase: Sendable, CustomTestStringConvertible {
        var a: String
        var b: String
        var connects: Bool
        var testDescription: String { "\(a) × \(b)" }
        static let all: [PunchCase] = [
            PunchCase(a: "port_restricted", b: "port_restricted", connects: true),
            PunchCase(a: "full_cone", b: "symmetric_random", connects: true),
            PunchCase(a: "restricted", b: "symmetric_seq", connects: true),
            // needs port prediction / many sockets: a plain punch must fail (cleanly)
            PunchCase(a: "port_restricted", b: "symmetric_random", connects: false),
        ]
    }

    /// A raw UDP punch through the lab (20 ms one-way on each WAN link, through the delay lines):
    /// the lab is punchable where physics says so, and not where it says not.
    @Test("raw UDP punch through the lab", .timeLimit(.minutes(1)), arguments: PunchCase.all)
    func rawPunch(_ c: PunchCase) throws {
        try withLab(["--nat-a", c.a, "--nat-b", c.b, "--delay", "20", "--probe-server"]) { lab in
            let (pa, b) = try lab.rawPunch(timeout: c.connects ? "5" : "2")
            print("punch \(c.a) × \(c.b): a \(pa.connected) in \(pa.time_ms ?? -1) ms, b \(b.connected) in \(b.time_ms ?? -1) ms")
            #expect(pa.connected == c.connects && b.connected == c.connects)
            if c.connects {
                // 4 × 20 ms of one-way delay between the peers: nothing can be heard before 80 ms
                #expect((pa.first_heard_ms ?? 0) >= 75 && (b.first_heard_ms ?? 0) >= 75)
                #expect((pa.time_ms ?? .infinity) < 2000 && (b.time_ms ?? .infinity) < 2000)
                #expect(pa.peer_observed?.hasPrefix(Self.natBPublic + ":") == true)
                #expect(b.peer_observed?.hasPrefix(Self.natAPublic + ":") == true)
            }
        }
    }

    // MARK: Interface and cleanup

    @Test("status and exec expose every host", .timeLimit(.minutes(1)))
    func statusAndExec() throws {
        try withLab(["--nat-a", "restricted", "--nat-b", "symmetric_random"]) { lab in
            let st = try lab.status()
            #expect(st.lab == lab.name)
            #expect(Set(st.hosts.keys) == ["wan", "rdv", "other", "nat-a", "nat-b", "peer-a", "peer-b"])
            #expect(st.hosts["rdv"]?.addresses == [Self.rdv1, Self.rdv2])
            #expect(st.hosts["nat-a"]?.addresses.first == Self.natAPublic)
            #expect(st.hosts["nat-b"]?.addresses.first == Self.natBPublic)
            #expect(st.nat["a"]?.type == "restricted" && st.nat["b"]?.type == "symmetric_random")
            for (host, info) in st.hosts {
                #expect(info.netns == "\(lab.name)-\(host)")
                let r = try lab.exec(host, ["ip", "-4", "-o", "addr", "show"])
                for addr in info.addresses {
                    #expect(r.stdout.contains(" \(addr)/"), "\(host) lacks \(addr): \(r.stdout)")
                }
            }
        }
    }

    /// True while `pid` exists and is not a zombie (a killed orphan waits for init to reap it).
    static func isRunning(_ pid: Int32) -> Bool {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/stat") else { return false }
        let text = String(decoding: data, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return false }
        let state = text[text.index(after: close)...].trimmingCharacters(in: .whitespaces).first
        return state != nil && state != "Z"
    }

    /// Processes whose command line mentions this lab's namespaces (the delay lines do).
    static func processesMentioning(_ lab: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            let cmd = String(decoding: data.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            return cmd.contains("/run/netns/\(lab)-") && isRunning(pid)
        }
    }

    @Test("a failing up cleans up after itself", .timeLimit(.minutes(1)), arguments: ["public", "routers"])
    func failedUpCleansUp(_ failAt: String) throws {
        let name = LabSupport.uniqueName()
        defer { _ = try? LabSupport.run([LabSupport.labScript, "down"], env: ["HP_LAB": name], timeout: 60) }
        let r = try LabSupport.run([LabSupport.labScript, "up", "--delay", "10", "--probe-server"],
                                   env: ["HP_LAB": name, "HP_LAB_FAIL_AT": failAt, "HP_LAB_QUIET": "1"], timeout: 60)
        #expect(r.status != 0, "up was told to fail at \(failAt)")
        #expect(LabSupport.namespaces(ofLab: name).isEmpty, "left \(LabSupport.namespaces(ofLab: name))")
        #expect(Self.processesMentioning(name).isEmpty, "left processes behind")
        #expect(!FileManager.default.fileExists(atPath: "/tmp/holepunch-lab-\(name)"))
    }

    @Test("bad options create nothing", .timeLimit(.minutes(1)))
    func badOptions() throws {
        let name = LabSupport.uniqueName()
        defer { _ = try? LabSupport.run([LabSupport.labScript, "down"], env: ["HP_LAB": name], timeout: 60) }
        for opts in [["--nat-a", "bogus"], ["--loss", "x"], ["--port-preservation", "maybe"], ["--frobnicate", "1"],
                     ["--topology", "nowhere"], ["--topology"]] {
            let r = try LabSupport.run([LabSupport.labScript, "up"] + opts, env: ["HP_LAB": name], timeout: 30)
            #expect(r.status != 0, "up \(opts) should fail")
            #expect(LabSupport.namespaces(ofLab: name).isEmpty)
        }
    }

    @Test("down removes namespaces, delay lines and state, and is idempotent", .timeLimit(.minutes(1)))
    func downIsIdempotent() throws {
        let lab = try Lab(["--delay-a", "5", "--delay-b", "5", "--probe-server"])
        defer { lab.down() }
        let st = try lab.status()
        let pids = ["delay-a", "delay-b", "probe-server"].compactMap { name -> Int32? in
            let path = "\(st.state_dir)/pids/\(name).pid"
            return (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }
        #expect(pids.count == 3)
        #expect(LabSupport.namespaces(ofLab: lab.name).count == 7)
        // a second up on the same name refuses and leaves the running lab alone
        let again = try LabSupport.run([LabSupport.labScript, "up"], env: lab.env, timeout: 30)
        #expect(again.status != 0)
        #expect(LabSupport.namespaces(ofLab: lab.name).count == 7)
        lab.down()
        let r = try LabSupport.run([LabSupport.labScript, "down"], env: lab.env, timeout: 30)
        #expect(r.status == 0, "second down failed: \(r.stderr)")
        #expect(LabSupport.namespaces(ofLab: lab.name).isEmpty)
        for pid in pids { #expect(!Self.isRunning(pid), "process \(pid) survived down") }
        #expect(!FileManager.default.fileExists(atPath: st.state_dir))
        let s = try LabSupport.run([LabSupport.labScript, "status", "--json"], env: lab.env, timeout: 30)
        #expect(s.status != 0 && s.stdout.contains("\"up\": false"))
    }

    @Test("no namespace of this run is left", .timeLimit(.minutes(1)))
    func zzNothingLeft() {
        #expect(LabSupport.namespaces(startingWith: LabSupport.runPrefix).isEmpty,
                "left: \(LabSupport.namespaces(startingWith: LabSupport.runPrefix))")
    }
}
