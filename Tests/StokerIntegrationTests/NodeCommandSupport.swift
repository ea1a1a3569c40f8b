import Foundation
import StokerHarness
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// One JSON line of `stoker node`, and which process printed it.
struct ParticipantLine: Sendable, CustomStringConvertible {
    let process: String
    let raw: String
    let node: String
    let incarnation: Int?
    let election: String
    let event: String
    let term: Int64?
    /// Seconds of CLOCK_MONOTONIC.
    let at: Double
    let endedAt: Double?
    let reason: String?

    /// `nil` for a line that is not one of its JSON objects (the checker reports those).
    init?(_ text: String, process: String) {
        guard let data = text.data(using: .utf8),
            let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any],
            let node = object["node"] as? String, let election = object["election"] as? String,
            let event = object["event"] as? String, let at = (object["at"] as? NSNumber)?.doubleValue,
            object["time"] is String
        else { return nil }
        self.process = process
        raw = text
        self.node = node
        incarnation = (object["incarnation"] as? NSNumber)?.intValue
        self.election = election
        self.event = event
        term = (object["term"] as? NSNumber)?.int64Value
        self.at = at
        endedAt = (object["ended_at"] as? NSNumber)?.doubleValue
        reason = object["reason"] as? String
    }

    var description: String { "\(process): \(raw)" }
}

/// Every line of every participant, judged by the election's guarantees: per election, leaderships `[now_leader.at,
/// demotion.ended_at]` never overlap and their terms rise; every `now_leader` has exactly one demotion
/// (`now_follower` or `shutdown`, with `ended_at`), unless its process was killed — then the leadership ended no
/// earlier than the kill, and every successor must have started after it.
struct LineHistory: Sendable {
    let lines: [ParticipantLine]
    let unparsable: [String]
    /// Processes killed with SIGKILL, and when the signal was sent.
    let killed: [String: Double]

    struct Leadership: Sendable {
        let process: String
        let term: Int64?
        let start: Double
        /// `nil`: not demoted (still leading, or killed).
        let end: Double?
    }

    /// The processes whose last word on `election` is `now_leader`.
    func currentLeaders(election: String) -> [String] {
        leaderships(election: election).filter { $0.end == nil && killed[$0.process] == nil }.map(\.process)
    }

    func leaderships(election: String) -> [Leadership] {
        var open: [String: ParticipantLine] = [:]
        var result: [Leadership] = []
        for line in lines where line.election == election {
            if line.event == "now_leader" {
                if let previous = open[line.process] {
                    result.append(
                        Leadership(process: previous.process, term: previous.term, start: previous.at, end: nil))
                }
                open[line.process] = line
            } else if let endedAt = line.endedAt, let start = open.removeValue(forKey: line.process) {
                result.append(Leadership(process: line.process, term: start.term, start: start.at, end: endedAt))
            }
        }
        for line in open.values {
            result.append(Leadership(process: line.process, term: line.term, start: line.at, end: nil))
        }
        return result.sorted { $0.start < $1.start }
    }

    /// What breaks the guarantees (empty: none). `complete`: every process has stopped, so every leadership of a
    /// process not killed must have been demoted.
    func problems(complete: Bool) -> [String] {
        var problems = unparsable.map { "not a stoker node line: \($0)" }
        var byProcess: [String: [ParticipantLine]] = [:]
        for line in lines { byProcess[line.process, default: []].append(line) }
        for (process, own) in byProcess {
            var leading: Set<String> = []
            for line in own {
                switch line.event {
                case "now_leader":
                    if line.term == nil { problems.append("now_leader without a term: \(line)") }
                    if !leading.insert(line.election).inserted { problems.append("now_leader twice: \(line)") }
                case "now_follower", "shutdown":
                    if leading.remove(line.election) != nil {
                        if line.endedAt == nil { problems.append("a demotion without ended_at: \(line)") }
                        if let endedAt = line.endedAt, endedAt > line.at {
                            problems.append("ended_at after the line's own at: \(line)")
                        }
                    } else if line.event == "now_follower" {
                        problems.append("now_follower without a now_leader before it: \(line)")
                    } else if line.endedAt != nil {
                        problems.append("ended_at on a shutdown that ends no leadership: \(line)")
                    }
                default:
                    break
                }
            }
            if complete, killed[process] == nil, !leading.isEmpty {
                problems.append("\(process) never demoted from \(leading.sorted())")
            }
        }
        for election in Set(lines.map(\.election)).sorted() {
            let all = leaderships(election: election)
            for (earlier, later) in zip(all, all.dropFirst()) {
                let end = earlier.end ?? killed[earlier.process]
                guard let end else {
                    problems.append(
                        "\(election): \(earlier.process) still leads (term \(earlier.term ?? -1)) when "
                            + "\(later.process) starts at \(later.start)")
                    continue
                }
                if end > later.start {
                    problems.append(
                        "\(election): overlap of \(Int(((end - later.start) * 1_000_000).rounded())) µs — "
                            + "\(earlier.process) term \(earlier.term ?? -1) ended at \(end), "
                            + "\(later.process) term \(later.term ?? -1) started at \(later.start)")
                }
                if let a = earlier.term, let b = later.term, b <= a {
                    problems.append("\(election): term \(b) of \(later.process) does not rise above \(a)")
                }
            }
        }
        return problems
    }

    func dump() -> String {
        "\n" + lines.sorted { $0.at < $1.at }.map(\.description).joined(separator: "\n")
    }
}

/// The `stoker node` processes of one test; on the way out (also on failure) every one still running is killed.
final class Participants: Sendable {
    struct Participant: Sendable {
        let name: String
        let process: NodeProcess
    }

    let database: TestDatabase
    let cluster: String
    private let state = Mutex<(all: [Participant], killed: [String: Double])>(([], [:]))

    init(database: TestDatabase) {
        self.database = database
        cluster = "cli-\(UInt32.random(in: 0...UInt32.max))"
    }

    var all: [Participant] { state.withLock { $0.all } }

    /// Starts `stoker node` as `name` standing in `elections`, with more `options` (flags of `stoker node`).
    @discardableResult
    func start(
        _ name: String, elections: [String], lease: String? = nil, options: [String] = []
    ) async throws -> Participant {
        var arguments = [
            try builtExecutable("stoker"), "node", "--url", database.conninfo, "--cluster", cluster, "--name", name,
        ]
        for election in elections { arguments += ["--election", election] }
        if let lease { arguments += ["--lease", lease] }
        arguments += options
        let process = try await NodeProcess.start(arguments, environment: ["PATH": "/usr/bin:/bin", "LANG": "C"])
        let participant = Participant(name: name, process: process)
        state.withLock { $0.all.append(participant) }
        return participant
    }

    func markKilled(_ name: String, at instant: Double) {
        state.withLock { $0.killed[name] = instant }
    }

    func history() -> LineHistory {
        let (all, killed) = state.withLock { ($0.all, $0.killed) }
        var lines: [ParticipantLine] = []
        var unparsable: [String] = []
        for participant in all {
            for line in participant.process.lines {
                if let parsed = ParticipantLine(line.text, process: participant.name) {
                    lines.append(parsed)
                } else {
                    unparsable.append("\(participant.name): \(line.text)")
                }
            }
        }
        return LineHistory(lines: lines, unparsable: unparsable, killed: killed)
    }

    /// Waits until `size` nodes have joined the cluster (their rows; a fresh follower prints nothing, and a leader
    /// hears of no node that joined before it led) and some participant has printed `now_leader` for `election`.
    func waitForCluster(election: String, size: Int) async throws {
        try await waitForMembers(size, cluster: cluster, in: database)
        _ = try await firstLine(among: all, timeout: .seconds(60)) { line in
            line.event == "now_leader" && line.election == election
        }
    }

    /// The first line, among `participants`, that `predicate` accepts (already printed or to come).
    func firstLine(
        among participants: [Participant], timeout: Duration,
        where predicate: @escaping @Sendable (ParticipantLine) -> Bool
    ) async throws -> (Participant, ParticipantLine) {
        let (index, line) = try await NodeProcess.firstLine(
            among: participants.map(\.process), timeout: timeout
        ) { index, raw in
            ParticipantLine(raw.text, process: participants[index].name).map(predicate) ?? false
        }
        return (participants[index], try #require(ParticipantLine(line.text, process: participants[index].name)))
    }

    /// SIGTERM (SIGINT to the first) to every participant still running; each must exit 0. One the test killed
    /// (``markKilled(_:at:)``) is only reaped and drained: right after its SIGKILL it may not have been reaped yet, and
    /// its status is the signal's.
    func stopAll() async throws {
        let killed = state.withLock { Set($0.killed.keys) }
        let running = all.filter { $0.process.exitStatus == nil && !killed.contains($0.name) }
        for (index, participant) in running.enumerated() {
            _ = participant.process.signal(index == 0 ? SIGINT : SIGTERM)
        }
        for participant in running {
            let status = try await participant.process.waitForExit(timeout: .seconds(30))
            #expect(status == 0, "\(participant.name) exited \(status): \(participant.process.standardError)")
            // Reaped is not drained: wait until every line it printed has been read.
            _ = await participant.process.close()
        }
        for participant in all where killed.contains(participant.name) {
            _ = try await participant.process.waitForExit(timeout: .seconds(30))
            _ = await participant.process.close()
        }
    }

    func killAll() async {
        for participant in all { _ = await participant.process.close() }
    }
}

/// Runs `body` with a fresh ``Participants`` group; whatever it started is killed afterwards (success or failure).
func withParticipants<T>(_ database: TestDatabase, _ body: (Participants) async throws -> T) async throws -> T {
    let group = Participants(database: database)
    do {
        let result = try await body(group)
        await group.killAll()
        return result
    } catch {
        await group.killAll()
        throw error
    }
}
