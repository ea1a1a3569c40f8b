import Foundation
import StokerTestSupport

/// What `stoker-bench failover` was asked to do.
struct BenchSettings: Sendable {
    let reps: Int
    let lease: BenchDuration
    let faults: [Fault]
    let nodes: Int
    let systems: [BenchSystem]
    /// `stoker`, when `.stoker` is among the systems.
    let stokerPath: String?
    /// This bench's own binary (it runs the floor clients).
    let benchPath: String
}

/// The measurements and findings of one fault applied to one system, `reps` times.
struct PhaseResult: Sendable {
    let system: BenchSystem
    let fault: Fault
    /// Failover latencies in seconds: the successor's `now_leader.at` minus the instant just before the signal.
    var latencies: [Double] = []
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

/// One participant process.
struct Participant: Sendable {
    /// The harness's name for it (`n3` for `stoker node --name n3`, `f3` for a floor client).
    let name: String
    let process: NodeProcess

    /// Its parsed lines.
    var events: [Event] { process.lines.compactMap { Event($0.text) } }

    /// Whether its last leadership event is a `now_leader`.
    var isLeading: Bool {
        events.last { $0.isNowLeader || $0.isDemotion }?.isNowLeader ?? false
    }
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
                for system in settings.systems {
                    var phase = Phase(
                        settings: settings, system: system, fault: fault, database: database, floorKey: 4_200 + index)
                    results.append(await phase.run())
                }
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

/// One fault applied `reps` times to `nodes` participants of one system, in one election of its own.
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
    /// The SIGKILL instant of each crashed participant: the end of its leadership, which it could not print.
    private var killedAt: [String: Double] = [:]

    init(settings: BenchSettings, system: BenchSystem, fault: Fault, database: TestDatabase, floorKey: Int) {
        self.settings = settings
        self.system = system
        self.fault = fault
        self.database = database
        self.floorKey = floorKey
        result = PhaseResult(system: system, fault: fault)
    }

    /// The Stoker cluster of this phase (the election is `e`).
    private var cluster: String { "bench-\(fault.rawValue)" }
    private var label: String { "\(fault.rawValue)/\(system.rawValue)" }

    /// Runs the repetitions, stops every participant, checks all lines. Never throws: failures become problems.
    mutating func run() async -> PhaseResult {
        do {
            for _ in 0..<settings.nodes { live.append(try await startParticipant()) }
            var leader = try await firstNowLeader(among: live, timeout: .seconds(60)).participant
            try await settle(leader: leader)
            for rep in 1...settings.reps {
                leader = try await failover(rep: rep, from: leader)
            }
        } catch {
            let message = "aborted after \(result.latencies.count) of \(settings.reps) repetitions: \(error)"
            progress("\(label): \(message)")
            result.problems.append(message)
        }
        await stopAll()
        checkHistory()
        return result
    }

    private mutating func startParticipant() async throws -> Participant {
        let name = (system == .stoker ? "n" : "f") + String(everyone.count + 1)
        let arguments: [String]
        switch system {
        case .stoker:
            guard let stoker = settings.stokerPath else { throw BenchError("no stoker executable") }
            arguments =
                [
                    stoker, "node", "--url", database.conninfo, "--cluster", cluster, "--election", "e", "--name", name,
                    "--lease", settings.lease.text,
                ]
        case .floor:
            arguments = [
                settings.benchPath, "floor-client", "--url", database.conninfo, "--key", String(floorKey),
                "--idle-timeout", settings.lease.text,
            ]
        }
        let participant = Participant(name: name, process: try await NodeProcess.start(arguments))
        everyone.append(participant)
        return participant
    }

    /// One repetition: signal the leader, time its successor, check the old leader's end, replace it.
    private mutating func failover(rep: Int, from leader: Participant) async throws -> Participant {
        let candidates = live.filter { $0.name != leader.name }
        let leaderMark = leader.process.lines.count
        let timeout = fault == .freeze ? settings.lease.duration + .seconds(30) : .seconds(30)

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
        let (successor, taken) = try await firstNowLeader(among: candidates, timeout: timeout)
        let latency = taken.at - signalled
        result.latencies.append(latency)

        var note = ""
        switch fault {
        case .graceful:
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if status != 0 {
                result.problems.append("rep \(rep): \(leader.name) exited \(status) after SIGTERM, not 0")
            }
            note = endNote(of: leader, from: leaderMark, successor: successor, taken: taken)
        case .crash:
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if status != 128 + SIGKILL {
                result.problems.append("rep \(rep): \(leader.name) exited \(status) after SIGKILL")
            }
        case .serverKill:
            // The old leader lives on: its demotion (connection lost, with ended_at) must precede the successor.
            _ = try await leader.process.waitForLine(from: leaderMark, timeout: .seconds(30)) {
                Event($0.text).map { $0.isDemotion && $0.endedAt != nil } ?? false
            }
            note = endNote(of: leader, from: leaderMark, successor: successor, taken: taken)
            leader.process.signal(SIGTERM)
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if system == .stoker && status != 0 {
                result.problems.append("rep \(rep): \(leader.name) exited \(status) after SIGTERM, not 0")
            }
        case .freeze:
            leader.process.signal(SIGCONT)
            _ = try await leader.process.waitForLine(from: leaderMark, timeout: .seconds(30)) {
                Event($0.text).map { $0.isDemotion && $0.endedAt != nil } ?? false
            }
            note = endNote(of: leader, from: leaderMark, successor: successor, taken: taken)
            leader.process.signal(SIGTERM)
            let status = try await leader.process.waitForExit(timeout: .seconds(30))
            if system == .stoker && status != 0 {
                result.problems.append("rep \(rep): the resumed \(leader.name) exited \(status) after SIGTERM, not 0")
            }
        }
        progress(
            "\(label) rep \(rep)/\(settings.reps): \(leader.name) → \(successor.name) in "
                + "\(formatMilliseconds(latency))\(note)")

        live.removeAll { $0.name == leader.name }
        live.append(try await startParticipant())
        try await settle(leader: successor)
        return successor
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

    /// The old leader's `ended_at` against the successor's `at`, said loudly when they overlap.
    private func endNote(of leader: Participant, from mark: Int, successor: Participant, taken: Event) -> String {
        let end = leader.process.lines.dropFirst(mark).lazy.compactMap { Event($0.text) }.first {
            $0.isDemotion && $0.endedAt != nil
        }
        guard let endedAt = end?.endedAt else { return "; \(leader.name) printed no ended_at" }
        let gap = taken.at - endedAt
        if gap < 0 && result.overlapsChecked {
            progress(
                "OVERLAP: \(leader.name) ended its leadership at \(endedAt), "
                    + "\(formatMilliseconds(-gap)) after \(successor.name) took over at \(taken.at)")
        }
        return "; handover gap \(formatMilliseconds(gap))"
    }

    /// The first `now_leader` printed by any of `candidates` from now on.
    private func firstNowLeader(
        among candidates: [Participant], timeout: Duration
    ) async throws -> (participant: Participant, event: Event) {
        let marks = candidates.map { $0.process.lines.count }
        return try await withThrowingTaskGroup(of: (Participant, Event).self) { group in
            for (participant, mark) in zip(candidates, marks) {
                group.addTask {
                    let line = try await participant.process.waitForLine(from: mark, timeout: timeout) {
                        Event($0.text)?.isNowLeader == true
                    }
                    guard let event = Event(line.text) else { throw BenchError("unparsable line: \(line.text)") }
                    return (participant, event)
                }
            }
            var failures: [String] = []
            while let next = await group.nextResult() {
                switch next {
                case .success(let found):
                    group.cancelAll()
                    return found
                case .failure(let error):
                    failures.append("\(error)")
                }
            }
            throw BenchError("no participant became leader:\n" + failures.joined(separator: "\n"))
        }
    }

    /// Waits until every live participant has joined (seen from the database), 300 ms more, and checks that
    /// `leader` — and only it — leads.
    private func settle(leader: Participant) async throws {
        let query: String
        switch system {
        case .stoker:
            let pids = live.map { String($0.process.pid) }.joined(separator: ",")
            query = """
                SELECT count(*) FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id
                 WHERE c.name = '\(cluster)' AND n.pid = ANY('{\(pids)}'::int[])
                """
        case .floor:
            let names = live.map { "'floor-\($0.process.pid)'" }.joined(separator: ",")
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name IN (\(names))"
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        while true {
            let joined = try await database.admin(query).first?.first.flatMap { $0.flatMap { Int($0) } } ?? 0
            if joined == live.count { break }
            if let gone = live.first(where: { $0.process.exitStatus != nil }) {
                throw BenchError(
                    "\(gone.name) exited with status \(gone.process.exitStatus ?? -1) while joining; stderr:\n"
                        + gone.process.standardError)
            }
            guard ContinuousClock.now < deadline else {
                throw BenchError("only \(joined) of \(live.count) participants joined within 30 s")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        try await Task.sleep(for: .milliseconds(300))
        let leading = live.filter(\.isLeading).map(\.name)
        guard leading == [leader.name] else {
            throw BenchError("expected exactly \(leader.name) to lead after settling; leading: \(leading)")
        }
    }

    /// SIGTERM to every live participant (resuming a frozen one first); each must exit 0. Then everything is reaped.
    private mutating func stopAll() async {
        for participant in live {
            participant.process.signal(SIGCONT)
            participant.process.signal(SIGTERM)
        }
        for participant in live {
            do {
                let status = try await participant.process.waitForExit(timeout: .seconds(30))
                if status != 0 {
                    result.problems.append(
                        "\(participant.name) exited \(status) after the final SIGTERM; stderr:\n"
                            + String(participant.process.standardError.suffix(1_000)))
                }
            } catch {
                result.problems.append("\(participant.name) did not stop: \(error)")
            }
        }
        for participant in everyone { await participant.process.close() }
        live = []
    }

    /// Over every line of the phase: leaderships [now_leader.at, ended_at] never overlap, terms increase.
    private mutating func checkHistory() {
        struct Leadership {
            let name: String
            let start: Double
            let end: Double
            let term: Int?
        }
        var leaderships: [Leadership] = []
        for participant in everyone {
            var open: Event?
            for event in participant.events {
                if event.isNowLeader {
                    if open != nil { result.problems.append("\(participant.name) printed now_leader twice in a row") }
                    open = event
                } else if event.isDemotion, let start = open {
                    if event.endedAt == nil {
                        result.problems.append("\(participant.name): a demotion without ended_at: \(event.event)")
                    }
                    leaderships.append(
                        Leadership(
                            name: participant.name, start: start.at, end: event.endedAt ?? event.at, term: start.term))
                    open = nil
                }
            }
            if let start = open {
                let end = killedAt[participant.name]
                if end == nil { result.problems.append("\(participant.name)'s last leadership never ended") }
                leaderships.append(
                    Leadership(
                        name: participant.name, start: start.at, end: end ?? .infinity, term: start.term))
            }
        }
        leaderships.sort { $0.start < $1.start }
        for (earlier, later) in zip(leaderships, leaderships.dropFirst()) {
            if earlier.end > later.start && result.overlapsChecked {
                result.overlaps.append(
                    "\(earlier.name) (term \(earlier.term.map(String.init) ?? "?")) led until \(earlier.end), "
                        + "\(formatMilliseconds(earlier.end - later.start)) after \(later.name) (term "
                        + "\(later.term.map(String.init) ?? "?")) began at \(later.start)")
            }
            if let first = earlier.term, let second = later.term, second <= first {
                result.problems.append(
                    "term did not increase: \(earlier.name) term \(first), then \(later.name) term \(second)")
            }
        }
        for overlap in result.overlaps { progress("OVERLAP (\(label)): \(overlap)") }
    }
}

/// `1.234 ms`.
func formatMilliseconds(_ seconds: Double) -> String {
    String(format: "%.3f ms", seconds * 1_000)
}
