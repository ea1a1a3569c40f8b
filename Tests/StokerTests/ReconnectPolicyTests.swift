import Testing

@testable import Stoker

/// The node's reconnect rules: which errors it retries (before and after it first joined), and how long it waits.
@Suite("Reconnect policy")
struct ReconnectPolicyTests {
    typealias Code = StokerError.Code

    struct Case: Sendable, CustomTestStringConvertible {
        let code: Code
        let sqlState: String?
        /// Retried at first start (never joined), and once the node has joined.
        let beforeJoining: Bool
        let afterJoining: Bool
        var testDescription: String { "\(code)" + (sqlState.map { " [\($0)]" } ?? "") }
    }

    /// Every code, and the SQLSTATE classes that decide for `queryFailed`.
    static let table: [Case] = [
        Case(code: .invalidConnectionString, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .connectionFailed, sqlState: nil, beforeJoining: true, afterJoining: true),
        Case(code: .connectionTimeout, sqlState: nil, beforeJoining: true, afterJoining: true),
        Case(code: .authenticationFailed, sqlState: "28P01", beforeJoining: false, afterJoining: false),
        Case(code: .databaseNotFound, sqlState: "3D000", beforeJoining: false, afterJoining: false),
        Case(code: .tlsFailed, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .unsupportedServer, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .readOnlySession, sqlState: "25006", beforeJoining: false, afterJoining: true),
        Case(code: .pooledConnection, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .connectionLost, sqlState: "57P01", beforeJoining: true, afterJoining: true),
        Case(code: .sessionClosed, sqlState: nil, beforeJoining: false, afterJoining: false),
        // insufficient_privilege, undefined_table (class 42) and invalid_authorization_specification (28): a
        // configuration mistake at first start, an administrator mid-change once joined.
        Case(code: .queryFailed, sqlState: "42501", beforeJoining: false, afterJoining: true),
        Case(code: .queryFailed, sqlState: "42P01", beforeJoining: false, afterJoining: true),
        Case(code: .queryFailed, sqlState: "28000", beforeJoining: false, afterJoining: true),
        // Any other class: a statement timeout (57014), a deadlock (40P01), a shutdown, no SQLSTATE at all.
        Case(code: .queryFailed, sqlState: "57014", beforeJoining: true, afterJoining: true),
        Case(code: .queryFailed, sqlState: "40P01", beforeJoining: true, afterJoining: true),
        Case(code: .queryFailed, sqlState: "4", beforeJoining: true, afterJoining: true),
        Case(code: .queryFailed, sqlState: nil, beforeJoining: true, afterJoining: true),
        Case(code: .invalidParameter, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .invalidIdentifier, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .unexpectedResult, sqlState: nil, beforeJoining: true, afterJoining: true),
        Case(code: .schemaMismatch, sqlState: nil, beforeJoining: false, afterJoining: false),
        Case(code: .migrationFailed, sqlState: "42P01", beforeJoining: false, afterJoining: false),
        Case(code: .invalidConfiguration, sqlState: nil, beforeJoining: false, afterJoining: false),
    ]

    @Test("which errors are retried, before and after the node first joined", arguments: table)
    func retryable(_ entry: Case) {
        let error = StokerError(entry.code, "test", sqlState: entry.sqlState)
        #expect(ReconnectPolicy.isRetryable(error, joinedOnce: false) == entry.beforeJoining)
        #expect(ReconnectPolicy.isRetryable(error, joinedOnce: true) == entry.afterJoining)
    }

    static func policy() -> ReconnectPolicy {
        ReconnectPolicy(first: .milliseconds(100), maximum: .seconds(1), resetAfter: .seconds(2))
    }

    @Test("the delay starts at the first, doubles per failure, and stops at the maximum")
    func doublingAndCap() {
        var policy = Self.policy()
        #expect(policy.delay == .milliseconds(100))
        var delays: [Duration] = []
        for _ in 0..<7 {
            delays.append(policy.delay)
            // random 1: the sleep is the delay itself.
            #expect(policy.backOff(random: 1) == delays.last)
        }
        #expect(
            delays == [100, 200, 400, 800, 1000, 1000, 1000].map { Duration.milliseconds($0) })
        #expect(policy.delay == .seconds(1))
    }

    @Test("a maximum that is not a power-of-two multiple of the first caps the delay exactly")
    func capBetweenDoublings() {
        var policy = ReconnectPolicy(first: .milliseconds(300), maximum: .milliseconds(1000), resetAfter: .seconds(1))
        _ = policy.backOff(random: 0.5)
        #expect(policy.delay == .milliseconds(600))
        _ = policy.backOff(random: 0.5)
        #expect(policy.delay == .milliseconds(1000))
    }

    @Test("a lease expiry resets the delay to the first")
    func leaseExpiryResets() {
        var policy = Self.policy()
        for _ in 0..<3 { _ = policy.backOff(random: 0) }
        #expect(policy.delay == .milliseconds(800))
        policy.leaseExpired()
        #expect(policy.delay == .milliseconds(100))
    }

    @Test("a session that joined and lasted the heartbeat interval resets the delay; anything less keeps it")
    func sessionEndResets() {
        var policy = Self.policy()
        for _ in 0..<3 { _ = policy.backOff(random: 0) }
        let backedOff = policy

        // Joined, but failed right after: keeps backing off.
        policy.sessionEnded(joined: true, lasted: .milliseconds(1999))
        #expect(policy == backedOff)
        // Never joined, however long the attempt took (a connect timeout, say).
        policy.sessionEnded(joined: false, lasted: .seconds(60))
        #expect(policy == backedOff)
        // Joined and lasted exactly the heartbeat interval: starts over.
        policy.sessionEnded(joined: true, lasted: .seconds(2))
        #expect(policy.delay == .milliseconds(100))
        #expect(policy == Self.policy())

        for _ in 0..<2 { _ = policy.backOff(random: 0) }
        policy.sessionEnded(joined: true, lasted: .seconds(30))
        #expect(policy.delay == .milliseconds(100))
    }

    @Test("the sleep is jittered within delay / 2 ... delay: its ends at random 0 and 1, the middle between")
    func jitterBounds() {
        var low = Self.policy()
        #expect(low.backOff(random: 0) == .milliseconds(50))
        var high = Self.policy()
        #expect(high.backOff(random: 1) == .milliseconds(100))
        var middle = Self.policy()
        #expect(middle.backOff(random: 0.5) == .microseconds(75_000))
        // The draw is clamped to 0...1.
        var below = Self.policy()
        #expect(below.backOff(random: -3) == .milliseconds(50))
        var above = Self.policy()
        #expect(above.backOff(random: 7) == .milliseconds(100))
        // Whatever the draw, the delay doubles the same.
        #expect(low.delay == high.delay && high.delay == middle.delay && middle.delay == .milliseconds(200))
    }

    @Test(
        "jitter stays within its bounds for every draw, odd nanosecond delays included", arguments: [0.0, 0.1, 0.999])
    func jitterWithin(_ random: Double) {
        var policy = ReconnectPolicy(first: .nanoseconds(7), maximum: .seconds(3600), resetAfter: .seconds(1))
        for _ in 0..<45 {
            let delay = policy.delay
            let sleep = policy.backOff(random: random)
            #expect(sleep >= .nanoseconds(delay.nanoseconds / 2) && sleep <= delay)
            #expect(sleep > .zero)
        }
        #expect(policy.delay == .seconds(3600))
    }

    @Test("a refused sweep or trigger statement keeps the session, unless its error is the session ending")
    func refusalsThatEndTheSession() {
        // The server terminating the session, shutting down, or the connection failing: the session is over.
        for state in ["57P01", "57P02", "57P03", "08006", "08003"] {
            #expect(NodeDriver.endsSession(state), "\(state)")
        }
        // A lock timeout, a statement timeout, a serialization failure, a privilege missing, no SQLSTATE: refused.
        for state in ["55P03", "57014", "40001", "42501"] { #expect(!NodeDriver.endsSession(state), "\(state)") }
        #expect(!NodeDriver.endsSession(nil))
    }
}
