import Foundation
import Stoker
import StokerHarness
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `stoker status`, `watch` and `trigger`, run as an operator would, against real `stoker node` processes.
@Suite("stoker status, watch, trigger (real processes)", .serialized, .timeLimit(.minutes(3)))
struct ClusterCommandTests {
    static let secret = "cmd-Secret-9"

    static func run(_ arguments: [String]) async throws -> ProcessResult {
        try await runProcess(
            [try builtExecutable("stoker")] + arguments, environment: ["PATH": "/usr/bin:/bin", "LANG": "C"],
            timeout: .seconds(60))
    }

    static func status(_ group: Participants, json: Bool = true) async throws -> (Int32, [String: Any]) {
        let result = try await run(
            ["status", "--url", group.database.conninfo, "--cluster", group.cluster] + (json ? ["--json"] : []))
        #expect(result.standardError.isEmpty, "\(result.standardError)")
        let object = json ? try #require(Self.object(result.standardOutput)) : ["text": result.standardOutput]
        return (result.status, object)
    }

    static func object(_ text: String) -> [String: Any]? {
        text.data(using: .utf8).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
    }

    static func names(_ list: Any?) -> Set<String> {
        Set((list as? [[String: Any]] ?? []).compactMap { $0["name"] as? String })
    }

    /// The backend pid holding the schema's sweeper token, if any.
    static func sweeper(in database: TestDatabase) async throws -> String? {
        try await database.admin(
            """
            SELECT l.pid::text FROM pg_locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.classid = 'stoker'::regnamespace::oid AND l.objid = (-2147483648)::oid
            """
        ).first?.first.flatMap { $0 }
    }

    @Test("status: healthy, then degraded while a dead follower's row waits for the sweep, healthy again after it")
    func status() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                // Sweeping once a minute (the longest allowed): within the test, a's first sweep — at once, when it
                // takes the sweeper token — and a lock-queue grant (a leader's death) are the only sweeps.
                let slow = ["--sweep-interval", "1m"]
                let leader = try await group.start("a", elections: ["e1", "e2"], options: slow)
                for election in ["e1", "e2"] { try await group.waitForCluster(election: election, size: 1) }
                // a holds the sweeper token (and has swept at once) before the others join.
                let backend = try await database.admin(
                    "SELECT backend_pid::text FROM stoker.nodes WHERE name = 'a' AND cluster_id = "
                        + "(SELECT id FROM stoker.clusters WHERE name = '\(group.cluster)')")
                let aBackend = try #require(backend.first?.first.flatMap { $0 })
                try await waitUntil("a holds the sweeper token") { try await Self.sweeper(in: database) == aBackend }
                for name in ["b", "c"] { try await group.start(name, elections: ["e1", "e2"], options: slow) }
                try await waitForMembers(3, cluster: group.cluster, in: database)

                let (healthy, first) = try await Self.status(group)
                #expect(healthy == 0, "\(first)")
                #expect(first["health"] as? String == "healthy")
                #expect(Self.names(first["members"]) == ["a", "b", "c"])
                let elections = first["elections"] as? [[String: Any]] ?? []
                #expect(elections.map { ($0["leader"] as? [String: Any])?["name"] as? String } == ["a", "a"])
                let (_, text) = try await Self.status(group, json: false)
                #expect((text["text"] as? String)?.contains("cluster \(group.cluster): healthy") == true, "\(text)")

                // A follower dies; nobody sweeps for a minute: degraded, and the dead one is flagged, not listed.
                let victim = try #require(group.all.first { $0.name == "c" })
                group.markKilled("c", at: monotonicSeconds())
                _ = victim.process.signal(SIGKILL)
                _ = await victim.process.close()
                try await waitUntil("c's node lock is gone") {
                    try await Self.status(group).1["unswept"].map { Self.names($0) } == ["c"]
                }
                let (degraded, second) = try await Self.status(group)
                #expect(degraded == 2, "\(second)")
                #expect(second["health"] as? String == "degraded")
                #expect(Self.names(second["members"]) == ["a", "b"])
                #expect((second["problems"] as? [String])?.contains { $0.contains("c#") } == true, "\(second)")

                // The leader dies: its successor's grant sweeps both rows; once it leads both elections, healthy.
                let killed = monotonicSeconds()
                group.markKilled("a", at: killed)
                _ = leader.process.signal(SIGKILL)
                _ = await leader.process.close()
                for election in ["e1", "e2"] {
                    _ = try await group.firstLine(among: group.all.filter { $0.name == "b" }, timeout: .seconds(60)) {
                        $0.event == "now_leader" && $0.election == election && $0.at > killed
                    }
                }
                try await waitUntil("the successor swept both dead rows") {
                    try await Self.status(group).0 == 0
                }
                let (_, last) = try await Self.status(group)
                #expect(Self.names(last["members"]) == ["b"])
                #expect(Self.names(last["unswept"]).isEmpty)
                try await group.stopAll()
                #expect(group.history().problems(complete: true) == [])

                // No node left: no election has a leader.
                let (noLeader, empty) = try await Self.status(group)
                #expect(noLeader == 3, "\(empty)")
                #expect(empty["health"] as? String == "no_leader")
            }
        }
    }

    @Test("watch prints joins, the leader and a node-down; trigger reaches the leader's output and the watch")
    func watchAndTrigger() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                // The cluster exists (its first node created it) and is led before anything watches it.
                let leader = try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                let watch = try await NodeProcess.start(
                    [
                        try builtExecutable("stoker"), "watch", "--json", "--url", database.conninfo, "--cluster",
                        group.cluster,
                    ], environment: ["PATH": "/usr/bin:/bin", "LANG": "C"])
                defer { _ = watch.kill() }
                func line(_ what: String, _ predicate: @escaping @Sendable ([String: Any]) -> Bool) async throws {
                    do {
                        _ = try await watch.waitForLine(from: 0, timeout: .seconds(60)) { line in
                            Self.object(line.text).map(predicate) ?? false
                        }
                    } catch {
                        Issue.record("watch never printed \(what): \(watch.lines.map(\.text)) \(watch.standardError)")
                        throw error
                    }
                }
                try await line("a snapshot with a leading e") { object in
                    let cluster = object["cluster"] as? [String: Any]
                    let elections = cluster?["elections"] as? [[String: Any]] ?? []
                    return object["event"] as? String == "snapshot"
                        && elections.contains { ($0["leader"] as? [String: Any])?["name"] as? String == "a" }
                }
                let follower = try await group.start("b", elections: ["e"])
                try await line("node_up b") { $0["event"] as? String == "node_up" && $0["member"] as? String == "b" }

                let sent = try await Self.run(
                    ["trigger", "--url", database.conninfo, "--cluster", group.cluster, "e", "wake up"])
                #expect(sent.status == 0, "\(sent.standardError)")
                #expect(sent.standardOutput == "trigger 1 sent to election e of cluster \(group.cluster)\n")
                _ = try await group.firstLine(among: [leader], timeout: .seconds(60)) { line in
                    line.event == "trigger" && line.raw.contains(#""payload":"wake up""#)
                }
                try await line("the trigger") { $0["event"] as? String == "trigger" && $0["sequence"] as? Int == 1 }

                group.markKilled("b", at: monotonicSeconds())
                _ = follower.process.signal(SIGKILL)
                try await line("node_down b (died)") {
                    $0["event"] as? String == "node_down" && $0["member"] as? String == "b"
                        && $0["reason"] as? String == "died"
                }
                // Ctrl-C ends the watch cleanly.
                _ = watch.signal(SIGINT)
                #expect(try await watch.waitForExit(timeout: .seconds(30)) == 0, "\(watch.standardError)")
                let downs = watch.lines.filter { Self.object($0.text)?["event"] as? String == "node_down" }
                #expect(downs.count == 1, "\(downs.map(\.text))")
                try await group.stopAll()
            }
        }
    }

    @Test("errors: one line on stderr, a non-zero exit, never a password")
    func errors() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                let bad = "postgresql://someone:\(Self.secret)@127.0.0.1:1/nowhere?connect_timeout=2"
                let attempts: [[String]] = [
                    ["status", "--url", bad, "--cluster", group.cluster],
                    ["watch", "--url", bad, "--cluster", group.cluster],
                    ["trigger", "--url", bad, "--cluster", group.cluster, "e"],
                    ["trigger", "--url", database.conninfo, "--cluster", group.cluster, "nope", "x"],
                    [
                        "trigger", "--url", database.conninfo, "--cluster", group.cluster, "e",
                        String(repeating: "x", count: StokerCluster.maximumTriggerPayload + 1),
                    ],
                ]
                for arguments in attempts {
                    let result = try await Self.run(arguments)
                    let label = arguments.prefix(1) + arguments.dropFirst(4).map { String($0.prefix(12)) }
                    #expect(result.status == 1, "\(label): \(result.status)")
                    let lines = result.standardError.split(separator: "\n", omittingEmptySubsequences: false)
                    #expect(lines.count == 2 && lines[1].isEmpty, "\(label): not one line: \(result.standardError)")
                    #expect(!result.standardError.contains(Self.secret), "leaked: \(result.standardError)")
                    #expect(result.standardOutput.isEmpty, "\(label): \(result.standardOutput)")
                }
                try await group.stopAll()
            }
        }
    }
}
