import StokerHarness
import Testing

@testable import Stoker

/// The README's least-privilege setup: an owner (not a superuser) migrates and grants; the node's role (neither
/// owner nor superuser) then runs every statement of the node protocol.
@Suite("Least privilege", .timeLimit(.minutes(3)))
struct LeastPrivilegeTests {
    @Test("a role with only the documented grants runs everything a node does")
    func nodeRole() async throws {
        try await withTestDatabase { database in
            let owner = try await database.createRole(prefix: "stk_owner", password: "owner-pw-1")
            let app = try await database.createRole(prefix: "stk_app", password: "app-pw-1")
            try await database.admin("GRANT CREATE ON DATABASE \(database.name) TO \(owner)")
            let ownerConnection = database.tcpConninfo(user: owner, password: "owner-pw-1")
            let appConnection = database.tcpConninfo(user: app, password: "app-pw-1")

            // A node's role cannot create the schema: a clear error, nothing committed.
            do {
                try await StokerSchema.migrate(connection: appConnection)
                Issue.record("the node's role created the schema")
            } catch let error as StokerError {
                #expect(error.code == .migrationFailed)
                #expect(error.sqlState == "42501")
                #expect(error.message.contains("owner"))
            }

            try await StokerSchema.migrate(connection: ownerConnection)
            try await StokerSchema.grant(to: app, connection: ownerConnection)

            let facts = try await database.admin(
                """
                SELECT r.rolsuper, r.rolcreatedb, r.rolcreaterole, n.nspowner::regrole::text
                  FROM pg_roles r, pg_namespace n WHERE r.rolname = '\(app)' AND n.nspname = 'stoker'
                """
            )
            #expect(facts.first == ["f", "f", "f", owner])

            // What a node does on start: the migration check finds everything applied.
            #expect(try await StokerSchema.migrate(connection: appConnection).applied.isEmpty)
            try await StokerSchema.verify(connection: appConnection)

            try await withSession(appConnection) { node in
                let key = try await node.query(ProtocolStatements.lockNamespaceQuery, ["stoker"]).singleRow().int32(0)
                let statements = ProtocolStatements(schema: "stoker", quotedSchema: "\"stoker\"", lockNamespace: key)
                let cluster = try await node.run { try statements.ensureCluster("billing", on: $0) }
                #expect(try await node.run { try statements.ensureCluster("billing", on: $0) } == cluster)
                try await node.listen(statements.channel(clusterID: cluster))
                let instance = try await node.query(statements.serverInstance).singleRow().string(0)
                let pid = try await node.query("SELECT pg_backend_pid()").singleRow().string(0)
                // One session plays both of the node's (main and witness) here.
                let nodeID = try await node.run { connection in
                    try connection.transaction {
                        let id = try connection.execute(
                            statements.insertNode,
                            [String(cluster), "node-a", "host-a", "4242", #"{"zone": "a"}"#, pid, nil, "5000"]
                        ).singleRow()
                        #expect(try id.string(1) == instance)
                        let nodeID = try id.int(0)
                        #expect(try connection.execute(statements.lockNode, [String(nodeID)]).singleRow().bool(0))
                        return nodeID
                    }
                }
                // The heartbeat, with a try of the schema's sweeper token: taken.
                let heartbeat = try await node.query(statements.heartbeat, [String(nodeID), "true"])
                    .singleRow()
                #expect(try heartbeat.int(0) == 1)
                #expect(try heartbeat.bool(1), "the sweeper token")
                #expect(try await node.query(ProtocolStatements.deadlockTimeoutQuery).singleRow().int(0) > 0)
                _ = try await node.query(statements.warmUp)
                #expect(try await node.query(statements.members, [String(cluster)]).rows.count == 1)

                let election = try await node.run {
                    try statements.ensureElection(cluster: cluster, name: "importer", on: $0)
                }
                let taken = try await node.query(statements.tryTake, ["{\(election)}", String(nodeID), "node-a"])
                    .singleRow()
                #expect(try taken.int(0) == election)
                #expect(try taken.int(1) == 1)
                #expect(try taken.bool(2), "no predecessor: leadership begins with the bump")
                // The evidence wait's statements (a predecessor whose node lock is free: granted at once).
                #expect(
                    try await node.query(
                        statements.awaitPredecessor, ["999999", "10", String(election), "1", String(nodeID), "node-a"]
                    ).singleRow().optionalBool(0) == true)
                #expect(
                    try await node.query(statements.beginTerm, [String(election), "1", String(nodeID), "node-a"])
                        .singleRow().bool(0))
                #expect(try await node.query(statements.acknowledged, ["999999"]).singleRow().bool(0) == false)
                let leader = try await node.query(statements.whereis, [String(cluster), "importer"]).singleRow()
                #expect(try leader.int(0) == 1)
                #expect(try leader.int(1) == nodeID)
                #expect(try await node.query(statements.fence, ["billing", "importer", "1"]).singleRow().int(0) == 1)

                // Graceful release, in one statement.
                let released = try await node.query(statements.handOver, [String(election), String(nodeID)])
                    .singleRow().bool(0)
                #expect(released)
                await expectFenceRefused(node, statements, term: 1)
                #expect(try await node.query(statements.whereis, [String(cluster), "importer"]).rows.isEmpty)

                // The follower's other ways in, each followed by a hand-over: the queue wait with the heartbeat and the
                // bump in one statement, the batched try with the bump, the heartbeat with the try (then the bump).
                let waited = try await node.query(
                    statements.waitAndTake, [String(nodeID), String(election), "100", "node-a", "true", "{}"]
                ).singleRow()
                #expect(try waited.int(0) == 1)
                #expect(try waited.int(1) == election)
                #expect(try waited.bool(2))
                #expect(try waited.int(3) == 2)
                #expect(try waited.bool(4))
                try await handOver(node, statements, election: election, node: nodeID)
                let tried = try await node.query(statements.tryTake, ["{\(election)}", String(nodeID), "node-a"])
                    .singleRow()
                #expect(try tried.int(0) == election)
                #expect(try tried.int(1) == 3)
                #expect(try tried.bool(2))
                try await handOver(node, statements, election: election, node: nodeID)
                let beat = try await node.query(
                    statements.heartbeatAndTry, [String(nodeID), "{\(election)}", "true", "false"]
                ).singleRow()
                #expect(try beat.int(0) == 1)
                #expect(try beat.string(1) == "{\(election)}")
                #expect(try beat.int(2) == election, "the waiter token of the election")
                #expect(try await node.query(statements.releaseWaiter, [String(election)]).singleRow().bool(0))
                #expect(try await node.query(statements.claimWaiter, ["{\(election)}"]).singleRow().int(0) == election)
                #expect(try await node.query(statements.releaseWaiter, [String(election)]).singleRow().bool(0))
                let bumped = try await node.query(statements.takeTerm, [String(election), String(nodeID), "node-a"])
                #expect(try bumped.singleRow().int(0) == 4)
                try await handOver(node, statements, election: election, node: nodeID)

                // A trigger: sent (the node's role may send too), read by the leader, deleted once handled.
                let sent = try await node.query(statements.sendTrigger, ["billing", "importer", "now"])
                #expect(try sent.singleRow().int(0) == 1)
                let read = try await node.query(statements.readTriggers, [String(election), "0", "100"])
                #expect(read.rows.count == 1)
                #expect(try read.singleRow().string(1) == "now")
                _ = try await node.query(statements.deleteTriggers, [String(election), "{1}"])
                #expect(try await node.query(statements.readTriggers, [String(election), "0", "100"]).rows.isEmpty)

                // A second node dies without a goodbye; the sweep removes it and node_down is sent.
                let otherPID = try await withSession(appConnection) { other in
                    try await other.run { connection in
                        try connection.transaction {
                            let id = try connection.execute(
                                statements.insertNode,
                                [String(cluster), "node-b", "host-b", "4343", "{}", "0", String(nodeID), "5000"]
                            ).singleRow().int(0)
                            #expect(try connection.execute(statements.lockNode, [String(id)]).singleRow().bool(0))
                        }
                    }
                    let pid = try await other.query("SELECT pg_backend_pid()").singleRow().int(0)
                    try await database.admin("SELECT pg_terminate_backend(\(pid), 10000)")
                    return pid
                }
                #expect(otherPID > 0)
                #expect(try await node.query(statements.sweep).singleRow().int(0) == 1)
                #expect(try await node.query(statements.sweep).singleRow().int(0) == 0)
                #expect(try await node.query(statements.leave, [String(nodeID)]).singleRow().bool(0))

                var events: [String] = []
                var downs: [String] = []
                for await notification in node.notifications {
                    events.append(Self.event(in: notification.payload))
                    if events.last == "node_down" { downs.append(notification.payload) }
                    if events.count == 15 { break }
                }
                // Swept: died; left: left — each once.
                #expect(downs.count == 2)
                #expect(downs.first?.contains(#""name" : "node-b", "reason" : "died""#) == true, "\(downs)")
                #expect(downs.last?.contains(#""name" : "node-a", "reason" : "left""#) == true, "\(downs)")
                // Own changes are delivered to the listener too, after each commit, in commit order: a leadership
                // begins three times above (take_term, await_predecessor, begin_term), each a `leader`, then three
                // more times, each handed over.
                #expect(
                    events == [
                        "node_up", "leader", "leader", "leader", "released", "leader", "released", "leader", "released",
                        "leader", "released", "trigger", "node_up", "node_down", "node_down",
                    ])
            }

            // A role that only sends triggers (a web handler) needs USAGE and EXECUTE on send_trigger, nothing else.
            let sender = try await database.createRole(prefix: "stk_sender", password: "sender-pw-1")
            let senderConnection = database.tcpConninfo(user: sender, password: "sender-pw-1")
            let refused = await #expect(throws: StokerError.self) {
                try await StokerCluster.trigger(
                    election: "importer", payload: "x", cluster: "billing", connection: senderConnection)
            }
            #expect(refused?.sqlState == "42501", "without the grants: \(String(describing: refused))")
            try await database.admin(
                """
                GRANT USAGE ON SCHEMA stoker TO \(sender);
                GRANT EXECUTE ON FUNCTION stoker.send_trigger(text, text, text) TO \(sender);
                """)
            let number = try await StokerCluster.trigger(
                election: "importer", payload: "from a handler", cluster: "billing", connection: senderConnection)
            #expect(number == 2)
            // It cannot read them, nor anything else of the schema.
            try await withSession(senderConnection) { session in
                let denied = await #expect(throws: StokerError.self) {
                    _ = try await session.query("SELECT count(*) FROM stoker.triggers")
                }
                #expect(denied?.sqlState == "42501")
            }
        }
    }

    private func handOver(
        _ session: PostgresSession, _ statements: ProtocolStatements, election: Int, node: Int
    ) async throws {
        let row = try await session.query(statements.handOver, [String(election), String(node)]).singleRow()
        #expect(try row.bool(0), "the hand-over released a lock this session held")
    }

    /// Which grants the node's role holds.
    enum Grants: String, CaseIterable, CustomTestStringConvertible {
        /// What `StokerSchema.grant` gives today.
        case current
        /// What it gave for migration 001 alone: a deployment that migrated on without granting again keeps working
        /// (the functions of later migrations keep PostgreSQL's default EXECUTE for PUBLIC).
        case firstRelease
        var testDescription: String { rawValue }
    }

    @Test("nodes running as that role (migrate: false) elect a leader, hand over and leave", arguments: Grants.allCases)
    func nodesAsNodeRole(_ grants: Grants) async throws {
        try await withTestDatabase { database in
            let owner = try await database.createRole(prefix: "stk_owner", password: "owner-pw-2")
            let app = try await database.createRole(prefix: "stk_app", password: "app-pw-2")
            try await database.admin("GRANT CREATE ON DATABASE \(database.name) TO \(owner)")
            let ownerConnection = database.tcpConninfo(user: owner, password: "owner-pw-2")
            let appConnection = database.tcpConninfo(user: app, password: "app-pw-2")
            try await StokerSchema.migrate(connection: ownerConnection)
            switch grants {
            case .current:
                try await StokerSchema.grant(to: app, connection: ownerConnection)
            case .firstRelease:
                try await withSession(ownerConnection) { session in
                    for statement in [
                        "GRANT USAGE ON SCHEMA stoker TO \(app)", "GRANT SELECT ON stoker.migrations TO \(app)",
                        "GRANT SELECT, INSERT ON stoker.clusters TO \(app)",
                        "GRANT SELECT, INSERT, UPDATE, DELETE ON stoker.nodes TO \(app)",
                        "GRANT SELECT, INSERT, UPDATE ON stoker.elections TO \(app)",
                        "GRANT EXECUTE ON FUNCTION stoker.fence(text, text, bigint) TO \(app)",
                    ] {
                        _ = try await session.query(statement)
                    }
                }
            }
            let history = History()
            try await withNodes { nodes in
                let all = try ["a", "b"].map { name in
                    nodes.add(
                        try TestNode(name, database: database, elections: ["e"], history: history) { configuration in
                            configuration.connection = appConnection
                            configuration.migrate = false
                        })
                }
                try await history.wait("one leads") { History.leaders($0, election: "e").count == 1 }
                let leader = try #require(all.first { History.leaders(history.entries, election: "e") == [$0.name] })
                let other = try #require(all.first { $0 !== leader })
                try await leader.stop()
                try await history.wait("the other leads") { History.leaders($0, election: "e") == [other.name] }
                #expect(try await whereis("e", in: database)?.member.name == other.name)
                try await other.stop()
                #expect(try await whereis("e", in: database) == nil)
                history.check(complete: true)
            }
        }
    }

    private func expectFenceRefused(
        _ session: PostgresSession,
        _ statements: ProtocolStatements,
        term: Int,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async {
        do {
            try await session.query(statements.fence, ["billing", "importer", String(term)])
            Issue.record("the fence let a stale term through", sourceLocation: sourceLocation)
        } catch let error as StokerError {
            #expect(error.sqlState == ProtocolStatements.staleTermSQLState, sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(error)", sourceLocation: sourceLocation)
        }
    }

    static func event(in payload: String) -> String {
        // {"event" : "node_up", ...}: the first quoted value.
        let parts = payload.split(separator: "\"")
        return parts.count > 3 ? String(parts[3]) : payload
    }
}
