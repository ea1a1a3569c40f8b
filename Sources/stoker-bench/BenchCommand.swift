import ArgumentParser
import Foundation
import StokerHarness

@main
struct StokerBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stoker-bench",
        abstract: "Benchmarks of Stoker against what bare PostgreSQL allows.",
        subcommands: [Failover.self, NodeDown.self, Idle.self, FloorClient.self]
    )
}

/// `stoker-bench failover`: failover latency of `stoker node` participants under three faults, next to the floor.
struct Failover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Failover latency of `stoker node` under graceful stop, crash and freeze, next to the floor.",
        discussion: """
            Starts a private PostgreSQL, then for each fault and each system runs --nodes participants, each in \
            --elections elections (one participant is started first and leads them all before the others start). \
            Each repetition signals the participant that leads the most elections — SIGTERM (graceful), SIGKILL \
            (crash) or SIGSTOP (freeze; SIGCONT once a successor leads) — and times, in each election it led, the \
            successor's `now_leader` (its `at`, CLOCK_MONOTONIC) from the instant just before the signal; the faulted \
            participant is then replaced by a fresh one (with --fresh: every participant is stopped and all are \
            started anew, as after a deploy). The systems take turns: both systems' participants run side by side, \
            and each repetition faults one system's leader, then the other's (the first one alternating), so that \
            both are measured over the same minutes of the host; --sequential runs all of one system's repetitions \
            of a fault before the other's. \
            The floor is the same harness around bare libpq clients (`floor-client`) that wait in \
            pg_advisory_lock with lock_timeout 100 ms and hold the lock under idle_session_timeout = lease (with \
            --floor-sessions 2, each holds a lock on each of two sessions, and a successor waits for both). \
            Every line is checked: per election, leaderships [now_leader.at, ended_at] never overlap and terms \
            increase. Prints a markdown report; exits 1 on any overlap or other correctness problem.
            """
    )

    @Option(name: .long, help: "Repetitions per fault and system (at least 1).")
    var reps: Int = 20

    @Option(name: .long, help: "The lease of the Stoker nodes, and the floor's idle_session_timeout.")
    var lease: BenchDuration = BenchDuration(parsing: "5s")!

    @Option(name: .long, help: "Comma-separated faults: graceful, crash, freeze, server-kill.")
    var faults: FaultList = FaultList(Fault.defaults)

    @Option(name: .long, help: "Participants per election (at least 2).")
    var nodes: Int = 3

    @Option(name: .long, help: "Comma-separated systems to run: stoker, floor.")
    var systems: SystemList = SystemList([.stoker, .floor])

    @Option(name: .long, help: "Elections each Stoker participant stands in (at least 1; 1 with the floor).")
    var elections: Int = 1

    @Flag(name: .long, help: "Start every participant anew for each repetition (as after a deploy).")
    var fresh = false

    @Flag(
        name: .long,
        help:
            "Run all of one system's repetitions of a fault before the next system's (default: the systems take turns)."
    )
    var sequential = false

    @Flag(
        name: .long,
        help:
            ArgumentHelp(
                "VACUUM Stoker's tables nodes and elections before each of Stoker's repetitions, as autovacuum does "
                    + "in a running cluster (it invalidates every session's plans of their statements); the fault "
                    + "follows a heartbeat (lease / 5) and 300 ms later.")
    )
    var vacuum = false

    @Option(
        name: .customLong("floor-sessions"),
        help:
            ArgumentHelp(
                "Sessions per floor participant: 1 (one lock, the floor of any lock-based election), or 2 (a lock on "
                    + "each session; a successor needs both, as Stoker's needs its predecessor's main session and "
                    + "witness gone: the floor of evidence carried by two sessions).")
    )
    var floorSessions: Int = 1

    func validate() throws {
        guard (1...2).contains(floorSessions) else {
            throw ValidationError("--floor-sessions must be 1 or 2 (got \(floorSessions)).")
        }
        guard reps >= 1 else { throw ValidationError("--reps must be at least 1 (got \(reps)).") }
        guard nodes >= 2 else {
            throw ValidationError("--nodes must be at least 2 (got \(nodes)): a failover needs a successor.")
        }
        if faults.values.contains(.serverKill) && systems.values.contains(.floor) {
            throw ValidationError(
                "--faults server-kill runs against Stoker only (pass --systems stoker): a bare floor client has no "
                    + "guard against that race, and its numbers would measure nothing Stoker is held to.")
        }
        guard lease.duration >= .milliseconds(500) else {
            throw ValidationError("--lease must be at least 500ms (got \(lease.text)).")
        }
        guard (1...100).contains(elections) else {
            throw ValidationError("--elections must be between 1 and 100 (got \(elections)).")
        }
        if elections > 1 && systems.values.contains(.floor) {
            throw ValidationError(
                "--elections \(elections) runs against Stoker only (pass --systems stoker): a floor client holds one "
                    + "advisory lock, so the floor has one election per process.")
        }
    }

    func run() async throws {
        let binary = try ownExecutable()
        var stoker: String?
        if systems.values.contains(.stoker) {
            stoker = try await locateStoker(nextTo: binary)
        }
        let settings = BenchSettings(
            reps: reps, lease: lease, faults: faults.values, nodes: nodes, systems: systems.values,
            elections: elections, fresh: fresh, sequential: sequential, vacuum: vacuum, floorSessions: floorSessions,
            stokerPath: stoker,
            benchPath: binary)
        let commandLine = CommandLine.arguments.map(shellQuoted).joined(separator: " ")
        let outcome = try await runFailoverBenchmark(settings, commandLine: commandLine)
        print(outcome.report)
        fflush(nil)
        if !outcome.passed { throw ExitCode(1) }
    }
}

/// A duration as written on the command line: `250ms`, `2s`, `1.5s`, `1m`.
struct BenchDuration: ExpressibleByArgument, Sendable, CustomStringConvertible {
    /// The text given, passed on unchanged to `stoker node`.
    let text: String
    let duration: Duration

    init?(argument: String) { self.init(parsing: argument) }

    init?(parsing text: String) {
        let units: [(suffix: String, seconds: Double)] = [("ms", 0.001), ("s", 1), ("m", 60)]
        guard let unit = units.first(where: { text.hasSuffix($0.suffix) }),
            let value = Double(text.dropLast(unit.suffix.count)), value >= 0, value.isFinite
        else { return nil }
        self.text = text
        duration = .milliseconds(Int64((value * unit.seconds * 1_000).rounded()))
    }

    var seconds: Double { Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18 }
    var milliseconds: Int64 { Int64((seconds * 1_000).rounded(.up)) }
    var description: String { text }
    static var defaultCompletionKind: CompletionKind { .default }
}

/// A fault the bench applies to the leader.
enum Fault: String, CaseIterable, Sendable {
    case graceful, crash, freeze
    /// `pg_terminate_backend` of the leader's session: the server frees the lock and tells the leader in one instant
    /// (the race the evidence rule is for: the successor waits for the old leader's witness). Not in the default set.
    case serverKill = "server-kill"

    /// The faults run when `--faults` is not given.
    static let defaults: [Fault] = [.graceful, .crash, .freeze]

    /// The signal that applies it (nil: the server applies it).
    var signal: Int32? {
        switch self {
        case .graceful: SIGTERM
        case .crash: SIGKILL
        case .freeze: SIGSTOP
        case .serverKill: nil
        }
    }

    var signalName: String {
        switch self {
        case .graceful: "SIGTERM"
        case .crash: "SIGKILL"
        case .freeze: "SIGSTOP"
        case .serverKill: "pg_terminate_backend"
        }
    }
}

/// What runs as a participant.
enum BenchSystem: String, CaseIterable, Sendable {
    /// `stoker node`.
    case stoker
    /// `stoker-bench floor-client`: bare libpq, no Stoker.
    case floor
}

struct FaultList: ExpressibleByArgument, Sendable {
    let values: [Fault]
    init(_ values: [Fault]) { self.values = values }
    init?(argument: String) {
        guard let values = commaSeparated(argument, Fault.init(rawValue:)) else { return nil }
        self.values = values
    }
    var defaultValueDescription: String { values.map(\.rawValue).joined(separator: ",") }
}

struct SystemList: ExpressibleByArgument, Sendable {
    let values: [BenchSystem]
    init(_ values: [BenchSystem]) { self.values = values }
    init?(argument: String) {
        guard let values = commaSeparated(argument, BenchSystem.init(rawValue:)) else { return nil }
        self.values = values
    }
    var defaultValueDescription: String { values.map(\.rawValue).joined(separator: ",") }
}

/// `a,b,c` → the values in order without duplicates; nil when any is unknown or the list is empty.
private func commaSeparated<T: Equatable>(_ text: String, _ make: (String) -> T?) -> [T]? {
    var values: [T] = []
    for part in text.split(separator: ",") {
        guard let value = make(part.trimmingCharacters(in: .whitespaces)) else { return nil }
        if !values.contains(value) { values.append(value) }
    }
    return values.isEmpty ? nil : values
}

/// `text` as one shell word (single-quoted unless it is plain).
func shellQuoted(_ text: String) -> String {
    let plain = !text.isEmpty && text.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:,@%+".contains($0) }
    return plain ? text : "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
}

/// The bench's own binary (for `floor-client` participants).
func ownExecutable() throws -> String {
    guard let path = currentExecutablePath() else { throw ValidationError("cannot resolve /proc/self/exe") }
    return path
}

/// `stoker`, built next to this binary, with a `node` subcommand. `otherwise` ends the error messages (what else the
/// user can do).
func locateStoker(nextTo binary: String, otherwise: String = ", or pass --systems floor") async throws -> String {
    let directory = (binary as NSString).deletingLastPathComponent
    let stoker = directory + "/stoker"
    guard FileManager.default.isExecutableFile(atPath: stoker) else {
        throw ValidationError(
            "no `stoker` executable next to this bench at \(stoker); build both with "
                + "`swift build -c release --product stoker-bench` (or `swift run -c release stoker-bench`)"
                + otherwise)
    }
    let help = try await runProcess([stoker, "node", "--help"], timeout: .seconds(60))
    guard help.status == 0 else {
        throw ValidationError(
            "\(stoker) has no working `node` subcommand (`stoker node --help` exited \(help.status): "
                + "\(help.standardError.trimmingCharacters(in: .whitespacesAndNewlines))); rebuild it" + otherwise)
    }
    return stoker
}
