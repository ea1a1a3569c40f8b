/// What the node tells one activator, in the order it happened.
enum ActivatorMessage: Sendable {
    /// This node leads (the term bump committed, and its begin); `members`: the cluster as the node knows it at that
    /// instant (this node included), which the `member` messages that follow change.
    case leader(LeaderScope, members: [ClusterMember])
    /// Leadership ended without a resignation, at `endedAt` (leader work already cancelled).
    case demoted(DemotionReason, endedAt: ContinuousClock.Instant)
    /// A member joined or left (sent while this node leads).
    case member(ClusterChange)
    /// Trigger `sequence` of the election, for the leadership `scope` (handed out once per leadership, in order).
    case trigger(LeaderScope, payload: String, sequence: Int64)
    /// Another node leads (its name), or the election was released (`nil`).
    case leaderObserved(String?)
    /// The node stopped; leadership, if any, ended at `endedAt`. The last message.
    case stopped(ShutdownReason, endedAt: ContinuousClock.Instant?)
    /// The activator's own timer (generation).
    case timerFired(UInt64)
    /// The activator's graceful shutdown began.
    case gracefulShutdown
}

extension ActivatorMessage: Equatable {
    /// Leaderships compare by identity (one scope per leadership); everything else by value.
    static func == (lhs: ActivatorMessage, rhs: ActivatorMessage) -> Bool {
        switch (lhs, rhs) {
        case (.leader(let left, let leftMembers), .leader(let right, let rightMembers)):
            left === right && leftMembers == rightMembers
        case (.demoted(let left, let leftEnd), .demoted(let right, let rightEnd)): left == right && leftEnd == rightEnd
        case (.member(let left), .member(let right)): left == right
        case (
            .trigger(let left, let leftPayload, let leftSequence),
            .trigger(let right, let rightPayload, let rightSequence)
        ):
            left === right && leftPayload == rightPayload && leftSequence == rightSequence
        case (.leaderObserved(let left), .leaderObserved(let right)): left == right
        case (.stopped(let left, let leftEnd), .stopped(let right, let rightEnd)): left == right && leftEnd == rightEnd
        case (.timerFired(let left), .timerFired(let right)): left == right
        case (.gracefulShutdown, .gracefulShutdown): true
        default: false
        }
    }
}
