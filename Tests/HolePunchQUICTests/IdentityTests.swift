import Foundation
import Synchronization
import Testing
@testable import HolePunchQUIC

@Suite("Identity and NodeID")
struct IdentityTests {
    private func temporaryPath(_ name: String) -> String {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hp-identity-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return directory.appendingPathComponent(name).path
    }

    @Test("save and load round-trip keeps the NodeID; the file is private")
    func roundTrip() throws {
        let identity = TestIdentities.a
        let path = temporaryPath("id.pem")
        try identity.save(to: path)
        let loaded = try Identity.load(from: path)
        #expect(loaded.nodeID == identity.nodeID)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
    }

    @Test("two generated identities differ")
    func distinct() {
        #expect(TestIdentities.a.nodeID != TestIdentities.b.nodeID)
    }

    @Test("NodeID prints as 52 base32 characters and parses back, also from hex and upper case")
    func nodeIDForms() throws {
        let node = TestIdentities.a.nodeID
        let text = node.description
        #expect(text.count == 52)
        #expect(try NodeID(parsing: text) == node)
        #expect(try NodeID(parsing: text.uppercased()) == node)
        let hex = node.bytes.map { String(format: "%02x", $0) }.joined()
        #expect(try NodeID(parsing: hex) == node)
    }

    @Test("bad NodeID text is rejected with a reason", arguments: ["", "abc", String(repeating: "1", count: 52), String(repeating: "a", count: 51) + "!"])
    func badNodeID(_ text: String) {
        #expect(throws: QUICError.self) { try NodeID(parsing: text) }
    }

    @Test("a missing identity file gives a clear error")
    func missingFile() {
        let error = #expect(throws: QUICError.self) { try Identity.load(from: "/nonexistent/hp/id.pem") }
        #expect(error?.code == .identity)
        #expect(error?.message.contains("does not exist") == true)
    }

    @Test("a corrupt identity file gives a clear error")
    func corruptFile() throws {
        let path = temporaryPath("bad.pem")
        let text = "-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n"
            + "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let error = #expect(throws: QUICError.self) { try Identity.load(from: path) }
        #expect(error?.code == .identity)
        #expect(error?.message.contains(path) == true)
    }

    @Test("a file without a certificate, or with a key from another identity, is rejected")
    func mismatchedParts() throws {
        let noCertificate = temporaryPath("key-only.pem")
        try TestIdentities.a.privateKeyPEM.write(toFile: noCertificate, atomically: true, encoding: .utf8)
        let missing = #expect(throws: QUICError.self) { try Identity.load(from: noCertificate) }
        #expect(missing?.message.contains("CERTIFICATE") == true)
        let mixed = #expect(throws: QUICError.self) {
            try Identity(privateKeyPEM: TestIdentities.a.privateKeyPEM, certificatePEM: TestIdentities.b.certificatePEM)
        }
        #expect(mixed?.message.contains("does not belong") == true)
    }

    @Test("an unreadable identity file gives a clear error", .enabled(if: getuid() != 0, "root can read any file"))
    func unreadableFile() throws {
        let path = temporaryPath("locked.pem")
        try TestIdentities.a.save(to: path)
        chmod(path, 0)
        let error = #expect(throws: QUICError.self) { try Identity.load(from: path) }
        #expect(error?.message.contains("not readable") == true)
    }

    @Test("save never leaves the key in a file others can read, not even for a moment")
    func bornPrivate() throws {
        let path = temporaryPath("watched.pem")
        let identity = TestIdentities.a
        // A watcher stats the path as fast as it can while the file is saved again and again: creating the file with
        // default permissions and chmod-ing it afterwards shows up as a 0644 sighting.
        let stop = Mutex(false)
        let sightings = Mutex<Set<UInt32>>([])
        let watcher = Thread {
            var info = stat()
            while !stop.withLock({ $0 }) {
                if stat(path, &info) == 0 {
                    let mode = UInt32(info.st_mode & 0o777)
                    sightings.withLock { _ = $0.insert(mode) }
                }
            }
        }
        watcher.start()
        for _ in 0..<150 { try identity.save(to: path) }
        stop.withLock { $0 = true }
        let modes = sightings.withLock { $0 }
        #expect(modes == [0o600], "modes seen: \(modes.map { String($0, radix: 8) })")
        #expect(try Identity.load(from: path).nodeID == identity.nodeID)
        // No temporary files are left beside it.
        let siblings = try FileManager.default.contentsOfDirectory(atPath: (path as NSString).deletingLastPathComponent)
        #expect(siblings == ["watched.pem"])
    }

    @Test("loading a key file that others can read warns, and still loads; a private one does not warn")
    func warnsOnReadableKey() throws {
        let path = temporaryPath("shared.pem")
        try TestIdentities.b.save(to: path)
        var warnings: [String] = []
        _ = try Identity.load(from: path, warning: { warnings.append($0) })
        #expect(warnings.isEmpty)
        chmod(path, 0o644)
        let loaded = try Identity.load(from: path, warning: { warnings.append($0) })
        #expect(loaded.nodeID == TestIdentities.b.nodeID)
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("readable by others (mode 644)") == true)
        #expect(warnings.first?.contains("chmod 600") == true)
    }
}
