/// Triggers: a leader reads its election's triggers (kept in a table until handled) when its leadership begins and
/// whenever a `trigger` notification wakes it, hands each to its activator once per leadership, in order, and deletes
/// those the activator has handled.
extension NodeStateMachine {
    /// One election's triggers, as this node knows them.
    struct TriggerQueue: Sendable, Hashable {
        /// The highest number handed to the activator in the current leadership.
        var handedOut: Int64 = 0
        /// Read the table (again): a leadership began, a notification came, or the last read was a full page.
        var read = false
        /// The highest number the activator has handled (in any leadership of this node).
        var handled: Int64 = 0

        /// A leadership began: read the table from the first trigger this node has not handled (one handled in an
        /// earlier leadership whose deletion was lost with its session is not handed out again).
        mutating func begin() {
            handedOut = handled
            read = true
        }
    }

    /// A trigger as read from the table.
    struct PendingTrigger: Sendable, Hashable {
        let sequence: Int64
        let payload: String
    }

    /// How many triggers one read fetches at most (a full page reads the next one at once).
    static let triggerPage = 100

    /// The step that reads or deletes triggers, if one is due: reads first (they wake the leader), then deletions.
    func triggerStep() -> Step? {
        for name in elections.keys.sorted() {
            guard let election = elections[name], let id = election.id, election.triggers.read,
                election.machine.leadingTerm != nil, election.scope != nil
            else { continue }
            return .readTriggers(election: id, after: election.triggers.handedOut)
        }
        return deletionStep
    }

    /// The deletion of handled triggers, if one is due (also after the election was withdrawn, and before the node
    /// leaves: a trigger handled is deleted while the session lasts).
    var deletionStep: Step? {
        triggerDeletions.min { $0.key < $1.key }.map { .deleteTriggers(election: $0.key, through: $0.value) }
    }

    /// The triggers of election `id` after the number asked for, in order (`complete`: fewer than a page). Handed to the
    /// activator while the leadership the read was for goes on; a leadership that ended meanwhile hands out nothing —
    /// its triggers stay in the table for the next leader.
    mutating func triggersRead(election id: Int, _ triggers: [PendingTrigger], complete: Bool) {
        guard let name = electionName(withID: id), var election = elections[name] else { return }
        defer { elections[name] = election }
        guard election.triggers.read, election.machine.leadingTerm != nil, let scope = election.scope else { return }
        for trigger in triggers where trigger.sequence > election.triggers.handedOut {
            outbox.append(
                .message(election.mailbox, .trigger(scope, payload: trigger.payload, sequence: trigger.sequence)))
            election.triggers.handedOut = trigger.sequence
        }
        election.triggers.read = !complete
    }

    /// Election `id`'s triggers up to `through` were deleted.
    mutating func triggersDeleted(election id: Int, through: Int64) {
        if let due = triggerDeletions[id], due <= through { triggerDeletions[id] = nil }
    }

    /// The activator of `name` has handled trigger `sequence` (its callback returned while the leadership went on): it
    /// may be deleted. True when the session thread has a deletion to run (wake it).
    mutating func triggerHandled(_ name: String, sequence: Int64) -> Bool {
        guard var election = elections[name], let id = election.id else { return false }
        election.triggers.handled = max(election.triggers.handled, sequence)
        elections[name] = election
        triggerDeletions[id] = max(triggerDeletions[id] ?? 0, sequence)
        return true
    }

    /// A `trigger` notification for election `id`: its leader reads the table.
    mutating func triggerSent(election id: Int) {
        for name in elections.keys.sorted() where elections[name]?.id == id {
            guard elections[name]?.machine.leadingTerm != nil else { continue }
            elections[name]?.triggers.read = true
        }
    }
}
