// swift-tools-version:6.0
import PackageDescription

/// Settings shared by every Swift target: Swift 6 language mode is the package default;
/// `InternalImportsByDefault` keeps C types out of the public API.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("InternalImportsByDefault"),
]

/// An example executable whose sources are in `examples/<directory>/Sources`.
func example(_ name: String, in directory: String, dependencies: [Target.Dependency]) -> Target {
    .executableTarget(
        name: name, dependencies: dependencies, path: "examples/\(directory)/Sources", swiftSettings: swiftSettings
    )
}

/// What the command-line examples link: the public API they use, the shared example support and ArgumentParser.
let cliExampleDependencies: [Target.Dependency] = [
    "HolePunch", "HolePunchQUIC", "HolePunchRendezvous", "HolePunchExampleSupport",
    .product(name: "ArgumentParser", package: "swift-argument-parser"),
]

let package = Package(
    name: "HolePunch",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "HolePunch", targets: ["HolePunch"]),
        .library(name: "HolePunchNet", targets: ["HolePunchNet"]),
        .library(name: "HolePunchQUIC", targets: ["HolePunchQUIC"]),
        .library(name: "HolePunchSTUN", targets: ["HolePunchSTUN"]),
        .library(name: "HolePunchStrategy", targets: ["HolePunchStrategy"]),
        .library(name: "HolePunchRendezvous", targets: ["HolePunchRendezvous"]),
        .library(name: "HolePunchCluster", targets: ["HolePunchCluster"]),
        .library(name: "HolePunchPortMapping", targets: ["HolePunchPortMapping"]),
        .executable(name: "holepunch", targets: ["holepunch"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // Test-only: property-based tests feed decoders and planners random and extreme values.
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        // Build-only: `swift package generate-documentation` (make docs) builds the DocC catalogs.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin.git", from: "1.5.0"),
    ],
    targets: [
        // MARK: C libraries from Debian and the thin shim over them.
        .systemLibrary(
            name: "CNgtcp2",
            pkgConfig: "libngtcp2_crypto_gnutls",
            providers: [.apt(["libngtcp2-dev", "libngtcp2-crypto-gnutls-dev"])]
        ),
        .systemLibrary(
            name: "CGnuTLS",
            pkgConfig: "gnutls",
            providers: [.apt(["libgnutls28-dev"])]
        ),
        .systemLibrary(
            name: "CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        .systemLibrary(
            name: "CNats",
            pkgConfig: "libnats",
            providers: [.apt(["libnats-dev"])]
        ),
        // Port mapping (issue 17): NAT-PMP and UPnP-IGD clients from Debian; libnatpmp ships no .pc file.
        .systemLibrary(name: "CNatPMP", providers: [.apt(["libnatpmp-dev"])]),
        .systemLibrary(name: "CMiniUPnPc", pkgConfig: "miniupnpc", providers: [.apt(["libminiupnpc-dev"])]),
        .target(
            name: "CHolePunchShims",
            dependencies: ["CNgtcp2", "CGnuTLS", "CLua"]
        ),
        // The clock and the socket error queue, apart from the shims above so HolePunchNet links no ngtcp2/GnuTLS/Lua.
        .target(name: "CHolePunchNetShims"),

        // MARK: Swift modules. Dependencies point one way: CLI -> HolePunch -> (Strategy, QUIC, STUN) -> C.
        .target(
            name: "HolePunchNet",
            dependencies: ["CHolePunchNetShims"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "HolePunchQUIC",
            dependencies: [
                "HolePunchNet", "CNgtcp2", "CGnuTLS", "CHolePunchShims", "CHolePunchNetShims",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "HolePunchSTUN",
            dependencies: ["HolePunchNet", "CGnuTLS", "CHolePunchShims"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "HolePunchStrategy",
            dependencies: [
                "HolePunchNet", "CLua", "CHolePunchShims",
                .product(name: "Logging", package: "swift-log"),
            ],
            // A symlink to strategies/default.lua (the file users read and edit), compiled into the library so
            // the recommended strategy works wherever the package is used; see docs/design-notes.md.
            // hp.lua is the strategy helper library `hp`, run in each sandboxed state before the strategy.
            resources: [.embedInCode("Resources/default.lua"), .embedInCode("Resources/hp.lua")],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "HolePunch",
            dependencies: [
                "HolePunchNet", "HolePunchQUIC", "HolePunchSTUN", "HolePunchStrategy",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "HolePunchRendezvous",
            dependencies: [
                "HolePunch", "HolePunchQUIC", "HolePunchSTUN", "HolePunchPortMapping",
                .product(name: "Logging", package: "swift-log"),
                // HolePunchNode passes a metrics factory on to its executor.
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // Only the CLI and the tests link it: an app that embeds HolePunchRendezvous needs no libnats.
        .target(
            name: "HolePunchCluster",
            dependencies: [
                "HolePunchRendezvous", "HolePunch", "CNats",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // Asks the router for a port mapping (PCP, NAT-PMP, UPnP-IGD); see docs/port-mapping.md.
        .target(
            name: "HolePunchPortMapping",
            dependencies: ["HolePunchNet", "CNatPMP", "CMiniUPnPc", .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        // The lab, matrix and bench machinery: only the CLI (and through it the lab tests) links it, so it is no
        // product; its API is `package`.
        .target(
            name: "HolePunchLab",
            dependencies: ["HolePunchNet", "HolePunchQUIC", "HolePunchStrategy"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "holepunch",
            dependencies: [
                "HolePunch", "HolePunchNet", "HolePunchQUIC", "HolePunchSTUN", "HolePunchStrategy", "HolePunchRendezvous",
                "HolePunchCluster", "HolePunchLab", "HolePunchPortMapping",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: Examples (public API only; see examples/*/README.md).
        .target(
            name: "HolePunchExampleSupport",
            dependencies: [
                "HolePunch", "HolePunchNet", "HolePunchQUIC", "HolePunchStrategy", "HolePunchRendezvous",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "examples/shared/Sources",
            swiftSettings: swiftSettings
        ),
        example("hp-chat", in: "chat", dependencies: cliExampleDependencies),
        example(
            "hp-embed", in: "embed",
            dependencies: ["HolePunch", "HolePunchNet", "HolePunchQUIC", "HolePunchStrategy", "HolePunchRendezvous"]
        ),
        example("hp-file-send", in: "file-send", dependencies: cliExampleDependencies),

        // MARK: Tests (swift-testing).
        // Process and wait helpers shared by test targets (a test target cannot depend on another).
        // HolePunchLab: coturn's launcher (CoturnLauncher), shared with `bench relay`; Logging: ClosureLogHandler.
        .target(name: "ProcessTestSupport", dependencies: ["HolePunchLab", .product(name: "Logging", package: "swift-log")],
                path: "Tests/ProcessTestSupport", swiftSettings: swiftSettings),
        .testTarget(
            name: "HolePunchNetTests", dependencies: ["HolePunchNet", "ProcessTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchQUICTests",
            // STUN and HolePunch: the relayed path's acceptance tests run our TURN client against coturn (and a
            // punch's plan, from HolePunchStrategy, against the relay stand-in).
            dependencies: ["HolePunchQUIC", "HolePunchNet", "HolePunchSTUN", "HolePunch", "HolePunchStrategy", "ProcessTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchSTUNTests", dependencies: ["HolePunchSTUN", "HolePunchNet", "ProcessTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchStrategyTests",
            dependencies: [
                "HolePunchStrategy", "HolePunchNet", "ProcessTestSupport",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchTests",
            dependencies: [
                "HolePunch", "ProcessTestSupport",
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchRendezvousTests",
            dependencies: [
                "HolePunchRendezvous", "ProcessTestSupport",
                .product(name: "PropertyBased", package: "swift-property-based"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchClusterTests",
            dependencies: ["HolePunchCluster", "HolePunchRendezvous", "HolePunch", "HolePunchQUIC", "ProcessTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "HolePunchPortMappingTests",
            dependencies: [
                "HolePunchPortMapping", "HolePunchNet", "ProcessTestSupport", "HolePunchRendezvous", "HolePunchQUIC",
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(name: "HolePunchLabTests", dependencies: ["HolePunchLab"], swiftSettings: swiftSettings),
        .testTarget(name: "ExamplesTests", dependencies: ["ProcessTestSupport"], swiftSettings: swiftSettings),
    ]
)
