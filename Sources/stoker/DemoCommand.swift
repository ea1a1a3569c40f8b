import ArgumentParser
import Stoker
import StokerHarness
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// `stoker demo`: the product working, on a machine with nothing but PostgreSQL's binaries.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "See Stoker work: a throwaway PostgreSQL, three nodes, and their leader crashed, frozen, "
            + "cut off by the server and stopped, in turn.",
        discussion: """
            Needs only PostgreSQL's server binaries (initdb, pg_ctl: found on PATH, else the newest \
            /usr/lib/postgresql/*/bin). Starts a private PostgreSQL in a temporary directory (as root, it runs as \
            the `postgres` user, which must exist), three `stoker node` processes in one election, then fails the \
            leader four ways and prints how long each failover took, the crashed node's node_down, and whether any \
            two leaderships overlapped (judged from every line the nodes printed). Takes about 5 seconds. \
            Everything is removed when it ends, on Ctrl-C, and when it is killed (the nodes die with it, a detached \
            supervisor removes the server and its directory). Exit status 0 when no two leaderships overlapped, 1 on an \
            overlap or an error, 130 when interrupted.
            """
    )

    @Option(name: .long, help: "The nodes' lease (a frozen leader's failover takes about this long).")
    var lease = DurationArgument(argument: "2s")!

    func run() async throws {
        signal(SIGPIPE, SIG_IGN)
        let stoker = try Self.ownExecutable()
        let lease = self.lease
        do {
            let clean = try await untilSignalled { try await DemoRun(stoker: stoker, lease: lease).run() }
            if !clean { throw ExitCode(1) }
        } catch is CancellationError {
            say("\ninterrupted: the nodes and PostgreSQL were stopped and removed")
            throw ExitCode(130)
        } catch let code as ExitCode {
            throw code
        } catch {
            writeStandardError("stoker demo: \(error)")
            throw ExitCode(1)
        }
    }

    /// This executable's own path (the nodes are this same binary).
    static func ownExecutable() throws -> String {
        if let path = currentExecutablePath() { return path }
        let first = CommandLine.arguments.first ?? "stoker"
        guard first.contains("/") else { throw ValidationError("cannot find this executable's path") }
        return first
    }
}

/// A line for the person watching, at once.
private func say(_ text: String) {
    writeStandardOutput(text + "\n")
}

/// One run of the demo.
private struct DemoRun {
    let stoker: String
    let lease: DurationArgument
    let cluster = "demo"
    let election = "importer"

    /// A `stoker node` of the demo and every line it printed.
    final class Node: Sendable {
        let name: String
        let process: NodeProcess
        init(name: String, process: NodeProcess) {
            self.name = name
            self.process = process
        }
        var lines: [NodeLine] { process.lines.compactMap { NodeLine($0.text) } }
    }

    /// Everything started, for the overlap check and the cleanup.
    final class Started: Sendable {
        private let state = Mutex<(nodes: [Node], killedAt: [ObjectIdentifier: Double])>(([], [:]))
        var nodes: [Node] { state.withLock { $0.nodes } }
        func add(_ node: Node) { state.withLock { $0.nodes.append(node) } }
        func killed(_ node: Node, at instant: Double) {
            state.withLock { $0.killedAt[ObjectIdentifier(node)] = instant }
        }
        func killedAt(_ node: Node) -> Double? { state.withLock { $0.killedAt[ObjectIdentifier(node)] } }
    }

    func run() async throws -> Bool {
        say("stoker demo: a throwaway PostgreSQL, three `stoker node` processes, four faults. Ctrl-C stops it and")
        say("removes everything.\n")
        let began = ContinuousClock.now
        let clean = try await TestPostgres.withPrivate { postgres in
            let version = (try? await postgres.admin("SHOW server_version").first?.first ?? nil) ?? "?"
            say("PostgreSQL \(version) started in \(postgres.socketDirectory ?? postgres.host) (port \(postgres.port))")
            let started = Started()
            do {
                let clean = try await postgres.withDatabase { database in
                    try await scenario(database, started: started)
                }
                await stopAll(started)
                return clean
            } catch {
                await stopAll(started)
                throw error
            }
        }
        say(
            "\nthe nodes stopped; PostgreSQL stopped and its directory removed (\(format(began.duration(to: .now))) in all)"
        )
        return clean
    }

    private func scenario(_ database: TestDatabase, started: Started) async throws -> Bool {
        let migrated = try await runProcess([stoker, "migrate", "--url", database.conninfo])
        guard migrated.status == 0 else { throw DemoError("stoker migrate failed: \(migrated.standardError)") }
        func start(_ name: String) async throws -> Node {
            let process = try await NodeProcess.start([
                stoker, "node", "--url", database.conninfo, "--cluster", cluster, "--election", election, "--name",
                name, "--lease", lease.description, "--log-level", "error",
            ])
            let node = Node(name: name, process: process)
            started.add(node)
            return node
        }
        var nodes: [String: Node] = [:]
        nodes["a"] = try await start("a")
        var (leader, term) = try await firstLeader(among: [nodes["a"]!], after: 0)
        for name in ["b", "c"] { nodes[name] = try await start(name) }
        try await waitUntilReady(members: 3, in: database)
        let pids = ["a", "b", "c"].map { "\($0) (pid \(nodes[$0]!.process.pid))" }.joined(separator: ", ")
        say("nodes \(pids) joined cluster \"\(cluster)\", election \"\(election)\", lease \(lease.description)")
        say("\(leader.name) leads (term \(term))\n")

        // 1. A crash: the process is gone; its witness session with it, so the successor begins at once.
        say("1. crash: SIGKILL to the leader \(leader.name)")
        var others = nodes.values.filter { $0 !== leader }
        var mark = monotonicSeconds()
        started.killed(leader, at: mark)
        _ = leader.process.signal(SIGKILL)
        let crashed = leader.name
        (leader, term) = try await firstLeader(among: others, after: mark)
        say("   \(leader.name) leads (term \(term)) \(elapsed(since: mark, to: leader)) after the kill")
        // A new leader hears of every death it did not see begin its leadership with: when the sweep removed the
        // crashed node's row before this leadership began, its member list never had it, and no node_down comes.
        let members = leader.lines.last { $0.event == "now_leader" }?.string("members") ?? ""
        if members.contains("\"\(crashed)#") {
            let down = try await leader.process.waitForLine(timeout: .seconds(30)) { line in
                NodeLine(line.text).map {
                    $0.event == "cluster_change" && $0.string("change") == "node_down" && $0.string("member") == crashed
                } ?? false
            }
            if let line = NodeLine(down.text) {
                say(
                    "   \(leader.name) hears node_down \(crashed) (\(line.string("reason") ?? "?")), "
                        + "\(format(seconds: line.at - mark)) after the kill")
            }
        } else {
            say(
                "   \(leader.name) began with \(crashed) already swept from its members \(members): "
                    + "no node_down to hear")
        }
        _ = try await nodes[crashed]?.process.waitForExit(timeout: .seconds(30))
        let restarted = try await start(crashed)
        nodes[crashed] = restarted
        try await waitUntilReady(members: 3, in: database)
        say("   \(crashed) restarted (pid \(restarted.process.pid)), a new incarnation\n")

        // 2. A freeze: the process is alive but stopped; its lease must run out before anyone else may lead.
        say("2. freeze: SIGSTOP to the leader \(leader.name) (lease \(lease.description))")
        others = nodes.values.filter { $0 !== leader }
        let frozen = leader
        let frozenMark = frozen.process.lines.count
        mark = monotonicSeconds()
        _ = frozen.process.signal(SIGSTOP)
        (leader, term) = try await firstLeader(among: others, after: mark)
        say(
            "   \(leader.name) leads (term \(term)) \(elapsed(since: mark, to: leader)) after the stop: the lease ran out"
        )
        _ = frozen.process.signal(SIGCONT)
        let (frozenReason, frozenGap) = try await steppedDown(frozen, from: frozenMark, before: leader)
        say(
            "   SIGCONT: \(frozen.name) prints now_follower (\(frozenReason)): it stopped leading \(frozenGap) before "
                + "\(leader.name) began\n")
        try await waitUntilReady(members: 3, in: database)

        // 3. The server ends the leader's session: the process lives, its witness still holds its node lock, so the
        // successor bumps the term at once but begins only once the old leader has stepped down.
        say("3. server kill: pg_terminate_backend of the leader \(leader.name)'s session")
        others = nodes.values.filter { $0 !== leader }
        let cut = leader
        let cutMark = cut.process.lines.count
        let backend = try await database.admin(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '\(cluster):\(cut.name)'"
        ).first?.first.flatMap { $0 }
        guard let backend else { throw DemoError("found no session of \(cut.name)") }
        mark = monotonicSeconds()
        _ = try await database.admin("SELECT pg_terminate_backend(\(backend))")
        (leader, term) = try await firstLeader(among: others, after: mark)
        say("   \(leader.name) leads (term \(term)) \(elapsed(since: mark, to: leader)) after the kill")
        let (cutReason, cutGap) = try await steppedDown(cut, from: cutMark, before: leader)
        say("   \(cut.name) stepped down (\(cutReason)) \(cutGap) before \(leader.name) began\n")
        try await waitUntilReady(members: 3, in: database)

        // 4. A graceful stop: the leader hands the election over.
        say("4. graceful stop: SIGTERM to the leader \(leader.name)")
        others = nodes.values.filter { $0 !== leader }
        let stopping = leader
        mark = monotonicSeconds()
        _ = stopping.process.signal(SIGTERM)
        (leader, term) = try await firstLeader(among: others, after: mark)
        let status = try await stopping.process.waitForExit(timeout: .seconds(30))
        say(
            "   \(leader.name) leads (term \(term)) \(elapsed(since: mark, to: leader)) after the signal; "
                + "\(stopping.name) handed over and exited \(status)\n")

        // The verdict, from every line every node printed.
        let overlaps = checkOverlaps(started)
        let leaderships = started.nodes.flatMap(\.lines).filter { $0.event == "now_leader" }.count
        if overlaps.isEmpty {
            say(
                "no overlap: no two of the \(leaderships) leaderships of \"\(election)\" overlapped, by every line printed"
            )
        } else {
            say("OVERLAP:")
            for overlap in overlaps { say("   \(overlap)") }
        }
        return overlaps.isEmpty
    }

    /// The first `now_leader` printed after `instant` by any of `nodes`: who, and the term.
    private func firstLeader(among nodes: [Node], after instant: Double) async throws -> (Node, Int64) {
        let (index, line) = try await NodeProcess.firstLine(among: nodes.map(\.process), timeout: .seconds(60)) {
            _, line in
            NodeLine(line.text).map { $0.event == "now_leader" && $0.at > instant } ?? false
        }
        return (nodes[index], Int64(NodeLine(line.text)?.number("term") ?? 0))
    }

    /// `old`'s demotion printed from line `mark` on: its reason, and how long before `successor` began it ended.
    private func steppedDown(_ old: Node, from mark: Int, before successor: Node) async throws -> (String, String) {
        let demoted = try await old.process.waitForLine(from: mark, timeout: .seconds(30)) { line in
            NodeLine(line.text).map { $0.event == "now_follower" } ?? false
        }
        let line = NodeLine(demoted.text)
        let begun = successor.lines.last { $0.event == "now_leader" }?.at ?? 0
        let gap = line?.number("ended_at").map { format(seconds: begun - $0) } ?? "(no ended_at)"
        return (line?.string("reason") ?? "?", gap)
    }

    private func elapsed(since instant: Double, to node: Node) -> String {
        let at = node.lines.last { $0.event == "now_leader" }?.at ?? instant
        return format(seconds: at - instant)
    }

    /// Waits until the cluster is as a fault should find it: `members` live members and no dead row left to sweep,
    /// a leader, and a follower already waiting in the election's lock queue (the one granted the lock the instant
    /// the leader's sessions end). Without a waiter a crash is noticed only at the next retry.
    private func waitUntilReady(members count: Int, in database: TestDatabase) async throws {
        let deadline = ContinuousClock.now + .seconds(60)
        var missing = "nothing read yet"
        while ContinuousClock.now < deadline {
            let snapshot = try await StokerCluster.snapshot(cluster: cluster, connection: database.conninfo)
            let state = snapshot.elections.first { $0.name == election }
            if snapshot.members.count != count {
                missing = "\(snapshot.members.count) of \(count) members"
            } else if !snapshot.unswept.isEmpty {
                missing = "dead rows not swept yet"
            } else if state?.leader == nil {
                missing = "no leader"
            } else if state?.waiter == nil {
                missing = "no follower waiting in the lock queue"
            } else {
                return
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw DemoError("the cluster was not ready for the next fault within 60 s: \(missing)")
    }

    /// Per node, leaderships [now_leader.at, ended_at] (a killed node's last one ends at its kill); any two that
    /// overlap, described.
    private func checkOverlaps(_ started: Started) -> [String] {
        var leaderships: [(name: String, start: Double, end: Double)] = []
        for node in started.nodes {
            var open: Double?
            for line in node.lines {
                if line.event == "now_leader" {
                    open = line.at
                } else if let start = open, line.event == "now_follower" || line.event == "shutdown" {
                    leaderships.append((node.name, start, line.number("ended_at") ?? line.at))
                    open = nil
                }
            }
            if let start = open { leaderships.append((node.name, start, started.killedAt(node) ?? .infinity)) }
        }
        leaderships.sort { $0.start < $1.start }
        var overlaps: [String] = []
        for (earlier, later) in zip(leaderships, leaderships.dropFirst()) where earlier.end > later.start {
            overlaps.append(
                "\(earlier.name) led until \(format(seconds: earlier.end - later.start)) after \(later.name) began")
        }
        return overlaps
    }

    /// Every node still running: SIGCONT and SIGTERM, then SIGKILL after 10 s.
    private func stopAll(_ started: Started) async {
        let running = started.nodes.filter { $0.process.exitStatus == nil }
        for node in running {
            _ = node.process.signal(SIGCONT)
            _ = node.process.signal(SIGTERM)
        }
        for node in running where (try? await node.process.waitForExit(timeout: .seconds(10))) == nil {
            _ = node.process.kill()
            _ = await node.process.close()
        }
    }
}

private struct DemoError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// `1.234 ms`, `1.83 s`.
private func format(seconds: Double) -> String {
    if seconds < 1 { return "\(Double(Int((seconds * 1_000 * 100).rounded())) / 100) ms" }
    return "\(Double(Int((seconds * 100).rounded())) / 100) s"
}

/// One line `stoker node` printed: the fields the demo reads, from the flat JSON object it writes.
struct NodeLine: Sendable {
    let fields: [String: String]
    let event: String
    let at: Double

    init?(_ text: String) {
        guard let fields = Self.parse(text), let event = fields["event"], let at = fields["at"].flatMap(Double.init)
        else { return nil }
        self.fields = fields
        self.event = event
        self.at = at
    }

    func string(_ key: String) -> String? { fields[key] }
    func number(_ key: String) -> Double? { fields[key].flatMap(Double.init) }

    /// A flat JSON object (what `stoker node` writes: strings, numbers, null, and arrays of strings, which are kept
    /// as their text) → key → value as text (strings unescaped; null left out).
    static func parse(_ text: String) -> [String: String]? {
        var scalars = Substring(text).unicodeScalars[...]
        func skipSpaces() { while let first = scalars.first, first == " " { scalars.removeFirst() } }
        func string() -> String? {
            guard scalars.first == "\"" else { return nil }
            scalars.removeFirst()
            var result = String.UnicodeScalarView()
            while let scalar = scalars.popFirst() {
                switch scalar {
                case "\"":
                    return String(result)
                case "\\":
                    guard let escaped = scalars.popFirst() else { return nil }
                    switch escaped {
                    case "n": result.append("\n")
                    case "t": result.append("\t")
                    case "r": result.append("\r")
                    case "u":
                        let hex = String(String.UnicodeScalarView(scalars.prefix(4)))
                        scalars.removeFirst(min(4, scalars.count))
                        guard let value = UInt32(hex, radix: 16), let decoded = Unicode.Scalar(value) else {
                            return nil
                        }
                        result.append(decoded)
                    default: result.append(escaped)
                    }
                default:
                    result.append(scalar)
                }
            }
            return nil
        }
        guard scalars.popFirst() == "{" else { return nil }
        var fields: [String: String] = [:]
        while true {
            skipSpaces()
            if scalars.first == "}" { return fields }
            guard let key = string() else { return nil }
            skipSpaces()
            guard scalars.popFirst() == ":" else { return nil }
            skipSpaces()
            if scalars.first == "\"" {
                guard let value = string() else { return nil }
                fields[key] = value
            } else if scalars.first == "[" {
                var depth = 0
                var raw = String.UnicodeScalarView()
                var inString = false
                while let scalar = scalars.popFirst() {
                    raw.append(scalar)
                    if inString {
                        if scalar == "\\", let next = scalars.popFirst() {
                            raw.append(next)
                        } else if scalar == "\"" {
                            inString = false
                        }
                    } else if scalar == "\"" {
                        inString = true
                    } else if scalar == "[" {
                        depth += 1
                    } else if scalar == "]" {
                        depth -= 1
                        if depth == 0 { break }
                    }
                }
                fields[key] = String(raw)
            } else {
                var raw = String.UnicodeScalarView()
                while let scalar = scalars.first, scalar != ",", scalar != "}" {
                    raw.append(scalar)
                    scalars.removeFirst()
                }
                let value = String(raw).trimmingSpaces
                if value != "null" { fields[key] = value }
            }
            skipSpaces()
            if scalars.first == "," { scalars.removeFirst() }
        }
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        String(self.drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
