#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The session thread: the only owner of the node's two connections. It connects, joins (`JoinProtocol.swift`),
/// runs the steps the machine decides and reports their answers, and reconnects as a new incarnation when a session
/// ends — with the backoff of ``ReconnectPolicy``.
extension NodeDriver {
    /// A reply came too late to be trusted: the lease is over.
    struct LeaseExpired: Error {}

    /// What the session thread knows of one session beside the machine: its connections and their SQL.
    struct SessionContext {
        let connection: PGConnection
        /// The witness session: holds the node lock, otherwise only heartbeats.
        let witness: PGConnection
        let generation: UInt64
        let lease: LeaseClock
        /// The incarnation this one follows, if any.
        let replaces: Int?
        var statements: ProtocolStatements?
        var clusterID = 0
        var channel = ""
        var nodeID = 0
    }

    func sessionThread() {
        var policy = ReconnectPolicy(
            first: configuration.reconnectDelay, maximum: configuration.maximumReconnectDelay,
            resetAfter: configuration.effectiveHeartbeatInterval)
        var joinedOnce = false
        // The last incarnation this node joined as: the next one names it (its acknowledgement that every leadership
        // of that incarnation has ended).
        var lastIncarnation: Int?
        var failure: StokerError?
        while !state.withLock({ $0.machine.isStopping }) {
            if joinedOnce { metrics.reconnects.increment() }
            let end: NodeStateMachine.SessionEnd
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
                end = .connectionLost(error)
            }
            if joined { joinedOnce = true }
            policy.sessionEnded(joined: joined, lasted: started.duration(to: .now))
            switch end {
            case .stopped, .hardStop:
                break
            case .leaseExpired:
                policy.leaseExpired()
                continue
            case .connectionLost(let error):
                if !ReconnectPolicy.isRetryable(error, joinedOnce: joinedOnce) {
                    // Not an error line, nor a notice: run() throws this error, and whoever called it reports it (a
                    // ServiceGroup logs it, `stoker node` prints it) — once.
                    logger.info(
                        "the node stopped: \(error.message)",
                        metadata: metadata.merging(["stoker.error": "\(error)"], uniquingKeysWith: { $1 }))
                    failure = error
                    break
                }
                logger.warning(
                    "session lost; reconnecting in \(policy.delay)",
                    metadata: metadata.merging(["stoker.error": "\(error)"], uniquingKeysWith: { $1 }))
                sleep(policy.backOff(random: Double.random(in: 0...1)))
                continue
            }
            break
        }
        finish(failure: failure)
    }

    /// Sleeps `duration`, or less when a stop is requested.
    private func sleep(_ duration: Duration) {
        let deadline = ContinuousClock.now + duration
        while !state.withLock({ $0.machine.isStopping }) {
            let remaining = ContinuousClock.now.duration(to: deadline)
            if remaining <= .zero { return }
            sessionSignal.wait(timeout: remaining)
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
    ) -> NodeStateMachine.SessionEnd {
        let sockets = [dup(connection.socket), dup(witness.socket)].filter { $0 >= 0 }
        let opened: (UInt64, LeaseClock)? = withMachine { locked in
            guard let generation = locked.machine.sessionOpened(now: .now) else { return nil }
            locked.lease = LeaseClock()
            locked.sockets = sockets
            locked.backendPID = connection.protocolBackendPID
            locked.witnessBackendPID = witness.protocolBackendPID
            return (generation, locked.lease)
        }
        defer { for socket in sockets { closeDescriptor(socket) } }
        guard let (generation, lease) = opened else { return .stopped }
        var context = SessionContext(
            connection: connection, witness: witness, generation: generation, lease: lease, replaces: replacing)
        let end = run(&context, joined: &joined)
        if context.nodeID != 0 { incarnation = context.nodeID }
        let (at, scopes) = withMachine { locked in
            locked.sockets = []
            locked.member = nil
            locked.backendPID = nil
            locked.witnessBackendPID = nil
            return locked.machine.sessionClosed(now: .now)
        }
        // Whoever else is still announcing a demotion, no leader work of this session outlives it.
        for scope in scopes { endScope(scope, at: at, reason: "the session ended") }
        lease.revoke()
        return end
    }

    private func run(_ context: inout SessionContext, joined: inout Bool) -> NodeStateMachine.SessionEnd {
        do {
            try join(&context)
            joined = true
            return try serve(&context)
        } catch {
            // First: end leadership, at once, on the thread that saw the session go. After a lease expiry it ended at
            // the deadline.
            let stokerError =
                (error as? StokerError) ?? StokerError(.connectionLost, "The node's session failed: \(error)")
            let (failure, events) = withMachineDeferringEvents {
                $0.machine.sessionFailed(stokerError, leaseLost: error is LeaseExpired, now: .now)
            }
            lose(failure.ending, reason: failure.reason, cut: failure.cut ? context.generation : nil, events: events)
            return failure.end
        }
    }

    /// Runs `body` (one or more statements on `side`) and, if the reply came in time, renews the lease from its send
    /// time; otherwise the lease is over (its leaderships end) and this throws.
    func confirmed<T>(
        _ context: SessionContext, on side: NodeStateMachine.Side = .main, _ body: () throws -> T
    ) throws -> T {
        let sent = ContinuousClock.now
        let value = try body()
        let (trust, events) = withMachineDeferringEvents { $0.machine.replied(on: side, sentAt: sent, now: .now) }
        if case .leaseExpired(let ending) = trust { try leaseRanOut(ending, context, events: events) }
        log(events)
        return value
    }

    /// The lease ran out before a reply: end what the expiry took out of play (as the watchdog would), then abandon
    /// the session.
    func leaseRanOut(
        _ ending: NodeStateMachine.Ending?, _ context: SessionContext, events: [NodeStateMachine.Event]
    ) throws -> Never {
        if let ending {
            lose(ending, reason: .leaseExpired, cut: context.generation, events: events)
        } else {
            log(events)
        }
        sessionSignal.signal()
        throw LeaseExpired()
    }
}
