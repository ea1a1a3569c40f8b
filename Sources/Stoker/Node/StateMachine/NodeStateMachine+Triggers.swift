/// Triggers: a leader reads its election's triggers (kept in a table until handled) when its leadership begins and
/// whenever a `trigger` notification wakes it, hands each to its activator once per leadership, in order — at most a
/// page of them unfinished at a time — and deletes exactly those whose callback returned.
extension NodeStateMachine {
    /// One election's triggers in the current leadership, as this node knows them.
    struct TriggerQueue: Sendable, Hashable {
        /// The highest number handed to the activator in the current leadership.
        var handedOut: Int64 = 0
        /// Read the table (again): a leadership began, a notification came, or there may be more than was read.
        var read = false
        /// The last read was a full page: more may wait in the table.
        var more = false
        /// Handed to the activator and not yet reported done: reads wait while a page of them is unfinished (the
        /// activator's mailbox holds at most that many payloads, however many wait in the table).
        var unfinished = 0

        /// A leadership began: read the table from its first trigger.
        mutating func begin() {
            self = TriggerQueue(read: true)
        }
    }

    /// A trigger as read from the table.
    struct PendingTrigger: Sendable, Hashable {
        let sequence: Int64
        let payload: String
    }

    /// How many triggers one read fetches at most, and how many may be unfinished at once.
    static let triggerPage = 100

    /// The step that reads or deletes triggers, if one is due: reads first (they wake the leader), then deletions.
    /// A read clears the wish to read: a notification that comes with its answer asks again.
    mutating func triggerStep(_ session: inout Session) -> Step? {
        for name in elections.keys.sorted() {
            guard var election = elections[name], let id = election.id, election.triggers.read,
                election.triggers.unfinished < Self.triggerPage, election.machine.leadingTerm != nil,
                election.scope != nil
            else { continue }
            election.triggers.read = false
            elections[name] = election
            return .readTriggers(election: id, after: election.triggers.handedOut)
        }
        return Self.deletionStep(session)
    }

    /// The deletion of handled triggers, if one is due (also after the election was withdrawn, and before the node
    /// leaves: a trigger handled is deleted while the session lasts).
    static func deletionStep(_ session: Session) -> Step? {
        session.triggersHandled.min { $0.key < $1.key }.map {
            .deleteTriggers(election: $0.key, sequences: $0.value.sorted())
        }
    }

    /// The triggers of election `id` after the number asked for, in order (`complete`: less than a page). Handed to the
    /// activator while the leadership the read was for goes on; a leadership that ended meanwhile hands out nothing —
    /// its triggers stay in the table for the next leader.
    mutating func triggersRead(election id: Int, _ triggers: [PendingTrigger], complete: Bool) {
        guard let name = electionName(withID: id), var election = elections[name],
            election.machine.leadingTerm != nil, let scope = election.scope
        else { return }
        for trigger in triggers where trigger.sequence > election.triggers.handedOut {
            outbox.append(
                .message(election.mailbox, .trigger(scope, payload: trigger.payload, sequence: trigger.sequence)))
            election.triggers.handedOut = trigger.sequence
            election.triggers.unfinished += 1
        }
        election.triggers.more = !complete
        if !complete { election.triggers.read = true }
        elections[name] = election
    }

    /// Election `id`'s triggers `sequences` were deleted.
    mutating func triggersDeleted(election id: Int, sequences: [Int64], _ session: inout Session) {
        guard var handled = session.triggersHandled[id] else { return }
        handled.subtract(sequences)
        session.triggersHandled[id] = handled.isEmpty ? nil : handled
    }

    /// The activator of `name` is done with trigger `sequence`: `handled` when its callback returned, without
    /// throwing, while the leadership went on (the trigger is deleted); otherwise it stays in the table for the next
    /// leadership. True when the session thread has something to do (wake it).
    mutating func triggerDone(_ name: String, sequence: Int64, handled: Bool) -> Bool {
        guard var election = elections[name], let id = election.id else { return false }
        election.triggers.unfinished = max(0, election.triggers.unfinished - 1)
        if election.triggers.more { election.triggers.read = true }
        elections[name] = election
        guard handled, var session, session.joined else { return election.triggers.read }
        session.triggersHandled[id, default: []].insert(sequence)
        self.session = session
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
