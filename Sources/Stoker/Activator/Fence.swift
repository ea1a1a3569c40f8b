/// Fencing: how a leader's writes refuse to land once a newer term exists.
///
/// Every leadership carries its term (``ActivatorEvent/nowLeader(term:)``, ``ActivatorContext/term``). Call the
/// schema's fence function first in every transaction that writes on the leader's behalf, with that term, on
/// *your* connection (PostgresNIO, another libpq client — never the node's session):
///
/// ```sql
/// BEGIN;
/// SELECT stoker.fence('billing-prod', 'importer', 7);   -- raises SQLSTATE SK001 if term 7 is stale
/// INSERT INTO invoices ...;
/// COMMIT;
/// ```
///
/// The function takes `FOR SHARE` on the election's row, so the transaction serialises against the next leader's
/// term bump: either it commits before the new term exists, or it fails with ``staleTermSQLState`` and rolls back.
/// Even a double fault (a partition *and* an administrator's kill) cannot let a stale leader's write through.
/// The role running it needs `EXECUTE` on the function only (see ``StokerSchema/grant(to:connection:schema:)``).
public enum Fence {
    /// The SQLSTATE the fence raises for a stale term (or an election without a leader).
    public static let staleTermSQLState = ProtocolStatements.staleTermSQLState

    /// `SELECT <schema>.fence($1::text, $2::text, $3::bigint)` for `schema`, quoted, with the cluster, election and
    /// term as parameters `$1`, `$2`, `$3`. The casts make any client's binding work: PostgresNIO binds a Swift
    /// `String` as text and an `Int64` as bigint, libpq sends untyped text — each resolves to the one fence function.
    ///
    /// - Throws: ``StokerError/Code/invalidIdentifier`` for a schema name PostgreSQL cannot hold.
    public static func sql(schema: String = StokerSchema.defaultSchema) throws(StokerError) -> String {
        try StokerSchema.validate(schema: schema)
        let quoted = "\"" + schema.map { $0 == "\"" ? "\"\"" : String($0) }.joined() + "\""
        return "SELECT \(quoted).fence($1::text, $2::text, $3::bigint)"
    }
}
