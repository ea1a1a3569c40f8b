import ArgumentParser
import Foundation
import StokerHarness

/// `stoker-bench node-down`: how long after a member dies its leader hears of it.
struct NodeDown: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node-down",
        abstract: "Death-detection latency: a killed follower's `node_down` at the leader of `stoker node`s.",
        discussion: """
            Starts a private PostgreSQL and --nodes `stoker node` participants in one election (`e`) of one cluster; \
            waits until one leads and every participant has joined (in `stoker.nodes` and in the leader's member \
            list). Each repetition then waits a random 0–1 s (so the kill falls at a random phase of the sweep \
            interval), SIGKILLs a random follower, and times the leader's `cluster_change` `node_down` naming the \
            victim's incarnation (its row in `stoker.nodes`, found by pid) from the CLOCK_MONOTONIC instant just \
            before the signal; then starts a replacement follower and waits for the leader's `node_up` of it. \
            After every participant is stopped (SIGTERM, each must exit 0), every line is checked: exactly one \
            `node_down` (reason `died`) per victim, none for a live member, and per election leaderships never \
            overlap and terms increase. Prints a markdown report; exits 1 on any correctness problem.
            """
    )

    @Option(name: .long, help: "Repetitions: followers killed, one at a time (at least 1).")
    var reps: Int = 20

    @Option(name: .long, help: "Participants in the election (at least 2: a leader and a follower to kill).")
    var nodes: Int = 3

    @Option(name: .long, help: "The lease of the nodes (their heartbeat is lease / 5, the sweep interval at most 1 s).")
    var lease: BenchDuration = BenchDuration(parsing: "5s")!

    func validate() throws {
        guard reps >= 1 else { throw ValidationError("--reps must be at least 1 (got \(reps)).") }
        guard (2...100).contains(nodes) else {
            throw ValidationError("--nodes must be between 2 and 100 (got \(nodes)): a leader and a follower to kill.")
        }
        guard lease.duration >= .milliseconds(500) else {
            throw ValidationError("--lease must be at least 500ms (got \(lease.text)).")
        }
    }

    func run() async throws {
        let stoker = try await locateStoker(nextTo: try ownExecutable(), otherwise: "")
        let settings = NodeDownSettings(reps: reps, nodes: nodes, lease: lease, stokerPath: stoker)
        let commandLine = CommandLine.arguments.map(shellQuoted).joined(separator: " ")
        let outcome = try await runNodeDownBenchmark(settings, commandLine: commandLine)
        print(outcome.report)
        fflush(nil)
        if !outcome.passed { throw ExitCode(1) }
    }
}

/// What `stoker-bench node-down` was asked to do.
struct NodeDownSettings: Sendable {
    let reps: Int
    let nodes: Int
    let lease: BenchDuration
    let stokerPath: String

    /// The nodes' heartbeat (`stoker node`'s default: lease / 5).
    var heartbeat: Double { lease.seconds / 5 }
    /// The nodes' sweep interval (the default: the heartbeat, at most 1 s).
    var sweepInterval: Double { min(heartbeat, 1) }
}

/// One follower killed and its `node_down` seen at the leader.
struct NodeDownSample: Sendable {
    let rep: Int
    let victim: String
    let incarnation: Int
    /// The participant holding the cluster's sweeper token just before the kill (nil: none).
    let sweeper: String?
    /// Whether the victim held the cluster's sweeper token when it was killed.
    var heldSweeperToken: Bool { sweeper == victim }
    /// The leader's `node_down` `at` minus the instant just before the SIGKILL, in seconds.
    let latency: Double
}

/// What a node-down run measured and found.
struct NodeDownResult: Sendable {
    var postgresVersion = "unknown"
    /// The participant that led the election throughout.
    var leader = "?"
    var samples: [NodeDownSample] = []
    /// Repetitions completed.
    var repetitions = 0
    /// Changes a leadership printed that its member list already showed (a `node_down` of a member not in it, a
    /// `node_up` of one in it), over every line of every participant.
    var duplicates = 0
    /// A victim's `node_down` printed again by another leadership, which began with the victim in its member list.
    var repeats: [String] = []
    /// Overlapping leaderships (each one a correctness failure).
    var overlaps: [String] = []
    /// Everything else that went wrong.
    var problems: [String] = []
}

/// The target of a node-down run.
private enum NodeDownTarget {
    /// p99 of the latency, in seconds.
    static let p99 = 1.5
}

/// Starts a private PostgreSQL, runs the repetitions on it, checks every line; returns the report.
func runNodeDownBenchmark(_ settings: NodeDownSettings, commandLine: String) async throws -> BenchOutcome {
    try await TestPostgres.withPrivate { postgres in
        try await postgres.withDatabase { database in
            let version = try await database.admin("SHOW server_version").first?.first ?? nil
            let migrated = try await runProcess([settings.stokerPath, "migrate", "--url", database.conninfo])
            guard migrated.status == 0 else {
                throw BenchError("`stoker migrate` exited \(migrated.status): \(migrated.standardError)")
            }
            var run = NodeDownRun(settings: settings, database: database)
            var result = await run.run()
            result.postgresVersion = version ?? "unknown"
            let report = NodeDownReport(
                settings: settings, result: result, machine: await Machine.current(), commandLine: commandLine)
            return BenchOutcome(report: report.markdown, passed: report.passed)
        }
    }
}

/// One node-down run: the participants, the kills, the checks.
struct NodeDownRun {
    let settings: NodeDownSettings
    let database: TestDatabase
    private let cluster = "bench-node-down"
    private let election = "e"
    private var result = NodeDownResult()
    /// Every participant started, for the final checks of all lines.
    private var everyone: [Participant] = []
    /// The participants running now.
    private var live: [Participant] = []
    /// The SIGKILL instant of each victim, by name.
    private var killedAt: [String: Double] = [:]
    /// The victims, incarnation → name.
    private var victims: [Int: String] = [:]
    /// Every participant's incarnation → name.
    private var names: [Int: String] = [:]
    private var random = SystemRandomNumberGenerator()

    init(settings: NodeDownSettings, database: TestDatabase) {
        self.settings = settings
        self.database = database
    }

    /// Runs the repetitions, stops every participant, checks all lines. Never throws: failures become problems.
    mutating func run() async -> NodeDownResult {
        do {
            let leader = try await startAll()
            result.leader = leader.name
            for rep in 1...settings.reps {
                try await repetition(rep, leader: leader)
                result.repetitions = rep
            }
        } catch {
            let message = "aborted after \(result.repetitions) of \(settings.reps) repetitions: \(error)"
            progress("node-down: \(message)")
            result.problems.append(message)
        }
        // A grace before the final stop: every live node has read the last node_down by then (a node reads the
        // notifications between its statements), so the hand-overs of the stop begin with current member lists.
        try? await Task.sleep(for: .seconds(2 * settings.heartbeat))
        let stopping = monotonicSeconds()
        result.problems += await stopParticipants(live, when: "the final SIGTERM")
        live = []
        for participant in everyone { await participant.process.close() }
        checkNodeDowns(before: stopping)
        let findings = checkLeaderships(everyone, killedAt: killedAt)
        result.overlaps = findings.overlaps
        result.problems += findings.problems
        for overlap in findings.overlaps { progress("OVERLAP (node-down): \(overlap)") }
        return result
    }

    /// Starts every participant at once; waits until they have all joined, one leads, its member list holds every
    /// one of them, and one of them holds the sweeper token (taken with a heartbeat). Returns the leader.
    private mutating func startAll() async throws -> Participant {
        for _ in 1...settings.nodes { live.append(try await startParticipant()) }
        let participants = live
        try await waitUntilJoined(participants, timeout: .seconds(60)) { [database, cluster] in
            try await joinedStokerNodes(database, cluster: cluster, pids: participants.map(\.process.pid))
        }
        let leaders = try await waitForOneLeaderEach(participants, elections: [election], timeout: .seconds(60))
        guard let leader = participants.first(where: { $0.name == leaders[election] }) else {
            throw BenchError("no participant leads \(election)")
        }
        var expected: [Int: String] = [:]
        for participant in participants { expected[try await lookUpIncarnation(of: participant)] = participant.name }
        names = expected
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        while memberView(of: leader) != expected {
            guard ContinuousClock.now < deadline else {
                throw BenchError(
                    "\(leader.name)'s member list \(describe(memberView(of: leader))) is not the joined nodes "
                        + describe(expected) + " after 30 s")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        var sweeper = try await sweeperTokenHolder()
        while sweeper == nil {
            guard ContinuousClock.now < deadline else { throw BenchError("no node took the sweeper token") }
            try await Task.sleep(for: .milliseconds(20))
            sweeper = try await sweeperTokenHolder()
        }
        progress(
            "node-down: \(settings.nodes) nodes joined, \(leader.name) leads with members \(describe(expected)), "
                + "sweeper: \(sweeper.flatMap { names[$0] } ?? "?")")
        return leader
    }

    private mutating func startParticipant() async throws -> Participant {
        let name = "n\(everyone.count + 1)"
        let arguments = stokerNodeArguments(
            stoker: settings.stokerPath, conninfo: database.conninfo, cluster: cluster, elections: [election],
            name: name, lease: settings.lease)
        let participant = Participant(name: name, process: try await NodeProcess.start(arguments))
        everyone.append(participant)
        return participant
    }

    /// One repetition: kill a random follower, time the leader's `node_down` of it, replace it.
    private mutating func repetition(_ rep: Int, leader: Participant) async throws {
        let leading = leadersByElection(live, elections: [election])[election] ?? []
        guard leading == [leader.name] else {
            throw BenchError("expected \(leader.name) to lead \(election) throughout; leading now: \(leading)")
        }
        guard let victim = live.filter({ $0.name != leader.name }).randomElement(using: &random) else {
            throw BenchError("no follower to kill")
        }
        let incarnation = try await lookUpIncarnation(of: victim)
        if memberView(of: leader)[incarnation] != victim.name {
            result.problems.append(
                "rep \(rep): \(leader.name)'s member list \(describe(memberView(of: leader))) lacks the victim "
                    + "\(victim.name)#\(incarnation)")
        }
        try await Task.sleep(for: .milliseconds(Int.random(in: 0..<1_000, using: &random)))
        let sweeper = try await sweeperTokenHolder()
        let mark = leader.process.lines.count

        let killed = monotonicSeconds()
        guard victim.process.signal(SIGKILL) else {
            throw BenchError("could not send SIGKILL to \(victim.name): it has already exited")
        }
        killedAt[victim.name] = killed
        victims[incarnation] = victim.name
        live.removeAll { $0.name == victim.name }
        let line = try await leader.process.waitForLine(from: mark, timeout: .seconds(30)) {
            Event($0.text)?.isNodeDown(of: incarnation) ?? false
        }
        guard let down = Event(line.text) else { throw BenchError("unparsable line: \(line.text)") }
        let latency = down.at - killed
        result.samples.append(
            NodeDownSample(
                rep: rep, victim: victim.name, incarnation: incarnation,
                sweeper: sweeper.map { names[$0] ?? "#\($0)" }, latency: latency))
        if down.reason != "died" || down.member != victim.name {
            result.problems.append(
                "rep \(rep): \(leader.name)'s node_down of \(victim.name)#\(incarnation) names "
                    + "\(down.member ?? "nobody") with reason \(down.reason ?? "none"), not \(victim.name) and died")
        }
        let status = try await victim.process.waitForExit(timeout: .seconds(30))
        if status != 128 + SIGKILL {
            result.problems.append("rep \(rep): \(victim.name) exited \(status) after SIGKILL")
        }

        let upMark = leader.process.lines.count
        let replacement = try await startParticipant()
        live.append(replacement)
        let upLine = try await leader.process.waitForLine(from: upMark, timeout: .seconds(30)) {
            Event($0.text)?.isNodeUp(named: replacement.name) ?? false
        }
        let replacementIncarnation = try await lookUpIncarnation(of: replacement)
        names[replacementIncarnation] = replacement.name
        if let up = Event(upLine.text), up.memberIncarnation != replacementIncarnation {
            result.problems.append(
                "rep \(rep): \(leader.name)'s node_up of \(replacement.name) names incarnation "
                    + "\(up.memberIncarnation.map(String.init) ?? "none"), its row is \(replacementIncarnation)")
        }
        progress(
            "node-down rep \(rep)/\(settings.reps): killed \(victim.name)#\(incarnation) (sweeper: "
                + (sweeper.map { names[$0] ?? "#\($0)" } ?? "none") + ") → node_down at \(leader.name) in "
                + formatMilliseconds(latency) + "; \(replacement.name)#\(replacementIncarnation) up")
    }

    /// The incarnation (row id in `stoker.nodes`) of `participant`, found by its pid.
    private func lookUpIncarnation(of participant: Participant) async throws -> Int {
        let rows = try await database.admin(
            """
            SELECT n.id FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id
             WHERE c.name = '\(cluster)' AND n.pid = \(participant.process.pid)
            """)
        guard rows.count == 1, let id = rows[0].first.flatMap({ $0.flatMap { Int($0) } }) else {
            throw BenchError("expected one row of \(participant.name) in stoker.nodes, found \(rows.count)")
        }
        return id
    }

    /// The incarnation whose main or witness session holds the sweeper token, if any: at e024dbe the cluster's
    /// single-bigint advisory lock (namespace << 32 | cluster id: objsubid 1, objid the cluster id); a token of the
    /// two-int4 form (namespace, -2^31) is recognised as well.
    private func sweeperTokenHolder() async throws -> Int? {
        let rows = try await database.admin(
            """
            SELECT n.id FROM pg_locks l
              JOIN stoker.clusters c ON c.name = '\(cluster)'
              JOIN stoker.nodes n ON n.cluster_id = c.id AND l.pid IN (n.backend_pid, n.witness_pid)
             WHERE l.locktype = 'advisory' AND l.granted
               AND ((l.objsubid = 1 AND l.objid = c.id::oid) OR (l.objsubid = 2 AND l.objid = 2147483648::oid))
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            """)
        return rows.first?.first.flatMap { $0.flatMap { Int($0) } }
    }

    /// The members of the cluster as `leader`'s lines tell: the list of its last `now_leader` in the election, changed
    /// by every `cluster_change` after it; incarnation → name.
    private func memberView(of leader: Participant) -> [Int: String] {
        var members: [Int: String] = [:]
        for event in leader.events where event.election == election {
            if event.isNowLeader {
                members = parseMembers(event.members ?? [])
            } else if event.event == "cluster_change", let id = event.memberIncarnation {
                if event.change == "node_up" {
                    members[id] = event.member ?? "?"
                } else if event.change == "node_down" {
                    members[id] = nil
                }
            }
        }
        return members
    }

    private func describe(_ members: [Int: String]) -> String {
        "[" + members.sorted { $0.key < $1.key }.map { "\($0.value)#\($0.key)" }.joined(separator: ", ") + "]"
    }

    /// Over every line of every participant, leadership by leadership (its `now_leader` member list, changed by every
    /// `cluster_change` after it): the leader that led throughout printed exactly one `node_down` per victim, with
    /// reason `died`; no leadership printed a change its member list already showed (a duplicate); none printed a
    /// `node_down` of a member not killed before the final stop (at `stopping`). A victim's `node_down` printed by
    /// another leadership (one that began, at the final stop, with the victim still in its list) is no duplicate: it is
    /// counted apart.
    private mutating func checkNodeDowns(before stopping: Double) {
        var atLeader: [Int: Int] = [:]
        for participant in everyone {
            var view: [Int: String]?
            var began: Event?
            for line in participant.process.lines {
                guard let event = Event(line.text), event.election == election else { continue }
                if event.isNowLeader {
                    view = parseMembers(event.members ?? [])
                    began = event
                    continue
                }
                if event.isDemotion {
                    view = nil
                    continue
                }
                guard event.event == "cluster_change", let change = event.change else { continue }
                guard let id = event.memberIncarnation, var members = view else {
                    result.problems.append(
                        "\(participant.name) printed a cluster_change outside a leadership: \(line.text)")
                    continue
                }
                let redundant = change == "node_down" ? members[id] == nil : members[id] != nil
                if redundant {
                    result.duplicates += 1
                    result.problems.append(
                        "\(participant.name) printed a \(change) its member list already showed: `\(line.text)`")
                }
                members[id] = change == "node_down" ? nil : (event.member ?? "?")
                view = members
                guard change == "node_down" else { continue }
                if let victim = victims[id] {
                    // The leader's reason was checked when the line came.
                    if participant.name == result.leader {
                        atLeader[id, default: 0] += 1
                    } else {
                        result.repeats.append(
                            "\(participant.name)'s leadership that began at \(began?.at ?? 0) with "
                                + "\(victim)#\(id) in its member list printed its node_down at \(event.at)")
                    }
                    if participant.name != result.leader && event.reason != "died" {
                        result.problems.append(
                            "\(participant.name) printed node_down of \(victim)#\(id) with reason "
                                + "\(event.reason ?? "none"), not died")
                    }
                } else if event.at < stopping {
                    result.problems.append(
                        "\(participant.name) printed node_down of \(event.member ?? "?")#\(id), which was not killed: "
                            + "`\(line.text)`")
                }
            }
        }
        for (id, name) in victims.sorted(by: { $0.key < $1.key }) where atLeader[id, default: 0] != 1 {
            let count = atLeader[id, default: 0]
            result.problems.append("\(result.leader) printed \(count) node_down lines of \(name)#\(id), not one")
        }
    }
}

/// `name#incarnation` texts → incarnation → name.
private func parseMembers(_ members: [String]) -> [Int: String] {
    var parsed: [Int: String] = [:]
    for member in members {
        guard let hash = member.lastIndex(of: "#"), let id = Int(member[member.index(after: hash)...]) else { continue }
        parsed[id] = String(member[..<hash])
    }
    return parsed
}

/// The markdown report of a node-down run and its verdict.
struct NodeDownReport {
    let settings: NodeDownSettings
    let result: NodeDownResult
    let machine: Machine
    let commandLine: String

    /// No overlap, no duplicate, no other problem (the latency target is reported, not required).
    var passed: Bool { result.overlaps.isEmpty && result.problems.isEmpty && result.duplicates == 0 }

    private var complete: Bool { result.repetitions == settings.reps }

    /// Whether the target was met (nil: not measured in full), and how it was missed.
    private var target: (met: Bool?, misses: [String]) {
        let latencies = result.samples.map(\.latency)
        guard complete, let p99 = nearestRank(99, of: latencies) else { return (nil, []) }
        var misses: [String] = []
        if p99 > NodeDownTarget.p99 {
            misses.append(
                "p99 \(seconds(p99)) > \(seconds(NodeDownTarget.p99)) by \(seconds(p99 - NodeDownTarget.p99))")
        }
        if result.duplicates > 0 { misses.append("\(result.duplicates) duplicates") }
        if !result.overlaps.isEmpty { misses.append("\(result.overlaps.count) overlaps") }
        return (misses.isEmpty, misses)
    }

    var markdown: String {
        var out: [String] = []
        out.append("## stoker-bench node-down")
        out.append("")
        out.append("- command: `\(commandLine)`")
        out.append("- date: \(ISO8601DateFormatter().string(from: Date()))")
        out.append("- machine: \(machine.uname), \(machine.processors) CPUs, \(machine.cpuModel)")
        out.append("- PostgreSQL \(result.postgresVersion): private cluster on this host (unix socket, fsync=off)")
        out.append(
            "- \(settings.nodes) `stoker node` participants in one election (`e`) of one cluster, lease "
                + "\(settings.lease.text) (heartbeat lease / 5 = \(seconds(settings.heartbeat)); sweep interval the "
                + "default, the heartbeat at most 1 s = \(seconds(settings.sweepInterval))); started together; all joined, "
                + "in the leader's member list, and the sweeper token taken before the first repetition; "
                + "\(result.leader) led throughout")
        out.append(
            "- each of \(settings.reps) repetitions: a random pause of 0–1 s (the kill falls at a random phase of "
                + "the sweep interval), SIGKILL to a random follower, the leader's `cluster_change` `node_down` "
                + "naming the victim's incarnation (its `stoker.nodes` row, found by pid) awaited; then a "
                + "replacement follower started and the leader's `node_up` of it awaited; after the last, a grace of "
                + "2 × heartbeat, then every participant stopped with SIGTERM")
        out.append(
            "- latency: the leader's `node_down` `at` minus the CLOCK_MONOTONIC instant just before the SIGKILL; "
                + "percentiles by nearest rank")
        out.append(
            "- duplicates, counted once all were stopped, over every line of every participant, leadership by "
                + "leadership (its `now_leader` member list changed by every `cluster_change` after it): changes a "
                + "leadership printed that its list already showed; besides, \(result.leader) must have printed "
                + "exactly one `node_down` (reason `died`) per victim, and nobody one of a member not killed. "
                + (result.repeats.isEmpty
                    ? "No other leadership printed a victim's `node_down`"
                    : "Another leadership printed a victim's `node_down` \(result.repeats.count) times (it began, at "
                        + "the final stop, with the victim in its member list: no duplicate for it): "
                        + result.repeats.joined(separator: "; ")))
        let sweepers = result.samples.filter(\.heldSweeperToken)
        var holders: [String: Int] = [:]
        for sample in result.samples { holders[sample.sweeper ?? "nobody", default: 0] += 1 }
        let held = holders.sorted { ($0.value, $1.key) > ($1.value, $0.key) }.map { holder, count in
            "\(holder)\(holder == result.leader ? " (the leader)" : "") at \(count)"
        }
        out.append(
            "- the sweeper token just before each kill: held by " + held.joined(separator: ", ") + " of the "
                + "\(result.samples.count) kills; \(sweepers.count) victims held it (then the survivors try it with "
                + "their next heartbeat, and its new holder sweeps at once)")
        out.append("")
        out.append("| victims | count | p50 | p99 | max | duplicates | overlaps | target | verdict |")
        out.append("|---|--:|--:|--:|--:|--:|--:|---|---|")
        let (met, misses) = target
        let verdict = met.map { $0 ? "met" : "**MISSED**: " + misses.joined(separator: "; ") } ?? "n/a"
        out.append(
            row(
                "all", result.samples, String(result.duplicates), String(result.overlaps.count),
                "p99 ≤ \(seconds(NodeDownTarget.p99)), one `node_down` per death, no overlap", verdict))
        out.append(row("held the sweeper token", sweepers, "–", "–", "–", "–"))
        out.append(row("did not", result.samples.filter { !$0.heldSweeperToken }, "–", "–", "–", "–"))
        if !result.overlaps.isEmpty {
            out.append("")
            out.append("### OVERLAPS (two leaders at once)")
            out.append(contentsOf: result.overlaps.map { "- \($0)" })
        }
        out.append(contentsOf: resultFooter(problems: result.problems, passed: passed, targets: [met]))
        return out.joined(separator: "\n")
    }

    private func row(
        _ label: String, _ samples: [NodeDownSample], _ duplicates: String, _ overlaps: String, _ target: String,
        _ verdict: String
    ) -> String {
        let latencies = samples.map(\.latency)
        let cells = [
            label, String(samples.count), seconds(nearestRank(50, of: latencies)),
            seconds(nearestRank(99, of: latencies)), seconds(latencies.max()), duplicates, overlaps, target, verdict,
        ]
        return "| " + cells.joined(separator: " | ") + " |"
    }

    private func seconds(_ value: Double?) -> String {
        guard let value else { return "–" }
        return value < 1 ? String(format: "%.1f ms", value * 1_000) : String(format: "%.3f s", value)
    }
}
