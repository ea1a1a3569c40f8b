import Synchronization

/// The client side of the lease (the server enforces its side with its idle and statement timeouts): the instant
/// until which this node may act as a leader.
///
/// Written by the session thread each time a reply confirms the session (`send time of that query + lease − margin`)
/// and cleared when the session ends; read lock-free by ``ActivatorContext/isLeader`` and by the watchdog. The
/// server's idle timer starts only once it has finished that query, so the server can release the node's locks no
/// sooner than `margin` after this deadline.
final class LeaseClock: Sendable {
    /// Every instant is stored as nanoseconds since `base`, so it fits an atomic.
    let base: ContinuousClock.Instant
    private let deadline = Atomic<Int64>(.min)
    private let revoked = Atomic<Bool>(false)

    init() { base = .now }

    func nanoseconds(_ instant: ContinuousClock.Instant) -> Int64 { base.duration(to: instant).nanoseconds }
    func instant(_ nanoseconds: Int64) -> ContinuousClock.Instant { base + .nanoseconds(nanoseconds) }

    /// The current deadline, while the session is confirmed and not over.
    var currentDeadline: ContinuousClock.Instant? {
        revoked.load(ordering: .acquiring) ? nil : lastDeadline
    }

    /// The last deadline the session reached, also after it ended: no leadership of this session lasted past it.
    var lastDeadline: ContinuousClock.Instant? {
        let value = deadline.load(ordering: .acquiring)
        return value == .min ? nil : instant(value)
    }

    /// Is the lease valid at `now`?
    func isValid(at now: ContinuousClock.Instant = .now) -> Bool {
        !revoked.load(ordering: .acquiring) && nanoseconds(now) < deadline.load(ordering: .acquiring)
    }

    /// Moves the deadline later (never earlier).
    func extend(to instant: ContinuousClock.Instant) {
        let value = nanoseconds(instant)
        var current = deadline.load(ordering: .acquiring)
        while value > current {
            let (exchanged, original) = deadline.compareExchange(
                expected: current, desired: value, ordering: .acquiringAndReleasing)
            if exchanged { return }
            current = original
        }
    }

    /// No lease any more: the session ended. Final.
    func revoke() { revoked.store(true, ordering: .releasing) }
}

/// One leadership of one election on this node: from the term bump to the demotion.
///
/// Created by the session thread when leadership begins and ended — once — by whoever sees it end first (the session
/// thread, the lease watchdog, a resignation, a hard stop). Ending it flips what ``isLeader`` reads and cancels every
/// task started through ``spawn(_:)``; the demotion callback is queued only after that.
final class LeaderScope: Sendable {
    let term: Int64
    let election: String
    /// The node's incarnation (nodes row id) whose session holds this leadership.
    let incarnation: Int
    let metrics: ElectionMetrics
    /// The lease clock of the session this leadership belongs to (a new session has a new clock).
    let lease: LeaseClock

    private struct State {
        var endedAt: ContinuousClock.Instant?
        var tasks: [UInt64: Task<Void, Never>] = [:]
        var nextID: UInt64 = 0
    }

    private let state = Mutex(State())

    init(term: Int64, election: String, incarnation: Int, metrics: ElectionMetrics, lease: LeaseClock) {
        self.term = term
        self.election = election
        self.incarnation = incarnation
        self.metrics = metrics
        self.lease = lease
    }

    /// Leading: begun, not ended, and the lease clock still valid (not a cached flag: a frozen watchdog cannot make it
    /// lie).
    var isLeader: Bool {
        state.withLock { $0.endedAt == nil } && lease.isValid()
    }

    var endedAt: ContinuousClock.Instant? { state.withLock { $0.endedAt } }

    /// Ends the leadership at `instant` and cancels its tasks. Only the first call counts; returns whether it was it.
    @discardableResult
    ///
    /// The instant is never later than the session's last lease deadline: `isLeader` was already false from there,
    /// so a thread that only got to run later (after a freeze) still records when leadership really ended.
    ///
    /// Every caller — not only the first — cancels the tasks before returning, so whoever goes on to let the lock
    /// go knows the work has been told to stop (`Task.cancel` is idempotent).
    func end(at instant: ContinuousClock.Instant) -> Bool {
        let ended = lease.lastDeadline.map { min(instant, $0) } ?? instant
        let (first, tasks) = state.withLock { state in
            let first = state.endedAt == nil
            if first { state.endedAt = ended }
            return (first, Array(state.tasks.values))
        }
        // Outside the lock: cancellation handlers run synchronously here and may read `isLeader`.
        for task in tasks { task.cancel() }
        return first
    }

    /// Starts `operation` as a task cancelled when this leadership ends (at once if it already has).
    @discardableResult
    func spawn(_ operation: @escaping @Sendable () async -> Void) -> Task<Void, Never> {
        let (id, ended) = state.withLock { state in
            state.nextID += 1
            return (state.nextID, state.endedAt != nil)
        }
        let task = Task { [weak self] in
            await operation()
            self?.finished(id)
        }
        let stillLeading = state.withLock { state -> Bool in
            guard state.endedAt == nil, !ended else { return false }
            state.tasks[id] = task
            return true
        }
        if !stillLeading { task.cancel() }
        return task
    }

    private func finished(_ id: UInt64) {
        _ = state.withLock { $0.tasks.removeValue(forKey: id) }
    }

    /// Waits until every task started here has finished (call after ``end(at:)``, which cancelled them).
    func waitForTasks() async {
        while let task = state.withLock({ $0.tasks.values.first }) {
            await task.value
            // `finished` removed it unless the task was never registered; remove it ourselves either way.
            state.withLock { state in
                if let id = state.tasks.first(where: { $0.value == task })?.key { state.tasks.removeValue(forKey: id) }
            }
        }
    }
}
