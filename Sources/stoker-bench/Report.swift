import Foundation
import StokerHarness

/// The host the bench ran on.
struct Machine: Sendable {
    /// `uname -srm`.
    let uname: String
    let processors: Int
    /// `model name` of /proc/cpuinfo.
    let cpuModel: String

    static func current() async -> Machine {
        let uname = (try? await runProcess(["uname", "-srm"]))?.standardOutput
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }.flatMap {
            $0.split(separator: ":", maxSplits: 1).last
        }
        return Machine(
            uname: uname?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown",
            processors: sysconf(Int32(_SC_NPROCESSORS_ONLN)),
            cpuModel: model.map { $0.trimmingCharacters(in: .whitespaces) } ?? "unknown")
    }
}

/// Nearest-rank percentile `p` (0–100] of `values`: the smallest value with at least p % of all at or below it.
func nearestRank(_ p: Double, of values: [Double]) -> Double? {
    guard !values.isEmpty else { return nil }
    let sorted = values.sorted()
    let rank = Int((p / 100 * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank, 1), sorted.count) - 1]
}

/// The markdown report of a run and its verdicts: each fault's failover latency against its target (see `target(_:)`).
struct Report {
    let settings: BenchSettings
    let results: [PhaseResult]
    let machine: Machine
    let postgresVersion: String
    let commandLine: String

    /// Latency statistics of one phase, in seconds.
    struct Summary {
        let p50: Double
        let p99: Double
        let max: Double
    }

    private func result(_ system: BenchSystem, _ fault: Fault) -> PhaseResult? {
        results.first { $0.system == system && $0.fault == fault }
    }

    private func summary(_ system: BenchSystem, _ fault: Fault) -> Summary? {
        guard let latencies = result(system, fault)?.latencies,
            let p50 = nearestRank(50, of: latencies), let p99 = nearestRank(99, of: latencies),
            let max = latencies.max()
        else { return nil }
        return Summary(p50: p50, p99: p99, max: max)
    }

    /// No overlap and no other problem anywhere (performance targets do not count: they are reported).
    var passed: Bool {
        results.allSatisfy { $0.overlaps.isEmpty && $0.problems.isEmpty }
    }

    /// The target of `fault` as text, whether Stoker met it (nil: not measurable in this run), and by how much each
    /// missed bound was missed.
    private func target(_ fault: Fault) -> (text: String, met: Bool?, misses: [String]) {
        let stoker = summary(.stoker, fault)
        let overlaps = result(.stoker, fault)?.overlaps.count ?? 0
        let complete = result(.stoker, fault).map { $0.repetitions == settings.reps } ?? false
        var bounds: [(name: String, value: Double, limit: Double)] = []
        let text: String
        switch fault {
        case .graceful, .crash:
            text = "p50 ≤ 2×floor p50 + 2 ms, p99 ≤ 25 ms, no overlap"
            guard let stoker, let floor = summary(.floor, fault), complete else { return (text, nil, []) }
            bounds = [("p50", stoker.p50, 2 * floor.p50 + 0.002), ("p99", stoker.p99, 0.025)]
        case .serverKill:
            // No latency target (the timed call includes an admin connection): the point is that nothing overlaps.
            text = "no overlap"
            guard complete else { return (text, nil, []) }
        case .freeze:
            text = "p99 ≤ lease + 0.5 s (\(duration(settings.lease.seconds + 0.5))), no overlap"
            guard let stoker, complete else { return (text, nil, []) }
            bounds = [("p99", stoker.p99, settings.lease.seconds + 0.5)]
        }
        var misses = bounds.filter { $0.value > $0.limit }.map { bound in
            "\(bound.name) \(duration(bound.value)) > \(duration(bound.limit)) by \(duration(bound.value - bound.limit))"
        }
        if overlaps > 0 { misses.append("\(overlaps) overlaps") }
        return (text, misses.isEmpty, misses)
    }

    var markdown: String {
        var out: [String] = []
        out.append("## stoker-bench failover")
        out.append("")
        out.append("- command: `\(commandLine)`")
        out.append("- date: \(ISO8601DateFormatter().string(from: Date()))")
        out.append("- machine: \(machine.uname), \(machine.processors) CPUs, \(machine.cpuModel)")
        out.append("- PostgreSQL \(postgresVersion): private cluster on this host (unix socket, fsync=off)")
        if settings.elections == 1 {
            out.append(
                "- \(settings.nodes) participants per election, lease \(settings.lease.text), \(settings.reps) "
                    + "repetitions per fault and system")
        } else {
            out.append(
                "- \(settings.nodes) participants, each in the same \(settings.elections) elections, lease "
                    + "\(settings.lease.text), \(settings.reps) repetitions per fault and system; one participant is "
                    + "started first and leads every election before the others start; each repetition faults the "
                    + "participant leading the most elections and times every election it led (one sample each): "
                    + "the percentiles are over every election's samples")
        }
        if settings.systems.count > 1 {
            out.append(
                settings.sequential
                    ? "- sequential: each system ran all its repetitions of a fault before the next system started"
                    : "- turns: both systems' participants ran side by side, and each repetition faulted one system's "
                        + "leader, then the other's (the first one alternating), so both were measured over the same "
                        + "minutes")
        }
        if settings.fresh {
            out.append(
                "- fresh: every participant is started anew for each repetition (all stopped with SIGTERM, then one "
                    + "started and leading, then the others, all joined), as after a deploy")
        }
        out.append(
            "- Stoker: two sessions per node (main and witness); a successor whose predecessor did not hand over "
                + "begins once the predecessor's witness is gone (no fixed guard)")
        out.append(
            "- latency: the successor's `now_leader` `at` minus the CLOCK_MONOTONIC instant just before the signal "
                + "to the leader (server-kill: before the administrator's `pg_terminate_backend`, its connection "
                + "included); percentiles by nearest rank")
        out.append(
            "- floor: bare libpq clients waiting in `pg_advisory_lock` with `lock_timeout` 100ms, holding under "
                + "`idle_session_timeout` = lease (no Stoker)"
                + (settings.floorSessions == 2
                    ? "; two sessions per client, a lock on each, and a successor waits for both (the floor of "
                        + "evidence carried by two sessions)" : ""))
        out.append("")
        out.append(
            "| fault | signal | Stoker p50 | Stoker p99 | Stoker max | floor p50 | floor p99 | floor max "
                + "| p50 / floor | p99 / floor | overlaps | target | verdict |")
        out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
        for fault in settings.faults {
            let stoker = summary(.stoker, fault)
            let floor = summary(.floor, fault)
            let overlaps = result(.stoker, fault).map { String($0.overlaps.count) } ?? "–"
            let (text, met, misses) = target(fault)
            let verdict =
                met.map { $0 ? "met" : "**MISSED**: " + misses.joined(separator: "; ") } ?? "n/a"
            let cells = [
                fault.rawValue, fault.signalName,
                duration(stoker?.p50), duration(stoker?.p99), duration(stoker?.max),
                duration(floor?.p50), duration(floor?.p99), duration(floor?.max),
                ratio(stoker?.p50, floor?.p50), ratio(stoker?.p99, floor?.p99), overlaps, text, verdict,
            ]
            out.append("| " + cells.joined(separator: " | ") + " |")
        }
        let overlaps = results.flatMap { result in
            result.overlaps.map { "\(result.fault.rawValue)/\(result.system.rawValue): \($0)" }
        }
        let problems = results.flatMap { result in
            result.problems.map { "\(result.fault.rawValue)/\(result.system.rawValue): \($0)" }
        }
        if settings.elections > 1 {
            out.append("")
            out.append(
                "Samples: "
                    + results.map {
                        "\($0.fault.rawValue)/\($0.system.rawValue) \($0.latencies.count) from \($0.repetitions) "
                            + "repetitions"
                    }.joined(separator: "; ")
                    + " (a repetition gives one sample per election the faulted participant led).")
        }
        if results.contains(where: { !$0.overlapsChecked }) {
            out.append("")
            out.append(
                "Overlaps are not checked for a frozen or server-killed floor holder: a bare lock has no lease and "
                    + "no witness, so it learns of its loss only after its successor may have started.")
        }
        if !overlaps.isEmpty {
            out.append("")
            out.append("### OVERLAPS (two leaders at once)")
            out.append(contentsOf: overlaps.map { "- \($0)" })
        }
        out.append(
            contentsOf: resultFooter(
                problems: problems, passed: passed, targets: settings.faults.map { target($0).met }))
        return out.joined(separator: "\n")
    }

    private func duration(_ seconds: Double?) -> String {
        guard let seconds else { return "–" }
        return seconds < 1 ? String(format: "%.2f ms", seconds * 1_000) : String(format: "%.3f s", seconds)
    }

    private func ratio(_ value: Double?, _ base: Double?) -> String {
        guard let value, let base, base > 0 else { return "–" }
        return String(format: "%.2f×", value / base)
    }
}

/// The end of every report: its problems, if any, and one line with the verdict and how many targets were met (`nil`:
/// a target not measured in full).
func resultFooter(problems: [String], passed: Bool, targets: [Bool?]) -> [String] {
    var out: [String] = []
    if !problems.isEmpty {
        out.append("")
        out.append("### Problems")
        out.append(contentsOf: problems.map { "- " + $0.replacingOccurrences(of: "\n", with: "\n  ") })
    }
    out.append("")
    out.append(
        "Result: \(passed ? "correct (no overlap, no problem)" : "**FAILED** (overlaps or problems above)"); "
            + "targets met: \(targets.filter { $0 == true }.count) of \(targets.count)"
            + (targets.contains(nil) ? " (n/a: not measured in full)" : ""))
    return out
}
