/// Every statement a node runs on its own two sessions (the main session and the witness, never a pooled or an
/// application's connection), schema-qualified once.
///
/// Values are always bound parameters; only the schema name (quoted by libpq) and the lock namespace (an integer)
/// are spliced in. The least-privilege integration test runs each of these as a role holding only what
/// ``StokerSchema/grant(to:connection:schema:)`` grants, so the documented grants are exactly what a node needs.
///
/// **Lock keys** use the two-int4 form with the schema's OID as the first key — unique within a database, so two
/// Stoker schemas in one database can never share a key: node locks are `(schema oid, nodes.id)`, election locks
/// `(schema oid, −elections.id)` (ids are positive, so the sign keeps the two kinds apart). Applications' own
/// advisory locks in the single-bigint form can never collide with them (`pg_locks.objsubid` 1, not 2).
struct ProtocolStatements: Sendable {
    /// The schema name as given (unquoted): the channel prefix.
    let schema: String
    /// The first key of every lock: the schema's OID as an int4 (see ``lockNamespaceQuery``).
    let lockNamespace: Int32

    /// `$1` schema name → the lock namespace (the schema's OID as int4).
    static let lockNamespaceQuery = "SELECT oid::int4 FROM pg_namespace WHERE nspname = $1"

    /// `$1` cluster name → `id` (inserted on first use). Use ``ensureCluster(_:on:)``: it retries the empty answer
    /// a concurrent first insert can give.
    let ensureCluster: String
    /// `$1` cluster id, `$2` name, `$3` host, `$4` pid, `$5` metadata (json text), `$6` the main session's backend pid,
    /// `$7` the incarnation this one replaces (or NULL), `$8` the lease in milliseconds → `id`, `server_instance`.
    /// Run on the witness session, in one transaction with ``lockNode``, so the row is visible only once its lock is
    /// held (`witness_pid` is the running session's pid).
    let insertNode: String
    /// → the server instance this session is on (`server_instance()`), and the lowest term it may issue
    /// (`term_floor()`); migration 003.
    let serverInstance: String
    /// The witness session's heartbeat: a round trip that keeps its idle timer from ending it.
    let witnessHeartbeat = "SELECT 1"
    /// The server's `deadlock_timeout` in milliseconds: a lock-queue wait stays below it.
    static let deadlockTimeoutQuery =
        "SELECT (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::int"
    /// `$1` node id, `$2` election ids as an int4 array literal, `$3` whether to claim a waiter token, `$4` whether to
    /// try the sweeper token: the heartbeat, the follower's retry and the claims in one statement →
    /// rows renewed (0: the row is gone), the ids whose lock this session just won (an int4 array literal), the
    /// election whose waiter token it took (or NULL), whether it took the sweeper token (or NULL).
    let heartbeatAndTry: String
    /// `$1` node id → whether the node lock was taken (session level: it outlives the transaction).
    let lockNode: String
    /// `$1` node id, `$2` whether to try the sweeper token: the heartbeat that renews the lease → rows renewed (0: the
    /// row is gone), whether it took the sweeper token (or NULL).
    let heartbeat: String
    /// `$1` cluster id → `id`, `name`, `host`, `pid`, `draining` of every member.
    let members: String
    /// `$1` cluster id, `$2` election name → `id` (inserted on first use). Use ``ensureElection(cluster:name:on:)``.
    let ensureElection: String
    /// The try-lock and the term bump in one round trip: `$1` election ids as an int4 array literal, `$2` node id, `$3`
    /// node name → for each election whose lock this session just won: `id`, then ``takeTerm``'s columns. Never pass an
    /// id this session already holds.
    let tryTake: String
    /// The lock-queue wait, the term bump when granted (with a try and a bump of the other candidates `$6`, an int4
    /// array literal), and the heartbeat when `$5` is true, in one round trip: `$1` node id, `$2` election id, `$3`
    /// milliseconds, `$4` node name → a row per election (the waited one first): rows renewed, election id, granted,
    /// then ``takeTerm``'s columns (NULL unless granted), then with the heartbeat how many times the tables a takeover
    /// reads were vacuumed or analyzed (else NULL). Never pass an id this session already holds.
    let waitAndTake: String
    /// `$1` election ids as an int4 array literal → the first whose waiter token this session just took, or NULL
    /// (`claim_waiter`, migration 003). Never pass an election whose token this session holds.
    let claimWaiter: String
    /// `$1` election id: gives its waiter token back → whether this session held it.
    let releaseWaiter: String
    /// `$1` election id, `$2` node id, `$3` node name → the new `term`; `began` when leadership begins at once (the
    /// predecessor handed over, or its witness is gone within 25 ms); else the predecessor's node id (NULL when the row
    /// was written on another timeline: only the lease counts), whether it joined this server, and the longest lease it
    /// or any member may have, in milliseconds (`take_term`, migration 003).
    let takeTerm: String
    /// `$1` predecessor's node id, `$2` milliseconds, `$3` election id, `$4` term, `$5` node id, `$6` node name → true
    /// when the predecessor's node lock was granted (its witness gone) and this node's leadership began, false while
    /// it is still held, NULL if the term moved on (`await_predecessor`, migration 003).
    let awaitPredecessor: String
    /// `$1` election id, `$2` term, `$3` node id, `$4` node name → whether leadership began (the term is still ours).
    let beginTerm: String
    /// `$1` node id → whether a later incarnation names it as the one it replaces (that node ended its leaderships).
    let acknowledged: String
    /// Calls the term bump's functions for election 0 and node 0, which never exist (ids start at 1): no row is
    /// touched, no lock is left held (`await_predecessor` takes and gives back lock 0 at once), and the session has
    /// them compiled and planned before its first takeover. Its first column, read before anything is planned: how many
    /// times the tables a takeover reads (`nodes`, `elections`, `term_band`) were vacuumed or analyzed, by the server's
    /// statistics (NULL without any) — each time invalidates every session's plans of their statements.
    let warmUp: String
    /// `$1` cluster id → the `id`s of two new election rows for the join's rehearsal of a takeover (see
    /// ``NodeDriver/rehearseTakeovers(on:_:clusterID:)``); run only inside a transaction that is rolled back.
    let insertRehearsal: String
    /// `$1` election id → whether this session just took its waiter token (as ``claimWaiter`` would have it).
    let takeWaiterToken: String
    /// `$1` election ids as an int4 array literal: names node 0 — which never exists, so its node lock is free — as
    /// their leader, begun on this server, as a leader that ended without a hand-over leaves its rows (the
    /// rehearsal's second takeover).
    let strandLeader: String
    /// `$1` election id, `$2` node id: the graceful release in one round trip — clears the leader if it is this node
    /// (→ `released`), then unlocks → whether the lock was held (`hand_over`, migration 003).
    let handOver: String
    /// → how many nodes' rows the sweep deleted, in every cluster of the schema: those whose node lock is gone
    /// (`node_down`, reason `died`; `sweep`, migration 004).
    let sweep: String
    /// `$1` cluster id, `$2` election name → `term`, node `id`, node `name` of the node whose main session holds the
    /// election lock, counted only while its node lock is held (by its witness) and the row names it leader — its
    /// leadership has begun, so the term is its own (no row: no leader; also while a node is between its lock and its
    /// bump, or waits for evidence that its predecessor stopped).
    let whereis: String
    /// `$1` node id: graceful leave (→ `node_down`, reason `left`; `leave_node`, migration 004).
    let leave: String
    /// `$1` cluster name, `$2` election name, `$3` term: the fence (SQLSTATE SK001 when stale).
    let fence: String
    /// `$1` election id, `$2` a number, `$3` how many → `sequence`, `payload` of its triggers numbered after `$2`, in
    /// order (migration 005).
    let readTriggers: String
    /// `$1` election id, `$2` numbers as an int8 array literal: deletes those of its triggers (handled).
    let deleteTriggers: String
    /// `$1` cluster name, `$2` election name, `$3` payload → the trigger's number (`send_trigger`, migration 005:
    /// SQLSTATE SK002 when the election does not exist).
    let sendTrigger: String

    /// The statements a joined node's main session runs while it serves (the steps of its session thread), prepared
    /// at join (``PGConnection/prepare(_:)``): none is parsed again, and none is prepared in the middle of a failover.
    var servingStatements: [String] {
        [
            heartbeat, heartbeatAndTry, waitAndTake, claimWaiter, releaseWaiter, tryTake, takeTerm, awaitPredecessor,
            beginTerm, acknowledged, handOver, sweep, whereis, leave, readTriggers, deleteTriggers,
        ]
    }

    /// SQLSTATE the fence raises for a stale term.
    static let staleTermSQLState = "SK001"
    /// SQLSTATE `send_trigger` raises for an election that does not exist.
    static let unknownElectionSQLState = "SK002"

    init(schema: String, quotedSchema s: String, lockNamespace: Int32) {
        self.schema = schema
        self.lockNamespace = lockNamespace
        let ns = "(\(lockNamespace))::int4"
        // Advisory locks are per database: pg_locks lists every database's, so filter on ours.
        let heldLock = { (key: String, pid: String?) in
            """
            SELECT 1 FROM pg_locks l
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND l.classid = \(ns)::oid AND l.objid = (\(key))::oid\(pid.map { " AND l.pid = \($0)" } ?? "")
            """
        }
        // The follower's try of its candidates' locks (an int4 array literal in `parameter`) → the ids it just won.
        // Never pass an id this session already holds: advisory locks stack.
        let tryLocks = { (parameter: String) in
            "SELECT id FROM unnest(\(parameter)::int4[]) AS candidate (id) WHERE pg_try_advisory_lock(\(ns), -id)"
        }
        ensureCluster = """
            WITH inserted AS (
                INSERT INTO \(s).clusters (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id
            )
            SELECT id FROM inserted UNION ALL SELECT id FROM \(s).clusters WHERE name = $1 LIMIT 1
            """
        insertNode = """
            INSERT INTO \(s).nodes (cluster_id, name, host, pid, metadata, backend_pid, witness_pid, replaces, lease_ms,
                                    server_instance)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6, pg_backend_pid(), $7, $8, \(s).server_instance())
            RETURNING id, server_instance
            """
        serverInstance = "SELECT \(s).server_instance(), \(s).term_floor()"
        lockNode = "SELECT pg_try_advisory_lock(\(ns), $1::int4)"
        // The schema's sweeper token, (namespace, -2^31): below every waiter token (-2^30 - id, id < 2^30 - 1), election
        // lock (-id) and node lock (+id). Tried only by a session without it (advisory locks stack).
        let sweeperToken = "pg_try_advisory_lock(\(ns), -2147483648)"
        // How many times the tables a takeover reads were vacuumed or analyzed (the server's statistics): each time
        // invalidates every session's plans of their statements, rehearsed at join (see NodeStateMachine.Step.rehearse).
        // Read by the warm-up and by the waiters' heartbeats only: a waiter is who takes over, and an idle cluster has
        // one per election.
        let maintenance = """
            (SELECT sum(pg_stat_get_vacuum_count(c.oid) + pg_stat_get_autovacuum_count(c.oid)
                        + pg_stat_get_analyze_count(c.oid) + pg_stat_get_autoanalyze_count(c.oid))::int8
               FROM pg_class c
              WHERE c.relnamespace = \(ns)::oid AND c.relname IN ('nodes', 'elections', 'term_band'))
            """
        // The key of the waiter token of election `$1` (claim_waiter's: −2^30 − id).
        let waiterToken = "\(ns), -1073741824 - ($1::int4)"
        heartbeat = """
            WITH beat AS (UPDATE \(s).nodes SET heartbeat_at = now() WHERE id = $1 RETURNING 1)
            SELECT (SELECT count(*) FROM beat)::int, CASE WHEN $2::boolean THEN \(sweeperToken) END
            """
        heartbeatAndTry = """
            WITH beat AS (UPDATE \(s).nodes SET heartbeat_at = now() WHERE id = $1 RETURNING 1),
                 won AS MATERIALIZED (\(tryLocks("$2")))
            SELECT (SELECT count(*) FROM beat)::int, ARRAY(SELECT id FROM won)::text,
                   CASE WHEN $3::boolean THEN \(s).claim_waiter(\(ns), $2::int4[]) END,
                   CASE WHEN $4::boolean THEN \(sweeperToken) END
            """
        members = "SELECT id, name, host, pid, draining FROM \(s).nodes WHERE cluster_id = $1 ORDER BY id"
        ensureElection = """
            WITH inserted AS (
                INSERT INTO \(s).elections (cluster_id, name) VALUES ($1, $2)
                ON CONFLICT (cluster_id, name) DO NOTHING RETURNING id
            )
            SELECT id FROM inserted
            UNION ALL SELECT id FROM \(s).elections WHERE cluster_id = $1 AND name = $2 LIMIT 1
            """
        takeTerm = """
            SELECT term, began, previous_node, previous_same_server, previous_lease_ms
              FROM \(s).take_term(\(ns), $1, $2, $3, 25)
            """
        tryTake = """
            WITH won AS MATERIALIZED (\(tryLocks("$1")))
            SELECT won.id, t.term, t.began, t.previous_node, t.previous_same_server, t.previous_lease_ms
              FROM won CROSS JOIN LATERAL \(s).take_term(\(ns), won.id, $2, $3, 0) AS t
            """
        waitAndTake = """
            WITH beat AS (UPDATE \(s).nodes SET heartbeat_at = now() WHERE id = $1 AND $5::boolean RETURNING 1)
            SELECT (SELECT count(*) FROM beat)::int, w.election, w.granted,
                   w.term, w.began, w.previous_node, w.previous_same_server, w.previous_lease_ms,
                   CASE WHEN $5::boolean THEN \(maintenance) END
              FROM \(s).wait_and_take(\(ns), $2, $3, $1, $4, $6::int4[]) AS w
            """
        claimWaiter = "SELECT \(s).claim_waiter(\(ns), $1::int4[])"
        releaseWaiter = "SELECT pg_advisory_unlock(\(waiterToken))"
        awaitPredecessor = "SELECT \(s).await_predecessor(\(ns), $1, $2, $3, $4, $5, $6)"
        beginTerm = "SELECT \(s).begin_term($1, $2, $3, $4)"
        acknowledged = "SELECT EXISTS (SELECT FROM \(s).nodes WHERE replaces = $1)"
        // The count first: it is read before anything is planned.
        warmUp = """
            SELECT \(maintenance), (SELECT count(*) FROM \(s).take_term(\(ns), 0, 0, '', 0)),
                   \(s).begin_term(0, 0, 0, ''), \(s).await_predecessor(\(ns), 0, 1, 0, 0, 0, '')
            """
        insertRehearsal = """
            INSERT INTO \(s).elections (cluster_id, name)
            SELECT $1, 'stoker join rehearsal ' || gen_random_uuid() FROM generate_series(1, 2)
            RETURNING id
            """
        takeWaiterToken = "SELECT pg_try_advisory_lock(\(waiterToken))"
        strandLeader = """
            UPDATE \(s).elections SET leader_node = 0, written_on = \(s).server_instance() WHERE id = ANY ($1::int4[])
            """
        handOver = "SELECT \(s).hand_over(\(ns), $1, $2)"
        sweep = "SELECT \(s).sweep()"
        whereis = """
            SELECT e.term, n.id, n.name
              FROM \(s).elections e
              JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND l.classid = \(ns)::oid AND l.objid = (-e.id)::oid
              JOIN \(s).nodes n ON n.backend_pid = l.pid AND n.cluster_id = e.cluster_id
                              AND n.id = e.leader_node
                              AND EXISTS (\(heldLock("n.id", nil)))
             WHERE e.cluster_id = $1 AND e.name = $2
            """
        leave = "SELECT \(s).leave_node($1)"
        fence = "SELECT \(s).fence($1, $2, $3)"
        readTriggers = """
            SELECT sequence, payload FROM \(s).triggers
             WHERE election_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3
            """
        deleteTriggers = "DELETE FROM \(s).triggers WHERE election_id = $1 AND sequence = ANY ($2::int8[])"
        sendTrigger = "SELECT \(s).send_trigger($1, $2, $3)"
    }

    /// The statements of `schema`, as `connection` finds it (its lock namespace); a schema that does not exist is a
    /// `.schemaMismatch` error that says to migrate.
    static func of(schema: String, on connection: PGConnection) throws(StokerError) -> ProtocolStatements {
        guard let namespace = try connection.execute(lockNamespaceQuery, [schema]).rows.first else {
            throw StokerError(.schemaMismatch, "The schema \"\(schema)\" does not exist; run `stoker migrate` first.")
        }
        return ProtocolStatements(
            schema: schema, quotedSchema: try connection.quoteIdentifier(schema, kind: "schema name"),
            lockNamespace: try namespace.int32(0))
    }

    /// The channel a cluster's notifications go to (`<schema>:<cluster id>`, at most 63 bytes).
    func channel(clusterID: Int) -> String { "\(schema):\(clusterID)" }

    /// The cluster's id, inserting the row on first use.
    func ensureCluster(_ name: String, on connection: PGConnection) throws(StokerError) -> Int {
        try ensure(ensureCluster, [name], what: "cluster", on: connection)
    }

    /// The election's id, inserting the row on first use.
    func ensureElection(cluster: Int, name: String, on connection: PGConnection) throws(StokerError) -> Int {
        try ensure(ensureElection, [String(cluster), name], what: "election", on: connection)
    }

    /// Under a concurrent first insert, the statement waits for the other transaction and then finds the row
    /// neither inserted (conflict) nor visible (its snapshot predates that commit): zero rows. A new statement has
    /// a new snapshot and sees it.
    private func ensure(
        _ sql: String,
        _ parameters: [String?],
        what: String,
        on connection: PGConnection
    ) throws(StokerError) -> Int {
        for _ in 0..<3 {
            if let row = try connection.execute(sql, parameters).rows.first { return try row.int(0) }
        }
        throw StokerError(.unexpectedResult, "The \(what) row could neither be inserted nor found; was it deleted?")
    }
}
