import CStokerLibPQ
import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// What the node tells one activator, in the order it happened.
enum ActivatorMessage: Sendable {
    /// This node leads (the term bump committed).
    case leader(LeaderScope)
    /// Leadership ended without a resignation, at `endedAt` (leader work already cancelled).
    case demoted(DemotionReason, endedAt: ContinuousClock.Instant)
    /// A member joined or left (sent while this node leads).
    case member(ClusterChange)
    /// Another node leads (its name), or the election was released (`nil`).
    case leaderObserved(String?)
    /// The node stopped; leadership, if any, ended at `endedAt`. The last message.
    case stopped(ShutdownReason, endedAt: ContinuousClock.Instant?)
    /// The activator's own timer (generation).
    case timerFired(UInt64)
    /// The activator's graceful shutdown began.
    case gracefulShutdown
}

/// The node's machinery, shared by three parties:
///
/// - the **session thread**, the only owner of the `PGconn` (created on it, never leaving it): connects, joins,
///   heartbeats, retries, releases, reads notifications, reconnects;
/// - the **lease watchdog thread**, which ends every leadership at the lease deadline even while the session thread
///   is blocked in libpq, then cuts the socket;
/// - async callers (``StokerNode``, ``Activator``): registration, resignation, stop requests.
///
/// Their shared state is one `Mutex`; each election's role lives in an ``ElectionStateMachine`` inside it, so exactly
/// one party sees each leadership end and announces it.
final class NodeCore: Sendable {
    let configuration: StokerNode.Configuration
    let connection: ConnectionConfiguration
    let logger: Logger
    let metrics: NodeMetrics

    private struct Slot {
        var machine = ElectionStateMachine()
        /// `elections.id`; stable for the database, learnt on the first session.
        var id: Int?
        /// The election row must be looked up on the current session before the node may try its lock.
        var needsSetup = true
        let mailbox: AsyncStream<ActivatorMessage>.Continuation
        let metrics: ElectionMetrics
        var scope: LeaderScope?
        /// A demotion is being announced (between ending the scope and queueing the message): not a candidate.
        var announcing = false
        /// The resignation's leader work has drained: the session thread may release the lock.
        var releaseReady = false
        /// The activator waiting for its resignation to finish.
        var resignWaiter: CheckedContinuation<Void, Never>?
        /// When a resignation ended leadership (for the node-initiated `.stopped`).
        var endedAt: ContinuousClock.Instant?
        /// The node's graceful stop asked the activator to hand the election over.
        var askedToResign = false
        /// The term is bumped and the predecessor did not hand over: what evidence that it stopped is awaited.
        var evidence: AwaitedEvidence?
    }

    /// What a successor waits for before its leadership begins, when its predecessor did not hand over.
    struct AwaitedEvidence: Sendable {
        let term: Int64
        /// The predecessor's node id (incarnation); nil when the election's row was last written on another timeline
        /// (a failover to an asynchronous standby may have lost its last leader): then only the lease counts.
        let predecessor: Int?
        /// The predecessor joined the server this session is on: its node lock, held by its witness, is the evidence
        /// (free once its process is gone or it has ended its leaderships and closed the witness). Otherwise (a
        /// restart or failover ended every session since, or its row is gone): its next incarnation's row naming it,
        /// or its lease surely run out at `leaseRunOut`.
        let sameServer: Bool
        let leaseRunOut: ContinuousClock.Instant
    }

    private enum Phase { case idle, running, exited }
    private enum StopKind { case graceful, hard }

    private struct State {
        var slots: [String: Slot] = [:]
        var phase = Phase.idle
        var stop: StopKind?
        var failure: StokerError?
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
        /// A duplicate of the session's socket while it is open (for the watchdog and hard stop to cut it with
        /// `shutdown(2)`). A duplicate, so that libpq closing its own descriptor on EOF can never make this number
        /// point at a descriptor the application opened since.
        var socket: Int32?
        /// The same, for the witness session.
        var witnessSocket: Int32?
        /// When the last trusted reply of each session was sent (the lease runs from the older of the two).
        var mainConfirmedSent: ContinuousClock.Instant?
        var witnessConfirmedSent: ContinuousClock.Instant?
        /// Generation of the current session (0: none).
        var session: UInt64 = 0
        /// The current session's lease clock: a new one per session, so a leadership of an earlier session can never
        /// read a later session's renewals as its own.
        var lease = LeaseClock()
        /// The session whose lease ran out, and its deadline (the instant its leaderships ended).
        var leaseExpiredSession: UInt64?
        var expiredDeadline: ContinuousClock.Instant?
        /// A hard stop is ending leaderships: no new one may start.
        var halting = false
        /// Scopes taken out of their slot before they were surely ended; the session thread ends them (again,
        /// idempotently) before it lets the session go.
        var ending: [ObjectIdentifier: LeaderScope] = [:]
        var member: ClusterMember?
        var backendPID: Int32?
        var witnessBackendPID: Int32?
        var freeze: Duration?
        var watchdogFreeze: Duration?
        /// Threads held by a test hook right now.
        var holding = 0
        /// Holds of the session thread begun so far (a test waits for one without racing its end).
        var sessionHolds = 0
    }

    private let state = Mutex(State())
    private let wakeDescriptor: Int32
    private let watchdogDescriptor: Int32

    init(
        configuration: StokerNode.Configuration,
        logger: Logger,
        metrics: NodeMetrics
    ) throws(StokerError) {
        try configuration.validate()
        let connection = try ConnectionConfiguration(configuration.connection)
        try connection.validateValues()
        let lease = configuration.lease
        self.connection = connection.addingDefaults([
            ("connect_timeout", "10", "PGCONNECT_TIMEOUT"),
            ("keepalives", "1", nil),
            // idle + 3 × 1 s ≥ lease: keepalives can never drop a session before its lease (where the server cannot
            // use tcp_user_timeout).
            ("keepalives_idle", "\(max(1, (lease.roundedUpMilliseconds + 999) / 1000))", nil),
            ("keepalives_interval", "1", nil),
            ("keepalives_count", "3", nil),
            ("tcp_user_timeout", "\(lease.roundedUpMilliseconds)", nil),
        ])
        self.configuration = configuration
        self.logger = logger
        self.metrics = metrics
        let wake = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        let watchdog = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wake >= 0, watchdog >= 0 else {
            if wake >= 0 { closeDescriptor(wake) }
            if watchdog >= 0 { closeDescriptor(watchdog) }
            throw StokerError(.connectionFailed, "eventfd(2) failed with errno \(errno).")
        }
        wakeDescriptor = wake
        watchdogDescriptor = watchdog
    }

    deinit {
        // Both threads hold the core while they run: reaching here means they have exited.
        closeDescriptor(wakeDescriptor)
        closeDescriptor(watchdogDescriptor)
    }

    private var metadata: Logger.Metadata {
        ["stoker.cluster": "\(configuration.cluster)", "stoker.node": "\(configuration.nodeName)"]
    }

    // MARK: - Async side

    /// Starts both threads and returns once the session thread has exited; throws the error that stopped it, if any.
    func run() async throws {
        let begin = state.withLock { state -> Bool in
            guard state.phase == .idle else { return false }
            state.phase = .running
            return true
        }
        guard begin else {
            throw StokerError(.invalidConfiguration, "StokerNode.run() was called twice; a node runs once.")
        }
        do {
            // The watchdog first: a session thread must never run unguarded. If the second start fails, `finish`
            // makes the watchdog exit.
            try startThread { self.watchdogThread() }
            try startThread { self.sessionThread() }
        } catch {
            finish(failure: error)
            throw error
        }
        await exited()
        if let failure = state.withLock({ $0.failure }) { throw failure }
    }

    private func exited() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLock { state -> Bool in
                if state.phase == .exited { return true }
                state.exitWaiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
    }

    /// The error the node stopped with, once it has (nil while it runs, or after a clean stop).
    var failure: StokerError? { state.withLock { $0.failure } }

    /// Graceful stop: resign every election (the activators get `shutdown`), leave the cluster, close the session.
    func requestGracefulStop() {
        state.withLock { state in
            if state.stop == nil { state.stop = .graceful }
        }
        wake()
    }

    /// Hard stop (cancellation): leadership ends at once, then the session is cut without a goodbye (the server
    /// releases the locks as for a crash); activators get `shutdown(.cancelled)`.
    func hardStop() {
        // 1. No new leadership from here on; every current one ends (flip + cancel) before the session is cut. The
        //    instant is taken under the lock: no leadership can have started after it.
        let (now, ending) = state.withLock { state in
            state.halting = true
            return (ContinuousClock.now, beginLoss(.sessionLost, in: &state, finishing: .cancelled))
        }
        for (_, scope) in ending { endScope(scope, at: now, reason: "the node was cancelled") }
        // 2. Stop; every scope still around ends (the session thread refuses to start one while halting).
        let (slots, pending): ([Slot], [LeaderScope]) = state.withLock { state in
            state.stop = .hard
            defer { state.slots.removeAll() }
            return (Array(state.slots.values), Array(state.ending.values))
        }
        for scope in slots.compactMap(\.scope) + pending { endScope(scope, at: now, reason: "the node was cancelled") }
        // 3. Only now that no leadership is left: cut both sessions (the server then frees their locks at once).
        state.withLock { state in
            for socket in [state.socket, state.witnessSocket].compactMap({ $0 }) {
                _ = shutdown(socket, Int32(SHUT_RDWR))
            }
        }
        for slot in slots {
            slot.resignWaiter?.resume()
            slot.mailbox.yield(.stopped(.cancelled, endedAt: slot.scope?.endedAt ?? slot.endedAt))
            slot.mailbox.finish()
        }
        wake()
        wakeWatchdog()
    }

    /// Registers the activator of `election`; its messages arrive on the returned stream.
    func register(
        _ election: String
    ) throws(StokerError) -> (AsyncStream<ActivatorMessage>, AsyncStream<ActivatorMessage>.Continuation) {
        let (stream, continuation) = AsyncStream.makeStream(of: ActivatorMessage.self, bufferingPolicy: .unbounded)
        let electionMetrics = metrics.election(election)
        let refusal: StokerError? = state.withLock { state in
            if state.slots[election] != nil {
                return StokerError(
                    .invalidConfiguration,
                    "An activator for election \"\(election)\" is already running on node "
                        + "\"\(configuration.nodeName)\"; run one activator per election per node.")
            }
            if state.phase == .exited || state.stop != nil {
                continuation.yield(.stopped(.nodeStopped, endedAt: nil))
                continuation.finish()
                return nil
            }
            state.slots[election] = Slot(mailbox: continuation, metrics: electionMetrics)
            return nil
        }
        if let refusal { throw refusal }
        wake()
        return (stream, continuation)
    }

    /// Hands the election over and withdraws from it: leadership ends at once (leader work cancelled), then — once
    /// that work has finished, when `drain` — the session thread clears the leader and releases the lock. Returns
    /// when the lock is released (or the session is gone), with the instant leadership ended, if this node led.
    func resign(_ election: String, drain: Bool) async -> ContinuousClock.Instant? {
        enum Step {
            case done(LeaderScope?)
            case release(LeaderScope, ContinuousClock.Instant)
            case wait
        }
        let now = ContinuousClock.now
        let step: Step = state.withLock { state in
            guard var slot = state.slots[election] else { return .done(nil) }
            switch slot.machine.resign() {
            case .finishResignation:
                // A follower — or a leadership a loss is ending right now (its scope is still here): end it too.
                state.slots[election] = nil
                slot.mailbox.finish()
                if let scope = slot.scope { state.ending[ObjectIdentifier(scope)] = scope }
                return .done(slot.scope)
            case .endLeadingAndRelease:
                guard let scope = slot.scope else {
                    // Never began (waiting for evidence): the session thread releases the lock now.
                    slot.releaseReady = true
                    state.slots[election] = slot
                    return .wait
                }
                slot.endedAt = now
                state.slots[election] = slot
                return .release(scope, now)
            default:
                // Acquiring: the session thread finishes the resignation when the bump answers.
                state.slots[election] = slot
                return .wait
            }
        }
        wake()
        switch step {
        case .done(let scope):
            guard let scope else { return nil }
            endScope(scope, at: now, reason: "resigned")
            return scope.endedAt
        case .release(let scope, let endedAt):
            endScope(scope, at: endedAt, reason: "resigned")
            if drain { await scope.waitForTasks() }
            await waitForResignation(election, markReady: true)
            return scope.endedAt ?? endedAt
        case .wait:
            await waitForResignation(election, markReady: false)
            return nil
        }
    }

    private func waitForResignation(_ election: String, markReady: Bool) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let pending = state.withLock { state -> Bool in
                guard var slot = state.slots[election], case .resigning = slot.machine.state else { return false }
                slot.resignWaiter = continuation
                if markReady { slot.releaseReady = true }
                state.slots[election] = slot
                return true
            }
            if pending { wake() } else { continuation.resume() }
        }
    }

    /// Test hook: holds the session thread (the node's loop) for `duration` at its next turn, as a long pause would.
    func freezeLoop(for duration: Duration) {
        state.withLock { $0.freeze = duration }
        wake()
    }

    /// Test hook: holds the session thread and the lease watchdog for `duration`, as a stopped process (SIGSTOP):
    /// nothing of the node runs until both resume. The watchdog resumes 100 ms after the session thread — the worse
    /// order, in which the thread that reads the socket learns of the loss first, well after the lease deadline.
    func freezeThreads(for duration: Duration) {
        state.withLock { state in
            state.freeze = duration
            state.watchdogFreeze = duration + .milliseconds(100)
        }
        wake()
        wakeWatchdog()
    }

    /// Test hook: a freeze is pending or under way.
    var isFrozen: Bool { state.withLock { $0.freeze != nil || $0.watchdogFreeze != nil || $0.holding > 0 } }

    /// Test hook: how many times a freeze has held the session thread so far.
    var sessionHolds: Int { state.withLock { $0.sessionHolds } }

    var member: ClusterMember? { state.withLock { $0.member } }
    var backendPID: Int32? { state.withLock { $0.backendPID } }
    var witnessBackendPID: Int32? { state.withLock { $0.witnessBackendPID } }

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeDescriptor, &one, MemoryLayout<UInt64>.size)
    }

    private func wakeWatchdog() {
        var one: UInt64 = 1
        _ = write(watchdogDescriptor, &one, MemoryLayout<UInt64>.size)
    }

    // MARK: - Ending leadership (any thread)

    /// Ends `scope` at `instant` (flips `isLeader`, cancels leader work) unless it has ended already; counts and logs
    /// the first end only. Never call it holding `state`: cancellation handlers run here.
    private func endScope(_ scope: LeaderScope, at instant: ContinuousClock.Instant, reason: String) {
        guard scope.end(at: instant) else { return }
        scope.metrics.leading(false)
        logger.notice(
            "stepped down",
            metadata: metadata.merging(
                ["stoker.election": "\(scope.election)", "stoker.term": "\(scope.term)", "stoker.reason": "\(reason)"],
                uniquingKeysWith: { $1 }))
    }

    /// First step of a loss (under the lock): every leadership of the node stops counting as one — no longer a
    /// candidate, its demotion being announced — and every scope still in a slot is returned, to be ended outside
    /// the lock. Resignations under way finish (their lock is gone with the session).
    private func beginLoss(
        _ loss: ElectionStateMachine.Loss,
        in state: inout State,
        finishing reason: ShutdownReason
    ) -> [(String, LeaderScope)] {
        var ending: [(String, LeaderScope)] = []
        for name in state.slots.keys {
            guard var slot = state.slots[name] else { continue }
            let action = slot.machine.leadershipLost(loss)
            // A wait for evidence ends with the session: the lock it was for is gone.
            slot.evidence = nil
            if let scope = slot.scope { ending.append((name, scope)) }
            switch action {
            case .endLeading:
                slot.announcing = true
                state.slots[name] = slot
            case .finishResignation:
                state.slots[name] = slot
                finishResignation(name, in: &state, reason: reason)
            default:
                state.slots[name] = slot
            }
        }
        return ending
    }

    /// Last step of a loss: announce each demotion (after its scope ended), clearing the scope from its slot.
    private func announceLoss(_ ending: [(String, LeaderScope)], reason: DemotionReason) {
        state.withLock { state in
            for (name, scope) in ending {
                guard var slot = state.slots[name], slot.scope === scope else { continue }
                slot.scope = nil
                slot.announcing = false
                if let endedAt = scope.endedAt, slot.machine.leadingTerm == nil, case .follower = slot.machine.state {
                    slot.mailbox.yield(.demoted(reason, endedAt: endedAt))
                }
                state.slots[name] = slot
            }
        }
    }

    /// The session `session` ended or its lease ran out: every leadership of this node ends at `instant`, then each
    /// activator is told — in that order, never waiting for the cooperative pool (DESIGN §2.1).
    private func loseAll(_ loss: ElectionStateMachine.Loss, at instant: ContinuousClock.Instant, session: UInt64) {
        let ending: [(String, LeaderScope)] = state.withLock { state in
            guard state.session == session else { return [] }
            return beginLoss(loss, in: &state, finishing: .nodeStopped)
        }
        let reason: DemotionReason = loss == .leaseExpired ? .leaseExpired : .connectionLost
        for (_, scope) in ending { endScope(scope, at: instant, reason: "\(reason)") }
        announceLoss(ending, reason: reason)
    }

    /// Ends (idempotently) every scope still held in a slot — called by the session thread before it lets a session
    /// go, so no leader work outlives the session's locks, whoever else is busy announcing.
    private func endRemainingScopes(at instant: ContinuousClock.Instant) {
        let scopes = state.withLock { state in
            defer { state.ending.removeAll() }
            return state.slots.values.compactMap(\.scope) + state.ending.values
        }
        for scope in scopes { endScope(scope, at: instant, reason: "the session ended") }
    }

    /// A resignation is complete: wake the activator waiting for it, or (node-initiated) tell it the node stopped.
    private func finishResignation(_ name: String, in state: inout State, reason: ShutdownReason) {
        guard let slot = state.slots.removeValue(forKey: name) else { return }
        // Only a scope not yet ended needs tracking (a resignation's has been ended, its tasks cancelled).
        if let scope = slot.scope, scope.endedAt == nil { state.ending[ObjectIdentifier(scope)] = scope }
        if let waiter = slot.resignWaiter {
            waiter.resume()
        } else {
            slot.mailbox.yield(.stopped(reason, endedAt: slot.scope?.endedAt ?? slot.endedAt))
        }
        slot.mailbox.finish()
    }

    // MARK: - The lease watchdog thread

    private func watchdogThread() {
        while true {
            let (exit, deadline, session, freeze) = state.withLock { state in
                defer {
                    if state.watchdogFreeze != nil { state.holding += 1 }
                    state.watchdogFreeze = nil
                }
                return (state.phase == .exited, state.lease.currentDeadline, state.session, state.watchdogFreeze)
            }
            if exit { return }
            if let freeze {
                Self.hold(freeze)
                state.withLock { $0.holding -= 1 }
                continue
            }
            var descriptor = pollfd(fd: watchdogDescriptor, events: Int16(POLLIN), revents: 0)
            let timeout = deadline.map { Int32(clamping: ContinuousClock.now.duration(to: $0).roundedUpMilliseconds) }
            _ = poll(&descriptor, 1, timeout.map { max(0, $0) } ?? -1)
            if descriptor.revents != 0 {
                var counter: UInt64 = 0
                _ = read(watchdogDescriptor, &counter, MemoryLayout<UInt64>.size)
            }
            if let deadline, ContinuousClock.now >= deadline { expireLease(session: session) }
        }
    }

    /// The lease of `session` ran out (checked again under the lock: a reply may just have extended it). Marking the
    /// expiry and taking every leadership out of play happen in one critical section, for that session only.
    private func expireLease(session: UInt64) {
        let expired: (ContinuousClock.Instant, [(String, LeaderScope)])? = state.withLock { state in
            guard state.session == session, state.leaseExpiredSession != session,
                let deadline = state.lease.currentDeadline, ContinuousClock.now >= deadline
            else { return nil }
            state.leaseExpiredSession = session
            state.expiredDeadline = deadline
            return (deadline, beginLoss(.leaseExpired, in: &state, finishing: .nodeStopped))
        }
        guard let (deadline, ending) = expired else { return }
        // Leadership ended at the deadline, whenever this thread got to run: that is what `isLeader` said already.
        for (_, scope) in ending { endScope(scope, at: deadline, reason: "\(DemotionReason.leaseExpired)") }
        // Only then cut both sessions (the server frees the locks at once; the witness's end is the acknowledgement).
        state.withLock { state in
            guard state.session == session else { return }
            for socket in [state.socket, state.witnessSocket].compactMap({ $0 }) {
                _ = shutdown(socket, Int32(SHUT_RDWR))
            }
        }
        announceLoss(ending, reason: .leaseExpired)
        logger.warning(
            "lease expired: no reply confirmed the session in time; reconnecting as a new incarnation",
            metadata: metadata)
        wake()
    }

    // MARK: - The session thread

    private enum SessionEnd {
        case stopped
        case hardStop
        case lost(StokerError)
        case leaseExpired
    }

    private struct LeaseLost: Error {}

    private func sessionThread() {
        var delay = configuration.reconnectDelay
        var joinedOnce = false
        // The last incarnation this node joined as: the next one names it (its acknowledgement that every leadership
        // of that incarnation has ended).
        var lastIncarnation: Int?
        var failure: StokerError?
        while state.withLock({ $0.stop == nil }) {
            if joinedOnce { metrics.reconnects.increment() }
            let end: SessionEnd
            var joined = false
            let started = ContinuousClock.now
            do {
                // Two sessions per node, whatever the number of elections: the main one and its witness.
                let connection = try PGConnection(self.connection)
                let witness = try PGConnection(self.connection)
                var incarnation: Int?
                // Both stay open until `session` has ended every leadership of theirs.
                end = withExtendedLifetime((connection, witness)) {
                    session(
                        connection, witness: witness, replacing: lastIncarnation, joined: &joined,
                        incarnation: &incarnation)
                }
                if let incarnation { lastIncarnation = incarnation }
            } catch {
                end = .lost(error)
            }
            if joined {
                joinedOnce = true
                // A session that joined and then lasted a heartbeat resets the backoff: the next loss starts from the
                // first delay. One that failed right after joining (a statement it may not run, say) keeps backing off.
                if started.duration(to: .now) >= configuration.effectiveHeartbeatInterval {
                    delay = configuration.reconnectDelay
                }
            }
            switch end {
            case .stopped, .hardStop:
                break
            case .leaseExpired:
                delay = configuration.reconnectDelay
                continue
            case .lost(let error):
                if !isRetryable(error, joinedOnce: joinedOnce) {
                    // Not an error line: run() throws this error, and whoever called it reports it (once).
                    logger.notice(
                        "the node stopped: \(error.message)",
                        metadata: metadata.merging(["stoker.error": "\(error)"], uniquingKeysWith: { $1 }))
                    failure = error
                    break
                }
                logger.warning(
                    "session lost; reconnecting in \(delay)",
                    metadata: metadata.merging(["stoker.error": "\(error)"], uniquingKeysWith: { $1 }))
                sleep(jittered(delay))
                delay = min(delay * 2, configuration.maximumReconnectDelay)
                continue
            }
            break
        }
        finish(failure: failure)
    }

    private func finish(failure: StokerError?) {
        let now = ContinuousClock.now
        let (slots, waiters) = state.withLock { state in
            state.phase = .exited
            if state.failure == nil { state.failure = failure }
            defer {
                state.slots.removeAll()
                state.ending.removeAll()
                state.exitWaiters.removeAll()
            }
            return (Array(state.slots.values), state.exitWaiters)
        }
        for slot in slots {
            if let scope = slot.scope { endScope(scope, at: now, reason: "the node stopped") }
            if let waiter = slot.resignWaiter {
                waiter.resume()
            } else {
                slot.mailbox.yield(.stopped(.nodeStopped, endedAt: slot.scope?.endedAt ?? slot.endedAt))
            }
            slot.mailbox.finish()
        }
        wakeWatchdog()
        for waiter in waiters { waiter.resume() }
    }

    /// Errors worth a reconnect: the network, the server going away or timing a statement out. A wrong password, a
    /// missing database or schema, a pooler or an old server will not fix themselves: the node stops with them.
    private func isRetryable(_ error: StokerError, joinedOnce: Bool) -> Bool {
        switch error.code {
        case .queryFailed:
            // A role without the grants it needs (class 42: insufficient_privilege, undefined objects…) or a refused
            // authorization (28) will not fix itself on a first start: stop and say so. Once this node has joined, an
            // administrator may be mid-change: keep trying.
            let errorClass = error.sqlState?.prefix(2)
            return joinedOnce || (errorClass != "42" && errorClass != "28")
        case .connectionFailed, .connectionTimeout, .connectionLost, .unexpectedResult:
            return true
        case .readOnlySession:
            // After a managed failover the old address may briefly reach a standby; at first start it is a mistake.
            return joinedOnce
        default:
            return false
        }
    }

    private func jittered(_ delay: Duration) -> Duration {
        let nanoseconds = max(1, delay.nanoseconds)
        return .nanoseconds(Int64.random(in: nanoseconds / 2...nanoseconds))
    }

    /// Sleeps `duration`, or less when a stop is requested.
    private func sleep(_ duration: Duration) {
        let deadline = ContinuousClock.now + duration
        while state.withLock({ $0.stop == nil }) {
            let remaining = ContinuousClock.now.duration(to: deadline)
            if remaining <= .zero { return }
            var descriptor = pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0)
            _ = poll(&descriptor, 1, Int32(clamping: remaining.roundedUpMilliseconds))
            if descriptor.revents != 0 {
                var counter: UInt64 = 0
                _ = read(wakeDescriptor, &counter, MemoryLayout<UInt64>.size)
            }
        }
    }

    /// One session: join, serve until it ends. Every way out ends this node's leaderships before either connection
    /// is let go — the witness's end is what tells a successor that they have ended.
    private func session(
        _ connection: PGConnection,
        witness: PGConnection,
        replacing: Int?,
        joined: inout Bool,
        incarnation: inout Int?
    ) -> SessionEnd {
        let socket = dup(connection.socket)
        let witnessSocket = dup(witness.socket)
        let started: (UInt64, LeaseClock)? = state.withLock { state in
            guard state.stop == nil else { return nil }
            state.session += 1
            state.lease = LeaseClock()
            state.socket = socket >= 0 ? socket : nil
            state.witnessSocket = witnessSocket >= 0 ? witnessSocket : nil
            state.backendPID = connection.protocolBackendPID
            state.witnessBackendPID = witness.protocolBackendPID
            state.mainConfirmedSent = nil
            state.witnessConfirmedSent = nil
            for name in state.slots.keys { state.slots[name]?.needsSetup = true }
            return (state.session, state.lease)
        }
        defer {
            if socket >= 0 { closeDescriptor(socket) }
            if witnessSocket >= 0 { closeDescriptor(witnessSocket) }
        }
        guard let (generation, lease) = started else { return .stopped }
        var context = SessionContext(
            connection: connection, witness: witness, generation: generation, lease: lease, replaces: replacing)
        let end = run(&context, joined: &joined)
        if context.nodeID != 0 { incarnation = context.nodeID }
        // Whoever else is still announcing a demotion, no leader work of this session outlives it.
        let ended = state.withLock { state in
            state.socket = nil
            state.witnessSocket = nil
            state.member = nil
            state.backendPID = nil
            state.witnessBackendPID = nil
            return state.leaseExpiredSession == generation ? state.expiredDeadline : nil
        }
        endRemainingScopes(at: ended ?? .now)
        lease.revoke()
        return end
    }

    private func run(_ context: inout SessionContext, joined: inout Bool) -> SessionEnd {
        let generation = context.generation
        do {
            try join(&context)
            joined = true
            return try serve(&context)
        } catch {
            // First: end leadership, at once, on the thread that saw the session go (DESIGN §2.1). After a lease
            // expiry it ended at the deadline (the watchdog or `confirmed` has already taken it out of play).
            let now = ContinuousClock.now
            // Past a deadline this session really had (a failure before the first confirmed reply is not a lease
            // expiry: it is judged like any other failure below).
            let pastDeadline = context.lease.lastDeadline.map { now >= $0 } ?? false
            let (expiredAt, hard) = state.withLock { state in
                (state.leaseExpiredSession == generation ? state.expiredDeadline : nil, state.stop == .hard)
            }
            if let expiredAt {
                loseAll(.leaseExpired, at: expiredAt, session: generation)
            } else if error is LeaseLost || pastDeadline {
                // The deadline passed before the watchdog ran (after a freeze, say): it is a lease expiry, and
                // leadership ended at the deadline, not now.
                expireLease(session: generation)
            } else {
                loseAll(.sessionLost, at: now, session: generation)
            }
            if hard { return .hardStop }
            if expiredAt != nil || error is LeaseLost || pastDeadline { return .leaseExpired }
            let failure =
                (error as? StokerError)
                ?? StokerError(.connectionLost, "The node's session failed: \(error)")
            return .lost(failure)
        }
    }

    /// What one session learnt while joining.
    private struct SessionContext {
        let connection: PGConnection
        /// The witness session: holds the node lock, otherwise only heartbeats.
        let witness: PGConnection
        let generation: UInt64
        let lease: LeaseClock
        /// The incarnation this one follows, if any.
        let replaces: Int?
        /// An acknowledgement may have arrived (a member joined): check the awaited evidence again.
        var checkAcknowledgement = true
        /// The election whose waiter token this session holds: it waits in that election's lock queue.
        var waiterToken: Int?
        /// The election whose evidence was awaited last (several take turns).
        var lastAwaited: String?
        /// When the witness's outstanding heartbeat was sent (nil: none outstanding).
        var witnessQuery: ContinuousClock.Instant?
        /// When the witness's next heartbeat is due.
        var nextWitnessBeat = ContinuousClock.now
        /// The longest a lock-queue wait may last: below the server's `deadlock_timeout`.
        var longestWait = Duration.milliseconds(250)
        var statements: ProtocolStatements?
        var clusterID = 0
        var channel = ""
        var nodeID = 0
        /// Members by id, this node included.
        var members: [Int: String] = [:]
    }

    /// Which of the node's two sessions a reply came from.
    private enum Side { case main, witness }

    /// Runs `body` (one or more statements) and, if the reply came in time, renews the lease from its send time.
    /// A reply whose request went out more than `lease − margin` ago is not trusted. The lease runs from the older of
    /// the two sessions' last trusted sends: the server's idle timer can end either, and the witness's end is
    /// evidence for a successor, so neither may end before this node's lease has.
    private func confirmed<T>(
        _ context: SessionContext,
        on side: Side = .main,
        _ body: () throws -> T
    ) throws -> T {
        let sent = ContinuousClock.now
        let value = try body()
        try trust(sent: sent, on: side, context)
        return value
    }

    /// A reply to a request sent at `sent` arrived: renew that session's half of the lease, unless the reply is too
    /// late to be trusted (then the lease is over: throws).
    private func trust(sent: ContinuousClock.Instant, on side: Side, _ context: SessionContext) throws {
        let valid = configuration.lease - configuration.effectiveMargin
        let trusted = state.withLock { state -> Bool in
            guard state.session == context.generation, state.leaseExpiredSession != context.generation,
                state.stop != .hard
            else { return false }
            let now = ContinuousClock.now
            // Neither a reply to a request older than lease − margin, nor any reply once the deadline has passed
            // (even before the watchdog got to run): the lease, once out, stays out.
            guard now < sent + valid else { return false }
            if let deadline = context.lease.currentDeadline, now >= deadline { return false }
            switch side {
            case .main: state.mainConfirmedSent = max(sent, state.mainConfirmedSent ?? sent)
            case .witness: state.witnessConfirmedSent = max(sent, state.witnessConfirmedSent ?? sent)
            }
            if let main = state.mainConfirmedSent, let witness = state.witnessConfirmedSent {
                context.lease.extend(to: min(main, witness) + valid)
            }
            return true
        }
        guard trusted else {
            expireLease(session: context.generation)
            throw LeaseLost()
        }
    }

    private func join(_ context: inout SessionContext) throws {
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
        let quoted = try connection.quoteIdentifier(configuration.schema, kind: "schema name")
        guard
            let namespace = try connection.execute(ProtocolStatements.lockNamespaceQuery, [configuration.schema]).rows
                .first
        else {
            throw StokerError(.schemaMismatch, "The schema \"\(configuration.schema)\" does not exist.")
        }
        let statements = ProtocolStatements(
            schema: configuration.schema, quotedSchema: quoted, lockNamespace: try namespace.int32(0))
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
        // PL/pgSQL compiles a function, and plans its statements, at its first call in a session: 5-7 ms for the term
        // bump's functions, measured. Paid here, not in the middle of a failover.
        try connection.execute(statements.warmUp)
        context.longestWait = max(.milliseconds(1), .milliseconds(deadlockTimeout) * 0.8)
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
        let members = try confirmed(context) { try connection.execute(statements.members, ["\(clusterID)"]).rows }
        for row in members {
            context.members[try row.int(0)] = try row.string(1)
        }
        let member = ClusterMember(id: nodeID, name: configuration.nodeName)
        state.withLock { $0.member = member }
        wakeWatchdog()
        logger.info(
            "joined the cluster",
            metadata: metadata.merging(
                ["stoker.incarnation": "\(nodeID)", "stoker.members": "\(context.members.count)"],
                uniquingKeysWith: { $1 }))
    }

    /// The session settings of both of a node's sessions: the lease's timeouts (the server's idle timer ends a silent
    /// session), keepalives, read committed, commits at least flushed locally.
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

    private func serve(_ context: inout SessionContext) throws -> SessionEnd {
        let connection = context.connection
        guard let statements = context.statements else { return .lost(Self.internalError) }
        let heartbeat = configuration.effectiveHeartbeatInterval
        let retryInterval = configuration.effectiveRetryInterval
        var nextHeartbeat = ContinuousClock.now + heartbeat
        var nextRetry = ContinuousClock.now + retryInterval
        var retryNow = true
        while true {
            try serviceWitness(&context)
            // Nothing is trusted past the lease: the watchdog may already have ended it.
            if state.withLock({ $0.leaseExpiredSession == context.generation }) || !context.lease.isValid() {
                throw LeaseLost()
            }
            switch state.withLock({ $0.stop }) {
            case .hard?:
                return .hardStop
            case .graceful?:
                // Each activator hands its election over itself (awaiting its leader work); the node leaves last.
                let waiting = state.withLock { state -> Bool in
                    for name in state.slots.keys where state.slots[name]?.askedToResign == false {
                        state.slots[name]?.askedToResign = true
                        state.slots[name]?.mailbox.yield(.gracefulShutdown)
                    }
                    return !state.slots.isEmpty
                }
                if !waiting {
                    try leave(&context)
                    return .stopped
                }
            case nil:
                break
            }
            if try setUpElections(context) { retryNow = true }
            try performReleases(context)
            if handle(connection.takeNotifications(), &context) { retryNow = true }

            let (candidates, holdsElection) = state.withLock { state in
                // A stopping node takes no new leadership.
                let candidates =
                    state.stop != nil || state.halting
                    ? []
                    : state.slots.values.compactMap { slot in
                        slot.machine.isCandidate && !slot.announcing && !slot.needsSetup ? slot.id : nil
                    }.sorted()
                let holds = state.slots.values.contains { $0.releaseReady || $0.announcing || $0.machine.mayHoldLock }
                return (candidates, holds)
            }
            // One follower per election — the one holding its waiter token, a follower that leads nothing — spends its
            // time *in* the election's lock queue: the server grants the lock the instant the holder's session ends (a
            // crash, the server ending it, a hand-over). Its notifications wait for each wait to end, which matters
            // little to a node that leads nothing. Every other node keeps its session free for notifications, and
            // retries on them (`released`, a member gone or come) and at `retryInterval`, when a follower also tries to
            // become the waiter of an election that has none.
            let mayWait = !holdsElection && state.withLock({ $0.freeze == nil })
            if let token = context.waiterToken, !mayWait || !candidates.contains(token) {
                let held = try confirmed(context) {
                    try connection.execute(statements.releaseWaiter, ["\(token)"]).singleRow().bool(0)
                }
                if !held { logger.error("gave back a waiter token this session did not hold") }
                context.waiterToken = nil
            }
            let waitOn = mayWait ? context.waiterToken : nil
            let others = candidates.filter { $0 != waitOn }
            let list = "{" + others.map(String.init).joined(separator: ",") + "}"
            var now = ContinuousClock.now
            if now >= nextHeartbeat {
                // The fallback retry rides on the heartbeat when it would be due before the next one; so does the wait.
                let retrying = !others.isEmpty && (retryNow || nextRetry <= now + heartbeat)
                let sent = now
                let renewed: Int
                var won: [Int] = []
                if let first = waitOn, !retrying {
                    let (rows, granted) = try waitAndTake(first, others: others, beat: true, &context)
                    renewed = rows
                    // Its holder is gone: whatever else it held is likely free too.
                    if granted { retryNow = true }
                } else if retrying {
                    let claim = mayWait && waitOn == nil
                    let row = try confirmed(context) {
                        try connection.execute(
                            statements.heartbeatAndTry, ["\(context.nodeID)", list, claim ? "true" : "false"]
                        ).singleRow()
                    }
                    renewed = try row.int(0)
                    won = try Self.integers(inArrayLiteral: try row.string(1))
                    if claim, !row.isNull(2) { context.waiterToken = try row.int(2) }
                    retryNow = false
                    nextRetry = max(nextRetry, sent) + retryInterval
                } else {
                    renewed =
                        try confirmed(context) {
                            try connection.execute(statements.heartbeat, ["\(context.nodeID)"])
                        }.affectedRows ?? 0
                }
                if !retrying, mayWait, waitOn == nil, !candidates.isEmpty {
                    // No election to wait for yet: try to become the waiter of one that has none.
                    let list = "{" + candidates.map(String.init).joined(separator: ",") + "}"
                    let claimed = try confirmed(context) {
                        try connection.execute(statements.claimWaiter, [list]).singleRow()
                    }
                    if !claimed.isNull(0) { context.waiterToken = try claimed.int(0) }
                }
                metrics.heartbeatRoundTrip.recordNanoseconds(sent.duration(to: .now).nanoseconds)
                if renewed == 0 {
                    throw StokerError(
                        .connectionLost, "This node's row was deleted by someone else; rejoining as a new incarnation.")
                }
                nextHeartbeat = sent + heartbeat
                for id in won { try acquired(election: id, &context) }
                if handle(connection.takeNotifications(), &context) { retryNow = true }
                continue
            }

            now = ContinuousClock.now
            if !others.isEmpty, retryNow || now >= nextRetry {
                // Told to (a release, a member gone or come, a new election), or the fallback's time.
                if !retryNow { nextRetry = now + retryInterval }
                retryNow = false
                let won = try confirmed(context) {
                    try connection.execute(statements.tryTake, [list, "\(context.nodeID)", configuration.nodeName])
                }
                for row in won.rows {
                    try acquired(election: try row.int(0), taken: try TakenTerm(row, from: 1), &context)
                }
                if won.rows.isEmpty, mayWait, waitOn == nil {
                    // Something changed (a new leader, a release, a member gone or come): an election may lack a waiter.
                    let claimed = try confirmed(context) {
                        try connection.execute(statements.claimWaiter, [list]).singleRow()
                    }
                    if !claimed.isNull(0) { context.waiterToken = try claimed.int(0) }
                }
                if handle(connection.takeNotifications(), &context) { retryNow = true }
                continue
            }
            retryNow = false

            if let (name, evidence) = awaitedEvidence(after: &context.lastAwaited) {
                var until = nextHeartbeat
                if context.witnessQuery == nil { until = min(until, context.nextWitnessBeat) }
                if try awaitEvidence(election: name, evidence, until: until, &context) { retryNow = true }
                continue
            }
            if let first = waitOn {
                // Its holder is gone when granted: whatever else it held is likely free too.
                if try waitAndTake(first, others: others, beat: false, &context).1 { retryNow = true }
                if handle(connection.takeNotifications(), &context) { retryNow = true }
                continue
            }
            var until = nextHeartbeat
            // The witness's answer wakes the poll; with nothing outstanding, its next heartbeat is due then.
            if context.witnessQuery == nil { until = min(until, context.nextWitnessBeat) }
            if !others.isEmpty { until = min(until, nextRetry) }
            if let freeze = state.withLock({ state -> Duration? in
                defer {
                    if state.freeze != nil {
                        state.holding += 1
                        state.sessionHolds += 1
                    }
                    state.freeze = nil
                }
                return state.freeze
            }) {
                // Test hook: held where the thread would sleep in poll(2), so on resuming it reads the socket first,
                // as a thread stopped inside poll would.
                Self.hold(freeze)
                state.withLock { $0.holding -= 1 }
            }
            try waitIdle(until: until, context)
        }
    }

    /// Sleeps until `until`, a notification, a wake-up, or news on the witness session (its watch's answer, or —
    /// with nothing outstanding — the server ending it, which throws here).
    private func waitIdle(until: ContinuousClock.Instant, _ context: SessionContext) throws {
        var polls = 0
        let outcome = try context.connection.waitForNotifications(
            until: until, wakeDescriptor: wakeDescriptor, watchDescriptor: context.witness.socket, pollCount: &polls)
        if outcome == .watched, context.witnessQuery == nil {
            do {
                try context.witness.consumeInput()
            } catch {
                throw Self.witnessLost(error)
            }
        }
    }

    private static func witnessLost(_ error: StokerError) -> StokerError {
        StokerError(.connectionLost, "The node's witness session ended: \(error.serverMessage ?? error.message)")
    }

    /// `{1,2}` → `[1, 2]` (an int4 array's text form).
    static func integers(inArrayLiteral text: String) throws(StokerError) -> [Int] {
        let inner = text.trimmingPrefix("{").prefix { $0 != "}" }
        if inner.isEmpty { return [] }
        var values: [Int] = []
        for part in inner.split(separator: ",") {
            guard let value = Int(part) else {
                throw StokerError(.unexpectedResult, "Expected an integer array, got \"\(text.prefix(40))\".")
            }
            values.append(value)
        }
        return values
    }

    /// One wait in the lock queue of election `id` (with the heartbeat, when `beat`), and its term bump in the same
    /// statement when the lock is granted — with a try and a bump of the `others` too, whose holder is likely gone as
    /// well; returns the rows the heartbeat renewed, and whether the lock was granted.
    private func waitAndTake(
        _ id: Int, others: [Int], beat: Bool, _ context: inout SessionContext
    ) throws -> (Int, Bool) {
        guard let statements = context.statements else { return (0, false) }
        let connection = context.connection
        let wait = queueWait(context)
        let rows = try confirmed(context) {
            try connection.execute(
                statements.waitAndTake,
                [
                    "\(context.nodeID)", "\(id)", "\(wait.roundedUpMilliseconds)", configuration.nodeName,
                    beat ? "true" : "false", "{" + others.map(String.init).joined(separator: ",") + "}",
                ]
            ).rows
        }
        guard let first = rows.first else {
            throw StokerError(.unexpectedResult, "The lock-queue wait returned no row.")
        }
        let granted = try first.bool(2)
        // Granted: the statement gave the waiter token back.
        if granted, context.waiterToken == id { context.waiterToken = nil }
        for row in rows where try row.bool(2) {
            try acquired(election: try row.int(1), taken: try TakenTerm(row, from: 3), &context)
        }
        return (try first.int(0), granted)
    }

    /// The witness session's side of the loop, never blocking: collects the answer to its heartbeat if it has
    /// arrived (a trusted reply renews its half of the lease), and sends the next one when it is due. The witness
    /// runs nothing else: an idle backend sees its client's end at once (a crash frees the node lock with the process),
    /// where one busy in a statement would notice only at its next connection check.
    private func serviceWitness(_ context: inout SessionContext) throws {
        guard let statements = context.statements else { return }
        let witness = context.witness
        if let sent = context.witnessQuery {
            let result: QueryResult?
            do {
                result = try witness.awaitResult(until: .now)
            } catch {
                throw Self.witnessLost(error)
            }
            guard result != nil else { return }
            context.witnessQuery = nil
            try trust(sent: sent, on: .witness, context)
        }
        let now = ContinuousClock.now
        guard now >= context.nextWitnessBeat else { return }
        do {
            try witness.send(statements.witnessHeartbeat, [])
        } catch {
            throw Self.witnessLost(error)
        }
        context.witnessQuery = now
        context.nextWitnessBeat = now + Self.witnessInterval(configuration)
    }

    /// How often the witness heartbeats: a third of `lease − margin`, so one late answer never costs the lease.
    static func witnessInterval(_ configuration: StokerNode.Configuration) -> Duration {
        (configuration.lease - configuration.effectiveMargin) / 3
    }

    /// The first election whose leadership waits for evidence about its predecessor.
    /// Several take turns: the one after `last` in name order, then the first.
    private func awaitedEvidence(after last: inout String?) -> (String, AwaitedEvidence)? {
        let waiting = state.withLock { state in
            state.slots.compactMap { name, slot -> (String, AwaitedEvidence)? in
                guard case .awaitingEvidence = slot.machine.state, let evidence = slot.evidence else { return nil }
                return (name, evidence)
            }.sorted { $0.0 < $1.0 }
        }
        let previous = last
        guard let next = waiting.first(where: { entry in previous.map { entry.0 > $0 } ?? true }) ?? waiting.first
        else { return nil }
        last = next.0
        return next
    }

    /// One step of the wait for evidence that `evidence.predecessor` stopped acting (the evidence rule):
    /// on the same server, in the queue of its node lock (granted the instant its witness closes, and the leadership
    /// begins in the same statement); after a server change, its acknowledgement or its lease run out. Returns at
    /// `until` at the latest; returns whether notifications asked for a retry.
    private func awaitEvidence(
        election name: String,
        _ evidence: AwaitedEvidence,
        until: ContinuousClock.Instant,
        _ context: inout SessionContext
    ) throws -> Bool {
        guard let statements = context.statements, let id = state.withLock({ $0.slots[name]?.id }) else { return false }
        let connection = context.connection
        let nodeID = context.nodeID
        let nodeName = configuration.nodeName
        var began: Bool?
        if evidence.sameServer, let predecessor = evidence.predecessor {
            guard let wait = queueWait(until: until) else {
                try waitIdle(until: until, context)
                return handle(connection.takeNotifications(), &context)
            }
            began = try confirmed(context) {
                try connection.execute(
                    statements.awaitPredecessor,
                    [
                        "\(predecessor)", "\(wait.roundedUpMilliseconds)", "\(id)", "\(evidence.term)",
                        "\(nodeID)", nodeName,
                    ]
                ).singleRow().optionalBool(0)
            }
        } else {
            var acknowledged = false
            if context.checkAcknowledgement, let predecessor = evidence.predecessor {
                context.checkAcknowledgement = false
                acknowledged = try confirmed(context) {
                    try connection.execute(statements.acknowledged, ["\(predecessor)"]).singleRow().bool(0)
                }
            }
            if acknowledged || ContinuousClock.now >= evidence.leaseRunOut {
                began = try confirmed(context) {
                    try connection.execute(
                        statements.beginTerm, ["\(id)", "\(evidence.term)", "\(nodeID)", nodeName]
                    ).singleRow().optionalBool(0)
                }
                if began == false { began = nil }
            } else {
                // Until a member joins (its row may be the acknowledgement) or the lease has run out.
                try waitIdle(until: min(until, evidence.leaseRunOut), context)
                began = false
            }
        }
        let retry = handle(connection.takeNotifications(), &context)
        switch began {
        case true?:
            startLeadership(election: name, term: evidence.term, context)
        case false?:
            break
        case nil:
            throw StokerError(
                .unexpectedResult,
                "The term of election \"\(name)\" moved on while this node held its lock; rejoining.")
        }
        return retry
    }

    private static let internalError = StokerError(.unexpectedResult, "The node's session was not set up.")

    /// How long a lock-queue wait may last to return by `until`: `nil` when under a millisecond is left (poll instead).
    /// Never more than half the statement timeout, so the server's timeout can never cut the wait, nor 250 ms, below
    /// the server's `deadlock_timeout` (1 s by default: a wait that long runs the deadlock check, and with
    /// `log_lock_waits` logs a line).
    private func queueWait(until: ContinuousClock.Instant) -> Duration? {
        let left = min(
            ContinuousClock.now.duration(to: until), configuration.effectiveStatementTimeout / 2, .milliseconds(250))
        return left >= .milliseconds(1) ? left : nil
    }

    /// How long a follower's wait in an election's lock queue lasts: below the server's `deadlock_timeout` (a wait
    /// that long runs the deadlock check — which takes every lock-partition lock — and, with `log_lock_waits`, logs a
    /// line), half the statement timeout (which must never cut it), and a sixth of `lease − margin`.
    private func queueWait(_ context: SessionContext) -> Duration {
        // And a sixth of `lease − margin`: the witness's heartbeat is sent and collected between statements, so two
        // waits in a row must leave its half of the lease room (a third for its interval, a third for the waits).
        max(
            .milliseconds(1),
            min(
                context.longestWait, configuration.effectiveStatementTimeout / 2,
                (configuration.lease - configuration.effectiveMargin) / 6))
    }

    /// Looks up the rows of elections registered since (or before) this session began; returns whether any was.
    private func setUpElections(_ context: SessionContext) throws -> Bool {
        guard let statements = context.statements else { return false }
        let pending = state.withLock { state in state.slots.filter { $0.value.needsSetup }.map(\.key) }
        for name in pending {
            let id = try confirmed(context) {
                try statements.ensureElection(cluster: context.clusterID, name: name, on: context.connection)
            }
            let leader = try context.connection.execute(statements.whereis, ["\(context.clusterID)", name]).rows.first
            let leaderName = try leader.map { try $0.string(2) }
            state.withLock { state in
                state.slots[name]?.id = id
                state.slots[name]?.needsSetup = false
                state.slots[name]?.mailbox.yield(.leaderObserved(leaderName))
            }
        }
        return !pending.isEmpty
    }

    /// The try-lock returned `election`: this session holds its lock now.
    /// What a term bump (`take_term`) answered, read from its five columns starting at `column`.
    private struct TakenTerm {
        let term: Int64
        let began: Bool
        let predecessor: Int?
        let sameServer: Bool
        let leaseMilliseconds: Int?

        init(_ row: QueryResult.Row, from column: Int) throws(StokerError) {
            term = Int64(try row.int(column))
            began = try row.bool(column + 1)
            predecessor = row.isNull(column + 2) ? nil : try row.int(column + 2)
            sameServer = try row.optionalBool(column + 3) ?? false
            leaseMilliseconds = row.isNull(column + 4) ? nil : try row.int(column + 4)
        }
    }

    /// This session holds the lock of election `id` now — and, when `taken` is given, the same statement already
    /// bumped its term; otherwise the bump runs here.
    private func acquired(election id: Int, taken: TakenTerm? = nil, _ context: inout SessionContext) throws {
        guard let statements = context.statements else { return }
        let found = state.withLock { state -> (String, ElectionStateMachine.Action, ElectionMetrics)? in
            guard let name = state.slots.first(where: { $0.value.id == id })?.key, var slot = state.slots[name] else {
                return nil
            }
            let action = slot.machine.lockWon()
            state.slots[name] = slot
            return (name, action, slot.metrics)
        }
        guard let (name, action, electionMetrics) = found else {
            // The activator went away between the try-lock and now: give the lock back.
            try release(election: id, context)
            return
        }
        switch action {
        case .bumpTerm:
            let bumped: TakenTerm
            if let taken {
                bumped = taken
            } else {
                bumped = try confirmed(context) {
                    try TakenTerm(
                        try context.connection.execute(
                            statements.takeTerm, ["\(id)", "\(context.nodeID)", configuration.nodeName]
                        ).singleRow(), from: 0)
                }
            }
            let term = bumped.term
            let began = bumped.began
            // Without a hand-over or a free node lock of the predecessor, leadership waits for evidence that the
            // predecessor stopped acting: the term is bumped (the fence refuses it already), `isLeader` stays false.
            var evidence: AwaitedEvidence?
            if !began {
                // The longest lease the predecessor (or, not knowing it, any member) may have had, and never less than
                // this node's own.
                let lease = max(configuration.lease, .milliseconds(bumped.leaseMilliseconds ?? 0))
                evidence = AwaitedEvidence(
                    term: term, predecessor: bumped.predecessor, sameServer: bumped.sameServer,
                    leaseRunOut: .now + lease)
            }
            // A leadership that begins here: counted before the scope can be seen by anyone who might end it (so the
            // gauge goes 1, then 0), and outside the lock (a metrics handler is user code).
            let scope =
                began
                ? LeaderScope(
                    term: term, election: name, incarnation: context.nodeID, metrics: electionMetrics,
                    lease: context.lease) : nil
            if began { electionMetrics.leading(true) }
            let next = state.withLock { state -> ElectionStateMachine.Action in
                guard var slot = state.slots[name] else { return .none }
                if state.halting || state.stop == .hard {
                    // A hard stop began while the bump was in flight: this leadership never starts.
                    _ = slot.machine.leadershipLost(.sessionLost)
                    state.slots[name] = slot
                    return .none
                }
                let next = slot.machine.termBumped(term, began: began)
                switch next {
                case .startLeading:
                    if let scope {
                        slot.scope = scope
                        // Queued under the lock: no demotion of this leadership can be queued before it.
                        slot.mailbox.yield(.leader(scope))
                    }
                case .awaitEvidence:
                    slot.evidence = evidence
                case .endLeadingAndRelease:
                    slot.releaseReady = true
                default:
                    break
                }
                state.slots[name] = slot
                return next
            }
            if began, case .startLeading = next {} else if began { electionMetrics.leading(false) }
            if case .awaitEvidence = next { context.checkAcknowledgement = true }
            switch next {
            case .startLeading(let term):
                logger.notice(
                    "became leader",
                    metadata: metadata.merging(
                        ["stoker.election": "\(name)", "stoker.term": "\(term)"], uniquingKeysWith: { $1 }))
            case .awaitEvidence:
                if let evidence {
                    logger.info(
                        "waiting for evidence that the previous leader stopped",
                        metadata: metadata.merging(
                            [
                                "stoker.election": "\(name)", "stoker.term": "\(term)",
                                "stoker.previous": "\(evidence.predecessor.map(String.init) ?? "unknown")",
                                "stoker.evidence":
                                    "\(evidence.sameServer ? "its witness session" : "its acknowledgement or lease")",
                            ], uniquingKeysWith: { $1 }))
                }
            default:
                break
            }
        case .releaseLock:
            try release(election: id, context)
        default:
            break
        }
    }

    /// Leadership of `name` began on the server (its begin committed): start the scope and tell the activator — unless
    /// the state machine says otherwise (a loss or a resignation came first).
    private func startLeadership(election name: String, term: Int64, _ context: SessionContext) {
        guard let electionMetrics = state.withLock({ $0.slots[name]?.metrics }) else { return }
        let scope = LeaderScope(
            term: term, election: name, incarnation: context.nodeID, metrics: electionMetrics, lease: context.lease)
        // Counted before the scope can be seen by anyone who might end it (so the gauge goes 1, then 0), and outside
        // the lock: a metrics handler is user code.
        electionMetrics.leading(true)
        let started = state.withLock { state -> Bool in
            guard var slot = state.slots[name], !state.halting, state.stop != .hard else { return false }
            let action = slot.machine.evidenceFound()
            slot.evidence = nil
            guard case .startLeading = action else {
                state.slots[name] = slot
                return false
            }
            slot.scope = scope
            // Queued under the lock: no demotion of this leadership can be queued before it.
            slot.mailbox.yield(.leader(scope))
            state.slots[name] = slot
            return true
        }
        guard started else {
            electionMetrics.leading(false)
            return
        }
        logger.notice(
            "became leader",
            metadata: metadata.merging(
                ["stoker.election": "\(name)", "stoker.term": "\(term)"], uniquingKeysWith: { $1 }))
    }

    /// Resignations whose leader work has drained: clear the leader and release the lock.
    private func performReleases(_ context: SessionContext) throws {
        let ready = state.withLock { state in
            state.slots.filter { $0.value.releaseReady }.compactMap { entry in entry.value.id.map { (entry.key, $0) } }
        }
        for (name, id) in ready {
            try release(election: id, context)
            state.withLock { state in
                guard var slot = state.slots[name] else { return }
                slot.releaseReady = false
                let action = slot.machine.released()
                state.slots[name] = slot
                if action == .finishResignation { finishResignation(name, in: &state, reason: .nodeStopped) }
            }
        }
    }

    /// Clears the leader (if it is this node) and unlocks, in one statement (`hand_over`): its commit sends `released`.
    private func release(election id: Int, _ context: SessionContext) throws {
        guard let statements = context.statements else { return }
        let connection = context.connection
        let unlocked = try confirmed(context) {
            try connection.execute(statements.handOver, ["\(id)", "\(context.nodeID)"]).singleRow().bool(0)
        }
        if !unlocked {
            logger.error(
                "released an election lock this session did not hold", metadata: ["stoker.election.id": "\(id)"])
        }
    }

    /// Graceful stop, once every activator has handed its election over: leave the cluster (→ `node_down`).
    private func leave(_ context: inout SessionContext) throws {
        guard let statements = context.statements else { return }
        _ = try confirmed(context) { try context.connection.execute(statements.leave, ["\(context.nodeID)"]) }
        logger.info("left the cluster", metadata: metadata)
    }

    /// Handles the cluster channel's notifications; returns whether an election was released (retry at once).
    private func handle(_ notifications: [PostgresNotification], _ context: inout SessionContext) -> Bool {
        var retry = false
        for notification in notifications where notification.channel == context.channel {
            guard let fields = FlatJSON.parse(notification.payload), case .string(let event)? = fields["event"]
            else { continue }
            switch event {
            case "node_up", "node_down":
                guard case .integer(let id)? = fields["node"], case .string(let name)? = fields["name"] else {
                    continue
                }
                let member = ClusterMember(id: Int(id), name: name)
                guard member.id != context.nodeID else { continue }
                let change: ClusterChange
                if event == "node_up" {
                    context.members[member.id] = name
                    context.checkAcknowledgement = true
                    change = .nodeUp(member)
                } else {
                    context.members[member.id] = nil
                    change = .nodeDown(member)
                }
                state.withLock { state in
                    for slot in state.slots.values where slot.machine.leadingTerm != nil {
                        slot.mailbox.yield(.member(change))
                    }
                }
                // A member gone may have freed locks; one come back may have acknowledged its predecessor.
                retry = true
            case "leader":
                guard case .integer(let election)? = fields["election"] else { continue }
                var leaderName: String?
                if case .integer(let node)? = fields["node"] { leaderName = context.members[Int(node)] }
                state.withLock { state in
                    for slot in state.slots.values where slot.id == Int(election) && slot.machine.leadingTerm == nil {
                        slot.mailbox.yield(.leaderObserved(leaderName))
                    }
                }
                // A new leader may have been its election's waiter: another follower can take the role now.
                retry = true
            case "released":
                guard case .integer(let election)? = fields["election"] else { continue }
                state.withLock { state in
                    for slot in state.slots.values where slot.id == Int(election) && slot.machine.isCandidate {
                        slot.mailbox.yield(.leaderObserved(nil))
                        retry = true
                    }
                }
            default:
                continue
            }
        }
        return retry
    }

    /// Test hook: blocks the session thread, touching nothing.
    private static func hold(_ duration: Duration) {
        var remaining = timespec(
            tv_sec: Int(duration.components.seconds),
            tv_nsec: Int(duration.components.attoseconds / 1_000_000_000))
        var left = timespec()
        while nanosleep(&remaining, &left) != 0 && errno == EINTR { remaining = left }
    }

    /// This machine's host name (`nil` if `gethostname(2)` failed): the nodes table's `host`, and the default node
    /// name's first half.
    static let hostName: String? = {
        var buffer = [CChar](repeating: 0, count: 256)
        return gethostname(&buffer, buffer.count - 1) == 0 ? decodeCString(buffer) : nil
    }()

    /// `cluster:node`, cut to PostgreSQL's 63 bytes on a character boundary.
    static func applicationName(cluster: String, node: String) -> String {
        var name = ""
        for character in "\(cluster):\(node)" {
            if name.utf8.count + String(character).utf8.count > 63 { break }
            name.append(character)
        }
        return name
    }
}
