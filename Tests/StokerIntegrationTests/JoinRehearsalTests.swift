import Foundation
import StokerHarness
import Testing

@testable import Stoker

/// A joining node rehearses both kinds of takeover on an election row of its own, so its first real one does not pay
/// a fresh server session's first-time costs. The rehearsal must leave no trace anyone could see.
@Suite("The join's takeover rehearsal (real processes)", .timeLimit(.minutes(2)))
struct JoinRehearsalTests {
    @Test("a join leaves no trace of its rehearsal: no election row, no notification but node_up, no lock held")
    func leavesNoTrace() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                // The first node creates the schema and the cluster row, so the channel is known before b joins.
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                let rows = try await database.admin(
                    """
                    SELECT c.id, e.id, 'stoker'::regnamespace::oid::int4 FROM stoker.clusters c
                      JOIN stoker.elections e ON e.cluster_id = c.id WHERE c.name = '\(group.cluster)'
                    """)
                let row = try #require(rows.first)
                let clusterID = try #require(row[0])
                let electionID = try #require(row[1].flatMap { Int($0) })
                let namespace = try #require(row[2])
                try await withSession(database.conninfo) { listener in
                    try await listener.listen("stoker:\(clusterID)")
                    let heard = Task {
                        var payloads: [String] = []
                        for await notification in listener.notifications {
                            payloads.append(notification.payload)
                            if notification.payload.contains("\"node_up\"") { break }
                        }
                        return payloads
                    }
                    try await group.start("b", elections: ["e"])
                    try await waitForMembers(2, cluster: group.cluster, in: database)
                    // b's row is committed, so its node_up is on its way; whatever b's join committed before it (the
                    // rehearsal runs before the row is inserted) would have been delivered first.
                    let payloads = try await withThrowingTaskGroup(of: [String]?.self) { race in
                        race.addTask { await heard.value }
                        race.addTask {
                            try await Task.sleep(for: .seconds(30))
                            return nil
                        }
                        defer { race.cancelAll() }
                        return try await race.next() ?? nil
                    }
                    heard.cancel()
                    let received = try #require(payloads, "b's node_up was not heard within 30 s")
                    #expect(received.count == 1, "notifications before b's node_up: \(received)")
                    #expect(received.last?.contains("\"name\" : \"b\"") == true, "\(received)")
                }
                // No election row but e, in any cluster: the rehearsal's row was never committed.
                let elections = try await database.admin("SELECT name FROM stoker.elections ORDER BY id")
                #expect(elections.map { $0[0] } == ["e"])
                // b's main session holds at most its own tokens: the waiter token of e and the sweeper token — not
                // the rehearsal row's lock or waiter token, nor node 0's lock.
                let held = try await database.admin(
                    """
                    SELECT l.objid::bigint FROM pg_locks l JOIN stoker.nodes n ON n.backend_pid = l.pid
                     WHERE n.name = 'b' AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                       AND l.classid = \(namespace)::oid
                    """)
                let keys = held.compactMap { $0[0].flatMap { Int64($0) } }.map { $0 >= 1 << 31 ? $0 - (1 << 32) : $0 }
                let allowed: Set<Int64> = [-1_073_741_824 - Int64(electionID), -2_147_483_648]
                #expect(Set(keys).isSubset(of: allowed), "b's main session holds advisory locks \(keys)")
                try await group.stopAll()
            }
        }
    }
}
