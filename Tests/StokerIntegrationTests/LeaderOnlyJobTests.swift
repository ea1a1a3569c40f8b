import Logging
import PostgresNIO
import ServiceLifecycle
import StokerHarness
import Testing

@testable import Stoker

/// The LeaderOnlyJob article's `PeriodicImport` (DocumentationExamples.swift), run: on the leader, every pending
/// file is imported once, each write fenced with the leadership's term; a graceful stop ends the loop.
@Suite("Leader-only job")
struct LeaderOnlyJobTests {
    @Test("PeriodicImport imports each pending file once, fenced with the leader's term, and stops on shutdown")
    func periodicImport() async throws {
        try await withTestDatabase { database in
            try await database.admin(
                """
                CREATE TABLE imported_files (name text PRIMARY KEY, term bigint NOT NULL);
                CREATE TABLE incoming (name text PRIMARY KEY);
                INSERT INTO incoming VALUES ('a.csv'), ('b.csv');
                """)
            try await StokerSchema.migrate(connection: database.conninfo)
            let configuration = try await applicationClientConfiguration(database)
            try await withPostgresClient(configuration) { client in
                let job = PeriodicImport(client: client, interval: .milliseconds(20)) {
                    try await database.admin(
                        "SELECT name FROM incoming EXCEPT SELECT name FROM imported_files ORDER BY 1"
                    ).compactMap { $0[0] }
                }
                let logger = testLogger("stoker.job")
                let node = try StokerNode(
                    configuration: TestNode.configuration(database, cluster: "billing-prod", name: "a"),
                    logger: logger)
                let importer = try Activator(election: "importer", node: node, behaviour: job)
                let group = ServiceGroup(configuration: .init(services: [node, importer], logger: logger))
                try await whileRunning(group) {
                    try await waitForImports(2, in: database)
                    let leader = try #require(try await whereis("importer", cluster: "billing-prod", in: database))
                    #expect(
                        try await database.admin("SELECT name, term FROM imported_files ORDER BY name")
                            == [["a.csv", "\(leader.term)"], ["b.csv", "\(leader.term)"]])

                    try await database.admin("INSERT INTO incoming VALUES ('c.csv')")
                    try await waitForImports(3, in: database)
                }
                // The loop has ended: a file that arrives now stays pending. There is no event for "nothing happened":
                // the pause is the window a loop that outlived the graceful stop would need to import it (a bug the
                // check would then catch); the test's pass does not depend on its length.
                try await database.admin("INSERT INTO incoming VALUES ('d.csv')")
                try await Task.sleep(for: .milliseconds(100))
                #expect(try await database.admin("SELECT count(*) FROM imported_files") == [["3"]])
            }
        }
    }

    /// Waits (10 ms steps, at most 30 s) until `imported_files` holds `count` rows.
    private func waitForImports(
        _ count: Int, in database: TestDatabase, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        for _ in 0..<3000 {
            if try await database.admin("SELECT count(*) FROM imported_files") == [["\(count)"]] { return }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("imported_files never held \(count) rows", sourceLocation: sourceLocation)
        throw CancellationError()
    }
}
