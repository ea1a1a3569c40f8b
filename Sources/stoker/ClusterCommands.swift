import ArgumentParser
import Stoker
import UnixSignals

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The cluster a subcommand reads or acts on.
struct ClusterOption: ParsableArguments {
    @Option(name: .long, help: "The cluster (as the nodes' --cluster).")
    var cluster: String
}

/// `stoker status`: the cluster from one consistent read, and an exit code for scripts and health checks.
struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a cluster's live members and elections, flag what is out of place, exit with its health.",
        discussion: """
            One consistent read (one statement: the tables and pg_locks at one instant), from any machine. A member \
            is listed while its node lock is held; an election's leader only while it holds the election's lock \
            and its leadership has begun. Flagged: an election without a leader (with the leader its row still \
            names), and a dead member's row not swept yet. Exit status: 0 healthy (every election has a leader, \
            nothing flagged), 2 degraded (every election has a leader, something flagged), 3 no leader (an \
            election has none, or the cluster has no election), 1 an error (one line on stderr, never a password), 64 a \
            usage error.
            """
    )

    @OptionGroup var options: ConnectionOptions
    @OptionGroup var target: ClusterOption

    @Flag(name: .long, help: "Print one JSON object instead of tables.")
    var json = false

    func run() async throws {
        let snapshot: ClusterSnapshot
        do {
            snapshot = try await StokerCluster.snapshot(
                cluster: target.cluster, connection: options.connection, schema: options.schema)
        } catch {
            writeStandardError("stoker status: \(error)")
            throw ExitCode(1)
        }
        let health = snapshot.health
        writeStandardOutput(json ? Self.json(snapshot, health) : Self.text(snapshot, health))
        switch health {
        case .healthy: break
        case .degraded: throw ExitCode(2)
        case .noLeader: throw ExitCode(3)
        }
    }

    static func text(_ snapshot: ClusterSnapshot, _ health: ClusterSnapshot.Health) -> String {
        var out = "cluster \(snapshot.cluster): \(health.name.replacing("_", with: " "))\n"
        for problem in health.problems { out += "  ! \(problem)\n" }
        out += "\n"
        var members = [["MEMBER", "HOST", "PID", "UP", "HEARTBEAT", "LEADS"]]
        for member in snapshot.members {
            var leads = member.leads.joined(separator: ", ")
            if member.draining { leads += leads.isEmpty ? "(draining)" : " (draining)" }
            members.append([
                member.member.description, member.host, "\(member.pid)", format(member.uptime),
                format(member.sinceHeartbeat) + " ago", leads.isEmpty ? "-" : leads,
            ])
        }
        out += members.count == 1 ? "no live member\n" : table(members)
        out += "\n"
        var elections = [["ELECTION", "TERM", "LEADER", "FOR", "WAITER", "TRIGGERS"]]
        for election in snapshot.elections {
            elections.append([
                election.name, "\(election.term)", election.leader?.description ?? "NONE",
                election.leaderFor.map(format) ?? "-", election.waiter?.description ?? "-",
                "\(election.pendingTriggers)",
            ])
        }
        out += elections.count == 1 ? "no election\n" : table(elections)
        return out
    }

    static func json(_ snapshot: ClusterSnapshot, _ health: ClusterSnapshot.Health) -> String {
        func member(_ member: ClusterMember?) -> String {
            guard let member else { return "null" }
            var object = JSONLine()
            object.string("name", member.name)
            object.integer("incarnation", Int64(member.id))
            return object.text
        }
        func list(_ items: [String]) -> String { "[" + items.joined(separator: ",") + "]" }
        var object = JSONLine()
        object.string("cluster", snapshot.cluster)
        object.string("health", health.name)
        object.raw("problems", list(health.problems.map(JSONLine.quoted)))
        object.raw(
            "members",
            list(
                snapshot.members.map { entry in
                    var item = JSONLine()
                    item.string("name", entry.member.name)
                    item.integer("incarnation", Int64(entry.member.id))
                    item.string("host", entry.host)
                    item.integer("pid", Int64(entry.pid))
                    item.integer("uptime_ms", entry.uptime.milliseconds)
                    item.integer("since_heartbeat_ms", entry.sinceHeartbeat.milliseconds)
                    item.raw("draining", entry.draining ? "true" : "false")
                    item.raw("leads", list(entry.leads.map(JSONLine.quoted)))
                    return item.text
                }))
        object.raw("unswept", list(snapshot.unswept.map(member)))
        object.raw(
            "elections",
            list(
                snapshot.elections.map { entry in
                    var item = JSONLine()
                    item.string("name", entry.name)
                    item.integer("term", entry.term)
                    item.raw("leader", member(entry.leader))
                    item.integer("leader_for_ms", entry.leaderFor?.milliseconds)
                    item.raw("recorded_leader", member(entry.recordedLeader))
                    item.raw("waiter", member(entry.waiter))
                    item.integer("pending_triggers", Int64(entry.pendingTriggers))
                    return item.text
                }))
        return object.text + "\n"
    }

    /// Columns padded to their widest cell, two spaces apart.
    static func table(_ rows: [[String]]) -> String {
        let widths = (0..<(rows.first?.count ?? 0)).map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            zip(row, widths).enumerated().map { index, cell in
                index == row.count - 1 ? cell.0 : cell.0 + String(repeating: " ", count: max(0, cell.1 - cell.0.count))
            }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }
}

/// `stoker watch`: the cluster's changes as they happen.
struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a cluster's membership and leadership changes as they happen, until Ctrl-C.",
        discussion: """
            First the cluster as it is (a snapshot), then one line per change in the order the server committed \
            them: node_up, node_down (with its reason: left, died, removed), leader (a leadership began: the \
            election, its term and leader), released (a graceful hand-over), trigger (one was sent). A lost \
            connection is retried, and the cluster printed again as it then is (changes while disconnected are not \
            replayed one by one). Ctrl-C or SIGTERM ends it with status 0; a first connection that fails prints one \
            line on stderr and exits 1.
            """
    )

    @OptionGroup var options: ConnectionOptions
    @OptionGroup var target: ClusterOption

    @Flag(name: .long, help: "Print one JSON object per line.")
    var json = false

    func run() async throws {
        let changes = StokerCluster.watch(
            cluster: target.cluster, connection: options.connection, schema: options.schema)
        let json = self.json
        signal(SIGPIPE, SIG_IGN)
        do {
            try await untilSignalled {
                for try await change in changes {
                    // A reader that went away (`stoker watch | head -3`) ends the watch.
                    guard writeStandardOutput((json ? Self.json(change) : Self.text(change)) + "\n") else { return }
                }
            }
        } catch is CancellationError {
        } catch {
            writeStandardError("stoker watch: \(error)")
            throw ExitCode(1)
        }
    }

    static func text(_ change: ClusterWatchEvent) -> String {
        let time = WallClock.iso8601()
        switch change {
        case .snapshot(let snapshot):
            let members = snapshot.members.map(\.member.description).joined(separator: ", ")
            var line = "\(time)  cluster \(snapshot.cluster): \(snapshot.members.count) members"
            if !members.isEmpty { line += " (\(members))" }
            for election in snapshot.elections {
                line += "; \(election.name) term \(election.term) "
                line += election.leader.map { "led by \($0)" } ?? "without a leader"
            }
            return line
        case .nodeUp(let member):
            return "\(time)  node_up    \(member)"
        case .nodeDown(let member, let reason):
            return "\(time)  node_down  \(member) (\(reason))"
        case .leader(let election, let term, let leader):
            return "\(time)  leader     \(election) term \(term): \(leader?.description ?? "unknown node")"
        case .released(let election, let term):
            return "\(time)  released   \(election) term \(term)"
        case .trigger(let election, let sequence):
            return "\(time)  trigger    \(election) #\(sequence)"
        }
    }

    static func json(_ change: ClusterWatchEvent) -> String {
        var object = JSONLine()
        object.string("time", WallClock.iso8601())
        switch change {
        case .snapshot(let snapshot):
            object.string("event", "snapshot")
            let body = Status.json(snapshot, snapshot.health)
            object.raw("cluster", String(body.dropLast()))
        case .nodeUp(let member):
            object.string("event", "node_up")
            object.string("member", member.name)
            object.integer("incarnation", Int64(member.id))
        case .nodeDown(let member, let reason):
            object.string("event", "node_down")
            object.string("member", member.name)
            object.integer("incarnation", Int64(member.id))
            object.string("reason", "\(reason)")
        case .leader(let election, let term, let leader):
            object.string("event", "leader")
            object.string("election", election)
            object.integer("term", term)
            object.string("leader", leader?.name)
            object.integer("incarnation", leader.map { Int64($0.id) })
        case .released(let election, let term):
            object.string("event", "released")
            object.string("election", election)
            object.integer("term", term)
        case .trigger(let election, let sequence):
            object.string("event", "trigger")
            object.string("election", election)
            object.integer("sequence", sequence)
        }
        return object.text
    }
}

/// `stoker trigger`: wake an election's leader with a payload.
struct Trigger: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wake an election's leader with a payload (its behaviour gets a trigger event).",
        discussion: """
            Stored in the database before the command returns, so a trigger sent while nobody leads reaches the \
            next leader; at least once, in order within a leadership. The payload is text, at most 8000 bytes. Prints \
            the trigger's number in its election. An unknown election (no node ever ran an activator for it) or a \
            payload over the limit prints one line on stderr and exits 1.
            """
    )

    @OptionGroup var options: ConnectionOptions
    @OptionGroup var target: ClusterOption

    @Argument(help: "The election whose leader to wake.")
    var election: String

    @Argument(help: "The payload (text; default empty).")
    var payload = ""

    @Flag(name: .long, help: "Print one JSON object.")
    var json = false

    func run() async throws {
        do {
            let sequence = try await StokerCluster.trigger(
                election: election, payload: payload, cluster: target.cluster, connection: options.connection,
                schema: options.schema)
            if json {
                var object = JSONLine()
                object.string("cluster", target.cluster)
                object.string("election", election)
                object.integer("sequence", sequence)
                print(object.text)
            } else {
                print("trigger \(sequence) sent to election \(election) of cluster \(target.cluster)")
            }
        } catch {
            writeStandardError("stoker trigger: \(error)")
            throw ExitCode(1)
        }
    }
}

extension ClusterSnapshot.Health {
    /// `healthy`, `degraded`, `no_leader`.
    var name: String {
        switch self {
        case .healthy: "healthy"
        case .degraded: "degraded"
        case .noLeader: "no_leader"
        }
    }

    var problems: [String] {
        switch self {
        case .healthy: []
        case .degraded(let problems), .noLeader(let problems): problems
        }
    }
}

extension Duration {
    var milliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + attoseconds / 1_000_000_000_000_000
    }
}

/// `850ms`, `4.2s`, `3m12s`, `5h3m`: a duration a person reads at a glance.
func format(_ duration: Duration) -> String {
    let milliseconds = duration.milliseconds
    if milliseconds < 1000 { return "\(milliseconds)ms" }
    if milliseconds < 10_000 { return "\(milliseconds / 1000).\(milliseconds % 1000 / 100)s" }
    let seconds = milliseconds / 1000
    if seconds < 3600 { return seconds < 60 ? "\(seconds)s" : "\(seconds / 60)m\(seconds % 60)s" }
    return "\(seconds / 3600)h\(seconds % 3600 / 60)m"
}

/// Writes `text` to stdout at once (a line of `watch` is seen as it happens, also through a pipe); false when stdout
/// is gone.
@discardableResult
func writeStandardOutput(_ text: String) -> Bool {
    writeAll(text, to: STDOUT_FILENO)
}

/// Runs `operation` in a task that SIGTERM or SIGINT cancels (both trapped from this call on); returns what it
/// returns, or throws what it throws — `CancellationError` when a signal ended it.
func untilSignalled<T: Sendable>(_ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
    let work = Task { try await operation() }
    let stopper = Task {
        for await _ in signals {
            work.cancel()
            return
        }
    }
    defer { stopper.cancel() }
    return try await work.value
}
