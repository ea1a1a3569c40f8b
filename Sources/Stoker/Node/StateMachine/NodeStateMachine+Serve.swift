/// Serving a joined session: which statement the session thread runs next, and what its answers mean.
extension NodeStateMachine {
    /// The session thread's next step. Each statement's answer comes back through ``replied(_:sentAt:now:)``.
    enum Step: Sendable, Equatable {
        /// Send the witness's heartbeat (without waiting for it), then report ``witnessHeartbeatSent(now:)``.
        case sendWitnessHeartbeat
        /// The lease is over: abandon the session (report ``sessionFailed(_:leaseLost:now:)`` with `leaseLost`).
        case leaseExpired
        /// A hard stop: abandon the session without a goodbye.
        case hardStop
        /// Every activator has handed its election over: leave the cluster (`node_down`), then end the session.
        case leave
        /// Give back a lock this session holds for an election nobody stands for, or a resignation's (`hand_over`).
        case handOver(election: Int)
        /// Bump the term of an election whose lock was won without one (`take_term`).
        case takeTerm(election: Int)
        /// Look up the row of an election registered since the session began.
        case setUpElection(String)
        /// Give back the waiter token of an election.
        case releaseWaiterToken(election: Int)
        /// Wait in the lock queue of `election` up to `wait` (with the heartbeat when `beat`); on the grant bump its
        /// term, try and bump the `others` too.
        case waitAndTake(election: Int, others: [Int], wait: Duration, beat: Bool)
        /// The heartbeat with a try (and a bump, in a later step) of `others`; with a claim of a waiter token; with a try
        /// of the schema's sweeper token, when `claimSweeper`.
        case heartbeatAndTry(others: [Int], claim: Bool, claimSweeper: Bool)
        /// The heartbeat; with a try of the schema's sweeper token, when `claimSweeper`.
        case heartbeat(claimSweeper: Bool)
        /// Delete the rows of members whose node lock is gone (`node_down`, reason died) — the sweeper's every
        /// `sweepInterval`, and anyone's after a lock-queue grant (its holder may just have died).
        case sweep
        /// Run the join's rehearsal of a takeover again (a transaction rolled back): the tables it reads were vacuumed
        /// or analyzed since, which invalidates every plan of their statements, and the next takeover would plan them
        /// again in the middle of a failover.
        case rehearse
        /// Try to become the waiter of one of these elections.
        case claimWaiter([Int])
        /// Try the locks of these elections, bumping the term of each one won.
        case tryTake([Int])
        /// Wait in the queue of `predecessor`'s node lock up to `wait`; on the grant begin the leadership.
        case awaitPredecessor(election: Int, name: String, predecessor: Int, wait: Duration, term: Int64)
        /// Did `predecessor`'s next incarnation name it (its acknowledgement)?
        case checkAcknowledged(name: String, predecessor: Int)
        /// The evidence is in: begin the leadership of `term`.
        case beginTerm(election: Int, name: String, term: Int64)
        /// Read election `election`'s triggers numbered after `after`, in order, a page at most.
        case readTriggers(election: Int, after: Int64)
        /// Delete election `election`'s triggers numbered `sequences` (handled).
        case deleteTriggers(election: Int, sequences: [Int64])
        /// Sleep until `until`, a notification, a wake-up, or news on the witness session.
        case waitIdle(until: ContinuousClock.Instant)
        /// Test hook: hold the thread, touching nothing.
        case hold(Duration)
    }

    /// What a statement answered (rows already decoded by the driver).
    enum Reply: Sendable {
        /// `leaderNode`: the leader's node id, when it has one.
        case electionSetUp(String, id: Int, leader: String?, leaderNode: Int? = nil)
        case handedOver(election: Int, held: Bool)
        case termTaken(election: Int, TakenTerm, scope: LeaderScope?)
        case waiterTokenReleased(held: Bool)
        /// `renewed`: node rows the heartbeat renewed (when it beat); `granted`: the waited-for lock; `taken`: the
        /// elections won and bumped in that statement.
        /// `maintenance` (with the heartbeat): how many times the tables a takeover reads were vacuumed or analyzed.
        case waitedAndTook(
            election: Int, beat: Bool, renewed: Int, granted: Bool,
            taken: [TakenElection], maintenance: Int64? = nil)
        /// `sweeper`: the sweeper token was claimed.
        case heartbeatAndTried(renewed: Int, won: [Int], claimed: Int?, sweeper: Bool = false)
        case heartbeat(renewed: Int, sweeper: Bool = false)
        /// The rehearsal ran (or the server refused it: it is not tried again until the tables' next maintenance).
        case rehearsed
        /// How many dead members' rows the sweep deleted.
        case swept(Int)
        case claimedWaiter(Int?)
        case triedAndTook([TakenElection])
        /// `began`: the leadership began (true), the wait timed out (false), the term moved on (nil).
        case awaitedPredecessor(name: String, term: Int64, began: Bool?, scope: LeaderScope?)
        case acknowledged(name: String, Bool)
        case termBegun(name: String, term: Int64, began: Bool, scope: LeaderScope?)
        /// `complete`: fewer than a page came back.
        case triggersRead(election: Int, [PendingTrigger], complete: Bool)
        case triggersDeleted(election: Int, sequences: [Int64])
        case left
    }

    /// What to do with a reply.
    enum Outcome: Sendable {
        case proceed
        /// The lease ran out before the reply (see ``Trust/leaseExpired(_:)``).
        case leaseExpired(Ending?)
        /// Abandon the session with this error.
        case fail(StokerError)
        /// The node left the cluster: end the session.
        case left
    }

    // MARK: - The next step

    /// Candidates: followers whose row is set up on this session — none while stopping.
    private var candidates: [Int] {
        guard stop == nil, !halting else { return [] }
        return elections.values.compactMap { election in
            election.machine.isCandidate && election.setUp ? election.id : nil
        }.sorted()
    }

    /// Whether the session holds (or may hold) an election's lock: then it must never sit in a lock queue.
    private var holdsElection: Bool { elections.values.contains { $0.machine.mayHoldLock } }

    /// The session thread's next step, at `now`.
    mutating func nextStep(now: ContinuousClock.Instant) -> Step {
        // No joined session: nothing to serve (the driver never asks then); abandon it rather than go on.
        guard var session, session.joined else { return .leaseExpired }
        defer { self.session = session }
        // Nothing is trusted past the lease: the watchdog may already have ended it.
        if session.expiredAt != nil || !(session.leaseDeadline.map { now < $0 } ?? false) { return .leaseExpired }
        if stop == .hard { return .hardStop }
        if session.witnessQuery == nil, now >= session.nextWitnessBeat { return .sendWitnessHeartbeat }
        // What is in flight first: locks to give back, bumps of locks won — also before a graceful leave, so a lock
        // won for an election withdrawn meanwhile is handed over (`released`), not dropped with the session.
        if let id = session.strayLocks.first { return .handOver(election: id) }
        if let id = session.bumpsDue.first { return .takeTerm(election: id) }
        switch stop {
        case .hard?:
            return .hardStop
        case .graceful?:
            // Each activator hands its election over itself (awaiting its leader work); the node leaves last.
            for name in elections.keys.sorted() where elections[name]?.askedToResign == false {
                elections[name]?.askedToResign = true
                if let mailbox = elections[name]?.mailbox { outbox.append(.message(mailbox, .gracefulShutdown)) }
            }
            if elections.isEmpty { return Self.deletionStep(session) ?? .leave }
        case nil:
            break
        }
        if let name = elections.keys.sorted().first(where: { elections[$0]?.setUp == false }) {
            return .setUpElection(name)
        }
        if let id = elections.keys.sorted().compactMap({ name -> Int? in
            guard let election = elections[name], election.machine.isReleasing else { return nil }
            return election.id
        }).first {
            return .handOver(election: id)
        }

        let candidates = self.candidates
        // One follower per election — the one holding its waiter token, a follower that leads nothing — spends its
        // time *in* the election's lock queue: the server grants the lock the instant the holder's session ends (a
        // crash, the server ending it, a hand-over). Every other node keeps its session free for notifications, and
        // retries on them (`released`, a member gone or come) and at `retryInterval`, when a follower also tries to
        // become the waiter of an election that has none.
        let mayWait = !holdsElection && freeze == nil
        if let token = session.waiterToken, !mayWait || !candidates.contains(token) {
            return .releaseWaiterToken(election: token)
        }
        if let claim = session.pendingClaim {
            session.pendingClaim = nil
            let list = claim.filter { candidates.contains($0) }
            if mayWait, session.waiterToken == nil, !list.isEmpty { return .claimWaiter(list) }
        }
        let waitOn = mayWait ? session.waiterToken : nil
        // In claim order: a try's answer and a claim take them in this order.
        let others = Self.claimOrder(candidates.filter { $0 != waitOn }, leaders: session.leaders)
        // Death detection: one node of the schema — the holder of its sweeper token, claimed with the heartbeat by
        // whoever does not hold it — sweeps every `sweepInterval`; a dead sweeper's token is free at once, and the next
        // heartbeat of another node claims it and sweeps.
        if session.sweepNow || (session.sweeper && now >= session.nextSweep) {
            session.sweepNow = false
            session.nextSweep = now + settings.sweepInterval
            return .sweep
        }
        let claimSweeper = !session.sweeper
        if now >= session.nextHeartbeat {
            // The fallback retry rides on the heartbeat when it would be due before the next one; so does the wait.
            let retrying = !others.isEmpty && (session.retryNow || session.nextRetry <= now + settings.heartbeat)
            if let first = waitOn, !retrying {
                return .waitAndTake(election: first, others: others, wait: queueWait(session, now: now), beat: true)
            }
            if retrying {
                session.retryNow = false
                session.nextRetry = max(session.nextRetry, now) + settings.retryInterval
                return .heartbeatAndTry(others: others, claim: mayWait && waitOn == nil, claimSweeper: claimSweeper)
            }
            // No election to wait for yet: after the heartbeat, try to become the waiter of one that has none.
            if mayWait, waitOn == nil, !candidates.isEmpty {
                session.pendingClaim = Self.claimOrder(candidates, leaders: session.leaders)
            }
            return .heartbeat(claimSweeper: claimSweeper)
        }
        // Triggers after the heartbeat and the sweep: a flood of them never holds back the lease or death detection.
        if let step = triggerStep(&session) { return step }
        if !others.isEmpty, session.retryNow || now >= session.nextRetry {
            // Told to (a release, a member gone or come, a new election), or the fallback's time.
            if !session.retryNow { session.nextRetry = now + settings.retryInterval }
            session.retryNow = false
            // Something changed (a new leader, a release, a member gone or come): an election may lack a waiter.
            session.claimIfNoneWon = mayWait && waitOn == nil ? others : nil
            return .tryTake(others)
        }
        session.retryNow = false
        // A waiter's heartbeat saw the count move (a waiter that stopped waiting meanwhile still rehearses: it may be
        // one again soon); a node that stands for nothing any more keeps it for when it does.
        if session.rehearsalDue, !candidates.isEmpty {
            session.rehearsalDue = false
            return .rehearse
        }

        var until = session.nextHeartbeat
        // The witness's answer wakes the poll; with nothing outstanding, its next heartbeat is due then.
        if session.witnessQuery == nil { until = min(until, session.nextWitnessBeat) }
        if let step = evidenceStep(until: until, now: now, &session) { return step }
        if let first = waitOn {
            return .waitAndTake(election: first, others: others, wait: queueWait(session, now: now), beat: false)
        }
        if !others.isEmpty { until = min(until, session.nextRetry) }
        if session.sweeper { until = min(until, session.nextSweep) }
        if let hold = freeze {
            // Test hook: held where the thread would sleep in poll(2), so on resuming it reads the socket first, as a
            // thread stopped inside poll would.
            freeze = nil
            return .hold(hold)
        }
        return .waitIdle(until: until)
    }

    /// `ids` in the order to claim a waiter token in: first the elections whose leader leads the most of them, then by
    /// id. One session waits in one lock queue, and its grant tries the other candidates in the same statement; so
    /// the one waiter of a node covers at once every election of the leader it waits behind — the one whose crash
    /// would otherwise leave the most elections to the next retry.
    static func claimOrder(_ ids: [Int], leaders: [Int: Int]) -> [Int] {
        var led: [Int: Int] = [:]
        for id in ids { if let leader = leaders[id] { led[leader, default: 0] += 1 } }
        let weight = { (id: Int) in leaders[id].flatMap { led[$0] } ?? 0 }
        return ids.sorted { weight($0) != weight($1) ? weight($0) > weight($1) : $0 < $1 }
    }

    /// How long a follower's wait in an election's lock queue lasts (the sweeper's ends by its next sweep).
    private func queueWait(_ session: Session, now: ContinuousClock.Instant) -> Duration {
        var wait = min(session.longestWait, settings.longestQueueWait)
        if session.sweeper { wait = min(wait, now.duration(to: session.nextSweep)) }
        return max(.milliseconds(1), wait)
    }

    /// One step of the wait for evidence that a predecessor stopped acting, for the elections awaiting it in turn: on
    /// the same server, in the queue of its node lock (granted the instant its witness closes); after a server change,
    /// its acknowledgement or its lease run out. Nil when no election awaits evidence.
    private mutating func evidenceStep(
        until: ContinuousClock.Instant, now: ContinuousClock.Instant, _ session: inout Session
    ) -> Step? {
        let waiting = elections.keys.sorted().compactMap { name -> (String, Int, AwaitedEvidence)? in
            guard let election = elections[name], case .awaitingEvidence = election.machine.state,
                let evidence = election.evidence, let id = election.id
            else { return nil }
            return (name, id, evidence)
        }
        let previous = session.lastAwaited
        guard
            let (name, id, evidence) = waiting.first(where: { entry in previous.map { entry.0 > $0 } ?? true })
                ?? waiting.first
        else { return nil }
        if evidence.sameServer, let predecessor = evidence.predecessor {
            session.lastAwaited = name
            // A wait never longer than half the statement timeout (the server's timeout must never cut it), nor
            // 250 ms, below the server's `deadlock_timeout`.
            let left = min(now.duration(to: until), settings.statementTimeout / 2, .milliseconds(250))
            guard left >= .milliseconds(1) else { return .waitIdle(until: until) }
            return .awaitPredecessor(
                election: id, name: name, predecessor: predecessor, wait: left, term: evidence.term)
        }
        if session.checkAcknowledgement, let predecessor = evidence.predecessor, !evidence.acknowledged {
            session.checkAcknowledgement = false
            return .checkAcknowledged(name: name, predecessor: predecessor)
        }
        session.lastAwaited = name
        if evidence.acknowledged || now >= evidence.leaseRunOut {
            return .beginTerm(election: id, name: name, term: evidence.term)
        }
        // Until a member joins (its row may be the acknowledgement) or the lease has run out.
        return .waitIdle(until: min(until, evidence.leaseRunOut))
    }

    // MARK: - Replies

    /// The answer to the statement of a step, sent at `sent`: trusted (it renews the lease) or not, then acted on.
    mutating func replied(
        _ reply: Reply, sentAt sent: ContinuousClock.Instant, now: ContinuousClock.Instant
    ) -> Outcome {
        if case .leaseExpired(let ending) = replied(on: .main, sentAt: sent, now: now) { return .leaseExpired(ending) }
        guard var session else { return .proceed }
        defer { self.session = session }
        switch reply {
        case .electionSetUp(let name, let id, let leader, let leaderNode):
            guard var election = elections[name] else { return .proceed }
            session.leaders[id] = leaderNode
            election.id = id
            election.setUp = true
            outbox.append(.message(election.mailbox, .leaderObserved(leader)))
            elections[name] = election
            session.retryNow = true
        case .handedOver(let id, let held):
            if !held { events.append(.strayRelease(election: id)) }
            if let index = session.strayLocks.firstIndex(of: id) {
                session.strayLocks.remove(at: index)
            } else if let name = elections.keys.sorted().first(where: {
                elections[$0]?.id == id && elections[$0]?.machine.isReleasing == true
            }) {
                if elections[name]?.machine.released() == .finishResignation {
                    finishResignation(name, reason: .nodeStopped)
                }
            }
        case .termTaken(let id, let taken, let scope):
            session.bumpsDue.removeAll { $0 == id }
            termBumped(election: id, taken, scope: scope, now: now, &session)
        case .waiterTokenReleased(let held):
            if !held { events.append(.strayWaiterToken) }
            session.waiterToken = nil
        case .waitedAndTook(let id, let beat, let renewed, let granted, let taken, let maintenance):
            // The node's row is gone: no leadership begins on this session (its locks go with it).
            if beat, renewed == 0 { return .fail(Self.rowDeleted) }
            Self.noteMaintenance(maintenance, &session)
            // Granted: the statement gave the waiter token back.
            if granted, session.waiterToken == id { session.waiterToken = nil }
            for won in taken { lockWon(election: won.election, taken: won.term, scope: won.scope, now: now, &session) }
            // Its holder is gone: whatever else it held is likely free too; and if it died, a sweep now reports it.
            if granted {
                session.retryNow = true
                session.sweepNow = true
            }
            if beat { session.nextHeartbeat = sent + settings.heartbeat }
        case .heartbeatAndTried(let renewed, let won, let claimed, let sweeper):
            if let claimed { session.waiterToken = claimed }
            if renewed == 0 { return .fail(Self.rowDeleted) }
            if sweeper { Self.becomeSweeper(&session) }
            session.nextHeartbeat = sent + settings.heartbeat
            for id in won { lockWon(election: id, taken: nil, scope: nil, now: now, &session) }
        case .heartbeat(let renewed, let sweeper):
            if renewed == 0 { return .fail(Self.rowDeleted) }
            session.nextHeartbeat = sent + settings.heartbeat
            if sweeper { Self.becomeSweeper(&session) }
        case .swept:
            // Each row deleted sends its node_down; nothing else to do.
            break
        case .rehearsed:
            break
        case .claimedWaiter(let token):
            if let token { session.waiterToken = token }
        case .triedAndTook(let taken):
            for won in taken { lockWon(election: won.election, taken: won.term, scope: won.scope, now: now, &session) }
            if taken.isEmpty, let claim = session.claimIfNoneWon { session.pendingClaim = claim }
            session.claimIfNoneWon = nil
        case .awaitedPredecessor(let name, let term, let began, let scope):
            guard let began else { return .fail(Self.termMovedOn(name)) }
            if began { evidenceFound(name, term: term, scope: scope) }
        case .acknowledged(let name, let acknowledged):
            if acknowledged, case .awaitingEvidence = elections[name]?.machine.state {
                elections[name]?.evidence?.acknowledged = true
            }
        case .termBegun(let name, let term, let began, let scope):
            guard began else { return .fail(Self.termMovedOn(name)) }
            evidenceFound(name, term: term, scope: scope)
        case .triggersRead(let id, let triggers, let complete):
            triggersRead(election: id, triggers, complete: complete)
        case .triggersDeleted(let id, let sequences):
            triggersDeleted(election: id, sequences: sequences, &session)
        case .left:
            return .left
        }
        return .proceed
    }

    /// A heartbeat read how many times the tables a takeover reads were vacuumed or analyzed: when the count moved
    /// since the last one (or since the join read it, before its rehearsal), every plan of their statements was
    /// invalidated — rehearse the takeover again. Without a mark yet, the count only sets it.
    private static func noteMaintenance(_ count: Int64?, _ session: inout Session) {
        guard let count else { return }
        if let seen = session.maintenanceSeen, seen != count { session.rehearsalDue = true }
        session.maintenanceSeen = count
    }

    /// This session holds the schema's sweeper token now: it sweeps at once (the previous sweeper may have died
    /// unreported), then every `sweepInterval`.
    private static func becomeSweeper(_ session: inout Session) {
        session.sweeper = true
        session.sweepNow = true
    }

    /// Which election a lock won belongs to, and the metrics a scope of it counts with (for the driver, which
    /// prepares the scope before it reports a bump that began).
    func election(withID id: Int) -> (name: String, metrics: ElectionMetrics)? {
        guard let name = electionName(withID: id), let election = elections[name] else { return nil }
        return (name, election.metrics)
    }

    /// The registered election whose row is `id` (its name), if any.
    func electionName(withID id: Int) -> String? {
        elections.keys.sorted().first { elections[$0]?.id == id }
    }

    /// This session holds the lock of election `id` now — and, when `taken` is given, the same statement already
    /// bumped its term; otherwise the bump is due.
    private mutating func lockWon(
        election id: Int, taken: TakenTerm?, scope: LeaderScope?, now: ContinuousClock.Instant,
        _ session: inout Session
    ) {
        // The activator went away between the try and now: give the lock back.
        guard let name = electionName(withID: id), var election = elections[name] else {
            return session.strayLocks.append(id)
        }
        let action = election.machine.lockWon()
        elections[name] = election
        switch action {
        case .bumpTerm:
            if let taken {
                termBumped(election: id, taken, scope: scope, now: now, &session)
            } else {
                session.bumpsDue.append(id)
            }
        case .releaseLock:
            session.strayLocks.append(id)
        default:
            break
        }
    }

    /// The term bump of election `id` answered. Without a hand-over or a free node lock of the predecessor, the
    /// leadership waits for evidence that the predecessor stopped acting: the term is bumped (the fence refuses the
    /// predecessor already), `isLeader` stays false.
    private mutating func termBumped(
        election id: Int, _ taken: TakenTerm, scope: LeaderScope?, now: ContinuousClock.Instant,
        _ session: inout Session
    ) {
        guard let name = electionName(withID: id), var election = elections[name] else {
            return session.strayLocks.append(id)
        }
        if halting || stop == .hard {
            // A hard stop began while the bump was in flight: this leadership never starts; a resignation asked
            // meanwhile is finished (the lock goes with the session).
            let action = election.machine.leadershipLost(.connectionLost)
            elections[name] = election
            if action == .finishResignation { finishResignation(name, reason: .cancelled) }
            return
        }
        let began = taken.began && scope != nil
        switch election.machine.termBumped(taken.term, began: began) {
        case .startLeading(let term):
            if let scope {
                election.scope = scope
                election.triggers.begin()
                outbox.append(.message(election.mailbox, .leader(scope, members: memberList)))
                events.append(.becameLeader(election: name, term: term))
            }
        case .awaitEvidence(let term):
            // The longest lease the predecessor (or, not knowing it, any member) may have had, and never less than
            // this node's own.
            let lease = max(settings.lease, .milliseconds(taken.leaseMilliseconds ?? 0))
            let evidence = AwaitedEvidence(
                term: term, predecessor: taken.predecessor, sameServer: taken.sameServer, leaseRunOut: now + lease)
            election.evidence = evidence
            session.checkAcknowledgement = true
            events.append(.awaitingEvidence(election: name, term: term, evidence))
        default:
            break
        }
        elections[name] = election
    }

    /// Leadership of `name` began on the server (its begin committed): start the scope and tell the activator —
    /// unless the election's machine says otherwise (a loss or a resignation came first).
    private mutating func evidenceFound(_ name: String, term: Int64, scope: LeaderScope?) {
        guard var election = elections[name], !halting, stop != .hard, let scope else { return }
        let action = election.machine.evidenceFound()
        election.evidence = nil
        if case .startLeading = action {
            election.scope = scope
            election.triggers.begin()
            outbox.append(.message(election.mailbox, .leader(scope, members: memberList)))
            events.append(.becameLeader(election: name, term: term))
        }
        elections[name] = election
    }

    /// The members of the current session's cluster (this node included), by incarnation.
    var memberList: [ClusterMember] {
        (session?.members ?? [:]).map { ClusterMember(id: $0.key, name: $0.value) }.sorted { $0.id < $1.id }
    }

    /// Whether the machine kept `scope` (a leadership prepared by the driver that did not begin is uncounted).
    func holds(_ scope: LeaderScope) -> Bool {
        elections.values.contains { $0.scope === scope }
    }

    // MARK: - Notifications

    /// The cluster channel's notifications arrived (decoded; others' channels already filtered out).
    mutating func notified(_ notifications: [ClusterEvent]) {
        guard var session else { return }
        defer { self.session = session }
        for event in notifications {
            switch event {
            case .nodeUp(let member), .nodeDown(let member, _):
                guard member.id != session.nodeID else { continue }
                let change: ClusterChange
                if case .nodeDown(_, let reason) = event {
                    // Once per member: a change the member list already shows (a row read at the join, whose
                    // notification came after) is not news.
                    guard session.members.removeValue(forKey: member.id) != nil else { continue }
                    change = .nodeDown(member, reason: reason)
                } else {
                    // Its row may be the acknowledgement a successor waits for.
                    session.checkAcknowledgement = true
                    session.retryNow = true
                    guard session.members.updateValue(member.name, forKey: member.id) == nil else { continue }
                    change = .nodeUp(member)
                }
                for name in elections.keys.sorted() where elections[name]?.machine.leadingTerm != nil {
                    if let mailbox = elections[name]?.mailbox { outbox.append(.message(mailbox, .member(change))) }
                }
                // A member gone may have freed locks; one come back may have acknowledged its predecessor.
                session.retryNow = true
            case .leader(let election, let node):
                session.leaders[election] = node
                // This node's own bump: its answer, not the notification, says whether a leadership began.
                if node == session.nodeID { continue }
                let leader = node.flatMap { session.members[$0] }
                for name in elections.keys.sorted() {
                    guard let entry = elections[name], entry.id == election, entry.machine.leadingTerm == nil else {
                        continue
                    }
                    outbox.append(.message(entry.mailbox, .leaderObserved(leader)))
                }
                // A new leader may have been its election's waiter: another follower can take the role now.
                session.retryNow = true
            case .trigger(let election):
                triggerSent(election: election)
            case .released(let election):
                session.leaders[election] = nil
                for name in elections.keys.sorted() {
                    guard let entry = elections[name], entry.id == election, entry.machine.isCandidate else {
                        continue
                    }
                    outbox.append(.message(entry.mailbox, .leaderObserved(nil)))
                    session.retryNow = true
                }
            }
        }
    }

    static let rowDeleted = StokerError(
        .connectionLost, "This node's row was deleted by someone else; rejoining as a new incarnation.")

    static func termMovedOn(_ name: String) -> StokerError {
        StokerError(
            .unexpectedResult, "The term of election \"\(name)\" moved on while this node held its lock; rejoining.")
    }
}
