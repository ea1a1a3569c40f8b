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

    /// One statement: the live members (node lock granted), the rows of members whose node lock is gone (not swept
    /// yet), and every election with its begun, lock-holding leader, the leader its row records, its waiter and how
    /// many triggers wait. Every value after the second column is text (one UNION ALL).
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
        ), rows AS (
            SELECT n.*, n.id::bigint IN (SELECT key FROM locks) AS live FROM \(s).nodes n
             WHERE n.cluster_id = (SELECT id FROM cluster)
        ), live AS (
            SELECT * FROM rows WHERE live
        )
        SELECT 'm', n.id, n.name, n.host, n.pid::text,
               (extract(epoch FROM now() - n.started_at) * 1000)::bigint::text,
               (extract(epoch FROM now() - n.heartbeat_at) * 1000)::bigint::text, n.draining::text,
               NULL, NULL, NULL, NULL
          FROM live n
        UNION ALL
        SELECT 's', n.id, n.name, NULL, NULL, NULL,
               (extract(epoch FROM now() - n.heartbeat_at) * 1000)::bigint::text, NULL, NULL, NULL, NULL, NULL
          FROM rows n WHERE NOT n.live
        UNION ALL
        SELECT 'e', e.id, e.name, e.term::text, n.id::text, n.name,
               CASE WHEN n.id IS NOT NULL THEN (extract(epoch FROM now() - e.leader_since) * 1000)::bigint END::text,
               e.leader_node::text, e.leader_name, w.id::text, w.name,
               (SELECT count(*) FROM \(s).triggers t WHERE t.election_id = e.id)::text
          FROM \(s).elections e
          LEFT JOIN live n ON n.id = e.leader_node
                          AND EXISTS (SELECT 1 FROM locks k
                                       WHERE k.key = ((-e.id)::oid)::bigint AND k.pid = n.backend_pid)
          LEFT JOIN live w ON EXISTS (SELECT 1 FROM locks k
                                       WHERE k.key = ((-1073741824 - e.id)::oid)::bigint AND k.pid = w.backend_pid)
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
        /// The leader the election's row names (the last one whose leadership began), when it is not ``leader``: a
        /// leader that died or lost its session (a successor may be waiting for evidence that it stopped).
        public var recordedLeader: ClusterMember? = nil
        /// The follower waiting in the election's lock queue (its waiter), if any: granted the lock the instant the
        /// leader's session ends.
        public var waiter: ClusterMember? = nil
        /// Triggers sent and not yet handled by a leader.
        public var pendingTriggers = 0
    }

    /// How the cluster stands, for a health check (`stoker status`'s exit code).
    public enum Health: Sendable, Hashable {
        /// Every election has a leader; nothing is out of place.
        case healthy
        /// Every election has a leader, but something is out of place (each, in a sentence): a dead member's row not
        /// swept yet, a recorded leader that no longer holds its lock.
        case degraded([String])
        /// An election has no leader (each, in a sentence, with anything else out of place), or the cluster has no
        /// election: the work does not run.
        case noLeader([String])
    }

    public var cluster: String
    /// By incarnation.
    public var members: [Member]
    /// By id (creation order).
    public var elections: [Election]
    /// Rows of members whose node lock is gone — dead (crashed, frozen or cut off past the lease, session killed) —
    /// that no sweep has removed yet (it removes them within `sweepInterval` while any node runs). Never in
    /// ``members``.
    public var unswept: [ClusterMember] = []

    /// How the cluster stands: see ``Health``.
    public var health: Health {
        var problems: [String] = []
        var leaderless: [String] = []
        if elections.isEmpty {
            leaderless.append("cluster \"\(cluster)\" has no election (no node has run an activator)")
        }
        for election in elections where election.leader == nil {
            var sentence = "election \"\(election.name)\" has no leader"
            if let recorded = election.recordedLeader {
                sentence += " (its row names \(recorded), which does not hold its lock)"
            }
            leaderless.append(sentence)
        }
        for member in unswept {
            problems.append("\(member)'s node lock is gone but its row is not swept yet (dead)")
        }
        if !leaderless.isEmpty { return .noLeader(leaderless + problems) }
        return problems.isEmpty ? .healthy : .degraded(problems)
    }
}
