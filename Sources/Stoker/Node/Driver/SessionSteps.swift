/// Serving a joined session: the session thread asks the machine for its next step, performs it on the connections,
/// and reports the answer — decoded, nothing decided here.
extension NodeDriver {
    func serve(_ context: inout SessionContext) throws -> NodeStateMachine.SessionEnd {
        guard let statements = context.statements else {
            throw StokerError(.unexpectedResult, "The node's session was not set up.")
        }
        let connection = context.connection
        let nodeID = "\(context.nodeID)"
        let nodeName = configuration.nodeName
        while true {
            try collectWitness(context)
            let step = withMachine { locked in
                let step = locked.machine.nextStep(now: .now)
                if case .hold = step {
                    locked.holding += 1
                    locked.sessionHolds += 1
                }
                return step
            }
            let sent = ContinuousClock.now
            let reply: NodeStateMachine.Reply
            var prepared: [LeaderScope] = []
            /// A scope for a leadership that began in the statement's transaction, counted before anyone can see it
            /// (so the gauge goes 1, then 0), and outside the lock (a metrics handler is user code).
            func prepare(_ id: Int, term: Int64, began: Bool) -> LeaderScope? {
                guard began, let (name, electionMetrics) = withMachine({ $0.machine.election(withID: id) }) else {
                    return nil
                }
                let scope = LeaderScope(
                    term: term, election: name, incarnation: context.nodeID, metrics: electionMetrics,
                    lease: context.lease)
                electionMetrics.leading(true)
                prepared.append(scope)
                return scope
            }
            /// The elections won and bumped (`decoded`), each with its scope when it began: the caller decodes every row
            /// before any scope is prepared (a bad row then leaves no leadership counted).
            func scoped(_ decoded: [TakenElection]) -> [TakenElection] {
                decoded.map {
                    TakenElection(
                        election: $0.election, term: $0.term,
                        scope: prepare($0.election, term: $0.term.term, began: $0.term.began))
                }
            }
            switch step {
            case .sendWitnessHeartbeat:
                do {
                    try context.witness.sendPrepared(statements.witnessHeartbeat, [])
                } catch {
                    throw Self.witnessLost(error)
                }
                withMachine { $0.machine.witnessHeartbeatSent(now: sent) }
                continue
            case .leaseExpired:
                throw LeaseExpired()
            case .hardStop:
                return .hardStop
            case .leave:
                _ = try connection.executePrepared(statements.leave, [nodeID])
                reply = .left
            case .rehearse:
                // A refused statement (a timeout on a busy server, say) leaves the plans to the next takeover.
                try refusable(
                    "a rehearsal of a takeover", otherwise: (),
                    then: "the next takeover plans its statements itself; it is rehearsed again after the next vacuum",
                    meanwhile: "the next takeover plans its statements itself"
                ) { () throws(StokerError) in
                    // The heartbeat that made it due has set the mark already.
                    _ = try warmUpAndRehearse(on: connection, statements, clusterID: context.clusterID)
                }
                reply = .rehearsed
            case .sweep:
                // The next interval sweeps again.
                reply = .swept(
                    try refusable("a sweep for dead nodes", otherwise: 0) { () throws(StokerError) in
                        try connection.executePrepared(statements.sweep, []).singleRow().int(0)
                    })
            case .handOver(let id):
                // Clears the leader (if it is this node) and unlocks, in one statement: its commit sends `released`.
                let held = try connection.executePrepared(statements.handOver, ["\(id)", nodeID]).singleRow().bool(0)
                reply = .handedOver(election: id, held: held)
            case .takeTerm(let id):
                let row = try connection.executePrepared(statements.takeTerm, ["\(id)", nodeID, nodeName]).singleRow()
                let term = try TakenTerm(row, from: 0)
                reply = .termTaken(election: id, term, scope: prepare(id, term: term.term, began: term.began))
            case .setUpElection(let name):
                let id = try statements.ensureElection(cluster: context.clusterID, name: name, on: connection)
                let leader = try connection.executePrepared(statements.whereis, ["\(context.clusterID)", name]).rows
                    .first
                reply = .electionSetUp(
                    name, id: id, leader: try leader.map { try $0.string(2) },
                    leaderNode: try leader.map { try $0.int(1) })
            case .releaseWaiterToken(let id):
                let held = try connection.executePrepared(statements.releaseWaiter, ["\(id)"]).singleRow().bool(0)
                reply = .waiterTokenReleased(held: held)
            case .waitAndTake(let id, let others, let wait, let beat):
                let rows = try connection.executePrepared(
                    statements.waitAndTake,
                    [nodeID, "\(id)", "\(wait.roundedUpMilliseconds)", nodeName, beat ? "true" : "false", list(others)]
                ).rows
                guard let first = rows.first else {
                    throw StokerError(.unexpectedResult, "The lock-queue wait returned no row.")
                }
                let granted = try first.bool(2)
                let renewed = beat ? try first.int(0) : 0
                reply = .waitedAndTook(
                    election: id, beat: beat, renewed: renewed, granted: granted,
                    taken: scoped(try TakenElection.won(byWaitAndTake: rows)),
                    maintenance: beat ? try first.optionalInt(8).map(Int64.init) : nil)
                if beat { metrics.heartbeatRoundTrip.recordNanoseconds(sent.duration(to: .now).nanoseconds) }
            case .heartbeatAndTry(let others, let claim, let claimSweeper):
                let row = try connection.executePrepared(
                    statements.heartbeatAndTry,
                    [nodeID, list(others), claim ? "true" : "false", claimSweeper ? "true" : "false"]
                ).singleRow()
                reply = .heartbeatAndTried(
                    renewed: try row.int(0), won: try Self.integers(inArrayLiteral: try row.string(1)),
                    claimed: claim && !row.isNull(2) ? try row.int(2) : nil,
                    sweeper: try row.optionalBool(3) == true)
                metrics.heartbeatRoundTrip.recordNanoseconds(sent.duration(to: .now).nanoseconds)
            case .heartbeat(let claimSweeper):
                let row = try connection.executePrepared(
                    statements.heartbeat, [nodeID, claimSweeper ? "true" : "false"]
                ).singleRow()
                reply = .heartbeat(renewed: try row.int(0), sweeper: try row.optionalBool(1) == true)
                metrics.heartbeatRoundTrip.recordNanoseconds(sent.duration(to: .now).nanoseconds)
            case .claimWaiter(let elections):
                let row = try connection.executePrepared(statements.claimWaiter, [list(elections)]).singleRow()
                reply = .claimedWaiter(try row.optionalInt(0))
            case .tryTake(let elections):
                let rows = try connection.executePrepared(statements.tryTake, [list(elections), nodeID, nodeName]).rows
                reply = .triedAndTook(scoped(try rows.map { try TakenElection($0, election: 0, from: 1) }))
            case .awaitPredecessor(let id, let name, let predecessor, let wait, let term):
                let began = try connection.executePrepared(
                    statements.awaitPredecessor,
                    ["\(predecessor)", "\(wait.roundedUpMilliseconds)", "\(id)", "\(term)", nodeID, nodeName]
                ).singleRow().optionalBool(0)
                reply = .awaitedPredecessor(
                    name: name, term: term, began: began, scope: prepare(id, term: term, began: began == true))
            case .checkAcknowledged(let name, let predecessor):
                let acknowledged = try connection.executePrepared(statements.acknowledged, ["\(predecessor)"])
                    .singleRow()
                    .bool(0)
                reply = .acknowledged(name: name, acknowledged)
            case .beginTerm(let id, let name, let term):
                let began =
                    try connection.executePrepared(statements.beginTerm, ["\(id)", "\(term)", nodeID, nodeName])
                    .singleRow()
                    .optionalBool(0) == true
                reply = .termBegun(name: name, term: term, began: began, scope: prepare(id, term: term, began: began))
            case .readTriggers(let id, let after):
                let triggers = try refusable("reading the election's triggers", otherwise: []) {
                    () throws(StokerError) in
                    try connection.executePrepared(
                        statements.readTriggers, ["\(id)", "\(after)", "\(NodeStateMachine.triggerPage)"]
                    ).rows.map { row throws(StokerError) in
                        NodeStateMachine.PendingTrigger(sequence: Int64(try row.int(0)), payload: try row.string(1))
                    }
                }
                reply = .triggersRead(
                    election: id, triggers, complete: triggers.count < NodeStateMachine.triggerPage)
            case .deleteTriggers(let id, let sequences):
                let numbers = "{" + sequences.map(String.init).joined(separator: ",") + "}"
                try refusable("deleting handled triggers", otherwise: ()) { () throws(StokerError) in
                    _ = try connection.executePrepared(statements.deleteTriggers, ["\(id)", numbers])
                }
                reply = .triggersDeleted(election: id, sequences: sequences)
            case .waitIdle(let until):
                try waitIdle(until: until, context)
                takeNotifications(context)
                continue
            case .hold(let duration):
                // Held where the thread would sleep in poll(2), so on resuming it reads the socket first.
                hold(duration, releasedAfter: .zero, waitingOn: sessionSignal)
                state.withLock { $0.holding -= 1 }
                continue
            }
            // A leadership that begins with this answer starts from the members as they were when it began: what came
            // with the answer (a lock-queue wait's, an evidence wait's) is news from before — the death of the very
            // holder whose lock was just granted among it.
            takeNotifications(context)
            let ((outcome, unused), events) = withMachineDeferringEvents { locked in
                let outcome = locked.machine.replied(reply, sentAt: sent, now: .now)
                return (outcome, prepared.filter { !locked.machine.holds($0) })
            }
            if case .leaseExpired(let ending) = outcome {
                defer { for scope in unused { scope.metrics.leading(false) } }
                try leaseRanOut(ending, context, events: events)
            }
            log(events)
            // A leadership prepared that did not begin (a stop or a resignation came first): uncounted.
            for scope in unused { scope.metrics.leading(false) }
            takeNotifications(context)
            switch outcome {
            case .proceed:
                continue
            case .leaseExpired:
                throw LeaseExpired()
            case .fail(let error):
                throw error
            case .left:
                logger.info("left the cluster", metadata: metadata)
                return .stopped
            }
        }
    }

    /// Runs `body`; a statement the server refused (a lock timeout, a conflict, a privilege this role lacks) leaves
    /// the session fine and gives `otherwise`, with a warning — losing the session over a sweep or a trigger would end
    /// every leadership of a healthy node, and a role granted what an earlier version listed (no privileges on the
    /// triggers table) still elects. Any other failure (the session is gone) is thrown. The warning says what happens
    /// `next`, or with a privilege missing, what is left `meanwhile`.
    private func refusable<T>(
        _ what: String, otherwise fallback: T,
        then next: String = "a sweep runs again at the next interval; triggers are read again at the next one sent",
        meanwhile: String = "triggers wait in the table",
        _ body: () throws(StokerError) -> T
    ) throws(StokerError) -> T {
        let result: Result<T, StokerError> = Result { () throws(StokerError) -> T in try body() }
        switch result {
        case .success(let value):
            return value
        case .failure(let error):
            guard error.code == .queryFailed, !Self.endsSession(error.sqlState) else { throw error }
            var fix = next
            if error.sqlState == "42501" {
                fix = "grant this role what `stoker migrate --grant-to ROLE` grants (\(meanwhile))"
            }
            logger.warning(
                "the server refused \(what); \(fix)",
                metadata: metadata.merging(["stoker.error": "\(error)"], uniquingKeysWith: { $1 }))
            return fallback
        }
    }

    /// A statement's error that comes with the end of the session — the server terminating it (class 57, operator
    /// intervention, but for a statement cancelled by its timeout) or a connection exception (class 08) — read before
    /// libpq noticed the connection closed.
    static func endsSession(_ sqlState: String?) -> Bool {
        guard let sqlState else { return false }
        return sqlState.hasPrefix("08") || (sqlState.hasPrefix("57") && sqlState != "57014")
    }

    /// `[1, 2]` → `{1,2}` (an int4 array's text form).
    private func list(_ elections: [Int]) -> String {
        "{" + elections.map(String.init).joined(separator: ",") + "}"
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

    /// Hands the cluster channel's notifications to the machine, decoded.
    private func takeNotifications(_ context: SessionContext) {
        let events = context.connection.takeNotifications().compactMap { notification in
            notification.channel == context.channel ? ClusterEvent(payload: notification.payload) : nil
        }
        if !events.isEmpty { withMachine { $0.machine.notified(events) } }
    }

    /// Sleeps until `until`, a notification, a wake-up, or news on the witness session (its heartbeat's answer, or —
    /// with nothing outstanding — the server ending it, which throws here).
    private func waitIdle(until: ContinuousClock.Instant, _ context: SessionContext) throws {
        var polls = 0
        let outcome = try context.connection.waitForNotifications(
            until: until, wakeDescriptor: sessionSignal.descriptor, watchDescriptor: context.witness.socket,
            pollCount: &polls)
        if outcome == .watched, state.withLock({ $0.machine.witnessQuerySentAt == nil }) {
            do {
                try context.witness.consumeInput()
            } catch {
                throw Self.witnessLost(error)
            }
        }
    }

    /// The witness session's side, never blocking: collects the answer to its heartbeat if it has arrived (a trusted
    /// answer renews its half of the lease). The witness runs nothing else: an idle backend sees its client's end at
    /// once (a crash frees the node lock with the process), where one busy in a statement would notice only at its
    /// next connection check.
    private func collectWitness(_ context: SessionContext) throws {
        guard state.withLock({ $0.machine.witnessQuerySentAt != nil }) else { return }
        let result: QueryResult?
        do {
            result = try context.witness.awaitResult(until: .now)
        } catch {
            throw Self.witnessLost(error)
        }
        guard result != nil else { return }
        let (trust, events) = withMachineDeferringEvents { $0.machine.witnessReplied(now: .now) }
        if case .leaseExpired(let ending) = trust { try leaseRanOut(ending, context, events: events) }
        log(events)
    }

    static func witnessLost(_ error: StokerError) -> StokerError {
        StokerError(.connectionLost, "The node's witness session ended: \(error.serverMessage ?? error.message)")
    }
}

extension TakenElection {
    /// A won election's row: its id in column `election`, `take_term`'s five columns from `column`; no scope yet.
    init(_ row: QueryResult.Row, election: Int, from column: Int) throws(StokerError) {
        self.init(election: try row.int(election), term: try TakenTerm(row, from: column), scope: nil)
    }

    /// The elections a `wait_and_take` answer (`ProtocolStatements/waitAndTake`'s columns) won: its granted rows.
    static func won(byWaitAndTake rows: [QueryResult.Row]) throws -> [TakenElection] {
        try rows.filter { try $0.bool(2) }.map { try TakenElection($0, election: 1, from: 3) }
    }
}

extension TakenTerm {
    /// What `take_term` answered, read from its five columns starting at `column`.
    init(_ row: QueryResult.Row, from column: Int) throws(StokerError) {
        self.init(
            term: Int64(try row.int(column)),
            began: try row.bool(column + 1),
            predecessor: try row.optionalInt(column + 2),
            sameServer: try row.optionalBool(column + 3) ?? false,
            leaseMilliseconds: try row.optionalInt(column + 4))
    }
}
