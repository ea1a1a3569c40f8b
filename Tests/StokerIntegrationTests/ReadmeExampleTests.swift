// swift-format-ignore-file: OrderedImports
// (the example's own imports must stay inside it, below the test's)

import StokerHarness
import Testing

// The code between the two markers is the README's usage example, character for character (ReadmeTests checks it).
// It must stay self-contained: no test helper may appear in it.

// README example: begin
import Logging
import ServiceLifecycle
import Stoker

/// Imports new files, on one process of the cluster at a time.
struct Importer: StokerBehaviour {
    /// The behaviour's own state: here, how many timer ticks this process saw.
    func initialState() -> Int { 0 }

    func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
        switch event {
        case .nowLeader(let term):
            context.logger.notice("importing", metadata: ["term": "\(term)"])
            // Leader-scoped work: cancelled the moment leadership ends, before another process can lead.
            context.leaderTask {
                while !Task.isCancelled, context.isLeader {
                    // Import what is new; write it with `fencedImport(file:term:)` on your own connection.
                    try? await Task.sleep(for: .seconds(1))
                }
            }
        case .nowFollower(_, let reason):
            context.logger.warning("stopped importing", metadata: ["reason": "\(reason)"])
        case .timer:
            state += 1  // timers fire on every process, leader or not
        case .trigger(let payload, _):
            context.logger.notice("asked to import now", metadata: ["file": "\(payload)"])
        case .clusterChange, .clusterSplit, .shutdown:
            break
        }
    }

    func nextTimer(_ state: Int) -> Duration? { .seconds(30) }
}

/// Sends a digest every hour from whichever process leads "mailer".
struct Mailer: StokerBehaviour {
    func initialState() -> Int { 0 }

    func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
        if case .timer = event, context.isLeader {
            state += 1  // send the digest here
        }
    }

    func nextTimer(_ state: Int) -> Duration? { .seconds(3600) }
}

/// A write on the leader's behalf, guarded by the fence: run these statements in one transaction on your own
/// PostgreSQL client (PostgresNIO, …), never on the node's session. Once a newer term exists, or nobody leads, the
/// fence fails with SQLSTATE SK001 (`Fence.staleTermSQLState`) and the transaction rolls back.
func fencedImport(file: String, term: Int64) throws -> [(sql: String, parameters: [String])] {
    [
        (try Fence.sql(), ["billing-prod", "importer", "\(term)"]),
        ("INSERT INTO imported_files (name, term) VALUES ($1, $2)", [file, "\(term)"]),
    ]
}

/// One node (two PostgreSQL sessions: the main one and an idle witness) shared by two elections. SIGTERM (systemd,
/// Kubernetes) and Ctrl-C start a graceful shutdown; tests pass `handleSignals: false`, as a handled signal stays
/// caught for the life of the process.
func makeServices(databaseURL: String, logger: Logger, handleSignals: Bool = true) throws -> ServiceGroup {
    // The node name defaults to "<hostname>:<pid>"; lease, retry and margin to the defaults under "Timing".
    let configuration = StokerNode.Configuration(connection: databaseURL, cluster: "billing-prod")
    let node = try StokerNode(configuration: configuration, logger: logger)
    let importer = try Activator(election: "importer", node: node, behaviour: Importer())
    let mailer = try Activator(election: "mailer", node: node, behaviour: Mailer())
    return ServiceGroup(
        configuration: .init(
            // The node first: services stop in reverse order, so the elections are handed over before it leaves.
            services: [node, importer, mailer],
            gracefulShutdownSignals: handleSignals ? [.sigterm, .sigint] : [],
            logger: logger
        )
    )
}

// In `main`: try await makeServices(databaseURL: url, logger: Logger(label: "billing")).run()
// README example: end

/// The README's example, run: both elections get a leader (this process), a fenced write goes through while it
/// leads, a graceful shutdown releases both, and the same write then fails with the fence's SQLSTATE.
@Suite("README example")
struct ReadmeExampleTests {
    @Test("the README's services elect this process for both elections and release both on graceful shutdown")
    func readmeExample() async throws {
        try await withTestDatabase { database in
            try await database.admin("CREATE TABLE imported_files (name text, term bigint)")
            // No signals: the test process must stay killable by SIGINT/SIGTERM after the group has ended.
            let group = try makeServices(
                databaseURL: database.conninfo, logger: testLogger("stoker.readme"), handleSignals: false)
            let importer = try await whileRunning(group) {
                let importer = try await leader("importer", in: database)
                let mailer = try await leader("mailer", in: database)
                let nodeName = StokerNode.Configuration.defaultNodeName()
                #expect(importer.member.name == nodeName)
                #expect(mailer.member == importer.member, "both elections share the one node")

                try await runInOneTransaction(try fencedImport(file: "a.csv", term: importer.term), in: database)
                #expect(try await database.admin("SELECT count(*) FROM imported_files") == [["1"]])
                return importer
            }
            #expect(try await whereis("importer", cluster: "billing-prod", in: database) == nil)
            #expect(try await whereis("mailer", cluster: "billing-prod", in: database) == nil)

            // Nobody leads now: a write fenced with the old term is refused and rolls back.
            let stale = try fencedImport(file: "b.csv", term: importer.term)
            let error = await #expect(throws: TestPostgresError.self) {
                try await runInOneTransaction(stale, in: database)
            }
            #expect(error?.sqlState == Fence.staleTermSQLState)
            #expect(try await database.admin("SELECT count(*) FROM imported_files") == [["1"]])
        }
    }

    /// Waits (10 ms steps, at most 30 s) until `election` has a leader, per `pg_locks`; fails loudly otherwise.
    /// Until the node has applied the migrations, `whereis` reports the missing schema: that counts as no leader yet.
    private func leader(
        _ election: String,
        in database: TestDatabase,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws -> StokerNode.Leader {
        var lastError: StokerError?
        for _ in 0..<3000 {
            do {
                if let leader = try await whereis(election, cluster: "billing-prod", in: database) { return leader }
            } catch let error as StokerError where error.code == .schemaMismatch {
                lastError = error
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        let last = lastError.map { "; last whereis error: \($0)" } ?? ""
        Issue.record("election \"\(election)\" got no leader within 30 s\(last)", sourceLocation: sourceLocation)
        throw NoLeader(election: election)
    }

    private struct NoLeader: Error { let election: String }

    /// Runs parameterised statements in one implicit transaction of one simple query (PREPARE + EXECUTE), as an
    /// application's own client would with bound parameters.
    private func runInOneTransaction(
        _ statements: [(sql: String, parameters: [String])],
        in database: TestDatabase
    ) async throws {
        var script = ""
        for (index, statement) in statements.enumerated() {
            let arguments = statement.parameters.map { value in
                "'" + value.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "''") + "'"
            }
            script += "PREPARE s\(index) AS \(statement.sql);\n"
            script += "EXECUTE s\(index)(\(arguments.joined(separator: ", ")));\n"
        }
        try await database.admin(script)
    }
}
