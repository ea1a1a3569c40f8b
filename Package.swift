// swift-tools-version:6.2
// 6.2 is needed for `.treatAllWarnings(as: .error)`; every target still compiles in Swift 6 language mode.
import PackageDescription

/// Zero warnings, enforced on our own targets only (SwiftPM never applies this to dependencies).
let strict: [SwiftSetting] = [.treatAllWarnings(as: .error)]

let package = Package(
    name: "Stoker",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Stoker", targets: ["Stoker"]),
        // Throwaway PostgreSQL servers and `stoker node` processes: what the tests, the bench and `stoker demo` run on.
        .library(name: "StokerHarness", targets: ["StokerHarness"]),
        .executable(name: "stoker", targets: ["stoker"]),
        .executable(name: "stoker-bench", targets: ["stoker-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        // 2.13.0: a graceful shutdown requested before run() is remembered (stoker node relies on it).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // `swift package generate-documentation` (the DocC catalog in Sources/Stoker/Documentation.docc).
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.4.0"),
        // Tests only: the fencing example, run against the real server with PostgresNIO, the client most Swift services
        // use — through a local package, so that the DocC plugin (which documents this package's targets and their
        // direct dependencies) does not document postgres-nio, whose doc comments warn.
        .package(path: "Packages/PostgresNIOTestSupport"),
    ],
    targets: [
        // libpq, through pkg-config (the headers live in /usr/include/postgresql on Debian).
        .systemLibrary(
            name: "CStokerLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
        ),
        // Small C helpers for what Swift's Glibc module does not export (_GNU_SOURCE posix_spawn extensions).
        .target(name: "CStokerSystem"),
        .target(
            name: "Stoker",
            dependencies: [
                "CStokerLibPQ",
                "CStokerSystem",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "stoker",
            dependencies: [
                "Stoker",
                // `stoker demo`'s throwaway PostgreSQL and node processes.
                "StokerHarness",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: strict
        ),
        // Failover benchmark: drives `stoker node` processes and a bare-libpq floor (BENCHMARKS.md). Depending on the
        // executable `stoker` makes `swift run stoker-bench` build it too; the bench runs it from next to itself.
        .executableTarget(
            name: "stoker-bench",
            dependencies: [
                "stoker",
                "StokerHarness",
                "CStokerLibPQ",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strict
        ),
        // A throwaway PostgreSQL for the tests, the bench and the CLI's demo: a private cluster started by a detached
        // supervisor that removes it even when the process that started it is killed. Stoker for its WakeSignal (SPI),
        // which TestProxy stops its threads with.
        .target(
            name: "StokerHarness",
            dependencies: ["CStokerLibPQ", "CStokerSystem", "Stoker"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "StokerTests",
            // StokerHarness for its seeded generator only: these tests never start a database.
            dependencies: ["Stoker", "StokerHarness"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "StokerHarnessTests",
            dependencies: ["StokerHarness"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "StokerIntegrationTests",
            dependencies: [
                "Stoker",
                "StokerHarness",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "PostgresNIOTestSupport", package: "PostgresNIOTestSupport"),
            ],
            swiftSettings: strict
        ),
    ]
)
