import StokerHarness
import Testing

@_spi(Testing) @testable import Stoker

/// The evidence rule: a successor whose predecessor did not hand over begins only on positive evidence that the
/// predecessor stopped acting — its witness session gone (the process ended, or it ended its leaderships and closed
/// the witness), its acknowledgement after a server change, or its lease surely run out. The lock grant alone is not
/// evidence: when the server ends the holder's main session, the lock is free while the holder still runs.
@Suite("The evidence rule", .timeLimit(.minutes(5)))
struct EvidenceTests {
    /// Three nodes on election "e" with a long lease (no lease can be the evidence within these tests unless a test
    /// waits for it on purpose); returns once exactly one leads.
    private func withThreeNodes(
        _ database: TestDatabase,
        lease: Duration = .seconds(20),
        _ body: (History, [TestNode], TestNode) async throws -> Void
    ) async throws {
        let history = History()
        try await withNodes { nodes in
            let all = try ["a", "b", "c"].map { name in
                nodes.add(
                    try TestNode(name, database: database, elections: ["e"], history: history) {
                        $0.lease = lease
                    })
            }
            try await waitForMembers(3, in: database)
            try await history.wait("one leads") { History.leaders($0, election: "e").count == 1 }
            let leaderName = try #require(History.leaders(history.entries, election: "e").first)
            let leader = try #require(all.first { $0.name == leaderName })
            try await body(history, all, leader)
        }
    }

    /// The first `nowLeader` of "e" after `instant` by a node other than `node` (or by any node, when `nil`).
    private static func successor(
        _ entries: [HistoryEntry], after instant: ContinuousClock.Instant, other node: String?
    ) -> HistoryEntry? {
        entries.first { $0.kind == .nowLeader && $0.election == "e" && $0.at > instant && $0.node != node }
    }

    /// As after a restart of the server (same system and timeline, another instance): node `incarnation` joined, and
    /// began what it leads, on an instance that is not this one.
    private static func joinedAnotherInstance(_ incarnation: Int, in database: TestDatabase) async throws {
        _ = try await database.admin(
            """
            UPDATE stoker.nodes SET server_instance = 'another server' WHERE id = \(incarnation);
            UPDATE stoker.elections
               SET written_on = split_part(written_on, '/', 1) || '/' || split_part(written_on, '/', 2)
                                || '/another start/another token'
             WHERE leader_node = \(incarnation)
            """)
    }

    /// Waits (bounded, fails loudly) until election "e" has a term above `term`; returns it.
    private static func bumpedTerm(in database: TestDatabase, above term: Int) async throws -> Int {
        for _ in 0..<3000 {
            let rows = try await database.admin("SELECT term FROM stoker.elections WHERE name = 'e'")
            if let value = rows.first?.first.flatMap({ $0 }).flatMap({ Int($0) }), value > term { return value }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("the term of e never rose above \(term)")
        throw History.TimedOut(what: "a term bump")
    }

    @Test("the server ends the leader's main session while its threads are held: the successor waits for its end")
    func serverKillWhileHeld() async throws {
        try await withTestDatabase { database in
            try await withThreeNodes(database, lease: .seconds(40)) { history, all, leader in
                // Held as a CPU-starved process would be: its session thread cannot read the FATAL, its watchdog
                // cannot run — until this task has looked at the cluster and releases it, seconds later: far past any
                // fixed guard a successor could have used instead of evidence. A fixed hold was too short on a slow
                // host (6 s: the look came 6.2 and 8.1 s after the freeze in idle runs of the suite, 9.6 s in a loaded
                // one). The bound stays under the lease (40 s here, less the heartbeat interval, 8 s): the server's
                // idle timeout cannot end the held witness, the other evidence, before the look.
                let hold = Duration.seconds(30)
                let holds = leader.node.sessionHolds
                let frozen = ContinuousClock.now
                leader.node.freezeThreads(for: hold)
                try await eventually("the leader's session thread is held") { leader.node.sessionHolds > holds }
                let killed = ContinuousClock.now
                try await database.terminateSession(of: leader.node)
                // A successor takes the lock and bumps the term at once (the fence refuses the old term from then on),
                // but while the old leader is held nothing names it leader: not whereis, not a nowLeader.
                let term = try await Self.bumpedTerm(in: database, above: 1)
                let named = try await whereis("e", in: database)
                let successor = Self.successor(history.entries, after: killed, other: leader.name)
                // What was read is of the hold only if the reading ended before the hold did (the old leader's own
                // demotion line can come later than its end, so the history cannot tell).
                let lookedAt = ContinuousClock.now
                #expect(lookedAt < frozen + hold, "the cluster was looked at during the hold")
                if lookedAt < frozen + hold {
                    #expect(named == nil, "whereis named a leader at term \(term) while the old leader was held")
                    #expect(successor == nil, "a successor began while the old leader was held")
                }
                leader.node.releaseFreeze()
                let released = ContinuousClock.now
                try await history.wait("the old leader demoted, and another node leads") { entries in
                    entries.contains { $0.node == leader.name && $0.isDemotion && $0.at > killed }
                        && Self.successor(entries, after: killed, other: leader.name) != nil
                }
                let entries = history.entries
                let next = try #require(Self.successor(entries, after: killed, other: leader.name))
                let demotion = try #require(
                    entries.first { $0.node == leader.name && $0.isDemotion && $0.at > killed },
                    "the old leader demoted")
                let ended = try #require(demotion.endedAt)
                #expect(ended >= lookedAt, "the old leader's threads were held: it cannot have ended earlier")
                #expect(next.at >= ended, "the successor began \(ended - next.at) before the old leader ended")
                // Its evidence was the witness closing (once the hold ended), not the lease (40 s).
                #expect(next.at - released < .seconds(15), "the successor began \(next.at - released) after the hold")
                for node in all { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("the server ends the leader's witness alone: it re-joins; no overlap, and the election keeps a leader")
    func witnessKilled() async throws {
        try await withTestDatabase { database in
            try await withThreeNodes(database) { history, all, leader in
                let witness = try #require(leader.node.witnessBackendPID, "the leader has a witness session")
                #expect(witness != leader.node.backendPID)
                let killed = ContinuousClock.now
                _ = try await database.admin("SELECT pg_terminate_backend(\(witness))")
                // Its node lock is gone, so for every other node it is gone: it ends its leaderships, leaves its main
                // session and joins again as a new incarnation.
                try await history.wait("the old leader demoted, and a new leadership began") { entries in
                    entries.contains { $0.node == leader.name && $0.isDemotion && $0.at > killed }
                        && Self.successor(entries, after: killed, other: nil) != nil
                }
                let demotion = try #require(
                    history.entries.first { $0.node == leader.name && $0.isDemotion && $0.at > killed })
                #expect(demotion.event == .nowFollower(leader: nil, reason: .connectionLost))
                try await eventually("a node leads, as whereis says") {
                    History.leaders(history.entries, election: "e").count == 1
                }
                let current = try #require(History.leaders(history.entries, election: "e").first)
                #expect(try await whereis("e", in: database)?.member.name == current)
                #expect(try await lockHolders("e", in: database) == 1)
                for node in all { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("PostgreSQL restarted while the leader's threads are held: no successor begins before it has ended")
    func restartWhileHeld() async throws {
        try await TestPostgres.withPrivate { postgres in
            try await postgres.withDatabase { database in
                // A lease far above the time a restart takes on a loaded host (15 s was outrun once), so that beginning
                // within the bound below can only be the acknowledgement's doing.
                try await withThreeNodes(database, lease: .seconds(60)) { history, all, leader in
                    // Every session ends with the restart, the witness too: a free node lock proves nothing on the new
                    // server. The others re-join at once; the held leader re-joins (its acknowledgement) only after.
                    let hold = Duration.seconds(2)
                    let holds = leader.node.sessionHolds
                    leader.node.freezeThreads(for: hold)
                    try await eventually("the leader's session thread is held") { leader.node.sessionHolds > holds }
                    let restarted = ContinuousClock.now
                    try await postgres.restart()
                    try await history.wait("the old leader demoted, and a new leadership after the restart") {
                        entries in
                        entries.contains { $0.node == leader.name && $0.isDemotion && $0.at > restarted }
                            && Self.successor(entries, after: restarted, other: nil) != nil
                    }
                    let entries = history.entries
                    let next = try #require(Self.successor(entries, after: restarted, other: nil))
                    let demotion = try #require(
                        entries.first { $0.node == leader.name && $0.isDemotion && $0.at > restarted })
                    let ended = try #require(demotion.endedAt)
                    #expect(next.at >= ended, "the successor began \(ended - next.at) before the old leader ended")
                    // The acknowledgement, not the lease (60 s), let it begin.
                    #expect(next.at - restarted < .seconds(40), "began \(next.at - restarted) after the restart")
                    for node in all { try await node.stop() }
                    history.check(complete: true)
                }
            }
        }
    }

    @Test("a predecessor that joined another server instance and never comes back: the successor waits its lease")
    func otherServerWaitsForLease() async throws {
        try await withTestDatabase { database in
            let lease = Duration.seconds(3)
            try await withThreeNodes(database, lease: lease) { history, all, leader in
                // As after a failover: the leader's row says it joined a server that is not this one.
                let incarnation = try #require(leader.node.member?.id)
                try await Self.joinedAnotherInstance(incarnation, in: database)
                // It stops for good without handing over (its tasks cancelled, its sessions cut): no acknowledgement.
                let crashed = ContinuousClock.now
                await leader.crash()
                try await history.wait("another node leads") { entries in
                    Self.successor(entries, after: crashed, other: leader.name) != nil
                }
                let next = try #require(Self.successor(history.entries, after: crashed, other: leader.name))
                #expect(next.at - crashed >= lease, "began \(next.at - crashed) after the crash, before the lease")
                for node in all where node.name != leader.name { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("a predecessor that joined another server instance and re-joins: its acknowledgement is the evidence")
    func otherServerAcknowledged() async throws {
        try await withTestDatabase { database in
            // A lease far above the time a re-join takes on a loaded host, so that beginning within the bound below can
            // only be the acknowledgement's doing.
            try await withThreeNodes(database, lease: .seconds(60)) { history, all, leader in
                let incarnation = try #require(leader.node.member?.id)
                try await Self.joinedAnotherInstance(incarnation, in: database)
                let killed = ContinuousClock.now
                try await database.terminateSession(of: leader.node)
                try await history.wait("a new leadership") { entries in
                    Self.successor(entries, after: killed, other: nil) != nil
                }
                let next = try #require(Self.successor(history.entries, after: killed, other: nil))
                // The old leader's next incarnation names it: it has ended its leaderships.
                let acknowledged = try await database.admin(
                    "SELECT count(*) FROM stoker.nodes WHERE replaces = \(incarnation)")
                #expect(acknowledged == [["1"]])
                #expect(next.at - killed < .seconds(40), "began \(next.at - killed) after the kill, not on the ack")
                for node in all { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("an election row last written on another server instance, naming no leader: the first leader waits a lease")
    func releasedOnAnotherServer() async throws {
        try await withTestDatabase { database in
            let lease = Duration.seconds(2)
            let history = History()
            try await withNodes { nodes in
                let first = nodes.add(
                    try TestNode("a", database: database, elections: ["e"], history: history) { $0.lease = lease })
                try await history.wait("a leads") { History.leaders($0, election: "e") == ["a"] }
                try await first.stop()
                // As after a failover to an asynchronous standby that lost the last leader: the row names nobody, and
                // was written on another server, so nothing here tells whether someone still leads elsewhere.
                _ = try await database.admin(
                    "UPDATE stoker.elections SET written_on = 'another server' WHERE name = 'e' AND leader_node IS NULL"
                )
                let started = ContinuousClock.now
                let second = nodes.add(
                    try TestNode("b", database: database, elections: ["e"], history: history) { $0.lease = lease })
                try await history.wait("b leads") { History.leaders($0, election: "e") == ["b"] }
                let began = try #require(history.entries.first { $0.node == "b" && $0.kind == .nowLeader })
                #expect(began.at - started >= lease, "began \(began.at - started) after its start, before a lease")
                // It joined once and waited (a predecessor it cannot name is no error to reconnect over).
                #expect(try await database.admin("SELECT count(*) FROM stoker.nodes WHERE name = 'b'") == [["1"]])
                try await second.stop()
                history.check(complete: true)
            }
        }
    }

    @Test("an election row written on another timeline: its leader's acknowledgement is not trusted, the lease is")
    func otherTimelineWaitsForLease() async throws {
        try await withTestDatabase { database in
            let lease = Duration.seconds(3)
            try await withThreeNodes(database, lease: lease) { history, all, leader in
                // As after a failover to an asynchronous standby: the row says who led when it was written, on another
                // timeline — someone may have led since, in writes the standby never got. Its named leader re-joining
                // (its acknowledgement) proves nothing about that one.
                _ = try await database.admin(
                    "UPDATE stoker.elections SET written_on = '0/99/' || written_on WHERE name = 'e'")
                let killed = ContinuousClock.now
                try await database.terminateSession(of: leader.node)
                try await history.wait("a new leadership") { entries in
                    Self.successor(entries, after: killed, other: nil) != nil
                }
                let next = try #require(Self.successor(history.entries, after: killed, other: nil))
                #expect(next.at - killed >= lease, "began \(next.at - killed) after the kill, before the lease")
                for node in all { try await node.stop() }
                history.check(complete: true)
            }
        }
    }
}
