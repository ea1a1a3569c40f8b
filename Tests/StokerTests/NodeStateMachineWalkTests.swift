import StokerHarness
import Testing

@testable import Stoker

/// Random walks of the node machine under a simulated driver: the session thread (join, steps answered by a simulated
/// server that knows which locks the session really holds, failures, reconnects), the lease watchdog, a hard stop, a
/// graceful stop, freezes, activators that register and resign, and notifications — interleaved at random, each
/// thread's own calls in the order the driver makes them (`NodeDriver`, `SessionThread`, `SessionSteps`,
/// `LeaseWatchdog`). Every input the machine receives is checked against the invariants at once:
///
/// - at most one leadership per election at a time, and a `.leader` is never delivered twice (nor after a hard stop
///   began, nor for a scope the machine does not keep: `holds` agrees with the delivery);
/// - no lock is asked for while held (advisory locks stack): a try, a wait or a claim never names an election whose
///   machine `mayHoldLock`, nor one whose lock the simulated server says the session holds; a bump, an evidence step
///   or a hand-over only for a lock held;
/// - every leadership ends, and its `.demoted`/`.stopped` comes once, after its `.leader` and after it ended (the
///   driver drops a `.demoted` for a scope not yet ended); nothing is delivered to a finished stream;
/// - nothing is acted on after the stop: after `hardStopContinued` or `sessionThreadFinished` no step is a statement;
/// - no reply sent `lease − margin` ago, or arriving at or past the deadline, is trusted, and the deadline is never
///   past the older side's latest trusted send + `lease − margin`;
/// - every walk stops: every activator is told, every awaited resignation resumed, every scope ended.
///
/// One window is kept out of the checks, as documented on `Delivery.stopped` (and tested on its own in
/// `NodeStateMachineTests`): a resigning leader's scope is ended by the resigning activator right after
/// `resignRequested`, so the walk ends it there.
@Suite("Node state machine walks")
struct NodeStateMachineWalkTests {
    static let walkCount = 200
    static let walkLength = 400

    /// What the walks found: their coverage, the seeds that broke an invariant, and the first three of those
    /// replayed with their traces.
    struct Results: Sendable {
        var coverage = NodeWorld.Coverage()
        var failedSeeds: [UInt64] = []
        var reports: [String] = []
    }

    /// Runs every walk: thousands of steps, computed off the cooperative pool (see `onDedicatedThread`).
    static func walkAll() -> Results {
        var results = Results()
        for walk in 0..<walkCount {
            let seed = 0x4E0D_0000 &+ UInt64(walk)
            var world = NodeWorld(seed: seed)
            world.run(steps: walkLength)
            results.coverage.add(world.coverage)
            guard let violation = world.violation else { continue }
            results.failedSeeds.append(seed)
            if results.failedSeeds.count <= 3 {
                // Replay the seed with its trace (the walk is deterministic).
                var replay = NodeWorld(seed: seed, tracing: true)
                replay.run(steps: walkLength)
                results.reports.append(
                    """
                    seed 0x\(String(seed, radix: 16)): \(violation)
                    last steps:
                    \(replay.trace.suffix(80).joined(separator: "\n"))
                    """
                )
            }
        }
        return results
    }

    @Test("random walks with a simulated driver keep every invariant, and every walk stops cleanly")
    func randomWalks() async throws {
        let results = try await onDedicatedThread { Self.walkAll() }
        let (coverage, failedSeeds) = (results.coverage, results.failedSeeds)
        for report in results.reports { Issue.record("\(report)") }
        #expect(
            failedSeeds.isEmpty,
            """
            \(failedSeeds.count) of \(Self.walkCount) walks broke an invariant; seeds: \
            \(failedSeeds.prefix(10).map { "0x" + String($0, radix: 16) })
            """)
        // The walks really go everywhere: every step, leaders begun both ways, every way to lose or give them up.
        #expect(
            coverage.steps == NodeWorld.Coverage.allSteps,
            "steps never taken: \(NodeWorld.Coverage.allSteps.subtracting(coverage.steps))")
        #expect(coverage.leaders > Self.walkCount)
        #expect(coverage.leadersOnEvidence > 0)
        #expect(coverage.demotions[.connectionLost, default: 0] > 0)
        #expect(coverage.demotions[.leaseExpired, default: 0] > 0)
        #expect(coverage.leaseExpiries > Self.walkCount / 10)
        #expect(coverage.resignedLeaders > 0)
        #expect(coverage.stoppedLeaders > 0)
        #expect(coverage.hardStops > Self.walkCount / 4)
        #expect(coverage.leaves > Self.walkCount / 5)
        #expect(coverage.grants > 0)
        #expect(coverage.rehearsals > 0)
        #expect(coverage.strayLocks > 0)
        #expect(coverage.sessions > 2 * Self.walkCount)
        #expect(coverage.triggersHanded > Self.walkCount)
        #expect(coverage.triggersDeleted > Self.walkCount / 4)
    }

    @Test("a walk is reproducible from its seed")
    func walksAreDeterministic() async throws {
        @Sendable func trace(_ seed: UInt64) -> [String] {
            var world = NodeWorld(seed: seed, tracing: true)
            world.run(steps: 100)
            // Instants print as offsets from the walk's base instant, so two runs compare.
            return world.trace
        }
        let traces = try await onDedicatedThread { [trace(42), trace(42), trace(43)] }
        #expect(traces[0] == traces[1])
        #expect(traces[0] != traces[2])
    }
}

/// One walk: the machine, the simulated driver around it, and what the checks remember.
struct NodeWorld {
    typealias Machine = NodeStateMachine
    typealias Instant = ContinuousClock.Instant

    static let settings = NodeFixture.settings
    static let names = ["a", "b", "c"]
    /// The elections' row ids (stable across sessions, as in the database). Notifications also name 4, which is none.
    static let rowIDs = ["a": 1, "b": 2, "c": 3]
    static let windDownLimit = 5_000

    // MARK: State

    let seed: UInt64
    let tracing: Bool
    var rng: SplitMix64
    /// The trace, in a box so that tracing reads `self` without a mutating access.
    let traceBox = TraceBox()
    var trace: [String] { traceBox.lines }
    var violation: String?
    var coverage = Coverage()
    let t0 = ContinuousClock.now
    var now: Instant
    var machine = Machine(settings: settings)
    var windingDown = false

    /// A registered activator (by mailbox number).
    struct Activator {
        let name: String
        let mailbox: Machine.Mailbox
        /// Its stream finished (`.stopped` or `.finish`): nothing may follow.
        var finished = false
        var resigning = false
        /// `resignationAwaited` said to wait: a `.resumeResignation` must come, once.
        var awaitingResume = false
        var resumed = false
        /// What the activator's own resigning task still has to do, in order.
        var ops: [Op] = []
    }
    var activators: [Int: Activator] = [:]

    /// A leadership delivered as `.leader`.
    struct Leadership {
        let scope: LeaderScope
        let mailbox: Int
        /// `.demoted` or `.stopped` deliveries naming it.
        var announced = 0
    }
    var leaderships: [ObjectIdentifier: Leadership] = [:]
    /// The last leadership delivered per election name.
    var lastLeader: [String: LeaderScope] = [:]

    /// A thread's next calls, in order.
    enum Op {
        /// End the scopes at `at` (outside the lock, as `NodeDriver.endScope`).
        case end([LeaderScope], at: Instant)
        /// Cut both sockets, if `generation` is still the current session.
        case cut(generation: UInt64)
        case leadershipsEnded(Machine.Ending, DemotionReason)
        case sessionFailed(StokerError, leaseLost: Bool)
        case sessionClosed(Machine.SessionEnd)
        /// The session is over (connections closed): reconnect, or stop the thread.
        case loopTop(Machine.SessionEnd)
        case finishThread
        case hardStopContinued(at: Instant)
        /// A hard stop's last step: cut, then hand the activators their last message.
        case cutAndDeliver([Machine.Delivery])
        /// `sessionThreadFinished`'s deliveries, after the scopes ended.
        case deliver([Machine.Delivery])
        /// The activator (by mailbox number) resigns.
        case resign(Int)
        case resignationAwaited(Int, drained: Bool)
    }

    // The session thread.
    enum SessionState {
        /// Between sessions (the reconnect loop's top).
        case idle
        /// Joining: request `stage` (0: main, 1: witness, 2: main) sent at `sent`, if sent.
        case joining(stage: Int, sent: Instant?)
        case serving
        /// A statement in flight, answered at `replyAt` at the earliest.
        case waiting(Machine.Step, sent: Instant, replyAt: Instant)
        /// Held by a freeze until then.
        case held(until: Instant)
        case finished
    }
    var session = SessionState.idle
    var sessionOps: [Op] = []
    var generation: UInt64 = 0
    var nodeID = 0
    var lease = LeaseClock()
    /// The current session's sockets were cut: its next I/O fails.
    var cut = false
    /// What the server knows of the current session: the election locks it holds, the waiter token it holds.
    var locks: Set<Int> = []
    var token: Int?
    /// The session holds the cluster's sweeper token (the simulated server's view).
    var sweeper = false
    /// How many times the tables were vacuumed or analyzed (the server's statistics).
    var maintenance: Int64 = 0
    var witnessAnswerAt: Instant?
    /// The latest sends of the current session trusted on each side.
    var trustedMain: Instant?
    var trustedWitness: Instant?
    var term: Int64 = 10
    /// The triggers table (the simulated server's): per election id, the numbers sent and not deleted, and the last
    /// number given. Kept across sessions, as a table is.
    var triggerTable: [Int: [Int64]] = [:]
    var triggersSent: [Int: Int64] = [:]
    /// The numbers the activators have handled (acknowledged to the machine), per election id.
    var triggersHandled: [Int: Set<Int64>] = [:]
    /// Triggers handed out and not yet acknowledged: the activators' callbacks still running, in order.
    var triggerCallbacks: [(name: String, scope: LeaderScope, sequence: Int64)] = []
    /// The last number handed out per leadership.
    var lastHanded: [ObjectIdentifier: Int64] = [:]

    // The watchdog.
    var watchdogOps: [Op] = []
    var watchdogBusyUntil: Instant?
    var watchdogExited = false

    // Stops.
    var stopperOps: [Op] = []
    var hardStopStarted = false
    /// `hardStopRequested` was called: no leadership may begin from here on.
    var halting = false
    /// `hardStopContinued` or `sessionThreadFinished` was called: nothing is acted on any more.
    var stoppedForGood = false
    var gracefulRequested = false

    init(seed: UInt64, tracing: Bool = false) {
        self.seed = seed
        self.tracing = tracing
        rng = SplitMix64(seed: seed)
        now = t0
    }

    // MARK: Running

    mutating func run(steps: Int) {
        _ = machine.runRequested()
        // One to three activators from the start; more come (and go) during the walk.
        for _ in 0...rng.next(upperBound: UInt64(2)) { register() }
        for _ in 0..<steps {
            guard violation == nil else { return }
            advanceClock()
            act()
        }
        windDown()
    }

    /// Stops the node (gracefully or not, whichever the walk has not begun yet) and lets every thread finish.
    mutating func windDown() {
        guard violation == nil else { return }
        windingDown = true
        if !gracefulRequested && !hardStopStarted {
            if chance(50) {
                requestGracefulStop()
            } else {
                startHardStop()
            }
        }
        var steps = 0
        while violation == nil, !isQuiet {
            steps += 1
            if steps > Self.windDownLimit {
                fail("the node did not stop within \(Self.windDownLimit) steps (session: \(session))")
                return
            }
            advanceClock()
            act()
        }
        guard violation == nil else { return }
        // Everything was told, everything ended.
        if machine.phase != .exited { fail("the session thread never finished") }
        if !machine.elections.isEmpty { fail("elections left after the stop: \(machine.elections.keys.sorted())") }
        for activator in activators.values {
            if !activator.finished { fail("activator \(activator.name) #\(activator.mailbox.number) never finished") }
            if activator.awaitingResume && !activator.resumed {
                fail("the resignation of \(activator.name) was never resumed")
            }
        }
        for leadership in leaderships.values where leadership.scope.endedAt == nil {
            fail("the leadership of \(leadership.scope.election) (term \(leadership.scope.term)) never ended")
        }
    }

    var isQuiet: Bool {
        if case .finished = session {} else { return false }
        return sessionOps.isEmpty && watchdogOps.isEmpty && stopperOps.isEmpty
            && activators.values.allSatisfy { $0.ops.isEmpty } && watchdogExited
    }

    mutating func advanceClock() {
        let roll = rng.next(upperBound: UInt64(1000))
        let milliseconds: UInt64
        switch roll {
        case 0..<600: milliseconds = rng.next(upperBound: UInt64(6))
        case 600..<900: milliseconds = 5 + rng.next(upperBound: UInt64(45))
        case 900..<995: milliseconds = 50 + rng.next(upperBound: UInt64(200))
        default: milliseconds = windingDown ? 10 : 300 + rng.next(upperBound: UInt64(2_200))
        }
        now += .milliseconds(Int(milliseconds))
    }

    /// One thread acts.
    mutating func act() {
        let roll = rng.next(upperBound: UInt64(100))
        switch roll {
        case 0..<50:
            sessionThreadActs()
        case 50..<62:
            watchdogActs()
        case 62..<74:
            if !triggerCallbacks.isEmpty, chance(40) { triggerCallbackReturns() } else { activatorActs() }
        case 74..<82:
            if case .serving = session { notify() }
        case 82..<86:
            if !windingDown { register() }
        case 86..<93:
            if let op = stopperOps.first {
                stopperOps.removeFirst()
                perform(op, thread: "stop")
            } else if !windingDown, !hardStopStarted, rng.next(upperBound: UInt64(1000)) < 8 {
                startHardStop()
            }
        case 93..<95:
            if !windingDown, !gracefulRequested, chance(3) { requestGracefulStop() }
        case 95..<97:
            if !windingDown, chance(5) {
                let hold = Duration.milliseconds(100 + Int(rng.next(upperBound: UInt64(2_000))))
                note("test", "freezeRequested(session: \(hold), watchdog: +100 ms)")
                machine.freezeRequested(session: hold, watchdog: hold + .milliseconds(100))
                afterCall()
            }
        default:
            break
        }
    }

    // MARK: The session thread

    mutating func sessionThreadActs() {
        if let op = sessionOps.first {
            sessionOps.removeFirst()
            perform(op, thread: "session")
            return
        }
        switch session {
        case .finished:
            return
        case .idle:
            // The reconnect loop's top.
            if machine.isStopping {
                sessionOps.append(.finishThread)
                return
            }
            guard let opened = machine.sessionOpened(now: now) else {
                fail("sessionOpened refused while not stopping")
                return
            }
            note("session", "sessionOpened → \(opened)")
            afterCall()
            generation = opened
            nodeID = 100 + Int(opened)
            lease = LeaseClock()
            cut = false
            locks = []
            token = nil
            sweeper = false
            witnessAnswerAt = nil
            trustedMain = nil
            trustedWitness = nil
            coverage.sessions += 1
            session = .joining(stage: 0, sent: nil)
        case .joining(let stage, let sent):
            guard let sent else {
                session = .joining(stage: stage, sent: now)
                return
            }
            if cut || (!windingDown && chance(2)) {
                failSession(NodeFixture.connectionLost)
                return
            }
            if !confirmed(stage == 1 ? .witness : .main, sent: sent, label: "join") { return }
            if stage < 2 {
                session = .joining(stage: stage + 1, sent: nil)
                return
            }
            machine.joined(
                nodeID: nodeID, members: [nodeID: "n1", 20: "n2", 30: "n3"], deadlockTimeout: .seconds(1), now: now)
            note("session", "joined as \(nodeID)")
            afterCall()
            session = .serving
        case .held(let until):
            if now >= until { session = .serving }
        case .waiting(let step, let sent, let replyAt):
            guard now >= replyAt else { return }
            if cut || (!windingDown && chance(2)) {
                failSession(NodeFixture.connectionLost)
                return
            }
            session = .serving
            answer(step, sent: sent)
        case .serving:
            serve()
        }
    }

    /// One turn of `serve`: collect the witness's answer, ask for the next step, perform it.
    mutating func serve() {
        if let sent = machine.witnessQuerySentAt, let at = witnessAnswerAt, now >= at {
            if cut {
                failSession(NodeDriver.witnessLost(NodeFixture.connectionLost))
                return
            }
            witnessAnswerAt = nil
            if !confirmed(.witness, sent: sent, label: "witnessReplied", witnessAnswer: true) { return }
        }
        let step = machine.nextStep(now: now)
        note("session", "nextStep → \(describe(step))")
        afterCall()
        coverage.steps.insert(Coverage.name(step))
        check(step)
        guard violation == nil else { return }
        switch step {
        case .sendWitnessHeartbeat:
            if cut {
                failSession(NodeDriver.witnessLost(NodeFixture.connectionLost))
                return
            }
            machine.witnessHeartbeatSent(now: now)
            afterCall()
            witnessAnswerAt = now + delay()
        case .leaseExpired:
            failSession(StokerError(.connectionLost, "lease expired"), leaseLost: true)
        case .hardStop:
            sessionOps.append(.sessionClosed(.hardStop))
        case .waitIdle:
            if cut {
                failSession(NodeFixture.connectionLost)
                return
            }
            if chance(30) { notify() }
        case .hold(let duration):
            session = .held(until: now + duration)
        default:
            if cut {
                failSession(NodeFixture.connectionLost)
                return
            }
            var replyAt = now + delay()
            switch step {
            case .waitAndTake(_, _, let wait, _), .awaitPredecessor(_, _, _, let wait, _):
                // Half the waits time out.
                if chance(50) { replyAt = now + wait }
            default:
                break
            }
            session = .waiting(step, sent: now, replyAt: replyAt)
        }
    }

    /// The simulated server answers `step`, sent at `sent`; the driver reports the answer.
    mutating func answer(_ step: Machine.Step, sent: Instant) {
        var prepared: [LeaderScope] = []
        /// The try of the sweeper token: never while the session holds it (advisory locks stack); granted at times.
        func trySweeper(_ claim: Bool) -> Bool {
            guard claim else { return false }
            if sweeper { fail("the sweeper token was tried while this session held it: it stacked") }
            guard chance(30) else { return false }
            sweeper = true
            return true
        }
        func take(_ id: Int) -> TakenElection {
            if locks.contains(id) { fail("the server granted election \(id)'s lock twice: it stacked") }
            locks.insert(id)
            let taken = randomTerm()
            return TakenElection(
                election: id, term: taken, scope: prepare(id, term: taken.term, began: taken.began, &prepared))
        }
        let reply: Machine.Reply
        switch step {
        case .leave:
            reply = .left
        case .handOver(let id):
            reply = .handedOver(election: id, held: locks.remove(id) != nil)
        case .takeTerm(let id):
            let taken = randomTerm()
            reply = .termTaken(election: id, taken, scope: prepare(id, term: taken.term, began: taken.began, &prepared))
        case .setUpElection(let name):
            reply = .electionSetUp(name, id: Self.rowIDs[name] ?? 0, leader: chance(30) ? "n2" : nil)
        case .releaseWaiterToken(let id):
            let held = token == id
            if held { token = nil }
            reply = .waiterTokenReleased(held: held)
        case .waitAndTake(let id, let others, _, let beat):
            let granted = chance(30)
            var taken: [TakenElection] = []
            if granted {
                // The grant gives the token back in the same statement.
                token = nil
                taken.append(take(id))
                coverage.grants += 1
            }
            for other in others where chance(20) { taken.append(take(other)) }
            reply = .waitedAndTook(
                election: id, beat: beat, renewed: beat ? renewed() : 0, granted: granted, taken: taken,
                maintenance: beat ? maintenanceCount() : nil)
        case .heartbeatAndTry(let others, let claim, let claimSweeper):
            let tookSweeper = trySweeper(claimSweeper)
            let won = others.filter { _ in chance(25) }
            for id in won {
                if locks.contains(id) { fail("the server granted election \(id)'s lock twice: it stacked") }
                locks.insert(id)
            }
            var claimed: Int?
            if claim, token == nil, chance(50),
                let pick = others.filter({ !won.contains($0) }).randomElement(using: &rng)
            {
                token = pick
                claimed = pick
            }
            reply = .heartbeatAndTried(renewed: renewed(), won: won, claimed: claimed, sweeper: tookSweeper)
        case .heartbeat(let claimSweeper):
            reply = .heartbeat(renewed: renewed(), sweeper: trySweeper(claimSweeper))
        case .rehearse:
            coverage.rehearsals += 1
            reply = .rehearsed
        case .sweep:
            coverage.sweeps += 1
            reply = .swept(Int(rng.next(upperBound: UInt64(3))))
        case .claimWaiter(let ids):
            var claimed: Int?
            if chance(50), let pick = ids.randomElement(using: &rng) {
                token = pick
                claimed = pick
                coverage.claims += 1
            }
            reply = .claimedWaiter(claimed)
        case .tryTake(let ids):
            reply = .triedAndTook(ids.filter { _ in chance(40) }.map { take($0) })
        case .awaitPredecessor(let id, let name, _, _, let term):
            let roll = rng.next(upperBound: UInt64(100))
            let began: Bool? = roll < 45 ? true : roll < 92 ? false : nil
            reply = .awaitedPredecessor(
                name: name, term: term, began: began, scope: prepare(id, term: term, began: began == true, &prepared))
        case .checkAcknowledged(let name, _):
            reply = .acknowledged(name: name, chance(50))
        case .beginTerm(let id, let name, let term):
            let began = chance(92)
            reply = .termBegun(
                name: name, term: term, began: began, scope: prepare(id, term: term, began: began, &prepared))
        case .readTriggers(let id, let after):
            // Pages of two here (the machine's own are larger), so that "more" is walked too.
            let remaining = (triggerTable[id] ?? []).filter { $0 > after }
            let rows = remaining.prefix(2)
            reply = .triggersRead(
                election: id, rows.map { Machine.PendingTrigger(sequence: $0, payload: "p\($0)") },
                complete: remaining.count <= 2)
        case .deleteTriggers(let id, let sequences):
            // Nothing is deleted that an activator has not handled: a trigger is never lost.
            for sequence in sequences where triggerTable[id]?.contains(sequence) == true {
                if triggersHandled[id]?.contains(sequence) != true {
                    fail("trigger \(sequence) of election \(id) deleted, never handled")
                }
                coverage.triggersDeleted += 1
            }
            triggerTable[id]?.removeAll { sequences.contains($0) }
            reply = .triggersDeleted(election: id, sequences: sequences)
        case .sendWitnessHeartbeat, .leaseExpired, .hardStop, .waitIdle, .hold:
            fail("answered a step that is no statement: \(describe(step))")
            return
        }
        guard violation == nil else { return }
        // A leadership that begins with an answer gets the notifications that came with it first.
        if chance(30) { notify() }
        let deadline = machine.leaseDeadline
        let outcome = machine.replied(reply, sentAt: sent, now: now)
        note("session", "replied(\(describe(reply)), sent \(ms(sent))) → \(describe(outcome))")
        var trusted = true
        if case .leaseExpired = outcome { trusted = false }
        checkTrust(trusted: trusted, side: .main, sent: sent, deadline: deadline, label: "replied")
        let delivered = afterCall()
        if ["awaitPredecessor", "checkAcknowledged", "beginTerm"].contains(Coverage.name(step)),
            delivered.contains(where: { if case .message(_, .leader) = $0 { true } else { false } })
        {
            coverage.leadersOnEvidence += 1
        }
        // A prepared leadership is kept exactly when its `.leader` went out.
        for scope in prepared {
            let announced = delivered.contains { delivery in
                if case .message(_, .leader(let leader, _)) = delivery { return leader === scope }
                return false
            }
            if machine.holds(scope) != announced {
                fail("holds(scope) is \(machine.holds(scope)) but its .leader was\(announced ? "" : " not") delivered")
            }
        }
        if case .leaseExpired(let ending) = outcome {
            leaseRanOut(ending)
            return
        }
        if chance(20) { notify() }
        switch outcome {
        case .proceed:
            break
        case .leaseExpired:
            break
        case .fail(let error):
            failSession(error)
        case .left:
            coverage.leaves += 1
            sessionOps.append(.sessionClosed(.stopped))
        }
    }

    /// The driver's `prepare`: a scope for a leadership that began in the statement, when the election is known.
    mutating func prepare(_ id: Int, term: Int64, began: Bool, _ prepared: inout [LeaderScope]) -> LeaderScope? {
        guard began, let (name, metrics) = machine.election(withID: id) else { return nil }
        let scope = LeaderScope(term: term, election: name, incarnation: nodeID, metrics: metrics, lease: lease)
        prepared.append(scope)
        return scope
    }

    /// A reply came too late (`leaseRanOut`): end what the expiry took out of play, then abandon the session.
    mutating func leaseRanOut(_ ending: Machine.Ending?) {
        if let ending {
            sessionOps += [
                .end(ending.scopes.map(\.scope), at: ending.at), .cut(generation: generation),
                .leadershipsEnded(ending, .leaseExpired),
            ]
        }
        failSession(StokerError(.connectionLost, "lease expired"), leaseLost: true)
    }

    /// The statement threw: `run`'s catch.
    mutating func failSession(_ error: StokerError, leaseLost: Bool = false) {
        session = .serving
        sessionOps.append(.sessionFailed(error, leaseLost: leaseLost))
    }

    /// A confirmed reply (`NodeDriver.confirmed`, or the witness's answer) on `side`; false when the session is being
    /// abandoned.
    mutating func confirmed(_ side: Machine.Side, sent: Instant, label: String, witnessAnswer: Bool = false) -> Bool {
        let deadline = machine.leaseDeadline
        let trust = witnessAnswer ? machine.witnessReplied(now: now) : machine.replied(on: side, sentAt: sent, now: now)
        note("session", "\(label) on \(side), sent \(ms(sent)) → \(describe(trust))")
        var trusted = true
        if case .leaseExpired = trust { trusted = false }
        checkTrust(trusted: trusted, side: side, sent: sent, deadline: deadline, label: label)
        afterCall()
        if case .leaseExpired(let ending) = trust {
            leaseRanOut(ending)
            return false
        }
        return true
    }

    // MARK: The watchdog

    mutating func watchdogActs() {
        if let op = watchdogOps.first {
            watchdogOps.removeFirst()
            perform(op, thread: "watchdog")
            return
        }
        guard !watchdogExited else { return }
        if let until = watchdogBusyUntil, now < until { return }
        watchdogBusyUntil = nil
        switch machine.watchdogTurn() {
        case .exit:
            note("watchdog", "exit")
            watchdogExited = true
        case .hold(let duration):
            note("watchdog", "hold \(duration)")
            watchdogBusyUntil = now + duration
        case .sleep(let until, let generation):
            guard let until, now >= until else { return }
            let deadline = machine.leaseDeadline
            let ending = machine.leaseDeadlinePassed(generation: generation, now: now)
            note("watchdog", "leaseDeadlinePassed(\(generation)) → \(ending.map { describe($0) } ?? "nil")")
            afterCall()
            guard let ending else { return }
            coverage.leaseExpiries += 1
            if ending.at != deadline { fail("the expiry's ending is at \(ms(ending.at)), not at the deadline") }
            watchdogOps += [
                .end(ending.scopes.map(\.scope), at: ending.at), .cut(generation: generation),
                .leadershipsEnded(ending, .leaseExpired),
            ]
        }
    }

    // MARK: Stops

    mutating func startHardStop() {
        hardStopStarted = true
        coverage.hardStops += 1
        let ending = machine.hardStopRequested(now: now)
        halting = true
        note("stop", "hardStopRequested → \(describe(ending))")
        afterCall()
        stopperOps += [.end(ending.scopes.map(\.scope), at: ending.at), .hardStopContinued(at: ending.at)]
    }

    mutating func requestGracefulStop() {
        gracefulRequested = true
        note("stop", "gracefulStopRequested")
        machine.gracefulStopRequested()
        afterCall()
    }

    // MARK: Activators

    mutating func register() {
        guard let name = Self.names.randomElement(using: &rng) else { return }
        let (_, continuation) = AsyncStream.makeStream(of: ActivatorMessage.self)
        let mailbox = machine.makeMailbox(continuation)
        let active = machine.elections[name] != nil
        if !active { activators[mailbox.number] = Activator(name: name, mailbox: mailbox) }
        let registration = machine.registered(name, mailbox: mailbox, metrics: NodeFixture.metrics.election(name))
        note("activator", "registered(\(name)) #\(mailbox.number) → \(registration)")
        afterCall()
        if active != (registration == .duplicate) {
            fail("registration of \(name): \(registration), active: \(active)")
        }
    }

    mutating func activatorActs() {
        let pending = activators.keys.sorted().filter { !(activators[$0]?.ops.isEmpty ?? true) }
        if let number = pending.randomElement(using: &rng), var activator = activators[number] {
            let op = activator.ops.removeFirst()
            activators[number] = activator
            perform(op, thread: "activator \(activator.name)#\(number)")
            return
        }
        // An activator resigns on its own (its task cancelled, its initial state failed...).
        guard !windingDown, chance(15) else { return }
        let candidates = activators.keys.sorted().filter { number in
            guard let activator = activators[number] else { return false }
            return !activator.finished && !activator.resigning
        }
        if let number = candidates.randomElement(using: &rng) { startResigning(number) }
    }

    mutating func startResigning(_ number: Int) {
        guard var activator = activators[number], !activator.resigning, !activator.finished else { return }
        activator.resigning = true
        activator.ops.append(.resign(number))
        activators[number] = activator
    }

    /// The oldest running trigger callback returns (or throws, at times): the activator reports it done, handled
    /// when it returned while its leadership went on.
    mutating func triggerCallbackReturns() {
        let (name, scope, sequence) = triggerCallbacks.removeFirst()
        guard let id = Self.rowIDs[name] else { return }
        let handled = scope.endedAt == nil && chance(90)
        if handled { triggersHandled[id, default: []].insert(sequence) }
        let wake = machine.triggerDone(name, sequence: sequence, handled: handled)
        note("activator", "triggerDone(\(name), \(sequence), handled: \(handled)) → \(wake)")
        afterCall()
    }

    // MARK: Notifications

    mutating func notify() {
        var events: [ClusterEvent] = []
        for _ in 0...rng.next(upperBound: UInt64(2)) {
            let ids = [20, 30, 40, nodeID]
            let id = ids.randomElement(using: &rng) ?? 20
            let election = Int(rng.next(upperBound: UInt64(4))) + 1
            switch rng.next(upperBound: UInt64(5)) {
            case 4:
                // Any process sends a trigger: stored first, then notified.
                if election <= 3 {
                    let sequence = (triggersSent[election] ?? 0) + 1
                    triggersSent[election] = sequence
                    triggerTable[election, default: []].append(sequence)
                }
                events.append(.trigger(election: election))
            case 0: events.append(.nodeUp(ClusterMember(id: id, name: "n\(id)")))
            case 1: events.append(.nodeDown(ClusterMember(id: id, name: "n\(id)"), reason: .died))
            case 2: events.append(.leader(election: election, node: chance(20) ? nil : id))
            default: events.append(.released(election: election))
            }
        }
        note("session", "notified(\(events))")
        machine.notified(events)
        afterCall()
    }

    // MARK: Performing a thread's calls

    mutating func perform(_ op: Op, thread: String) {
        switch op {
        case .end(let scopes, let at):
            for scope in scopes {
                if leaderships[ObjectIdentifier(scope)] == nil {
                    fail("\(thread) ends a scope never delivered as leader")
                }
                scope.end(at: at)
            }
            if !scopes.isEmpty { note(thread, "ended \(scopes.count) scope(s) at \(ms(at))") }
        case .cut(let generation):
            if machine.isCurrent(generation), generation == self.generation {
                note(thread, "cut the sockets of session \(generation)")
                cut = true
            }
        case .leadershipsEnded(let ending, let reason):
            machine.leadershipsEnded(ending, reason: reason)
            note(thread, "leadershipsEnded(\(describe(ending)), \(reason))")
            afterCall()
        case .sessionFailed(let error, let leaseLost):
            let failure = machine.sessionFailed(error, leaseLost: leaseLost, now: now)
            note(thread, "sessionFailed(leaseLost: \(leaseLost)) → \(describe(failure.ending)), \(failure.end)")
            afterCall()
            if failure.reason == .leaseExpired, failure.cut { coverage.leaseExpiries += 1 }
            var ops: [Op] = [.end(failure.ending.scopes.map(\.scope), at: failure.ending.at)]
            if failure.cut { ops.append(.cut(generation: generation)) }
            ops += [.leadershipsEnded(failure.ending, failure.reason), .sessionClosed(failure.end)]
            sessionOps.insert(contentsOf: ops, at: 0)
        case .sessionClosed(let end):
            let (at, scopes) = machine.sessionClosed(now: now)
            note(thread, "sessionClosed → \(scopes.count) scope(s) at \(ms(at))")
            afterCall()
            sessionOps.insert(contentsOf: [.end(scopes, at: at), .loopTop(end)], at: 0)
        case .loopTop(let end):
            lease.revoke()
            locks = []
            token = nil
            sweeper = false
            cut = false
            switch end {
            case .stopped, .hardStop:
                sessionOps.insert(.finishThread, at: 0)
            case .leaseExpired, .connectionLost:
                session = .idle
            }
        case .finishThread:
            let (scopes, stopped) = machine.sessionThreadFinished(failure: nil)
            stoppedForGood = true
            session = .finished
            note(thread, "sessionThreadFinished → \(scopes.count) scope(s), \(describe(stopped))")
            afterCall()
            sessionOps.insert(contentsOf: [.end(scopes, at: now), .deliver(stopped)], at: 0)
        case .hardStopContinued(let at):
            let (scopes, stopped) = machine.hardStopContinued()
            stoppedForGood = true
            note(thread, "hardStopContinued → \(scopes.count) scope(s), \(describe(stopped))")
            afterCall()
            stopperOps.insert(contentsOf: [.end(scopes, at: at), .cutAndDeliver(stopped)], at: 0)
        case .cutAndDeliver(let deliveries):
            if machine.isCurrent(generation) { cut = true }
            for delivery in deliveries { deliver(delivery) }
        case .deliver(let deliveries):
            for delivery in deliveries { deliver(delivery) }
        case .resign(let number):
            resign(number, thread: thread)
        case .resignationAwaited(let number, let drained):
            guard let name = activators[number]?.name else { return }
            let pending = machine.resignationAwaited(name, leaderWorkDrained: drained)
            note(thread, "resignationAwaited(\(name), drained: \(drained)) → \(pending)")
            afterCall()
            if pending {
                activators[number]?.awaitingResume = true
            } else if activators[number]?.finished == false {
                fail("resignationAwaited(\(name)) said it is over, but the activator was never finished")
            }
        }
    }

    mutating func resign(_ number: Int, thread: String) {
        guard let name = activators[number]?.name else { return }
        let resignation = machine.resignRequested(name, now: now)
        note(thread, "resignRequested(\(name)) → \(describe(resignation))")
        afterCall()
        switch resignation {
        case .done(let scope):
            if let scope {
                if leaderships[ObjectIdentifier(scope)] == nil { fail("resignation returned an undelivered scope") }
                activators[number]?.ops.append(.end([scope], at: now))
            }
        case .release(let scope, let endedAt):
            coverage.resignedLeaders += 1
            if leaderships[ObjectIdentifier(scope)] == nil { fail("resignation released an undelivered scope") }
            // `NodeDriver.resign` ends it right after `resignRequested`, before anything else of its own (the window
            // between the two is documented on `Delivery.stopped`).
            scope.end(at: endedAt)
            activators[number]?.ops.append(.resignationAwaited(number, drained: true))
        case .wait:
            activators[number]?.ops.append(.resignationAwaited(number, drained: false))
        }
    }
}

// MARK: - Checks

extension NodeWorld {
    mutating func fail(_ message: String) {
        if violation == nil { violation = "at \(ms(now)): \(message)" }
    }

    /// Performs and checks what one call of the machine queued; returns the deliveries.
    @discardableResult
    mutating func afterCall() -> [Machine.Delivery] {
        // The driver extends the lease clock before it delivers (a `.leader` is never seen before its lease).
        if let deadline = machine.leaseDeadline { lease.extend(to: deadline) }
        let deliveries = machine.takeDeliveries()
        for delivery in deliveries { deliver(delivery) }
        for event in machine.takeEvents() {
            switch event {
            case .becameLeader: coverage.leaders += 1
            default: break
            }
        }
        checkMachine()
        return deliveries
    }

    /// The driver performs `delivery` now: check it may.
    mutating func deliver(_ delivery: Machine.Delivery) {
        if tracing { note("deliver", describe(delivery)) }
        func open(_ mailbox: Machine.Mailbox) -> Activator? {
            guard let activator = activators[mailbox.number] else {
                fail("delivery to an unknown mailbox #\(mailbox.number)")
                return nil
            }
            if activator.finished { fail("\(describe(delivery)) to \(activator.name)#\(mailbox.number), finished") }
            return activator
        }
        func announce(_ scope: LeaderScope, to mailbox: Machine.Mailbox, _ what: String) {
            guard var leadership = leaderships[ObjectIdentifier(scope)] else {
                fail("\(what) of a leadership never delivered as leader")
                return
            }
            if leadership.mailbox != mailbox.number { fail("\(what) to another activator than its leader's") }
            if scope.endedAt == nil { fail("\(what) performed before its leadership ended") }
            if leadership.announced > 0 { fail("\(what): the leadership was announced before") }
            leadership.announced += 1
            leaderships[ObjectIdentifier(scope)] = leadership
        }
        switch delivery {
        case .message(let mailbox, let message):
            guard let activator = open(mailbox) else { return }
            switch message {
            case .leader(let scope, _):
                if halting || stoppedForGood { fail("a .leader after the hard stop began") }
                if leaderships[ObjectIdentifier(scope)] != nil { fail("a .leader delivered twice") }
                if scope.endedAt != nil { fail("a .leader for an ended scope") }
                if scope.election != activator.name { fail("a .leader of \(scope.election) to \(activator.name)") }
                if let previous = lastLeader[activator.name], previous.endedAt == nil {
                    fail("two leaderships of \(activator.name) at once: the previous one (term \(previous.term)) runs")
                }
                leaderships[ObjectIdentifier(scope)] = Leadership(scope: scope, mailbox: mailbox.number)
                lastLeader[activator.name] = scope
            case .gracefulShutdown:
                startResigning(mailbox.number)
            case .trigger(let scope, _, let sequence):
                // Only to a leadership that runs, of this activator; in order, once per leadership; never one deleted.
                if leaderships[ObjectIdentifier(scope)]?.mailbox != mailbox.number {
                    fail("trigger \(sequence) to an activator that does not hold its leadership")
                }
                if scope.endedAt != nil { fail("trigger \(sequence) handed to an ended leadership") }
                if let last = lastHanded[ObjectIdentifier(scope)], sequence <= last {
                    fail("trigger \(sequence) after \(last) in one leadership: out of order or twice")
                }
                if let id = Self.rowIDs[scope.election], triggerTable[id]?.contains(sequence) != true {
                    fail("trigger \(sequence) handed out but not in the table")
                }
                lastHanded[ObjectIdentifier(scope)] = sequence
                triggerCallbacks.append((scope.election, scope, sequence))
                // At most a page unfinished per leadership: the mailbox never holds the whole table.
                let unfinished = triggerCallbacks.filter { $0.scope === scope }.count
                if unfinished > Machine.triggerPage { fail("\(unfinished) triggers unfinished in one leadership") }
                coverage.triggersHanded += 1
            default:
                break
            }
        case .demoted(let mailbox, let reason, let scope):
            guard open(mailbox) != nil else { return }
            announce(scope, to: mailbox, ".demoted")
            coverage.demotions[reason, default: 0] += 1
        case .stopped(let mailbox, _, let scope, _):
            guard open(mailbox) != nil else { return }
            if let scope {
                announce(scope, to: mailbox, ".stopped")
                coverage.stoppedLeaders += 1
            }
            activators[mailbox.number]?.finished = true
        case .finish(let mailbox):
            guard open(mailbox) != nil else { return }
            activators[mailbox.number]?.finished = true
        case .resumeResignation(let name):
            guard
                let number = activators.keys.sorted().first(where: {
                    activators[$0]?.name == name && activators[$0]?.awaitingResume == true
                        && activators[$0]?.resumed == false
                })
            else {
                fail("resumeResignation(\(name)) with nobody waiting")
                return
            }
            activators[number]?.resumed = true
        }
    }

    /// What must hold of the machine between any two inputs.
    mutating func checkMachine() {
        for (name, election) in machine.elections {
            if let scope = election.scope {
                guard let leadership = leaderships[ObjectIdentifier(scope)] else {
                    fail("election \(name) holds a scope never delivered as leader")
                    continue
                }
                if leadership.mailbox != election.mailbox.number { fail("election \(name) holds another's scope") }
            }
            if let term = election.machine.leadingTerm, election.scope?.term != term {
                fail("election \(name) leads term \(term) without its scope")
            }
        }
        // The lease rule: the deadline is never past the older side's last trusted send + (lease − margin).
        guard machine.isCurrent(generation) else { return }
        switch (trustedMain, trustedWitness, machine.leaseDeadline) {
        case (let main?, let witness?, let deadline?):
            if deadline > min(main, witness) + Self.settings.valid {
                fail("the deadline \(ms(deadline)) is past the trusted sends (\(ms(main)), \(ms(witness))) + valid")
            }
        case (_?, _?, nil):
            fail("no deadline though both sides confirmed")
        case (_, _, let deadline?):
            fail("a deadline (\(ms(deadline))) before both sides confirmed")
        default:
            break
        }
    }

    /// A reply sent `lease − margin` ago or more, or arriving at or past the deadline, is never trusted.
    mutating func checkTrust(trusted: Bool, side: Machine.Side, sent: Instant, deadline: Instant?, label: String) {
        if trusted, sent.duration(to: now) >= Self.settings.valid {
            fail("\(label) trusted a reply sent \(sent.duration(to: now)) ago")
        }
        if trusted, let deadline, now >= deadline { fail("\(label) trusted a reply at or after the deadline") }
        if trusted, stoppedForGood { fail("\(label) trusted a reply after the stop") }
        guard trusted else { return }
        switch side {
        case .main: trustedMain = max(sent, trustedMain ?? sent)
        case .witness: trustedWitness = max(sent, trustedWitness ?? sent)
        }
    }

    /// What must hold of a step before the driver performs it.
    mutating func check(_ step: Machine.Step) {
        if stoppedForGood {
            switch step {
            case .hardStop, .leaseExpired: break
            default: fail("\(describe(step)) after the stop")
            }
        }
        var requested: [Int] = []
        switch step {
        case .tryTake(let ids), .claimWaiter(let ids): requested = ids
        case .heartbeatAndTry(let others, _, _): requested = others
        case .waitAndTake(let id, let others, _, _):
            requested = [id] + others
            if token != id { fail("waits in election \(id)'s queue without its waiter token") }
        case .takeTerm(let id), .beginTerm(let id, _, _), .awaitPredecessor(let id, _, _, _, _):
            if !locks.contains(id) { fail("\(describe(step)) without holding election \(id)'s lock") }
        case .handOver(let id):
            if !locks.contains(id) { fail("\(describe(step)) without holding election \(id)'s lock") }
            if !machine.elections.values.contains(where: { $0.id == id && $0.machine.isReleasing }) {
                coverage.strayLocks += 1
            }
        default:
            break
        }
        if case .claimWaiter = step, token != nil { fail("claims a waiter token while holding one") }
        for id in requested {
            // The stacking rule, as the election machines see it, and as the server does.
            if let (name, election) = machine.elections.first(where: { $0.value.id == id }),
                election.machine.mayHoldLock
            {
                fail("\(describe(step)) names \(name), whose lock may be held (\(election.machine.state))")
            }
            if locks.contains(id), !isClaim(step) { fail("\(describe(step)) names election \(id), whose lock is held") }
        }
    }

    func isClaim(_ step: Machine.Step) -> Bool {
        if case .claimWaiter = step { return true }
        return false
    }
}

// MARK: - Randomness, tracing

extension NodeWorld {
    mutating func chance(_ percent: UInt64) -> Bool { rng.next(upperBound: UInt64(100)) < percent }

    /// How long a statement's answer takes.
    mutating func delay() -> Duration {
        let roll = rng.next(upperBound: UInt64(100))
        let milliseconds: UInt64
        switch roll {
        case 0..<88: milliseconds = 1 + rng.next(upperBound: UInt64(20))
        case 88..<98: milliseconds = 20 + rng.next(upperBound: UInt64(280))
        default: milliseconds = windingDown ? 20 : 300 + rng.next(upperBound: UInt64(1_900))
        }
        return .milliseconds(Int(milliseconds))
    }

    mutating func renewed() -> Int { windingDown || chance(97) ? 1 : 0 }

    /// The tables' vacuum and analyze count a waiter's heartbeat reads: now and then a vacuum moved it.
    mutating func maintenanceCount() -> Int64 {
        if chance(10) { maintenance += 1 }
        return maintenance
    }

    mutating func randomTerm() -> TakenTerm {
        term += 1
        let predecessors: [Int?] = [20, 20, 20, 30, nil]
        let leases: [Int?] = [nil, 2000, 3000]
        return TakenTerm(
            term: term, began: chance(50), predecessor: predecessors.randomElement(using: &rng) ?? nil,
            sameServer: chance(50), leaseMilliseconds: leases.randomElement(using: &rng) ?? nil)
    }

    func ms(_ instant: Instant) -> String {
        let offset = t0.duration(to: instant)
        return "\(offset.components.seconds * 1000 + offset.components.attoseconds / 1_000_000_000_000_000) ms"
    }

    func note(_ thread: String, _ text: @autoclosure () -> String) {
        guard tracing else { return }
        traceBox.lines.append("[\(ms(now))] \(thread): \(text())")
    }

    func describe(_ step: Machine.Step) -> String {
        switch step {
        case .waitIdle(let until): "waitIdle(until: \(ms(until)))"
        case .waitAndTake(let id, let others, let wait, let beat):
            "waitAndTake(\(id), others: \(others), wait: \(wait), beat: \(beat))"
        case .awaitPredecessor(let id, _, let predecessor, let wait, let term):
            "awaitPredecessor(\(id), predecessor: \(predecessor), wait: \(wait), term: \(term))"
        default: "\(step)"
        }
    }

    func describe(_ reply: Machine.Reply) -> String {
        func taken(_ rows: [TakenElection]) -> String {
            rows.map { "\($0.election): term \($0.term.term)\($0.term.began ? " began" : "")" }.joined(separator: ", ")
        }
        return switch reply {
        case .termTaken(let id, let term, _): "termTaken(\(id), term \(term.term), began: \(term.began))"
        case .waitedAndTook(let id, _, let renewed, let granted, let rows, _):
            "waitedAndTook(\(id), renewed: \(renewed), granted: \(granted), [\(taken(rows))])"
        case .triedAndTook(let rows): "triedAndTook([\(taken(rows))])"
        case .awaitedPredecessor(let name, let term, let began, _):
            "awaitedPredecessor(\(name), \(term), \(began as Bool?))"
        case .termBegun(let name, let term, let began, _): "termBegun(\(name), \(term), \(began))"
        default: "\(reply)"
        }
    }

    func describe(_ outcome: Machine.Outcome) -> String {
        switch outcome {
        case .proceed: "proceed"
        case .leaseExpired(let ending): "leaseExpired(\(ending.map { describe($0) } ?? "nil"))"
        case .fail(let error): "fail(\(error.message))"
        case .left: "left"
        }
    }

    func describe(_ trust: Machine.Trust) -> String {
        switch trust {
        case .trusted: "trusted"
        case .leaseExpired(let ending): "leaseExpired(\(ending.map { describe($0) } ?? "nil"))"
        }
    }

    func describe(_ ending: Machine.Ending) -> String {
        let scopes = ending.scopes.map { "\($0.election) term \($0.scope.term)" }
        return "ending at \(ms(ending.at)) of [\(scopes.joined(separator: ", "))]"
    }

    func describe(_ resignation: Machine.Resignation) -> String {
        switch resignation {
        case .done(let scope): "done(\(scope.map { "term \($0.term)" } ?? "nil"))"
        case .release(let scope, let endedAt): "release(term \(scope.term), endedAt: \(ms(endedAt)))"
        case .wait: "wait"
        }
    }

    func describe(_ deliveries: [Machine.Delivery]) -> String {
        "[" + deliveries.map { describe($0) }.joined(separator: ", ") + "]"
    }

    func describe(_ delivery: Machine.Delivery) -> String {
        switch delivery {
        case .message(let mailbox, .leader(let scope, _)):
            ".leader(\(scope.election) term \(scope.term)) → #\(mailbox.number)"
        case .message(let mailbox, let message): "\(message) → #\(mailbox.number)"
        case .demoted(let mailbox, let reason, let scope):
            ".demoted(\(reason), \(scope.election) term \(scope.term)) → #\(mailbox.number)"
        case .stopped(let mailbox, let reason, let scope, _):
            ".stopped(\(reason)\(scope.map { ", term \($0.term)" } ?? "")) → #\(mailbox.number)"
        case .finish(let mailbox): ".finish → #\(mailbox.number)"
        case .resumeResignation(let name): ".resumeResignation(\(name))"
        }
    }
}

/// A walk's trace lines.
final class TraceBox {
    var lines: [String] = []
}

// MARK: - Coverage

extension NodeWorld {
    /// What the walks reached, summed over all of them.
    struct Coverage {
        static let allSteps: Set<String> = [
            "sendWitnessHeartbeat", "leaseExpired", "hardStop", "leave", "handOver", "takeTerm", "setUpElection",
            "releaseWaiterToken", "waitAndTake", "heartbeatAndTry", "heartbeat", "claimWaiter", "tryTake",
            "awaitPredecessor", "checkAcknowledged", "beginTerm", "waitIdle", "hold", "sweep", "readTriggers",
            "deleteTriggers", "rehearse",
        ]

        var steps: Set<String> = []
        var leaders = 0
        var leadersOnEvidence = 0
        var demotions: [DemotionReason: Int] = [:]
        var leaseExpiries = 0
        var resignedLeaders = 0
        var stoppedLeaders = 0
        var hardStops = 0
        var leaves = 0
        var grants = 0
        var claims = 0
        var sweeps = 0
        var rehearsals = 0
        var strayLocks = 0
        var sessions = 0
        var triggersHanded = 0
        var triggersDeleted = 0

        static func name(_ step: Machine.Step) -> String {
            String("\(step)".prefix { $0 != "(" })
        }

        mutating func add(_ other: Coverage) {
            steps.formUnion(other.steps)
            leaders += other.leaders
            leadersOnEvidence += other.leadersOnEvidence
            demotions.merge(other.demotions, uniquingKeysWith: +)
            leaseExpiries += other.leaseExpiries
            resignedLeaders += other.resignedLeaders
            stoppedLeaders += other.stoppedLeaders
            hardStops += other.hardStops
            leaves += other.leaves
            grants += other.grants
            claims += other.claims
            sweeps += other.sweeps
            rehearsals += other.rehearsals
            strayLocks += other.strayLocks
            sessions += other.sessions
            triggersHanded += other.triggersHanded
            triggersDeleted += other.triggersDeleted
        }
    }
}
