import StokerTestSupport
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
        case termBumped(Int64)
        case leadershipLost(ElectionStateMachine.Loss)
        case resign
        case released

        func apply(to machine: inout ElectionStateMachine) -> ElectionStateMachine.Action {
            switch self {
            case .lockWon: machine.lockWon()
            case .termBumped(let term): machine.termBumped(term)
            case .leadershipLost(let loss): machine.leadershipLost(loss)
            case .resign: machine.resign()
            case .released: machine.released()
            }
        }

        var description: String {
            switch self {
            case .lockWon: "lockWon()"
            case .termBumped(let term): "termBumped(\(term))"
            case .leadershipLost(let loss): "leadershipLost(.\(loss))"
            case .resign: "resign()"
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
        case .endLeading(let term, let loss): ".endLeading(term: \(term), .\(loss))"
        case .endLeadingAndRelease(let term?): ".endLeadingAndRelease(term: \(term))"
        case .endLeadingAndRelease(nil): ".endLeadingAndRelease(term: nil)"
        case .finishResignation: ".finishResignation"
        case .releaseLock: ".releaseLock"
        }
    }

    static let states: [State] = [
        .follower,
        .acquiring,
        .leading(term: 7),
        .resigning(wasLeading: true),
        .resigning(wasLeading: false),
        .withdrawn,
    ]

    static let inputs: [Input] = [
        .lockWon,
        .termBumped(8),
        .leadershipLost(.leaseExpired),
        .leadershipLost(.sessionLost),
        .resign,
        .released,
    ]

    /// Every state × input, written down from the doc comments of `ElectionStateMachine`.
    static let table: [Transition] = [
        // follower: the only candidate.
        .init(.follower, .lockWon, .bumpTerm, .acquiring),
        .init(.follower, .termBumped(8), .none, .follower),
        .init(.follower, .leadershipLost(.leaseExpired), .none, .follower),
        .init(.follower, .leadershipLost(.sessionLost), .none, .follower),
        .init(.follower, .resign, .finishResignation, .withdrawn),
        .init(.follower, .released, .none, .follower),

        // acquiring: the lock is held, the bump in flight, not a leader yet.
        .init(.acquiring, .lockWon, .none, .acquiring),
        .init(.acquiring, .termBumped(8), .startLeading(term: 8), .leading(term: 8)),
        .init(.acquiring, .leadershipLost(.leaseExpired), .none, .follower),
        .init(.acquiring, .leadershipLost(.sessionLost), .none, .follower),
        .init(.acquiring, .resign, .none, .resigning(wasLeading: false)),
        .init(.acquiring, .released, .none, .acquiring),

        // leading(7).
        .init(.leading(term: 7), .lockWon, .none, .leading(term: 7)),
        .init(.leading(term: 7), .termBumped(8), .none, .leading(term: 7)),
        .init(.leading(term: 7), .leadershipLost(.leaseExpired), .endLeading(term: 7, .leaseExpired), .follower),
        .init(.leading(term: 7), .leadershipLost(.sessionLost), .endLeading(term: 7, .sessionLost), .follower),
        .init(.leading(term: 7), .resign, .endLeadingAndRelease(term: 7), .resigning(wasLeading: true)),
        .init(.leading(term: 7), .released, .none, .leading(term: 7)),

        // resigning after leading: leadership ended locally, the release is in flight.
        .init(.resigning(wasLeading: true), .lockWon, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .termBumped(8), .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .leadershipLost(.leaseExpired), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: true), .leadershipLost(.sessionLost), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: true), .resign, .none, .resigning(wasLeading: true)),
        .init(.resigning(wasLeading: true), .released, .finishResignation, .withdrawn),

        // resigning while the bump was in flight: never lead; the bump's answer triggers the release.
        .init(.resigning(wasLeading: false), .lockWon, .none, .resigning(wasLeading: false)),
        .init(
            .resigning(wasLeading: false), .termBumped(8), .endLeadingAndRelease(term: nil),
            .resigning(wasLeading: false)
        ),
        .init(.resigning(wasLeading: false), .leadershipLost(.leaseExpired), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: false), .leadershipLost(.sessionLost), .finishResignation, .withdrawn),
        .init(.resigning(wasLeading: false), .resign, .none, .resigning(wasLeading: false)),
        .init(.resigning(wasLeading: false), .released, .finishResignation, .withdrawn),

        // withdrawn: final; a late lock is given straight back.
        .init(.withdrawn, .lockWon, .releaseLock, .withdrawn),
        .init(.withdrawn, .termBumped(8), .none, .withdrawn),
        .init(.withdrawn, .leadershipLost(.leaseExpired), .none, .withdrawn),
        .init(.withdrawn, .leadershipLost(.sessionLost), .none, .withdrawn),
        .init(.withdrawn, .resign, .none, .withdrawn),
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

    @Test("the table covers all 36 state × input pairs, each once")
    func tableIsComplete() {
        let expected = Set(Self.states.flatMap { state in Self.inputs.map { Pair(state: state, input: $0) } })
        #expect(expected.count == 36)
        let rows = Self.table.map { Pair(state: $0.state, input: $0.input) }
        #expect(rows.count == 36)
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

    static func checkDerivedProperties(
        _ machine: Machine, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(machine.isCandidate == (machine.state == .follower), sourceLocation: sourceLocation)
        switch machine.state {
        case .acquiring, .leading, .resigning:
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

    /// A random input; `resign` is rare so that walks spend time leading and losing before they withdraw.
    static func randomInput(_ rng: inout SplitMix64, nextTerm: inout Int64) -> Input {
        let roll = rng.next(upperBound: UInt64(100))
        switch roll {
        case 0..<30: return .lockWon
        case 30..<60:
            nextTerm += Int64(rng.next(upperBound: UInt64(3))) + 1
            return .termBumped(nextTerm)
        case 60..<70: return .leadershipLost(.leaseExpired)
        case 70..<80: return .leadershipLost(.sessionLost)
        case 80..<85: return .resign
        default: return .released
        }
    }

    static let walkCount = 2_000
    static let walkLength = 50

    /// Tracks what one walk has emitted so far and names the first step that breaks an invariant.
    struct WalkChecker {
        /// A `.bumpTerm` was answered and neither a loss nor a resignation has been fed since.
        var bumpPending = false
        /// The term of the leadership started and not yet ended.
        var ledTerm: Int64?
        var finishCount = 0
        var startCount = 0

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

            // Leadership starts only from a pending bump, with the bumped term, and never on top of a leadership.
            if case .startLeading(let term) = action {
                require(bumpPending, "startLeading without a bumpTerm since the last loss/resign")
                require(ledTerm == nil, "startLeading while already leading")
                require(input == .termBumped(term), "startLeading with a term other than the one bumped")
                bumpPending = false
                ledTerm = term
                startCount += 1
            }

            // Leadership ends exactly once, with the term it started with.
            let running = ledTerm.map { "term \($0)" } ?? "none"
            switch action {
            case .endLeading(let term, let loss):
                require(ledTerm == term, "endLeading(term: \(term)) but the leadership running is \(running)")
                require(input == .leadershipLost(loss), "endLeading with a loss other than the one reported")
                ledTerm = nil
            case .endLeadingAndRelease(let term?):
                require(ledTerm == term, "endLeadingAndRelease(term: \(term)) but the leadership running is \(running)")
                require(input == .resign, "endLeadingAndRelease(term:) for an input other than resign")
                ledTerm = nil
            case .endLeadingAndRelease(nil):
                require(ledTerm == nil, "a release that does not end the running leadership")
            default:
                break
            }

            // The machine leads exactly while a leadership is running, with its term.
            require(after.leadingTerm == ledTerm, "leadingTerm disagrees with the leadership started and not ended")

            if action == .finishResignation {
                finishCount += 1
                require(finishCount == 1, "finishResignation emitted twice")
                require(after.state == .withdrawn, "finishResignation without withdrawing")
            }
            if action == .releaseLock {
                require(before.state == .withdrawn, "releaseLock outside withdrawn")
            }

            // Withdrawn is final.
            if before.state == .withdrawn {
                require(after.state == .withdrawn, "left withdrawn")
            }

            require(after.isCandidate == (after.state == .follower), "isCandidate is not exactly follower")
            if case .leading(let term) = after.state {
                require(after.leadingTerm == term, "leadingTerm is not the term of leading")
            } else {
                require(after.leadingTerm == nil, "leadingTerm outside leading")
            }

            // A loss or a resignation cancels a pending bump; a new bumpTerm starts one.
            switch input {
            case .leadershipLost, .resign: bumpPending = false
            default: break
            }
            if action == .bumpTerm { bumpPending = true }
            return broken
        }
    }

    @Test("random walks from follower keep every invariant")
    func randomWalks() {
        var covered: Set<String> = []
        var totalStarts = 0
        var walksWithdrawn = 0
        var failedWalks = 0
        for walk in 0..<Self.walkCount {
            let seed = 0x5EED_0000 &+ UInt64(walk)
            var rng = SplitMix64(seed: seed)
            var machine = Machine()
            var checker = WalkChecker()
            var nextTerm: Int64 = 0
            var trace: [String] = []
            for step in 0..<Self.walkLength {
                let input = Self.randomInput(&rng, nextTerm: &nextTerm)
                let before = machine
                let action = input.apply(to: &machine)
                trace.append("\(before.state) + \(input) → \(Self.describe(action)), \(machine.state)")
                covered.insert("\(Self.shape(before.state)) + \(Self.shape(input))")
                let broken = checker.check(before: before, input: input, action: action, after: machine)
                if !broken.isEmpty {
                    // Stop this walk at its first violation; report the first few walks in full.
                    failedWalks += 1
                    if failedWalks <= 3 {
                        Issue.record(
                            """
                            seed \(seed), step \(step): \(broken.joined(separator: "; "))
                            \(trace.joined(separator: "\n"))
                            """
                        )
                    }
                    break
                }
            }
            totalStarts += checker.startCount
            if machine.state == .withdrawn { walksWithdrawn += 1 }
        }
        #expect(failedWalks == 0, "\(failedWalks) of \(Self.walkCount) walks broke an invariant")
        // The walks really explore the machine: every state shape meets every input, leaders come and go.
        #expect(covered.count == 36, "pairs reached: \(covered.sorted())")
        #expect(totalStarts > Self.walkCount)
        #expect(walksWithdrawn > 0 && walksWithdrawn < Self.walkCount)
    }

    @Test("a walk is reproducible from its seed")
    func walksAreDeterministic() {
        func run(_ seed: UInt64) -> [Action] {
            var rng = SplitMix64(seed: seed)
            var machine = Machine()
            var nextTerm: Int64 = 0
            return (0..<Self.walkLength).map { _ in
                Self.randomInput(&rng, nextTerm: &nextTerm).apply(to: &machine)
            }
        }
        #expect(run(42) == run(42))
        #expect(run(42) != run(43))
    }

    /// The state with its term forgotten, to count pairs reached in walks against the table's 6 × 6.
    static func shape(_ state: State) -> String {
        switch state {
        case .follower: "follower"
        case .acquiring: "acquiring"
        case .leading: "leading"
        case .resigning(let wasLeading): "resigning(\(wasLeading))"
        case .withdrawn: "withdrawn"
        }
    }

    static func shape(_ input: Input) -> String {
        switch input {
        case .termBumped: "termBumped"
        default: input.description
        }
    }
}
