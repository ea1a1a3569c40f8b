/// What a cluster looks like, read by any process — one that runs no node included (a web handler, the CLI) — with
/// a connection string: ``StokerCluster/snapshot(cluster:connection:schema:)``, and the changes as they happen,
/// ``StokerCluster/watch(cluster:connection:schema:)``.
public enum StokerCluster {
    /// The cluster now, from one statement (one snapshot of the tables, one read of `pg_locks`), on a short session
    /// of its own. A member is listed while its node lock is held — also before a sweep has removed a dead one's row
    /// — and an election's leader only while it holds the election's lock and its leadership has begun: what
    /// ``StokerNode/whereis(election:cluster:connection:schema:)`` says. An unknown cluster reads as empty.
    ///
    /// - Throws: ``StokerError`` for a bad name, a connection that fails, or a schema that does not exist.
    public static func snapshot(
        cluster: String,
        connection: String,
        schema: String = StokerSchema.defaultSchema
    ) async throws -> ClusterSnapshot {
        try StokerNode.Configuration.validateName(cluster, kind: "cluster name")
        try StokerSchema.validate(schema: schema)
        return try await PostgresSession.with(connection) { session in
            try await session.run { connection in
                try Self.readSnapshot(
                    cluster: cluster, statements: try ProtocolStatements.of(schema: schema, on: connection),
                    on: connection)
            }
        }
    }

    /// One statement: the live members (node lock granted) and every election with its begun, lock-holding leader.
    static func snapshotQuery(schema s: String, namespace: Int32) -> String {
        """
        WITH locks AS MATERIALIZED (
            SELECT l.objid::bigint AS key, l.pid
              FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = (\(namespace))::int4::oid
        ), cluster AS (
            SELECT id FROM \(s).clusters WHERE name = $1
        ), live AS (
            SELECT n.* FROM \(s).nodes n
             WHERE n.cluster_id = (SELECT id FROM cluster) AND n.id::bigint IN (SELECT key FROM locks)
        )
        SELECT 'm', n.id, n.name, n.host, n.pid::text,
               (extract(epoch FROM now() - n.started_at) * 1000)::bigint::text,
               (extract(epoch FROM now() - n.heartbeat_at) * 1000)::bigint::text, n.draining::text
          FROM live n
        UNION ALL
        SELECT 'e', e.id, e.name, e.term::text, n.id::text, n.name,
               CASE WHEN n.id IS NOT NULL THEN (extract(epoch FROM now() - e.leader_since) * 1000)::bigint END::text,
               NULL
          FROM \(s).elections e
          LEFT JOIN live n ON n.id = e.leader_node
                          AND EXISTS (SELECT 1 FROM locks k
                                       WHERE k.key = ((-e.id)::oid)::bigint AND k.pid = n.backend_pid)
         WHERE e.cluster_id = (SELECT id FROM cluster)
         ORDER BY 1 DESC, 2
        """
    }
}

/// A cluster at one instant (``StokerCluster/snapshot(cluster:connection:schema:)``).
public struct ClusterSnapshot: Sendable, Hashable {
    /// One live member: an incarnation whose node lock is held.
    public struct Member: Sendable, Hashable {
        public var member: ClusterMember
        /// The host it runs on (`gethostname`), and its process id there.
        public var host: String
        public var pid: Int
        /// Since it joined, and since its last heartbeat (by the server's clock).
        public var uptime: Duration
        public var sinceHeartbeat: Duration
        public var draining: Bool
        /// The elections it leads, by name.
        public var leads: [String]
    }

    /// One election of the cluster.
    public struct Election: Sendable, Hashable {
        public var name: String
        /// The last term issued (the fencing token of its current or last leadership).
        public var term: Int64
        /// Its leader now, if one leads: its leadership has begun and its session holds the election's lock.
        public var leader: ClusterMember?
        /// How long the leader has led.
        public var leaderFor: Duration?
    }

    public var cluster: String
    /// By incarnation.
    public var members: [Member]
    /// By id (creation order).
    public var elections: [Election]
}
