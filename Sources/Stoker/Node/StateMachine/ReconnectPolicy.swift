/// When the node reconnects after its session ended, and whether it does: a pure value, so the rules can be tested
/// without a clock, a server or a random source.
///
/// The delay starts at the first delay (`StokerNode.Configuration.reconnectDelay`) and doubles with each failed
/// attempt, up to the maximum (`maximumReconnectDelay`). It goes back to the first after a lease expiry, and after a
/// session that joined and then lasted at least `resetAfter` (the heartbeat interval): only a loss of a session that
/// worked starts over; one that failed right after joining (a statement it may not run, say) keeps backing off.
///
/// The driver, per session: ``sessionEnded(joined:lasted:)`` first; then on a lease expiry ``leaseExpired()``, and on
/// an error that ``isRetryable(_:joinedOnce:)`` accepts, sleeps ``backOff(random:)`` (``delay`` before the call is the
/// delay it logs).
struct ReconnectPolicy: Sendable, Hashable {
    /// The delay after the first failure, and after every reset.
    let first: Duration
    /// The cap of the doubling.
    let maximum: Duration
    /// A session that joined and lasted this long (the effective heartbeat interval) resets the delay.
    let resetAfter: Duration
    /// The delay the next ``backOff(random:)`` jitters (before doubling it).
    private(set) var delay: Duration

    init(first: Duration, maximum: Duration, resetAfter: Duration) {
        self.first = first
        self.maximum = maximum
        self.resetAfter = resetAfter
        delay = first
    }

    /// Errors worth a reconnect: the network, the server going away or timing a statement out. A wrong password, a
    /// missing database or schema, a pooler or an old server will not fix themselves: the node stops with them.
    static func isRetryable(_ error: StokerError, joinedOnce: Bool) -> Bool {
        switch error.code {
        case .queryFailed:
            // A role without the grants it needs (class 42: insufficient_privilege, undefined objects…) or a refused
            // authorization (28) will not fix itself on a first start: stop and say so. Once this node has joined, an
            // administrator may be mid-change: keep trying.
            let errorClass = error.sqlState?.prefix(2)
            return joinedOnce || (errorClass != "42" && errorClass != "28")
        case .connectionFailed, .connectionTimeout, .connectionLost, .unexpectedResult:
            return true
        case .readOnlySession:
            // After a managed failover the old address may briefly reach a standby; at first start it is a mistake.
            return joinedOnce
        default:
            return false
        }
    }

    /// A session ended after `lasted`, having joined (`joined`). Call before deciding. A session that joined and then
    /// lasted `resetAfter` resets the backoff: the next loss starts from the first delay.
    mutating func sessionEnded(joined: Bool, lasted: Duration) {
        if joined, lasted >= resetAfter { delay = first }
    }

    /// A lease expiry: the next connect is at once-ish: reset delay to first.
    mutating func leaseExpired() {
        delay = first
    }

    /// A retryable failure: returns how long to sleep — uniformly in `delay / 2 ... delay` (at least a nanosecond),
    /// placed by `random`, a value in `0...1` the driver draws (clamped to it) — then doubles the delay up to the
    /// maximum. Jitter keeps the nodes of a cluster that lost the server together from all coming back at once.
    mutating func backOff(random: Double) -> Duration {
        let nanoseconds = max(1, delay.nanoseconds)
        let low = nanoseconds / 2
        // At most half of Int64's range, so the conversion back cannot overflow; clamped, as a Double may round up.
        let offset = Double(nanoseconds - low) * min(max(random, 0), 1)
        let sleep = low + min(nanoseconds - low, Int64(offset.rounded(.down)))
        delay = min(delay * 2, maximum)
        return .nanoseconds(sleep)
    }
}
