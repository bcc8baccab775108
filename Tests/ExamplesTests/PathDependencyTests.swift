import Foundation
import ProcessTestSupport
import Testing

/// The app a new user writes after reading "Using it from Swift": a rendezvous in-process and two nodes on
/// loopback; B admits only A, A connects with the node API, and one line goes each way. The lines carry a nonce
/// from the test, so the output can only be this run's traffic.
private let appSource = #"""
import HolePunchQUIC
import HolePunchRendezvous

let nonce = CommandLine.arguments[1]
let server = try await RendezvousServer.bind(configuration: RendezvousServerConfiguration(
    listen: .loopbackV4(port: 0), identity: try Identity.generate()))
let serving = Task { try await server.run() }
let a = try Identity.generate(), b = try Identity.generate()
let nodeB = try await HolePunchNode.start(identity: b, rendezvous: server.address, rendezvousID: server.nodeID,
                                          options: .init(bind: .loopbackV4(port: 0), admission: .allowList([a.nodeID])))
let nodeA = try await HolePunchNode.start(identity: a, rendezvous: server.address, rendezvousID: server.nodeID,
                                          options: .init(bind: .loopbackV4(port: 0)))
let answering = Task {
    for try await connection in nodeB.incoming {
        guard let stream = try await connection.acceptStream() else { continue }
        print("B got: " + String(decoding: try await stream.readToEnd(), as: UTF8.self))
        try await stream.write(Array("hello from B \(nonce)".utf8))
        try await stream.finish()
        _ = await connection.waitClosed()
        return
    }
}
let connection = try await nodeA.connect(to: b.nodeID)
let stream = try await connection.openStream()
try await stream.write(Array("hello from A \(nonce)".utf8))
try await stream.finish()
print("A got: " + String(decoding: try await stream.readToEnd(), as: UTF8.self))
await connection.close()
try await answering.value
await nodeA.stop()
await nodeB.stop()
await server.shutdown()
_ = await serving.result
"""#

@Suite("a separate package that depends on HolePunch by path", .serialized)
struct PathDependencyTests {
    // Tests/ExamplesTests/PathDependencyTests.swift -> the package root.
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().standardizedFileURL

    static func swiftTool() throws -> String {
        let swift = ["/usr/bin/swift", "/usr/local/bin/swift"].first { FileManager.default.isExecutableFile(atPath: $0) }
            ?? ProcessInfo.processInfo.environment["PATH"]?.split(separator: ":")
                .map { "\($0)/swift" }.first { FileManager.default.isExecutableFile(atPath: $0) }
        return try #require(swift, "no swift on PATH")
    }

    /// The README's `Package.swift` snippet under "Using it from Swift": the lines of its first swift block.
    static func readmeSnippet() throws -> String {
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let section = try #require(readme.range(of: "## Using it from Swift"), "README has no \"Using it from Swift\"")
        let rest = readme[section.upperBound...]
        let open = try #require(rest.range(of: "```swift\n"), "no swift block in \"Using it from Swift\"")
        let close = try #require(rest[open.upperBound...].range(of: "```"), "unterminated swift block")
        return String(rest[open.upperBound..<close.lowerBound])
    }

    /// The first string literal after `label` in `text` (e.g. the path in `.package(path: "…")`).
    static func literal(after label: String, in text: String) throws -> String {
        let start = try #require(text.range(of: label), "no \(label) in the README snippet:\n\(text)")
        let tail = text[start.upperBound...]
        let quote = try #require(tail.firstIndex(of: "\""))
        let end = try #require(tail[tail.index(after: quote)...].firstIndex(of: "\""))
        return String(tail[tail.index(after: quote)..<end])
    }

    @Test("the README's Package.swift snippet, verbatim, resolves against a checkout in the directory it names")
    func readmeSnippetResolves() async throws {
        let snippet = try Self.readmeSnippet()
        let dependencyPath = try Self.literal(after: ".package(path:", in: snippet)
        let target = try Self.literal(after: ".executableTarget(name:", in: snippet)
        let dir = try scratchDirectory("hp-readme-snippet")
        defer { try? FileManager.default.removeItem(at: dir) }
        // The app sits in dir/app; the checkout appears where the snippet's relative path points, under that name.
        let app = dir.appendingPathComponent("app")
        let checkout = app.appendingPathComponent(dependencyPath).standardizedFileURL
        try FileManager.default.createDirectory(at: checkout.deletingLastPathComponent(), withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(at: checkout, withDestinationURL: Self.root)
        try FileManager.default.createDirectory(at: app.appendingPathComponent("Sources/\(target)"),
                                                withIntermediateDirectories: true)
        let manifest = """
        // swift-tools-version:6.0
        import PackageDescription

        let package = Package(
            name: "ReadmeApp",
            platforms: [.macOS(.v14)],
        \(snippet))
        """
        try manifest.write(to: app.appendingPathComponent("Package.swift"), atomically: true, encoding: .utf8)
        try "print(\"ok\")\n".write(to: app.appendingPathComponent("Sources/\(target)/main.swift"), atomically: true,
                                   encoding: .utf8)
        // Loading the package graph checks every `.product(name:package:)` against the dependency's identity.
        let describe = try Child(try Self.swiftTool(), [
            "package", "--package-path", app.path, "--scratch-path", app.appendingPathComponent(".build").path, "describe",
        ], directory: app)
        defer { describe.stop() }
        let status = await describe.waitExit(.seconds(300))
        #expect(status == 0, "the README snippet does not resolve:\n\(manifest)\n\(describe.stdout.text.suffix(2000)) \(describe.stderr.text.suffix(2000))")
    }

    @Test("the README's Package.swift and node API build and run in a package of their own", .timeLimit(.minutes(20)))
    func separatePackage() async throws {
        let root = Self.root
        let tool = try Self.swiftTool()
        let dir = try scratchDirectory("hp-path-dependency")
        defer { try? FileManager.default.removeItem(at: dir) }
        // The README's rule: a path dependency's package identity is its directory's name, lower-cased.
        let identity = root.lastPathComponent.lowercased()
        let manifest = """
        // swift-tools-version:6.0
        import PackageDescription

        let package = Package(
            name: "NodeApp",
            platforms: [.macOS(.v14)],
            dependencies: [.package(path: "\(root.path)")],
            targets: [
                .executableTarget(name: "NodeApp", dependencies: [
                    .product(name: "HolePunchQUIC", package: "\(identity)"),
                    .product(name: "HolePunchRendezvous", package: "\(identity)"),
                ]),
            ]
        )
        """
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("Sources/NodeApp"), withIntermediateDirectories: true)
        try manifest.write(to: dir.appendingPathComponent("Package.swift"), atomically: true, encoding: .utf8)
        try appSource.write(to: dir.appendingPathComponent("Sources/NodeApp/main.swift"), atomically: true, encoding: .utf8)

        // A scratch path of its own: never the enclosing build's, whose lock the running `swift test` holds.
        let scratch = dir.appendingPathComponent(".build")
        let build = try Child(tool, ["build", "--package-path", dir.path, "--scratch-path", scratch.path, "--product", "NodeApp"],
                              directory: dir)
        defer { build.stop() }
        let built = await build.waitExit(.seconds(1100))
        try #require(built == 0, "swift build failed (\(String(describing: built))): \(build.stdout.text.suffix(4000)) \(build.stderr.text.suffix(4000))")

        let binary = scratch.appendingPathComponent("debug/NodeApp").path
        try #require(FileManager.default.isExecutableFile(atPath: binary), "no binary at \(binary)")
        let nonce = UUID().uuidString
        let app = try Child(binary, [nonce], directory: dir)
        defer { app.stop() }
        let status = await app.waitExit(.seconds(60))
        #expect(status == 0, "app: \(app.stdout.text) \(app.stderr.text)")
        #expect(app.stdout.text.contains("B got: hello from A \(nonce)"), "\(app.stdout.text) \(app.stderr.text)")
        #expect(app.stdout.text.contains("A got: hello from B \(nonce)"), "\(app.stdout.text) \(app.stderr.text)")
    }
}
