#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Joining the cluster on a new session: migrations, both sessions' settings, the cluster row, `LISTEN`, the node row
/// and its lock on the witness, the members — then the machine is told (``NodeStateMachine/joined(nodeID:members:deadlockTimeout:maintenance:now:)``).
extension NodeDriver {
    func join(_ context: inout SessionContext) throws {
        let connection = context.connection
        let configuration = self.configuration
        let lease = configuration.lease.roundedUpMilliseconds
        let applicationName = Self.applicationName(cluster: configuration.cluster, node: configuration.nodeName)
        // Migrations first, under the session's defaults: waiting for another process's migration lock is not a
        // statement the lease's timeouts should cut. Nothing is held yet.
        let migrator = Migrator(schema: configuration.schema)
        let report = try configuration.migrate ? migrator.migrate(on: connection) : migrator.verify(on: connection)
        if !report.applied.isEmpty {
            logger.notice("applied Stoker migrations", metadata: ["stoker.migrations": "\(report.applied)"])
        }
        try configure(connection, applicationName: applicationName)
        try configure(
            context.witness,
            applicationName: Self.applicationName(cluster: configuration.cluster, node: configuration.nodeName + "/w"))
        let statements = try ProtocolStatements.of(schema: configuration.schema, on: connection)
        context.statements = statements
        context.clusterID = try statements.ensureCluster(configuration.cluster, on: connection)
        context.channel = statements.channel(clusterID: context.clusterID)
        // LISTEN before reading the members: no change can fall between the two.
        try connection.listen(context.channel)
        // The server instance, and the term floor (it reads the WAL position: a server that hides it fails here, with
        // its own message, rather than at the first term bump).
        let mainInstance = try confirmed(context) {
            try connection.execute(statements.serverInstance).singleRow().string(0)
        }
        // A wait shorter than deadlock_timeout never runs the server's deadlock check (nor, with log_lock_waits,
        // logs a line).
        let deadlockTimeout = try connection.execute(ProtocolStatements.deadlockTimeoutQuery).singleRow().int(0)
        for statement in statements.servingStatements { try connection.prepare(statement) }
        try context.witness.prepare(statements.witnessHeartbeat)
        let maintenanceCount = try warmUpAndRehearse(on: connection, statements, clusterID: context.clusterID)
        let clusterID = context.clusterID
        let witness = context.witness
        let mainPID = connection.protocolBackendPID
        let replaces = context.replaces
        // The witness inserts the row and takes the node lock in one transaction: the row is visible only once its
        // lock is held, and the lock lives exactly as long as the witness.
        let (nodeID, instance): (Int, String) = try confirmed(context, on: .witness) {
            try witness.transaction {
                let row = try witness.execute(
                    statements.insertNode,
                    [
                        "\(clusterID)", configuration.nodeName, Self.hostName ?? "", "\(getpid())", "{}", "\(mainPID)",
                        replaces.map { "\($0)" }, "\(lease)",
                    ]
                ).singleRow()
                let id = try row.int(0)
                guard try witness.execute(statements.lockNode, ["\(id)"]).singleRow().bool(0) else {
                    throw StokerError(.unexpectedResult, "The new node row's lock was already taken.")
                }
                return (id, try row.string(1))
            }
        }
        guard instance == mainInstance else {
            // A multi-host connection string can reach two servers: the witness's lock would then prove nothing.
            throw StokerError(
                .connectionLost,
                "The node's two sessions reached different servers (\(mainInstance) and \(instance)); reconnecting.")
        }
        context.nodeID = nodeID
        // Confirmed: the main session's half of the lease starts here, not at its first statement (a join on a busy
        // server can take a while).
        let rows = try confirmed(context) { try connection.execute(statements.members, ["\(clusterID)"]).rows }
        var members: [Int: String] = [:]
        for row in rows { members[try row.int(0)] = try row.string(1) }
        let member = ClusterMember(id: nodeID, name: configuration.nodeName)
        withMachine { locked in
            locked.member = member
            locked.machine.joined(
                nodeID: nodeID, members: members, deadlockTimeout: .milliseconds(deadlockTimeout),
                maintenance: maintenanceCount, now: .now)
        }
        watchdogSignal.signal()
    }

    /// The warm-up and the rehearsal of a takeover, on a session whose serving statements are prepared: at the join,
    /// and again after a vacuum (``NodeStateMachine/Step/rehearse``). Returns how many times the tables a takeover
    /// reads had been vacuumed or analyzed, read by the warm-up before it planned anything: a vacuum or an analyze from
    /// then on invalidates what these plan, and the session rehearses again once a heartbeat sees the count move.
    func warmUpAndRehearse(
        on connection: PGConnection, _ statements: ProtocolStatements, clusterID: Int
    ) throws(StokerError) -> Int64? {
        // PL/pgSQL compiles a function, and plans its statements, at its first call in a session: 5-7 ms for the term
        // bump's functions, measured. Paid here, not in the middle of a failover.
        let maintenance = try connection.execute(statements.warmUp).singleRow().optionalInt(0).map(Int64.init)
        do {
            try rehearseTakeovers(on: connection, statements, clusterID: clusterID)
        } catch let error as StokerError {
            throw error
        } catch {
            throw StokerError(.unexpectedResult, "The rehearsal of a takeover failed: \(error)")
        }
        return maintenance
    }

    /// Runs both kinds of takeover once, start to end, on election rows of the rehearsal's own, in a transaction that
    /// is rolled back: a successor after a hand-over (the wait granted, the term bumped, leadership begun, the
    /// trigger's `leader` notification queued; then the hand-over itself, `released`), and a successor after a leader
    /// that ended without one, in two elections at once (the same, with the predecessor's free node lock as the
    /// evidence, and the try-and-bump of the other election in the same statement). A new backend looks up every
    /// catalog entry a statement needs the first time it runs it — types, operators, the trigger and its function —
    /// and the calls that compile a function without running its branches leave those for later: a first takeover
    /// took 2.0 ms of server time in a fresh session against 0.7 ms once rehearsed (psql, `\timing`). Nobody sees any
    /// of it: the rows are never committed (their ids are skipped, two per join), nothing is notified, and the locks
    /// it takes — the rows' waiter token and election locks; node 0's lock, which no node holds (ids start at 1), only
    /// joins rehearsing, each for an instant — are given back by the statements themselves. Should a statement fail
    /// half-way, the join fails and its sessions end, which frees them. The answers are read as a real takeover's are
    /// (the node's own code, and the types it reads them into, run here first; an answer it cannot read fails the
    /// join), but not judged: a rehearsal that finds node 0's lock taken by another join's has still run its
    /// statements.
    func rehearseTakeovers(on connection: PGConnection, _ statements: ProtocolStatements, clusterID: Int) throws {
        try connection.rolledBack {
            let ids = try connection.execute(statements.insertRehearsal, ["\(clusterID)"]).rows.map { try $0.int(0) }
            guard ids.count == 2 else {
                throw StokerError(.unexpectedResult, "The rehearsal's election rows were not inserted.")
            }
            // Waiter tokens exist for ids below 2^30 − 1 only (claim_waiter skips the others): nothing to rehearse.
            guard ids.allSatisfy({ $0 < 1_073_741_823 }) else { return }
            let (first, other) = ("\(ids[0])", "\(ids[1])")
            // Node 0 takes over after a hand-over; then node -1 from node 0, which ended without one (stranded), in
            // both elections.
            for (node, stranded) in [("0", false), ("-1", true)] {
                if stranded { try connection.execute(statements.strandLeader, ["{\(first),\(other)}"]) }
                try connection.execute(statements.takeWaiterToken, [first])
                let rows = try connection.executePrepared(
                    statements.waitAndTake, [node, first, "1000", "", "false", stranded ? "{\(other)}" : "{}"]
                ).rows
                _ = try TakenElection.won(byWaitAndTake: rows)
                for id in stranded ? [first, other] : [first] {
                    try connection.executePrepared(statements.handOver, [id, node])
                }
            }
        }
    }

    /// The session settings of both of a node's sessions: the lease's timeouts (the server's idle timer ends a silent
    /// session), keepalives, read committed, commits at least flushed locally, generic plans.
    ///
    /// Generic plans: PL/pgSQL plans each statement of a function anew at its first five executions (custom plans,
    /// for statements with parameters), so the first real takeover of a session planned every statement of the term
    /// bump again — in the middle of the failover, on a server whose CPUs the dying node's backends are busy with. With
    /// `force_generic_plan` the join's warm-up and rehearsal plan them once, for the session's life. Every statement
    /// these sessions run reads rows by key (or reads `pg_locks`): a generic plan is the plan a custom one would be.
    private func configure(_ connection: PGConnection, applicationName: String) throws {
        let lease = configuration.lease.roundedUpMilliseconds
        try connection.execute(
            """
            SELECT set_config('application_name', $1, false),
                   set_config('default_transaction_isolation', 'read committed', false),
                   set_config('idle_session_timeout', $2, false),
                   set_config('idle_in_transaction_session_timeout', $2, false),
                   set_config('statement_timeout', $3, false),
                   set_config('client_connection_check_interval', $4, false),
                   set_config('tcp_keepalives_idle', $5, false),
                   set_config('tcp_keepalives_interval', '1', false),
                   set_config('tcp_keepalives_count', '3', false),
                   set_config('tcp_user_timeout', $2, false),
                   set_config('plan_cache_mode', 'force_generic_plan', false),
                   -- What the evidence rule trusts (terms, begins, acknowledgements) must survive a server crash.
                   set_config('synchronous_commit',
                              CASE WHEN current_setting('synchronous_commit') = 'off' THEN 'local'
                                   ELSE current_setting('synchronous_commit') END, false)
            """,
            [
                applicationName, "\(lease)", "\(configuration.effectiveStatementTimeout.roundedUpMilliseconds)",
                "\(configuration.connectionCheckInterval.roundedUpMilliseconds)", "\(max(1, (lease + 999) / 1000))",
            ]
        )
    }
}
