import ArgumentParser
import Foundation
import Glibc
import StokerHarness

/// `stoker-bench idle`: what idle `stoker node` participants cost the server.
struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Server load of idle `stoker node` participants: transactions and pg_locks reads per second, postgres CPU.",
        discussion: """
            Starts a private PostgreSQL and --nodes `stoker node` processes, each standing in the same --elections \
            elections of one cluster; waits until every node has joined and each election has one leader (by the \
            lines), waits --settle, then measures over --measure: the server's transactions per second \
            (pg_stat_database, every database, sampled once at each end of the window), the cluster's sweeps per \
            second (calls of stoker.sweep in pg_stat_user_functions, counted by the node sessions because the \
            bench database is set to track_functions = 'pl' before they start; each sweep reads pg_locks once), the \
            CPU of the postgres processes (the postmaster and its children, /proc/<pid>/stat), and the client \
            connections. Then stops every node with SIGTERM (each must exit 0) and checks every line (per election, \
            leaderships never overlap and terms increase). Prints a markdown report; exits 1 on any correctness \
            problem.
            """
    )

    @Option(name: .long, help: "`stoker node` processes (each uses two connections).")
    var nodes: Int = 50

    @Option(name: .long, help: "Elections every node stands in (the same ones, in one cluster).")
    var elections: Int = 3

    @Option(name: .long, help: "How long to wait, once every election has a leader, before measuring.")
    var settle: BenchDuration = BenchDuration(parsing: "10s")!

    @Option(name: .long, help: "The measuring window.")
    var measure: BenchDuration = BenchDuration(parsing: "20s")!

    @Option(name: .long, help: "The lease of the nodes (their heartbeat is lease / 5).")
    var lease: BenchDuration = BenchDuration(parsing: "5s")!

    func validate() throws {
        guard (1...1_000).contains(nodes) else {
            throw ValidationError("--nodes must be between 1 and 1000 (got \(nodes)).")
        }
        guard (1...100).contains(elections) else {
            throw ValidationError("--elections must be between 1 and 100 (got \(elections)).")
        }
        guard measure.duration >= .seconds(1) else {
            throw ValidationError("--measure must be at least 1s (got \(measure.text)).")
        }
        guard lease.duration >= .milliseconds(500) else {
            throw ValidationError("--lease must be at least 500ms (got \(lease.text)).")
        }
    }

    func run() async throws {
        let stoker = try await locateStoker(nextTo: try ownExecutable(), otherwise: "")
        let settings = IdleSettings(
            nodes: nodes, elections: elections, settle: settle, measure: measure, lease: lease, stokerPath: stoker)
        let commandLine = CommandLine.arguments.map(shellQuoted).joined(separator: " ")
        let outcome = try await runIdleBenchmark(settings, commandLine: commandLine)
        print(outcome.report)
        fflush(nil)
        if !outcome.passed { throw ExitCode(1) }
    }
}

/// What `stoker-bench idle` was asked to do.
struct IdleSettings: Sendable {
    let nodes: Int
    let elections: Int
    let settle: BenchDuration
    let measure: BenchDuration
    let lease: BenchDuration
    let stokerPath: String
}

/// The targets of an idle cluster.
private enum IdleTarget {
    static let transactionsPerNode = 3.0
    static let cpuPercent = 5.0
    /// pg_locks reads (sweeps) per second, for the whole cluster.
    static let sweepsPerSecond = 2.0
}

/// Starts a private PostgreSQL, runs the idle nodes on it, measures, stops them; returns the report.
func runIdleBenchmark(_ settings: IdleSettings, commandLine: String) async throws -> BenchOutcome {
    // This process holds three descriptors per node (its stdout and stderr pipes, a pidfd) and a few more per
    // admin session.
    let descriptorLimit = try raiseDescriptorLimit(atLeast: settings.nodes * 3 + 256)
    return try await TestPostgres.withPrivate { postgres in
        try await postgres.withDatabase { database in
            var run = IdleRun(settings: settings, postgres: postgres, database: database)
            let measured = try await run.run()
            let report = IdleReport(
                settings: settings, measured: measured, machine: await Machine.current(),
                descriptorLimit: descriptorLimit, commandLine: commandLine)
            return BenchOutcome(report: report.markdown, passed: report.passed)
        }
    }
}

/// What one idle run measured and found.
struct IdleMeasurement: Sendable {
    var postgresVersion = "unknown"
    var maxConnections = 0
    /// Δ of the transaction counters between two samples 1 s apart, before any node started.
    var samplingCheck = 0
    /// Seconds from the first node's start until every node had joined and every election had one leader.
    var startup = 0.0
    /// Client backends other than the bench's own session, after settling.
    var connections = 0
    /// The measuring window of the transaction counters, in seconds.
    var transactionWindow = 0.0
    /// Δ of `sum(xact_commit + xact_rollback)` over every database, the bench's own 2 transactions subtracted.
    var transactions = 0
    /// The same over the bench's database alone (where every node connects).
    var benchDatabaseTransactions = 0
    /// `track_functions` as a fresh session of the bench's database sees it after `ALTER DATABASE … SET`.
    var trackFunctions = "unknown"
    /// Calls of `stoker.sweep` counted before any node started (0 expected).
    var sweepsBeforeNodes = 0
    /// Calls of `stoker.sweep` at the two ends of the window (the transaction readings).
    var sweepsAtStart = 0
    var sweepsAtEnd = 0
    /// The measuring window of the CPU readings, in seconds.
    var cpuWindow = 0.0
    /// CPU seconds of the postmaster and its children over the window.
    var postgresCPU = 0.0
    /// Postgres processes counted (at the end of the window).
    var postgresProcesses = 0
    /// CPU seconds of the `stoker node` processes over the window.
    var nodesCPU = 0.0
    /// Leadership events (`now_leader`, demotions) printed during the window.
    var leadershipChanges = 0
    /// Correctness findings (overlaps are failures).
    var findings = LeadershipFindings()
    /// Whether the measurement finished (false: aborted, see problems).
    var complete = false
}

/// One idle run: the nodes, the samples, the checks.
struct IdleRun {
    let settings: IdleSettings
    let postgres: TestPostgres
    let database: TestDatabase
    private var everyone: [Participant] = []
    private var measured = IdleMeasurement()

    private let cluster = "bench-idle"
    private var elections: [String] { electionNames(settings.elections) }

    init(settings: IdleSettings, postgres: TestPostgres, database: TestDatabase) {
        self.settings = settings
        self.postgres = postgres
        self.database = database
    }

    /// Sets up, measures, stops every node and checks their lines. Throws only when the server cannot be used at
    /// all; a failure with nodes running becomes a problem in the report.
    mutating func run() async throws -> IdleMeasurement {
        let settingsRow = try await database.admin(
            "SELECT current_setting('server_version'), current_setting('max_connections')")
        measured.postgresVersion = settingsRow.first?.first.flatMap { $0 } ?? "unknown"
        measured.maxConnections = settingsRow.first.flatMap { $0.count > 1 ? $0[1] : nil }.flatMap { Int($0) } ?? 0
        // Two sessions per node, one short-lived check per starting node, and the bench's own session.
        let needed = settings.nodes * 2 + 2
        guard needed <= measured.maxConnections else {
            throw BenchError(
                "\(settings.nodes) nodes need \(needed) connections (two each, plus the bench's own and a node's "
                    + "start-up check), but the private server has max_connections = \(measured.maxConnections): "
                    + "use --nodes \((measured.maxConnections - 2) / 2) or fewer")
        }
        let postmaster = try await postmasterPID()
        // Node sessions count the calls of PL/pgSQL functions (sweep among them); set before any node connects.
        try await database.admin("ALTER DATABASE \"\(database.name)\" SET track_functions = 'pl'")
        measured.trackFunctions = try await database.admin("SHOW track_functions").first?.first.flatMap { $0 } ?? "?"
        let migrated = try await runProcess([settings.stokerPath, "migrate", "--url", database.conninfo])
        guard migrated.status == 0 else {
            throw BenchError("`stoker migrate` exited \(migrated.status): \(migrated.standardError)")
        }
        let before = try await transactionCounters()
        try await Task.sleep(for: .seconds(1))
        let sampled = try await transactionCounters()
        measured.samplingCheck = sampled.all - before.all
        measured.sweepsBeforeNodes = sampled.sweeps

        do {
            try await measure(postmaster: postmaster)
            measured.complete = true
        } catch {
            let message = "aborted: \(error)"
            progress("idle: \(message)")
            measured.findings.problems.append(message)
        }
        let live = everyone.filter { $0.process.exitStatus == nil }
        let stopped = await stopParticipants(live, when: "the final SIGTERM")
        if live.count < everyone.count {
            let gone = everyone.filter { participant in !live.contains { $0.name == participant.name } }
            measured.findings.problems.append(
                "exited before the final SIGTERM: "
                    + gone.map { "\($0.name) (status \($0.process.exitStatus ?? -1))" }.joined(separator: ", "))
        }
        for participant in everyone { await participant.process.close() }
        let findings = checkLeaderships(everyone, killedAt: [:])
        measured.findings.overlaps += findings.overlaps
        measured.findings.problems += stopped + findings.problems
        for overlap in findings.overlaps { progress("OVERLAP (idle): \(overlap)") }
        return measured
    }

    /// Starts the nodes, waits for them to settle, and measures the window.
    private mutating func measure(postmaster: Int32) async throws {
        let started = monotonicSeconds()
        for index in 1...settings.nodes {
            let name = "n\(index)"
            let arguments = stokerNodeArguments(
                stoker: settings.stokerPath, conninfo: database.conninfo, cluster: cluster, elections: elections,
                name: name, lease: settings.lease)
            everyone.append(Participant(name: name, process: try await NodeProcess.start(arguments)))
        }
        let participants = everyone
        try await waitUntilJoined(participants, timeout: .seconds(120)) { [database, cluster] in
            try await joinedStokerNodes(database, cluster: cluster, pids: participants.map(\.process.pid))
        }
        let leaders = try await waitForOneLeaderEach(participants, elections: elections, timeout: .seconds(60))
        measured.startup = monotonicSeconds() - started
        progress(
            "idle: \(settings.nodes) nodes joined, leaders "
                + leaders.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
                + " after \(String(format: "%.1f s", measured.startup)); settling for \(settings.settle.text)")
        let connections = try await database.admin(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        measured.connections = connections.first?.first.flatMap { $0.flatMap { Int($0) } } ?? 0
        try await Task.sleep(for: settings.settle.duration)

        let marks = participants.map { $0.process.lines.count }
        // The bench's own sampling stays outside the CPU window: the transactions are read before the first CPU
        // reading and after the last one.
        let firstCounters = try await transactionCounters()
        let firstCPU = cpuTicks { $0.pid == postmaster || $0.parent == postmaster }
        let firstNodes = cpuTicks(of: participants.map(\.process.pid))
        progress("idle: measuring for \(settings.measure.text)")
        try await Task.sleep(for: settings.measure.duration)
        let lastCPU = cpuTicks { $0.pid == postmaster || $0.parent == postmaster }
        let lastNodes = cpuTicks(of: participants.map(\.process.pid))
        let lastCounters = try await transactionCounters()

        measured.transactionWindow = lastCounters.at - firstCounters.at
        measured.transactions = lastCounters.all - firstCounters.all - 2
        measured.benchDatabaseTransactions = lastCounters.benchDatabase - firstCounters.benchDatabase - 2
        measured.sweepsAtStart = firstCounters.sweeps
        measured.sweepsAtEnd = lastCounters.sweeps
        measured.cpuWindow = lastCPU.at - firstCPU.at
        measured.postgresCPU = lastCPU.seconds(since: firstCPU)
        measured.postgresProcesses = lastCPU.ticks.count
        measured.nodesCPU = lastNodes.seconds(since: firstNodes)
        measured.leadershipChanges = zip(participants, marks).reduce(0) { count, pair in
            count
                + pair.0.process.lines.dropFirst(pair.1).filter { line in
                    Event(line.text).map { $0.isNowLeader || $0.isDemotion } ?? false
                }.count
        }
        if let gone = participants.first(where: { $0.process.exitStatus != nil }) {
            throw BenchError(
                "\(gone.name) exited with status \(gone.process.exitStatus ?? -1) during the measurement; stderr:\n"
                    + gone.process.standardError)
        }
    }

    /// `sum(xact_commit + xact_rollback)` over every database and over the bench's own, and the calls of
    /// `stoker.sweep` in the bench's database, in one statement from a fresh admin session; `at` is the middle of the
    /// call.
    private func transactionCounters() async throws -> (all: Int, benchDatabase: Int, sweeps: Int, at: Double) {
        let start = monotonicSeconds()
        let rows = try await database.admin(
            """
            SELECT sum(xact_commit + xact_rollback),
                   sum(xact_commit + xact_rollback) FILTER (WHERE datname = current_database()),
                   (SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'sweep')
              FROM pg_stat_database
            """)
        let end = monotonicSeconds()
        guard let row = rows.first, row.count == 3, let all = row[0].flatMap({ Int($0) }),
            let bench = row[1].flatMap({ Int($0) }), let sweeps = row[2].flatMap({ Int($0) })
        else { throw BenchError("unexpected pg_stat_database sums or sweep calls: \(rows)") }
        return (all, bench, sweeps, (start + end) / 2)
    }

    /// The postmaster's pid: the first line of `<data directory>/postmaster.pid`, else the parent of the
    /// checkpointer.
    private func postmasterPID() async throws -> Int32 {
        if let directory = postgres.dataDirectory,
            let text = Files.contents(directory + "/postmaster.pid"),
            let pid = text.split(separator: "\n").first.flatMap({ Int32($0.trimmingCharacters(in: .whitespaces)) }),
            ProcessStat(pid: pid) != nil
        {
            return pid
        }
        let rows = try await database.admin("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
        guard let checkpointer = rows.first?.first.flatMap({ $0.flatMap { Int32($0) } }),
            let stat = ProcessStat(pid: checkpointer)
        else { throw BenchError("cannot find the postmaster: no postmaster.pid and no checkpointer") }
        return stat.parent
    }
}

/// The fields of `/proc/<pid>/stat` the bench needs.
struct ProcessStat {
    let pid: Int32
    /// Field 4.
    let parent: Int32
    /// Fields 14 (utime) + 15 (stime), in clock ticks.
    let cpuTicks: UInt64
    /// Field 22: with the pid, identifies the process (a reused pid is another process).
    let startTime: String

    init?(pid: Int32) {
        guard let fields = Files.processStatFields(pid), fields.count > 19, let parent = Int32(fields[1]),
            let user = UInt64(fields[11]),
            let system = UInt64(fields[12])
        else { return nil }
        self.pid = pid
        self.parent = parent
        cpuTicks = user + system
        startTime = String(fields[19])
    }
}

/// CPU ticks of a set of processes at one instant, by `pid:starttime`.
struct CPUReading {
    let ticks: [String: UInt64]
    let at: Double

    /// CPU seconds spent since `earlier` by the processes of this reading (those that started since: all of theirs;
    /// those that have exited since are not counted).
    func seconds(since earlier: CPUReading) -> Double {
        let ticks = self.ticks.reduce(UInt64(0)) { sum, entry in
            sum + entry.value - min(entry.value, earlier.ticks[entry.key] ?? 0)
        }
        return Double(ticks) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}

/// The CPU ticks of every process for which `include` holds.
func cpuTicks(where include: (ProcessStat) -> Bool) -> CPUReading {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return cpuTicks(of: entries.compactMap { Int32($0) }, where: include)
}

/// The CPU ticks of the processes `pids` (those still running) for which `include` holds.
func cpuTicks(of pids: [Int32], where include: (ProcessStat) -> Bool = { _ in true }) -> CPUReading {
    var ticks: [String: UInt64] = [:]
    for pid in pids {
        guard let stat = ProcessStat(pid: pid), include(stat) else { continue }
        ticks["\(pid):\(stat.startTime)"] = stat.cpuTicks
    }
    return CPUReading(ticks: ticks, at: monotonicSeconds())
}

/// Raises this process's soft RLIMIT_NOFILE to `needed` (at most the hard limit) when it is lower; returns the soft
/// limit in force.
func raiseDescriptorLimit(atLeast needed: Int) throws -> Int {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else {
        throw BenchError("getrlimit(RLIMIT_NOFILE) failed: \(String(cString: strerror(errno)))")
    }
    if limit.rlim_cur < rlim_t(needed) {
        limit.rlim_cur = min(rlim_t(needed), limit.rlim_max)
        guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else {
            throw BenchError("setrlimit(RLIMIT_NOFILE, \(limit.rlim_cur)) failed: \(String(cString: strerror(errno)))")
        }
    }
    guard limit.rlim_cur >= rlim_t(needed) else {
        throw BenchError(
            "this bench needs \(needed) file descriptors for its nodes, but the hard limit is \(limit.rlim_max): "
                + "raise it (ulimit -Hn) or pass fewer --nodes")
    }
    return Int(limit.rlim_cur)
}

/// The markdown report of an idle run and its verdicts.
struct IdleReport {
    let settings: IdleSettings
    let measured: IdleMeasurement
    let machine: Machine
    let descriptorLimit: Int
    let commandLine: String

    /// No overlap and no other problem (the performance targets are reported, not required).
    var passed: Bool { measured.findings.overlaps.isEmpty && measured.findings.problems.isEmpty }

    private var transactionsPerSecond: Double? {
        measured.complete && measured.transactionWindow > 0
            ? Double(measured.transactions) / measured.transactionWindow : nil
    }

    /// Calls of `stoker.sweep` per second over the transaction window: the cluster's pg_locks reads per second.
    private var sweepsPerSecond: Double? {
        measured.complete && measured.transactionWindow > 0
            ? Double(measured.sweepsAtEnd - measured.sweepsAtStart) / measured.transactionWindow : nil
    }

    private var cpuPercent: Double? {
        measured.complete && measured.cpuWindow > 0 ? measured.postgresCPU / measured.cpuWindow * 100 : nil
    }

    var markdown: String {
        let nodes = Double(settings.nodes)
        var out: [String] = []
        out.append("## stoker-bench idle")
        out.append("")
        out.append("- command: `\(commandLine)`")
        out.append("- date: \(ISO8601DateFormatter().string(from: Date()))")
        out.append("- machine: \(machine.uname), \(machine.processors) CPUs, \(machine.cpuModel)")
        out.append(
            "- PostgreSQL \(measured.postgresVersion): private cluster on this host (unix socket, fsync=off, "
                + "max_connections \(measured.maxConnections))")
        out.append(
            "- \(settings.nodes) `stoker node` processes, each in the same \(settings.elections) elections of one "
                + "cluster, lease \(settings.lease.text) (heartbeat and retry: lease / 5); all joined and one leader "
                + "per election \(String(format: "%.1f s", measured.startup)) after the first start; then "
                + "\(settings.settle.text) to settle, then a window of \(settings.measure.text) "
                + "(transactions over \(String(format: "%.3f s", measured.transactionWindow)), CPU over "
                + "\(String(format: "%.3f s", measured.cpuWindow)))")
        out.append(
            "- transactions: Δ of `sum(xact_commit + xact_rollback)` over every database of `pg_stat_database`, "
                + "read once at each end of the window, each time from a fresh admin session, minus the bench's own "
                + "2 (the first reading's transaction, which commits after it has read the counters, and the second "
                + "reading's session start-up); two readings 1 s apart before any node started differed by "
                + "\(measured.samplingCheck). The bench's database alone (where every node connects): "
                + rate(Double(measured.benchDatabaseTransactions), per: measured.transactionWindow)
                + ". A backend publishes its counts at most once a second, so either end may be off by up to a "
                + "second of traffic")
        let sweeps = measured.sweepsAtEnd - measured.sweepsAtStart
        let sweepError = measured.transactionWindow > 0 ? (sweepsPerSecond ?? 0) / measured.transactionWindow : 0
        out.append(
            "- pg_locks reads: calls of `stoker.sweep` (each reads pg_locks once) from `pg_stat_user_functions`, the "
                + "bench's database set to `track_functions = 'pl'` (`ALTER DATABASE`, as the superuser) before any "
                + "node connected (a fresh session shows `\(measured.trackFunctions)`; \(measured.sweepsBeforeNodes) "
                + "calls before any node started), read in the same statements as the transactions: "
                + (measured.complete
                    ? "\(measured.sweepsAtStart) at the start of the window, \(measured.sweepsAtEnd) at its end, "
                        + "\(sweeps) in \(String(format: "%.3f s", measured.transactionWindow))" : "–")
                + ". A backend flushes its function counts up to ~1 s after the calls: the window opens "
                + "\(settings.settle.text) after every election had its leader (the start-up sweeps long counted), and "
                + "both ends lag alike, so the rate is off by at most a second of sweeps over the window ("
                + String(format: "±%.2f /s", sweepError)
                + "). The nodes' other statements read pg_locks only where an idle cluster does not go: `whereis` "
                + "when a node sets an election up (once per election at its join) and `wait_for_lock` when the lock "
                + "it waited for came free in the very instant its wait timed out (a leader gone)")
        out.append(
            "- postgres CPU: utime + stime (`/proc/<pid>/stat` fields 14 and 15, \(sysconf(Int32(_SC_CLK_TCK))) "
                + "ticks/s) of the postmaster and every process whose parent it is (\(measured.postgresProcesses) "
                + "at the end: backends and background processes), per process over the window, as % of one core; "
                + "a process that ends within the window is not counted (the bench's own first reading, an "
                + "autovacuum worker)")
        let nodesPercent = measured.cpuWindow > 0 ? measured.nodesCPU / measured.cpuWindow * 100 : 0
        let nodesCPU =
            measured.complete
            ? String(format: "%.2f %% of a core in all, %.3f %% per node", nodesPercent, nodesPercent / nodes) : "–"
        out.append("- `stoker node` processes' own CPU (no target): " + nodesCPU)
        out.append(
            "- file descriptors: this bench holds 3 per node (stdout and stderr pipes, a pidfd); its soft "
                + "RLIMIT_NOFILE is \(descriptorLimit). The server's max_connections \(measured.maxConnections) "
                + "holds the \(settings.nodes * 2) node sessions plus the bench's own")
        out.append(
            "- leadership during the window: "
                + (measured.leadershipChanges == 0
                    ? "no change (every election kept its leader)"
                    : "\(measured.leadershipChanges) leadership events (`now_leader` or demotions)"))
        out.append("")
        let perNode = transactionsPerSecond.map { $0 / nodes }
        let transactionsMet = perNode.map { $0 <= IdleTarget.transactionsPerNode }
        let cpuMet = cpuPercent.map { $0 <= IdleTarget.cpuPercent }
        let sweepsMet = sweepsPerSecond.map { $0 <= IdleTarget.sweepsPerSecond }
        out.append(
            "| nodes | elections | client connections | transactions/s | transactions/s per node | target "
                + "| verdict | pg_locks reads (sweeps)/s, whole cluster | target | verdict "
                + "| postgres CPU (% of a core) | target | verdict |")
        out.append("|--:|--:|--:|--:|--:|---|---|--:|---|---|--:|---|---|")
        let connectionsPerNode = String(format: "%.2f", Double(measured.connections) / nodes)
        let perNodeText: String? = perNode.map { String(format: "%.3f", $0) }
        let cpuText: String? = cpuPercent.map { String(format: "%.2f %%", $0) }
        var cells: [String] = [String(settings.nodes), String(settings.elections)]
        cells.append("\(measured.connections) (\(connectionsPerNode) per node)")
        cells.append(transactionsPerSecond.map { String(format: "%.2f", $0) } ?? "–")
        cells.append(perNodeText ?? "–")
        cells.append(String(format: "≤ %g transactions/s per node", IdleTarget.transactionsPerNode))
        cells.append(verdict(transactionsMet, perNodeText.map { $0 + "/s" }, IdleTarget.transactionsPerNode))
        let sweepsText: String? = sweepsPerSecond.map { String(format: "%.2f", $0) }
        cells.append(sweepsText ?? "–")
        cells.append(String(format: "≤ %g /s for the whole cluster", IdleTarget.sweepsPerSecond))
        cells.append(verdict(sweepsMet, sweepsText.map { $0 + "/s" }, IdleTarget.sweepsPerSecond))
        cells.append(cpuText ?? "–")
        cells.append(String(format: "≤ %g %% of a core", IdleTarget.cpuPercent))
        cells.append(verdict(cpuMet, cpuText, IdleTarget.cpuPercent))
        out.append("| " + cells.joined(separator: " | ") + " |")
        if !measured.findings.overlaps.isEmpty {
            out.append("")
            out.append("### OVERLAPS (two leaders of one election at once)")
            out.append(contentsOf: measured.findings.overlaps.map { "- \($0)" })
        }
        out.append(
            contentsOf: resultFooter(
                problems: measured.findings.problems, passed: passed, targets: [transactionsMet, sweepsMet, cpuMet]))
        return out.joined(separator: "\n")
    }

    private func rate(_ count: Double, per seconds: Double) -> String {
        guard measured.complete && seconds > 0 else { return "–" }
        let perSecond = count / seconds
        return String(format: "%.2f transactions/s (%.3f per node)", perSecond, perSecond / Double(settings.nodes))
    }

    private func verdict(_ met: Bool?, _ value: String?, _ limit: Double) -> String {
        guard let met, let value else { return "n/a" }
        return met ? "met" : "**MISSED**: \(value) > \(String(format: "%g", limit))"
    }
}
