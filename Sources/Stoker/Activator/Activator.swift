import Logging
import ServiceLifecycle
import Synchronization

/// Keeps one election's ``StokerBehaviour`` running on this process — the `Stoker.Activator` GenServer of the Elixir
/// library `stoker`.
///
/// Start one per election per process, on the process's ``StokerNode``; across all processes of the cluster exactly
/// one of them leads. A swift-service-lifecycle `Service`:
///
/// - its callbacks run one at a time, in the order things happened (a mailbox); a callback that throws is logged at
///   `error` and the activator goes on;
/// - **graceful shutdown** hands the election over: leadership ends (leader tasks are cancelled, and awaited), the
///   lock is released, then ``ActivatorEvent/shutdown(reason:)`` is the last callback;
/// - **cancellation** is a hard stop: leadership ends at once (leader tasks are cancelled, not awaited), then the
///   node releases the lock — one round-trip, which `run()` waits for — and `shutdown` is the last callback.
///
/// The fields of that GenServer's state, and more, are in ``dump()``.
public final class Activator<Behaviour: StokerBehaviour>: Service, Sendable {
    public let election: String
    public let node: StokerNode
    public let behaviour: Behaviour
    private let logger: Logger
    private let createdAt = ContinuousClock.now
    private let snapshot: Mutex<ActivatorSnapshot<Behaviour.State>>
    private let started = Atomic<Bool>(false)

    /// - Throws: ``StokerError/Code/invalidConfiguration`` for an empty election name, one over 255 bytes or holding a
    ///   NUL byte.
    public init(election: String, node: StokerNode, behaviour: Behaviour, logger: Logger? = nil) throws(StokerError) {
        try StokerNode.Configuration.validateName(election, kind: "election name")
        self.election = election
        self.node = node
        self.behaviour = behaviour
        self.logger = logger ?? node.core.logger
        snapshot = Mutex(
            ActivatorSnapshot(
                behaviourState: nil, role: .unknown, node: node.configuration.nodeName, election: election,
                createdAt: createdAt, activeFrom: nil, leader: nil, term: nil, nextTimer: nil))
    }

    /// What the activator knows now (the Elixir library's `dump/1`): the behaviour's state, the role, the leader, the
    /// term.
    public func dump() -> ActivatorSnapshot<Behaviour.State> {
        snapshot.withLock { $0 }
    }

    /// Runs until graceful shutdown, cancellation, or the node stopping. May be called once.
    ///
    /// - Throws: ``StokerError/Code/invalidConfiguration`` when another activator of this election already runs on
    ///   the node, or when this activator was run before; whatever ``StokerBehaviour/initialState()`` throws (the
    ///   election is then withdrawn); the node's own error when the node stopped with one (after the `shutdown`
    ///   callback).
    public func run() async throws {
        guard started.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else {
            throw StokerError(
                .invalidConfiguration,
                "Activator.run() was called twice for election \"\(election)\"; create a new Activator instead.")
        }
        let core = node.core
        let (mailbox, inbox) = try core.register(election)
        let state: Behaviour.State
        do {
            state = try await behaviour.initialState()
        } catch {
            _ = await core.resign(election, drain: false)
            throw error
        }
        var run = Run(state: state)
        publish(run)
        await withDiscardingTaskGroup { timers in
            schedule(&run, inbox: inbox, in: &timers)
            await withTaskCancellationHandler {
                await withGracefulShutdownHandler {
                    for await message in mailbox {
                        if await receive(message, &run, inbox: inbox, timers: &timers) { break }
                    }
                } onGracefulShutdown: {
                    inbox.yield(.gracefulShutdown)
                }
            } onCancel: {
                inbox.finish()
            }
            timers.cancelAll()
        }
        if !run.stopped {
            // Cancelled: a hard stop. Leadership ends now; the node releases the lock without waiting for leader work.
            _ = await core.resign(election, drain: false)
            await deliver(.shutdown(reason: .cancelled), &run, endedAt: endLeadership(run))
            run.stopped = true
            run.role = .stopped
            publish(run)
        }
        // The node stopped with an error it cannot recover from: this activator fails with the same error, so a
        // `ServiceGroup` reports it whichever of the two ends first (not "a service finished unexpectedly").
        if run.stoppedByNode, let failure = core.failure { throw failure }
    }

    /// Everything one run of the activator keeps between messages.
    private struct Run {
        var state: Behaviour.State
        var role = ActivatorRole.unknown
        var scope: LeaderScope?
        /// While leading: the members, from the list at `nowLeader` and every change since.
        var members: [ClusterMember] = []
        var leader: String?
        var activeFrom: ContinuousClock.Instant?
        var timerGeneration: UInt64 = 0
        var nextTimer: Duration?
        var stopped = false
        /// The node ended this activator (it stopped first), rather than a shutdown of the activator itself.
        var stoppedByNode = false
    }

    /// Handles one message; returns `true` when the activator is done.
    private func receive(
        _ message: ActivatorMessage,
        _ run: inout Run,
        inbox: AsyncStream<ActivatorMessage>.Continuation,
        timers: inout DiscardingTaskGroup
    ) async -> Bool {
        defer { publish(run) }
        switch message {
        case .leader(let scope, let members):
            // Already over (lost, or its lease ran out, while earlier callbacks ran): never start work for it. Its
            // demotion, next in the mailbox, is skipped too.
            guard scope.isLeader else { return false }
            run.scope = scope
            run.members = members
            run.role = .leader
            run.leader = node.configuration.nodeName
            run.activeFrom = .now
            await deliver(.nowLeader(term: scope.term), &run, endedAt: nil)
        case .demoted(let reason, let endedAt):
            guard run.scope != nil else { return false }
            run.role = .follower
            run.leader = nil
            run.activeFrom = nil
            await deliver(.nowFollower(leader: nil, reason: reason), &run, endedAt: endedAt)
            run.scope = nil
            run.members = []
        case .member(let change):
            guard let scope = run.scope, scope.endedAt == nil else { return false }
            // The list changes whatever clusterValid answers: it is what the cluster is.
            switch change {
            case .nodeUp(let member):
                run.members.removeAll { $0.id == member.id }
                run.members.append(member)
                run.members.sort { $0.id < $1.id }
            case .nodeDown(let member, _):
                run.members.removeAll { $0.id == member.id }
            }
            switch behaviour.clusterValid(run.state) {
            case .yes:
                run.role = .leader
                await deliver(.clusterChange(change), &run, endedAt: nil)
            case .clusterSplit:
                run.role = .split
                await deliver(.clusterSplit(change), &run, endedAt: nil)
            case .no:
                break
            }
        case .trigger(let scope, let payload, let sequence):
            // For a leadership that is over (or another one): left in the table for the next leader.
            guard run.scope === scope, scope.isLeader else {
                node.core.triggerDone(election, sequence: sequence, handled: false)
                return false
            }
            let returned = await deliver(.trigger(payload: payload, sequence: sequence), &run, endedAt: nil)
            // Handled — the callback returned, without throwing, while the leadership went on — it is deleted.
            // Otherwise it stays for the next leadership (at least once).
            node.core.triggerDone(election, sequence: sequence, handled: returned && scope.isLeader)
        case .leaderObserved(let name):
            guard run.scope == nil else { return false }
            // A follower says whom it follows (it has no callback to run until it leads; silence looks hung).
            if let name, name != run.leader {
                logger.notice("following", metadata: ["stoker.election": "\(election)", "stoker.leader": "\(name)"])
            }
            run.leader = name
            if run.role == .unknown { run.role = .follower }
        case .timerFired(let generation):
            guard generation == run.timerGeneration else { return false }
            await deliver(.timer, &run, endedAt: nil)
            schedule(&run, inbox: inbox, in: &timers)
        case .gracefulShutdown:
            _ = await node.core.resign(election, drain: true)
            await deliver(.shutdown(reason: .gracefulShutdown), &run, endedAt: endLeadership(run))
            run.stopped = true
            run.role = .stopped
            run.scope = nil
            return true
        case .stopped(let reason, _):
            await deliver(.shutdown(reason: reason), &run, endedAt: endLeadership(run))
            run.stoppedByNode = true
            run.stopped = true
            run.role = .stopped
            run.scope = nil
            return true
        }
        return false
    }

    /// On the last event: when the leadership this behaviour saw (``Run/scope``) ended — never another one's instant.
    /// The node has ended it by now; ending it here too (idempotent) only guarantees `shutdown` is a demotion.
    private func endLeadership(_ run: Run) -> ContinuousClock.Instant? {
        guard let scope = run.scope else { return nil }
        scope.end(at: .now)
        return scope.endedAt
    }

    /// Calls the behaviour. A throw is logged, never fatal. Returns whether the callback returned without throwing.
    @discardableResult
    private func deliver(_ event: ActivatorEvent, _ run: inout Run, endedAt: ContinuousClock.Instant?) async -> Bool {
        // The role, leader and term are visible in dump() while the callback runs; its state once it returned.
        publish(run)
        let context = ActivatorContext(
            cluster: node.configuration.cluster,
            election: election,
            node: node.configuration.nodeName,
            members: run.members,
            incarnation: run.scope?.incarnation ?? node.member?.id,
            scope: run.scope,
            leadershipEndedAt: endedAt,
            logger: logger
        )
        do {
            try await behaviour.handle(event, state: &run.state, context: context)
            return true
        } catch {
            logger.error(
                "the behaviour's callback threw; the activator goes on",
                metadata: [
                    "stoker.election": "\(election)", "stoker.event": "\(Self.logged(event))",
                    "stoker.error": "\(error)",
                ])
            return false
        }
    }

    /// An event as logged: a trigger without its payload (application data, which may be anything).
    private static func logged(_ event: ActivatorEvent) -> String {
        if case .trigger(_, let sequence) = event { return "trigger(sequence: \(sequence))" }
        return "\(event)"
    }

    private func schedule(
        _ run: inout Run,
        inbox: AsyncStream<ActivatorMessage>.Continuation,
        in timers: inout DiscardingTaskGroup
    ) {
        run.timerGeneration += 1
        run.nextTimer = behaviour.nextTimer(run.state)
        guard let delay = run.nextTimer else { return }
        let generation = run.timerGeneration
        timers.addTask {
            do {
                try await Task.sleep(for: delay)
                inbox.yield(.timerFired(generation))
            } catch {}
        }
    }

    private func publish(_ run: Run) {
        let term = run.scope.flatMap { $0.endedAt == nil ? $0.term : nil }
        let value = ActivatorSnapshot(
            behaviourState: run.state, role: run.role, node: node.configuration.nodeName, election: election,
            createdAt: createdAt, activeFrom: run.activeFrom, leader: run.leader, term: term,
            nextTimer: run.nextTimer)
        snapshot.withLock { $0 = value }
    }
}

/// A `Sendable` picture of an activator (the Elixir library's `dump/1`).
public struct ActivatorSnapshot<State: Sendable>: Sendable {
    /// The behaviour's state after the last callback (`nil` before ``StokerBehaviour/initialState()`` returned).
    public var behaviourState: State?
    public var role: ActivatorRole
    /// This node's name.
    public var node: String
    public var election: String
    /// When the activator was created (even if never leader).
    public var createdAt: ContinuousClock.Instant
    /// When this node became leader, while it leads.
    public var activeFrom: ContinuousClock.Instant?
    /// The leading node's name, when known (this node's own while it leads).
    public var leader: String?
    /// The term this node leads with, while it leads.
    public var term: Int64?
    /// The delay of the timer last asked for by ``StokerBehaviour/nextTimer(_:)``.
    public var nextTimer: Duration?
}

/// What a callback may know and do besides its event.
public struct ActivatorContext: Sendable {
    /// The cluster (``StokerNode/Configuration/cluster``): what the fence needs besides the election and the term.
    public let cluster: String
    public let election: String
    /// This node's name.
    public let node: String
    /// While this node leads: the cluster's members (this node included), by incarnation — the list when the
    /// leadership began, changed by every ``ActivatorEvent/clusterChange(_:)`` or ``ActivatorEvent/clusterSplit(_:)``
    /// since (already applied when that event is handled). Empty when this node does not lead.
    public let members: [ClusterMember]
    /// The node's incarnation (its row id in the nodes table; a reconnect is a new one) this event belongs to: on
    /// ``ActivatorEvent/nowLeader(term:)`` and on the demotion that ends it, the incarnation that led; on other
    /// events the node's current one (`nil` while it is not joined).
    public let incarnation: Int?
    let scope: LeaderScope?
    /// On a demotion (``ActivatorEvent/nowFollower(leader:reason:)``, or ``ActivatorEvent/shutdown(reason:)`` after
    /// leading): the instant leadership ended — for a lost lease, the lease deadline, even when the callback runs
    /// later. `nil` on other events.
    public let leadershipEndedAt: ContinuousClock.Instant?
    public let logger: Logger

    init(
        cluster: String,
        election: String,
        node: String,
        members: [ClusterMember],
        incarnation: Int?,
        scope: LeaderScope?,
        leadershipEndedAt: ContinuousClock.Instant?,
        logger: Logger
    ) {
        self.cluster = cluster
        self.election = election
        self.node = node
        self.members = members
        self.incarnation = incarnation
        self.scope = scope
        self.leadershipEndedAt = leadershipEndedAt
        self.logger = logger
    }

    /// The term of this node's leadership (current, or just ended on a demotion); `nil` when it has none.
    public var term: Int64? { scope?.term }

    /// Whether this node leads the election *now*: the leadership has not ended and the lease clock is still valid.
    /// Read on every call — it turns `false` at the lease deadline even if nothing else has run since.
    public var isLeader: Bool { scope?.isLeader ?? false }

    /// Starts `operation` in a task that is cancelled when this leadership ends — before the lock can be released.
    /// A graceful hand-over also waits for it to finish before releasing the lock. Returns `nil` (and runs nothing)
    /// when this node does not lead.
    @discardableResult
    public func leaderTask(_ operation: @escaping @Sendable () async -> Void) -> Task<Void, Never>? {
        guard let scope, scope.isLeader else { return nil }
        return scope.spawn(operation)
    }
}
