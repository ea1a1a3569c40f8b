import StokerHarness
import Testing

@_spi(Testing) @testable import Stoker

/// Parity with the Elixir library `stoker`: its own tests (l3nz/stoker), against real PostgreSQL — what a behaviour
/// sees on one and two nodes.
@Suite("Parity with the Elixir library stoker")
struct ElixirParityTests {
    @Test("a lone node's behaviour sees [nowLeader], then shutdown appended")
    func loneNode() async throws {
        try await withTestDatabase { database in
            let history = History()
            let node = try TestNode(
                "a", database: database, elections: ["e"], history: history, configure: TestNode.steady)
            try await history.wait("a leads") { History.count($0, .nowLeader) == 1 }
            let snapshot = node.activators[0].dump()
            #expect(snapshot.role == .leader)
            #expect(snapshot.leader == "a")
            #expect(snapshot.term != nil)
            try await node.stop()
            let events = history.entries.map(\.event)
            #expect(events.count == 2, "events were \(events)")
            guard case .nowLeader(let term) = events.first, case .shutdown(.gracefulShutdown) = events.last else {
                Issue.record("events were \(events)")
                return
            }
            #expect(term >= 1)
            #expect(node.activators[0].dump().behaviourState == events)
            #expect(node.activators[0].dump().role == .stopped)
            history.check(complete: true)
            // Released on the way out: nobody holds it any more.
            #expect(try await whereis("e", in: database) == nil)
            #expect(try await lockHolders("e", in: database) == 0)
        }
    }

    @Test("two nodes: stopping the leader's node moves leadership to the other")
    func stopLeader() async throws {
        try await withTestDatabase { database in
            let history = History()
            try await withNodes { nodes in
                let a = nodes.add(
                    try TestNode(
                        "a", database: database, elections: ["e"], history: history, configure: TestNode.steady))
                let b = nodes.add(
                    try TestNode(
                        "b", database: database, elections: ["e"], history: history, configure: TestNode.steady))
                try await history.wait("one leads") { History.count($0, .nowLeader) == 1 }
                let first = try #require(History.leaders(history.entries, election: "e").first)
                let (leader, other) = first == "a" ? (a, b) : (b, a)
                try await leader.stop()
                try await history.wait("the other leads") { History.leaders($0, election: "e") == [other.name] }
                // Membership events aside (the other node may have joined after the leader was elected), the leader
                // saw exactly [nowLeader, shutdown].
                let leaderEvents = history.entries.filter { $0.node == leader.name && $0.kind != .clusterChange }
                #expect(leaderEvents.map(\.kind) == [.nowLeader, .shutdown])
                #expect(try await whereis("e", in: database)?.member.name == other.name)
                try await other.stop()
                history.check(complete: true)
            }
        }
    }

    @Test("two nodes: stopping the other node leaves the leader with [nowLeader, clusterChange]")
    func stopFollower() async throws {
        try await withTestDatabase { database in
            let history = History()
            try await withNodes { nodes in
                // Both nodes join before either stands for the election, so the leader's first membership event
                // is the follower leaving (in the Elixir library's tests the nodes were connected before the
                // activators started).
                let a = nodes.add(
                    try TestNode("a", database: database, elections: [], history: history, configure: TestNode.steady))
                let b = nodes.add(
                    try TestNode("b", database: database, elections: [], history: history, configure: TestNode.steady))
                try await waitForMembers(2, in: database)
                let activators = try [a, b].map { node in
                    try Activator(election: "e", node: node.node, behaviour: RecordingBehaviour(history: history))
                }
                let runs = activators.map { activator in Task { try await activator.run() } }
                try await history.wait("one leads") { History.count($0, .nowLeader) == 1 }
                let leaderName = try #require(History.leaders(history.entries, election: "e").first)
                let (leader, other) = leaderName == "a" ? (a, b) : (b, a)
                // Stop the other node: its graceful stop asks its activator to hand over first, then leaves.
                try await other.stop()
                try await history.wait("the leader sees the other leave") {
                    History.count($0, .clusterChange, node: leaderName) == 1
                }
                let events = history.entries.filter { $0.node == leaderName }.map(\.event)
                #expect(events.count == 2)
                guard case .nowLeader = events.first,
                    case .clusterChange(.nodeDown(let member, let reason)) = events.last
                else {
                    Issue.record("the leader saw \(events)")
                    return
                }
                #expect(member.name == other.name)
                #expect(reason == .left)
                // The leader's node stops too: it asks its activator to hand over; both activators' runs end.
                try await leader.stop()
                for run in runs { try await run.value }
                history.check(complete: true)
            }
        }
    }

    @Test("a 20 ms nextTimer produces timer events, on the leader and on the follower")
    func timers() async throws {
        try await withTestDatabase { database in
            let history = History()
            try await withNodes { nodes in
                let a = nodes.add(
                    try TestNode(
                        "a", database: database, elections: ["e"], history: history, timer: .milliseconds(20),
                        configure: TestNode.steady))
                let b = nodes.add(
                    try TestNode(
                        "b", database: database, elections: ["e"], history: history, timer: .milliseconds(20),
                        configure: TestNode.steady))
                try await history.wait("one node leads and both get timers") { entries in
                    History.count(entries, .nowLeader) == 1
                        && History.count(entries, .timer, node: "a") >= 5
                        && History.count(entries, .timer, node: "b") >= 5
                }
                #expect(History.count(history.entries, .nowLeader) == 1)
                try await a.stop()
                try await b.stop()
                history.check(complete: true)
            }
        }
    }
}

/// Waits (event-free: the nodes table has no history entry) until `count` nodes are members of the cluster.
func waitForMembers(_ count: Int, cluster: String = "test", in database: TestDatabase) async throws {
    for _ in 0..<3000 {
        let rows = try? await database.admin(
            "SELECT count(*) FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id WHERE c.name = '\(cluster)'"
        )
        if rows?.first?.first == "\(count)" { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("the cluster never had \(count) members")
    throw History.TimedOut(what: "\(count) members")
}
