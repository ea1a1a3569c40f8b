/// The life of one election on one node, as a pure value: `(state, input) → (state, action)`, no I/O, no clock.
///
/// The node's state machine (``NodeStateMachine``) feeds it what happened (a lock won, a term bumped, the session or
/// the lease lost, a resignation asked for) and acts on the one thing it answers. Everything that can make this node a
/// leader or stop it being one goes through here, so the rules of leadership live in one place:
///
/// - leadership starts only when the term bump succeeded (`acquiring → leading`), never on a bare lock grant — and,
///   when the predecessor did not hand over, only on evidence that it stopped acting (`acquiring → awaitingEvidence
///   → leading`): the lock grant alone is no such evidence when the server, not the process, ended its session;
/// - it ends the moment a loss is reported (``leadershipLost(_:)``): the action says to end it locally — flip what
///   `isLeader` reads, cancel leader-scoped work — before anything else, and the session is dropped after; until its
///   demotion is announced (``leadershipEnded()``) the election is `ending`, not a candidate, so no new leadership
///   of it can be announced before the end of the last;
/// - a graceful resignation ends it locally first, lets its leader work drain, and releases the lock after
///   (`leading → resigning → releasing → withdrawn`);
/// - a lock is never taken twice (advisory locks stack): only a `follower` is a candidate.
struct ElectionStateMachine: Sendable, Hashable {
    enum State: Sendable, Hashable {
        /// A candidate without the lock: the node tries to take it at every retry.
        case follower
        /// The lock was won; the term bump is in flight. Not a leader yet: no callback has been queued.
        case acquiring
        /// The lock is held and the term bumped (the fence already refuses the predecessor), but the predecessor did
        /// not hand over: leadership begins only on evidence that it stopped acting (its witness session gone, its
        /// acknowledgement, or its lease surely run out). Not a leader yet.
        case awaitingEvidence(term: Int64)
        /// Leading with this term since the bump committed.
        case leading(term: Int64)
        /// The leadership of this term was lost (the session or the lease): it is being ended, then its demotion
        /// announced. Not a candidate; the lock may still be held until the session is cut.
        case ending(term: Int64)
        /// Resigning, the lock still held: leadership already ended locally and its leader work draining
        /// (`wasLeading`), or the term bump still in flight (not `wasLeading`).
        case resigning(wasLeading: Bool)
        /// Resigning, and nothing holds the lock back any more: the session hands the election over now.
        case releasing
        /// No longer a candidate; final.
        case withdrawn
    }

    enum Action: Sendable, Hashable {
        /// Nothing to do.
        case none
        /// Run the term bump for the lock just won; report ``termBumped(_:began:)`` or ``leadershipLost(_:)``.
        case bumpTerm
        /// Leadership begins: mark it, then queue `nowLeader(term)`.
        case startLeading(term: Int64)
        /// The term is bumped but the predecessor did not hand over: wait for evidence that it stopped acting, then
        /// report ``evidenceFound()``.
        case awaitEvidence(term: Int64)
        /// Leadership is over: flip `isLeader`, cancel leader-scoped work, queue the demotion — at once, before the
        /// session is dropped.
        case endLeading(term: Int64, DemotionReason)
        /// Resignation: end leadership locally as for `endLeading` (when `term` is not nil) and report
        /// ``leaderWorkDrained()`` once its work has finished; then (or at once, when `term` is nil) clear the leader
        /// and release the lock in one transaction, and report ``released()``.
        case endLeadingAndRelease(term: Int64?)
        /// The end of a lost leadership is done: queue its demotion.
        case announceDemotion
        /// Resignation finished (the lock is released or was never held): tell the activator it is stopped.
        case finishResignation
        /// A lock won after the election was withdrawn: release it (clear the leader if it is this node, unlock),
        /// nothing else; report ``released()``.
        case releaseLock
    }

    private(set) var state: State

    init(state: State = .follower) { self.state = state }

    /// Is this node a candidate that should try to take the lock now?
    var isCandidate: Bool { state == .follower }

    /// Whether the session may hold this election's lock: winning it (the bump in flight), awaiting evidence, leading,
    /// ending a lost leadership (until the session is cut), or resigning.
    var mayHoldLock: Bool { !(state == .follower || state == .withdrawn) }

    /// The session should hand the election over now.
    var isReleasing: Bool { state == .releasing }

    /// The term this node leads with, if it leads.
    var leadingTerm: Int64? {
        if case .leading(let term) = state { return term }
        return nil
    }

    /// The batched try-lock returned this election: the lock is now held by the session.
    mutating func lockWon() -> Action {
        switch state {
        case .follower:
            state = .acquiring
            return .bumpTerm
        case .withdrawn:
            // Withdrawn while the try-lock was in flight: give the lock straight back.
            return .releaseLock
        case .acquiring, .awaitingEvidence, .leading, .ending, .resigning, .releasing:
            // The node never offers a lock it holds; a second grant would stack. Keep the state, do nothing.
            return .none
        }
    }

    /// The term bump committed; `began` when its transaction already found the evidence (a hand-over, or the
    /// predecessor's witness gone) and began the leadership.
    mutating func termBumped(_ term: Int64, began: Bool) -> Action {
        switch state {
        case .acquiring where began:
            state = .leading(term: term)
            return .startLeading(term: term)
        case .acquiring:
            state = .awaitingEvidence(term: term)
            return .awaitEvidence(term: term)
        case .resigning(wasLeading: false):
            // Resignation asked while the bump was in flight: never lead, release the lock.
            state = .releasing
            return .endLeadingAndRelease(term: nil)
        case .follower, .awaitingEvidence, .leading, .ending, .resigning(wasLeading: true), .releasing, .withdrawn:
            // A loss was reported meanwhile (the session is being dropped), or a stray answer: ignore it.
            return .none
        }
    }

    /// The evidence arrived and the leadership's begin committed.
    mutating func evidenceFound() -> Action {
        switch state {
        case .awaitingEvidence(let term):
            state = .leading(term: term)
            return .startLeading(term: term)
        case .follower, .acquiring, .leading, .ending, .resigning, .releasing, .withdrawn:
            // A loss or a resignation came first: this leadership never begins.
            return .none
        }
    }

    /// The lease ran out or the session ended. Every lock of the session is gone or about to be.
    mutating func leadershipLost(_ reason: DemotionReason) -> Action {
        switch state {
        case .leading(let term):
            state = .ending(term: term)
            return .endLeading(term: term, reason)
        case .acquiring, .awaitingEvidence:
            state = .follower
            return .none
        case .resigning, .releasing:
            // Leadership already ended locally; the lock is gone with the session, which is all the release wanted.
            state = .withdrawn
            return .finishResignation
        case .follower, .ending, .withdrawn:
            return .none
        }
    }

    /// The lost leadership has ended (its scope ended, its work cancelled): announce it, and be a candidate again.
    mutating func leadershipEnded() -> Action {
        guard case .ending = state else { return .none }
        state = .follower
        return .announceDemotion
    }

    /// The activator is stopping (or the node is leaving): hand the election over.
    mutating func resign() -> Action {
        switch state {
        case .follower, .ending:
            // (Ending: the loss's end is under way; whoever resigns ends the scope too.)
            state = .withdrawn
            return .finishResignation
        case .acquiring:
            // The bump is in flight; ``termBumped(_:began:)`` or ``leadershipLost(_:)`` finishes the resignation.
            state = .resigning(wasLeading: false)
            return .none
        case .awaitingEvidence:
            // Never led: release the lock (the predecessor stays recorded, for the next successor's evidence).
            state = .releasing
            return .endLeadingAndRelease(term: nil)
        case .leading(let term):
            state = .resigning(wasLeading: true)
            return .endLeadingAndRelease(term: term)
        case .resigning, .releasing, .withdrawn:
            return .none
        }
    }

    /// The resigned leadership's work has finished: the lock may be released.
    mutating func leaderWorkDrained() -> Action {
        guard state == .resigning(wasLeading: true) else { return .none }
        state = .releasing
        return .none
    }

    /// The release transaction committed (leader cleared, lock unlocked).
    mutating func released() -> Action {
        switch state {
        case .resigning, .releasing:
            state = .withdrawn
            return .finishResignation
        case .follower, .acquiring, .awaitingEvidence, .leading, .ending, .withdrawn:
            // A stray lock given back (withdrawn), or nothing to finish.
            return .none
        }
    }
}
