import Foundation
import StokerHarness

/// What `stoker-bench failover` was asked to do.
struct BenchSettings: Sendable {
    let reps: Int
    let lease: BenchDuration
    let faults: [Fault]
    let nodes: Int
    let systems: [BenchSystem]
    /// Elections each participant stands in (1 for the floor).
    let elections: Int
    /// Whether every participant is started anew for each repetition.
    let fresh: Bool
    /// Whether each system runs all its repetitions of a fault before the next system starts, rather than the systems
    /// taking turns repetition by repetition.
    let sequential: Bool
    /// Whether Stoker's tables are vacuumed a heartbeat and 300 ms before each of Stoker's faults (as autovacuum does in
    /// a running cluster), which invalidates the plans every session has of their statements.
    let vacuum: Bool
    /// Sessions per floor participant (1, or 2: a lock on each, and a successor needs both).
    let floorSessions: Int
    /// `stoker`, when `.stoker` is among the systems.
    let stokerPath: String?
    /// This bench's own binary (it runs the floor clients).
    let benchPath: String
}

/// The measurements and findings of one fault applied to one system, `reps` times.
struct PhaseResult: Sendable {
    let system: BenchSystem
    let fault: Fault
    /// Failover latencies in seconds: the successor's `now_leader.at` minus the instant just before the signal, one
    /// per election the faulted leader led, over every repetition.
    var latencies: [Double] = []
    /// Repetitions completed.
    var repetitions = 0
    /// Overlapping leaderships found in the lines (each one a correctness failure).
    var overlaps: [String] = []
    /// Everything else that went wrong (a non-zero exit after SIGTERM, a missing `ended_at`, an aborted phase, …).
    var problems: [String] = []

    /// Whether overlaps are checked: not for a frozen floor holder — a bare lock has no lease, so it learns of its
    /// loss only when it resumes, after its successor (which is exactly what Stoker's lease fixes).
    /// A bare lock has no lease and no guard: a frozen or server-killed floor holder learns of its loss only after
    /// its successor may have started. Those overlaps are the floor's, reported but not failures.
    var overlapsChecked: Bool { !(system == .floor && (fault == .freeze || fault == .serverKill)) }
}

/// A finished run: the report to print and whether every correctness check passed.
struct BenchOutcome: Sendable {
    let report: String
    let passed: Bool
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Starts a private PostgreSQL and runs every (fault, system) phase on it; returns the report.
func runFailoverBenchmark(_ settings: BenchSettings, commandLine: String) async throws -> BenchOutcome {
    try await TestPostgres.withPrivate { postgres in
        try await postgres.withDatabase { database in
            let version = try await database.admin("SHOW server_version").first?.first ?? nil
            try await database.admin("CREATE SEQUENCE stoker_bench_floor_term")
            if let stoker = settings.stokerPath {
                let migrated = try await runProcess([stoker, "migrate", "--url", database.conninfo])
                guard migrated.status == 0 else {
                    throw BenchError("`stoker migrate` exited \(migrated.status): \(migrated.standardError)")
                }
            }
            var results: [PhaseResult] = []
            for (index, fault) in settings.faults.enumerated() {
                var phases = settings.systems.map {
                    Phase(settings: settings, system: $0, fault: fault, database: database, floorKey: 4_200 + index)
                }
                if settings.sequential {
                    for each in phases.indices {
                        await phases[each].begin()
                        for rep in 1...settings.reps { await phases[each].repetition(rep) }
                        results.append(await phases[each].end())
                    }
                    continue
                }
                // Turns: every system's participants run side by side (idle but for their heartbeats), and the
                // systems fault theirs in turn, the first one alternating, so that each system's samples come from
                // the same minutes of the host (a shared virtual machine drifts by milliseconds within minutes).
                for each in phases.indices { await phases[each].begin() }
                for rep in 1...settings.reps {
                    let order = rep % 2 == 1 ? Array(phases.indices) : phases.indices.reversed()
                    for each in order { await phases[each].repetition(rep) }
                }
                for each in phases.indices { results.append(await phases[each].end()) }
            }
            let report = Report(
                settings: settings, results: results, machine: await Machine.current(),
                postgresVersion: version ?? "unknown", commandLine: commandLine)
            return BenchOutcome(report: report.markdown, passed: report.passed)
        }
    }
}

/// Writes a progress line to stderr (the report goes to stdout).
func progress(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}

/// One fault applied `reps` times to `nodes` participants of one system, in elections of its own (`elections` per
/// participant; the floor has one).
struct Phase {
    let settings: BenchSettings
    let system: BenchSystem
    let fault: Fault
    let database: TestDatabase
    /// The advisory lock key of the floor clients.
    let floorKey: Int
    private var result: PhaseResult
    /// Every participant started in this phase, for the final check of all lines.
    private var everyone: [Participant] = []
    /// The participants running now.
    private var live: [Participant] = []
    /// The SIGKILL instant of each crashed participant: the end of its leaderships, which it could not print.
    private var killedAt: [String: Double] = [:]
    /// Election → its leader before the next repetition; nil before ``begin()`` and once the phase has aborted.
    private var leaders: [String: Participant]?

    init(settings: BenchSettings, system: BenchSystem, fault: Fault, database: TestDatabase, floorKey: Int) {
        self.settings = settings
        self.system = system
        self.fault = fault
        self.database = database
        self.floorKey = floorKey
        result = PhaseResult(system: system, fault: fault)
    }

    /// The Stoker cluster of this phase.
    private var cluster: String { "bench-\(fault.rawValue)" }
    private var label: String { "\(fault.rawValue)/\(system.rawValue)" }
    /// The elections every participant stands in, as they appear in its lines.
    private var elections: [String] { system == .floor ? ["floor"] : electionNames(settings.elections) }

    /// Starts the participants. Never throws: a failure becomes a problem and aborts the phase.
    mutating func begin() async {
        do {
            leaders = try await startAll()
        } catch {
            abort(error)
        }
    }

    /// Repetition `rep` (they run 1, 2, … `reps`), unless the phase has aborted. Never throws: a failure becomes a
    /// problem and aborts the phase.
    mutating func repetition(_ rep: Int) async {
        guard let current = leaders else { return }
        do {
            var next = try await failover(rep: rep, from: current)
            result.repetitions = rep
            if settings.fresh && rep < settings.reps {
                result.problems += await stopParticipants(live, when: "SIGTERM (stop before a fresh start)")
                live = []
                next = try await startAll()
            }
            leaders = next
        } catch {
            abort(error)
        }
    }

    private mutating func abort(_ error: any Error) {
        leaders = nil
        let message = "aborted after \(result.repetitions) of \(settings.reps) repetitions: \(error)"
        progress("\(label): \(message)")
        result.problems.append(message)
    }

    /// Stops every participant, checks all lines. Never throws: failures become problems.
    mutating func end() async -> PhaseResult {
        result.problems += await stopParticipants(live, when: "the final SIGTERM")
        live = []
        for participant in everyone { await participant.process.close() }
        checkHistory()
        return result
    }

    /// Starts one participant and waits until it leads every election, then the others; settles. Returns
    /// election → leader (the first participant everywhere).
    private mutating func startAll() async throws -> [String: Participant] {
        let first = try await startParticipant()
        live.append(first)
        for election in elections {
            _ = try await first.process.waitForLine(timeout: .seconds(60)) {
                Event($0.text).map { $0.isNowLeader && $0.election == election } ?? false
            }
        }
        for _ in 1..<settings.nodes { live.append(try await startParticipant()) }
        let leaders = Dictionary(uniqueKeysWithValues: elections.map { ($0, first) })
        try await settle(leaders: leaders)
        return leaders
    }

    private mutating func startParticipant() async throws -> Participant {
        let name = (system == .stoker ? "n" : "f") + String(everyone.count + 1)
        let arguments: [String]
        switch system {
        case .stoker:
            guard let stoker = settings.stokerPath else { throw BenchError("no stoker executable") }
            arguments = stokerNodeArguments(
                stoker: stoker, conninfo: database.conninfo, cluster: cluster, elections: elections, name: name,
                lease: settings.lease)
        case .floor:
            arguments = [
                settings.benchPath, "floor-client", "--url", database.conninfo, "--key", String(floorKey),
                "--idle-timeout", settings.lease.text, "--sessions", String(settings.floorSessions),
            ]
        }
        let participant = Participant(name: name, process: try await NodeProcess.start(arguments))
        everyone.append(participant)
        return participant
    }

    /// One repetition: signal the participant leading the most elections, time each of its elections' successor,
    /// check the old leader's end, and (unless every participant is restarted for the next one) replace it.
    /// Returns election → leader afterwards.
    private mutating func failover(
        rep: Int, from leaders: [String: Participant]
    ) async throws -> [String: Participant] {
        var counts: [String: Int] = [:]
        for participant in leaders.values { counts[participant.name, default: 0] += 1 }
        guard let leader = live.filter({ counts[$0.name] != nil }).max(by: { counts[$0.name]! < counts[$1.name]! })
        else { throw BenchError("no live participant leads an election") }
        let led = elections.filter { leaders[$0]?.name == leader.name }
        let candidates = live.filter { $0.name != leader.name }
        let leaderMark = leader.process.lines.count
        let candidateMarks = candidates.map { $0.process.lines.count }
        let timeout = fault == .freeze ? settings.lease.duration + .seconds(30) : .seconds(30)

        if settings.vacuum && system == .stoker {
            // Invalidates every session's plans of statements on these tables, as autovacuum does. The fault comes a
            // heartbeat (lease / 5) and 300 ms later, when the nodes have seen the vacuum and could have re-planned.
            _ = try await database.admin("VACUUM stoker.nodes, stoker.elections")
            try await Task.sleep(for: settings.lease.duration / 5 + .milliseconds(300))
        }
        // A server-side end: the leader's backend, found first (untimed). The timed call includes the admin session's
        // own connection, so this row's latency is an upper bound; its point is the overlap check.
        let backend = fault == .serverKill ? try await backendPID(of: leader) : nil
        let signalled = monotonicSeconds()
        if let signal = fault.signal {
            guard leader.process.signal(signal) else {
                throw BenchError("could not send \(fault.signalName) to \(leader.name): it has already exited")
            }
        } else if let backend {
            let ended = try await database.admin("SELECT pg_terminate_backend(\(backend))")
            guard ended.first?.first == "t" else { throw BenchError("pg_terminate_backend(\(backend)) failed") }
        }
        if fault == .crash { killedAt[leader.name] = signalled }
        let takeovers = try await withThrowingTaskGroup(of: (String, Participant, Event).self) { group in
            for election in led {
                group.addTask {
                    let (successor, taken) = try await firstNowLeader(
                        in: election, among: candidates, from: candidateMarks, timeout: timeout)
                    return (election, successor, taken)
                }
            }
            var found: [(election: String, successor: Participant, taken: Event)] = []
            for try await takeover in group { found.append(takeover) }
            return found.sorted { $0.election < $1.election }
        }
        result.latencies += takeovers.map { $0.taken.at - signalled }

        switch fault {
        case .graceful:
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if status != 0 {
                result.problems.append("rep \(rep): \(leader.name) exited \(status) after SIGTERM, not 0")
            }
        case .crash:
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if status != 128 + SIGKILL {
                result.problems.append("rep \(rep): \(leader.name) exited \(status) after SIGKILL")
            }
        case .serverKill, .freeze:
            if fault == .freeze { leader.process.signal(SIGCONT) }
            // The old leader lives on: its demotion (connection lost, with ended_at) must precede the successor.
            for election in led {
                _ = try await leader.process.waitForLine(from: leaderMark, timeout: .seconds(30)) {
                    Event($0.text).map { $0.isDemotion && $0.endedAt != nil && $0.election == election } ?? false
                }
            }
            leader.process.signal(SIGTERM)
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if system == .stoker && status != 0 {
                let which = fault == .freeze ? "the resumed " : ""
                result.problems.append("rep \(rep): \(which)\(leader.name) exited \(status) after SIGTERM, not 0")
            }
        }
        let notes = takeovers.map { takeover in
            let note = fault == .crash ? "" : endNote(of: leader, in: takeover.election, from: leaderMark, takeover)
            let latency = formatMilliseconds(takeover.taken.at - signalled)
            guard led.count > 1 else { return "\(takeover.successor.name) in \(latency)\(note)" }
            return "\(takeover.election): \(takeover.successor.name) in \(latency)"
                + (note.isEmpty ? "" : " (\(note.dropFirst(2)))")
        }
        progress("\(label) rep \(rep)/\(settings.reps): \(leader.name) → " + notes.joined(separator: ", "))

        var next = leaders
        for takeover in takeovers { next[takeover.election] = takeover.successor }
        live.removeAll { $0.name == leader.name }
        if !settings.fresh {
            live.append(try await startParticipant())
            try await settle(leaders: next)
        }
        return next
    }

    /// The server process of `participant`'s session.
    private func backendPID(of participant: Participant) async throws -> Int {
        let name = system == .stoker ? "\(cluster):\(participant.name)" : "floor-\(participant.process.pid)"
        let rows = try await database.admin("SELECT pid FROM pg_stat_activity WHERE application_name = '\(name)'")
        guard rows.count == 1, let pid = rows[0].first.flatMap({ $0.flatMap { Int($0) } }) else {
            throw BenchError("expected one session named \(name), found \(rows.count)")
        }
        return pid
    }

    /// The old leader's `ended_at` in `election` against the successor's `at`, said loudly when they overlap.
    private func endNote(
        of leader: Participant, in election: String, from mark: Int,
        _ takeover: (election: String, successor: Participant, taken: Event)
    ) -> String {
        let end = leader.process.lines.dropFirst(mark).lazy.compactMap { Event($0.text) }.first {
            $0.isDemotion && $0.endedAt != nil && $0.election == election
        }
        guard let endedAt = end?.endedAt else { return "; \(leader.name) printed no ended_at" }
        let gap = takeover.taken.at - endedAt
        if gap < 0 && result.overlapsChecked {
            progress(
                "OVERLAP: \(leader.name) ended its leadership of \(election) at \(endedAt), "
                    + "\(formatMilliseconds(-gap)) after \(takeover.successor.name) took over at \(takeover.taken.at)")
        }
        return "; handover gap \(formatMilliseconds(gap))"
    }

    /// Waits until every live participant has joined (seen from the database), 300 ms more, and checks that in
    /// every election the expected leader — and only it — leads.
    private func settle(leaders expected: [String: Participant]) async throws {
        try await waitUntilJoined(live, timeout: .seconds(30)) {
            switch system {
            case .stoker:
                return try await joinedStokerNodes(database, cluster: cluster, pids: live.map(\.process.pid))
            case .floor:
                let names = live.map { "'floor-\($0.process.pid)'" }.joined(separator: ",")
                let rows = try await database.admin(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name IN (\(names))")
                return rows.first?.first.flatMap { $0.flatMap { Int($0) } } ?? 0
            }
        }
        try await Task.sleep(for: .milliseconds(300))
        let leading = leadersByElection(live, elections: elections)
        for election in elections {
            guard let expected = expected[election]?.name, leading[election] == [expected] else {
                let expectation = expected[election].map { "exactly \($0.name)" } ?? "one participant"
                throw BenchError(
                    "expected \(expectation) to lead \(election) after settling; leading: \(leading[election] ?? [])")
            }
        }
    }

    /// Over every line of the phase: per election, leaderships [now_leader.at, ended_at] never overlap, terms
    /// increase.
    private mutating func checkHistory() {
        let findings = checkLeaderships(everyone, killedAt: killedAt)
        if result.overlapsChecked { result.overlaps = findings.overlaps }
        result.problems += findings.problems
        for overlap in result.overlaps { progress("OVERLAP (\(label)): \(overlap)") }
    }
}

/// `1.234 ms`.
func formatMilliseconds(_ seconds: Double) -> String {
    String(format: "%.3f ms", seconds * 1_000)
}
