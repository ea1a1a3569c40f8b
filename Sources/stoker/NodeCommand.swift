import ArgumentParser
import Logging
import ServiceLifecycle
import Stoker
import Synchronization
import UnixSignals

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// `stoker node`: one participant with a built-in behaviour that prints every callback as a JSON line.
struct Node: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one participant: join a cluster, stand in its elections, print every callback as JSON.",
        discussion: """
            Prints one JSON object per line on stdout, flushed per line, for every callback: "at" (seconds of \
            CLOCK_MONOTONIC, comparable across processes on one host), "time" (UTC), "node", "incarnation", \
            "election", "event" (now_leader, now_follower, cluster_change, cluster_split, timer, trigger, \
            shutdown), "term", and "ended_at" on every demotion (the monotonic instant leadership ended; for a lost lease, \
            the lease deadline). now_leader lists "members" (name#incarnation, the cluster as the new leader knows \
            it); cluster_change has "change" (node_up, node_down), "member", "member_incarnation", and for \
            node_down a "reason" (left, died, removed); trigger has the "payload" and its "sequence" (the \
            election's triggers are numbered in the order sent; at least once, in order within a leadership). SIGTERM or SIGINT hands the \
            elections over and exits 0 after "shutdown". A bad flag or a connection error prints one line on stderr and exits non-zero. Durations: 250ms, 2s, 1.5s, \
            1m (units ns, us, ms, s, m, h). Connections: two per node whatever the number of elections (the main \
            session and an idle witness that holds the node lock), plus one short-lived check at start — plan \
            max_connections for two per process.
            """
    )

    @OptionGroup var options: ConnectionOptions

    @Option(name: .long, help: "The cluster to join (the group of processes that elect among themselves).")
    var cluster: String

    @Option(name: .long, help: "An election to stand in (at least one); repeat for several.")
    var election: [String]

    @Option(name: .long, help: "This node's name (default: <hostname>:<pid>).")
    var name: String?

    @Flag(name: .customLong("no-migrate"), help: "Do not apply migrations; only check that the schema is current.")
    var noMigrate = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "The server's idle timeout on the node's sessions: a leader with no reply from PostgreSQL stops "
                + "leading at lease − margin, and a frozen one is replaced after about a lease (default: 5s).",
            valueName: "duration"))
    var lease: DurationArgument?

    @Option(name: .long, help: ArgumentHelp("Heartbeat interval (default: lease / 5).", valueName: "duration"))
    var heartbeat: DurationArgument?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "How often a follower tries to take a free election when nothing told it to (default: the heartbeat).",
            valueName: "duration"))
    var retry: DurationArgument?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "How long before the lease ends a leader steps down (default: lease / 10).", valueName: "duration"))
    var margin: DurationArgument?

    @Option(
        name: .customLong("statement-timeout"),
        help: ArgumentHelp("The session's statement_timeout (default: lease / 2).", valueName: "duration"))
    var statementTimeout: DurationArgument?

    @Option(
        name: .customLong("sweep-interval"),
        help: ArgumentHelp(
            "How often dead nodes are looked for, by one node of the schema (default: the heartbeat, at most 1s).",
            valueName: "duration"))
    var sweepInterval: DurationArgument?

    @Option(
        name: .customLong("reconnect-delay"),
        help: ArgumentHelp(
            "First delay before reconnecting after a lost session (default: 100ms).", valueName: "duration"))
    var reconnectDelay: DurationArgument?

    @Option(
        name: .customLong("max-reconnect-delay"),
        help: ArgumentHelp("Longest delay between reconnects (default: 5s).", valueName: "duration"))
    var maximumReconnectDelay: DurationArgument?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Ask for a timer event every duration (like next_timer_in in the Elixir library stoker).",
            valueName: "duration"))
    var timer: DurationArgument?

    @Option(name: .customLong("log-level"), help: "Log level of the node's own log lines on stderr.")
    var logLevel: LogLevel = .notice

    func validate() throws {
        if election.isEmpty { throw ValidationError("give at least one --election") }
        var seen = Set<String>()
        for name in election where !seen.insert(name).inserted {
            throw ValidationError("--election \(name) is given twice")
        }
        if let timer, timer.duration <= .zero { throw ValidationError("--timer must be longer than zero") }
    }

    func run() async throws {
        var configuration = StokerNode.Configuration(
            connection: options.connection, cluster: cluster, nodeName: name)
        configuration.schema = options.schema
        configuration.migrate = !noMigrate
        if let lease { configuration.lease = lease.duration }
        configuration.heartbeatInterval = heartbeat?.duration
        if let retry { configuration.retryInterval = retry.duration }
        if let sweepInterval { configuration.sweepInterval = sweepInterval.duration }
        configuration.margin = margin?.duration
        configuration.statementTimeout = statementTimeout?.duration
        if let reconnectDelay { configuration.reconnectDelay = reconnectDelay.duration }
        if let maximumReconnectDelay { configuration.maximumReconnectDelay = maximumReconnectDelay.duration }

        var logger = Logger(label: "stoker") { label in StreamLogHandler.standardError(label: label) }
        logger.logLevel = logLevel.level
        // SIGTERM/SIGINT are trapped from here on, not only once the service group runs: a stop that arrives before the
        // group exists (while the first connection is made) exits 0 at once — nothing has joined, nothing to hand
        // over; once it runs, the group shuts down gracefully.
        let stop = StopRequests()
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let watcher = Task {
            for await _ in signals { stop.request() }
        }
        defer { watcher.cancel() }
        // A reader that went away (`stoker node … | head -1`) is a request to stop, not a crash by SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        do {
            let node = try StokerNode(configuration: configuration, logger: logger)
            let output = LineOutput { stop.request() }
            let behaviour = EventPrinter(timer: timer?.duration, output: output)
            let activators = try election.map { try Activator(election: $0, node: node, behaviour: behaviour) }
            // A first connection, to fail fast: the node itself retries connection failures forever, which is right
            // for a service that starts before its database, not for a command a person or a script just typed.
            if configuration.migrate {
                _ = try await StokerSchema.migrate(
                    connection: configuration.connection, schema: configuration.schema, logger: logger)
            } else {
                _ = try await StokerSchema.verify(connection: configuration.connection, schema: configuration.schema)
            }
            let group = ServiceGroup(
                configuration: .init(
                    // The node first: services stop in reverse order, so the elections are handed over before it leaves.
                    services: [node] + activators.map { $0 as any Service },
                    logger: logger
                )
            )
            stop.attach(group)
            try await group.run()
        } catch {
            // One line, no password: a StokerError never holds one, and the service group's own errors name services.
            writeStandardError("stoker node: \(error)")
            throw ExitCode(1)
        }
    }
}

/// `--log-level`.
enum LogLevel: String, ExpressibleByArgument, CaseIterable, Sendable {
    case trace, debug, info, notice, warning, error, critical

    var level: Logger.Level {
        switch self {
        case .trace: .trace
        case .debug: .debug
        case .info: .info
        case .notice: .notice
        case .warning: .warning
        case .error: .error
        case .critical: .critical
        }
    }
}

/// The built-in behaviour of `stoker node`: one JSON line per callback.
struct EventPrinter: StokerBehaviour {
    let timer: Duration?
    let output: LineOutput

    func initialState() -> Int { 0 }

    func nextTimer(_ state: Int) -> Duration? { timer }

    func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
        state += 1
        output.emit(Self.line(for: event, context: context, now: MonotonicInstant.now()))
    }

    static func line(for event: ActivatorEvent, context: ActivatorContext, now: MonotonicInstant) -> String {
        var object = JSONLine()
        object.raw("at", now.seconds)
        object.string("time", WallClock.iso8601())
        object.string("node", context.node)
        object.integer("incarnation", context.incarnation.map(Int64.init))
        object.string("election", context.election)
        switch event {
        case .nowLeader(let term):
            object.string("event", "now_leader")
            object.integer("term", term)
            // The cluster as the new leader knows it: `name#incarnation`, by incarnation.
            let members = context.members.map { JSONLine.quoted($0.description) }
            object.raw("members", "[" + members.joined(separator: ",") + "]")
        case .nowFollower(let leader, let reason):
            object.string("event", "now_follower")
            object.integer("term", context.term)
            object.string("leader", leader)
            object.string("reason", "\(reason)")
        case .clusterChange(let change), .clusterSplit(let change):
            if case .clusterChange = event {
                object.string("event", "cluster_change")
            } else {
                object.string("event", "cluster_split")
            }
            object.integer("term", context.term)
            switch change {
            case .nodeUp(let member):
                object.string("change", "node_up")
                object.string("member", member.name)
                object.integer("member_incarnation", Int64(member.id))
            case .nodeDown(let member, let reason):
                object.string("change", "node_down")
                object.string("member", member.name)
                object.integer("member_incarnation", Int64(member.id))
                object.string("reason", "\(reason)")
            }
        case .timer:
            object.string("event", "timer")
            object.integer("term", context.term)
        case .trigger(let payload, let sequence):
            object.string("event", "trigger")
            object.integer("term", context.term)
            object.integer("sequence", sequence)
            object.string("payload", payload)
        case .shutdown(let reason):
            object.string("event", "shutdown")
            object.integer("term", context.term)
            object.string("reason", "\(reason)")
        }
        if let endedAt = context.leadershipEndedAt {
            object.raw("ended_at", now.converting(endedAt).seconds)
        }
        return object.text
    }
}

/// Graceful-stop requests (a signal, or stdout gone) and the service group they stop, in whichever order they come.
final class StopRequests: Sendable {
    private let state = Mutex<(requested: Bool, group: ServiceGroup?)>((false, nil))

    /// Before the group exists nothing has joined and nothing leads, so there is nothing to hand over: the process
    /// exits at once (also out of a first connection that hangs).
    func request() {
        let group = state.withLock { state in
            state.requested = true
            return state.group
        }
        if let group {
            Task { await group.triggerGracefulShutdown() }
        } else {
            terminate(0)
        }
    }

    /// A request that came in between is passed on at once (the group remembers it until it runs).
    func attach(_ group: ServiceGroup) {
        let requested = state.withLock { state in
            state.group = group
            return state.requested
        }
        if requested { Task { await group.triggerGracefulShutdown() } }
    }
}

/// stdout, one whole line per `write(2)`, serialized: activators of several elections print concurrently. When stdout
/// is gone (EPIPE), `broken` is called once and nothing more is written.
final class LineOutput: Sendable {
    private let state = Mutex(false)
    private let broken: @Sendable () -> Void

    init(broken: @escaping @Sendable () -> Void) {
        self.broken = broken
    }

    func emit(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        let failed = state.withLock { isBroken -> Bool in
            guard !isBroken else { return false }
            var written = 0
            while written < bytes.count {
                let result = bytes[written...].withUnsafeBytes { write(STDOUT_FILENO, $0.baseAddress, $0.count) }
                if result < 0 && errno == EINTR { continue }
                if result < 0 && errno == EAGAIN {
                    // A non-blocking stdout inherited from the parent: wait until it can take more.
                    var descriptor = pollfd(fd: STDOUT_FILENO, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&descriptor, 1, -1)
                    continue
                }
                if result <= 0 {
                    isBroken = true
                    return true
                }
                written += result
            }
            return false
        }
        if failed { broken() }
    }
}

/// An instant of `CLOCK_MONOTONIC`, which every process on one host shares, paired with `ContinuousClock` read at
/// the same moment, so that instants the library reports (`ContinuousClock`) can be printed on the shared clock.
struct MonotonicInstant {
    let nanoseconds: Int64
    let continuous: ContinuousClock.Instant

    static func now() -> MonotonicInstant {
        // ContinuousClock first: the pair then errs towards converted instants that are late, never early (an early
        // `ended_at` could hide an overlap from a checker).
        let continuous = ContinuousClock.now
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return MonotonicInstant(
            nanoseconds: Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec), continuous: continuous)
    }

    /// `instant` on `CLOCK_MONOTONIC` (exact unless the machine was suspended in between).
    func converting(_ instant: ContinuousClock.Instant) -> MonotonicInstant {
        let (seconds, attoseconds) = instant.duration(to: continuous).components
        let behind = seconds * 1_000_000_000 + attoseconds / 1_000_000_000
        return MonotonicInstant(nanoseconds: nanoseconds - behind, continuous: instant)
    }

    /// Seconds with microseconds, e.g. `81234.501872`.
    var seconds: String {
        let micro = nanoseconds / 1_000
        let (whole, fraction) = micro.quotientAndRemainder(dividingBy: 1_000_000)
        return "\(whole)." + String(fraction.magnitude).leftPadded(to: 6)
    }
}

enum WallClock {
    /// Now in UTC, e.g. `2026-11-25T03:12:49.123Z`.
    static func iso8601() -> String {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        var seconds = spec.tv_sec
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let date =
            "\(parts.tm_year + 1900)-" + "\(parts.tm_mon + 1)".leftPadded(to: 2) + "-"
            + "\(parts.tm_mday)".leftPadded(to: 2)
        let time =
            "\(parts.tm_hour)".leftPadded(to: 2) + ":" + "\(parts.tm_min)".leftPadded(to: 2) + ":"
            + "\(parts.tm_sec)".leftPadded(to: 2) + "." + "\(spec.tv_nsec / 1_000_000)".leftPadded(to: 3)
        return date + "T" + time + "Z"
    }
}

/// One JSON object, fields in the order written.
struct JSONLine {
    private var fields: [String] = []

    var text: String { "{" + fields.joined(separator: ",") + "}" }

    mutating func raw(_ key: String, _ value: String) {
        fields.append(Self.quoted(key) + ":" + value)
    }

    mutating func string(_ key: String, _ value: String?) {
        raw(key, value.map(Self.quoted) ?? "null")
    }

    mutating func integer(_ key: String, _ value: Int64?) {
        raw(key, value.map { "\($0)" } ?? "null")
    }

    static func quoted(_ text: String) -> String {
        var result = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case _ where scalar.value < 0x20:
                result += "\\u" + String(scalar.value, radix: 16).leftPadded(to: 4)
            default:
                result.unicodeScalars.append(scalar)
            }
        }
        return result + "\""
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
