import Foundation
import Testing

/// Issue 16 in the lab: two rendezvous instances on the public segment share one NATS, and peers behind NATs
/// registered at different instances punch to each other.
extension LabTests {
    @Test("cluster: peers behind two NATs, registered at two rendezvous instances joined by NATS, punch and echo a line")
    func clusterAcrossInstances() throws {
        guard Self.haveBinary, let bin = Self.holepunchBinary else { return }
        guard let nats = ["/usr/sbin/nats-server", "/usr/bin/nats-server"].first(where: {
            FileManager.default.isExecutableFile(atPath: $0)
        }) else {
            print("HolePunchLabTests: cluster test skipped: nats-server is not installed (make deps installs it)")
            return
        }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("hp-cluster-lab-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: work) }
        func path(_ name: String) -> String { work.appendingPathComponent(name).path }
        func text(_ url: URL) -> String { (try? String(contentsOf: url, encoding: .utf8)) ?? "" }

        for name in ["rdv.pem", "a.pem"] { _ = try LabSupport.run([bin, "identity", "create", path(name)], timeout: 30) }
        let created = try LabSupport.run([bin, "identity", "create", path("b.pem")], timeout: 30)
        let bID = try #require(created.stdout.split(separator: "\n").first.map(String.init))

        try withLab([]) { lab in
            let natsURL = "nats://\(Self.rdv1):4222"
            let broker = try lab.background("rdv", [nats, "-a", Self.rdv1, "-p", "4222"])
            defer { _ = broker.stop() }
            try #require(LabSupport.waitUntil(timeout: 10) { text(broker.errURL).contains("Server is ready") },
                         "nats-server did not start: \(text(broker.errURL))")
            // Instance 1 on the rendezvous host, instance 2 on the third public host; one identity, so one NodeID.
            let first = try lab.background("rdv", [bin, "rendezvous", "--listen", "\(Self.rdv1):7000", "--identity", path("rdv.pem"),
                                                   "--node-id-file", path("rdv.id"), "--cluster", natsURL])
            defer { _ = first.stop() }
            let second = try lab.background("other", [bin, "rendezvous", "--listen", "198.51.100.20:7000",
                                                      "--identity", path("rdv.pem"), "--cluster", natsURL])
            defer { _ = second.stop() }
            for instance in [first, second] {
                try #require(LabSupport.waitUntil(timeout: 15) { text(instance.outURL).hasPrefix("rendezvous ") },
                             "an instance did not start: \(text(instance.errURL))")
            }
            let b = try lab.background("peer-b", [bin, "peer", "--rendezvous", "\(Self.rdv1):7000", "--rendezvous-id",
                                                  "@\(path("rdv.id"))", "--identity", path("b.pem"), "--echo"])
            defer { _ = b.stop() }
            try #require(LabSupport.waitUntil(timeout: 20) { text(b.errURL).contains("registered") },
                         "peer B did not register at instance 1: \(text(b.errURL))")
            let a = try lab.exec("peer-a", ["sh", "-c", "echo hello-across-instances | '\(bin)' peer --rendezvous 198.51.100.20:7000 "
                                            + "--rendezvous-id @\(path("rdv.id")) --identity \(path("a.pem")) --connect \(bID) --timeout 20"],
                                 timeout: 60)
            #expect(a.status == 0, "peer A (at instance 2): \(a.stderr)\npeer B (at instance 1): \(text(b.errURL))")
            #expect(a.stdout.contains("hello-across-instances"), "peer A printed: \(a.stdout)")
        }
    }
}
