import PostgresNIO

/// The PostgresNIO version range Stoker's integration tests are written against (they `import PostgresNIO` through
/// this package).
public enum PostgresNIOTestSupport {
    /// A `PostgresClient` configuration type, named here so the dependency is used.
    public typealias Configuration = PostgresClient.Configuration
}
