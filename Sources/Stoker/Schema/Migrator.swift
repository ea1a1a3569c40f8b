import Logging

/// What a migration run found and did.
public struct MigrationReport: Sendable, Equatable {
    /// The versions this run applied (empty when the schema was already current).
    public var applied: [Int]
    /// The highest version this library knows, now present in the database.
    public var current: Int
    /// Versions recorded in the database that this library does not know: a newer Stoker migrated it. They are
    /// accepted as long as everything this version needs is still there (the schema check passed).
    public var newerVersions: [Int]
}

/// Schema management: applies the migrations in `sql/`, checks the schema, grants a least-privilege role.
///
/// Every entry point takes a libpq connection string (URL or `key=value`; the `PG*` environment fills in what it
/// leaves out) and a schema name (default `stoker`).
public enum StokerSchema {
    /// The version of this library (`stoker --version`).
    public static let libraryVersion = "0.1.0"
    /// The newest migration this library carries (the schema version it runs on).
    public static var schemaVersion: Int { Migration.all.map(\.version).max() ?? 0 }

    /// The schema Stoker uses unless told otherwise.
    public static let defaultSchema = "stoker"
    /// The high 32 bits of the transaction-level advisory lock (single-bigint form) that serialises migration runs;
    /// the low 32 bits are `hashtext(schema)`.
    public static let migrationLockNamespace: Int32 = 0x5354_4B4D  // "STKM"

    /// Schema names are at most this long: notification channels are `<schema>:<cluster id>` and PostgreSQL channel
    /// names are at most 63 bytes.
    public static let maximumSchemaNameLength = 52

    /// Applies every migration the database lacks, in one transaction under an advisory transaction lock, so many
    /// processes may call this at once: one applies, the others wait and find the work done. Then checks that the
    /// schema holds everything this version needs. Idempotent.
    ///
    /// - Throws: ``StokerError`` — `.migrationFailed` (nothing was committed), `.schemaMismatch` (a tampered schema,
    ///   named), or a connection error.
    @discardableResult
    public static func migrate(
        connection: String,
        schema: String = defaultSchema,
        logger: Logger = Logger(label: "stoker", factory: { _ in SwiftLogNoOpLogHandler() })
    ) async throws -> MigrationReport {
        try validate(schema: schema)
        let report = try await PostgresSession.with(connection) { session in
            try await session.run { connection in try Migrator(schema: schema).migrate(on: connection) }
        }
        if !report.applied.isEmpty {
            logger.notice(
                "applied Stoker migrations",
                metadata: ["stoker.schema": "\(schema)", "stoker.migrations": "\(report.applied)"]
            )
        }
        if !report.newerVersions.isEmpty {
            logger.warning(
                "the database holds Stoker migrations newer than this library",
                metadata: ["stoker.schema": "\(schema)", "stoker.migrations": "\(report.newerVersions)"]
            )
        }
        return report
    }

    /// Checks, without changing anything, that every migration is applied unaltered and the schema is intact.
    @discardableResult
    public static func verify(connection: String, schema: String = defaultSchema) async throws -> MigrationReport {
        try validate(schema: schema)
        return try await PostgresSession.with(connection) { session in
            try await session.run { connection in try Migrator(schema: schema).verify(on: connection) }
        }
    }

    /// Grants `role` exactly what a Stoker node needs on an already migrated schema (see the README's
    /// "Least privilege"); run it as the schema's owner.
    public static func grant(to role: String, connection: String, schema: String = defaultSchema) async throws {
        try validate(schema: schema)
        try await PostgresSession.with(connection) { session in
            try await session.run { connection in
                let sql = try grantStatements(
                    schema: connection.quoteIdentifier(schema, kind: "schema name"),
                    role: connection.quoteIdentifier(role, kind: "role name")
                )
                try connection.transaction { try connection.executeScript(sql) }
            }
        }
    }

    /// The grants of ``grant(to:connection:schema:)`` for already quoted names.
    static func grantStatements(schema: String, role: String) -> String {
        """
        GRANT USAGE ON SCHEMA \(schema) TO \(role);
        GRANT SELECT ON \(schema).migrations TO \(role);
        GRANT SELECT, INSERT ON \(schema).clusters TO \(role);
        GRANT SELECT, INSERT, UPDATE, DELETE ON \(schema).nodes TO \(role);
        GRANT SELECT, INSERT, UPDATE ON \(schema).elections TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).fence(text, text, bigint) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).wait_for_lock(integer, integer, integer) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).bump_term(integer, integer, text) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).server_instance() TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).term_floor() TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).begin_term(integer, bigint, integer, text) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).take_term(integer, integer, integer, text, integer) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).await_predecessor(integer, integer, integer, integer, bigint, integer, text)
            TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).hand_over(integer, integer, integer) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).claim_waiter(integer, integer[]) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).wait_and_take(integer, integer, integer, integer, text, integer[]) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).leave_node(integer) TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).sweep() TO \(role);
        GRANT SELECT, DELETE ON \(schema).triggers TO \(role);
        GRANT EXECUTE ON FUNCTION \(schema).send_trigger(text, text, text) TO \(role);
        """
    }

    static func validate(schema: String) throws(StokerError) {
        try SQLName.validate(schema, kind: "schema name", maximumLength: maximumSchemaNameLength)
    }
}

/// Runs on a session's own thread (it blocks).
struct Migrator {
    let schema: String
    var migrations: [Migration] = Migration.all

    func migrate(on connection: PGConnection) throws -> MigrationReport {
        let quoted = try connection.quoteIdentifier(schema, kind: "schema name")
        return try connection.transaction {
            // The single-bigint form: objsubid 1, so it can never meet a node or election lock (two-int4 form).
            try connection.execute(
                "SELECT pg_advisory_xact_lock(($1::bigint << 32) | (hashtext($2)::bigint & 4294967295))",
                [String(StokerSchema.migrationLockNamespace), schema]
            )
            let schemaExists = try connection.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                [schema]
            ).singleRow().bool(0)
            if !schemaExists {
                do {
                    try connection.execute("CREATE SCHEMA \(quoted)")
                } catch let error as StokerError {
                    throw migrationError("could not create schema \(schema)", cause: error)
                }
            }
            try connection.execute("SET LOCAL search_path TO \(quoted), pg_temp")
            let recorded = try recordedVersions(on: connection)
            try checkRecordedChecksums(recorded, on: connection)
            var applied: [Int] = []
            for migration in migrations where recorded[migration.version] == nil {
                do {
                    try connection.executeScript(migration.sql)
                    try connection.execute(
                        """
                        INSERT INTO migrations (version, name, checksum)
                        VALUES ($1, $2, encode(sha256(convert_to($3, 'UTF8')), 'hex'))
                        """,
                        [String(migration.version), migration.name, migration.sql]
                    )
                } catch let error as StokerError {
                    throw migrationError("migration \(migration.fileName) failed", cause: error)
                }
                applied.append(migration.version)
            }
            try checkManifest(on: connection)
            return MigrationReport(
                applied: applied,
                current: migrations.last?.version ?? 0,
                newerVersions: newer(than: recorded)
            )
        }
    }

    func verify(on connection: PGConnection) throws -> MigrationReport {
        let quoted = try connection.quoteIdentifier(schema, kind: "schema name")
        return try connection.transaction {
            try connection.execute("SET LOCAL search_path TO \(quoted), pg_temp")
            let recorded = try recordedVersions(on: connection)
            let missing = migrations.filter { recorded[$0.version] == nil }.map(\.fileName)
            if !missing.isEmpty {
                throw StokerError(
                    .schemaMismatch,
                    "Schema \(schema) lacks migrations \(missing.joined(separator: ", ")); run `stoker migrate` "
                        + "(or StokerSchema.migrate) as the schema owner.",
                    connection: connection.redactedDescription
                )
            }
            try checkRecordedChecksums(recorded, on: connection)
            try checkManifest(on: connection)
            return MigrationReport(
                applied: [],
                current: migrations.last?.version ?? 0,
                newerVersions: newer(than: recorded)
            )
        }
    }

    private func newer(than recorded: [Int: String]) -> [Int] {
        let known = Set(migrations.map(\.version))
        return recorded.keys.filter { !known.contains($0) }.sorted()
    }

    /// version → recorded checksum; empty when the migrations table does not exist yet.
    private func recordedVersions(on connection: PGConnection) throws -> [Int: String] {
        let tableExists = try connection.execute(
            """
            SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = $1 AND c.relname = 'migrations' AND c.relkind = 'r')
            """,
            [schema]
        ).singleRow().bool(0)
        guard tableExists else { return [:] }
        var recorded: [Int: String] = [:]
        for row in try connection.execute("SELECT version, checksum FROM migrations").rows {
            recorded[try row.int(0)] = try row.string(1)
        }
        return recorded
    }

    /// A recorded migration whose checksum differs from the library's copy was edited after it was applied (or the
    /// table was tampered with): refuse, naming the file.
    private func checkRecordedChecksums(_ recorded: [Int: String], on connection: PGConnection) throws {
        for migration in migrations {
            guard let checksum = recorded[migration.version] else { continue }
            let expected = try connection.execute(
                "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')",
                [migration.sql]
            ).singleRow().string(0)
            if checksum != expected {
                throw StokerError(
                    .schemaMismatch,
                    "Migration \(migration.fileName) was recorded in \(schema).migrations with checksum "
                        + "\(checksum.prefix(12))…, but this version of Stoker carries \(expected.prefix(12))…: the "
                        + "file or the table was changed after it was applied. Restore the schema from sql/ .",
                    connection: connection.redactedDescription
                )
            }
        }
    }

    private func checkManifest(on connection: PGConnection) throws {
        let columns = try connection.execute(
            """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity <> '',
                   pg_get_expr(d.adbin, d.adrelid)
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
            """,
            [schema]
        ).rows.map { row in
            (
                table: try row.string(0),
                column: try row.string(1),
                definition: SchemaManifest.definition(
                    type: try row.string(2),
                    notNull: try row.bool(3),
                    identity: try row.bool(4),
                    default: row[5]
                )
            )
        }
        let constraints = try connection.execute(
            """
            SELECT c.relname || ' ' || con.contype::text || ' (' || (
                       SELECT string_agg(a.attname, ',' ORDER BY k.ord)
                         FROM unnest(con.conkey) WITH ORDINALITY AS k (num, ord)
                         JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num) || ')'
              FROM pg_constraint con
              JOIN pg_class c ON c.oid = con.conrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1
            """,
            [schema]
        ).rows.map { try $0.string(0) }
        let functions = try connection.execute(
            """
            SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', p.prosrc, p.prosecdef,
                   coalesce(array_to_string(p.proconfig, E'\\n'), '')
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = $1
            """,
            [schema]
        ).rows.map { row in
            SchemaManifest.FoundFunction(
                signature: try row.string(0),
                body: try row.string(1),
                securityDefiner: try row.bool(2),
                settings: try row.string(3).split(separator: "\n").map(String.init)
            )
        }
        var triggers: [String: SchemaManifest.FoundTrigger] = [:]
        for row in try connection.execute(
            """
            SELECT c.relname || '.' || t.tgname, t.tgenabled IN ('O', 'A'), p.proname, t.tgtype, t.tgqual IS NOT NULL
              FROM pg_trigger t
              JOIN pg_class c ON c.oid = t.tgrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE n.nspname = $1 AND NOT t.tgisinternal
            """,
            [schema]
        ).rows {
            triggers[try row.string(0)] = SchemaManifest.FoundTrigger(
                fires: try row.bool(1),
                function: try row.string(2),
                type: try row.int(3),
                hasCondition: try row.bool(4)
            )
        }
        // The setting `SET search_path FROM CURRENT` stored while the migrator's search_path was in force.
        let searchPath = try connection.execute("SELECT 'search_path=' || quote_ident($1) || ', pg_temp'", [schema])
            .singleRow().string(0)
        let problems = SchemaManifest.differences(
            schema: schema,
            columns: columns,
            constraints: Set(constraints),
            functions: functions,
            triggers: triggers,
            searchPath: searchPath,
            migrations: migrations
        )
        if !problems.isEmpty {
            throw StokerError(
                .schemaMismatch,
                "The Stoker schema was altered: \(problems.joined(separator: "; ")). Restore it from sql/ "
                    + "(or drop the schema and run `stoker migrate` again).",
                connection: connection.redactedDescription
            )
        }
    }

    private func migrationError(_ what: String, cause: StokerError) -> StokerError {
        var hint = ""
        if cause.sqlState == "42501" {
            hint =
                " The role lacks a privilege: run `stoker migrate` as the owner of the schema (or a role that may "
                + "create it), then grant the node's role what the README lists."
        }
        return StokerError(
            .migrationFailed,
            "\(what); nothing was committed.\(hint)",
            sqlState: cause.sqlState,
            serverMessage: cause.serverMessage,
            connection: cause.connection
        )
    }
}
