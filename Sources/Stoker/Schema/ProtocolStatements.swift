/// Every statement a node runs on its dedicated session (DESIGN §3), schema-qualified once.
///
/// Values are always bound parameters; only the schema name is spliced in, after libpq quoted it. The least-privilege
/// integration test runs each of these as a role holding only what ``StokerSchema/grant(to:connection:schema:)``
/// grants, so the documented grants are exactly what a node needs.
struct ProtocolStatements: Sendable {
    /// The first key of every node lock: `(nodeNamespace, nodes.id)`.
    static let defaultNodeNamespace: Int32 = 0x5354_4B4E  // "STKN"
    /// The first key of every election lock: `(electionNamespace, elections.id)`.
    static let defaultElectionNamespace: Int32 = 0x5354_4B45  // "STKE"

    /// The schema name as given (unquoted): the channel prefix.
    let schema: String
    let nodeNamespace: Int32
    let electionNamespace: Int32

    /// `$1` cluster name → `id` (inserted on first use).
    let ensureCluster: String
    /// `$1` cluster id, `$2` name, `$3` host, `$4` pid, `$5` metadata (json text) → `id`, `started_at`.
    /// Run in one transaction with ``lockNode`` so the row is visible only once its lock is held.
    let insertNode: String
    /// `$1` node id: takes the node lock (session level: it outlives the transaction).
    let lockNode: String
    /// `$1` node id: the heartbeat that renews the lease.
    let heartbeat: String
    /// `$1` cluster id → `id`, `name`, `host`, `pid`, `draining` of every member.
    let members: String
    /// `$1` cluster id, `$2` election name → `id` (inserted on first use).
    let ensureElection: String
    /// `$1` election ids as an int4 array literal (`{3,7}`) → the ids whose lock this session just won.
    /// Never pass an id this session already holds: advisory locks stack.
    let tryAcquire: String
    /// `$1` election id, `$2` node id, `$3` node name → the new `term`.
    let bumpTerm: String
    /// `$1` election id, `$2` node id: clears the leader (→ `released` notification) — then ``unlockElection``,
    /// both in one transaction.
    let clearLeader: String
    /// `$1` election id → whether the lock was held and is now released.
    let unlockElection: String
    /// `$1` cluster id → `id`, `name` of every member whose node lock is gone (rows deleted; `node_down` sent).
    let sweep: String
    /// `$1` cluster id, `$2` election name → `term`, `node id`, `node name` of the current lock holder (no row: none).
    let whereis: String
    /// `$1` node id: graceful leave (→ `node_down`).
    let leave: String
    /// `$1` cluster name, `$2` election name, `$3` term: the fence (SQLSTATE SK001 when stale).
    let fence: String

    /// SQLSTATE the fence raises for a stale term.
    static let staleTermSQLState = "SK001"

    init(
        schema: String,
        quotedSchema s: String,
        nodeNamespace: Int32 = defaultNodeNamespace,
        electionNamespace: Int32 = defaultElectionNamespace
    ) {
        self.schema = schema
        self.nodeNamespace = nodeNamespace
        self.electionNamespace = electionNamespace
        // Advisory locks are per database: pg_locks lists every database's, so filter on ours.
        let heldLock = { (namespace: Int32, key: String) in
            """
            SELECT 1 FROM pg_locks l
                     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                       AND l.classid = \(namespace)::int4::oid AND l.objid = \(key)::oid
            """
        }
        ensureCluster = """
            WITH inserted AS (
                INSERT INTO \(s).clusters (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id
            )
            SELECT id FROM inserted UNION ALL SELECT id FROM \(s).clusters WHERE name = $1 LIMIT 1
            """
        insertNode = """
            INSERT INTO \(s).nodes (cluster_id, name, host, pid, metadata)
            VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING id, started_at
            """
        lockNode = "SELECT pg_advisory_lock(\(nodeNamespace), $1::int4)"
        heartbeat = "UPDATE \(s).nodes SET heartbeat_at = now() WHERE id = $1"
        members = "SELECT id, name, host, pid, draining FROM \(s).nodes WHERE cluster_id = $1 ORDER BY id"
        ensureElection = """
            WITH inserted AS (
                INSERT INTO \(s).elections (cluster_id, name) VALUES ($1, $2)
                ON CONFLICT (cluster_id, name) DO NOTHING RETURNING id
            )
            SELECT id FROM inserted
            UNION ALL SELECT id FROM \(s).elections WHERE cluster_id = $1 AND name = $2 LIMIT 1
            """
        tryAcquire = """
            SELECT id FROM unnest($1::int4[]) AS candidate (id)
             WHERE pg_try_advisory_lock(\(electionNamespace), id)
            """
        bumpTerm = """
            UPDATE \(s).elections
               SET term = term + 1, leader_node = $2, leader_name = $3, leader_since = now()
             WHERE id = $1 RETURNING term
            """
        clearLeader = """
            UPDATE \(s).elections SET leader_node = NULL, leader_name = NULL, leader_since = NULL
             WHERE id = $1 AND leader_node = $2
            """
        unlockElection = "SELECT pg_advisory_unlock(\(electionNamespace), $1::int4)"
        sweep = """
            DELETE FROM \(s).nodes n
             WHERE n.cluster_id = $1 AND NOT EXISTS (\(heldLock(nodeNamespace, "n.id")))
            RETURNING n.id, n.name
            """
        whereis = """
            SELECT e.term, n.id, n.name
              FROM \(s).elections e
              JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND l.classid = \(electionNamespace)::int4::oid AND l.objid = e.id::oid
              JOIN \(s).nodes n ON n.backend_pid = l.pid AND n.cluster_id = e.cluster_id
             WHERE e.cluster_id = $1 AND e.name = $2
            """
        leave = "DELETE FROM \(s).nodes WHERE id = $1"
        fence = "SELECT \(s).fence($1, $2, $3)"
    }

    /// The channel a cluster's notifications go to (`<schema>:<cluster id>`, at most 63 bytes).
    func channel(clusterID: Int) -> String { "\(schema):\(clusterID)" }
}
