import StokerHarness
import Testing

@_spi(Testing) @testable import Stoker

/// The election's guarantees over real PostgreSQL: several nodes in one process, every callback in one history,
/// checked after every run for overlapping leaderships, terms that fail to increase and leaderships never demoted.
@Suite("Election")
struct ElectionTests {
    @Test("3 nodes × 3 elections: exactly one leader per election, confirmed by pg_locks; terms increase")
    func convergence() async throws {
        try await withTestDatabase { database in
            let history = History()
            let elections = ["e1", "e2", "e3"]
            try await withNodes { nodes in
                let all = try ["a", "b", "c"].map { name in
                    nodes.add(try TestNode(name, database: database, elections: elections, history: history))
                }
                try await history.wait("every election has a leader") { entries in
                    elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                }
                for election in elections {
                    let leaders = History.leaders(history.entries, election: election)
                    #expect(leaders.count == 1)
                    #expect(try await lockHolders(election, in: database) == 1)
                    let truth = try await whereis(election, in: database)
                    #expect(truth?.member.name == leaders.first)
                    let term = history.entries.last { $0.election == election && $0.kind == .nowLeader }?.term
                    #expect(truth?.term == term)
                }
                // A second round: every leader's node stops in turn; leadership moves, terms keep increasing.
                for node in all.dropLast() {
                    try await node.stop()
                    try await history.wait("every election has a leader again") { entries in
                        elections.allSatisfy {
                            let leaders = History.leaders(entries, election: $0)
                            return leaders.count == 1 && leaders.first != node.name
                        }
                    }
                }
                for election in elections {
                    #expect(try await whereis(election, in: database)?.member.name == "c")
                }
                try await all[2].stop()
                history.check(complete: true)
            }
        }
    }

    enum Fault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case gracefulStop, crash, freeze, processFreeze, terminateBackend
        var testDescription: String { rawValue }
    }

    @Test("a fault of the leader: a new leader, no overlap", arguments: Fault.allCases)
    func fault(_ fault: Fault) async throws {
        try await withTestDatabase { database in
            let history = History()
            let elections = ["e1", "e2"]
            try await withNodes { nodes in
                let all = try ["a", "b", "c"].map { name in
                    nodes.add(try TestNode(name, database: database, elections: elections, history: history))
                }
                try await history.wait("every election has a leader") { entries in
                    elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                }
                let victimName = try #require(History.leaders(history.entries, election: "e1").first)
                let victim = try #require(all.first { $0.name == victimName })
                let before = history.entries.count
                let lost = Set(elections.filter { History.leaders(history.entries, election: $0) == [victimName] })

                switch fault {
                case .gracefulStop:
                    try await victim.stop()
                case .crash:
                    await victim.crash()
                case .freeze:
                    // The loop is held well past the lease; the watchdog demotes on time regardless.
                    victim.node.freezeLoop(for: victim.node.configuration.lease + .seconds(1))
                case .processFreeze:
                    // Loop and watchdog both held, as under SIGSTOP: only the server's idle timeout frees the lock,
                    // and the victim learns of it on resuming — its demotion still ends at its lease deadline.
                    victim.node.freezeThreads(for: victim.node.configuration.lease + .seconds(1))
                case .terminateBackend:
                    try await database.terminateSession(of: victim.node)
                }

                try await history.wait("every election the victim led has a new leadership") { entries in
                    let after = entries.dropFirst(before)
                    return lost.allSatisfy { election in
                        after.contains { $0.election == election && $0.kind == .nowLeader }
                            && History.leaders(entries, election: election).count == 1
                    }
                }
                let after = history.entries.dropFirst(before)
                for election in lost {
                    let demotion = after.first { $0.node == victimName && $0.election == election && $0.isDemotion }
                    switch fault {
                    case .gracefulStop, .crash:
                        #expect(demotion?.kind == .shutdown)
                        #expect(History.leaders(history.entries, election: election) != [victimName])
                    case .freeze, .processFreeze:
                        #expect(demotion?.event == .nowFollower(leader: nil, reason: .leaseExpired))
                    case .terminateBackend:
                        #expect(demotion?.event == .nowFollower(leader: nil, reason: .connectionLost))
                    }
                    #expect(demotion?.isLeaderAtStart == false)
                    let successor = after.first { $0.election == election && $0.kind == .nowLeader }
                    if let demotion, let endedAt = demotion.endedAt, let successor {
                        #expect(endedAt <= successor.at)
                    }
                }
                if [.freeze, .processFreeze, .terminateBackend].contains(fault) {
                    // The victim comes back as a new incarnation and stays a follower or leads again; either way
                    // one leader per election.
                    try await history.wait("the history settles with one leader per election") { entries in
                        elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                    }
                }
                for election in elections {
                    #expect(try await lockHolders(election, in: database) == 1)
                }
                for node in all where !(node === victim && [.gracefulStop, .crash].contains(fault)) {
                    try await node.stop()
                }
                history.check(complete: true)
            }
        }
    }

    @Test("a graceful hand-over is driven by the released notification, not by the retry interval")
    func handOverByNotification() async throws {
        // Followers that each lead an election of their own never wait in the lock queue: with an hourly retry, only
        // the `released` notification can make one take over.
        try await handOverTwice(extraElection: { ["own-\($0)"] }, fault: { leader, _ in try await leader.stop() })
    }

    @Test("when the server ends the leader's session, a follower is granted the lock from the queue it waits in")
    func crashHandOverByLockQueue() async throws {
        // Followers that lead nothing wait in the lock queue. The server ending the leader's session sends no
        // `released` notification, so with an hourly retry only that wait can make one take over (the old leader,
        // back as a new incarnation, queues like the others).
        try await handOverTwice { leader, database in try await database.terminateSession(of: leader.node) }
    }

    /// Three nodes in election `e` (and in `extraElection(name)`), followers retrying once an hour: `fault` hits the
    /// leader twice, each time another node must take over; then every node stops and the history is checked.
    private func handOverTwice(
        extraElection: @escaping @Sendable (String) -> [String] = { _ in [] },
        fault: (TestNode, TestDatabase) async throws -> Void
    ) async throws {
        try await withTestDatabase { database in
            let history = History()
            try await withNodes { nodes in
                let all = try ["a", "b", "c"].map { name in
                    nodes.add(
                        try TestNode(name, database: database, elections: ["e"] + extraElection(name), history: history)
                        {
                            $0.retryInterval = .seconds(3600)
                        })
                }
                try await waitForMembers(3, in: database)
                try await history.wait("one leads") { History.leaders($0, election: "e").count == 1 }
                for _ in 0..<2 {
                    let leaderName = try #require(History.leaders(history.entries, election: "e").first)
                    let leader = try #require(all.first { $0.name == leaderName })
                    try await fault(leader, database)
                    try await history.wait("another node leads") { entries in
                        let leaders = History.leaders(entries, election: "e")
                        return leaders.count == 1 && leaders != [leaderName]
                    }
                }
                // Stopping a node that already stopped does nothing.
                for node in all { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("a partition between the leader and PostgreSQL: it demotes at its lease deadline, before a new leadership")
    func partition() async throws {
        try await withTestDatabase { database in
            // The victim reaches PostgreSQL over TCP through a proxy that can blackhole it, as a role with the
            // node's grants; the others connect directly.
            try #require(!database.server.host.hasPrefix("/"), "needs a TCP server")
            let role = try await database.createRole(prefix: "stk_part", password: "part-pw-1")
            try await StokerSchema.migrate(connection: database.conninfo)
            try await StokerSchema.grant(to: role, connection: database.conninfo)
            let proxy = try TestProxy(upstreamHost: database.server.host, upstreamPort: database.server.port)
            defer { proxy.stop() }
            let viaProxy = database.tcpConninfo(
                user: role, password: "part-pw-1", extra: ["host": "127.0.0.1", "port": "\(proxy.port)"])
            let history = History()
            let elections = ["e1", "e2"]
            try await withNodes { nodes in
                let victim = nodes.add(
                    try TestNode("v", database: database, elections: elections, history: history) {
                        $0.connection = viaProxy
                        $0.migrate = false
                    })
                try await history.wait("the victim leads both") { entries in
                    elections.allSatisfy { History.leaders(entries, election: $0) == ["v"] }
                }
                let others = try ["a", "b"].map { name in
                    nodes.add(try TestNode(name, database: database, elections: elections, history: history))
                }
                try await waitForMembers(3, in: database)
                let before = history.entries.count
                proxy.partition()
                // A new leadership (a new term) for each: another node's, or the victim's own new incarnation,
                // which comes back on a new path and may win the race once the server freed the old session's lock.
                try await history.wait("every election has a new leadership") { entries in
                    let after = entries.dropFirst(before)
                    return elections.allSatisfy { election in
                        after.contains { $0.election == election && $0.kind == .nowLeader }
                            && History.leaders(entries, election: election).count == 1
                    }
                }
                let after = history.entries.dropFirst(before)
                for election in elections {
                    let demotion = try #require(
                        after.first { $0.node == "v" && $0.election == election && $0.isDemotion })
                    #expect(demotion.event == .nowFollower(leader: nil, reason: .leaseExpired))
                    let successor = try #require(after.first { $0.election == election && $0.kind == .nowLeader })
                    #expect(try #require(demotion.endedAt) <= successor.at)
                }
                for election in elections { #expect(try await lockHolders(election, in: database) == 1) }
                for node in others + [victim] { try await node.stop() }
                history.check(complete: true)
            }
        }
    }

    @Test("PostgreSQL restarted with -m immediate: every leader demotes, then exactly one leader per election")
    func serverRestart() async throws {
        try await TestPostgres.withPrivate { postgres in
            try await postgres.withDatabase { database in
                let history = History()
                let elections = ["e1", "e2", "e3"]
                try await withNodes { nodes in
                    let all = try ["a", "b", "c"].map { name in
                        nodes.add(try TestNode(name, database: database, elections: elections, history: history))
                    }
                    try await history.wait("every election has a leader") { entries in
                        elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                    }
                    let leadersBefore = history.entries.filter { $0.kind == .nowLeader }.count
                    try await postgres.restart()
                    try await history.wait("every leader demoted and every election has a new leader") { entries in
                        // Demoted as the session went (connectionLost) — or, when both of the leader's threads were
                        // starved past its lease while the server restarted (seen under a busy loop per core), at its
                        // lease deadline (leaseExpired): either way before anyone else leads, which `check` verifies.
                        let demotions = entries.filter {
                            $0.event == .nowFollower(leader: nil, reason: .connectionLost)
                                || $0.event == .nowFollower(leader: nil, reason: .leaseExpired)
                        }
                        return demotions.count >= elections.count
                            && entries.filter { $0.kind == .nowLeader }.count >= leadersBefore + elections.count
                            && elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                    }
                    // The tables agree with the callbacks once the cluster has settled (under load a lease can still run
                    // out after the first new leadership, and another follow; each state is looked at whole, again).
                    for election in elections {
                        var agreed = false
                        for _ in 0..<3000 where !agreed {
                            let holders = try await lockHolders(election, in: database)
                            let named = try await whereis(election, in: database)?.member.name
                            let leaders = History.leaders(history.entries, election: election)
                            agreed = holders == 1 && leaders.count == 1 && named == leaders.first
                            if !agreed { try await Task.sleep(for: .milliseconds(10)) }
                        }
                        #expect(agreed, "whereis and the lock never agreed with the callbacks for \(election)")
                    }
                    for node in all { try await node.stop() }
                    history.check(complete: true)
                }
            }
        }
    }

    @Test("a stale leader's fenced write fails with the fence SQLSTATE once a new term exists")
    func fencing() async throws {
        try await withTestDatabase { database in
            let history = History()
            try await withNodes { nodes in
                _ = try await database.admin("CREATE TABLE ledger (term bigint, note text)")
                let a = nodes.add(try TestNode("a", database: database, elections: ["e"], history: history))
                try await history.wait("a leads") { History.count($0, .nowLeader) == 1 }
                let staleTerm = try #require(history.entries.first { $0.kind == .nowLeader }?.term)
                let fence = try Fence.sql()
                // While the term is current, the fenced write goes through.
                try await fencedWrite(fence, term: staleTerm, in: database)
                #expect(try await database.admin("SELECT count(*) FROM ledger") == [["1"]])

                let b = nodes.add(try TestNode("b", database: database, elections: ["e"], history: history))
                await a.crash()
                try await history.wait("b leads") { History.leaders($0, election: "e") == ["b"] }
                let error = await #expect(throws: StokerError.self) {
                    try await fencedWrite(fence, term: staleTerm, in: database)
                }
                #expect(error?.sqlState == Fence.staleTermSQLState)
                #expect(try await database.admin("SELECT count(*) FROM ledger") == [["1"]])
                // The new leader's term passes.
                let newTerm = try #require(history.entries.last { $0.kind == .nowLeader }?.term)
                #expect(newTerm > staleTerm)
                try await fencedWrite(fence, term: newTerm, in: database)
                try await b.stop()
                history.check(complete: true)
            }
        }
    }

    @Test("a second activator for one election on one node is refused with .invalidConfiguration")
    func duplicateActivator() async throws {
        try await withTestDatabase { database in
            let history = History()
            let node = try TestNode("a", database: database, elections: ["e"], history: history)
            do {
                try await history.wait("a leads") { History.count($0, .nowLeader) == 1 }
                let second = try Activator(
                    election: "e", node: node.node, behaviour: RecordingBehaviour(history: history))
                let error = await #expect(throws: StokerError.self) { try await second.run() }
                #expect(error?.code == .invalidConfiguration)
                // An activator runs once: a second run() of the first one is refused too.
                let again = await #expect(throws: StokerError.self) { try await node.activators[0].run() }
                #expect(again?.code == .invalidConfiguration)
                try await node.stop()
                history.check(complete: true)
            } catch {
                await node.crash()
                throw error
            }
        }
    }
}

/// A user transaction guarded by the fence, on the user's own connection.
private func fencedWrite(_ fence: String, term: Int64, in database: TestDatabase) async throws {
    try await withSession(database.conninfo) { session in
        try await session.run { connection in
            try connection.transaction {
                try connection.execute(fence, ["test", "e", "\(term)"])
                try connection.execute("INSERT INTO ledger VALUES ($1, 'written by the leader')", ["\(term)"])
            }
        }
    }
}
