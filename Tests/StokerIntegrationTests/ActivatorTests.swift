import Logging
import MetricsTestKit
import ServiceLifecycle
import StokerHarness
import Synchronization
import Testing

@_spi(Testing) @testable import Stoker

/// The activator's rules (callbacks one at a time and in order, a throwing callback does not stop it, demotion
/// cancels leader work, `clusterValid` decides cluster changes) and the node's observability, against real PostgreSQL.
@Suite("Activator")
struct ActivatorTests {
    /// Records the leader task's life: when it saw cancellation, `isLeader` then, and when it finished.
    final class TaskLog: Sendable {
        let state = Mutex<[(String, ContinuousClock.Instant, Bool)]>([])
        func record(_ what: String, isLeader: Bool) {
            state.withLock { $0.append((what, .now, isLeader)) }
        }
        func at(_ what: String) -> ContinuousClock.Instant? { state.withLock { $0.first { $0.0 == what }?.1 } }
        func isLeader(_ what: String) -> Bool? { state.withLock { $0.first { $0.0 == what }?.2 } }
    }

    /// Starts leader-scoped work that runs until cancelled, then takes `cleanup` to finish.
    struct Worker: StokerBehaviour {
        let history: History
        let log: TaskLog
        let cleanup: Duration

        func initialState() -> Int { 0 }

        func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
            var seen: [ActivatorEvent] = []
            try await RecordingBehaviour(history: history).handle(event, state: &seen, context: context)
            guard case .nowLeader = event else { return }
            let node = context.node
            let started = context.leaderTask { [log, cleanup] in
                while !Task.isCancelled { try? await Task.sleep(for: .milliseconds(5)) }
                log.record("\(node) cancelled", isLeader: context.isLeader)
                // Cleanup that ignores cancellation, as real work might.
                let until = ContinuousClock.now + cleanup
                while ContinuousClock.now < until { await Task.yield() }
                log.record("\(node) finished", isLeader: context.isLeader)
            }
            #expect(started != nil)
        }
    }

    @Test("leader work is cancelled on demotion; a graceful hand-over waits for it before releasing the lock")
    func leaderTaskScope() async throws {
        try await withTestDatabase { database in
            let history = History()
            let log = TaskLog()
            try await withNodes { nodes in
                let behaviour = Worker(history: history, log: log, cleanup: .milliseconds(200))
                let a = nodes.add(try TestNode("a", database: database, elections: [], history: history))
                try await waitForMembers(1, in: database)
                let first = try Activator(election: "e", node: a.node, behaviour: behaviour)
                let firstRun = Task { try await first.run() }
                try await history.wait("a leads") { History.leaders($0, election: "e") == ["a"] }
                // b runs its node and activator in one ServiceGroup, as an application would.
                let bNode = try StokerNode(
                    configuration: TestNode.configuration(database, cluster: "test", name: "b"), logger: testLogger("b")
                )
                let second = try Activator(election: "e", node: bNode, behaviour: behaviour)
                let bGroup = ServiceGroup(configuration: .init(services: [bNode, second], logger: testLogger("b")))
                let bRun = Task { try await bGroup.run() }

                firstRun.cancel()  // a hard stop of a's activator alone; a's node keeps running
                _ = try? await firstRun.value
                try await history.wait("b leads") { History.leaders($0, election: "e") == ["b"] }
                let successor = try #require(history.entries.last { $0.kind == .nowLeader })
                let cancelled = try #require(log.at("a cancelled"))
                // Hard stop: cancelled before the successor could start, and it no longer leads.
                #expect(cancelled <= successor.at)
                #expect(log.isLeader("a cancelled") == false)

                // Graceful: b's group stops; its cleanup (200 ms, ignoring cancellation) finishes before the lock
                // is released, so before anyone else can lead.
                let c = nodes.add(try TestNode("c", database: database, elections: ["e"], history: history))
                try await waitForMembers(3, in: database)
                await bGroup.triggerGracefulShutdown()
                try await bRun.value
                try await history.wait("c leads") { History.leaders($0, election: "e") == ["c"] }
                let finished = try #require(log.at("b finished"))
                let next = try #require(history.entries.last { $0.kind == .nowLeader && $0.node == "c" })
                #expect(finished <= next.at)
                #expect(log.isLeader("b cancelled") == false)
                try await a.stop()
                try await c.stop()
                history.check(complete: true)
            }
        }
    }

    /// Throws on every timer: the activator logs it and goes on.
    struct Thrower: StokerBehaviour {
        let history: History
        struct Boom: Error {}

        func initialState() -> Int { 0 }

        func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
            var seen: [ActivatorEvent] = []
            try await RecordingBehaviour(history: history).handle(event, state: &seen, context: context)
            state += 1
            if case .timer = event { throw Boom() }
        }

        func nextTimer(_ state: Int) -> Duration? { .milliseconds(10) }
    }

    @Test("a throwing callback is logged at error and the activator goes on, callbacks in order, one at a time")
    func throwingCallback() async throws {
        try await withTestDatabase { database in
            let history = History()
            let capture = LogCapture()
            let configuration = TestNode.configuration(database, cluster: "test", name: "a")
            let node = try StokerNode(configuration: configuration, logger: capture.logger)
            let activator = try Activator(election: "e", node: node, behaviour: Thrower(history: history))
            let group = ServiceGroup(configuration: .init(services: [node, activator], logger: capture.logger))
            let run = Task { try await group.run() }
            try await history.wait("five timers and leadership") { entries in
                History.count(entries, .timer) >= 5 && History.count(entries, .nowLeader) == 1
            }
            #expect(capture.lines.contains { $0.level == .error && $0.message.contains("callback threw") })
            await group.triggerGracefulShutdown()
            try await run.value
            // Every callback completed before the next began: the state counts them all.
            #expect(activator.dump().behaviourState == history.entries.count)
            #expect(history.entries.last?.kind == .shutdown)
            history.check(complete: true)
        }
    }

    @Test("clusterValid: .yes → clusterChange, .clusterSplit → clusterSplit (role split), .no → nothing")
    func clusterValidity() async throws {
        for validity in [ClusterValidity.yes, .clusterSplit, .no] {
            try await withTestDatabase { database in
                let history = History()
                try await withNodes { nodes in
                    let a = nodes.add(
                        try TestNode(
                            "a", database: database, elections: ["e"], history: history, validity: validity,
                            configure: TestNode.steady))
                    // A witness election on the same node, always valid: once it has seen b come and go, the
                    // election under test has been told too (one thread queues both), so "nothing" is observed.
                    let witness = try Activator(
                        election: "witness", node: a.node, behaviour: RecordingBehaviour(history: history))
                    let witnessRun = Task { try await witness.run() }
                    try await history.wait("a leads both") { entries in
                        History.leaders(entries, election: "e") == ["a"]
                            && History.leaders(entries, election: "witness") == ["a"]
                    }
                    let b = nodes.add(
                        try TestNode(
                            "b", database: database, elections: [], history: history, configure: TestNode.steady))
                    try await waitForMembers(2, in: database)
                    try await b.stop()
                    try await history.wait("the witness saw b come and go") { entries in
                        entries.filter { $0.election == "witness" && $0.kind == .clusterChange }.count == 2
                    }
                    witnessRun.cancel()
                    _ = try? await witnessRun.value
                    switch validity {
                    case .yes:
                        try await history.wait("up and down") { entries in
                            entries.filter { $0.election == "e" && $0.kind == .clusterChange }.count == 2
                        }
                        #expect(a.activators[0].dump().role == .leader)
                    case .clusterSplit:
                        try await history.wait("up and down, split") { History.count($0, .clusterSplit) == 2 }
                        #expect(a.activators[0].dump().role == .split)
                    case .no:
                        try await a.stop()
                        let seen = history.entries.filter { $0.election == "e" }.map(\.kind)
                        #expect(seen == [.nowLeader, .shutdown])
                    }
                    if validity != .no { try await a.stop() }
                    history.check(complete: true)
                }
            }
        }
    }

    @Test("metrics: is-leader gauge per election, leadership changes, reconnects, heartbeat round-trip")
    func metrics() async throws {
        try await withTestDatabase { database in
            let history = History()
            let metrics = TestMetrics()
            // Warnings (a lost session, a lease run out) explain any extra leadership change; shown on a failure.
            let capture = LogCapture()
            var configuration = TestNode.configuration(database, cluster: "test", name: "a")
            configuration.heartbeatInterval = .milliseconds(100)
            let node = try StokerNode(configuration: configuration, logger: capture.logger, metricsFactory: metrics)
            let activator = try Activator(election: "e", node: node, behaviour: RecordingBehaviour(history: history))
            let group = ServiceGroup(configuration: .init(services: [node, activator], logger: testLogger("a")))
            let dimensions = [("cluster", "test"), ("node", "a"), ("election", "e")]
            try await whileRunning(group) {
                /// Every gain and every loss of leadership counted once, the gauge going 1, 0, 1, … — whatever
                /// else happened on a loaded host (the properties, not a count of changes).
                func consistent() throws -> Bool {
                    let entries = history.entries.filter { $0.election == "e" }
                    let gains = History.count(entries, .nowLeader)
                    let losses = entries.filter { $0.kind == .nowFollower }.count
                    let gauge = try metrics.expectGauge("stoker_is_leader", dimensions).values.map { $0 }
                    let changes = try metrics.expectCounter("stoker_leadership_changes_total", dimensions)
                    let alternating = gauge.enumerated().allSatisfy { $0.element == ($0.offset % 2 == 0 ? 1 : 0) }
                    return alternating && gauge.count == gains + losses && changes.totalValue == gains + losses
                }
                try await history.wait("a leads") { History.count($0, .nowLeader) >= 1 }
                try await eventually("the metrics count the first leadership") { try consistent() }
                #expect(try metrics.expectGauge("stoker_is_leader", dimensions).lastValue == 1)
                // A lost session: demotion, then a reconnect (a new incarnation), then leadership again.
                let before = History.count(history.entries, .nowLeader)
                let reconnectsBefore =
                    (try? metrics.expectCounter("stoker_reconnects_total", [("cluster", "test"), ("node", "a")]))?
                    .totalValue ?? 0
                try await database.terminateSession(of: node)
                try await history.wait("demoted and leading again") { History.count($0, .nowLeader) > before }
                try await eventually("the metrics count the loss and the new leadership") { try consistent() }
                #expect(try metrics.expectGauge("stoker_is_leader", dimensions).lastValue == 1)
                #expect(
                    try metrics.expectCounter("stoker_reconnects_total", [("cluster", "test"), ("node", "a")])
                        .totalValue > reconnectsBefore)
                let warnings = capture.lines.filter { $0.level >= .warning }.map(\.text)
                #expect(
                    History.count(history.entries, .nowLeader) == 2 || !warnings.isEmpty,
                    "an extra leadership change with no warning logged")
                try await eventually("a heartbeat round-trip is recorded") {
                    (try? metrics.expectTimer("stoker_heartbeat_rtt", [("cluster", "test"), ("node", "a")]))?
                        .lastValue.map { $0 > 0 } ?? false
                }
            }
            #expect(try metrics.expectGauge("stoker_is_leader", dimensions).lastValue == 0)
            history.check(complete: true)
        }
    }

    static let secret = "pw-9f3c1e7d-not-in-any-log"

    @Test("a wrong password: run() throws .authenticationFailed; no error or log line holds the password")
    func wrongPassword() async throws {
        try await withControlledDatabase { database in
            let capture = LogCapture()
            let role = try await database.createRole(password: "the-right-one")
            var configuration = StokerNode.Configuration(
                connection: database.tcpConninfo(user: role, password: Self.secret), cluster: "test", nodeName: "a")
            configuration.lease = .seconds(2)
            let node = try StokerNode(configuration: configuration, logger: capture.logger)
            let history = History()
            let activator = try Activator(election: "e", node: node, behaviour: RecordingBehaviour(history: history))
            let activatorRun = Task { try await activator.run() }
            let error = await #expect(throws: StokerError.self) { try await node.run() }
            #expect(error?.code == .authenticationFailed)
            expectNoSecret(error, Self.secret)
            // The activator fails with the node's error (so a ServiceGroup reports it, whichever ends first).
            let activatorError = await #expect(throws: StokerError.self) { try await activatorRun.value }
            #expect(activatorError?.code == .authenticationFailed)
            // The activator learnt the node stopped.
            #expect(history.entries.map(\.event) == [.shutdown(reason: .nodeStopped)])
            #expect(!capture.lines.isEmpty)
            for line in capture.lines { #expect(!line.text.contains(Self.secret), "leaked: \(line.text)") }
        }
    }

    @Test(
        "migrate: false on a database without the schema: run() throws .schemaMismatch at once, no retry loop",
        .timeLimit(.minutes(1)))
    func missingSchema() async throws {
        try await withTestDatabase { database in
            let capture = LogCapture()
            var configuration = TestNode.configuration(database, cluster: "test", name: "a")
            configuration.migrate = false
            let node = try StokerNode(configuration: configuration, logger: capture.logger)
            let error = await #expect(throws: StokerError.self) { try await node.run() }
            #expect(error?.code == .schemaMismatch)
            // One attempt: the node did not reconnect in a loop (each attempt would log a warning or count).
            #expect(!capture.lines.contains { $0.level == .warning })
            // Logged once, at info: the thrown error is the caller's to report.
            #expect(capture.lines.filter { $0.message.contains("the node stopped") }.map(\.level) == [.info])
            #expect(!capture.lines.contains { $0.level >= .error })
        }
    }

    @Test("a lost session is logged at warning with the connection, never the password")
    func sessionLossLog() async throws {
        try await withControlledDatabase { database in
            let capture = LogCapture()
            let role = try await database.createRole(password: Self.secret)
            _ = try await database.admin("GRANT CREATE ON DATABASE \"\(database.name)\" TO \(role)")
            var configuration = StokerNode.Configuration(
                connection: database.tcpConninfo(user: role, password: Self.secret), cluster: "test", nodeName: "a")
            configuration.lease = .seconds(2)
            configuration.reconnectDelay = .milliseconds(50)
            let history = History()
            let node = try StokerNode(configuration: configuration, logger: capture.logger)
            let activator = try Activator(election: "e", node: node, behaviour: RecordingBehaviour(history: history))
            let group = ServiceGroup(configuration: .init(services: [node, activator], logger: capture.logger))
            try await whileRunning(group) {
                try await history.wait("a leads") { History.count($0, .nowLeader) == 1 }
                try await database.terminateSession(of: node)
                try await history.wait("a leads again") { History.count($0, .nowLeader) == 2 }
            }
            let warnings = capture.lines.filter { $0.level == .warning }
            // The server's reason when libpq read the FATAL before the socket closed ("terminating connection due to
            // administrator command"); over TLS it may see the close first ("SSL connection has been closed
            // unexpectedly", 1 run in 12 with a busy loop per core). Either way: at warning, with the connection.
            #expect(
                warnings.contains { $0.text.contains("session lost") && $0.text.contains("(connection: host=") },
                "\(warnings.map(\.text))")
            #expect(capture.lines.contains { $0.level == .notice && $0.message == "became leader" })
            #expect(capture.lines.contains { $0.level == .notice && $0.message == "stepped down" })
            for line in capture.lines { #expect(!line.text.contains(Self.secret), "leaked: \(line.text)") }
            history.check(complete: true)
        }
    }
}

/// Waits (bounded: 30 s, fails loudly) until `condition` holds, for state no event announces (a metric).
func eventually(
    _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: () throws -> Bool
) async throws {
    for _ in 0..<3000 {
        if try condition() { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("never happened: \(what)", sourceLocation: sourceLocation)
    throw History.TimedOut(what: what)
}

/// Captures every log line (message and metadata) for assertions.
final class LogCapture: Sendable {
    struct Line: Sendable {
        let level: Logger.Level
        let message: String
        let text: String
    }

    private let storage = Mutex<[Line]>([])
    var lines: [Line] { storage.withLock { $0 } }

    var logger: Logger {
        var logger = Logger(label: "capture", factory: { _ in Handler(capture: self) })
        logger.logLevel = .trace
        return logger
    }

    fileprivate func append(_ line: Line) { storage.withLock { $0.append(line) } }

    struct Handler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 })
            let text = "\(event.message) \(all.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: " "))"
            capture.append(Line(level: event.level, message: "\(event.message)", text: text))
        }
    }
}
