/// What a piece of work that must run *always, and once* implements: the callbacks of the Elixir `stoker`
/// behaviour, in Swift.
///
/// One ``Activator`` per election per process calls it. Its callbacks run one at a time, in the order the events
/// happened (a mailbox, like a GenServer's); a callback that throws is logged and the activator goes on.
///
/// ```swift
/// struct Importer: StokerBehaviour {
///     func initialState() -> Int { 0 }
///
///     func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
///         switch event {
///         case .nowLeader(let term):
///             // Leader work: cancelled the moment leadership ends, before another process can lead.
///             context.leaderTask {
///                 while !Task.isCancelled, context.isLeader {
///                     context.logger.info("importing", metadata: ["term": "\(term)"])
///                     try? await Task.sleep(for: .seconds(1))
///                 }
///             }
///         case .timer:
///             state += 1
///         default:
///             break
///         }
///     }
///
///     func nextTimer(_ state: Int) -> Duration? { .seconds(60) }
/// }
/// ```
public protocol StokerBehaviour: Sendable {
    /// The behaviour's own state, kept per process (another node's leader starts from its own).
    associatedtype State: Sendable

    /// The state before the first event (`init/0` in the Elixir library `stoker`).
    func initialState() async throws -> State

    /// Called for every event of the election, one at a time, in order (`event/3` in the Elixir library `stoker`).
    func handle(_ event: ActivatorEvent, state: inout State, context: ActivatorContext) async throws

    /// How long until the next ``ActivatorEvent/timer`` event, or `nil` for none (`next_timer_in/1` in the Elixir
    /// library `stoker`). Asked after ``initialState()`` and after every timer event. Timers run on every node,
    /// leader or not.
    func nextTimer(_ state: State) -> Duration?

    /// Asked on the leader before a ``ActivatorEvent/clusterChange(_:)`` is delivered (`cluster_valid?/1` in the
    /// Elixir library `stoker`): `.yes` delivers it, `.clusterSplit` delivers ``ActivatorEvent/clusterSplit(_:)``
    /// instead, `.no` drops it.
    func clusterValid(_ state: State) -> ClusterValidity
}

extension StokerBehaviour {
    public func nextTimer(_ state: State) -> Duration? { nil }
    public func clusterValid(_ state: State) -> ClusterValidity { .yes }
}

/// The answer of ``StokerBehaviour/clusterValid(_:)``.
public enum ClusterValidity: Sendable, Hashable {
    case yes
    case no
    case clusterSplit
}

/// Everything that can happen to an election, as seen by one node's behaviour.
public enum ActivatorEvent: Sendable, Hashable {
    /// This node now leads the election with `term`, the fencing token (see ``Fence``). The term bump has
    /// committed; leader-scoped work may start (``ActivatorContext/leaderTask(_:)``).
    case nowLeader(term: Int64)
    /// This node stopped leading while it keeps running; `leader` is the new leader's node name when already known
    /// (usually `nil`: the demotion is delivered at once, before anyone else can lead). Leader-scoped work was
    /// cancelled before this callback, and ``ActivatorContext/leadershipEndedAt`` tells when leadership ended.
    /// Only delivered after a ``nowLeader(term:)``.
    case nowFollower(leader: String?, reason: DemotionReason)
    /// A node joined or left the cluster. Delivered to the leader only, after ``StokerBehaviour/clusterValid(_:)``
    /// answered `.yes`.
    case clusterChange(ClusterChange)
    /// As ``clusterChange(_:)``, when ``StokerBehaviour/clusterValid(_:)`` answered `.clusterSplit`.
    case clusterSplit(ClusterChange)
    /// The timer asked for by ``StokerBehaviour/nextTimer(_:)`` fired.
    case timer
    /// While this node leads: a trigger sent to the election by any process
    /// (``StokerCluster/trigger(election:payload:cluster:connection:schema:)``) — the Elixir library `stoker`'s
    /// `:trigger`. Triggers are kept in the database until a leader has handled one — its callback returned without
    /// throwing while the leadership went on — so one sent while nobody leads reaches the next leader. Delivery is
    /// **at least once** and, within a leadership, **in the order sent**: a leadership that ends first, or a callback
    /// that throws, leaves the trigger to the next leadership, which gets it again (after the ones this leadership
    /// handled). `sequence` identifies the trigger in its election — increasing in the order sent, never given twice
    /// (not consecutive after a failover of the database) — so a behaviour that must not act twice records the
    /// numbers it handled with its work.
    case trigger(payload: String, sequence: Int64)
    /// The activator stops; the last event. After a ``nowLeader(term:)`` it is also the demotion: leadership ended
    /// (``ActivatorContext/leadershipEndedAt``) and leader-scoped work was cancelled before it.
    case shutdown(reason: ShutdownReason)
}

/// A change in the cluster's membership.
public enum ClusterChange: Sendable, Hashable {
    /// A node joined (every incarnation: a node that reconnects, or comes back from a freeze, is a new one).
    case nodeUp(ClusterMember)
    /// A node left the cluster, and why: it left gracefully, or it died (its process ended, it froze or was cut off
    /// past its lease, or its session was killed), or its row was removed by hand.
    case nodeDown(ClusterMember, reason: NodeDownReason)

    /// The member that joined or left.
    public var member: ClusterMember {
        switch self {
        case .nodeUp(let member), .nodeDown(let member, _): member
        }
    }
}

/// Why a node left the cluster (``ClusterChange/nodeDown(_:reason:)``).
public struct NodeDownReason: Sendable, Hashable, CustomStringConvertible {
    private enum Base: String, Sendable, Hashable {
        case left
        case died
        case removed
    }

    private let base: Base
    private init(_ base: Base) { self.base = base }

    /// The node stopped gracefully: it handed its elections over, then deleted its row.
    public static let left = NodeDownReason(.left)
    /// The node's node lock was gone — its witness session ended: the process died, it froze or was cut off from
    /// PostgreSQL past its lease, or an administrator ended its session — and a sweep removed its row. A node that
    /// comes back from a freeze joins again as a new incarnation (``ClusterChange/nodeUp(_:)``).
    public static let died = NodeDownReason(.died)
    /// The node's row was deleted by something other than Stoker (an administrator's `DELETE`), or a server whose
    /// schema predates the reason sent the change.
    public static let removed = NodeDownReason(.removed)

    /// `left`, `died` or `removed`.
    public var description: String { base.rawValue }

    /// The reason a notification names (`nil` for a name this version does not know).
    init?(name: String) {
        guard let base = Base(rawValue: name) else { return nil }
        self.base = base
    }
}

/// One node of a cluster: one incarnation of a process (a reconnect is a new `id`, same `name`).
public struct ClusterMember: Sendable, Hashable, CustomStringConvertible {
    /// The incarnation's row id in the nodes table.
    public var id: Int
    /// The node's name (``StokerNode/Configuration/nodeName``).
    public var name: String

    public init(id: Int, name: String) {
        self.id = id
        self.name = name
    }

    public var description: String { "\(name)#\(id)" }
}

/// Why a leader stopped leading without being asked to.
public struct DemotionReason: Sendable, Hashable, CustomStringConvertible {
    private enum Base: String, Sendable, Hashable {
        case leaseExpired = "lease_expired"
        case connectionLost = "connection_lost"
    }

    private let base: Base
    private init(_ base: Base) { self.base = base }

    /// No reply from PostgreSQL confirmed the session within `lease − margin` (a partition, a stuck statement, a
    /// frozen process): the node stepped down before the server could release its lock, then reconnected.
    public static let leaseExpired = DemotionReason(.leaseExpired)
    /// The session ended: PostgreSQL restarted or ended it (`pg_terminate_backend`, a timeout) or the network broke.
    public static let connectionLost = DemotionReason(.connectionLost)

    /// `lease_expired` or `connection_lost`: the one name logs, metrics and `stoker node` use.
    public var description: String { base.rawValue }
}

/// Why an activator stopped.
public struct ShutdownReason: Sendable, Hashable, CustomStringConvertible {
    private enum Base: String, Sendable, Hashable {
        case gracefulShutdown = "graceful_shutdown"
        case cancelled
        case nodeStopped = "node_stopped"
    }

    private let base: Base
    private init(_ base: Base) { self.base = base }

    /// A graceful shutdown (swift-service-lifecycle): the election was handed over, the lock released.
    public static let gracefulShutdown = ShutdownReason(.gracefulShutdown)
    /// The activator's or the node's task was cancelled: a hard stop; the server releases what was held.
    public static let cancelled = ShutdownReason(.cancelled)
    /// The node stopped first (it was shut down, or it failed with an error it cannot recover from).
    public static let nodeStopped = ShutdownReason(.nodeStopped)

    /// `graceful_shutdown`, `cancelled` or `node_stopped`: the one name logs and `stoker node` use.
    public var description: String { base.rawValue }
}

/// A node's role in an election, as ``ActivatorSnapshot`` reports it (the `state` field of the Elixir library
/// `stoker`).
public enum ActivatorRole: String, Sendable, Hashable {
    /// Not known yet: the node has not joined, or the activator has not heard from it.
    case unknown
    case leader
    case follower
    /// Leading, but the last ``StokerBehaviour/clusterValid(_:)`` answered `.clusterSplit`.
    case split
    /// The activator has stopped.
    case stopped
}
