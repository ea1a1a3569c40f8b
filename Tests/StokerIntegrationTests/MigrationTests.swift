import StokerHarness
import Testing

@testable import Stoker

@Suite("Schema migrations", .timeLimit(.minutes(3)))
struct MigrationTests {
    @Test("a fresh database is migrated once; the second run applies nothing; verify passes")
    func freshAndIdempotent() async throws {
        try await withTestDatabase { database in
            let first = try await StokerSchema.migrate(connection: database.conninfo)
            #expect(first.applied == Migration.all.map(\.version))
            let second = try await StokerSchema.migrate(connection: database.conninfo)
            #expect(second.applied.isEmpty)
            #expect(second.current == Migration.all.last?.version)
            _ = try await StokerSchema.verify(connection: database.conninfo)
            let recorded = try await database.admin("SELECT version, name FROM stoker.migrations ORDER BY version")
            #expect(recorded.map { $0[0] } == Migration.all.map { String($0.version) })
        }
    }

    @Test("8 concurrent migrators: all succeed, each file is applied exactly once")
    func concurrent() async throws {
        try await withTestDatabase { database in
            let reports = try await withThrowingTaskGroup(of: MigrationReport.self) { group in
                for _ in 0..<8 {
                    group.addTask { try await StokerSchema.migrate(connection: database.conninfo) }
                }
                return try await group.reduce(into: [MigrationReport]()) { $0.append($1) }
            }
            #expect(reports.count == 8)
            let applications = reports.flatMap(\.applied).sorted()
            #expect(applications == Migration.all.map(\.version))
            let rows = try await database.admin("SELECT count(*), count(DISTINCT version) FROM stoker.migrations")
            #expect(rows.first?[0] == String(Migration.all.count))
            #expect(rows.first?[1] == String(Migration.all.count))
        }
    }

    @Test("a schema name with quotes, spaces and capitals is quoted by libpq and works end to end")
    func oddSchemaName() async throws {
        try await withTestDatabase { database in
            let schema = "Odd \"Schema\"; DROP"
            try await StokerSchema.migrate(connection: database.conninfo, schema: schema)
            _ = try await StokerSchema.verify(connection: database.conninfo, schema: schema)
            let tables = try await database.admin(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'Odd \"Schema\"; DROP'"
            )
            #expect(
                tables.first?[0] == "8",
                "migrations, clusters, nodes, elections, server_epoch, term_band, trigger_queues, triggers")
        }
    }

    @Test("bad schema names are refused before connecting", arguments: ["", "a\0b", String(repeating: "s", count: 53)])
    func badSchemaName(schema: String) async throws {
        try await withTestDatabase { database in
            do {
                try await StokerSchema.migrate(connection: database.conninfo, schema: schema)
                Issue.record("accepted \(schema.debugDescription)")
            } catch let error as StokerError {
                #expect(error.code == .invalidIdentifier)
            }
        }
    }

    @Test(
        "a tampered schema is reported by name",
        arguments: [
            ("ALTER TABLE stoker.nodes DROP COLUMN heartbeat_at", "column stoker.nodes.heartbeat_at is missing"),
            (
                "ALTER TABLE stoker.elections ALTER COLUMN term TYPE integer",
                "column stoker.elections.term is integer not null default 0, expected bigint not null default 0"
            ),
            ("DROP FUNCTION stoker.fence(text, text, bigint)", "function stoker.fence("),
            (
                "ALTER TABLE stoker.nodes DISABLE TRIGGER nodes_notify",
                "trigger nodes.nodes_notify in schema stoker is disabled"
            ),
            ("UPDATE stoker.migrations SET checksum = 'abc' WHERE version = 1", "001_initial.sql was recorded"),
            (
                "ALTER TABLE stoker.nodes ENABLE REPLICA TRIGGER nodes_notify",
                "trigger nodes.nodes_notify in schema stoker is disabled"
            ),
            (
                """
                CREATE OR REPLACE FUNCTION stoker.fence(p_cluster text, p_election text, p_term bigint) RETURNS bigint
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = stoker, pg_temp AS $$ BEGIN RETURN p_term; END $$
                """,
                "fence(p_cluster text, p_election text, p_term bigint) was changed"
            ),
            ("ALTER FUNCTION stoker.fence(text, text, bigint) SECURITY INVOKER", "should be SECURITY DEFINER"),
            ("ALTER FUNCTION stoker.fence(text, text, bigint) RESET search_path", "does not pin search_path=stoker"),
            ("ALTER FUNCTION stoker.fence(text, text, bigint) SET search_path = public", "does not pin search_path"),
            (
                """
                CREATE OR REPLACE TRIGGER nodes_notify AFTER INSERT ON stoker.nodes
                FOR EACH ROW EXECUTE FUNCTION stoker.notify_node_change()
                """,
                "trigger nodes.nodes_notify in schema stoker no longer fires AFTER INSERT OR DELETE FOR EACH ROW"
            ),
            (
                """
                CREATE OR REPLACE TRIGGER elections_notify AFTER UPDATE ON stoker.elections
                FOR EACH ROW WHEN (false) EXECUTE FUNCTION stoker.notify_election_change()
                """,
                "trigger elections.elections_notify in schema stoker has a WHEN condition"
            ),
            (
                "ALTER TABLE stoker.nodes ALTER backend_pid SET DEFAULT 0",
                "column stoker.nodes.backend_pid is integer not null default 0"
            ),
            (
                "ALTER TABLE stoker.elections DROP CONSTRAINT elections_cluster_id_name_key",
                "constraint elections u (cluster_id,name) in schema stoker is missing"
            ),
        ]
    )
    func tampered(change: String, named: String) async throws {
        try await withTestDatabase { database in
            try await StokerSchema.migrate(connection: database.conninfo)
            try await database.admin(change)
            for check in [
                { try await StokerSchema.migrate(connection: database.conninfo) },
                { try await StokerSchema.verify(connection: database.conninfo) },
            ] {
                do {
                    _ = try await check()
                    Issue.record("the tampered schema was accepted")
                } catch let error as StokerError {
                    #expect(error.code == .schemaMismatch)
                    #expect(error.message.contains(named), "\(error)")
                }
            }
        }
    }

    @Test("two Stoker schemas in one database never share a lock key")
    func schemasApart() async throws {
        try await withTestDatabase { database in
            /// Migrates `schema`, creates node 1 and election 1 in it, and takes both their locks on `session`.
            @Sendable func takeLocks(_ schema: String, on session: PostgresSession) async throws -> Bool {
                try await StokerSchema.migrate(connection: database.conninfo, schema: schema)
                return try await session.run { connection in
                    let key = try connection.execute(ProtocolStatements.lockNamespaceQuery, [schema]).singleRow()
                        .int32(0)
                    let statements = ProtocolStatements(
                        schema: schema,
                        quotedSchema: try connection.quoteIdentifier(schema),
                        lockNamespace: key
                    )
                    let cluster = try statements.ensureCluster("c", on: connection)
                    let election = try statements.ensureElection(cluster: cluster, name: "e", on: connection)
                    let node = try connection.execute(
                        statements.insertNode, [String(cluster), "n", "h", "1", "{}", "0", nil, "5000"]
                    )
                    .singleRow().int(0)
                    guard node == 1, election == 1 else { return false }
                    let nodeLock = try connection.execute(statements.lockNode, [String(node)]).singleRow().bool(0)
                    let electionLocks = try connection.execute(
                        statements.tryTake, ["{\(election)}", String(node), "n"]
                    ).rows.count
                    return nodeLock && electionLocks == 1
                }
            }
            // Both sessions stay open: schema two takes its locks while schema one still holds its own.
            try await withSession(database.conninfo) { one in
                #expect(try await takeLocks("one", on: one))
                try await withSession(database.conninfo) { two in
                    let tookBoth = try await takeLocks("two", on: two)
                    #expect(tookBoth, "schema two's keys collided with schema one's")
                }
            }
        }
    }

    @Test("a concurrent first insert of a cluster still yields its id (the empty answer is retried)")
    func concurrentEnsure() async throws {
        try await withTestDatabase { database in
            try await StokerSchema.migrate(connection: database.conninfo)
            let key = try await withSession(database.conninfo) { session in
                try await session.query(ProtocolStatements.lockNamespaceQuery, ["stoker"]).singleRow().int32(0)
            }
            let statements = ProtocolStatements(schema: "stoker", quotedSchema: "\"stoker\"", lockNamespace: key)
            try await withSession(database.conninfo) { first in
                try await first.query("BEGIN")
                try await first.query("INSERT INTO stoker.clusters (name) VALUES ('race')")
                try await withSession(database.conninfo) { second in
                    let secondPID = try await second.query("SELECT pg_backend_pid()").singleRow().int(0)
                    async let id = second.run { try statements.ensureCluster("race", on: $0) }
                    try await waitUntilBlocked(secondPID, in: database)
                    try await first.query("COMMIT")
                    let committed = try await first.query("SELECT id FROM stoker.clusters WHERE name = 'race'")
                        .singleRow().int(0)
                    #expect(try await id == committed)
                }
            }
        }
    }

    @Test("verify on a database that was never migrated names what is missing")
    func verifyUnmigrated() async throws {
        try await withTestDatabase { database in
            do {
                try await StokerSchema.verify(connection: database.conninfo)
                Issue.record("accepted")
            } catch let error as StokerError {
                #expect(error.code == .schemaMismatch)
                #expect(error.message.contains("001_initial.sql"))
            }
        }
    }
}
