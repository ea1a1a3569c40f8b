import Foundation
import Stoker
import StokerHarness
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `trigger`, judged as `stoker node` prints it: sent from this test process (which runs no node), a trigger reaches
/// the leader's behaviour — and only the leader's — in order; one sent while every node is stopped waits in the table
/// for the next leader; a payload over the limit is refused before anything is sent.
@Suite("Triggers (real processes)", .serialized, .timeLimit(.minutes(3)))
struct TriggerTests {
    /// One `trigger` line: who printed it, its number and payload.
    struct Received: Sendable, Hashable {
        let process: String
        let sequence: Int64
        let payload: String

        init?(_ line: ParticipantLine) {
            guard line.event == "trigger",
                let object = line.raw.data(using: .utf8).flatMap({
                    try? JSONSerialization.jsonObject(with: $0) as? [String: Any]
                }),
                let sequence = (object["sequence"] as? NSNumber)?.int64Value, let payload = object["payload"] as? String
            else { return nil }
            process = line.process
            self.sequence = sequence
            self.payload = payload
        }
    }

    /// The triggers of `cluster` still in the table (not yet handled).
    static func pending(cluster: String, in database: TestDatabase) async throws -> Int {
        let rows = try await database.admin(
            """
            SELECT count(*) FROM stoker.triggers t
              JOIN stoker.elections e ON e.id = t.election_id JOIN stoker.clusters c ON c.id = e.cluster_id
             WHERE c.name = '\(cluster)'
            """)
        return Int(rows.first?.first.flatMap { $0 } ?? "") ?? -1
    }

    /// The leaders' `trigger` lines, in the order printed, and the processes that printed `now_leader`.
    static func received(_ history: LineHistory, election: String) -> [Received] {
        history.lines.filter { $0.election == election }.compactMap(Received.init)
    }

    @Test("a trigger sent by a process that runs no node reaches the leader's behaviour, in order, and only it")
    func reachesTheLeader() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                try await group.start("b", elections: ["e"])
                try await group.start("c", elections: ["e"])
                try await waitForMembers(3, cluster: group.cluster, in: database)
                let payloads = ["one", "two", "{\"json\": \"fine\", \"quote\": \"'\"}", ""]
                var sequences: [Int64] = []
                for payload in payloads {
                    sequences.append(
                        try await StokerCluster.trigger(
                            election: "e", payload: payload, cluster: group.cluster, connection: database.conninfo))
                }
                #expect(sequences == [1, 2, 3, 4])
                let (leader, _) = try await group.firstLine(among: group.all, timeout: .seconds(60)) { line in
                    Received(line)?.sequence == 4
                }
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
                let received = Self.received(history, election: "e")
                // Nothing failed over: each exactly once, in order, at the one leader.
                #expect(received.map(\.payload) == payloads, "\(history.dump())")
                #expect(received.map(\.sequence) == [1, 2, 3, 4])
                // The one leader while they were sent (stopping them all hands the election over on the way out).
                #expect(Set(received.map(\.process)) == [leader.name], "only the leader gets triggers")
                // Handled, so deleted (also before the leader's graceful leave).
                #expect(try await Self.pending(cluster: group.cluster, in: database) == 0)
            }
        }
    }

    @Test("bursts from four senders at once: every trigger reaches the leader, once, in order, none left waiting")
    func bursts() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                try await group.start("b", elections: ["e"])
                try await waitForMembers(2, cluster: group.cluster, in: database)
                // Each burst's last trigger commits while the leader reads the ones before it: its notification
                // comes with the read's answer, and the leader must read again, not wait for the next burst.
                var sent: Set<Int64> = []
                for burst in 0..<10 {
                    try await withThrowingTaskGroup(of: [Int64].self) { senders in
                        for sender in 0..<4 {
                            senders.addTask {
                                var numbers: [Int64] = []
                                for index in 0..<6 {
                                    numbers.append(
                                        try await StokerCluster.trigger(
                                            election: "e", payload: "\(burst)-\(sender)-\(index)",
                                            cluster: group.cluster, connection: database.conninfo))
                                }
                                return numbers
                            }
                        }
                        for try await numbers in senders { sent.formUnion(numbers) }
                    }
                    let last = try #require(sent.max())
                    _ = try await group.firstLine(among: group.all, timeout: .seconds(60)) { line in
                        Received(line)?.sequence == last
                    }
                }
                #expect(sent.count == 240)
                try await group.stopAll()
                let received = Self.received(group.history(), election: "e")
                #expect(received.map(\.sequence) == sent.sorted(), "each once, in the order sent")
                #expect(try await Self.pending(cluster: group.cluster, in: database) == 0)
            }
        }
    }

    @Test("a trigger sent while every node is stopped reaches the first leader after they start")
    func waitsForTheNextLeader() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                // A first run creates the election; then nobody runs.
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                try await group.stopAll()
                for payload in ["while-down-1", "while-down-2"] {
                    try await StokerCluster.trigger(
                        election: "e", payload: payload, cluster: group.cluster, connection: database.conninfo)
                }
                #expect(try await Self.pending(cluster: group.cluster, in: database) == 2)
                try await group.start("b", elections: ["e"])
                try await group.start("c", elections: ["e"])
                // Both joined (a process signalled before it has trapped SIGTERM would die of it, not stop).
                try await waitForMembers(2, cluster: group.cluster, in: database)
                let (first, _) = try await group.firstLine(among: group.all, timeout: .seconds(60)) { line in
                    line.event == "now_leader" && line.process != "a"
                }
                _ = try await group.firstLine(among: [first], timeout: .seconds(60)) { line in
                    Received(line)?.payload == "while-down-2"
                }
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
                let received = Self.received(history, election: "e")
                #expect(received.map(\.payload) == ["while-down-1", "while-down-2"], "\(history.dump())")
                #expect(received.allSatisfy { $0.process == first.name })
                #expect(try await Self.pending(cluster: group.cluster, in: database) == 0)
            }
        }
    }

    @Test("a payload one byte over the limit is a typed error and nothing is sent; an unknown election is named")
    func refused() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                let tooLong = String(repeating: "x", count: StokerCluster.maximumTriggerPayload + 1)
                // Refused before any connection: even a server that does not exist gives the payload's error.
                for connection in [database.conninfo, "host=/nonexistent port=1 connect_timeout=1"] {
                    let error = await #expect(throws: StokerError.self) {
                        try await StokerCluster.trigger(
                            election: "e", payload: tooLong, cluster: group.cluster, connection: connection)
                    }
                    #expect(error?.code == .invalidParameter)
                    #expect(error?.message.contains("\(StokerCluster.maximumTriggerPayload + 1) bytes") == true)
                }
                let nul = await #expect(throws: StokerError.self) {
                    try await StokerCluster.trigger(
                        election: "e", payload: "a\u{0}b", cluster: group.cluster, connection: database.conninfo)
                }
                #expect(nul?.code == .invalidParameter)
                // Nothing was stored, no number was used: the next trigger, at the limit exactly, is number 1.
                #expect(try await Self.pending(cluster: group.cluster, in: database) == 0)
                let atLimit = String(repeating: "é", count: StokerCluster.maximumTriggerPayload / 2)
                let sequence = try await StokerCluster.trigger(
                    election: "e", payload: atLimit, cluster: group.cluster, connection: database.conninfo)
                #expect(sequence == 1)
                _ = try await group.firstLine(among: group.all, timeout: .seconds(60)) { line in
                    Received(line)?.payload == atLimit
                }
                let unknown = await #expect(throws: StokerError.self) {
                    try await StokerCluster.trigger(
                        election: "nope", payload: "x", cluster: group.cluster, connection: database.conninfo)
                }
                #expect(unknown?.code == .unknownElection)
                #expect(unknown?.message.contains("\"nope\"") == true)
                #expect(unknown?.message.contains(group.cluster) == true)
                try await group.stopAll()
                #expect(group.history().problems(complete: true) == [])
            }
        }
    }
}
