import ProcessTestSupport
import Foundation
import Testing
@testable import HolePunchQUIC

/// Ed25519 identities, the P-256 identities made before them, and the TLS credentials shared per identity.
@Suite("Identity algorithms and shared credentials")
struct IdentityAlgorithmTests {
    /// An identity file written by `holepunch identity create` at commit 1874386, when identities were ECDSA P-256,
    /// and the NodeID that build printed for it: loading it must give the same NodeID forever.
    static let p256File = """
        -----BEGIN PRIVATE KEY-----
        MIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHkwdwIBAQQgeqcqqyonpkws86cb
        GDPl1vtlkntAoTji77efhMQAkVGgCgYIKoZIzj0DAQehRANCAASEk0kaz1/9zYHQ
        4XdJSKmhmxC0FPDbbqOD7kOZD6JQ11461fS0ggiF/+F/CM9lx/6EmHmLYvCl+D4n
        Z/n1yUXY
        -----END PRIVATE KEY-----
        -----BEGIN CERTIFICATE-----
        MIIBNzCB3qADAgECAhAcBo+WvitDGuftZx/H5CW3MAoGCCqGSM49BAMCMBQxEjAQ
        BgNVBAMTCWhvbGVwdW5jaDAeFw0yNjExMzAxNDU0NDJaFw0zNjExMjcxNTU0NDJa
        MBQxEjAQBgNVBAMTCWhvbGVwdW5jaDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IA
        BISTSRrPX/3NgdDhd0lIqaGbELQU8Ntuo4PuQ5kPolDXXjrV9LSCCIX/4X8Iz2XH
        /oSYeYti8KX4Pidn+fXJRdijEjAQMA4GA1UdDwEB/wQEAwIHgDAKBggqhkjOPQQD
        AgNIADBFAiEAycINxjfEdPZd1L/heIb/Ny/e7L/85vMdT8NkuSvZ3BwCIAcIb1qA
        1h4n86bX2NuS3/sMW+3D0/3zhDFf02jvYANE
        -----END CERTIFICATE-----
        """
    static let p256NodeID = "khvc7czv7mjytrde5werfdoaiaqkdfi5ei46ygetdyh4nar5f5iq"

    static func loadP256() throws -> Identity {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hp-p256-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("p256.pem").path
        // Loading only warns about the file's mode; this file's key protects nothing.
        try Data(p256File.utf8).write(to: URL(fileURLWithPath: path))
        return try Identity.load(from: path)
    }

    @Test("a new identity is Ed25519, and saving and loading keeps it Ed25519 with the same NodeID")
    func generatesEd25519() throws {
        let identity = try Identity.generate(commonName: "ed")
        #expect(identity.keyAlgorithmName == "EdDSA (Ed25519)")
        let reloaded = try Identity(privateKeyPEM: identity.privateKeyPEM, certificatePEM: identity.certificatePEM)
        #expect(reloaded.keyAlgorithmName == "EdDSA (Ed25519)")
        #expect(reloaded.nodeID == identity.nodeID)
    }

    @Test("a P-256 identity file from before Ed25519 still loads, with the NodeID it had then")
    func loadsExistingP256File() throws {
        let identity = try Self.loadP256()
        #expect(identity.keyAlgorithmName == "EC/ECDSA")
        #expect(identity.nodeID.description == Self.p256NodeID)
    }

    @Test("Ed25519 and P-256 nodes complete a mutual-TLS handshake either way round", arguments: [true, false])
    func mixedHandshake(ed25519Dials: Bool) async throws {
        let ed25519 = TestIdentities.a
        let p256 = try Self.loadP256()
        let (dialler, listener) = ed25519Dials ? (ed25519, p256) : (p256, ed25519)
        let server = try await makeEndpoint(listener, policy: .allow([dialler.nodeID]))
        let client = try await makeEndpoint(dialler, policy: .none)
        let echo = startEchoServer(server)
        defer { echo.cancel() }
        let reply = try await withDeadline(.seconds(10)) {
            let connection = try await client.connect(to: server.localAddress, expecting: listener.nodeID)
            #expect(connection.peerNodeID == listener.nodeID)
            let stream = try await connection.openStream()
            try await stream.write(Array("mixed".utf8))
            try await stream.finish()
            return try await stream.readToEnd()
        }
        #expect(String(decoding: reply, as: UTF8.self) == "mixed")
        await client.close()
        await server.close()
    }

    @Test("endpoints made from one identity share one set of TLS credentials")
    func endpointsShareCredentials() async throws {
        let identity = try Identity.generate(commonName: "shared")
        let first = try await makeEndpoint(identity, policy: .none)
        let second = try await makeEndpoint(identity, policy: .none)
        let (firstCredentials, secondCredentials) = (await first.credentials, await second.credentials)
        #expect(firstCredentials === secondCredentials)
        await first.close()
        await second.close()
    }
}
