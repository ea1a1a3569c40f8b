import CoreMetrics
import Testing

@testable import Stoker

// MARK: - Fixtures

/// A node machine under test, fed as the driver feeds it (`NodeDriver`, `SessionThread`, `SessionSteps`,
/// `LeaseWatchdog`), with instants at fixed offsets from one base: nothing sleeps, no assertion reads the clock.
struct NodeFixture {
    typealias Machine = NodeStateMachine

    /// Lease 2 s, margin 200 ms (so `lease − margin` = 1.8 s and the witness beats every 600 ms), heartbeat and retry
    /// 300 ms, statement timeout 1 s (the longest queue wait: min(500 ms, 300 ms) = 300 ms).
    static let settings = Machine.Settings(
        lease: .seconds(2), margin: .milliseconds(200), heartbeat: .milliseconds(300),
        retryInterval: .milliseconds(300), statementTimeout: .seconds(1), sweepInterval: .seconds(1))
    /// This node's incarnation, and the members it reads at join (itself and `n2`).
    static let nodeID = 10
    static let members = [10: "n1", 20: "n2"]
    /// Instruments on the no-op factory: no metrics system is bootstrapped.
    static let metrics = NodeMetrics(factory: NOOPMetricsHandler.instance, cluster: "test", node: "n1")
    static let connectionLost = StokerError(.connectionLost, "the test cut the connection")

    /// The base instant: every input's `now` is an offset from it.
    let t0 = ContinuousClock.now
    var machine: Machine
    var mailboxes: [String: Machine.Mailbox] = [:]
    /// A lease clock never extended: a scope ends exactly at the instant it is ended at.
    let lease = LeaseClock()

    init(settings: Machine.Settings = Self.settings) {
        machine = Machine(settings: settings)
    }

    /// `t0 + milliseconds`.
    func at(_ milliseconds: Int) -> ContinuousClock.Instant { t0 + .milliseconds(milliseconds) }

    subscript(_ name: String) -> Machine.Mailbox {
        guard let mailbox = mailboxes[name] else { preconditionFailure("no activator registered for \(name)") }
        return mailbox
    }

    /// An activator registers for `name`.
    @discardableResult
    mutating func register(_ name: String) -> Machine.Registration {
        let (_, continuation) = AsyncStream.makeStream(of: ActivatorMessage.self)
        let mailbox = machine.makeMailbox(continuation)
        let registration = machine.registered(name, mailbox: mailbox, metrics: Self.metrics.election(name))
        // A duplicate is turned away: the first activator's mailbox stays the election's.
        if registration != .duplicate { mailboxes[name] = mailbox }
        return registration
    }

    /// A leadership of `name`, as the driver prepares one for a statement that began it.
    func scope(_ name: String, term: Int64 = 5) -> LeaderScope {
        LeaderScope(
            term: term, election: name, incarnation: Self.nodeID, metrics: Self.metrics.election(name), lease: lease)
    }

    /// Runs the node and joins with `elections` (name, id), as the session thread does: the session opens at 0 ms,
    /// the main session's first reply (sent at 0) and the witness's (sent at 1) confirm both halves of the lease, the
    /// node joins at 2 ms, the witness heartbeat goes out at 3 ms (left unanswered: the deadline stays at
    /// 1 + 1800 = 1801 ms), then each election is set up, one per millisecond from 4 ms, in name order.
    mutating func join(
        _ elections: [(String, Int)], leaders: [String: String] = [:], leaderNodes: [String: Int] = [:],
        maintenance: Int64? = nil, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(machine.runRequested() == true, sourceLocation: sourceLocation)
        for (name, _) in elections { #expect(register(name) == .registered, sourceLocation: sourceLocation) }
        #expect(machine.sessionOpened(now: at(0)) == 1, sourceLocation: sourceLocation)
        #expect(machine.replied(on: .main, sentAt: at(0), now: at(1)).value == .trusted, sourceLocation: sourceLocation)
        #expect(
            machine.replied(on: .witness, sentAt: at(1), now: at(2)).value == .trusted, sourceLocation: sourceLocation)
        machine.joined(
            nodeID: Self.nodeID, members: Self.members, deadlockTimeout: .seconds(1), maintenance: maintenance,
            now: at(2))
        #expect(machine.nextStep(now: at(3)) == .sendWitnessHeartbeat, sourceLocation: sourceLocation)
        machine.witnessHeartbeatSent(now: at(3))
        for (offset, (name, id)) in elections.sorted(by: { $0.0 < $1.0 }).enumerated() {
            let now = at(4 + offset)
            #expect(machine.nextStep(now: now) == .setUpElection(name), sourceLocation: sourceLocation)
            let outcome = machine.replied(
                .electionSetUp(name, id: id, leader: leaders[name], leaderNode: leaderNodes[name]), sentAt: now,
                now: now)
            #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
            #expect(
                machine.takeDeliveries() == [.message(self[name], .leaderObserved(leaders[name]))],
                sourceLocation: sourceLocation)
        }
        #expect(
            machine.takeEvents() == [.joined(incarnation: Self.nodeID, members: Self.members.count)],
            sourceLocation: sourceLocation)
    }

    /// Joins with election `a` (id 7) only, and becomes its waiter as the first steps after a join do: the try at 10 ms
    /// wins nothing, the claim at 12 ms takes the token.
    mutating func joinAsWaiter(maintenance: Int64? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
        join([("a", 7)], maintenance: maintenance, sourceLocation: sourceLocation)
        #expect(machine.nextStep(now: at(10)) == .tryTake([7]), sourceLocation: sourceLocation)
        #expect(
            machine.replied(.triedAndTook([]), sentAt: at(10), now: at(12)).value == .proceed,
            sourceLocation: sourceLocation)
        #expect(machine.nextStep(now: at(12)) == .claimWaiter([7]), sourceLocation: sourceLocation)
        #expect(
            machine.replied(.claimedWaiter(7), sentAt: at(12), now: at(13)).value == .proceed,
            sourceLocation: sourceLocation)
    }

    /// Where `phase` leaves election `a` (id 1), and when.
    enum Phase: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// Tried once and lost (12 ms), no waiter token claimed (13 ms).
        case follower
        /// Won by the heartbeat's try at 302 ms, answered at 305 ms: the bump is due.
        case acquiring
        /// Won and bumped at 12 ms without a hand-over; the predecessor `n2` (20) is on this server.
        case awaitingEvidence
        /// Won and begun at 12 ms: `.leader` delivered.
        case leading

        var testDescription: String { rawValue }
    }

    /// Joins with election `a` (id 1) and brings it to `phase`; returns the leadership (when leading) and the last
    /// instant used, in milliseconds. Every delivery and event on the way is checked and taken.
    mutating func bring(
        to phase: Phase, sourceLocation: SourceLocation = #_sourceLocation
    ) -> (scope: LeaderScope?, now: Int) {
        join([("a", 1)], sourceLocation: sourceLocation)
        #expect(machine.nextStep(now: at(10)) == .tryTake([1]), sourceLocation: sourceLocation)
        switch phase {
        case .follower, .acquiring:
            #expect(
                machine.replied(.triedAndTook([]), sentAt: at(10), now: at(12)).value == .proceed,
                sourceLocation: sourceLocation)
            // Nothing won after a change: try to become the election's waiter.
            #expect(machine.nextStep(now: at(12)) == .claimWaiter([1]), sourceLocation: sourceLocation)
            #expect(
                machine.replied(.claimedWaiter(nil), sentAt: at(12), now: at(13)).value == .proceed,
                sourceLocation: sourceLocation)
            guard phase == .acquiring else { return (nil, 13) }
            #expect(
                machine.nextStep(now: at(302)) == .heartbeatAndTry(others: [1], claim: true, claimSweeper: true),
                sourceLocation: sourceLocation)
            let outcome = machine.replied(
                .heartbeatAndTried(renewed: 1, won: [1], claimed: nil), sentAt: at(302), now: at(305))
            #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
            #expect(machine.elections["a"]?.machine.state == .acquiring, sourceLocation: sourceLocation)
            return (nil, 305)
        case .awaitingEvidence:
            let outcome = machine.replied(
                .triedAndTook([TakenElection(election: 1, term: Self.awaiting(), scope: nil)]), sentAt: at(10),
                now: at(12))
            #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
            #expect(machine.takeDeliveries().isEmpty, sourceLocation: sourceLocation)
            #expect(
                machine.elections["a"]?.machine.state == .awaitingEvidence(term: 5), sourceLocation: sourceLocation)
            _ = machine.takeEvents()
            return (nil, 12)
        case .leading:
            let scope = scope("a")
            let outcome = machine.replied(
                .triedAndTook([TakenElection(election: 1, term: Self.began(), scope: scope)]), sentAt: at(10),
                now: at(12))
            #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
            let leader = NodeStateMachine.Delivery.message(self["a"], .leader(scope, members: machine.memberList))
            #expect(machine.takeDeliveries() == [leader], sourceLocation: sourceLocation)
            #expect(machine.takeEvents() == [.becameLeader(election: "a", term: 5)], sourceLocation: sourceLocation)
            readsNoTriggers(1, at: 12, sourceLocation: sourceLocation)
            return (scope, 12)
        }
    }

    /// A leadership of election `id` began: its first step reads the election's triggers; the table has none.
    mutating func readsNoTriggers(_ id: Int, at milliseconds: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(
            machine.nextStep(now: at(milliseconds)) == .readTriggers(election: id, after: 0),
            sourceLocation: sourceLocation)
        let outcome = machine.replied(
            .triggersRead(election: id, [], complete: true), sentAt: at(milliseconds), now: at(milliseconds))
        #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
        #expect(machine.takeDeliveries().isEmpty, sourceLocation: sourceLocation)
    }

    /// Serves the routine steps from `start` to `end`, as the session thread would with nothing else to do: collects
    /// the witness's answer at once, answers each heartbeat 1 ms after its send, sleeps through each idle wait. Returns
    /// the first other step (nil when `end` is reached first), and the instant it was asked at.
    mutating func serveRoutine(
        from start: ContinuousClock.Instant, to end: ContinuousClock.Instant,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> (step: Machine.Step?, now: ContinuousClock.Instant) {
        var now = start
        while now < end {
            if machine.witnessQuerySentAt != nil {
                #expect(machine.witnessReplied(now: now).value == .trusted, sourceLocation: sourceLocation)
            }
            switch machine.nextStep(now: now) {
            case .sendWitnessHeartbeat:
                machine.witnessHeartbeatSent(now: now)
            case .heartbeat:
                let outcome = machine.replied(.heartbeat(renewed: 1), sentAt: now, now: now + .milliseconds(1))
                #expect(outcome.value == .proceed, sourceLocation: sourceLocation)
                now += .milliseconds(1)
            case .waitIdle(let until):
                now = min(until, end)
            case let step:
                return (step, now)
            }
        }
        return (nil, now)
    }

    /// A bump that began the leadership in its own transaction (a hand-over, or the predecessor's witness gone).
    static func began(_ term: Int64 = 5) -> TakenTerm {
        TakenTerm(term: term, began: true, predecessor: 20, sameServer: true, leaseMilliseconds: 2000)
    }

    /// A bump without a hand-over: the leadership awaits evidence that `predecessor` stopped.
    static func awaiting(
        _ term: Int64 = 5, predecessor: Int? = 20, sameServer: Bool = true, leaseMilliseconds: Int? = 2000
    ) -> TakenTerm {
        TakenTerm(
            term: term, began: false, predecessor: predecessor, sameServer: sameServer,
            leaseMilliseconds: leaseMilliseconds)
    }
}

// MARK: - Comparable views of the machine's answers (leaderships compare by identity)

struct ElectionScope: Equatable, CustomStringConvertible {
    let election: String
    let scope: LeaderScope

    static func == (lhs: Self, rhs: Self) -> Bool { lhs.election == rhs.election && lhs.scope === rhs.scope }
    var description: String { "\(election): term \(scope.term) \(ObjectIdentifier(scope))" }
}

/// An ``NodeStateMachine/Ending`` as a value.
struct EndingValue: Equatable {
    let at: ContinuousClock.Instant
    let scopes: [ElectionScope]

    init(at: ContinuousClock.Instant, _ scopes: [(String, LeaderScope)] = []) {
        self.at = at
        self.scopes = scopes.map { ElectionScope(election: $0.0, scope: $0.1) }
    }
}

extension NodeStateMachine.Ending {
    var value: EndingValue { EndingValue(at: at, scopes.map { ($0.election, $0.scope) }) }
}

enum TrustValue: Equatable {
    case trusted
    case leaseExpired(EndingValue?)
}

extension NodeStateMachine.Trust {
    var value: TrustValue {
        switch self {
        case .trusted: .trusted
        case .leaseExpired(let ending): .leaseExpired(ending?.value)
        }
    }
}

enum OutcomeValue: Equatable {
    case proceed
    case leaseExpired(EndingValue?)
    case fail(StokerError)
    case left
}

extension NodeStateMachine.Outcome {
    var value: OutcomeValue {
        switch self {
        case .proceed: .proceed
        case .leaseExpired(let ending): .leaseExpired(ending?.value)
        case .fail(let error): .fail(error)
        case .left: .left
        }
    }
}

enum ResignationValue: Equatable {
    case done(LeaderScope?)
    case release(LeaderScope, endedAt: ContinuousClock.Instant)
    case wait

    static func == (lhs: Self, rhs: Self) -> Bool {
        switch (lhs, rhs) {
        case (.done(let left), .done(let right)): left === right
        case (.release(let left, let leftEnd), .release(let right, let rightEnd)): left === right && leftEnd == rightEnd
        case (.wait, .wait): true
        default: false
        }
    }
}

extension NodeStateMachine.Resignation {
    var value: ResignationValue {
        switch self {
        case .done(let scope): .done(scope)
        case .release(let scope, let endedAt): .release(scope, endedAt: endedAt)
        case .wait: .wait
        }
    }
}

struct FailureValue: Equatable {
    let ending: EndingValue
    let reason: DemotionReason
    let cut: Bool
    let end: NodeStateMachine.SessionEnd
}

extension NodeStateMachine.Failure {
    var value: FailureValue { FailureValue(ending: ending.value, reason: reason, cut: cut, end: end) }
}

/// Scopes compared by identity.
func identities(_ scopes: [LeaderScope]) -> [ObjectIdentifier] { scopes.map(ObjectIdentifier.init) }

// MARK: - Tests

@Suite("Node state machine")
struct NodeStateMachineTests {
    typealias Machine = NodeStateMachine

    // MARK: Join

    @Test("after the join: the witness heartbeat, each election set up in name order, then a try of every candidate")
    func join() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.machine.runRequested() == false)
        // Registered in any order; set up in name order.
        for name in ["c", "a", "b"] { #expect(f.register(name) == .registered) }
        #expect(f.register("a") == .duplicate)
        #expect(f.machine.sessionOpened(now: f.at(0)) == 1)
        #expect(f.machine.incarnation == nil)
        #expect(f.machine.replied(on: .main, sentAt: f.at(0), now: f.at(1)).value == .trusted)
        #expect(f.machine.leaseDeadline == nil)
        #expect(f.machine.replied(on: .witness, sentAt: f.at(1), now: f.at(2)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1800))
        f.machine.joined(nodeID: 10, members: NodeFixture.members, deadlockTimeout: .seconds(1), now: f.at(2))
        #expect(f.machine.incarnation == 10)
        #expect(f.machine.takeEvents() == [.joined(incarnation: 10, members: 2)])

        #expect(f.machine.nextStep(now: f.at(3)) == .sendWitnessHeartbeat)
        f.machine.witnessHeartbeatSent(now: f.at(3))
        #expect(f.machine.witnessQuerySentAt == f.at(3))

        #expect(f.machine.nextStep(now: f.at(4)) == .setUpElection("a"))
        #expect(
            f.machine.replied(.electionSetUp("a", id: 1, leader: nil), sentAt: f.at(4), now: f.at(5)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leaderObserved(nil))])
        #expect(f.machine.nextStep(now: f.at(5)) == .setUpElection("b"))
        #expect(
            f.machine.replied(.electionSetUp("b", id: 2, leader: "n2"), sentAt: f.at(5), now: f.at(6)).value == .proceed
        )
        #expect(f.machine.takeDeliveries() == [.message(f["b"], .leaderObserved("n2"))])
        #expect(f.machine.nextStep(now: f.at(6)) == .setUpElection("c"))
        #expect(
            f.machine.replied(.electionSetUp("c", id: 3, leader: nil), sentAt: f.at(6), now: f.at(7)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["c"], .leaderObserved(nil))])

        // Every election is set up: try them all at once (a setup asks for a retry now).
        #expect(f.machine.nextStep(now: f.at(7)) == .tryTake([1, 2, 3]))
        // Nothing won after a change: claim the waiter token of one of them.
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(7), now: f.at(9)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(9)) == .claimWaiter([1, 2, 3]))
        #expect(f.machine.replied(.claimedWaiter(nil), sentAt: f.at(9), now: f.at(10)).value == .proceed)
        // Then idle until the heartbeat (302 ms), which is also when the fallback retry is due; the witness's answer
        // is outstanding, so its next beat does not bound the wait.
        #expect(f.machine.nextStep(now: f.at(10)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    @Test("the waiter token is claimed behind the leader of the most elections, as the leaders change")
    func claimBehindBusiestLeader() {
        #expect(Machine.claimOrder([1, 2, 3, 4], leaders: [1: 20, 2: 30, 3: 30]) == [2, 3, 1, 4])
        #expect(Machine.claimOrder([4, 3, 2, 1], leaders: [:]) == [1, 2, 3, 4])
        var f = NodeFixture()
        // `a` is led by n2 (20), `b` and `c` by n3 (30): a crash of n3 frees two elections at once.
        f.join(
            [("a", 1), ("b", 2), ("c", 3)], leaders: ["a": "n2", "b": "n3", "c": "n3"],
            leaderNodes: ["a": 20, "b": 30, "c": 30])
        #expect(f.machine.nextStep(now: f.at(7)) == .tryTake([2, 3, 1]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(7), now: f.at(8)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(8)) == .claimWaiter([2, 3, 1]))
        #expect(f.machine.replied(.claimedWaiter(nil), sentAt: f.at(8), now: f.at(9)).value == .proceed)
        // n3 now leads `a` too, then hands `b` over: n3 leads `a` and `c`, nobody `b`.
        f.machine.notified([.leader(election: 1, node: 30), .released(election: 2)])
        _ = f.machine.takeDeliveries()
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1, 3, 2]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(10), now: f.at(11)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(11)) == .claimWaiter([1, 3, 2]))
    }

    @Test("an election registered after the join is set up at the next step, then tried")
    func registeredAfterJoin() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(10), now: f.at(11)).value == .proceed)
        #expect(f.register("b") == .registered)
        #expect(f.machine.nextStep(now: f.at(12)) == .setUpElection("b"))
        #expect(
            f.machine.replied(.electionSetUp("b", id: 2, leader: nil), sentAt: f.at(12), now: f.at(13)).value
                == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["b"], .leaderObserved(nil))])
        // The claim pending since the try (for `a` alone) comes first, then the retry the setup asked for.
        #expect(f.machine.nextStep(now: f.at(13)) == .claimWaiter([1]))
        #expect(f.machine.replied(.claimedWaiter(nil), sentAt: f.at(13), now: f.at(14)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(14)) == .tryTake([1, 2]))
    }

    // MARK: Heartbeat

    @Test(
        "the heartbeat is due at join + heartbeat, then at each send + heartbeat; zero rows renewed fails the session")
    func heartbeat() {
        var f = NodeFixture()
        f.join([])
        #expect(f.machine.nextStep(now: f.at(10)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.nextStep(now: f.at(301)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeat(claimSweeper: true))
        #expect(f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(302), now: f.at(305)).value == .proceed)
        // The next one is due 300 ms after this one was sent, not after its answer.
        #expect(f.machine.nextStep(now: f.at(305)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.witnessReplied(now: f.at(310)).value == .trusted)
        // With the witness answered, its next beat (3 + 600 = 603) bounds the wait too; the heartbeat comes first.
        #expect(f.machine.nextStep(now: f.at(601)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.nextStep(now: f.at(602)) == .heartbeat(claimSweeper: true))
        #expect(
            f.machine.replied(.heartbeat(renewed: 0), sentAt: f.at(602), now: f.at(604)).value
                == .fail(Machine.rowDeleted))
    }

    @Test("with candidates, the heartbeat carries the retry when it is due within a heartbeat")
    func heartbeatAndTry() {
        var f = NodeFixture()
        _ = f.bring(to: .follower)
        #expect(f.machine.nextStep(now: f.at(13)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeatAndTry(others: [1], claim: true, claimSweeper: true))
        let outcome = f.machine.replied(
            .heartbeatAndTried(renewed: 1, won: [], claimed: nil), sentAt: f.at(302), now: f.at(306))
        #expect(outcome.value == .proceed)
        // Neither the heartbeat nor the retry is due before 602 ms.
        #expect(f.machine.nextStep(now: f.at(306)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.nextStep(now: f.at(601)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.nextStep(now: f.at(602)) == .heartbeatAndTry(others: [1], claim: true, claimSweeper: true))
        #expect(
            f.machine.replied(.heartbeatAndTried(renewed: 0, won: [], claimed: nil), sentAt: f.at(602), now: f.at(603))
                .value == .fail(Machine.rowDeleted))
    }

    @Test("a retry due later than the next heartbeat leaves the heartbeat plain, and a waiter claim follows it")
    func plainHeartbeatThenClaim() {
        var settings = NodeFixture.settings
        settings.retryInterval = .seconds(5)
        var f = NodeFixture(settings: settings)
        _ = f.bring(to: .follower)
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeat(claimSweeper: true))
        #expect(f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(302), now: f.at(304)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(304)) == .claimWaiter([1]))
        #expect(f.machine.replied(.claimedWaiter(nil), sentAt: f.at(304), now: f.at(305)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(305)) == .waitIdle(until: f.at(602)))
    }

    // MARK: The lease

    @Test("the deadline is the older of both sides' last trusted sends plus lease − margin, and never moves back")
    func leaseDeadline() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.machine.sessionOpened(now: f.at(0)) == 1)
        #expect(f.machine.watchdogTurn() == .sleep(until: nil, generation: 1))
        #expect(f.machine.replied(on: .main, sentAt: f.at(10), now: f.at(20)).value == .trusted)
        #expect(f.machine.leaseDeadline == nil)
        #expect(f.machine.replied(on: .witness, sentAt: f.at(30), now: f.at(40)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1810))
        #expect(f.machine.replied(on: .main, sentAt: f.at(100), now: f.at(110)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1830))
        #expect(f.machine.replied(on: .witness, sentAt: f.at(200), now: f.at(210)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1900))
        // An answer to an older request is trusted but moves nothing back.
        #expect(f.machine.replied(on: .witness, sentAt: f.at(150), now: f.at(215)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1900))
        #expect(f.machine.watchdogTurn() == .sleep(until: f.at(1900), generation: 1))
        // Sent `lease − margin` − 1 ns before its answer, before the deadline: still trusted (an older send than the
        // last confirmed one: the deadline stays).
        #expect(f.machine.replied(on: .main, sentAt: f.at(50), now: f.at(1850) - .nanoseconds(1)).value == .trusted)
        #expect(f.machine.leaseDeadline == f.at(1900))
        #expect(f.machine.takeEvents().isEmpty)
    }

    @Test("a reply to a request sent lease − margin ago or more is not trusted, even before any deadline")
    func staleReplyBeforeDeadline() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.machine.sessionOpened(now: f.at(0)) == 1)
        // The join's first reply, 1.8 s after its request: no deadline yet, so nothing to end.
        #expect(f.machine.replied(on: .main, sentAt: f.at(0), now: f.at(1800)).value == .leaseExpired(nil))
        #expect(f.machine.leaseDeadline == nil)
        #expect(f.machine.replied(on: .witness, sentAt: f.at(100), now: f.at(1950)).value == .leaseExpired(nil))
        #expect(f.machine.leaseDeadline == nil)
    }

    @Test("a reply sent lease − margin ago, or arriving at the deadline however recent, ends the lease at the deadline")
    func lateReplies() throws {
        // Too old (and so, the requests of one side being sequential, after the deadline).
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        // Main confirmed at 10 (the try), witness at 1: the deadline is 1801.
        #expect(f.machine.leaseDeadline == f.at(1801))
        let old = f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(12), now: f.at(1812))
        #expect(old.value == .leaseExpired(EndingValue(at: f.at(1801), [("a", scope)])))
        #expect(f.machine.takeEvents() == [.leaseExpired])
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.leaseDeadline == f.at(1801))

        // Sent 5 ms before its answer, which arrives at the deadline.
        f = NodeFixture()
        let second = try #require(f.bring(to: .leading).scope)
        let late = f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(1796), now: f.at(1801))
        #expect(late.value == .leaseExpired(EndingValue(at: f.at(1801), [("a", second)])))
        // After the expiry nothing is trusted, and the expiry is not reported twice.
        #expect(f.machine.replied(on: .main, sentAt: f.at(1802), now: f.at(1803)).value == .leaseExpired(nil))
        #expect(f.machine.witnessReplied(now: f.at(1803)).value == .leaseExpired(nil))
        #expect(f.machine.takeEvents() == [.leaseExpired])
    }

    @Test(
        "the watchdog: nothing before the deadline, one ending at exactly the deadline with the leaderships, then none")
    func leaseDeadlinePassed() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.witnessReplied(now: f.at(20)).value == .trusted)
        // Main confirmed at 10, witness at 3.
        #expect(f.machine.leaseDeadline == f.at(1803))
        #expect(f.machine.watchdogTurn() == .sleep(until: f.at(1803), generation: 1))
        #expect(f.machine.leaseDeadlinePassed(generation: 1, now: f.at(1802)) == nil)
        #expect(f.machine.leaseDeadlinePassed(generation: 2, now: f.at(1900)) == nil)
        #expect(f.machine.leaseDeadlinePassed(generation: 0, now: f.at(1900)) == nil)
        // The witness beat is outstanding (sent at 603), so the next step is about the lease alone.
        #expect(f.machine.nextStep(now: f.at(603)) == .sendWitnessHeartbeat)
        f.machine.witnessHeartbeatSent(now: f.at(603))

        let ending = f.machine.leaseDeadlinePassed(generation: 1, now: f.at(1850))
        #expect(ending?.value == EndingValue(at: f.at(1803), [("a", scope)]))
        #expect(f.machine.takeEvents() == [.leaseExpired])
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.leaseDeadlinePassed(generation: 1, now: f.at(1851)) == nil)
        #expect(f.machine.watchdogTurn() == .sleep(until: nil, generation: 1))
        #expect(f.machine.nextStep(now: f.at(1851)) == .leaseExpired)
        #expect(f.machine.isCurrent(1))

        // The driver ends the scope at the deadline, cuts, then reports: one demotion.
        #expect(scope.end(at: f.at(1803)))
        f.machine.leadershipsEnded(try #require(ending), reason: .leaseExpired)
        #expect(f.machine.takeDeliveries() == [.demoted(f["a"], .leaseExpired, scope: scope)])
        f.machine.leadershipsEnded(try #require(ending), reason: .leaseExpired)
        #expect(f.machine.takeDeliveries().isEmpty)

        // The session thread learns of it next: the failure ends nothing more, and does not cut again.
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(1860))
        #expect(
            failure.value
                == FailureValue(
                    ending: EndingValue(at: f.at(1803)), reason: .leaseExpired, cut: false, end: .leaseExpired))
        let closed = f.machine.sessionClosed(now: f.at(1861))
        #expect(closed.at == f.at(1803))
        #expect(closed.scopes.isEmpty)
        #expect(!f.machine.isCurrent(1))
        #expect(f.machine.watchdogTurn() == .sleep(until: nil, generation: 1))
    }

    // MARK: Winning

    @Test("a try that won and began: the leader message and the event; the leader is no longer a candidate")
    func winsAndBegins() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.holds(scope))
        #expect(f.machine.elections["a"]?.machine.state == .leading(term: 5))
        // Leading, not a candidate: the heartbeat is plain.
        #expect(f.machine.nextStep(now: f.at(12)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeat(claimSweeper: true))
    }

    @Test("a lock won by the heartbeat's try is bumped at the next step; a bump that began makes the leader")
    func wonByHeartbeatThenBumped() {
        var f = NodeFixture()
        _ = f.bring(to: .acquiring)
        #expect(f.machine.nextStep(now: f.at(305)) == .takeTerm(election: 1))
        let scope = f.scope("a")
        #expect(
            f.machine.replied(
                .termTaken(election: 1, NodeFixture.began(), scope: scope), sentAt: f.at(305), now: f.at(307)
            )
            .value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.takeEvents() == [.becameLeader(election: "a", term: 5)])
        f.readsNoTriggers(1, at: 307)
        #expect(f.machine.nextStep(now: f.at(307)) == .waitIdle(until: f.at(602)))
    }

    @Test("on the same server: the evidence is the predecessor's node lock, waited for in its queue")
    func awaitsPredecessorOnSameServer() {
        var f = NodeFixture()
        #expect(f.bring(to: .awaitingEvidence).scope == nil)
        // No leader message, the election is neither a candidate nor a leader.
        #expect(f.machine.elections["a"]?.evidence?.sameServer == true)
        // Waits at most 250 ms (below deadlock_timeout), and never past the heartbeat at 302.
        let first = Machine.Step.awaitPredecessor(
            election: 1, name: "a", predecessor: 20, wait: .milliseconds(250), term: 5)
        #expect(f.machine.nextStep(now: f.at(12)) == first)
        let timedOut = Machine.Reply.awaitedPredecessor(name: "a", term: 5, began: false, scope: nil)
        #expect(f.machine.replied(timedOut, sentAt: f.at(12), now: f.at(262)).value == .proceed)
        #expect(f.machine.takeDeliveries().isEmpty)
        let second = Machine.Step.awaitPredecessor(
            election: 1, name: "a", predecessor: 20, wait: .milliseconds(40), term: 5)
        #expect(f.machine.nextStep(now: f.at(262)) == second)
        let scope = f.scope("a")
        let granted = Machine.Reply.awaitedPredecessor(name: "a", term: 5, began: true, scope: scope)
        #expect(f.machine.replied(granted, sentAt: f.at(262), now: f.at(280)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.takeEvents() == [.becameLeader(election: "a", term: 5)])
        #expect(f.machine.holds(scope))
        #expect(f.machine.elections["a"]?.evidence == nil)
    }

    @Test("the evidence events name the awaited predecessor and when its lease surely ran out")
    func awaitingEvidenceEvent() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        let taken = NodeFixture.awaiting(predecessor: 20, sameServer: false, leaseMilliseconds: 3000)
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: taken, scope: nil)]), sentAt: f.at(10), now: f.at(12)
            ).value == .proceed)
        let evidence = AwaitedEvidence(term: 5, predecessor: 20, sameServer: false, leaseRunOut: f.at(3012))
        #expect(f.machine.takeEvents() == [.awaitingEvidence(election: "a", term: 5, evidence)])
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    @Test("the term moved on while waiting for the predecessor: the session fails")
    func predecessorTermMovedOn() {
        var f = NodeFixture()
        _ = f.bring(to: .awaitingEvidence)
        #expect(
            f.machine.nextStep(now: f.at(12))
                == .awaitPredecessor(election: 1, name: "a", predecessor: 20, wait: .milliseconds(250), term: 5))
        let movedOn = Machine.Reply.awaitedPredecessor(name: "a", term: 5, began: nil, scope: nil)
        #expect(f.machine.replied(movedOn, sentAt: f.at(12), now: f.at(20)).value == .fail(Machine.termMovedOn("a")))
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    @Test("after a server change: the predecessor's acknowledgement begins the term")
    func acknowledgedPredecessor() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        let taken = NodeFixture.awaiting(sameServer: false)
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: taken, scope: nil)]), sentAt: f.at(10), now: f.at(12)
            ).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .checkAcknowledged(name: "a", predecessor: 20))
        #expect(f.machine.replied(.acknowledged(name: "a", true), sentAt: f.at(12), now: f.at(14)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(14)) == .beginTerm(election: 1, name: "a", term: 5))
        let scope = f.scope("a")
        let begun = Machine.Reply.termBegun(name: "a", term: 5, began: true, scope: scope)
        #expect(f.machine.replied(begun, sentAt: f.at(14), now: f.at(16)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.holds(scope))
    }

    @Test("after a server change without an acknowledgement: idle until the predecessor's lease ran out, then begin")
    func predecessorLeaseRunsOut() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        let taken = NodeFixture.awaiting(sameServer: false, leaseMilliseconds: nil)
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: taken, scope: nil)]), sentAt: f.at(10), now: f.at(12)
            ).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .checkAcknowledged(name: "a", predecessor: 20))
        #expect(f.machine.replied(.acknowledged(name: "a", false), sentAt: f.at(12), now: f.at(14)).value == .proceed)
        // Its lease (this node's own, 2 s: the predecessor's is unknown) runs out at 12 + 2000. The idle wait is
        // bounded by min(next heartbeat, that instant): the heartbeat, with these settings.
        #expect(f.machine.nextStep(now: f.at(14)) == .waitIdle(until: f.at(302)))
        let (step, now) = f.serveRoutine(from: f.at(14), to: f.at(2012))
        #expect(step == nil)
        #expect(now == f.at(2012))
        #expect(f.machine.nextStep(now: f.at(2012)) == .beginTerm(election: 1, name: "a", term: 5))
        let begun = Machine.Reply.termBegun(name: "a", term: 5, began: false, scope: nil)
        #expect(f.machine.replied(begun, sentAt: f.at(2012), now: f.at(2013)).value == .fail(Machine.termMovedOn("a")))
    }

    @Test("without a predecessor (another timeline), only the lease counts: no acknowledgement is asked for")
    func unknownPredecessor() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        let taken = NodeFixture.awaiting(predecessor: nil, sameServer: true, leaseMilliseconds: nil)
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: taken, scope: nil)]), sentAt: f.at(10), now: f.at(12)
            ).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .waitIdle(until: f.at(302)))
        let (step, _) = f.serveRoutine(from: f.at(12), to: f.at(2012))
        #expect(step == nil)
        #expect(f.machine.nextStep(now: f.at(2012)) == .beginTerm(election: 1, name: "a", term: 5))
    }

    // MARK: Losing the session

    @Test("the session lost while leading: the leadership ends now, its demotion only once the driver ended it")
    func sessionLostWhileLeading() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(50))
        let expected = FailureValue(
            ending: EndingValue(at: f.at(50), [("a", scope)]), reason: .connectionLost, cut: false,
            end: .connectionLost(NodeFixture.connectionLost))
        #expect(failure.value == expected)
        // Nothing is announced before the driver has ended the scope.
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.elections["a"]?.machine.state == .ending(term: 5))
        #expect(scope.end(at: failure.ending.at))
        f.machine.leadershipsEnded(failure.ending, reason: failure.reason)
        #expect(f.machine.takeDeliveries() == [.demoted(f["a"], .connectionLost, scope: scope)])
        f.machine.leadershipsEnded(failure.ending, reason: failure.reason)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(!f.machine.holds(scope))
        let closed = f.machine.sessionClosed(now: f.at(51))
        #expect(closed.at == f.at(51))
        #expect(closed.scopes.isEmpty)

        // The next session: a candidate again.
        #expect(f.machine.sessionOpened(now: f.at(100)) == 2)
        #expect(f.machine.replied(on: .main, sentAt: f.at(100), now: f.at(101)).value == .trusted)
        #expect(f.machine.replied(on: .witness, sentAt: f.at(101), now: f.at(102)).value == .trusted)
        f.machine.joined(nodeID: 11, members: [11: "n1"], deadlockTimeout: .seconds(1), now: f.at(102))
        #expect(f.machine.nextStep(now: f.at(103)) == .sendWitnessHeartbeat)
        f.machine.witnessHeartbeatSent(now: f.at(103))
        #expect(f.machine.nextStep(now: f.at(104)) == .setUpElection("a"))
        #expect(
            f.machine.replied(.electionSetUp("a", id: 1, leader: nil), sentAt: f.at(104), now: f.at(105)).value
                == .proceed)
        #expect(f.machine.nextStep(now: f.at(105)) == .tryTake([1]))
    }

    @Test("the lease lost while leading: the leadership ended at the deadline, the sockets are cut")
    func leaseLostWhileLeading() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: true, now: f.at(1850))
        let expected = FailureValue(
            ending: EndingValue(at: f.at(1801), [("a", scope)]), reason: .leaseExpired, cut: true, end: .leaseExpired)
        #expect(failure.value == expected)
        #expect(f.machine.takeEvents() == [.leaseExpired])
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(scope.end(at: failure.ending.at))
        f.machine.leadershipsEnded(failure.ending, reason: failure.reason)
        #expect(f.machine.takeDeliveries() == [.demoted(f["a"], .leaseExpired, scope: scope)])
        #expect(scope.endedAt == f.at(1801))
    }

    @Test("a connection lost past the deadline is a lease expiry: ended at the deadline, not at the failure")
    func connectionLostPastDeadline() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(1801))
        let expected = FailureValue(
            ending: EndingValue(at: f.at(1801), [("a", scope)]), reason: .leaseExpired, cut: true, end: .leaseExpired)
        #expect(failure.value == expected)
    }

    @Test(
        "a loss while awaiting evidence or acquiring ends no leadership and announces nothing",
        arguments: [
            NodeFixture.Phase.acquiring, .awaitingEvidence,
        ])
    func lossBeforeLeading(_ phase: NodeFixture.Phase) {
        var f = NodeFixture()
        let (_, now) = f.bring(to: phase)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(now + 1))
        #expect(failure.ending.value == EndingValue(at: f.at(now + 1)))
        #expect(f.machine.elections["a"]?.machine.state == .follower)
        #expect(f.machine.elections["a"]?.evidence == nil)
        f.machine.leadershipsEnded(failure.ending, reason: failure.reason)
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    // MARK: Resignation

    @Test("a leader resigns: it ends now, the lock is handed over once its work drained, then the activator resumes")
    func leaderResigns() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .release(scope, endedAt: f.at(20)))
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(scope.end(at: f.at(20)))
        // Its leader work has not drained yet: the lock stays held.
        #expect(f.machine.nextStep(now: f.at(21)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: true) == true)
        #expect(f.machine.nextStep(now: f.at(22)) == .handOver(election: 1))
        #expect(
            f.machine.replied(.handedOver(election: 1, held: true), sentAt: f.at(22), now: f.at(23)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
        #expect(f.machine.takeEvents().isEmpty)
        #expect(f.machine.elections["a"] == nil)
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: true) == false)
        #expect(f.machine.nextStep(now: f.at(23)) == .waitIdle(until: f.at(302)))
    }

    @Test("a follower resigns at once")
    func followerResigns() {
        var f = NodeFixture()
        _ = f.bring(to: .follower)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .done(nil))
        #expect(f.machine.takeDeliveries() == [.finish(f["a"])])
        #expect(f.machine.elections["a"] == nil)
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: false) == false)
        #expect(f.machine.resignRequested("a", now: f.at(21)).value == .done(nil))
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    @Test("resigning while the bump is in flight: its answer, even one that began, releases the lock")
    func resignsWhileAcquiring() {
        var f = NodeFixture()
        _ = f.bring(to: .acquiring)
        #expect(f.machine.nextStep(now: f.at(305)) == .takeTerm(election: 1))
        #expect(f.machine.resignRequested("a", now: f.at(306)).value == .wait)
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: false) == true)
        let scope = f.scope("a")
        let taken = Machine.Reply.termTaken(election: 1, NodeFixture.began(), scope: scope)
        #expect(f.machine.replied(taken, sentAt: f.at(305), now: f.at(308)).value == .proceed)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(!f.machine.holds(scope))
        #expect(f.machine.nextStep(now: f.at(308)) == .handOver(election: 1))
        #expect(
            f.machine.replied(.handedOver(election: 1, held: true), sentAt: f.at(308), now: f.at(309)).value == .proceed
        )
        #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
        #expect(f.machine.elections["a"] == nil)
    }

    @Test("resigning while the bump is due (not yet sent): it still runs, then the lock is released")
    func resignsWithBumpDue() {
        var f = NodeFixture()
        _ = f.bring(to: .acquiring)
        #expect(f.machine.resignRequested("a", now: f.at(306)).value == .wait)
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: false) == true)
        #expect(f.machine.nextStep(now: f.at(307)) == .takeTerm(election: 1))
        let taken = Machine.Reply.termTaken(election: 1, NodeFixture.awaiting(), scope: nil)
        #expect(f.machine.replied(taken, sentAt: f.at(307), now: f.at(308)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(308)) == .handOver(election: 1))
    }

    @Test("resigning while awaiting evidence releases the lock at once; the evidence then begins nothing")
    func resignsWhileAwaitingEvidence() {
        var f = NodeFixture()
        _ = f.bring(to: .awaitingEvidence)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .wait)
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: false) == true)
        #expect(f.machine.nextStep(now: f.at(21)) == .handOver(election: 1))
        #expect(
            f.machine.replied(.handedOver(election: 1, held: false), sentAt: f.at(21), now: f.at(22)).value == .proceed)
        #expect(f.machine.takeEvents() == [.strayRelease(election: 1)])
        #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
    }

    @Test("a lock won for an election that withdrew meanwhile is given straight back")
    func strayLock() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        #expect(f.machine.resignRequested("a", now: f.at(11)).value == .done(nil))
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: NodeFixture.began(), scope: nil)]), sentAt: f.at(10),
                now: f.at(12)
            ).value
                == .proceed)
        #expect(f.machine.takeDeliveries() == [.finish(f["a"])])
        #expect(f.machine.nextStep(now: f.at(12)) == .handOver(election: 1))
        #expect(
            f.machine.replied(.handedOver(election: 1, held: true), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(13)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.takeEvents().isEmpty)
    }

    @Test("a resignation under way when the session is lost finishes with it")
    func resignationFinishedByLoss() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .release(scope, endedAt: f.at(20)))
        #expect(scope.end(at: f.at(20)))
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: true) == true)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(30))
        #expect(failure.ending.value == EndingValue(at: f.at(30), [("a", scope)]))
        #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
        f.machine.leadershipsEnded(failure.ending, reason: failure.reason)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(scope.endedAt == f.at(20))
    }

    // MARK: Stopping

    @Test("a graceful stop before the first session: no session opens, no activator registers")
    func gracefulStopBeforeSession() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.register("a") == .registered)
        f.machine.gracefulStopRequested()
        #expect(f.machine.isStopping)
        #expect(f.machine.sessionOpened(now: f.at(0)) == nil)
        #expect(f.register("b") == .nodeStopped)
        #expect(
            f.machine.takeDeliveries() == [.message(f["b"], .stopped(.nodeStopped, endedAt: nil)), .finish(f["b"])])
        let (scopes, stopped) = f.machine.sessionThreadFinished(failure: nil)
        #expect(scopes.isEmpty)
        #expect(stopped == [.stopped(f["a"], .nodeStopped, scope: nil, endedAt: nil)])
        #expect(f.machine.phase == .exited)
        #expect(f.machine.watchdogTurn() == .exit)
        // No joined session (the driver never asks then): abandon it.
        #expect(f.machine.nextStep(now: f.at(1)) == .leaseExpired)
    }

    @Test("a graceful stop with no election: leave, then the session ends")
    func gracefulStopLeaves() {
        var f = NodeFixture()
        f.join([])
        f.machine.gracefulStopRequested()
        #expect(f.machine.nextStep(now: f.at(10)) == .leave)
        #expect(f.machine.replied(.left, sentAt: f.at(10), now: f.at(11)).value == .left)
    }

    @Test(
        "a graceful stop at every phase: the activator is asked once, the node leaves once the election withdrew",
        arguments: NodeFixture.Phase.allCases)
    func gracefulStop(_ phase: NodeFixture.Phase) {
        var f = NodeFixture()
        let (scope, start) = f.bring(to: phase)
        var t = start + 5
        f.machine.gracefulStopRequested()
        if phase == .acquiring {
            // The bump due comes first (the lock is held); it finds no hand-over: `a` awaits evidence.
            #expect(f.machine.nextStep(now: f.at(t)) == .takeTerm(election: 1))
            #expect(f.machine.takeDeliveries().isEmpty)
            let taken = Machine.Reply.termTaken(election: 1, NodeFixture.awaiting(6), scope: nil)
            #expect(f.machine.replied(taken, sentAt: f.at(t), now: f.at(t + 1)).value == .proceed)
            t += 2
        }
        let first = f.machine.nextStep(now: f.at(t))
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .gracefulShutdown)])
        let late = f.scope("a", term: 7)
        switch phase {
        case .follower:
            #expect(first == .waitIdle(until: f.at(302)))
            #expect(f.machine.resignRequested("a", now: f.at(t + 1)).value == .done(nil))
            #expect(f.machine.takeDeliveries() == [.finish(f["a"])])
        case .leading:
            #expect(first == .waitIdle(until: f.at(302)))
            guard let scope else {
                Issue.record("no leadership")
                return
            }
            #expect(f.machine.resignRequested("a", now: f.at(t + 1)).value == .release(scope, endedAt: f.at(t + 1)))
            #expect(scope.end(at: f.at(t + 1)))
            #expect(f.machine.resignationAwaited("a", leaderWorkDrained: true) == true)
        case .acquiring, .awaitingEvidence:
            // The evidence wait goes on; the resignation comes while it runs; its grant begins nothing.
            let term: Int64 = phase == .acquiring ? 6 : 5
            let wait = Machine.Step.awaitPredecessor(
                election: 1, name: "a", predecessor: 20, wait: .milliseconds(250), term: term)
            #expect(first == wait)
            #expect(f.machine.resignRequested("a", now: f.at(t + 1)).value == .wait)
            #expect(f.machine.resignationAwaited("a", leaderWorkDrained: false) == true)
            let granted = Machine.Reply.awaitedPredecessor(name: "a", term: term, began: true, scope: late)
            #expect(f.machine.replied(granted, sentAt: f.at(t), now: f.at(t + 1)).value == .proceed)
        }
        #expect(!f.machine.holds(late))
        if phase != .follower {
            // Not yet: `a` still holds its lock.
            #expect(f.machine.nextStep(now: f.at(t + 2)) == .handOver(election: 1))
            let handedOver = f.machine.replied(
                .handedOver(election: 1, held: true), sentAt: f.at(t + 2), now: f.at(t + 3))
            #expect(handedOver.value == .proceed)
            #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
        }
        #expect(f.machine.elections.isEmpty)
        #expect(f.machine.nextStep(now: f.at(t + 3)) == .leave)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.replied(.left, sentAt: f.at(t + 3), now: f.at(t + 4)).value == .left)
        // A resigned leadership is ended once more (idempotently) before the session goes.
        let closed = f.machine.sessionClosed(now: f.at(t + 5))
        #expect(closed.at == f.at(t + 5))
        #expect(identities(closed.scopes) == identities(scope.map { [$0] } ?? []))
        #expect(f.machine.sessionOpened(now: f.at(t + 6)) == nil)
        let (scopes, stopped) = f.machine.sessionThreadFinished(failure: nil)
        #expect(scopes.isEmpty)
        #expect(stopped.isEmpty)
    }

    @Test(
        "a graceful stop asks an activator not set up yet too, and a lock won meanwhile is handed over before leaving")
    func gracefulStopAsksEveryActivator() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        #expect(f.register("b") == .registered)
        f.machine.gracefulStopRequested()
        // `a` withdraws while its try runs, which wins: a stray lock.
        #expect(f.machine.resignRequested("a", now: f.at(11)).value == .done(nil))
        #expect(f.machine.takeDeliveries() == [.finish(f["a"])])
        let won = Machine.Reply.triedAndTook([TakenElection(election: 1, term: NodeFixture.began(), scope: nil)])
        #expect(f.machine.replied(won, sentAt: f.at(10), now: f.at(12)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .handOver(election: 1))
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(
            f.machine.replied(.handedOver(election: 1, held: true), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        // Then the request to `b` (registered during the session, not set up yet), and its setup.
        #expect(f.machine.nextStep(now: f.at(13)) == .setUpElection("b"))
        #expect(f.machine.takeDeliveries() == [.message(f["b"], .gracefulShutdown)])
        #expect(f.machine.resignRequested("b", now: f.at(14)).value == .done(nil))
        #expect(f.machine.takeDeliveries() == [.finish(f["b"])])
        let setUp = f.machine.replied(.electionSetUp("b", id: 2, leader: nil), sentAt: f.at(13), now: f.at(15))
        #expect(setUp.value == .proceed)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.nextStep(now: f.at(15)) == .leave)
    }

    @Test("the graceful shutdown message goes to each activator once")
    func gracefulShutdownOnce() {
        var f = NodeFixture()
        _ = f.bring(to: .leading)
        f.machine.gracefulStopRequested()
        f.machine.gracefulStopRequested()
        _ = f.machine.nextStep(now: f.at(20))
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .gracefulShutdown)])
        _ = f.machine.nextStep(now: f.at(21))
        _ = f.machine.nextStep(now: f.at(22))
        #expect(f.machine.takeDeliveries().isEmpty)
        // Still leading, still heartbeating, never trying again.
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeat(claimSweeper: true))
    }

    @Test("a hard stop before the join: every activator is stopped, no session opens")
    func hardStopBeforeJoin() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.register("a") == .registered)
        #expect(f.machine.sessionOpened(now: f.at(0)) == 1)
        #expect(f.machine.hardStopRequested(now: f.at(5)).value == EndingValue(at: f.at(5)))
        let (scopes, stopped) = f.machine.hardStopContinued()
        #expect(scopes.isEmpty)
        #expect(stopped == [.stopped(f["a"], .cancelled, scope: nil, endedAt: nil)])
        // Not joined: the driver never asks for a step then; the machine says to abandon the session.
        #expect(f.machine.nextStep(now: f.at(6)) == .leaseExpired)
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(7))
        #expect(failure.end == .hardStop)
        #expect(f.machine.sessionOpened(now: f.at(8)) == nil)
    }

    @Test(
        "a hard stop: leaderships end now, every activator is stopped, a late answer starts nothing",
        arguments: NodeFixture.Phase.allCases)
    func hardStop(_ phase: NodeFixture.Phase) {
        var f = NodeFixture()
        let (scope, start) = f.bring(to: phase)
        let t = start + 5
        let ending = f.machine.hardStopRequested(now: f.at(t))
        #expect(ending.value == EndingValue(at: f.at(t), scope.map { [("a", $0)] } ?? []))
        #expect(f.machine.takeDeliveries().isEmpty)
        if let scope { #expect(scope.end(at: ending.at)) }
        let (scopes, stopped) = f.machine.hardStopContinued()
        #expect(identities(scopes) == identities(scope.map { [$0] } ?? []))
        #expect(stopped == [.stopped(f["a"], .cancelled, scope: scope, endedAt: nil)])
        #expect(f.machine.elections.isEmpty)
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.nextStep(now: f.at(t + 1)) == .hardStop)

        // A bump (or an evidence wait) answered late: not trusted, no leadership.
        let late = f.scope("a", term: 6)
        let taken = Machine.Reply.termTaken(election: 1, NodeFixture.began(6), scope: late)
        #expect(f.machine.replied(taken, sentAt: f.at(t), now: f.at(t + 2)).value == .leaseExpired(nil))
        let granted = Machine.Reply.awaitedPredecessor(name: "a", term: 6, began: true, scope: late)
        #expect(f.machine.replied(granted, sentAt: f.at(t), now: f.at(t + 2)).value == .leaseExpired(nil))
        #expect(!f.machine.holds(late))
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.register("b") == .nodeStopped)
        #expect(
            f.machine.takeDeliveries() == [.message(f["b"], .stopped(.nodeStopped, endedAt: nil)), .finish(f["b"])])

        let closed = f.machine.sessionClosed(now: f.at(t + 3))
        #expect(closed.scopes.isEmpty)
        #expect(f.machine.sessionOpened(now: f.at(t + 4)) == nil)
        let finished = f.machine.sessionThreadFinished(failure: nil)
        #expect(finished.scopes.isEmpty)
        #expect(finished.stopped.isEmpty)
    }

    @Test("a bump answered between the hard stop's two steps starts nothing")
    func bumpDuringHardStop() {
        var f = NodeFixture()
        _ = f.bring(to: .acquiring)
        #expect(f.machine.nextStep(now: f.at(305)) == .takeTerm(election: 1))
        #expect(f.machine.hardStopRequested(now: f.at(306)).value == EndingValue(at: f.at(306)))
        let scope = f.scope("a")
        let taken = Machine.Reply.termTaken(election: 1, NodeFixture.began(), scope: scope)
        #expect(f.machine.replied(taken, sentAt: f.at(305), now: f.at(307)).value == .proceed)
        #expect(!f.machine.holds(scope))
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.takeEvents().isEmpty)
        // And no new try while halting.
        #expect(f.machine.nextStep(now: f.at(602)) == .heartbeat(claimSweeper: true))
        let (scopes, stopped) = f.machine.hardStopContinued()
        #expect(scopes.isEmpty)
        #expect(stopped == [.stopped(f["a"], .cancelled, scope: nil, endedAt: nil)])
    }

    @Test("a hard stop during a resignation resumes the activator waiting for it")
    func hardStopDuringResignation() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .release(scope, endedAt: f.at(20)))
        #expect(scope.end(at: f.at(20)))
        #expect(f.machine.resignationAwaited("a", leaderWorkDrained: true) == true)
        // The resignation finishes with the loss the hard stop's first step is.
        let ending = f.machine.hardStopRequested(now: f.at(30))
        #expect(ending.value == EndingValue(at: f.at(30), [("a", scope)]))
        #expect(f.machine.takeDeliveries() == [.resumeResignation("a"), .finish(f["a"])])
        let (scopes, stopped) = f.machine.hardStopContinued()
        #expect(identities(scopes) == [ObjectIdentifier(scope)])
        #expect(stopped.isEmpty)
    }

    @Test("the session thread's end withdraws every election: a leader is stopped with its scope")
    func threadFinished() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.register("b") == .registered)
        let error = StokerError(.schemaMismatch, "test")
        let (scopes, stopped) = f.machine.sessionThreadFinished(failure: error)
        #expect(identities(scopes) == [ObjectIdentifier(scope)])
        #expect(
            stopped == [
                .stopped(f["a"], .nodeStopped, scope: scope, endedAt: nil),
                .stopped(f["b"], .nodeStopped, scope: nil, endedAt: nil),
            ])
        #expect(f.machine.failure == error)
        #expect(f.machine.nextStep(now: f.at(20)) == .leaseExpired)
        #expect(f.register("c") == .nodeStopped)
    }

    // MARK: The waiter token

    @Test("a follower leading nothing waits in its token's queue, with the heartbeat when due; a grant leads")
    func waiterToken() {
        var f = NodeFixture()
        f.joinAsWaiter()
        // min(deadlock_timeout × 0.8, statement timeout / 2, (lease − margin) / 6) = 300 ms.
        let wait = Machine.Step.waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: false)
        #expect(f.machine.nextStep(now: f.at(13)) == wait)
        let timedOut = Machine.Reply.waitedAndTook(election: 7, beat: false, renewed: 0, granted: false, taken: [])
        #expect(f.machine.replied(timedOut, sentAt: f.at(13), now: f.at(313)).value == .proceed)
        let beat = Machine.Step.waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: true)
        #expect(f.machine.nextStep(now: f.at(313)) == beat)
        let scope = f.scope("a")
        let granted = Machine.Reply.waitedAndTook(
            election: 7, beat: true, renewed: 1, granted: true,
            taken: [TakenElection(election: 7, term: NodeFixture.began(), scope: scope)])
        #expect(f.machine.replied(granted, sentAt: f.at(313), now: f.at(400)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        // The grant gave the token back: nothing to release. Its holder may have died: one sweep reports it at once
        // (node_down), whoever holds the sweeper token. Then the heartbeat is due at 313 + 300.
        #expect(f.machine.session?.waiterToken == nil)
        #expect(f.machine.nextStep(now: f.at(400)) == .sweep)
        #expect(f.machine.replied(.swept(1), sentAt: f.at(400), now: f.at(402)).value == .proceed)
        // Then the new leadership's triggers.
        f.readsNoTriggers(7, at: 402)
        #expect(f.machine.nextStep(now: f.at(402)) == .waitIdle(until: f.at(613)))
    }

    @Test("a vacuum of the takeover's tables, seen by a heartbeat: the waiter rehearses its takeover once, then waits")
    func rehearsalAfterVacuum() {
        var f = NodeFixture()
        f.joinAsWaiter()
        let wait = Machine.Step.waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: false)
        let beat = Machine.Step.waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: true)
        func beatReply(_ maintenance: Int64?) -> Machine.Reply {
            .waitedAndTook(election: 7, beat: true, renewed: 1, granted: false, taken: [], maintenance: maintenance)
        }
        // The join read no count (a schema without statistics yet): the first one only sets the mark.
        #expect(f.machine.nextStep(now: f.at(302)) == beat)
        #expect(f.machine.replied(beatReply(40), sentAt: f.at(302), now: f.at(303)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(303)) == wait)
        let timedOut = Machine.Reply.waitedAndTook(election: 7, beat: false, renewed: 0, granted: false, taken: [])
        #expect(f.machine.replied(timedOut, sentAt: f.at(303), now: f.at(602)).value == .proceed)
        // The same count, or none: nothing to rehearse.
        for (at, count) in [(602, 40), (902, nil)] as [(Int, Int64?)] {
            #expect(f.machine.nextStep(now: f.at(at)) == beat)
            #expect(f.machine.replied(beatReply(count), sentAt: f.at(at), now: f.at(at + 1)).value == .proceed)
            #expect(f.machine.nextStep(now: f.at(at + 1)) == wait)
            #expect(f.machine.replied(timedOut, sentAt: f.at(at + 1), now: f.at(at + 300)).value == .proceed)
        }
        // It moved (a vacuum or an analyze of nodes, elections or term_band): rehearse once, then wait again.
        #expect(f.machine.nextStep(now: f.at(1202)) == beat)
        #expect(f.machine.replied(beatReply(41), sentAt: f.at(1202), now: f.at(1203)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(1203)) == .rehearse)
        #expect(f.machine.replied(.rehearsed, sentAt: f.at(1203), now: f.at(1206)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(1206)) == wait)
    }

    @Test("a vacuum between the join's read of the count and the waiter's first heartbeat: that heartbeat rehearses")
    func rehearsalAfterVacuumDuringJoin() {
        var f = NodeFixture()
        f.joinAsWaiter(maintenance: 40)
        let beat = Machine.Step.waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: true)
        #expect(f.machine.nextStep(now: f.at(302)) == beat)
        let beaten = Machine.Reply.waitedAndTook(
            election: 7, beat: true, renewed: 1, granted: false, taken: [], maintenance: 41)
        #expect(f.machine.replied(beaten, sentAt: f.at(302), now: f.at(304)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(304)) == .rehearse)
    }

    @Test(
        "a waiter whose heartbeat saw a vacuum and was granted the lock leads everything: no rehearsal until it stands")
    func noRehearsalWhileLeadingAll() {
        var f = NodeFixture()
        f.joinAsWaiter(maintenance: 40)
        #expect(
            f.machine.nextStep(now: f.at(302))
                == .waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: true))
        let scope = f.scope("a")
        let granted = Machine.Reply.waitedAndTook(
            election: 7, beat: true, renewed: 1, granted: true,
            taken: [TakenElection(election: 7, term: NodeFixture.began(), scope: scope)], maintenance: 41)
        #expect(f.machine.replied(granted, sentAt: f.at(302), now: f.at(304)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.nextStep(now: f.at(304)) == .sweep)
        #expect(f.machine.replied(.swept(0), sentAt: f.at(304), now: f.at(305)).value == .proceed)
        f.readsNoTriggers(7, at: 305)
        #expect(f.machine.nextStep(now: f.at(305)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.session?.rehearsalDue == true)
    }

    @Test("the heartbeat claims the sweeper token: its holder sweeps at once, then every sweepInterval; others don't")
    func sweeper() {
        var f = NodeFixture()
        f.join([("a", 7)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([7]))
        let scope = f.scope("a")
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 7, term: NodeFixture.began(), scope: scope)]), sentAt: f.at(10),
                now: f.at(12)
            ).value
                == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        f.readsNoTriggers(7, at: 12)
        // Leading, nothing else to try: the heartbeat at 302, with a try of the sweeper token.
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeat(claimSweeper: true))
        #expect(f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(302), now: f.at(304)).value == .proceed)
        // Not taken (another member sweeps): no sweep, and the next heartbeat tries again.
        #expect(f.machine.nextStep(now: f.at(304)) == .waitIdle(until: f.at(602)))
        #expect(f.machine.nextStep(now: f.at(602)) == .heartbeat(claimSweeper: true))
        #expect(
            f.machine.replied(.heartbeat(renewed: 1, sweeper: true), sentAt: f.at(602), now: f.at(604)).value
                == .proceed)
        // Taken: sweep at once (the previous sweeper may have died unreported), then every second; never try again.
        #expect(f.machine.nextStep(now: f.at(604)) == .sweep)
        #expect(f.machine.replied(.swept(0), sentAt: f.at(604), now: f.at(606)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(606)) == .waitIdle(until: f.at(902)))
        #expect(f.machine.nextStep(now: f.at(902)) == .heartbeat(claimSweeper: false))
        #expect(f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(902), now: f.at(904)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(1500)) == .heartbeat(claimSweeper: false))
        #expect(f.machine.replied(.heartbeat(renewed: 1), sentAt: f.at(1500), now: f.at(1502)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(1604)) == .sweep)
    }

    @Test("the heartbeat's try can claim a waiter token: the follower then waits in that election's queue")
    func tokenClaimedByHeartbeat() {
        var f = NodeFixture()
        f.join([("a", 7), ("b", 8)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([7, 8]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(10), now: f.at(12)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .claimWaiter([7, 8]))
        #expect(f.machine.replied(.claimedWaiter(nil), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        #expect(
            f.machine.nextStep(now: f.at(302)) == .heartbeatAndTry(others: [7, 8], claim: true, claimSweeper: true))
        let tried = Machine.Reply.heartbeatAndTried(renewed: 1, won: [], claimed: 8)
        #expect(f.machine.replied(tried, sentAt: f.at(302), now: f.at(304)).value == .proceed)
        #expect(
            f.machine.nextStep(now: f.at(304))
                == .waitAndTake(election: 8, others: [7], wait: .milliseconds(300), beat: false))
    }

    @Test("a waiter that starts leading another election gives its token back first")
    func tokenReleasedWhenLeading() {
        var f = NodeFixture()
        f.join([("a", 7), ("b", 8)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([7, 8]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(10), now: f.at(12)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .claimWaiter([7, 8]))
        #expect(f.machine.replied(.claimedWaiter(7), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        #expect(
            f.machine.nextStep(now: f.at(13))
                == .waitAndTake(election: 7, others: [8], wait: .milliseconds(300), beat: false))
        let scope = f.scope("b")
        let took = Machine.Reply.waitedAndTook(
            election: 7, beat: false, renewed: 0, granted: false,
            taken: [TakenElection(election: 8, term: NodeFixture.began(), scope: scope)])
        #expect(f.machine.replied(took, sentAt: f.at(13), now: f.at(100)).value == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["b"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.nextStep(now: f.at(100)) == .releaseWaiterToken(election: 7))
        #expect(
            f.machine.replied(.waiterTokenReleased(held: true), sentAt: f.at(100), now: f.at(101)).value == .proceed)
        f.readsNoTriggers(8, at: 101)
        // No token, and none claimed while leading: `a` is tried with the fallback retry only.
        #expect(f.machine.nextStep(now: f.at(101)) == .waitIdle(until: f.at(302)))
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeatAndTry(others: [7], claim: false, claimSweeper: true))
        #expect(f.machine.takeEvents() == [.becameLeader(election: "b", term: 5)])
    }

    @Test("a waiter gives its token back before a freeze holds the thread; a token not held is reported")
    func tokenReleasedBeforeFreeze() {
        var f = NodeFixture()
        f.joinAsWaiter()
        f.machine.freezeRequested(session: .seconds(1), watchdog: .milliseconds(1100))
        #expect(f.machine.nextStep(now: f.at(14)) == .releaseWaiterToken(election: 7))
        #expect(f.machine.replied(.waiterTokenReleased(held: false), sentAt: f.at(14), now: f.at(15)).value == .proceed)
        #expect(f.machine.takeEvents() == [.strayWaiterToken])
        #expect(f.machine.nextStep(now: f.at(15)) == .hold(.seconds(1)))
        #expect(f.machine.watchdogTurn() == .hold(.milliseconds(1100)))
        #expect(f.machine.watchdogTurn() == .sleep(until: f.at(1801), generation: 1))
        // Thawed: claim again at the next change or heartbeat.
        #expect(f.machine.nextStep(now: f.at(16)) == .waitIdle(until: f.at(302)))
    }

    @Test("a waiter whose election starts awaiting evidence gives the token back")
    func tokenReleasedWhileAwaiting() {
        var f = NodeFixture()
        f.join([("a", 7), ("b", 8)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([7, 8]))
        #expect(f.machine.replied(.triedAndTook([]), sentAt: f.at(10), now: f.at(12)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .claimWaiter([7, 8]))
        #expect(f.machine.replied(.claimedWaiter(7), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        _ = f.machine.nextStep(now: f.at(13))
        let took = Machine.Reply.waitedAndTook(
            election: 7, beat: false, renewed: 0, granted: false,
            taken: [TakenElection(election: 8, term: NodeFixture.awaiting(), scope: nil)])
        #expect(f.machine.replied(took, sentAt: f.at(13), now: f.at(100)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(100)) == .releaseWaiterToken(election: 7))
    }

    // MARK: Notifications

    @Test("notifications: members reach leaders, a leader reaches followers by name, a release reaches candidates")
    func notifications() throws {
        var f = NodeFixture()
        f.join([("a", 1), ("b", 2)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1, 2]))
        let scope = f.scope("a")
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: NodeFixture.began(), scope: scope)]), sentAt: f.at(10),
                now: f.at(12)
            ).value
                == .proceed)
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        f.readsNoTriggers(1, at: 12)
        let n3 = ClusterMember(id: 30, name: "n3")
        let n2 = ClusterMember(id: 20, name: "n2")
        let me = ClusterMember(id: 10, name: "n1")

        f.machine.notified([.nodeUp(n3)])
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .member(.nodeUp(n3)))])
        f.machine.notified([.nodeDown(n2, reason: .died)])
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .member(.nodeDown(n2, reason: .died)))])
        // Once each: a member the list already shows (read at the join, its notification after), or already gone.
        f.machine.notified([.nodeUp(n3), .nodeDown(n2, reason: .left)])
        #expect(f.machine.takeDeliveries().isEmpty)
        // This node's own row.
        f.machine.notified([.nodeUp(me), .nodeDown(me, reason: .left)])
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.session?.members[10] == "n1")

        // A leader of `b`: named from the members (n3 joined, n2 left), only to `b`'s follower.
        f.machine.notified([
            .leader(election: 2, node: 30), .leader(election: 2, node: 20), .leader(election: 2, node: nil),
        ])
        #expect(
            f.machine.takeDeliveries() == [
                .message(f["b"], .leaderObserved("n3")), .message(f["b"], .leaderObserved(nil)),
                .message(f["b"], .leaderObserved(nil)),
            ])
        f.machine.notified([.leader(election: 1, node: 30), .leader(election: 9, node: 30)])
        #expect(f.machine.takeDeliveries().isEmpty)
        // This node's own bump, notified before its answer is read: not news for the follower it still is.
        f.machine.notified([.leader(election: 2, node: 10)])
        #expect(f.machine.takeDeliveries().isEmpty)

        f.machine.notified([.released(election: 2), .released(election: 1), .released(election: 9)])
        #expect(f.machine.takeDeliveries() == [.message(f["b"], .leaderObserved(nil))])
        // Each asked for a retry now.
        #expect(f.machine.nextStep(now: f.at(20)) == .tryTake([2]))
    }

    @Test("a member coming up makes the successor check the acknowledgement again")
    func nodeUpRechecksAcknowledgement() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.nextStep(now: f.at(10)) == .tryTake([1]))
        let taken = NodeFixture.awaiting(sameServer: false)
        #expect(
            f.machine.replied(
                .triedAndTook([TakenElection(election: 1, term: taken, scope: nil)]), sentAt: f.at(10), now: f.at(12)
            ).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(12)) == .checkAcknowledged(name: "a", predecessor: 20))
        #expect(f.machine.replied(.acknowledged(name: "a", false), sentAt: f.at(12), now: f.at(13)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(13)) == .waitIdle(until: f.at(302)))
        f.machine.notified([.nodeUp(ClusterMember(id: 31, name: "n1"))])
        #expect(f.machine.takeDeliveries().isEmpty)
        #expect(f.machine.nextStep(now: f.at(14)) == .checkAcknowledged(name: "a", predecessor: 20))
    }

    @Test("notifications without a session change nothing")
    func notificationsWithoutSession() {
        var f = NodeFixture()
        #expect(f.machine.runRequested() == true)
        #expect(f.register("a") == .registered)
        f.machine.notified([.released(election: 1), .nodeUp(ClusterMember(id: 30, name: "n3"))])
        #expect(f.machine.takeDeliveries().isEmpty)
    }

    // MARK: Found by the walks and fixed (or documented)

    @Test("a wait whose heartbeat found the node's row deleted begins no leadership")
    func waitWithDeletedRowBeginsNothing() {
        var f = NodeFixture()
        f.joinAsWaiter()
        #expect(
            f.machine.nextStep(now: f.at(302))
                == .waitAndTake(election: 7, others: [], wait: .milliseconds(300), beat: true))
        let scope = f.scope("a")
        let reply = Machine.Reply.waitedAndTook(
            election: 7, beat: true, renewed: 0, granted: true,
            taken: [TakenElection(election: 7, term: NodeFixture.began(), scope: scope)])
        // The session fails, as for the heartbeat's own try, before any lock won is recorded: no leader message for a
        // node whose row is gone (its locks go with the session).
        #expect(f.machine.replied(reply, sentAt: f.at(302), now: f.at(310)).value == .fail(Machine.rowDeleted))
        #expect(f.machine.takeDeliveries().isEmpty)
        let held = f.machine.holds(scope)
        #expect(!held)
    }

    @Test("after a hard stop the next step is the hard stop, even with the witness heartbeat due")
    func hardStopBeforeWitnessHeartbeat() {
        var f = NodeFixture()
        f.join([("a", 1)])
        #expect(f.machine.witnessReplied(now: f.at(10)).value == .trusted)
        _ = f.machine.hardStopRequested(now: f.at(700))
        _ = f.machine.hardStopContinued()
        // The witness's next beat was due at 3 + 600: the stop (and the lease) come first.
        #expect(f.machine.nextStep(now: f.at(701)) == .hardStop)
    }

    @Test("a resignation finished by a loss: `.stopped` carries the resignation's instant, the resigner ends the scope")
    func resignationStoppedBeforeEnd() throws {
        var f = NodeFixture()
        let scope = try #require(f.bring(to: .leading).scope)
        #expect(f.machine.resignRequested("a", now: f.at(20)).value == .release(scope, endedAt: f.at(20)))
        // The resigning activator has not ended the scope yet (`NodeDriver.resign` does so right after the lock is
        // released) when the session thread reports a failure.
        let failure = f.machine.sessionFailed(NodeFixture.connectionLost, leaseLost: false, now: f.at(21))
        #expect(failure.ending.value == EndingValue(at: f.at(21), [("a", scope)]))
        let deliveries = f.machine.takeDeliveries()
        #expect(deliveries == [.stopped(f["a"], .nodeStopped, scope: scope, endedAt: f.at(20))])
        // The resigning activator ends the scope itself (right after `.release`); until then the driver reports the
        // resignation's instant, which is when the leadership ended.
        #expect(scope.endedAt == nil)
    }

    @Test("a resignation whose bump answers during a hard stop finishes (or can be waited for)")
    func resignationOfBumpDuringHardStop() {
        // Walk seed 0x4e0d0094, reduced.
        var f = NodeFixture()
        _ = f.bring(to: .follower)
        #expect(f.machine.nextStep(now: f.at(302)) == .heartbeatAndTry(others: [1], claim: true, claimSweeper: true))
        // The hard stop begins while the heartbeat's try runs; the try wins `a`'s lock: its bump is due, and runs.
        #expect(f.machine.hardStopRequested(now: f.at(303)).value == EndingValue(at: f.at(303)))
        let won = Machine.Reply.heartbeatAndTried(renewed: 1, won: [1], claimed: nil)
        #expect(f.machine.replied(won, sentAt: f.at(302), now: f.at(305)).value == .proceed)
        #expect(f.machine.nextStep(now: f.at(305)) == .takeTerm(election: 1))
        // The activator resigns (its task cancelled) while the bump runs.
        #expect(f.machine.resignRequested("a", now: f.at(306)).value == .wait)
        let taken = Machine.Reply.termTaken(election: 1, NodeFixture.awaiting(), scope: nil)
        #expect(f.machine.replied(taken, sentAt: f.at(305), now: f.at(307)).value == .proceed)
        // Halting, the bump begins nothing and finishes the resignation (the lock goes with the session): the
        // activator is told at once, and the hard stop's second step finds nothing left to tell.
        #expect(f.machine.elections["a"] == nil)
        let awaited = f.machine.resignationAwaited("a", leaderWorkDrained: false)
        #expect(!awaited)
        #expect(f.machine.takeDeliveries() == [.stopped(f["a"], .cancelled, scope: nil, endedAt: nil)])
        let (_, stopped) = f.machine.hardStopContinued()
        #expect(stopped.isEmpty)
    }

    @Test("evidence that arrives during a graceful stop begins the leadership, and the asked resignation hands it over")
    func noLeadershipDuringGracefulStop() {
        var f = NodeFixture()
        _ = f.bring(to: .awaitingEvidence)
        f.machine.gracefulStopRequested()
        let step = f.machine.nextStep(now: f.at(20))
        #expect(step == .awaitPredecessor(election: 1, name: "a", predecessor: 20, wait: .milliseconds(250), term: 5))
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .gracefulShutdown)])
        // The evidence arrives before the activator got to resign.
        let scope = f.scope("a")
        let granted = Machine.Reply.awaitedPredecessor(name: "a", term: 5, began: true, scope: scope)
        #expect(f.machine.replied(granted, sentAt: f.at(20), now: f.at(30)).value == .proceed)
        // Only a hard stop refuses it: the activator, asked to hand over, resigns and the lock is handed over.
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.resignRequested("a", now: f.at(31)).value == .release(scope, endedAt: f.at(31)))
    }

    // MARK: Triggers

    /// A leader of `a` (id 1), its leadership's first read answered with `triggers`.
    private func leaderReading(
        _ f: inout NodeFixture, _ triggers: [Int64], complete: Bool = true
    ) -> LeaderScope? {
        let scope = f.scope("a")
        f.join([("a", 1)])
        _ = f.machine.nextStep(now: f.at(10))
        _ = f.machine.replied(
            .triedAndTook([TakenElection(election: 1, term: NodeFixture.began(), scope: scope)]), sentAt: f.at(10),
            now: f.at(12))
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .leader(scope, members: f.machine.memberList))])
        #expect(f.machine.nextStep(now: f.at(12)) == .readTriggers(election: 1, after: 0))
        let read = triggers.map { Machine.PendingTrigger(sequence: $0, payload: "p\($0)") }
        #expect(
            f.machine.replied(.triggersRead(election: 1, read, complete: complete), sentAt: f.at(12), now: f.at(13))
                .value == .proceed)
        return scope
    }

    @Test("a new leader reads its election's triggers and hands each to its activator, in order")
    func triggersAtLeadership() throws {
        var f = NodeFixture()
        let scope = try #require(leaderReading(&f, [3, 4]))
        #expect(
            f.machine.takeDeliveries() == [
                .message(f["a"], .trigger(scope, payload: "p3", sequence: 3)),
                .message(f["a"], .trigger(scope, payload: "p4", sequence: 4)),
            ])
        // All read (less than a page): nothing more until a notification.
        #expect(f.machine.nextStep(now: f.at(13)) == .waitIdle(until: f.at(302)))
        f.machine.notified([.trigger(election: 1)])
        #expect(f.machine.nextStep(now: f.at(14)) == .readTriggers(election: 1, after: 4))
        // A re-read that returns what was handed out already (it was not deleted yet) hands out only what is new.
        let again = [4, 5].map { Machine.PendingTrigger(sequence: $0, payload: "p\($0)") }
        _ = f.machine.replied(.triggersRead(election: 1, again, complete: true), sentAt: f.at(14), now: f.at(15))
        #expect(f.machine.takeDeliveries() == [.message(f["a"], .trigger(scope, payload: "p5", sequence: 5))])
    }

    @Test("a full page of triggers reads the next page at once")
    func triggersPaged() throws {
        var f = NodeFixture()
        _ = try #require(leaderReading(&f, [1, 2], complete: false))
        #expect(f.machine.takeDeliveries().count == 2)
        #expect(f.machine.nextStep(now: f.at(13)) == .readTriggers(election: 1, after: 2))
    }

    @Test("a follower does not read triggers; a notification for another election reads nothing")
    func triggersOnlyForLeaders() {
        var f = NodeFixture()
        _ = f.bring(to: .follower)
        f.machine.notified([.trigger(election: 1), .trigger(election: 9)])
        #expect(f.machine.takeDeliveries().isEmpty)
        let step = f.machine.nextStep(now: f.at(14))
        if case .readTriggers = step { Issue.record("a follower read triggers: \(step)") }
    }

    @Test("a trigger notified with a read's answer is read at once (the answer does not swallow the wish)")
    func triggerNotifiedDuringRead() throws {
        var f = NodeFixture()
        _ = try #require(leaderReading(&f, [1]))
        _ = f.machine.takeDeliveries()
        f.machine.notified([.trigger(election: 1)])
        #expect(f.machine.nextStep(now: f.at(14)) == .readTriggers(election: 1, after: 1))
        // Trigger 2 commits after the read's snapshot: its notification comes with the (empty, complete) answer, and
        // the driver hands the notifications over first.
        f.machine.notified([.trigger(election: 1)])
        _ = f.machine.replied(.triggersRead(election: 1, [], complete: true), sentAt: f.at(14), now: f.at(15))
        #expect(f.machine.nextStep(now: f.at(15)) == .readTriggers(election: 1, after: 1))
    }

    @Test("at most a page of triggers is unfinished at once; a finished one lets the next page be read")
    func triggersBounded() throws {
        var f = NodeFixture()
        let page = (1...Int64(Machine.triggerPage)).map { $0 }
        _ = try #require(leaderReading(&f, page, complete: false))
        #expect(f.machine.takeDeliveries().count == Machine.triggerPage)
        // More wait in the table, but a page is unfinished: the node heartbeats and idles instead of reading.
        #expect(f.machine.nextStep(now: f.at(13)) == .waitIdle(until: f.at(302)))
        let wake = f.machine.triggerDone("a", sequence: 1, handled: true)
        #expect(wake)
        #expect(f.machine.nextStep(now: f.at(14)) == .readTriggers(election: 1, after: Int64(Machine.triggerPage)))
    }

    @Test("exactly the triggers handled are deleted; one that threw or was skipped stays for the next leadership")
    func triggersDeletedWhenHandled() throws {
        var f = NodeFixture()
        _ = try #require(leaderReading(&f, [1, 2, 3]))
        _ = f.machine.takeDeliveries()
        let first = f.machine.triggerDone("a", sequence: 1, handled: true)
        let second = f.machine.triggerDone("a", sequence: 2, handled: false)
        let third = f.machine.triggerDone("a", sequence: 3, handled: true)
        #expect(first && !second && third)
        #expect(f.machine.nextStep(now: f.at(14)) == .deleteTriggers(election: 1, sequences: [1, 3]))
        _ = f.machine.replied(.triggersDeleted(election: 1, sequences: [1, 3]), sentAt: f.at(14), now: f.at(15))
        #expect(f.machine.nextStep(now: f.at(15)) == .waitIdle(until: f.at(302)))
        // An unknown election's report is nothing to do.
        let unknown = f.machine.triggerDone("zz", sequence: 9, handled: true)
        #expect(!unknown)
    }

    @Test("a read answered after the leadership ended hands nothing out")
    func triggersAfterLoss() throws {
        var f = NodeFixture()
        let scope = try #require(leaderReading(&f, [1]))
        _ = f.machine.takeDeliveries()
        f.machine.notified([.trigger(election: 1)])
        #expect(f.machine.nextStep(now: f.at(14)) == .readTriggers(election: 1, after: 1))
        // The lease ran out while the read was in flight: the leadership is being ended.
        let ending = f.machine.beginLoss(.leaseExpired, at: f.at(15), finishing: .nodeStopped)
        #expect(scope.end(at: f.at(15)))
        let late = [Machine.PendingTrigger(sequence: 2, payload: "p2")]
        _ = f.machine.replied(.triggersRead(election: 1, late, complete: true), sentAt: f.at(14), now: f.at(15))
        f.machine.leadershipsEnded(ending, reason: .leaseExpired)
        #expect(f.machine.takeDeliveries() == [.demoted(f["a"], .leaseExpired, scope: scope)])
        // The next leadership starts from the table's first trigger.
        f.machine.elections["a"]?.triggers.begin()
        #expect(f.machine.elections["a"]?.triggers == Machine.TriggerQueue(read: true))
    }

    @Test("a graceful stop deletes the handled triggers before the node leaves")
    func triggersDeletedBeforeLeave() throws {
        var f = NodeFixture()
        let scope = try #require(leaderReading(&f, [1]))
        _ = f.machine.takeDeliveries()
        let handled = f.machine.triggerDone("a", sequence: 1, handled: true)
        #expect(handled)
        f.machine.gracefulStopRequested()
        _ = f.machine.resignRequested("a", now: f.at(14))
        #expect(scope.end(at: f.at(14)))
        let awaited = f.machine.resignationAwaited("a", leaderWorkDrained: true)
        #expect(awaited)
        _ = f.machine.takeDeliveries()
        // The hand-over first (the lock), then the deletion, then the leave.
        #expect(f.machine.nextStep(now: f.at(15)) == .handOver(election: 1))
        _ = f.machine.replied(.handedOver(election: 1, held: true), sentAt: f.at(15), now: f.at(16))
        #expect(f.machine.elections.isEmpty)
        #expect(f.machine.nextStep(now: f.at(16)) == .deleteTriggers(election: 1, sequences: [1]))
        _ = f.machine.replied(.triggersDeleted(election: 1, sequences: [1]), sentAt: f.at(16), now: f.at(17))
        #expect(f.machine.nextStep(now: f.at(17)) == .leave)
    }
}
