import Foundation
import Stoker
import StokerHarness
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Membership, judged as `stoker node` prints it: every death and every leave reaches the leader of every election as
/// exactly one `node_down` (with its reason), every join as one `node_up`, and a new leader starts from the member
/// list as it was when it began.
@Suite("Membership (real processes)", .serialized, .timeLimit(.minutes(3)))
struct MembershipTests {
    enum Departure: String, CaseIterable, CustomTestStringConvertible {
        /// SIGKILL: the process is gone; a sweep finds its node lock free.
        case kill
        /// SIGSTOP past the lease: the server ends both sessions; on SIGCONT it joins again as a new incarnation.
        case freeze
        /// `pg_terminate_backend` of its witness alone: its node lock is gone, so it is gone; it joins again.
        case witnessKill
        /// SIGTERM: a graceful leave.
        case terminate
        var testDescription: String { rawValue }
    }

    /// One `cluster_change` line of a leader: the change, and whom it is about.
    struct Change: Sendable, Hashable, CustomStringConvertible {
        let election: String
        let change: String
        let member: String
        let incarnation: Int
        let reason: String?
        var description: String { "\(election) \(change) \(member)#\(incarnation) \(reason ?? "")" }

        init?(_ line: ParticipantLine) {
            guard line.event == "cluster_change", let object = Self.object(line.raw),
                let change = object["change"] as? String, let member = object["member"] as? String,
                let incarnation = (object["member_incarnation"] as? NSNumber)?.intValue
            else { return nil }
            election = line.election
            self.change = change
            self.member = member
            self.incarnation = incarnation
            reason = line.reason
        }

        static func object(_ raw: String) -> [String: Any]? {
            raw.data(using: .utf8).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
        }
    }

    /// The incarnation of node `name` in `cluster` now (its row), or nil.
    static func incarnation(of name: String, cluster: String, in database: TestDatabase) async throws -> Int? {
        let rows = try await database.admin(
            """
            SELECT n.id FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id
             WHERE c.name = '\(cluster)' AND n.name = '\(name)' ORDER BY n.id DESC LIMIT 1
            """)
        return rows.first?.first.flatMap { $0 }.flatMap { Int($0) }
    }

    @Test(
        "a follower dies, freezes, loses its witness or leaves: one node_down at the leader of each election",
        arguments: Departure.allCases)
    func departure(_ departure: Departure) async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                let elections = ["e1", "e2"]
                // The leader first, alone, so it leads both; a short lease for the follower that freezes.
                let leader = try await group.start("a", elections: elections)
                for election in elections { try await group.waitForCluster(election: election, size: 1) }
                let follower = try await group.start("b", elections: elections, lease: "2s")
                try await group.start("c", elections: elections)
                try await waitForMembers(3, cluster: group.cluster, in: database)
                let old = try #require(try await Self.incarnation(of: "b", cluster: group.cluster, in: database))
                // The leader has heard of b in both elections (node_up) before anything happens to it.
                for election in elections {
                    _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                        Change(line).map { $0.election == election && $0.member == "b" && $0.change == "node_up" }
                            ?? false
                    }
                }
                let expectedReason: String
                switch departure {
                case .kill:
                    group.markKilled("b", at: monotonicSeconds())
                    _ = follower.process.signal(SIGKILL)
                    expectedReason = "died"
                case .freeze:
                    _ = follower.process.signal(SIGSTOP)
                    expectedReason = "died"
                case .witnessKill:
                    let rows = try await database.admin("SELECT witness_pid FROM stoker.nodes WHERE id = \(old)")
                    let witness = try #require(rows.first?.first.flatMap { $0 })
                    _ = try await database.admin("SELECT pg_terminate_backend(\(witness))")
                    expectedReason = "died"
                case .terminate:
                    _ = follower.process.signal(SIGTERM)
                    expectedReason = "left"
                }
                // The leader hears of b's old incarnation leaving, in each election.
                for election in elections {
                    _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                        Change(line).map {
                            $0.election == election && $0.change == "node_down" && $0.incarnation == old
                        } ?? false
                    }
                }
                if departure == .freeze { _ = follower.process.signal(SIGCONT) }
                if departure == .freeze || departure == .witnessKill {
                    // It comes back as a new incarnation: node_up of it, in each election.
                    for election in elections {
                        _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                            Change(line).map {
                                $0.election == election && $0.change == "node_up" && $0.member == "b"
                                    && $0.incarnation != old
                            } ?? false
                        }
                    }
                }
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
                let changes = history.lines.filter { $0.process == "a" }.compactMap(Change.init)
                for election in elections {
                    let downs = changes.filter {
                        $0.election == election && $0.change == "node_down" && $0.incarnation == old
                    }
                    #expect(downs.count == 1, "\(election): \(downs) \(history.dump())")
                    #expect(downs.first?.reason == expectedReason, "\(history.dump())")
                    // No change twice, of any member: each incarnation joins once and leaves at most once.
                    let mine = changes.filter { $0.election == election }
                    #expect(Set(mine).count == mine.count, "a change delivered twice: \(mine)")
                }
            }
        }
    }

    @Test("5 nodes, all sweeping; two followers killed at once: one node_down each at every leader, no duplicate")
    func twoKilledAmongFive() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                let elections = ["e1", "e2", "e3"]
                let leader = try await group.start("a", elections: elections)
                for election in elections { try await group.waitForCluster(election: election, size: 1) }
                for name in ["b", "c", "d", "e"] { try await group.start(name, elections: elections) }
                try await waitForMembers(5, cluster: group.cluster, in: database)
                var victims: [String: Int] = [:]
                for name in ["c", "e"] {
                    let incarnation = try await Self.incarnation(of: name, cluster: group.cluster, in: database)
                    let id: Int = try #require(incarnation)
                    victims[name] = id
                }
                for election in elections {
                    for name in ["b", "c", "d", "e"] {
                        _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                            Change(line).map { $0.election == election && $0.member == name && $0.change == "node_up" }
                                ?? false
                        }
                    }
                }
                let now = monotonicSeconds()
                for participant in group.all where victims[participant.name] != nil {
                    group.markKilled(participant.name, at: now)
                    _ = participant.process.signal(SIGKILL)
                }
                for election in elections {
                    for (_, incarnation) in victims {
                        _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                            Change(line).map {
                                $0.election == election && $0.change == "node_down" && $0.incarnation == incarnation
                            } ?? false
                        }
                    }
                }
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
                let changes = history.lines.filter { $0.process == "a" }.compactMap(Change.init)
                for election in elections {
                    for (name, incarnation) in victims {
                        let downs = changes.filter {
                            $0.election == election && $0.change == "node_down" && $0.incarnation == incarnation
                        }
                        #expect(downs.count == 1, "\(name) in \(election): \(downs)")
                        #expect(downs.allSatisfy { $0.reason == "died" })
                    }
                }
                // The sweep left the table as the cluster is: no row of a dead node.
                let rows = try await database.admin(
                    """
                    SELECT count(*) FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id
                     WHERE c.name = '\(group.cluster)'
                    """)
                #expect(rows.first?.first.flatMap { $0 } == "0", "every node stopped or swept")
            }
        }
    }

    @Test("the cluster view, from a process with no node: after a kill it lists only live members and leaders")
    func view() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                let elections = ["e1", "e2"]
                for name in ["a", "b", "c"] { try await group.start(name, elections: elections) }
                for election in elections { try await group.waitForCluster(election: election, size: 3) }
                let before = try await StokerCluster.snapshot(cluster: group.cluster, connection: database.conninfo)
                #expect(Set(before.members.map(\.member.name)) == ["a", "b", "c"])
                #expect(before.elections.map(\.name) == elections)
                // Kill whoever leads e1: its row may stay until a sweep, but the view never lists it again.
                let leaderName = try #require(before.elections.first?.leader?.name)
                let victim = try #require(group.all.first { $0.name == leaderName })
                let dead = try #require(before.members.first { $0.member.name == leaderName }?.member)
                let killed = monotonicSeconds()
                group.markKilled(leaderName, at: killed)
                _ = victim.process.signal(SIGKILL)
                _ = await victim.process.close()
                // Once a survivor has printed now_leader for each election the victim led — it began on evidence that
                // the victim's witness was gone, so its node lock is free — every election has a leader again: each
                // is a live member, whereis names the same one, and the victim is listed no more (its row may stay
                // until a sweep). Right after the kill the view may still list it: its backends have not yet seen
                // their client go, and its lock is still held.
                let survivors = group.all.filter { $0.name != leaderName }
                for election in before.elections where election.leader?.name == leaderName {
                    _ = try await group.firstLine(among: survivors, timeout: .seconds(60)) { line in
                        line.event == "now_leader" && line.election == election.name && line.at > killed
                    }
                }
                let after = try await StokerCluster.snapshot(cluster: group.cluster, connection: database.conninfo)
                #expect(!after.members.contains { $0.member == dead }, "\(after.members)")
                let live = Set(after.members.map(\.member))
                for election in after.elections {
                    let leader = try #require(election.leader, "\(election.name) has no leader: \(after)")
                    #expect(live.contains(leader))
                    #expect(after.members.first { $0.member == leader }?.leads.contains(election.name) == true)
                    let named = try await StokerNode.whereis(
                        election: election.name, cluster: group.cluster, connection: database.conninfo)
                    #expect(named?.member == leader, "whereis and the view disagree on \(election.name)")
                    #expect(named?.term == election.term)
                }
                try await group.stopAll()
                #expect(group.history().problems(complete: true) == [])
            }
        }
    }

    @Test("a new leader after its predecessor was killed starts from the member list, then gets each change once")
    func newLeaderMembers() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                let leader = try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                for name in ["b", "c"] { try await group.start(name, elections: ["e"]) }
                try await waitForMembers(3, cluster: group.cluster, in: database)
                group.markKilled("a", at: monotonicSeconds())
                _ = leader.process.signal(SIGKILL)
                let (successor, began) = try await group.firstLine(
                    among: group.all.filter { $0.name != "a" }, timeout: .seconds(60)
                ) { $0.event == "now_leader" }
                // Its list at nowLeader, then every change it got after, in order, make the cluster as it is once
                // the dead leader is swept: b and c. No change repeats what the list already said.
                _ = try await group.firstLine(among: [successor], timeout: .seconds(60)) { line in
                    Change(line).map { $0.change == "node_down" && $0.member == "a" } ?? false
                }
                let listed = try #require(Change.object(began.raw)?["members"] as? [String])
                var members = Set(listed)
                #expect(members.contains { $0.hasPrefix("\(successor.name)#") }, "it lists itself: \(listed)")
                let history = group.history()
                let after = history.lines.filter { $0.process == successor.name && $0.at >= began.at }
                for change in after.compactMap(Change.init) {
                    let member = "\(change.member)#\(change.incarnation)"
                    if change.change == "node_up" {
                        #expect(members.insert(member).inserted, "node_up of a listed member: \(member)")
                    } else {
                        #expect(members.remove(member) != nil, "node_down of an unlisted member: \(member)")
                    }
                }
                #expect(Set(members.map { String($0.prefix { $0 != "#" }) }) == ["b", "c"], "\(history.dump())")
                try await group.stopAll()
                let final = group.history()
                #expect(final.problems(complete: true) == [], "\(final.dump())")
            }
        }
    }
}
