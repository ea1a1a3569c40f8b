import StokerHarness
import Testing

@_spi(Testing) @testable import Stoker

/// The rule that a term is never issued twice for one election, also after an HA failover to an asynchronous
/// standby that lost the last committed term bumps: the old leader's in-flight writes, fenced with such a lost term,
/// may still reach the new primary through the application's own pool, and must be refused there.
///
/// The loss is real, not simulated: the standby's streaming is cut (`primary_conninfo` emptied) before the bump, so the
/// bump commits on the old primary only, and the standby is promoted without it.
@Suite("Terms never repeat across a failover", .timeLimit(.minutes(5)))
struct TermFailoverTests {
    /// The lowest term a server on WAL timeline 2 (a standby promoted once) issues: (2 − 1) × 2^32 + 1.
    static let timeline2Floor: Int64 = (1 << 32) + 1

    @Test("a term bump lost in a failover is never issued again: the promoted server starts above it and fences it")
    func lostBumpNeverRepeats() async throws {
        try await TestPostgres.withPrivate { primary in
            try await primary.withStandby { standby in
                try await primary.withDatabase { database in
                    try await lostBumpNeverRepeats(primary: primary, standby: standby, database: database)
                }
            }
        }
    }

    private func lostBumpNeverRepeats(primary: TestPostgres, standby: TestPostgres, database: TestDatabase)
        async throws
    {
        let onStandby = try conninfo(of: standby, database: database.name)
        let history = History()
        _ = try await database.admin("CREATE TABLE ledger (term bigint, note text)")
        try await withNodes { nodes in
            // 1. Terms on the primary: a leads (term 1), then hands over to b (term T).
            let a = nodes.add(try TestNode("a", database: database, elections: ["e"], history: history))
            try await history.wait("a leads") { History.leaders($0, election: "e") == ["a"] }
            let b = nodes.add(try TestNode("b", database: database, elections: ["e"], history: history))
            try await waitForMembers(2, in: database)
            try await a.stop()
            try await history.wait("b leads") { History.leaders($0, election: "e") == ["b"] }
            let term = try #require(history.entries.last { $0.node == "b" && $0.kind == .nowLeader }?.term)
            #expect(term >= 2)
            // Terms issued on timeline 1 lie below the floor of timeline 2.
            #expect(term < Self.timeline2Floor)
            try await fencedLedgerWrite(term: term, note: "b, replicated", conninfo: database.conninfo)
            try await waitUntil("the standby has replayed term \(term) and b's write") {
                let rows = try? await standby.admin(
                    "SELECT term, leader_node IS NOT NULL, (SELECT count(*) FROM ledger) FROM stoker.elections "
                        + "WHERE name = 'e'",
                    database: database.name)
                return rows == [["\(term)", "t", "1"]]
            }

            // 2. The lost bump: streaming is cut, then c takes over from b on the primary with term T + 1 and writes
            //    under it there. Neither the bump nor the write ever reaches the standby.
            _ = try await standby.admin("ALTER SYSTEM SET primary_conninfo = ''")
            _ = try await standby.admin("SELECT pg_reload_conf()")
            try await waitUntil("the standby's WAL receiver has stopped") {
                try await standby.admin("SELECT count(*) FROM pg_stat_wal_receiver") == [["0"]]
            }
            try await waitUntil("the primary streams to no standby") {
                try await primary.admin("SELECT count(*) FROM pg_stat_replication") == [["0"]]
            }
            let c = nodes.add(try TestNode("c", database: database, elections: ["e"], history: history))
            try await waitForMembers(2, in: database)
            try await b.stop()
            try await history.wait("c leads") { History.leaders($0, election: "e") == ["c"] }
            let lostTerm = try #require(history.entries.last { $0.node == "c" && $0.kind == .nowLeader }?.term)
            #expect(lostTerm == term + 1)
            #expect(try await database.admin("SELECT term FROM stoker.elections WHERE name = 'e'") == [["\(lostTerm)"]])
            try await fencedLedgerWrite(term: lostTerm, note: "c, lost", conninfo: database.conninfo)
            #expect(try await database.admin("SELECT count(*) FROM ledger") == [["2"]])

            // The failover: the old primary's nodes are gone (c still believes it leads when it dies), then the
            // standby is promoted.
            await c.crash()
            #expect(try await standby.admin("SELECT pg_promote()") == [["t"]])
            try await waitUntil("the standby is promoted") {
                try await standby.admin("SELECT pg_is_in_recovery()") == [["f"]]
            }
            let promoted = try await standby.admin(
                "SELECT term, (SELECT count(*) FROM ledger) FROM stoker.elections WHERE name = 'e'",
                database: database.name)
            #expect(promoted == [["\(term)", "1"]], "the bump to \(lostTerm) and c's write were lost in the failover")

            // 3. Nodes on the promoted server: the new leader's term lies above every term the old primary issued.
            let successors = try ["d", "f"].map { name in
                nodes.add(
                    try TestNode(name, database: database, elections: ["e"], history: history) {
                        $0.connection = onStandby
                    })
            }
            try await history.wait("a node on the promoted server leads") { entries in
                let leaders = History.leaders(entries, election: "e")
                return leaders == ["d"] || leaders == ["f"]
            }
            let leader = try #require(History.leaders(history.entries, election: "e").first)
            let newTerm = try #require(history.entries.last { $0.node == leader && $0.kind == .nowLeader }?.term)
            #expect(newTerm > lostTerm, "the term \(lostTerm) the old primary issued was issued again")
            // The promoted server runs on WAL timeline 2: its first bump is at term_floor() = 2^32 + 1, above every
            // term of timeline 1 — including the bumps that never reached it.
            #expect(newTerm >= Self.timeline2Floor)
            let truth = try await StokerNode.whereis(election: "e", cluster: "test", connection: onStandby)
            #expect(truth?.member.name == leader)
            #expect(truth?.term == newTerm)

            // The old leader's in-flight write under the lost term, arriving at the new primary, is refused; so is one
            // under the last term the new primary had seen.
            for stale in [lostTerm, term] {
                let error = await #expect(throws: StokerError.self) {
                    try await fencedLedgerWrite(term: stale, note: "stale", conninfo: onStandby)
                }
                #expect(error?.sqlState == Fence.staleTermSQLState, "term \(stale): \(String(describing: error))")
            }
            #expect(try await standby.admin("SELECT count(*) FROM ledger", database: database.name) == [["1"]])
            // The current leader's term passes.
            try await fencedLedgerWrite(term: newTerm, note: "\(leader), promoted", conninfo: onStandby)
            #expect(try await standby.admin("SELECT count(*) FROM ledger", database: database.name) == [["2"]])

            for node in successors { try await node.stop() }
            history.check(complete: true)
        }
    }

    @Test("term_floor() is 1 on a fresh cluster (timeline 1) and 2^32 + 1 on a standby promoted once (timeline 2)")
    func termFloorFollowsTheTimeline() async throws {
        try await TestPostgres.withPrivate { primary in
            try await StokerSchema.migrate(connection: primary.adminConninfo)
            #expect(try await primary.admin("SELECT stoker.term_floor()") == [["1"]])
            // The standby's base backup holds the migrated schema.
            try await primary.withStandby { standby in
                #expect(try await standby.admin("SELECT pg_promote()") == [["t"]])
                try await waitUntil("the standby is promoted") {
                    try await standby.admin("SELECT pg_is_in_recovery()") == [["f"]]
                }
                #expect(try await standby.admin("SELECT stoker.term_floor()") == [["\(Self.timeline2Floor)"]])
                // The old primary stays on timeline 1.
                #expect(try await primary.admin("SELECT stoker.term_floor()") == [["1"]])
            }
        }
    }
}

/// A conninfo for `database` on `server` as the admin, over the server's unix socket.
private func conninfo(of server: TestPostgres, database: String) throws -> String {
    let directory = try #require(server.socketDirectory, "needs a private cluster")
    return "host=\(directory) port=\(server.port) user=postgres dbname=\(database)"
}

/// A write on behalf of the leader of election `e` with `term`, guarded by the fence, on a connection of its own (as
/// the application's pool would make): one transaction, rolled back when the fence refuses the term.
private func fencedLedgerWrite(term: Int64, note: String, conninfo: String) async throws {
    let fence = try Fence.sql()
    try await withSession(conninfo) { session in
        try await session.run { connection in
            try connection.transaction {
                try connection.execute(fence, ["test", "e", "\(term)"])
                try connection.execute("INSERT INTO ledger VALUES ($1, $2)", ["\(term)", note])
            }
        }
    }
}
