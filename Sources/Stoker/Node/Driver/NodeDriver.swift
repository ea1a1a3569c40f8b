import Logging
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The node's driver: holds the ``NodeStateMachine`` in one `Mutex` and performs what it decides. Three parties feed
/// it:
///
/// - the **session thread** (`SessionThread.swift`), the only owner of both `PGconn`s (created on it, never leaving
///   it): connects, joins, runs the machine's steps, reads notifications, reconnects;
/// - the **lease watchdog thread** (`LeaseWatchdog.swift`), which ends every leadership at the lease deadline even
///   while the session thread is blocked in libpq, then cuts both sockets;
/// - async callers (``StokerNode``, ``Activator``): registration, resignation, stop requests.
///
/// Everything is performed outside the lock, except what must keep the machine's order: messages to activators
/// (an `AsyncStream` yield, which never blocks nor runs user code) and the lease clock's extension. Ending a
/// leadership (which runs cancellation handlers) is never done under the lock, and always before the messages that
/// follow it are queued.
final class NodeDriver: Sendable {
    let configuration: StokerNode.Configuration
    let connection: ConnectionConfiguration
    let logger: Logger
    let metrics: NodeMetrics

    /// The machine, and the I/O handles the driver keeps beside it (no decision reads them).
    struct Locked {
        var machine: NodeStateMachine
        /// The current session's lease clock: a new one per session, so a leadership of an earlier session can never
        /// read a later session's renewals as its own.
        var lease = LeaseClock()
        /// Duplicates of both sessions' sockets while they are open (for the watchdog and hard stop to cut them with
        /// `shutdown(2)`). Duplicates, so that libpq closing its own descriptor on EOF can never make this number
        /// point at a descriptor the application opened since.
        var sockets: [Int32] = []
        var member: ClusterMember?
        var backendPID: Int32?
        var witnessBackendPID: Int32?
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
        var resignWaiters: [String: CheckedContinuation<Void, Never>] = [:]
        /// Test hooks: threads held right now, holds of the session thread begun so far, and when holds were last
        /// released early (``NodeDriver/releaseFreeze()``).
        var holding = 0
        var sessionHolds = 0
        var freezeReleasedAt: ContinuousClock.Instant?
    }

    let state: Mutex<Locked>
    let sessionSignal: WakeSignal
    let watchdogSignal: WakeSignal

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
        state = Mutex(Locked(machine: NodeStateMachine(settings: NodeStateMachine.Settings(configuration))))
        sessionSignal = try WakeSignal()
        watchdogSignal = try WakeSignal()
    }

    var metadata: Logger.Metadata {
        ["stoker.cluster": "\(configuration.cluster)", "stoker.node": "\(configuration.nodeName)"]
    }

    // MARK: - Feeding the machine

    /// Runs `body` on the machine under the lock, extends the lease clock to the machine's deadline, performs the
    /// deliveries it queued (in order, still under the lock: a `.leader` must never be seen before the lease that
    /// makes it valid), and logs its events once the lock is released.
    func withMachine<T>(_ body: (inout Locked) -> T) -> T {
        let (value, events) = withMachineDeferringEvents(body)
        log(events)
        return value
    }

    /// ``withMachine(_:)``, but the events are returned rather than logged: for an input that may take leaderships out
    /// of play, whose scopes must end before any user code (a log handler) runs.
    func withMachineDeferringEvents<T>(_ body: (inout Locked) -> T) -> (T, [NodeStateMachine.Event]) {
        state.withLock { locked in
            let value = body(&locked)
            if let deadline = locked.machine.leaseDeadline { locked.lease.extend(to: deadline) }
            Self.deliver(locked.machine.takeDeliveries(), in: &locked)
            return (value, locked.machine.takeEvents())
        }
    }

    /// Hands deliveries to the activators, in order (under the lock: a yield never blocks nor runs user code).
    static func deliver(_ deliveries: [NodeStateMachine.Delivery], in locked: inout Locked) {
        for delivery in deliveries {
            switch delivery {
            case .message(let mailbox, let message):
                mailbox.continuation.yield(message)
            case .demoted(let mailbox, let reason, let scope):
                if let endedAt = scope.endedAt { mailbox.continuation.yield(.demoted(reason, endedAt: endedAt)) }
            case .stopped(let mailbox, let reason, let scope, let endedAt):
                mailbox.continuation.yield(.stopped(reason, endedAt: scope?.endedAt ?? endedAt))
                mailbox.continuation.finish()
            case .finish(let mailbox):
                mailbox.continuation.finish()
            case .resumeResignation(let election):
                locked.resignWaiters.removeValue(forKey: election)?.resume()
            }
        }
    }

    func log(_ events: [NodeStateMachine.Event]) {
        for event in events { log(event) }
    }

    private func log(_ event: NodeStateMachine.Event) {
        switch event {
        case .becameLeader(let election, let term):
            logger.notice(
                "became leader",
                metadata: metadata.merging(
                    ["stoker.election": "\(election)", "stoker.term": "\(term)"], uniquingKeysWith: { $1 }))
        case .awaitingEvidence(let election, let term, let evidence):
            logger.info(
                "waiting for evidence that the previous leader stopped",
                metadata: metadata.merging(
                    [
                        "stoker.election": "\(election)", "stoker.term": "\(term)",
                        "stoker.previous": "\(evidence.predecessor.map(String.init) ?? "unknown")",
                        "stoker.evidence":
                            "\(evidence.sameServer ? "its witness session" : "its acknowledgement or lease")",
                    ], uniquingKeysWith: { $1 }))
        case .strayRelease(let election):
            logger.error(
                "released an election lock this session did not hold", metadata: ["stoker.election.id": "\(election)"])
        case .strayWaiterToken:
            logger.error("gave back a waiter token this session did not hold")
        case .leaseExpired:
            logger.warning(
                "lease expired: no reply confirmed the session in time; reconnecting as a new incarnation",
                metadata: metadata)
        case .joined(let incarnation, let members):
            logger.info(
                "joined the cluster",
                metadata: metadata.merging(
                    ["stoker.incarnation": "\(incarnation)", "stoker.members": "\(members)"],
                    uniquingKeysWith: { $1 }))
        }
    }

    /// Ends `scope` at `instant` (flips `isLeader`, cancels leader work) unless it has ended already; counts and logs
    /// the first end only. Never call it holding the lock: cancellation handlers run here.
    func endScope(_ scope: LeaderScope, at instant: ContinuousClock.Instant, reason: String) {
        guard scope.end(at: instant) else { return }
        scope.metrics.leading(false)
        logger.notice(
            "stepped down",
            metadata: metadata.merging(
                ["stoker.election": "\(scope.election)", "stoker.term": "\(scope.term)", "stoker.reason": "\(reason)"],
                uniquingKeysWith: { $1 }))
    }

    /// A loss: end every leadership it took out of play, at its instant, then cut both sockets (when `cut` and the
    /// session is still `generation`), then let the machine announce the demotions, then log `events` (what the
    /// machine said when it decided the loss).
    func lose(
        _ ending: NodeStateMachine.Ending, reason: DemotionReason, cut generation: UInt64?,
        events: [NodeStateMachine.Event] = []
    ) {
        for (_, scope) in ending.scopes { endScope(scope, at: ending.at, reason: "\(reason)") }
        if let generation {
            // Only now that no leadership is left: the server frees the locks at once, and the witness's end is the
            // acknowledgement a successor waits for.
            state.withLock { locked in
                guard locked.machine.isCurrent(generation) else { return }
                Self.cut(locked.sockets)
            }
        }
        withMachine { $0.machine.leadershipsEnded(ending, reason: reason) }
        log(events)
    }

    static func cut(_ sockets: [Int32]) {
        for socket in sockets { _ = shutdown(socket, Int32(SHUT_RDWR)) }
    }

    // MARK: - Async side

    /// Starts both threads and returns once the session thread has exited; throws the error that stopped it, if any.
    func run() async throws {
        guard withMachine({ $0.machine.runRequested() }) else {
            throw StokerError(.invalidConfiguration, "StokerNode.run() was called twice; a node runs once.")
        }
        do {
            // The watchdog first: a session thread must never run unguarded. If the second start fails, `finish`
            // makes the watchdog exit.
            try startThread(.watchdog) { self.watchdogThread() }
            try startThread(.session) { self.sessionThread() }
        } catch {
            finish(failure: error)
            throw error
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLock { locked -> Bool in
                if locked.machine.phase == .exited { return true }
                locked.exitWaiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
        if let failure { throw failure }
    }

    /// The error the node stopped with, once it has (nil while it runs, or after a clean stop).
    var failure: StokerError? { state.withLock { $0.machine.failure } }

    /// Graceful stop: resign every election (the activators get `shutdown`), leave the cluster, close the session.
    func requestGracefulStop() {
        withMachine { $0.machine.gracefulStopRequested() }
        sessionSignal.signal()
    }

    /// Hard stop (cancellation): leadership ends at once, then both sessions are cut without a goodbye (the server
    /// releases the locks as for a crash); activators get `shutdown(.cancelled)`.
    func hardStop() {
        // 1. No new leadership from here on; every current one ends before the sessions are cut. The instant is taken
        //    under the lock: no leadership can have started after it.
        let ending = withMachine { $0.machine.hardStopRequested(now: .now) }
        for (_, scope) in ending.scopes { endScope(scope, at: ending.at, reason: "\(ShutdownReason.cancelled)") }
        // 2. Stop; every scope still around ends (the machine starts none while halting).
        let (scopes, stopped) = withMachine { $0.machine.hardStopContinued() }
        for scope in scopes { endScope(scope, at: ending.at, reason: "\(ShutdownReason.cancelled)") }
        // 3. Only now that no leadership is left: cut both sessions (the server then frees their locks at once), and
        //    tell the activators.
        state.withLock { locked in
            Self.cut(locked.sockets)
            Self.deliver(stopped, in: &locked)
        }
        sessionSignal.signal()
        watchdogSignal.signal()
    }

    /// Registers the activator of `election`; its messages arrive on the returned stream.
    func register(
        _ election: String
    ) throws(StokerError) -> (AsyncStream<ActivatorMessage>, AsyncStream<ActivatorMessage>.Continuation) {
        let (stream, continuation) = AsyncStream.makeStream(of: ActivatorMessage.self, bufferingPolicy: .unbounded)
        let electionMetrics = metrics.election(election)
        let registration = withMachine { locked in
            let mailbox = locked.machine.makeMailbox(continuation)
            return locked.machine.registered(election, mailbox: mailbox, metrics: electionMetrics)
        }
        if registration == .duplicate {
            throw StokerError(
                .invalidConfiguration,
                "An activator for election \"\(election)\" is already running on node "
                    + "\"\(configuration.nodeName)\"; run one activator per election per node.")
        }
        sessionSignal.signal()
        return (stream, continuation)
    }

    /// Hands the election over and withdraws from it: leadership ends at once (leader work cancelled), then — once
    /// that work has finished, when `drain` — the session thread clears the leader and releases the lock. Returns
    /// when the lock is released (or the session is gone), with the instant leadership ended, if this node led.
    func resign(_ election: String, drain: Bool) async -> ContinuousClock.Instant? {
        let now = ContinuousClock.now
        let step = withMachine { $0.machine.resignRequested(election, now: now) }
        sessionSignal.signal()
        switch step {
        case .done(let scope):
            guard let scope else { return nil }
            endScope(scope, at: now, reason: "\(drain ? ShutdownReason.gracefulShutdown : .cancelled)")
            return scope.endedAt
        case .release(let scope, let endedAt):
            endScope(scope, at: endedAt, reason: "\(drain ? ShutdownReason.gracefulShutdown : .cancelled)")
            if drain { await scope.waitForTasks() }
            await waitForResignation(election, leaderWorkDrained: true)
            return scope.endedAt ?? endedAt
        case .wait:
            await waitForResignation(election, leaderWorkDrained: false)
            return nil
        }
    }

    /// The activator of `election` is done with trigger `sequence` (`handled`: its callback returned, without throwing,
    /// while the leadership went on — the session thread deletes it from the table).
    func triggerDone(_ election: String, sequence: Int64, handled: Bool) {
        if withMachine({ $0.machine.triggerDone(election, sequence: sequence, handled: handled) }) {
            sessionSignal.signal()
        }
    }

    private func waitForResignation(_ election: String, leaderWorkDrained: Bool) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let pending = withMachine { locked -> Bool in
                guard locked.machine.resignationAwaited(election, leaderWorkDrained: leaderWorkDrained) else {
                    return false
                }
                locked.resignWaiters[election] = continuation
                return true
            }
            if pending { sessionSignal.signal() } else { continuation.resume() }
        }
    }

    /// The session thread has exited: every election is withdrawn, the watchdog and `run()` return.
    func finish(failure: StokerError?) {
        let now = ContinuousClock.now
        let (scopes, stopped) = withMachine { $0.machine.sessionThreadFinished(failure: failure) }
        for scope in scopes { endScope(scope, at: now, reason: "\(ShutdownReason.nodeStopped)") }
        let waiters = state.withLock { locked in
            Self.deliver(stopped, in: &locked)
            defer { locked.exitWaiters.removeAll() }
            return locked.exitWaiters
        }
        watchdogSignal.signal()
        for waiter in waiters { waiter.resume() }
    }

    // MARK: - Test hooks

    /// Holds the session thread (the node's loop) for `duration` at its next turn, as a long pause would.
    func freezeLoop(for duration: Duration) {
        withMachine { $0.machine.freezeRequested(session: duration, watchdog: nil) }
        sessionSignal.signal()
    }

    /// Holds the session thread and the lease watchdog for `duration`, as a stopped process (SIGSTOP): nothing of the
    /// node runs until both resume. The watchdog resumes 100 ms after the session thread — the worse order, in which
    /// the thread that reads the socket learns of the loss first, well after the lease deadline.
    func freezeThreads(for duration: Duration) {
        withMachine { $0.machine.freezeRequested(session: duration, watchdog: duration + .milliseconds(100)) }
        sessionSignal.signal()
        watchdogSignal.signal()
    }

    /// Ends the holds under way now: the session thread's at once, the watchdog's 100 ms later (the order of
    /// ``freezeThreads(for:)``). A hold that begins after this call lasts its whole duration.
    func releaseFreeze() {
        state.withLock { $0.freezeReleasedAt = .now }
        sessionSignal.signal()
        watchdogSignal.signal()
    }

    /// A freeze is pending or under way.
    var isFrozen: Bool {
        state.withLock { $0.machine.freeze != nil || $0.machine.watchdogFreeze != nil || $0.holding > 0 }
    }

    /// How many times a freeze has held the session thread so far.
    var sessionHolds: Int { state.withLock { $0.sessionHolds } }

    var member: ClusterMember? { state.withLock { $0.member } }
    var backendPID: Int32? { state.withLock { $0.backendPID } }
    var witnessBackendPID: Int32? { state.withLock { $0.witnessBackendPID } }

    /// Blocks the calling thread for `duration`, touching nothing of the node (a test hook's hold) — or until `lag`
    /// after ``releaseFreeze()``, when that comes first. Waits on `signal`, which anything may raise: only the
    /// deadline or a release ends the hold, and a signal it took is raised again for the thread's next wait (as if it
    /// had slept through it).
    func hold(_ duration: Duration, releasedAfter lag: Duration, waitingOn signal: WakeSignal) {
        let start = ContinuousClock.now
        var signalled = false
        defer { if signalled { signal.signal() } }
        while true {
            var end = start + duration
            if let released = state.withLock({ $0.freezeReleasedAt }), released >= start {
                end = min(end, released + lag)
            }
            let now = ContinuousClock.now
            if now >= end { return }
            if signal.wait(timeout: now.duration(to: end)) { signalled = true }
        }
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

extension NodeStateMachine.Settings {
    init(_ configuration: StokerNode.Configuration) {
        self.init(
            lease: configuration.lease, margin: configuration.effectiveMargin,
            heartbeat: configuration.effectiveHeartbeatInterval, retryInterval: configuration.effectiveRetryInterval,
            statementTimeout: configuration.effectiveStatementTimeout,
            sweepInterval: configuration.effectiveSweepInterval)
    }
}
