import CoreMetrics
import Logging
import ServiceLifecycle

/// One process's membership of a cluster: the one dedicated PostgreSQL session every ``Activator`` of the process
/// shares (besides its idle witness session, which holds the node lock). A swift-service-lifecycle `Service`.
///
/// `run()` connects, applies missing migrations (``Configuration/migrate``), joins the cluster (a node row and its
/// advisory lock, `LISTEN` on the cluster's channel) and then, on its own thread, renews the lease, tries the locks
/// of the elections its activators stand for, and reconnects — as a new incarnation — whenever the session is lost.
///
/// - **Graceful shutdown** (the `ServiceGroup`'s signal): every election still held is handed over (its activator's
///   `shutdown` callback runs, the lock is released, a follower elsewhere takes over within a round-trip), the node
///   row is deleted (`node_down` for the others) and the session closed.
/// - **Cancellation** is a hard stop: leadership ends at once, then the session is cut without a goodbye; the server
///   frees the locks as it would after a crash.
/// - `run()` throws only for what a reconnect cannot fix: wrong credentials, a missing database, a pooler in
///   transaction mode, a server older than 14, a tampered schema. Network failures and server restarts are retried
///   with jittered exponential backoff (``Configuration/reconnectDelay``), logged at `warning`.
///
/// Put the node before its activators in the `ServiceGroup`: services shut down in reverse order, so the activators
/// hand their elections over first.
public final class StokerNode: Service, Sendable {
    public let configuration: Configuration
    let core: NodeDriver

    /// Checks the configuration (every bad value is a ``StokerError/Code/invalidConfiguration`` or
    /// ``StokerError/Code/invalidConnectionString`` error, naming the field) and prepares the node; connects only in
    /// ``run()``.
    ///
    /// - Parameters:
    ///   - configuration: Where PostgreSQL is, the cluster and node names, the timing (see ``Configuration``).
    ///   - logger: Where the node logs: leadership changes at `notice`, session losses at `warning`. No log line holds
    ///     a password.
    ///   - metricsFactory: The factory for the node's metrics (see `NodeMetrics`); `nil` uses the process's
    ///     bootstrapped `MetricsSystem`.
    public init(
        configuration: Configuration,
        logger: Logger = Logger(label: "stoker", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil
    ) throws(StokerError) {
        self.configuration = configuration
        core = try NodeDriver(
            configuration: configuration,
            logger: logger,
            metrics: NodeMetrics(
                factory: metricsFactory ?? MetricsSystem.factory,
                cluster: configuration.cluster,
                node: configuration.nodeName
            )
        )
    }

    /// Runs the node until graceful shutdown or cancellation; see the type's documentation. May be called once.
    public func run() async throws {
        try await withTaskCancellationHandler {
            try await withGracefulShutdownHandler {
                try await core.run()
            } onGracefulShutdown: {
                self.core.requestGracefulStop()
            }
        } onCancel: {
            core.hardStop()
        }
    }

    /// Asks the node to stop gracefully, as a `ServiceGroup`'s graceful shutdown would; ``run()`` returns once done.
    public func shutdownGracefully() {
        core.requestGracefulStop()
    }

    /// This node's current incarnation (its row in the nodes table), while it is joined.
    public var member: ClusterMember? { core.member }

    /// The current leader of `election` in this node's cluster — the truth, from `pg_locks`, on a short session of
    /// its own (never the node's). `nil` when nobody holds the election.
    public func whereis(_ election: String) async throws -> Leader? {
        try await Self.whereis(
            election: election,
            cluster: configuration.cluster,
            connection: configuration.connection,
            schema: configuration.schema
        )
    }

    /// Test hook: holds the node's session thread for `duration` at its next turn (a pause of the loop; the lease
    /// watchdog keeps running).
    @_spi(Testing) public func freezeLoop(for duration: Duration) {
        core.freezeLoop(for: duration)
    }

    /// Test hook: holds both of the node's threads (the session loop and the lease watchdog) for `duration`, as a
    /// stopped process would be held; the server's idle timeout then ends the session and frees its locks.
    @_spi(Testing) public func freezeThreads(for duration: Duration) {
        core.freezeThreads(for: duration)
    }

    /// Test hook: ends the holds of a freeze under way — the session loop's at once, the watchdog's 100 ms later — so a
    /// test can hold a node for as long as it needs to look at the cluster, within a bound, rather than for a time
    /// guessed in advance.
    @_spi(Testing) public func releaseFreeze() {
        core.releaseFreeze()
    }

    /// Test hook: a freeze asked for by ``freezeLoop(for:)`` or ``freezeThreads(for:)`` is pending or under way.
    @_spi(Testing) public var isFrozen: Bool { core.isFrozen }

    /// Test hook: how many times a freeze has held the node's session thread so far (the count rises when a hold
    /// begins, so a test can wait for it without racing the hold's end).
    @_spi(Testing) public var sessionHolds: Int { core.sessionHolds }

    /// Test hook: the backend pid of the node's current main session.
    @_spi(Testing) public var backendPID: Int32? { core.backendPID }

    /// Test hook: the backend pid of the node's current witness session (the one holding its node lock).
    @_spi(Testing) public var witnessBackendPID: Int32? { core.witnessBackendPID }
}

extension StokerNode {
    /// Who leads an election, as `pg_locks` says.
    public struct Leader: Sendable, Hashable {
        /// The leader's node name and incarnation.
        public var member: ClusterMember
        /// The term it leads with (the fencing token).
        public var term: Int64
    }

    /// The current leader of `election` in `cluster`, from any process (`whereis/1` of the Elixir library `stoker`):
    /// the node holding the election's advisory lock while its session also holds its node lock. `nil` when nobody
    /// does.
    public static func whereis(
        election: String,
        cluster: String,
        connection: String,
        schema: String = StokerSchema.defaultSchema
    ) async throws -> Leader? {
        try Configuration.validateName(election, kind: "election name")
        try Configuration.validateName(cluster, kind: "cluster name")
        try StokerSchema.validate(schema: schema)
        return try await PostgresSession.with(connection) { session in
            try await session.run { connection in
                let statements = try ProtocolStatements.of(schema: schema, on: connection)
                guard
                    let cluster = try connection.execute(
                        "SELECT id FROM \(try connection.quoteIdentifier(schema)).clusters WHERE name = $1", [cluster]
                    ).rows.first
                else { return nil }
                guard
                    let row = try connection.execute(statements.whereis, [try cluster.string(0), election]).rows.first
                else { return nil }
                return Leader(
                    member: ClusterMember(id: try row.int(1), name: try row.string(2)),
                    term: Int64(try row.int(0))
                )
            }
        }
    }
}
