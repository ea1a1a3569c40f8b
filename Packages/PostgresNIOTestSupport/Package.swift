// swift-tools-version:6.2
import PackageDescription

// PostgresNIO for Stoker's integration tests only (the fencing example runs against a real server with it), behind a
// package of its own: `swift package generate-documentation` in Stoker documents its own targets and their direct
// dependencies, and postgres-nio's doc comments carry warnings Stoker cannot fix.
let package = Package(
    name: "PostgresNIOTestSupport",
    platforms: [.macOS(.v15)],
    products: [.library(name: "PostgresNIOTestSupport", targets: ["PostgresNIOTestSupport"])],
    dependencies: [.package(url: "https://github.com/vapor/postgres-nio", from: "1.21.0")],
    targets: [
        .target(
            name: "PostgresNIOTestSupport",
            dependencies: [.product(name: "PostgresNIO", package: "postgres-nio")]
        )
    ]
)
