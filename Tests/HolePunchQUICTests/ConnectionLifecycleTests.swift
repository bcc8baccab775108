import ProcessTestSupport
import Foundation
import Testing
import HolePunchNet
@testable import HolePunchQUIC

@Suite("QUIC connection lifecycle")
struct ConnectionLifecycleTests {
    @Test("closing with an application error code reaches the peer with that code")
    func closeWithCode() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        await connection.close(errorCode: 42, reason: "bye")
        let seen = try await withDeadline(.seconds(10)) { await serverSide.waitClosed() }
        #expect(seen.code == .connectionClosed)
        #expect(seen.applicationErrorCode == 42)
        #expect(seen.message.contains("bye"))
        #expect(await server.connectionCount == 0)
        await client.close()
        await server.close()
    }

    @Test("a stream reset reaches the reader as streamReset with the code")
    func streamReset() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        let (stream, incoming) = try await streamPair(connection, serverSide, carrying: [1, 2, 3])
        await stream.reset(errorCode: 7)
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) { try await incoming.readToEnd() }
        }
        #expect(error?.code == .streamReset)
        #expect(error?.applicationErrorCode == 7)
        await client.close()
        await server.close()
    }

    @Test("an idle connection closes after its idle timeout, on both sides")
    func idleTimeout() async throws {
        let quiet: (inout EndpointConfiguration) -> Void = {
            $0.idleTimeout = .milliseconds(300)
            $0.keepAliveInterval = nil
        }
        let server = try await makeEndpoint(TestIdentities.b, configure: quiet)
        let client = try await makeEndpoint(TestIdentities.a, configure: quiet)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        let reason = try await withDeadline(.seconds(10)) { await connection.waitClosed() }
        #expect(reason.code == .idleTimeout)
        #expect(reason.message == "no traffic for 300 ms", "durations read like a person wrote them")
        #expect(await client.connectionCount == 0)
        #expect(await eventually { await server.connectionCount == 0 })
        await client.close()
        await server.close()
    }

    @Test("keep-alive holds an otherwise idle connection open past the idle timeout")
    func keepAlive() async throws {
        let lively: (inout EndpointConfiguration) -> Void = {
            $0.idleTimeout = .milliseconds(400)
            $0.keepAliveInterval = .milliseconds(100)
        }
        let server = try await makeEndpoint(TestIdentities.b, configure: lively)
        let client = try await makeEndpoint(TestIdentities.a, configure: lively)
        let connection = try await withDeadline(.seconds(10)) {
            try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
        }
        // Three idle timeouts pass with no application traffic at all.
        try await Task.sleep(for: .milliseconds(1200))
        #expect(await connection.isOpen)
        await client.close()
        await server.close()
    }

    @Test("a dial to a silent port ends with handshakeTimeout after the configured timeout")
    func handshakeTimeout() async throws {
        let silent = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(silent) }
        _ = SocketAddress.loopbackV4(port: 0).withSockAddr { bind(silent, $0, $1) }
        let target = try #require(SocketAddress(boundTo: silent))
        let client = try await makeEndpoint(TestIdentities.a)
        let error = await #expect(throws: QUICError.self) {
            _ = try await withDeadline(.seconds(10)) {
                try await client.connect(
                    to: target, expecting: TestIdentities.b.nodeID,
                    options: ConnectOptions(initialRTT: .milliseconds(10), handshakeTimeout: .milliseconds(300))
                )
            }
        }
        #expect(error?.code == .handshakeTimeout)
        #expect(await client.connectionCount == 0)
        await client.close()
    }
}

extension ConnectionLifecycleTests {
    @Test("data that arrived before the peer closed is still readable, to its end")
    func readAfterPeerClose() async throws {
        let (client, server, connection, serverSide) = try await connectedPair()
        // The client sends a line, finishes and closes at once, like a process that exits after writing.
        let stream = try await connection.openStream()
        try await stream.write(Array("last words".utf8))
        try await stream.finish()
        await connection.close()
        _ = try await withDeadline(.seconds(10)) { await serverSide.waitClosed() }
        let incoming = try #require(try await serverSide.acceptStream())
        let text = try await withDeadline(.seconds(10)) { try await incoming.readToEnd() }
        #expect(String(decoding: text, as: UTF8.self) == "last words")
        await client.close()
        await server.close()
    }
}

/// Two loopback endpoints (each configured by its closure), a dialled connection, and the server's side of it.
func connectedPair(
    server configureServer: (inout EndpointConfiguration) -> Void = { _ in },
    client configureClient: (inout EndpointConfiguration) -> Void = { _ in }
) async throws -> (client: Endpoint, server: Endpoint, connection: QUICConnection, accepted: QUICConnection) {
    let server = try await makeEndpoint(TestIdentities.b, configure: configureServer)
    let client = try await makeEndpoint(TestIdentities.a, configure: configureClient)
    let connection = try await withDeadline(.seconds(10)) {
        try await client.connect(to: server.localAddress, expecting: TestIdentities.b.nodeID)
    }
    let accepted = try #require(try await withDeadline(.seconds(10)) {
        var iterator = server.incoming.makeAsyncIterator()
        return await iterator.next()
    })
    return (client, server, connection, accepted)
}

/// Opens a stream on `connection` and writes `bytes`; returns it with the peer's side of it, accepted on
/// `accepted` once the peer has read those bytes.
func streamPair(_ connection: QUICConnection, _ accepted: QUICConnection, carrying bytes: [UInt8],
                sourceLocation: SourceLocation = #_sourceLocation) async throws -> (QUICStream, QUICStream) {
    let stream = try await connection.openStream()
    try await stream.write(bytes)
    let incoming = try #require(try await withDeadline(.seconds(10)) { try await accepted.acceptStream() },
                                sourceLocation: sourceLocation)
    #expect(try await incoming.read() == bytes, sourceLocation: sourceLocation)
    return (stream, incoming)
}
