import StokerTestSupport
import Testing

@testable import Stoker

@Suite("Schema migrations")
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
            #expect(tables.first?[0] == "4")
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
                "column stoker.elections.term has type integer, expected bigint"
            ),
            ("DROP FUNCTION stoker.fence(text, text, bigint)", "function stoker.fence("),
            (
                "ALTER TABLE stoker.nodes DISABLE TRIGGER nodes_notify",
                "trigger nodes.nodes_notify in schema stoker is disabled"
            ),
            ("UPDATE stoker.migrations SET checksum = 'abc' WHERE version = 1", "001_initial.sql was recorded"),
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
