// swift-format-ignore-file: OrderedImports
// (the example's own imports must stay inside it, below the test's)

import StokerHarness
import Synchronization
import Testing

// The code between the two markers is the Fencing article's example (Sources/Stoker/Documentation.docc/Fencing.md),
// character for character (DocumentationTests checks it). It must stay self-contained: no test helper in it.

// Fencing article: begin
import Logging
import PostgresNIO
import Stoker

/// The write was refused: `term` is no longer the election's current term (a newer leader exists, or nobody leads),
/// so this process must not act as the leader any more. Nothing was written.
struct StaleTerm: Error {
    let election: String
    let term: Int64
}

/// Records `file` as imported on behalf of the leader of `election` in its leadership `term` — the fence and the
/// write in one transaction, on the application's own PostgreSQL client (never the node's session).
///
/// - Throws: `StaleTerm` when the fence refuses the term (the transaction rolled back); any other error as is.
func fencedImport(
    _ client: PostgresClient, cluster: String, election: String, term: Int64, file: String, logger: Logger
) async throws {
    do {
        try await client.withTransaction(logger: logger) { connection in
            // 1. The fence, first in the transaction: it locks the election's row (FOR SHARE) until COMMIT, so
            //    no new leader can bump the term in between. Bind the term as an Int64 (the SQL casts it to bigint).
            var binds = PostgresBindings()
            binds.append(cluster)
            binds.append(election)
            binds.append(term)
            let fence = try await connection.query(
                PostgresQuery(unsafeSQL: try Fence.sql(), binds: binds), logger: logger)
            // 2. Read its row. PostgresNIO hands the rows over before the statement's outcome: the SK001 error
            //    arrives here, while reading. A fence whose row is not read fails the next statement instead, with
            //    25P02 ("current transaction is aborted"), which says nothing about the term.
            _ = try await fence.collect()
            // 3. The write: it commits only if the term was still current.
            try await connection.query(
                "INSERT INTO imported_files (name, term) VALUES (\(file), \(term))", logger: logger)
        }
    } catch let error as PostgresTransactionError where isStaleTerm(error.closureError) {
        throw StaleTerm(election: election, term: term)
    }
}

/// Whether `error` is the fence refusing a stale term: SQLSTATE SK001 (`Fence.staleTermSQLState`).
func isStaleTerm(_ error: (any Error)?) -> Bool {
    (error as? PSQLError)?.serverInfo?[.sqlState] == Fence.staleTermSQLState
}
// Fencing article: end

/// The Fencing article's example against a real election: a write with the leader's term commits; once another
/// leadership has begun (the leader's session killed by an administrator, a successor elected), the same write with
/// the old term is refused as `StaleTerm` and leaves no row, while the new term's write commits.
@Suite("Fencing")
struct FencingTests {
    @Test("the PostgresNIO example commits with the current term and refuses a stale one as StaleTerm")
    func fencedWritesWithPostgresNIO() async throws {
        try await withTestDatabase { database in
            try await database.admin("CREATE TABLE imported_files (name text PRIMARY KEY, term bigint NOT NULL)")
            let history = History()
            try await withNodes { nodes in
                let a = nodes.add(
                    try TestNode(
                        "a", database: database, cluster: "billing-prod", elections: ["importer"],
                        history: history))
                try await history.wait("a leads") { History.leaders($0, election: "importer") == ["a"] }
                let first = try #require(history.entries.last { $0.kind == .nowLeader }?.term)

                // The application's own client, as a role granted only what the fence and the table need.
                let configuration = try await applicationClientConfiguration(database)
                try await withPostgresClient(configuration) { client in
                    let logger = testLogger("fencing")
                    try await fencedImport(
                        client, cluster: "billing-prod", election: "importer", term: first, file: "a.csv",
                        logger: logger)
                    #expect(try await rows(in: database) == [["a.csv", "\(first)"]])

                    // A second node waits; the administrator kills the leader's session: a new leadership begins
                    // (b's, or a's next incarnation's), with a greater term.
                    let b = nodes.add(
                        try TestNode(
                            "b", database: database, cluster: "billing-prod", elections: ["importer"],
                            history: history))
                    try await waitForMembers(2, cluster: "billing-prod", in: database)
                    try await database.terminateSession(of: a.node)
                    try await history.wait("a new leadership") { entries in
                        entries.contains { $0.kind == .nowLeader && ($0.term ?? 0) > first }
                    }
                    let second = try #require(history.entries.last { $0.kind == .nowLeader }?.term)
                    #expect(second > first)

                    // The old leader's write, late: refused, recognised as stale, and nothing was written.
                    let refused = await #expect(throws: StaleTerm.self) {
                        try await fencedImport(
                            client, cluster: "billing-prod", election: "importer", term: first, file: "b.csv",
                            logger: logger)
                    }
                    #expect(refused?.term == first)
                    #expect(refused?.election == "importer")
                    #expect(try await rows(in: database) == [["a.csv", "\(first)"]])

                    // The new leader's write goes through.
                    try await fencedImport(
                        client, cluster: "billing-prod", election: "importer", term: second, file: "c.csv",
                        logger: logger)
                    #expect(try await rows(in: database) == [["a.csv", "\(first)"], ["c.csv", "\(second)"]])

                    // With every node stopped nobody leads: the last term is refused too.
                    try await b.stop()
                    try await a.stop()
                    let last = try #require(history.entries.last { $0.kind == .nowLeader }?.term)
                    await #expect(throws: StaleTerm.self) {
                        try await fencedImport(
                            client, cluster: "billing-prod", election: "importer", term: last, file: "d.csv",
                            logger: logger)
                    }
                    #expect(try await rows(in: database).count == 2)
                }
                history.check(complete: true)
            }
        }
    }

    @Test("a fence error that is not SK001 is not taken for a stale term")
    func otherErrorsAreNotStale() async throws {
        try await withTestDatabase { database in
            let configuration = try await applicationClientConfiguration(database, grant: false)
            try await withPostgresClient(configuration) { client in
                // No schema yet: the fence function does not exist (42883 or 3F000), which is not SK001.
                let error = await #expect(throws: PostgresTransactionError.self) {
                    try await fencedImport(
                        client, cluster: "c", election: "e", term: 1, file: "x", logger: testLogger("fencing"))
                }
                #expect(error.map { isStaleTerm($0.closureError) } == false)
                #expect(error?.closureError is PSQLError)
            }
        }
    }

    /// The rows of `imported_files`, by name.
    private func rows(in database: TestDatabase) async throws -> [[String?]] {
        try await database.admin("SELECT name, term FROM imported_files ORDER BY name")
    }

}

/// A PostgresNIO configuration for `database` as a new login role granted only `USAGE` on the schema, `EXECUTE`
/// on the fence and `SELECT, INSERT` on `imported_files` (when `grant`; the schema must exist by then): over the
/// private cluster's unix socket, else over TCP to the external server (without TLS).
func applicationClientConfiguration(_ database: TestDatabase, grant: Bool = true) async throws
    -> PostgresClient.Configuration
{
    let password = "fence-\(UInt64.random(in: 0...UInt64.max))"
    let role = try await database.createRole(prefix: "stoker_app", password: password)
    if grant {
        try await database.admin(
            """
            GRANT USAGE ON SCHEMA stoker TO \(role);
            GRANT EXECUTE ON FUNCTION stoker.fence(text, text, bigint) TO \(role);
            GRANT SELECT, INSERT ON imported_files TO \(role);
            """)
    }
    let server = database.server
    if let directory = server.socketDirectory {
        return PostgresClient.Configuration(
            unixSocketPath: "\(directory)/.s.PGSQL.\(server.port)", username: role, password: password,
            database: database.name)
    }
    return PostgresClient.Configuration(
        host: server.host, port: server.port, username: role, password: password, database: database.name,
        tls: .disable)
}

/// Runs `body` with a `PostgresClient` whose `run()` runs in a child task, cancelled when `body` returns.
func withPostgresClient<T: Sendable>(
    _ configuration: PostgresClient.Configuration, _ body: (PostgresClient) async throws -> T
) async throws -> T {
    let client = PostgresClient(configuration: configuration)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        defer { group.cancelAll() }
        return try await body(client)
    }
}
