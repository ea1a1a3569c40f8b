extension StokerCluster {
    /// The largest trigger payload, in bytes of UTF-8: 8000, the size of a PostgreSQL `NOTIFY` payload. For larger
    /// data, store it in a table of your own and send its key.
    public static let maximumTriggerPayload = 8000

    /// Wakes the leader of `election` with `payload`, from any process — one that runs no node included (a web
    /// handler, a script, `stoker trigger`): its behaviour gets ``ActivatorEvent/trigger(payload:sequence:)`` — the
    /// Elixir library `stoker`'s `:trigger`.
    ///
    /// The trigger is stored in the database before this returns (the notification only wakes the leader), so one sent
    /// while nobody leads — during a failover, or with every node stopped — reaches the next leader. Delivery is **at
    /// least once** and, within a leadership, **in the order sent**: a leader hands its election's triggers to its
    /// behaviour in order (at most 100 unfinished at a time) and deletes each once its callback has returned without
    /// throwing while it still led; a leadership that ends first, or a callback that throws, leaves the trigger to the
    /// next leadership, which gets it again. A leader waiting for evidence that another election's predecessor stopped
    /// reads its triggers when that wait ends (each wait lasts at most 250 ms).
    ///
    /// Runs on a short session of its own: one round trip after connecting, in its own transaction.
    ///
    /// - Returns: the trigger's number in its election (1, 2, 3, … in the order sent, and above every earlier one after
    ///   a failover of the database; never given twice), which the behaviour also gets: record it to skip a repeat.
    /// - Throws: ``StokerError`` — `.invalidParameter` for a payload over ``maximumTriggerPayload`` bytes or holding a
    ///   NUL byte (nothing is sent); `.invalidConfiguration` for a bad cluster or election name; `.unknownElection`
    ///   when no node has ever run an activator for the election in that cluster; a connection error; `.schemaMismatch`
    ///   when the schema is missing or older than this version (run `stoker migrate`).
    @discardableResult
    public static func trigger(
        election: String,
        payload: String = "",
        cluster: String,
        connection: String,
        schema: String = StokerSchema.defaultSchema
    ) async throws -> Int64 {
        try validateTrigger(payload: payload)
        try StokerNode.Configuration.validateName(cluster, kind: "cluster name")
        try StokerNode.Configuration.validateName(election, kind: "election name")
        try StokerSchema.validate(schema: schema)
        return try await PostgresSession.with(connection) { session in
            try await session.run { connection throws(StokerError) in
                let statements = try ProtocolStatements.of(schema: schema, on: connection)
                return try send(statements.sendTrigger, [cluster, election, payload], on: connection) {
                    "Election \"\(election)\" does not exist in cluster \"\(cluster)\" (schema \"\(schema)\"): a node "
                        + "creates it when an activator first runs for it. Check both names; `stoker status` lists "
                        + "the elections."
                }
            }
        }
    }

    /// Refuses a payload that cannot be sent, before anything is.
    static func validateTrigger(payload: String) throws(StokerError) {
        let length = payload.utf8.count
        if length > maximumTriggerPayload {
            throw StokerError(
                .invalidParameter,
                "The trigger's payload is \(length) bytes; at most \(maximumTriggerPayload) are allowed. Store larger "
                    + "data in a table of your own and send its key.")
        }
        if payload.utf8.contains(0) {
            throw StokerError(
                .invalidParameter, "The trigger's payload contains a NUL byte, which PostgreSQL text cannot hold.")
        }
    }

    /// Runs `send_trigger` → the trigger's number; its "no such election" (SQLSTATE SK002) becomes `.unknownElection`,
    /// and a schema without `send_trigger` (older than migration 005) `.schemaMismatch`.
    private static func send(
        _ sql: String, _ parameters: [String?], on connection: PGConnection, unknown: () -> String
    ) throws(StokerError) -> Int64 {
        let result: Result<QueryResult, StokerError> = Result { () throws(StokerError) -> QueryResult in
            try connection.execute(sql, parameters)
        }
        switch result {
        case .success(let rows):
            return Int64(try rows.singleRow().int(0))
        case .failure(let error) where error.sqlState == ProtocolStatements.unknownElectionSQLState:
            throw StokerError(.unknownElection, unknown(), sqlState: error.sqlState)
        case .failure(let error) where error.sqlState == "42883":
            throw StokerError(
                .schemaMismatch,
                "The Stoker schema has no send_trigger function: it is older than this version; run `stoker migrate`.",
                sqlState: error.sqlState)
        case .failure(let error):
            throw error
        }
    }
}
