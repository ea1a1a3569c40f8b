/// Everything a node decides, as a value: what happened goes in (each input carries `now` where time matters), what
/// to do comes out. No I/O, lock, logger or clock read inside: the driver (``NodeDriver``) holds it in one `Mutex`,
/// feeds it from three parties — the session thread, the lease watchdog, the async entry points — and performs what
/// it returns.
///
/// Three kinds of output:
/// - **return values** name what to do next (a statement to run, leaderships to end at an instant, sockets to cut,
///   a reconnect, the exit);
/// - **deliveries** (messages to activators, resignations to resume) queue up in an outbox the driver empties inside
///   the same critical section, so their order is the order the machine decided them;
/// - **events** (``Event``) say what the driver should log or count.
///
/// The rules it keeps:
/// - a leadership begins only when the election's machine says so (its term bump committed, and on evidence that
///   its predecessor stopped), and never during a hard stop (during a graceful stop, one that begins is handed over
///   by the resignation the stop asks its activator for);
/// - when the session or the lease is lost, every leadership ends — the driver ends the scopes at the instant given,
///   and only then reports ``leadershipsEnded(_:reason:)``, which queues the demotions: no message can overtake the end
///   it follows;
/// - no reply to a request sent more than `lease − margin` ago is trusted, nor any reply once the deadline passed; the
///   lease runs from the older of the two sessions' last trusted sends;
/// - a lock is never requested while held (advisory locks stack): only a follower is a candidate;
/// - after the exit nothing is acted on.
struct NodeStateMachine: Sendable {
    /// The timing the machine decides with (from ``StokerNode/Configuration``, its effective values).
    struct Settings: Sendable, Hashable {
        var lease: Duration
        var margin: Duration
        var heartbeat: Duration
        var retryInterval: Duration
        var statementTimeout: Duration
        /// How often the schema's sweeper looks for dead nodes.
        var sweepInterval: Duration

        /// A reply to a request sent longer ago than this is not trusted; a trusted one extends the lease by this.
        var valid: Duration { lease - margin }
        /// How often the witness heartbeats: a third of `lease − margin`, so one late answer never costs the lease.
        var witnessInterval: Duration { valid / 3 }
        /// How long a follower's wait in an election's lock queue lasts at most (before the server's own
        /// `deadlock_timeout` cap, learnt at join): half the statement timeout, which must never cut it, and a sixth of
        /// `lease − margin` — the witness's heartbeat is sent and collected between statements, so two waits in a row
        /// must leave its half of the lease room (a third for its interval, a third for the waits).
        var longestQueueWait: Duration { min(statementTimeout / 2, valid / 6) }
    }

    /// An activator's message queue (an `AsyncStream`'s continuation, compared by the number it was registered with).
    struct Mailbox: Sendable, Equatable {
        let number: Int
        let continuation: AsyncStream<ActivatorMessage>.Continuation

        static func == (lhs: Mailbox, rhs: Mailbox) -> Bool { lhs.number == rhs.number }
    }

    /// One thing to hand an activator, in order.
    enum Delivery: Sendable, Equatable {
        case message(Mailbox, ActivatorMessage)
        /// The leadership `scope` ended (the driver ended it first): `.demoted(reason, endedAt: scope.endedAt)`.
        case demoted(Mailbox, DemotionReason, scope: LeaderScope)
        /// The activator's last message: `.stopped(reason, endedAt: scope?.endedAt ?? endedAt)`, then the stream
        /// finishes. The scope, if any, was ended first — or, for a resignation a loss finished, is being ended by the
        /// resigning activator itself, and `endedAt` is the instant of that resignation.
        case stopped(Mailbox, ShutdownReason, scope: LeaderScope?, endedAt: ContinuousClock.Instant?)
        /// The stream finishes (the activator withdrew).
        case finish(Mailbox)
        /// The resignation of this election finished: resume whoever waits for it.
        case resumeResignation(String)

        static func == (lhs: Delivery, rhs: Delivery) -> Bool {
            switch (lhs, rhs) {
            case (.message(let a, let m), .message(let b, let n)): a == b && m == n
            case (.demoted(let a, let r, let s), .demoted(let b, let q, let t)): a == b && r == q && s === t
            case (.stopped(let a, let r, let s, let e), .stopped(let b, let q, let t, let f)):
                a == b && r == q && s === t && e == f
            case (.finish(let a), .finish(let b)): a == b
            case (.resumeResignation(let a), .resumeResignation(let b)): a == b
            default: false
            }
        }
    }

    /// What the driver should log or count.
    enum Event: Sendable, Equatable {
        case becameLeader(election: String, term: Int64)
        case awaitingEvidence(election: String, term: Int64, AwaitedEvidence)
        /// A lock given back that the session did not hold (the election's id).
        case strayRelease(election: Int)
        case strayWaiterToken
        case leaseExpired
        case joined(incarnation: Int, members: Int)
    }

    enum Phase: Sendable, Hashable { case idle, running, exited }
    enum StopKind: Sendable, Hashable { case graceful, hard }

    /// One registered activator's election.
    struct Election: Sendable {
        var machine = ElectionStateMachine()
        let mailbox: Mailbox
        let metrics: ElectionMetrics
        /// `elections.id`: stable for the database, learnt on the first session.
        var id: Int?
        /// The election row was looked up on the current session: the node may try its lock.
        var setUp = false
        /// The current leadership's scope (set when it begins, cleared when its end is announced).
        var scope: LeaderScope?
        /// Someone waits for this election's resignation to finish.
        var resignWaiting = false
        /// When a resignation ended leadership (for the node-initiated `.stopped`).
        var endedAt: ContinuousClock.Instant?
        /// The node's graceful stop asked the activator to hand the election over.
        var askedToResign = false
        /// The term is bumped and the predecessor did not hand over: the evidence awaited.
        var evidence: AwaitedEvidence?
        /// Its triggers in the current leadership.
        var triggers = TriggerQueue()
    }

    /// Leaderships a loss takes out of play: the driver ends each scope at `at`, then reports them back.
    struct Ending: Sendable {
        var at: ContinuousClock.Instant
        var scopes: [(election: String, scope: LeaderScope)]
    }

    let settings: Settings
    var phase = Phase.idle
    var stop: StopKind?
    /// A hard stop is ending leaderships: no new one may start.
    var halting = false
    var failure: StokerError?
    var elections: [String: Election] = [:]
    /// Scopes taken out of their election before they were surely ended; the session thread ends them (again,
    /// idempotently) before it lets the session go.
    var ending: [ObjectIdentifier: LeaderScope] = [:]
    /// Generation of the current (or last) session; 0: none yet.
    var generation: UInt64 = 0
    /// The current session, while one is open.
    var session: Session?
    /// Test hooks: hold the session thread (at its next idle point) and the watchdog.
    var freeze: Duration?
    var watchdogFreeze: Duration?
    var outbox: [Delivery] = []
    var events: [Event] = []

    var nextMailbox = 0

    init(settings: Settings) { self.settings = settings }

    /// The deliveries queued so far, in order; the driver performs them before it leaves the critical section.
    mutating func takeDeliveries() -> [Delivery] {
        defer { outbox.removeAll() }
        return outbox
    }

    /// The events queued so far (for the driver's log and metrics).
    mutating func takeEvents() -> [Event] {
        defer { events.removeAll() }
        return events
    }

    /// A number for the next activator's mailbox.
    mutating func makeMailbox(_ continuation: AsyncStream<ActivatorMessage>.Continuation) -> Mailbox {
        nextMailbox += 1
        return Mailbox(number: nextMailbox, continuation: continuation)
    }

    // MARK: - Running and stopping

    /// `run()` was called; false when it ran before (a node runs once).
    mutating func runRequested() -> Bool {
        guard phase == .idle else { return false }
        phase = .running
        return true
    }

    var isStopping: Bool { stop != nil }

    mutating func gracefulStopRequested() {
        if stop == nil { stop = .graceful }
    }

    /// A hard stop's first step: no new leadership from here on, and every current one ends at `now` (the driver ends
    /// the scopes, then calls ``hardStopContinued()``).
    mutating func hardStopRequested(now: ContinuousClock.Instant) -> Ending {
        halting = true
        return beginLoss(.connectionLost, at: now, finishing: .cancelled)
    }

    /// A hard stop's second step: stop; every election is withdrawn. The driver ends the scopes returned, then cuts
    /// both sockets, then performs `stopped` (the activators' last messages) — in that order.
    mutating func hardStopContinued() -> (scopes: [LeaderScope], stopped: [Delivery]) {
        stop = .hard
        var scopes = Array(ending.values)
        var stopped: [Delivery] = []
        for name in elections.keys.sorted() {
            guard let election = elections[name] else { continue }
            if let scope = election.scope { scopes.append(scope) }
            if election.resignWaiting { stopped.append(.resumeResignation(name)) }
            stopped.append(
                .stopped(election.mailbox, .cancelled, scope: election.scope, endedAt: election.endedAt))
        }
        elections.removeAll()
        return (scopes, stopped)
    }

    /// The session thread has exited (`failure`: what stopped it, if anything). Every election is withdrawn: the
    /// driver ends the scopes returned at `now`, then performs the deliveries.
    mutating func sessionThreadFinished(failure: StokerError?) -> (scopes: [LeaderScope], stopped: [Delivery]) {
        phase = .exited
        if self.failure == nil { self.failure = failure }
        var scopes: [LeaderScope] = []
        var stopped: [Delivery] = []
        for name in elections.keys.sorted() {
            guard let election = elections[name] else { continue }
            if let scope = election.scope { scopes.append(scope) }
            if election.resignWaiting {
                stopped.append(.resumeResignation(name))
                stopped.append(.finish(election.mailbox))
            } else {
                stopped.append(
                    .stopped(election.mailbox, .nodeStopped, scope: election.scope, endedAt: election.endedAt))
            }
        }
        elections.removeAll()
        ending.removeAll()
        session = nil
        return (scopes, stopped)
    }

    // MARK: - Activators

    enum Registration: Sendable, Equatable {
        case registered
        /// The node has stopped (or is stopping): the activator was told so at once.
        case nodeStopped
        case duplicate
    }

    /// An activator registers for `election`.
    mutating func registered(_ election: String, mailbox: Mailbox, metrics: ElectionMetrics) -> Registration {
        if elections[election] != nil { return .duplicate }
        if phase == .exited || stop != nil {
            outbox.append(.message(mailbox, .stopped(.nodeStopped, endedAt: nil)))
            outbox.append(.finish(mailbox))
            return .nodeStopped
        }
        elections[election] = Election(mailbox: mailbox, metrics: metrics)
        return .registered
    }

    enum Resignation: Sendable {
        /// Done: the activator withdrew (`scope`: a leadership to end at `now`, if one was still there).
        case done(LeaderScope?)
        /// End `scope` at `endedAt`, let its leader work drain (when asked), then wait with `markReady`.
        case release(LeaderScope, endedAt: ContinuousClock.Instant)
        /// Wait for the session thread to finish it (without `markReady`).
        case wait
    }

    /// The activator of `election` resigns: hand the election over and withdraw.
    mutating func resignRequested(_ name: String, now: ContinuousClock.Instant) -> Resignation {
        guard var election = elections[name] else { return .done(nil) }
        switch election.machine.resign() {
        case .finishResignation:
            // A follower — or a leadership a loss is ending right now (its scope is still here): end it too.
            elections[name] = nil
            outbox.append(.finish(election.mailbox))
            if let scope = election.scope { ending[ObjectIdentifier(scope)] = scope }
            return .done(election.scope)
        case .endLeadingAndRelease:
            guard let scope = election.scope else {
                // Never began (waiting for evidence, or a bump that answered into a resignation): the session thread
                // releases the lock now.
                _ = election.machine.leaderWorkDrained()
                elections[name] = election
                return .wait
            }
            election.endedAt = now
            elections[name] = election
            return .release(scope, endedAt: now)
        default:
            // Acquiring: the session thread finishes the resignation when the bump answers.
            elections[name] = election
            return .wait
        }
    }

    /// Someone waits for the resignation of `name` to finish (`leaderWorkDrained`: its leader work has finished, the
    /// lock may be released). False when it has finished already: do not wait.
    mutating func resignationAwaited(_ name: String, leaderWorkDrained: Bool) -> Bool {
        guard var election = elections[name],
            election.machine.state == .releasing || election.machine.state == .resigning(wasLeading: true)
                || election.machine.state == .resigning(wasLeading: false)
        else { return false }
        election.resignWaiting = true
        if leaderWorkDrained { _ = election.machine.leaderWorkDrained() }
        elections[name] = election
        return true
    }

    // MARK: - Test hooks

    mutating func freezeRequested(session: Duration, watchdog: Duration?) {
        freeze = session
        if let watchdog { watchdogFreeze = watchdog }
    }

    // MARK: - Losing leadership

    /// First step of a loss: every leadership of the node stops counting as one — no longer a candidate, its demotion
    /// being announced — and every scope still held is returned, to be ended at `at` outside the lock. Resignations
    /// under way finish (their lock is gone with the session).
    mutating func beginLoss(
        _ reason: DemotionReason, at instant: ContinuousClock.Instant, finishing shutdown: ShutdownReason
    ) -> Ending {
        var scopes: [(election: String, scope: LeaderScope)] = []
        for name in elections.keys.sorted() {
            guard var election = elections[name] else { continue }
            let action = election.machine.leadershipLost(reason)
            // A wait for evidence ends with the session: the lock it was for is gone.
            election.evidence = nil
            if let scope = election.scope { scopes.append((name, scope)) }
            switch action {
            case .finishResignation:
                elections[name] = election
                finishResignation(name, reason: shutdown)
            default:
                elections[name] = election
            }
        }
        return Ending(at: instant, scopes: scopes)
    }

    /// The scopes of a loss have ended (the driver ended each): announce each demotion.
    mutating func leadershipsEnded(_ ending: Ending, reason: DemotionReason) {
        for (name, scope) in ending.scopes {
            guard var election = elections[name], election.scope === scope else { continue }
            election.scope = nil
            if election.machine.leadershipEnded() == .announceDemotion {
                outbox.append(.demoted(election.mailbox, reason, scope: scope))
            }
            elections[name] = election
        }
    }

    /// A resignation is complete: resume the activator waiting for it, or (node-initiated) tell it the node stopped.
    mutating func finishResignation(_ name: String, reason: ShutdownReason) {
        guard let election = elections.removeValue(forKey: name) else { return }
        // Only a scope not yet ended needs tracking; the driver ends it again, idempotently, before the session goes.
        if let scope = election.scope { ending[ObjectIdentifier(scope)] = scope }
        if election.resignWaiting {
            outbox.append(.resumeResignation(name))
            outbox.append(.finish(election.mailbox))
        } else {
            outbox.append(.stopped(election.mailbox, reason, scope: election.scope, endedAt: election.endedAt))
        }
    }

    // MARK: - The lease

    /// Which of the node's two sessions a reply came from.
    enum Side: Sendable, Hashable { case main, witness }

    /// The deadline of the current session's lease (nil before both sessions' first trusted reply, or with no
    /// session).
    var leaseDeadline: ContinuousClock.Instant? { session?.leaseDeadline }

    /// What the lease watchdog does next.
    enum WatchdogStep: Sendable, Equatable {
        case exit
        case hold(Duration)
        /// Sleep until the deadline (nil: until woken), then report ``leaseDeadlinePassed(generation:now:)``.
        case sleep(until: ContinuousClock.Instant?, generation: UInt64)
    }

    mutating func watchdogTurn() -> WatchdogStep {
        if phase == .exited { return .exit }
        if let hold = watchdogFreeze {
            watchdogFreeze = nil
            return .hold(hold)
        }
        return .sleep(until: session?.expiredAt == nil ? session?.leaseDeadline : nil, generation: generation)
    }

    /// The lease deadline of session `generation` may have passed (checked here again: a reply may just have
    /// extended it). Marking the expiry and taking every leadership out of play are one step, for that session only:
    /// the driver ends the scopes at the deadline, cuts both sockets, then reports ``leadershipsEnded(_:reason:)``.
    mutating func leaseDeadlinePassed(generation: UInt64, now: ContinuousClock.Instant) -> Ending? {
        guard generation == self.generation, var session, session.expiredAt == nil,
            let deadline = session.leaseDeadline, now >= deadline
        else { return nil }
        session.expiredAt = deadline
        self.session = session
        events.append(.leaseExpired)
        return beginLoss(.leaseExpired, at: deadline, finishing: .nodeStopped)
    }

    /// Whether session `generation` is the current one (its sockets are the ones to cut).
    func isCurrent(_ generation: UInt64) -> Bool { session != nil && self.generation == generation }

    enum Trust: Sendable {
        case trusted
        /// Too late to be trusted: the lease is over. The driver ends the leaderships of `ending` (if any: the
        /// deadline has passed) as for an expiry, then abandons the session.
        case leaseExpired(Ending?)
    }

    /// A reply to a request sent at `sent` arrived on `side`: renew that session's half of the lease, unless it is
    /// too late to be trusted.
    mutating func replied(on side: Side, sentAt sent: ContinuousClock.Instant, now: ContinuousClock.Instant) -> Trust {
        guard var session, session.expiredAt == nil, stop != .hard, now < sent + settings.valid,
            session.leaseDeadline.map({ now < $0 }) ?? true
        else {
            return .leaseExpired(leaseDeadlinePassed(generation: generation, now: now))
        }
        switch side {
        case .main: session.mainConfirmedSent = max(sent, session.mainConfirmedSent ?? sent)
        case .witness: session.witnessConfirmedSent = max(sent, session.witnessConfirmedSent ?? sent)
        }
        if let main = session.mainConfirmedSent, let witness = session.witnessConfirmedSent {
            let deadline = min(main, witness) + settings.valid
            session.leaseDeadline = max(deadline, session.leaseDeadline ?? deadline)
        }
        self.session = session
        return .trusted
    }
}

/// What a successor waits for before its leadership begins, when its predecessor did not hand over.
struct AwaitedEvidence: Sendable, Hashable {
    let term: Int64
    /// The predecessor's node id (incarnation); nil when the election's row was last written on another timeline (a
    /// failover to an asynchronous standby may have lost its last leader): then only the lease counts.
    let predecessor: Int?
    /// The predecessor joined the server this session is on: its node lock, held by its witness, is the evidence (free
    /// once its process is gone or it has ended its leaderships and closed the witness). Otherwise (a restart or
    /// failover ended every session since, or its row is gone): its next incarnation's row naming it, or its lease
    /// surely run out at `leaseRunOut`.
    let sameServer: Bool
    let leaseRunOut: ContinuousClock.Instant
    /// The predecessor's next incarnation acknowledged it (checked after a server change).
    var acknowledged = false
}

/// What a term bump (`take_term`) answered.
struct TakenTerm: Sendable, Hashable {
    let term: Int64
    /// The same transaction found the evidence (a hand-over, or the predecessor's witness gone) and began.
    let began: Bool
    let predecessor: Int?
    let sameServer: Bool
    /// The longest lease the predecessor (or, not knowing it, any member) may have had.
    let leaseMilliseconds: Int?
}

/// An election a statement won and bumped: its term bump's answer, and the leadership's scope when it began in that
/// statement's transaction. A named type, not a tuple: the runtime builds a tuple's type metadata at its first use, and
/// that first use was a node's first takeover.
struct TakenElection: Sendable {
    let election: Int
    let term: TakenTerm
    let scope: LeaderScope?
}
