import Logging
import ServiceLifecycle
import StokerHarness
import Synchronization
import Testing

@_spi(Testing) @testable import Stoker

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One callback as a behaviour saw it.
struct HistoryEntry: Sendable, CustomStringConvertible {
    enum Kind: String, Sendable {
        case nowLeader, nowFollower, clusterChange, clusterSplit, timer, trigger, shutdown
    }

    /// When the callback started (monotonic).
    let at: ContinuousClock.Instant
    let node: String
    let election: String
    let kind: Kind
    let event: ActivatorEvent
    /// The term of the leadership the event belongs to.
    let term: Int64?
    /// On a demotion: when leadership ended.
    let endedAt: ContinuousClock.Instant?
    /// Whether `context.isLeader` held when the callback started.
    let isLeaderAtStart: Bool

    var isDemotion: Bool { endedAt != nil }

    var description: String { "\(node)/\(election) \(event) term=\(term.map(String.init) ?? "-")" }
}

/// The history checker: every callback of every node, in one monotonic timeline, and the election's guarantees
/// asserted over it (see ``check(complete:sourceLocation:)``).
final class History: Sendable {
    private struct Waiter {
        let predicate: @Sendable ([HistoryEntry]) -> Bool
        let continuation: CheckedContinuation<Void, Never>
    }

    private let state = Mutex<(entries: [HistoryEntry], waiters: [UInt64: Waiter], next: UInt64)>(([], [:], 0))

    var entries: [HistoryEntry] { state.withLock { $0.entries } }

    func record(_ entry: HistoryEntry) {
        let ready: [CheckedContinuation<Void, Never>] = state.withLock { state in
            state.entries.append(entry)
            var ready: [CheckedContinuation<Void, Never>] = []
            for (id, waiter) in state.waiters where waiter.predicate(state.entries) {
                ready.append(waiter.continuation)
                state.waiters[id] = nil
            }
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    /// Waits until `predicate` holds over the history — woken by each new entry, never by polling. Fails loudly
    /// after `timeout` (a generous bound, not a measurement).
    func wait(
        _ what: String,
        timeout: Duration = .seconds(60),
        sourceLocation: SourceLocation = #_sourceLocation,
        until predicate: @escaping @Sendable ([HistoryEntry]) -> Bool
    ) async throws {
        let id = state.withLock { state in
            state.next += 1
            return state.next
        }
        let satisfied = try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let now = self.state.withLock { state -> Bool in
                        if predicate(state.entries) { return true }
                        state.waiters[id] = Waiter(predicate: predicate, continuation: continuation)
                        return false
                    }
                    if now { continuation.resume() }
                }
                return true
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return false
            }
            let first = try await group.next() ?? false
            if !first {
                // Timed out: release the waiter so its task can end.
                let waiter = self.state.withLock { $0.waiters.removeValue(forKey: id) }
                waiter?.continuation.resume()
            }
            group.cancelAll()
            return first
        }
        if !satisfied {
            Issue.record(
                "timed out after \(timeout) waiting until \(what); history:\n\(self.dump())",
                sourceLocation: sourceLocation)
            throw TimedOut(what: what)
        }
    }

    struct TimedOut: Error { let what: String }

    func dump() -> String {
        guard let origin = entries.first?.at else { return "(empty)" }
        return entries.map { entry in
            let at = origin.duration(to: entry.at)
            let ended = entry.endedAt.map { " ended=\(origin.duration(to: $0))" } ?? ""
            return "  +\(at) \(entry)\(ended)"
        }.joined(separator: "\n")
    }

    /// The node currently leading `election` per the history (its last leadership not yet ended), if any.
    static func leaders(_ entries: [HistoryEntry], election: String) -> [String] {
        var leading: Set<String> = []
        for entry in entries where entry.election == election {
            if entry.kind == .nowLeader { leading.insert(entry.node) }
            if entry.isDemotion { leading.remove(entry.node) }
        }
        return leading.sorted()
    }

    static func count(_ entries: [HistoryEntry], _ kind: HistoryEntry.Kind, node: String? = nil) -> Int {
        entries.filter { $0.kind == kind && (node == nil || $0.node == node) }.count
    }

    /// Never two leaders at once, and no leadership without its demotion, over the whole history:
    /// - per election, no two leaderships overlap: each runs from its `nowLeader` callback's start to the instant its
    ///   demotion says it ended (open-ended while it lasts), and they are disjoint;
    /// - terms strictly increase, in the order leaderships started;
    /// - on one node, every `nowLeader` is followed by exactly one demotion before the next `nowLeader`, and (when
    ///   `complete`) the last one is followed by one too.
    func check(complete: Bool = false, sourceLocation: SourceLocation = #_sourceLocation) {
        let entries = self.entries
        for election in Set(entries.map(\.election)) {
            var intervals:
                [(node: String, term: Int64, start: ContinuousClock.Instant, end: ContinuousClock.Instant?)] =
                    []
            var open: [String: Int] = [:]
            for entry in entries where entry.election == election {
                if entry.kind == .nowLeader {
                    if open[entry.node] != nil {
                        Issue.record(
                            "\(entry.node) got nowLeader twice without a demotion in \(election)\n\(dump())",
                            sourceLocation: sourceLocation)
                    }
                    open[entry.node] = intervals.count
                    intervals.append((entry.node, entry.term ?? -1, entry.at, nil))
                } else if entry.isDemotion {
                    guard let index = open.removeValue(forKey: entry.node) else {
                        Issue.record(
                            "\(entry.node) got a demotion without leading in \(election)\n\(dump())",
                            sourceLocation: sourceLocation)
                        continue
                    }
                    intervals[index].end = entry.endedAt
                }
            }
            if complete, !open.isEmpty {
                Issue.record(
                    "nowLeader never followed by a demotion or shutdown: \(open.keys.sorted()) in \(election)\n\(dump())",
                    sourceLocation: sourceLocation)
            }
            let ordered = intervals.sorted { $0.start < $1.start }
            for (earlier, later) in zip(ordered, ordered.dropFirst()) {
                if later.term <= earlier.term {
                    let message =
                        "terms do not increase in \(election): \(earlier.node) had \(earlier.term), then "
                        + "\(later.node) \(later.term)\n\(dump())"
                    Issue.record("\(message)", sourceLocation: sourceLocation)
                }
                guard let end = earlier.end else {
                    Issue.record(
                        "two leaders of \(election): \(later.node) started while \(earlier.node) still led\n\(dump())",
                        sourceLocation: sourceLocation)
                    continue
                }
                if later.start < end {
                    let message =
                        "two leaders of \(election) for \(later.start.duration(to: end)): \(earlier.node) ended "
                        + "after \(later.node) started\n\(dump())"
                    Issue.record("\(message)", sourceLocation: sourceLocation)
                }
            }
        }
    }
}

/// The behaviour the tests run: it records every callback into the shared history (and its own state, as the tests
/// of the Elixir library `stoker` did) and asks for a timer every `timer`.
struct RecordingBehaviour: StokerBehaviour {
    let history: History
    var timer: Duration?
    var validity: ClusterValidity = .yes

    func initialState() -> [ActivatorEvent] { [] }

    func handle(_ event: ActivatorEvent, state: inout [ActivatorEvent], context: ActivatorContext) async throws {
        let at = ContinuousClock.now
        let kind: HistoryEntry.Kind
        switch event {
        case .nowLeader: kind = .nowLeader
        case .nowFollower: kind = .nowFollower
        case .clusterChange: kind = .clusterChange
        case .clusterSplit: kind = .clusterSplit
        case .timer: kind = .timer
        case .trigger: kind = .trigger
        case .shutdown: kind = .shutdown
        }
        history.record(
            HistoryEntry(
                at: at, node: context.node, election: context.election, kind: kind, event: event, term: context.term,
                endedAt: context.leadershipEndedAt, isLeaderAtStart: context.isLeader))
        state.append(event)
    }

    func nextTimer(_ state: [ActivatorEvent]) -> Duration? { timer }

    func clusterValid(_ state: [ActivatorEvent]) -> ClusterValidity { validity }
}

/// A logger for tests: silent unless STOKER_TEST_LOG is set.
func testLogger(_ label: String) -> Logger {
    if getenv("STOKER_TEST_LOG") != nil {
        var logger = Logger(label: label, factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .debug
        return logger
    }
    return Logger(label: label, factory: { _ in SwiftLogNoOpLogHandler() })
}

/// One node and its activators, run by a `ServiceGroup` in a task, as an application would.
final class TestNode: Sendable {
    let name: String
    let node: StokerNode
    let activators: [Activator<RecordingBehaviour>]
    private let group: ServiceGroup
    private let task: Task<Void, any Error>

    /// Short timings so faults resolve quickly; the properties checked do not depend on them.
    static func configuration(_ database: TestDatabase, cluster: String, name: String) -> StokerNode.Configuration {
        var configuration = StokerNode.Configuration(connection: database.conninfo, cluster: cluster, nodeName: name)
        configuration.lease = .seconds(2)
        configuration.retryInterval = .milliseconds(50)
        configuration.reconnectDelay = .milliseconds(50)
        configuration.maximumReconnectDelay = .milliseconds(500)
        return configuration
    }

    /// For tests that check exact event sequences and wait for no lease: a lease far above any stall of a loaded test
    /// host (seen: several seconds in a parallel suite with a busy loop per core). Under the 2 s lease such a stall
    /// loses a session — a legitimate re-join, reported as a new incarnation's `node_down` and `node_up`, and a lease
    /// expiry as a demotion — which changes the sequence those tests expect.
    static func steady(_ configuration: inout StokerNode.Configuration) { configuration.lease = .seconds(30) }

    init(
        _ name: String,
        database: TestDatabase,
        cluster: String = "test",
        elections: [String],
        history: History,
        timer: Duration? = nil,
        validity: ClusterValidity = .yes,
        configure: (inout StokerNode.Configuration) -> Void = { _ in }
    ) throws {
        var configuration = Self.configuration(database, cluster: cluster, name: name)
        configure(&configuration)
        let logger = testLogger("stoker.\(name)")
        let node = try StokerNode(configuration: configuration, logger: logger)
        let behaviour = RecordingBehaviour(history: history, timer: timer, validity: validity)
        let activators = try elections.map { try Activator(election: $0, node: node, behaviour: behaviour) }
        self.name = name
        self.node = node
        self.activators = activators
        let group = ServiceGroup(
            configuration: .init(services: [node] + activators.map { $0 as any Service }, logger: logger))
        self.group = group
        task = Task { try await group.run() }
    }

    /// Graceful shutdown (as SIGTERM would): activators hand over, then the node leaves. Waits until done.
    func stop() async throws {
        await group.triggerGracefulShutdown()
        try await task.value
    }

    /// A crash, as far as one process can show it: the node's and activators' tasks are cancelled — leadership ends
    /// at once, the session is cut without a goodbye, the loop is gone.
    func crash() async {
        task.cancel()
        _ = try? await task.value
    }

    /// Waits for the group to end (it may have stopped by itself) and returns its error, if any.
    func result() async -> (any Error)? {
        do {
            try await task.value
            return nil
        } catch {
            return error
        }
    }

    deinit { task.cancel() }
}

/// Runs `body` with nodes it creates through `make`, and crashes whatever is still running afterwards, so a failing
/// test never leaves a node behind.
final class Nodes: Sendable {
    private let nodes = Mutex<[TestNode]>([])

    func add(_ node: TestNode) -> TestNode {
        nodes.withLock { $0.append(node) }
        return node
    }

    func crashAll() async {
        for node in nodes.withLock({ $0 }) { await node.crash() }
    }
}

/// Runs `body` with a fresh ``Nodes``; on failure, crashes every node it created before rethrowing, so a failing test
/// leaves no node running.
func withNodes<T>(_ body: (Nodes) async throws -> T) async throws -> T {
    let nodes = Nodes()
    do {
        return try await body(nodes)
    } catch {
        await nodes.crashAll()
        throw error
    }
}

/// The leader of `election` according to `pg_locks` (through `whereis`), from a separate session.
func whereis(_ election: String, cluster: String = "test", in database: TestDatabase) async throws -> StokerNode.Leader?
{
    try await StokerNode.whereis(election: election, cluster: cluster, connection: database.conninfo)
}

/// How many sessions hold the advisory lock of `election`, straight from `pg_locks`.
func lockHolders(_ election: String, cluster: String = "test", in database: TestDatabase) async throws -> Int {
    let rows = try await database.admin(
        """
        SELECT count(*) FROM pg_locks l
          JOIN stoker.elections e ON l.objid = (-e.id)::oid
          JOIN stoker.clusters c ON c.id = e.cluster_id
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.classid = (SELECT oid FROM pg_namespace WHERE nspname = 'stoker')
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND c.name = '\(cluster)' AND e.name = '\(election)'
        """)
    return Int(rows.first?.first.flatMap { $0 } ?? "0") ?? 0
}

extension TestDatabase {
    /// An administrator's `pg_terminate_backend` of `node`'s current session (the node must be joined).
    func terminateSession(of node: StokerNode, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let pid = try #require(node.backendPID, "the node has no session", sourceLocation: sourceLocation)
        _ = try await admin("SELECT pg_terminate_backend(\(pid))")
    }
}
