import StokerHarness
import Testing

@testable import Stoker

@Suite("Election state machine")
struct ElectionStateMachineTests {
    typealias Machine = ElectionStateMachine
    typealias State = ElectionStateMachine.State
    typealias Action = ElectionStateMachine.Action

    /// One input fed to the machine, as data.
    enum Input: Sendable, Hashable, CustomStringConvertible {
        case lockWon
        case termBumped(Int64, began: Bool)
        case evidenceFound
        case leadershipLost(DemotionReason)
        case leadershipEnded
        case resign
        case leaderWorkDrained
        case released

        func apply(to machine: inout ElectionStateMachine) -> ElectionStateMachine.Action {
            switch self {
            case .lockWon: machine.lockWon()
            case .termBumped(let term, let began): machine.termBumped(term, began: began)
            case .evidenceFound: machine.evidenceFound()
            case .leadershipLost(let loss): machine.leadershipLost(loss)
            case .leadershipEnded: machine.leadershipEnded()
            case .resign: machine.resign()
            case .leaderWorkDrained: machine.leaderWorkDrained()
            case .released: machine.released()
            }
        }

        var description: String {
            switch self {
            case .lockWon: "lockWon()"
            case .termBumped(let term, let began): "termBumped(\(term), began: \(began))"
            case .evidenceFound: "evidenceFound()"
            case .leadershipLost(let loss): "leadershipLost(.\(loss))"
            case .leadershipEnded: "leadershipEnded()"
            case .resign: "resign()"
            case .leaderWorkDrained: "leaderWorkDrained()"
            case .released: "released()"
            }
        }
    }

    // MARK: - The transition table

    /// One row: from `state`, `input` answers `action` and leaves the machine in `next`.
    struct Transition: Sendable, CustomTestStringConvertible {
        let state: State
        let input: Input
        let action: Action
        let next: State

        init(_ state: State, _ input: Input, _ action: Action, _ next: State) {
            self.state = state
            self.input = input
            self.action = action
            self.next = next
        }

        var testDescription: String {
            "\(state) + \(input) → \(ElectionStateMachineTests.describe(action)), \(next)"
        }
    }

    static func describe(_ action: Action) -> String {
        switch action {
        case .none: ".none"
        case .bumpTerm: ".bumpTerm"
        case .startLeading(let term): ".startLeading(term: \(term))"
        case .awaitEvidence(let term): ".awaitEvidence(term: \(term))"
        case .endLeading(let term, let loss): ".endLeading(term: \(term), .\(loss))"
        case .endLeadingAndRelease(let term?): ".endLeadingAndRelease(term: \(term))"
        case .endLeadingAndRelease(nil): ".endLeadingAndRelease(term: nil)"
        case .finishResignation: ".finishResignation"
        case .releaseLock: ".releaseLock"
        case .announceDemotion: ".announceDemotion"
        }
    }

    static let states: [State] = [
        .follower,
        .acquiring,
        .awaitingEvidence(term: 7),
        .leading(term: 7),
        .ending(term: 7),
        .resigning(wasLeading: true),
        .resigning(wasLeading: false),
        .releasing,
        .withdrawn,
    ]

    static let inputs: [Input] = [
        .lockWon,
        .termBumped(8, began: true),
        .termBumped(8, began: false),
        .evidenceFound,
        .leadershipLost(.leaseExpired),
        .leadershipLost(.connectionLost),
        .leadershipEnded,
        .resign,
        .leaderWorkDrained,
        .released,
    ]

    /// Every state × input, written down from the doc comments of `ElectionStateMachine`. A state's own term is 7 and
    /// the term a bump answers is 8, so a stray answer that overwrote the term, or a leadership begun with the wrong
    /// one, shows.
    static let table: [Transition] = [
        // follower: the only candidate.
        .init(.follower, .lockWon, .bumpTerm, .acquiring),
        .init(.follower, .termBumped(8, began: true), .none, .follower),
        .init(.follower, .termBumped(8, began: false), .none, .follower),
        .init(.follower, .evidenceFound, .none, .follower),
        .init(.follower, .leadershipLost(.leaseExpired), .none, .follower),
        .init(.follower, .leadershipLost(.connectionLost), .none, .follower),
        .init(.follower, .leadershipEnded, .none, .follower),
        .init(.follower, .resign, .finishResignation, .withdrawn),
        .init(.follower, .leaderWorkDrained, .none, .follower),
        .init(.follower, .released, .none, .follower),

        // acquiring: the lock is held, the bump in flight, not a leader yet. A bump that found the hand-over (or the
        // predecessor's witness gone) begins the leadership; one that did not waits for evidence.
        .init(.acquiring, .lockWon, .none, .acquiring),
        .init(.acquiring, .termBumped(8, began: true), .startLeading(term: 8), .leading(term: 8)),
        .init(.acquiring, .termBumped(8, began: false), .awaitEvidence(term: 8), .awaitingEvidence(term: 8)),
        .init(.acquiring, .evidenceFound, .none, .acquiring),
        .init(.acquiring, .leadershipLost(.leaseExpired), .none, .follower),
        .init(.acquiring, .leadershipLost(.connectionLost), .none, .follower),
        .init(.acquiring, .leadershipEnded, .none, .acquiring),
        .init(.acquiring, .resign, .none, .resigning(wasLeading: false)),
        .init(.acquiring, .leaderWorkDrained, .none, .acquiring),
        .init(.acquiring, .released, .none, .acquiring),

        // awaitingEvidence(7): the lock is held and the term bumped, not a leader yet; only evidence begins it, with
        // the term already bumped. A loss ends the chance silently; a resignation releases the lock at once.
        .init(.awaitingEvidence(term: 7), .lockWon, .none, .awaitingEvidence(term: 7)),
        .init(.awaitingEvidence(term: 7), .termBumped(8, began: true), .none, .awaitingEvidence(term: 7)),
        .init(.awaitingEvidence(term: 7), .termBumped(8, began: false), .none, .awaitingEvidence(term: 7)),
        .init(.awaitingEvidence(term: 7), .evidenceFound, .startLeading(term: 7), .leading(term: 7)),
        .init(.awaitingEvidence(term: 7), .leadershipLost(.leaseExpired), .none, .follower),
        .init(.awaitingEvidence(term: 7), .leadershipLost(.connectionLost), .none, .follower),
        .init(.awaitingEvidence(term: 7), .leadershipEnded, .none, .awaitingEvidence(term: 7)),
        .init(.awaitingEvidence(term: 7), .resign, .endLeadingAndRelease(term: nil), .releasing),
        .init(.awaitingEvidence(term: 7), .leaderWorkDrained, .none, .awaitingEvidence(term: 7)),
        .init(.awaitingEvidence(term: 7), .released, .none, .awaitingEvidence(term: 7)),

        // leading(7).
        .init(.leading(term: 7), .lockWon, .none, .leading(term: 7)),
        .init(.leading(term: 7), .termBumped(8, began: true), .none, .leading(term: 7)),
        .init(.leading(term: 7), .termBumped(8, began: false), .none, .leading(term: 7)),
        .init(.leading(term: 7), .evidenceFound, .none, .leading(term: 7)),
        .init(
            .leading(term: 7), .leadershipLost(.leaseExpired), .endLeading(term: 7, .leaseExpired), .ending(term: 7)),
        .init(
            .leading(term: 7), .leadershipLost(.connectionLost), .endLeading(term: 7, .connectionLost),
            .ending(term: 7)),
        .init(.leading(term: 7), .leadershipEnded, .none, .leading(term: 7)),
        .init(.leading(term: 7), .resign, .endLeadingAndRelease(term: 7), .resigning(wasLeading: true)),
        .init(.leading(term: 7), .leaderWorkDrained, .none, .leading(term: 7)),
        .init(.leading(term: 7), .released, .none, .leading(term: 7)),

        // ending(7): a lost leadership being ended; a candidate again only once its demotion is announced. A
        // resignation meanwhile withdraws (whoever resigns ends the scope too).
        .init(.ending(term: 7), .lockWon, .none, .ending(term: 7)),
        .init(.ending(term: 7), .termBumped(8, began: true), .none, .ending(term: 7)),
        .init(.ending(term: 7), .termBumped(8, began: false), .none, .ending(term: 7)),
        .init(.ending(term: 7), .evidenceFound, .none, .ending(term: 7)),
        .init(.ending(term: 7), .leadershipLost(.leaseExpired), .none, .ending(term: 7)),
        .init(.ending(term: 7), .leadershipLost(.connectionLost), .none, .ending(term: 7)),
        .init(.ending(term: 7), .leadershipEnded, .announceDemotion, .follower),
        .init(.ending(term: 7), .resign, .finishResignation, .withdrawn),
        .init(.ending(term: 7), .leaderWorkDrained, .none, .ending(term: 7)),
        .init(.ending(term: 7), .released, .none, .ending(term: 7)),

        // resigning after leading: leadership ended locally, its leader work draining; then the release.
        .init(.resigning(wasLeading: true), .lockWon, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .termBumped(8, began: true), .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .termBumped(8, began: false), .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .evidenceFound, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .leadershipLost(.leaseExpired), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: true), .leadershipLost(.connectionLost), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: true), .leadershipEnded, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .resign, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .leaderWorkDrained, .none, .releasing),
        .init(.resigning(wasLeading: true), .released, .finishResignation, .withdrawn),

        // resigning without having led: the bump was in flight; its answer, whichever, triggers the release. Late
        // evidence begins nothing.
        .init(.resigning(wasLeading: false), .lockWon, .none, .resigning(wasLeading: false)),
        .init(
            .resigning(wasLeading: false), .termBumped(8, began: true), .endLeadingAndRelease(term: nil), .releasing),
        .init(
            .resigning(wasLeading: false), .termBumped(8, began: false), .endLeadingAndRelease(term: nil), .releasing),
        .init(.resigning(wasLeading: false), .evidenceFound, .none, .resigning(wasLeading: false)),
        .init(.resigning(wasLeading: false), .leadershipLost(.leaseExpired), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: false), .leadershipLost(.connectionLost), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: false), .leadershipEnded, .none, .resigning(wasLeading: false)),
        .init(.resigning(wasLeading: false), .resign, .none, .resigning(wasLeading: false)),
        .init(.resigning(wasLeading: false), .leaderWorkDrained, .none, .resigning(wasLeading: false)),
        .init(.resigning(wasLeading: false), .released, .finishResignation, .withdrawn),

        // releasing: the hand-over is due or in flight; its commit (or the session's end) finishes the resignation.
        .init(.releasing, .lockWon, .none, .releasing),
        .init(.releasing, .termBumped(8, began: true), .none, .releasing),
        .init(.releasing, .termBumped(8, began: false), .none, .releasing),
        .init(.releasing, .evidenceFound, .none, .releasing),
        .init(.releasing, .leadershipLost(.leaseExpired), .finishResignation, .withdrawn),
        .init(.releasing, .leadershipLost(.connectionLost), .finishResignation, .withdrawn),
        .init(.releasing, .leadershipEnded, .none, .releasing),
        .init(.releasing, .resign, .none, .releasing),
        .init(.releasing, .leaderWorkDrained, .none, .releasing),
        .init(.releasing, .released, .finishResignation, .withdrawn),

        // withdrawn: final; a late lock is given straight back.
        .init(.withdrawn, .lockWon, .releaseLock, .withdrawn),
        .init(.withdrawn, .termBumped(8, began: true), .none, .withdrawn),
        .init(.withdrawn, .termBumped(8, began: false), .none, .withdrawn),
        .init(.withdrawn, .evidenceFound, .none, .withdrawn),
        .init(.withdrawn, .leadershipLost(.leaseExpired), .none, .withdrawn),
        .init(.withdrawn, .leadershipLost(.connectionLost), .none, .withdrawn),
        .init(.withdrawn, .leadershipEnded, .none, .withdrawn),
        .init(.withdrawn, .resign, .none, .withdrawn),
        .init(.withdrawn, .leaderWorkDrained, .none, .withdrawn),
        .init(.withdrawn, .released, .none, .withdrawn),
    ]

    struct Pair: Hashable {
        let state: State
        let input: Input
    }

    @Test("every state × input pair answers the documented action and state", arguments: table)
    func transition(_ row: Transition) {
        var machine = Machine(state: row.state)
        let action = row.input.apply(to: &machine)
        #expect(action == row.action)
        #expect(machine.state == row.next)
        Self.checkDerivedProperties(machine)
    }

    @Test("the table covers all 90 state × input pairs, each once")
    func tableIsComplete() {
        #expect(Self.states.count == 9)
        #expect(Self.inputs.count == 10)
        let expected = Set(Self.states.flatMap { state in Self.inputs.map { Pair(state: state, input: $0) } })
        #expect(expected.count == 90)
        let rows = Self.table.map { Pair(state: $0.state, input: $0.input) }
        #expect(rows.count == 90)
        #expect(Set(rows).count == rows.count, "duplicate rows in the table")
        #expect(Set(rows) == expected)
    }

    @Test("isCandidate, mayHoldLock and leadingTerm follow the state", arguments: states)
    func derivedProperties(_ state: State) {
        Self.checkDerivedProperties(Machine(state: state))
    }

    @Test("a new machine is a candidate follower")
    func initialState() {
        let machine = Machine()
        #expect(machine.state == .follower)
        #expect(machine.isCandidate)
        #expect(machine.leadingTerm == nil)
    }

    /// Feeds `inputs` to a new machine; returns its actions, and the machine.
    static func run(_ inputs: [Input]) -> (actions: [Action], machine: Machine) {
        var machine = Machine()
        let actions = inputs.map { $0.apply(to: &machine) }
        return (actions, machine)
    }

    @Test("without a hand-over, leadership begins only on evidence, with the term bumped")
    func leadsOnEvidence() {
        let (actions, machine) = Self.run([.lockWon, .termBumped(8, began: false), .evidenceFound, .evidenceFound])
        #expect(actions == [.bumpTerm, .awaitEvidence(term: 8), .startLeading(term: 8), .none])
        #expect(machine.state == .leading(term: 8))

        // Between the bump and the evidence: holding the lock, neither a candidate nor a leader.
        let (_, awaiting) = Self.run([.lockWon, .termBumped(8, began: false)])
        #expect(awaiting.state == .awaitingEvidence(term: 8))
        #expect(!awaiting.isCandidate)
        #expect(awaiting.mayHoldLock)
        #expect(awaiting.leadingTerm == nil)
    }

    @Test("a resignation while awaiting evidence releases the lock at once, and late evidence begins nothing")
    func resignWhileAwaitingEvidence() {
        let (actions, machine) = Self.run([
            .lockWon, .termBumped(8, began: false), .resign, .evidenceFound, .released, .evidenceFound,
        ])
        let expected: [Action] = [
            .bumpTerm, .awaitEvidence(term: 8), .endLeadingAndRelease(term: nil), .none, .finishResignation, .none,
        ]
        #expect(actions == expected)
        #expect(machine.state == .withdrawn)
    }

    @Test("a loss while awaiting evidence makes a candidate again, with no leadership to end")
    func lossWhileAwaitingEvidence() {
        let (actions, machine) = Self.run([
            .lockWon, .termBumped(8, began: false), .leadershipLost(.connectionLost), .evidenceFound,
            .lockWon, .termBumped(9, began: true),
        ])
        #expect(actions == [.bumpTerm, .awaitEvidence(term: 8), .none, .none, .bumpTerm, .startLeading(term: 9)])
        #expect(machine.state == .leading(term: 9))
    }

    static func checkDerivedProperties(
        _ machine: Machine, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(machine.isCandidate == (machine.state == .follower), sourceLocation: sourceLocation)
        switch machine.state {
        case .acquiring, .awaitingEvidence, .leading, .ending, .resigning, .releasing:
            #expect(machine.mayHoldLock, sourceLocation: sourceLocation)
        case .follower, .withdrawn:
            #expect(!machine.mayHoldLock, sourceLocation: sourceLocation)
        }
        if case .leading(let term) = machine.state {
            #expect(machine.leadingTerm == term, sourceLocation: sourceLocation)
        } else {
            #expect(machine.leadingTerm == nil, sourceLocation: sourceLocation)
        }
    }

    // MARK: - Random walks

    /// A random input; `resign` is rare so that walks spend time leading and losing before they withdraw. Half the
    /// bumps find no hand-over, so that walks also await evidence.
    static func randomInput(_ rng: inout SplitMix64, nextTerm: inout Int64) -> Input {
        let roll = rng.next(upperBound: UInt64(100))
        switch roll {
        case 0..<30: return .lockWon
        case 30..<60:
            nextTerm += Int64(rng.next(upperBound: UInt64(3))) + 1
            return .termBumped(nextTerm, began: roll < 45)
        case 60..<68: return .evidenceFound
        case 68..<73: return .leadershipLost(.leaseExpired)
        case 73..<78: return .leadershipLost(.connectionLost)
        case 78..<85: return .leadershipEnded
        case 85..<89: return .resign
        case 89..<94: return .leaderWorkDrained
        default: return .released
        }
    }

    static let walkCount = 2_000
    static let walkLength = 50

    /// Tracks what one walk has emitted so far and names the first step that breaks an invariant.
    struct WalkChecker {
        /// A `.bumpTerm` was answered and neither a loss nor a resignation has been fed since.
        var bumpPending = false
        /// A `.bumpTerm` was answered and no `termBumped` nor loss has been fed since: the bump transaction is still
        /// running (a resignation does not stop it; a loss drops its session).
        var bumpInFlight = false
        /// The term of the `.awaitEvidence` answered and neither begun nor cancelled (by a loss or a resignation).
        var awaitedTerm: Int64?
        /// The term of the leadership started and not yet ended.
        var ledTerm: Int64?
        /// An `.endLeadingAndRelease` was answered: the lock's release is under way.
        var releaseRequested = false
        var finishCount = 0
        var startCount = 0
        /// The leaderships begun on evidence (after an `.awaitEvidence`).
        var evidenceStartCount = 0
        /// The term of the leadership ended by a loss whose demotion is not announced yet.
        var endingTerm: Int64?

        /// Checks one step; returns the invariants it breaks (empty when it keeps them all).
        mutating func check(before: Machine, input: Input, action: Action, after: Machine) -> [String] {
            var broken: [String] = []
            func require(_ condition: Bool, _ invariant: String) {
                if !condition { broken.append(invariant) }
            }

            // Locks never stack: only a follower is told to bump a freshly won lock.
            if case .lockWon = input, before.state != .follower {
                require(action != .bumpTerm, "lockWon outside follower answered bumpTerm (locks stack)")
            }
            if action == .bumpTerm {
                require(before.state == .follower, "bumpTerm outside follower")
                require(input == .lockWon, "bumpTerm for an input other than lockWon")
            }

            // A bump that found no hand-over awaits evidence, with the term it bumped, and begins nothing yet.
            if case .awaitEvidence(let term) = action {
                require(bumpPending, "awaitEvidence without a bumpTerm since the last loss/resign")
                require(before.state == .acquiring, "awaitEvidence outside acquiring")
                require(input == .termBumped(term, began: false), "awaitEvidence but not for a bump without hand-over")
                require(ledTerm == nil && awaitedTerm == nil, "awaitEvidence while leading or already awaiting")
                bumpPending = false
                awaitedTerm = term
            }

            // Leadership starts only from a pending bump that began it, with the bumped term, or on evidence, with
            // the term of the awaitEvidence before it — and never on top of a leadership.
            if case .startLeading(let term) = action {
                require(ledTerm == nil, "startLeading while already leading")
                switch (before.state, input) {
                case (.acquiring, .termBumped(let bumped, began: true)):
                    require(bumpPending, "startLeading without a bumpTerm since the last loss/resign")
                    require(bumped == term, "startLeading with a term other than the one bumped")
                case (.awaitingEvidence, .evidenceFound):
                    let awaited = awaitedTerm.map { "term \($0)" } ?? "none"
                    require(awaitedTerm == term, "startLeading(term: \(term)) on evidence, awaited: \(awaited)")
                    evidenceStartCount += 1
                default:
                    require(false, "startLeading but not from acquiring + began or awaitingEvidence + evidenceFound")
                }
                bumpPending = false
                awaitedTerm = nil
                ledTerm = term
                startCount += 1
            }

            // A loss or a resignation cancels the awaited evidence: that leadership never begins.
            switch input {
            case .leadershipLost, .resign: awaitedTerm = nil
            default: break
            }

            // Leadership ends exactly once, with the term it started with; the lock is released once.
            let running = ledTerm.map { "term \($0)" } ?? "none"
            switch action {
            case .endLeading(let term, let loss):
                require(ledTerm == term, "endLeading(term: \(term)) but the leadership running is \(running)")
                require(input == .leadershipLost(loss), "endLeading with a loss other than the one reported")
                ledTerm = nil
                endingTerm = term
            case .announceDemotion:
                // A demotion is announced once, for a leadership a loss ended, and only once that end is reported.
                require(endingTerm != nil, "announceDemotion without a leadership ended by a loss")
                require(input == .leadershipEnded, "announceDemotion for an input other than leadershipEnded")
                endingTerm = nil
            case .endLeadingAndRelease(let term?):
                require(ledTerm == term, "endLeadingAndRelease(term: \(term)) but the leadership running is \(running)")
                require(input == .resign, "endLeadingAndRelease(term:) for an input other than resign")
                ledTerm = nil
            case .endLeadingAndRelease(nil):
                require(ledTerm == nil, "a release that does not end the running leadership")
            default:
                break
            }
            if case .endLeadingAndRelease = action {
                // A walk may answer a bump that is not in flight: only such a stray answer may ask for a 2nd release.
                var stray = false
                if case .termBumped = input, !bumpInFlight { stray = true }
                require(!releaseRequested || stray, "the lock's release requested twice")
                releaseRequested = true
            }

            // The machine leads exactly while a leadership is running, with its term; it awaits evidence exactly while
            // an awaitEvidence is outstanding, with its term.
            require(after.leadingTerm == ledTerm, "leadingTerm disagrees with the leadership started and not ended")
            var awaiting: Int64?
            if case .awaitingEvidence(let term) = after.state { awaiting = term }
            require(awaiting == awaitedTerm, "awaitingEvidence disagrees with the awaitEvidence answered and not ended")

            if action == .finishResignation {
                finishCount += 1
                require(finishCount == 1, "finishResignation emitted twice")
                require(after.state == .withdrawn, "finishResignation without withdrawing")
            }
            if action == .releaseLock {
                require(before.state == .withdrawn, "releaseLock outside withdrawn")
            }

            // A lost leadership stays out of the running until its demotion is announced (or it is resigned).
            var ending: Int64?
            if case .ending(let term) = after.state { ending = term }
            if after.state == .withdrawn { endingTerm = nil }
            require(ending == endingTerm, "ending disagrees with the leadership lost and not yet announced")

            // Withdrawn is final.
            if before.state == .withdrawn {
                require(after.state == .withdrawn, "left withdrawn")
            }

            // A resignation that may hold the lock gets it released: at once, or by the running bump's answer.
            if case .resigning = after.state {
                require(releaseRequested || bumpInFlight, "resigning with neither a release nor a bump under way")
            }
            if after.state == .releasing {
                require(releaseRequested, "releasing without a release requested")
                require(after.isReleasing, "releasing is not isReleasing")
            }

            require(after.isCandidate == (after.state == .follower), "isCandidate is not exactly follower")
            require(
                after.mayHoldLock == (after.state != .follower && after.state != .withdrawn),
                "mayHoldLock is not exactly outside follower and withdrawn"
            )
            if case .leading(let term) = after.state {
                require(after.leadingTerm == term, "leadingTerm is not the term of leading")
            } else {
                require(after.leadingTerm == nil, "leadingTerm outside leading")
            }
            if case .awaitingEvidence = after.state {
                require(!after.isCandidate, "awaitingEvidence is a candidate")
                require(after.mayHoldLock, "awaitingEvidence may not hold the lock")
            }

            // A loss or a resignation cancels a pending bump; a new bumpTerm starts a bump.
            switch input {
            case .leadershipLost, .resign: bumpPending = false
            default: break
            }
            switch input {
            case .termBumped, .leadershipLost: bumpInFlight = false
            default: break
            }
            if action == .bumpTerm {
                bumpPending = true
                bumpInFlight = true
            }
            return broken
        }
    }

    /// What the walks found: the pairs of state shape and input reached, how leaders began, the walks that broke an
    /// invariant, and the first three of those with their traces.
    struct WalkResults: Sendable {
        var covered: Set<String> = []
        var totalStarts = 0
        var evidenceStarts = 0
        var walksWithdrawn = 0
        var failedWalks = 0
        var reports: [String] = []
    }

    /// Runs every walk, off the cooperative pool (see `onDedicatedThread`).
    static func walkAll() -> WalkResults {
        var results = WalkResults()
        for walk in 0..<walkCount {
            let seed = 0x5EED_0000 &+ UInt64(walk)
            var rng = SplitMix64(seed: seed)
            var machine = Machine()
            var checker = WalkChecker()
            var nextTerm: Int64 = 0
            var trace: [String] = []
            for step in 0..<walkLength {
                let input = randomInput(&rng, nextTerm: &nextTerm)
                let before = machine
                let action = input.apply(to: &machine)
                trace.append("\(before.state) + \(input) → \(describe(action)), \(machine.state)")
                results.covered.insert("\(shape(before.state)) + \(shape(input))")
                let broken = checker.check(before: before, input: input, action: action, after: machine)
                if !broken.isEmpty {
                    // Stop this walk at its first violation; report the first few walks in full.
                    results.failedWalks += 1
                    if results.failedWalks <= 3 {
                        results.reports.append(
                            """
                            seed \(seed), step \(step): \(broken.joined(separator: "; "))
                            \(trace.joined(separator: "\n"))
                            """
                        )
                    }
                    break
                }
            }
            results.totalStarts += checker.startCount
            results.evidenceStarts += checker.evidenceStartCount
            if machine.state == .withdrawn { results.walksWithdrawn += 1 }
        }
        return results
    }

    @Test("random walks from follower keep every invariant")
    func randomWalks() async throws {
        let results = try await onDedicatedThread { Self.walkAll() }
        let (covered, totalStarts, evidenceStarts) = (results.covered, results.totalStarts, results.evidenceStarts)
        let (walksWithdrawn, failedWalks) = (results.walksWithdrawn, results.failedWalks)
        for report in results.reports { Issue.record("\(report)") }
        #expect(failedWalks == 0, "\(failedWalks) of \(Self.walkCount) walks broke an invariant")
        // The walks really explore the machine: every state shape meets every input, leaders come and go, by either
        // way in.
        #expect(covered.count == 90, "pairs reached: \(covered.sorted())")
        #expect(totalStarts > Self.walkCount / 2)
        #expect(evidenceStarts > 0 && evidenceStarts < totalStarts)
        #expect(walksWithdrawn > 0 && walksWithdrawn < Self.walkCount)
    }

    @Test("a walk is reproducible from its seed")
    func walksAreDeterministic() async throws {
        @Sendable func run(_ seed: UInt64) -> [Action] {
            var rng = SplitMix64(seed: seed)
            var machine = Machine()
            var nextTerm: Int64 = 0
            return (0..<Self.walkLength).map { _ in
                Self.randomInput(&rng, nextTerm: &nextTerm).apply(to: &machine)
            }
        }
        let runs = try await onDedicatedThread { [run(42), run(42), run(43)] }
        #expect(runs[0] == runs[1])
        #expect(runs[0] != runs[2])
    }

    /// The state with its term forgotten, to count pairs reached in walks against the table's 9 × 10.
    static func shape(_ state: State) -> String {
        switch state {
        case .follower: "follower"
        case .acquiring: "acquiring"
        case .awaitingEvidence: "awaitingEvidence"
        case .leading: "leading"
        case .ending: "ending"
        case .resigning(let wasLeading): "resigning(\(wasLeading))"
        case .releasing: "releasing"
        case .withdrawn: "withdrawn"
        }
    }

    static func shape(_ input: Input) -> String {
        switch input {
        case .termBumped(_, let began): "termBumped(began: \(began))"
        default: input.description
        }
    }
}
