/// One session of the node (its main connection and its witness): opened, joined, served, lost or left.
extension NodeStateMachine {
    /// What the machine knows of the current session.
    struct Session: Sendable {
        let generation: UInt64
        /// The join finished: the node row exists and both sessions confirmed.
        var joined = false
        /// This incarnation (the nodes row id; 0 until joined).
        var nodeID = 0
        /// Members by id, this node included.
        var members: [Int: String] = [:]
        var mainConfirmedSent: ContinuousClock.Instant?
        var witnessConfirmedSent: ContinuousClock.Instant?
        /// The lease deadline: the older of the two sessions' last trusted sends, plus `lease − margin`.
        var leaseDeadline: ContinuousClock.Instant?
        /// The lease ran out at this deadline: every leadership of the session ended there.
        var expiredAt: ContinuousClock.Instant?
        /// The longest a lock-queue wait may last: below the server's `deadlock_timeout` (learnt at join).
        var longestWait = Duration.milliseconds(250)
        /// When the witness's outstanding heartbeat was sent (nil: none outstanding).
        var witnessQuery: ContinuousClock.Instant?
        /// When the witness's next heartbeat is due.
        var nextWitnessBeat: ContinuousClock.Instant
        var nextHeartbeat: ContinuousClock.Instant
        var nextRetry: ContinuousClock.Instant
        /// Try the candidates' locks at the next turn (a release, a member gone or come, a new election…).
        var retryNow = true
        /// An acknowledgement may have arrived (a member joined): check the awaited evidence again.
        var checkAcknowledgement = true
        /// Triggers handled on this session and not yet deleted, by election id. A deletion lost with the session
        /// leaves the trigger to be handed out again (at least once): the next session starts without them, so no
        /// number read before a server change can delete a trigger given after it.
        var triggersHandled: [Int: Set<Int64>] = [:]
        /// The election whose waiter token this session holds: it waits in that election's lock queue.
        var waiterToken: Int?
        /// Which node leads each election, as last heard (its set-up, `leader`, `released`): a waiter token is claimed
        /// behind the leader of the most elections (``NodeStateMachine/claimOrder(_:leaders:)``).
        var leaders: [Int: Int] = [:]
        /// Try to become the waiter of one of these elections at the next turn (after a heartbeat or a try that won
        /// nothing).
        var pendingClaim: [Int]?
        /// The try of these candidates, if it wins nothing, is followed by a claim of a waiter token.
        var claimIfNoneWon: [Int]?
        /// Locks this session holds for elections no activator stands for any more: give them back.
        var strayLocks: [Int] = []
        /// Elections whose lock was won without a term bump: bump at the next turn.
        var bumpsDue: [Int] = []
        /// The election whose evidence was awaited last (several take turns).
        var lastAwaited: String?
        /// This session holds the schema's sweeper token: it sweeps every `sweepInterval`.
        var sweeper = false
        var nextSweep: ContinuousClock.Instant
        /// Sweep at the next turn (after a lock-queue grant, or on becoming the sweeper).
        var sweepNow = false
        /// How many times the tables a takeover reads were vacuumed or analyzed, as the join or the last waiter's
        /// heartbeat read it.
        var maintenanceSeen: Int64?
        /// Rehearse a takeover again at the next idle turn of a candidate: the count above moved, and every session's
        /// plans of statements on those tables were invalidated with it.
        var rehearsalDue = false
    }

    /// A session was opened: both connections are up. Returns its generation — or nil when the node is stopping (the
    /// driver closes the connections).
    mutating func sessionOpened(now: ContinuousClock.Instant) -> UInt64? {
        guard stop == nil else { return nil }
        generation += 1
        session = Session(
            generation: generation, nextWitnessBeat: now, nextHeartbeat: now + settings.heartbeat,
            nextRetry: now + settings.retryInterval, nextSweep: now + settings.sweepInterval)
        for name in elections.keys { elections[name]?.setUp = false }
        return generation
    }

    /// The join finished: the node row (`nodeID`) is in, with its lock; `members` were read after `LISTEN`.
    /// `deadlockTimeout`: the server's, for the longest queue wait. `maintenance`: how many times the tables a takeover
    /// reads had been vacuumed or analyzed when the join began its rehearsal (see ``Step/rehearse``).
    mutating func joined(
        nodeID: Int, members: [Int: String], deadlockTimeout: Duration, maintenance: Int64? = nil,
        now: ContinuousClock.Instant
    ) {
        guard var session else { return }
        session.joined = true
        session.maintenanceSeen = maintenance
        session.nodeID = nodeID
        session.members = members
        session.longestWait = max(.milliseconds(1), deadlockTimeout * 0.8)
        session.nextHeartbeat = now + settings.heartbeat
        session.nextRetry = now + settings.retryInterval
        session.retryNow = true
        self.session = session
        events.append(.joined(incarnation: nodeID, members: members.count))
    }

    /// The session failed (`leaseLost`: a reply came too late to be trusted). Every leadership of the session ends —
    /// at the deadline when the lease ran out, else `now` — and the driver ends the scopes, cuts the sockets when
    /// `cut`, then reports ``leadershipsEnded(_:reason:)`` with `reason`.
    struct Failure: Sendable {
        var ending: Ending
        var reason: DemotionReason
        /// The lease ran out (the watchdog's work, done here if it did not get to run): cut both sockets.
        var cut: Bool
        var end: SessionEnd
    }

    /// How a session ended, for the reconnect loop.
    enum SessionEnd: Sendable, Equatable {
        case stopped
        case hardStop
        case leaseExpired
        case connectionLost(StokerError)
    }

    mutating func sessionFailed(
        _ error: StokerError, leaseLost: Bool, now: ContinuousClock.Instant
    ) -> Failure {
        let hard = stop == .hard
        guard let current = session else {
            // No session (the driver never reports a failure then): nothing to end; reconnect.
            return Failure(
                ending: Ending(at: now, scopes: []), reason: .connectionLost, cut: false,
                end: hard ? .hardStop : .connectionLost(error))
        }
        // Past a deadline this session really had (a failure before the first confirmed reply is not a lease expiry).
        let pastDeadline = current.leaseDeadline.map { now >= $0 } ?? false
        var failure: Failure
        if let expiredAt = current.expiredAt {
            failure = Failure(
                ending: beginLoss(.leaseExpired, at: expiredAt, finishing: .nodeStopped), reason: .leaseExpired,
                cut: false, end: .leaseExpired)
        } else if leaseLost || pastDeadline {
            // The deadline passed before the watchdog ran (after a freeze, say): a lease expiry, and leadership ended
            // at the deadline, not now.
            let ending = leaseDeadlinePassed(generation: generation, now: now)
            failure = Failure(
                ending: ending ?? Ending(at: now, scopes: []), reason: .leaseExpired, cut: ending != nil,
                end: .leaseExpired)
        } else {
            failure = Failure(
                ending: beginLoss(.connectionLost, at: now, finishing: .nodeStopped), reason: .connectionLost,
                cut: false, end: .connectionLost(error))
        }
        if hard { failure.end = .hardStop }
        return failure
    }

    /// The session is over (both connections about to close): every scope still held ends at the returned instant
    /// (the lease's deadline if it ran out, else `now`) — whoever else is still announcing a demotion, no leader work
    /// of this session outlives it.
    mutating func sessionClosed(now: ContinuousClock.Instant) -> (at: ContinuousClock.Instant, scopes: [LeaderScope]) {
        let at = session?.expiredAt ?? now
        let scopes = elections.keys.sorted().compactMap { elections[$0]?.scope } + ending.values
        ending.removeAll()
        session = nil
        return (at, scopes)
    }

    /// The incarnation of the current session, once joined.
    var incarnation: Int? { session.flatMap { $0.joined ? $0.nodeID : nil } }

    /// When the witness's outstanding heartbeat was sent (the driver collects its answer without blocking).
    var witnessQuerySentAt: ContinuousClock.Instant? { session?.witnessQuery }

    /// The witness's heartbeat answered: renew its half of the lease.
    mutating func witnessReplied(now: ContinuousClock.Instant) -> Trust {
        guard let sent = session?.witnessQuery else { return .trusted }
        session?.witnessQuery = nil
        return replied(on: .witness, sentAt: sent, now: now)
    }

    /// The witness's heartbeat was sent at `now`.
    mutating func witnessHeartbeatSent(now: ContinuousClock.Instant) {
        let next = now + settings.witnessInterval
        session?.witnessQuery = now
        session?.nextWitnessBeat = next
    }
}

extension NodeStateMachine.SessionEnd {
    static func == (lhs: Self, rhs: Self) -> Bool {
        switch (lhs, rhs) {
        case (.stopped, .stopped), (.hardStop, .hardStop), (.leaseExpired, .leaseExpired): true
        case (.connectionLost(let left), .connectionLost(let right)): left.code == right.code
        default: false
        }
    }
}
