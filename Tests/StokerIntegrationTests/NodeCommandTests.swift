import Foundation
import StokerHarness
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `stoker node`, judged as a script or an operator meets it: several built executables against the throwaway
/// PostgreSQL, real signals, and nothing but their output lines.
@Suite("stoker node (real processes)", .timeLimit(.minutes(3)))
struct NodeCommandTests {
    static let secret = "node-Cli-pw!9"

    enum Fault: String, CaseIterable, CustomTestStringConvertible {
        /// SIGKILL: the process dies; the server releases its locks.
        case kill
        /// SIGSTOP past the lease, then SIGCONT: it demotes at its lease deadline and says so on resume.
        case freeze
        /// SIGTERM: graceful hand-over, `shutdown`, exit 0.
        case terminate
        /// `pg_terminate_backend` of the leader's session: the server frees the lock and tells the leader at once;
        /// the process lives on (`now_follower`, `connection_lost`) and rejoins.
        case serverKill
        var testDescription: String { rawValue }
    }

    @Test(
        "3 processes × 3 elections: one leader per election, one session thread and one watchdog per process, by name; SIGINT or SIGTERM: each exits 0 after shutdown"
    )
    func oneLeaderPerElection() async throws {
        try await withTestDatabase { database in
            let elections = ["e1", "e2", "e3"]
            try await withParticipants(database) { group in
                for name in ["a", "b", "c"] { try await group.start(name, elections: elections) }
                for election in elections {
                    try await group.waitForCluster(election: election, size: 3)
                }
                let history = group.history()
                for election in elections {
                    #expect(history.currentLeaders(election: election).count == 1, "\(history.dump())")
                }
                // Whatever the number of elections: one session thread and one watchdog per process, by name.
                for participant in group.all {
                    let names = Files.threadNames(participant.process.pid)
                    #expect(names.filter { $0 == "stoker-session" }.count == 1, "\(participant.name): \(names)")
                    #expect(names.filter { $0 == "stoker-watchdog" }.count == 1, "\(participant.name): \(names)")
                }
                try await group.stopAll()
                let final = group.history()
                #expect(final.problems(complete: true) == [], "\(final.dump())")
                for process in group.all {
                    for election in elections {
                        let last = final.lines.last { $0.process == process.name && $0.election == election }
                        #expect(last?.event == "shutdown", "\(process.name) \(election): \(final.dump())")
                    }
                }
            }
        }
    }

    @Test(
        "a fault of the leader process: a new leader, no overlap (ended_at before the successor's at)",
        arguments: Fault.allCases)
    func fault(_ fault: Fault) async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                // A short lease keeps the freeze short; the other faults do not wait for it.
                for name in ["a", "b", "c"] { try await group.start(name, elections: ["e"], lease: "2s") }
                try await group.waitForCluster(election: "e", size: 3)
                let leaders = group.history().currentLeaders(election: "e")
                #expect(leaders.count == 1, "\(group.history().dump())")
                let victim = try #require(group.all.first { $0.name == leaders.first })
                let linesBefore = victim.process.lines.count
                let signalled = monotonicSeconds()
                switch fault {
                case .kill: group.markKilled(victim.name, at: signalled)
                case .freeze, .terminate, .serverKill: break
                }
                if let signal = fault.signal {
                    #expect(victim.process.signal(signal))
                } else {
                    let ended = try await database.admin(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                            + "'\(group.cluster):\(victim.name)'")
                    #expect(ended == [["t"]])
                }
                let (successor, _) = try await group.firstLine(
                    among: group.all.filter { $0.name != victim.name }, timeout: .seconds(30)
                ) { line in
                    line.event == "now_leader" && line.election == "e" && line.at > signalled
                }
                #expect(successor.name != victim.name)

                switch fault {
                case .kill:
                    #expect(try await victim.process.waitForExit(timeout: .seconds(30)) == 128 + SIGKILL)
                case .freeze:
                    #expect(victim.process.signal(SIGCONT))
                    try await Self.expectDemotion(of: victim, after: linesBefore, reason: "lease_expired")
                case .serverKill:
                    try await Self.expectDemotion(of: victim, after: linesBefore, reason: "connection_lost")
                case .terminate:
                    #expect(try await victim.process.waitForExit(timeout: .seconds(30)) == 0)
                    _ = await victim.process.close()  // every line read
                    let last = group.history().lines.last { $0.process == victim.name }
                    #expect(last?.event == "shutdown" && last?.reason == "graceful_shutdown", "\(last?.raw ?? "")")
                }
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
                #expect(history.leaderships(election: "e").count >= 2, "\(history.dump())")
            }
        }
    }

    @Test(
        "SIGTERM while the first connection hangs: the process exits 0 at once (nothing joined, nothing to hand over)")
    func stopWhileConnecting() async throws {
        // A listener that never accepts: the connection sits in its backlog, and the server never answers.
        let listener = try SilentListener()
        let node = try await NodeProcess.start(
            [
                try builtExecutable("stoker"), "node", "--url",
                "host=127.0.0.1 port=\(listener.port) user=u connect_timeout=60", "--cluster", "c", "--election", "e",
            ], environment: ["PATH": "/usr/bin:/bin", "LANG": "C"])
        // Its first connection is pending in the backlog: it is past start-up, making that connection.
        try await listener.waitForPendingConnection(timeout: .seconds(30))
        #expect(node.signal(SIGTERM))
        #expect(try await node.waitForExit(timeout: .seconds(30)) == 0, "\(node.standardError)")
        #expect(node.lines.isEmpty)
    }

    /// The victim prints its demotion (`now_follower` with `reason`) after the fault.
    static func expectDemotion(of victim: Participants.Participant, after index: Int, reason: String) async throws {
        let demotion = try await victim.process.waitForLine(from: index, timeout: .seconds(30)) { raw in
            ParticipantLine(raw.text, process: victim.name)?.event == "now_follower"
        }
        let parsed = try #require(ParticipantLine(demotion.text, process: victim.name))
        #expect(parsed.reason == reason, "\(parsed.raw)")
    }

    @Test(
        "a VACUUM of the tables a takeover reads: the follower rehearses its takeover again, in a transaction rolled back"
    )
    func rehearsalAfterVacuum() async throws {
        try await withTestDatabase { database in
            try await withParticipants(database) { group in
                for name in ["a", "b"] { try await group.start(name, elections: ["e"], lease: "2s") }
                try await group.waitForCluster(election: "e", size: 2)
                // Each rehearsal inserts two election rows it rolls back: their ids are used, never seen.
                func lastID() async throws -> Int {
                    let rows = try await database.admin(
                        "SELECT pg_sequence_last_value(pg_get_serial_sequence('stoker.elections', 'id')::regclass)")
                    return try #require(rows.first?.first.flatMap { $0.flatMap { Int($0) } })
                }
                let before = try await lastID()
                _ = try await database.admin("VACUUM stoker.nodes, stoker.elections, stoker.term_band")
                try await waitUntil("a node rehearsed its takeover again (two election ids used)") {
                    try await lastID() >= before + 2
                }
                let rows = try await database.admin("SELECT name FROM stoker.elections")
                #expect(rows.map { $0.first ?? nil } == ["e"])
                try await group.stopAll()
                let history = group.history()
                #expect(history.problems(complete: true) == [], "\(history.dump())")
            }
        }
    }

    @Test("a wrong password: non-zero exit, one line on stderr, no password in it, nothing on stdout")
    func wrongPassword() async throws {
        try await withControlledDatabase { database in
            let role = try await database.createRole(prefix: "stk_node", password: "the-right-one")
            let url = database.tcpConninfo(user: role, password: Self.secret)
            let result = try await Self.run(["node", "--url", url, "--cluster", "c", "--election", "e"])
            #expect(result.status != 0)
            #expect(result.standardOutput.isEmpty, "\(result.standardOutput)")
            let lines = result.standardError.split(separator: "\n", omittingEmptySubsequences: false)
            #expect(lines.count == 2 && lines[1].isEmpty, "not one line: \(result.standardError)")
            #expect(result.standardError.contains("authenticationFailed"), "\(result.standardError)")
            #expect(!result.standardError.contains(Self.secret), "leaked: \(result.standardError)")
        }
    }

    @Test("a role without the grants a node needs: non-zero exit, one line on stderr, no retry loop, no password")
    func missingGrants() async throws {
        try await withControlledDatabase { database in
            let role = try await database.createRole(prefix: "stk_nogrant", password: Self.secret)
            _ = try await Self.run(["migrate", "--url", database.conninfo])
            // Enough to see that the schema is current (the first connection's check), not to join.
            try await database.admin(
                "GRANT USAGE ON SCHEMA stoker TO \(role); GRANT SELECT ON stoker.migrations TO \(role)")
            let url = database.tcpConninfo(user: role, password: Self.secret)
            let result = try await Self.run(["node", "--no-migrate", "--url", url, "--cluster", "c", "--election", "e"])
            #expect(result.status != 0)
            // The activator ran: its only callback is the shutdown the node's stop brought.
            let events = result.standardOutput.split(separator: "\n").map {
                ParticipantLine(String($0), process: "a").map { "\($0.event) \($0.reason ?? "")" } ?? String($0)
            }
            #expect(events == ["shutdown node_stopped"], "\(result.standardOutput)")
            let lines = result.standardError.split(separator: "\n", omittingEmptySubsequences: false)
            #expect(lines.count == 2 && lines[1].isEmpty, "not one line: \(result.standardError)")
            #expect(result.standardError.contains("42501"), "\(result.standardError)")
            #expect(!result.standardError.contains(Self.secret), "leaked: \(result.standardError)")
        }
    }

    @Test(
        "a bad flag or setting: non-zero exit, one line on stderr naming it, no password",
        arguments: [
            (["--lease", "5x"], "--lease"),
            (["--lease", "1s", "--heartbeat", "2s"], "heartbeatInterval"),
            (["--timer", "0ms"], "--timer"),
            (["--bogus"], "--bogus"),
            // A connection URL given without --url: ArgumentParser quotes it; the password must not come along.
            (["postgresql://svc:\(secret)@127.0.0.1:1/app"], "Unexpected argument"),
            (["--lease=postgresql://svc:\(secret)@127.0.0.1:1/app"], "--lease"),
            (["--lease", "host=h password = \(secret)"], "--lease"),
        ])
    func badFlag(_ flags: [String], _ named: String) async throws {
        let url = "postgresql://svc:\(Self.secret)@127.0.0.1:1/app"
        let result = try await Self.run(["node", "--url", url, "--cluster", "c", "--election", "e"] + flags)
        #expect(result.status != 0)
        let lines = result.standardError.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(lines.count == 2 && lines[1].isEmpty, "not one line: \(result.standardError)")
        #expect(result.standardError.contains(named), "\(result.standardError)")
        #expect(!result.standardError.contains(Self.secret), "leaked: \(result.standardError)")
    }

    /// The executable with a minimal environment (no DATABASE_URL or PG* leaking in from the test process).
    static func run(_ arguments: [String]) async throws -> ProcessResult {
        try await runProcess(
            [try builtExecutable("stoker")] + arguments, environment: ["PATH": "/usr/bin:/bin", "LANG": "C"],
            timeout: .seconds(60))
    }
}

extension NodeCommandTests.Fault {
    /// The signal sent to the leader's process (nil: the fault is the server's).
    var signal: Int32? {
        switch self {
        case .kill: SIGKILL
        case .freeze: SIGSTOP
        case .terminate: SIGTERM
        case .serverKill: nil
        }
    }
}

/// The line checker itself, on made-up lines: each guarantee it judges, broken once.
@Suite("stoker node's line checker")
struct LineHistoryTests {
    static func line(
        _ process: String, _ event: String, at: Double, term: Int64? = nil, endedAt: Double? = nil,
        reason: String? = nil
    ) -> ParticipantLine {
        var text = "{\"at\":\(at),\"time\":\"2026-11-25T00:00:00.000Z\",\"node\":\"\(process)\",\"incarnation\":1,"
        text += "\"election\":\"e\",\"event\":\"\(event)\",\"term\":\(term.map { "\($0)" } ?? "null")"
        if let reason { text += ",\"reason\":\"\(reason)\"" }
        if let endedAt { text += ",\"ended_at\":\(endedAt)" }
        return ParticipantLine(text + "}", process: process)!
    }

    @Test("a clean hand-over has no problems; each broken guarantee is named")
    func checker() {
        let clean = [
            Self.line("a", "now_leader", at: 1, term: 1),
            Self.line("a", "shutdown", at: 2.5, term: 1, endedAt: 2, reason: "graceful_shutdown"),
            Self.line("b", "now_leader", at: 2.1, term: 2),
            Self.line("b", "shutdown", at: 3, term: 2, endedAt: 3, reason: "graceful_shutdown"),
        ]
        #expect(LineHistory(lines: clean, unparsable: [], killed: [:]).problems(complete: true) == [])

        var overlap = clean
        overlap[1] = Self.line("a", "shutdown", at: 2.5, term: 1, endedAt: 2.2, reason: "graceful_shutdown")
        let overlapProblems = LineHistory(lines: overlap, unparsable: [], killed: [:]).problems(complete: true)
        #expect(overlapProblems.count == 1 && overlapProblems[0].contains("overlap of 100000 µs"), "\(overlapProblems)")

        var stale = clean
        stale[2] = Self.line("b", "now_leader", at: 2.1, term: 1)
        let staleProblems = LineHistory(lines: stale, unparsable: [], killed: [:]).problems(complete: true)
        #expect(staleProblems.count == 1 && staleProblems[0].contains("does not rise"), "\(staleProblems)")

        let undemoted = Array(clean.dropLast())
        #expect(
            LineHistory(lines: undemoted, unparsable: [], killed: [:]).problems(complete: true)
                == ["b never demoted from [\"e\"]"])
        // A killed process is not expected to print its demotion; its successor must start after the kill.
        let killedProblems = LineHistory(lines: [clean[0], clean[2]], unparsable: [], killed: ["a": 2.05])
            .problems(complete: true)
        #expect(killedProblems == ["b never demoted from [\"e\"]"])
        let lateKill = LineHistory(lines: [clean[0], clean[2], clean[3]], unparsable: [], killed: ["a": 2.3])
        #expect(lateKill.problems(complete: true).first?.contains("overlap") == true)

        let noEnd = [Self.line("a", "now_leader", at: 1, term: 1), Self.line("a", "now_follower", at: 2, term: 1)]
        #expect(
            LineHistory(lines: noEnd, unparsable: [], killed: [:]).problems(complete: true).first?.contains(
                "without ended_at") == true)
        #expect(
            LineHistory(lines: [], unparsable: ["a: garbage"], killed: [:]).problems(complete: true)
                == ["not a stoker node line: a: garbage"])
    }
}
