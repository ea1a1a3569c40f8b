import Foundation
import StokerHarness

/// One participant process.
struct Participant: Sendable {
    /// The harness's name for it (`n3` for `stoker node --name n3`, `f3` for a floor client).
    let name: String
    let process: NodeProcess

    /// Its parsed lines.
    var events: [Event] { process.lines.compactMap { Event($0.text) } }

    /// The elections whose last leadership event is a `now_leader`.
    var leadingElections: Set<String> {
        var leading: Set<String> = []
        for event in events {
            if event.isNowLeader {
                leading.insert(event.election)
            } else if event.isDemotion {
                leading.remove(event.election)
            }
        }
        return leading
    }
}

/// The election names of a participant standing in `count` elections: `e` for one (the name `failover` has always
/// used), else `e1` … `eN`.
func electionNames(_ count: Int) -> [String] {
    count == 1 ? ["e"] : (1...count).map { "e\($0)" }
}

/// The command line of one `stoker node` participant.
func stokerNodeArguments(
    stoker: String, conninfo: String, cluster: String, elections: [String], name: String, lease: BenchDuration
) -> [String] {
    [stoker, "node", "--url", conninfo, "--cluster", cluster]
        + elections.flatMap { ["--election", $0] }
        + ["--name", name, "--lease", lease.text]
}

/// election → the names of the participants leading it now, by their lines (every election of `elections` present).
func leadersByElection(_ participants: [Participant], elections: [String]) -> [String: [String]] {
    var leaders = Dictionary(uniqueKeysWithValues: elections.map { ($0, [String]()) })
    for participant in participants {
        for election in participant.leadingElections.sorted() {
            leaders[election, default: []].append(participant.name)
        }
    }
    return leaders
}

/// How many of the processes `pids` have joined the Stoker cluster `cluster` (rows in `stoker.nodes`).
func joinedStokerNodes(_ database: TestDatabase, cluster: String, pids: [Int32]) async throws -> Int {
    let list = pids.map(String.init).joined(separator: ",")
    let rows = try await database.admin(
        """
        SELECT count(*) FROM stoker.nodes n JOIN stoker.clusters c ON c.id = n.cluster_id
         WHERE c.name = '\(cluster)' AND n.pid = ANY('{\(list)}'::int[])
        """)
    return rows.first?.first.flatMap { $0.flatMap { Int($0) } } ?? 0
}

/// Polls `joined` until it reports every one of `participants`; throws when one of them exits first or after
/// `timeout`.
func waitUntilJoined(
    _ participants: [Participant], timeout: Duration, joined: () async throws -> Int
) async throws {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    while true {
        let count = try await joined()
        if count == participants.count { return }
        if let gone = participants.first(where: { $0.process.exitStatus != nil }) {
            throw BenchError(
                "\(gone.name) exited with status \(gone.process.exitStatus ?? -1) while joining; stderr:\n"
                    + gone.process.standardError)
        }
        guard ContinuousClock.now < deadline else {
            throw BenchError("only \(count) of \(participants.count) participants joined within \(timeout)")
        }
        try await Task.sleep(for: .milliseconds(20))
    }
}

/// Waits until the lines show exactly one leader in every election of `elections`; returns election → leader.
func waitForOneLeaderEach(
    _ participants: [Participant], elections: [String], timeout: Duration
) async throws -> [String: String] {
    let deadline = ContinuousClock.now.advanced(by: timeout)
    while true {
        let leaders = leadersByElection(participants, elections: elections)
        if leaders.values.allSatisfy({ $0.count == 1 }) { return leaders.compactMapValues(\.first) }
        if let gone = participants.first(where: { $0.process.exitStatus != nil }) {
            throw BenchError(
                "\(gone.name) exited with status \(gone.process.exitStatus ?? -1) before every election had a "
                    + "leader; stderr:\n" + gone.process.standardError)
        }
        guard ContinuousClock.now < deadline else {
            let state = leaders.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }
            throw BenchError("not one leader per election within \(timeout): \(state.joined(separator: ", "))")
        }
        try await Task.sleep(for: .milliseconds(50))
    }
}

/// The first `now_leader` in `election` printed by any of `candidates` from line `marks[i]` of candidate `i` on
/// (nil: from now on).
func firstNowLeader(
    in election: String, among candidates: [Participant], from marks: [Int]? = nil, timeout: Duration
) async throws -> (participant: Participant, event: Event) {
    let marks = marks ?? candidates.map { $0.process.lines.count }
    do {
        let (index, line) = try await NodeProcess.firstLine(
            among: candidates.map(\.process), from: marks, timeout: timeout
        ) { _, line in
            Event(line.text).map { $0.isNowLeader && $0.election == election } ?? false
        }
        guard let event = Event(line.text) else { throw BenchError("unparsable line: \(line.text)") }
        return (candidates[index], event)
    } catch let error as NodeProcessError {
        throw BenchError("no participant became leader of \(election):\n" + error.message)
    }
}

/// SIGTERM to every one of `participants` (resuming a frozen one first); each must exit 0 within 30 s. Returns the
/// problems (`when` says which stop it was, e.g. "the final SIGTERM").
func stopParticipants(_ participants: [Participant], when: String) async -> [String] {
    for participant in participants {
        participant.process.signal(SIGCONT)
        participant.process.signal(SIGTERM)
    }
    var problems: [String] = []
    for participant in participants {
        do {
            let status = try await participant.process.waitForExit(timeout: .seconds(30))
            if status != 0 {
                problems.append(
                    "\(participant.name) exited \(status) after \(when); stderr:\n"
                        + String(participant.process.standardError.suffix(1_000)))
            }
        } catch {
            problems.append("\(participant.name) did not stop after \(when): \(error)")
        }
    }
    return problems
}

/// The correctness findings over every line of `participants`.
struct LeadershipFindings {
    /// Overlapping leaderships of one election (each one a correctness failure).
    var overlaps: [String] = []
    /// Terms that did not increase, demotions without `ended_at`, leaderships that never ended, ….
    var problems: [String] = []
}

/// Per election, over every line of `participants`: leaderships [now_leader.at, ended_at] never overlap and terms
/// increase. `killedAt` gives the end of the leaderships a SIGKILLed participant could not print.
func checkLeaderships(_ participants: [Participant], killedAt: [String: Double]) -> LeadershipFindings {
    struct Leadership {
        let name: String
        let start: Double
        let end: Double
        let term: Int?
    }
    var findings = LeadershipFindings()
    var byElection: [String: [Leadership]] = [:]
    for participant in participants {
        var open: [String: Event] = [:]
        for event in participant.events {
            if event.isNowLeader {
                if open[event.election] != nil {
                    findings.problems.append(
                        "\(participant.name) printed now_leader twice in a row in \(event.election)")
                }
                open[event.election] = event
            } else if event.isDemotion, let start = open[event.election] {
                if event.endedAt == nil {
                    findings.problems.append(
                        "\(participant.name): a demotion without ended_at in \(event.election): \(event.event)")
                }
                let leadership = Leadership(
                    name: participant.name, start: start.at, end: event.endedAt ?? event.at, term: start.term)
                byElection[event.election, default: []].append(leadership)
                open[event.election] = nil
            }
        }
        for (election, start) in open.sorted(by: { $0.key < $1.key }) {
            let end = killedAt[participant.name]
            if end == nil {
                findings.problems.append("\(participant.name)'s last leadership of \(election) never ended")
            }
            byElection[election, default: []].append(
                Leadership(name: participant.name, start: start.at, end: end ?? .infinity, term: start.term))
        }
    }
    let multiple = byElection.count > 1
    for (election, leaderships) in byElection.sorted(by: { $0.key < $1.key }) {
        let sorted = leaderships.sorted { $0.start < $1.start }
        let prefix = multiple ? "\(election): " : ""
        for (earlier, later) in zip(sorted, sorted.dropFirst()) {
            if earlier.end > later.start {
                findings.overlaps.append(
                    prefix + "\(earlier.name) (term \(earlier.term.map(String.init) ?? "?")) led until \(earlier.end), "
                        + "\(formatMilliseconds(earlier.end - later.start)) after \(later.name) (term "
                        + "\(later.term.map(String.init) ?? "?")) began at \(later.start)")
            }
            if let first = earlier.term, let second = later.term, second <= first {
                findings.problems.append(
                    prefix + "term did not increase: \(earlier.name) term \(first), then \(later.name) term \(second)")
            }
        }
    }
    return findings
}
