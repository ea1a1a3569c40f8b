// swift-format-ignore-file: OrderedImports
// (each article's example keeps its own imports, as a reader would copy them)

// The Swift code blocks of the DocC articles (Sources/Stoker/Documentation.docc/*.md) and of README.md, compiled
// here: each region between `// Docs: <article> <n>: begin` and `end` is one block, character for character apart
// from the leading indentation (DocumentationTests checks that every block appears in a compiled file). The
// Fencing article's example lives in FencingTests.swift, where it runs against a real election; the README's usage
// example in ReadmeExampleTests.swift. Names here must not clash with those files' (`Importer`, `fencedImport`, …).

// Docs: GettingStarted 2: begin
import Logging
import ServiceLifecycle
import Stoker

/// Writes the nightly report, on one process of the cluster at a time.
struct NightlyReport: StokerBehaviour {
    func initialState() -> Int { 0 }

    func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
        switch event {
        case .nowLeader(let term):
            context.logger.notice("writing reports", metadata: ["term": "\(term)"])
            // Cancelled the moment leadership ends, before any other process can lead.
            context.leaderTask {
                while !Task.isCancelled {
                    // ... the work that must run on exactly one process ...
                    try? await Task.sleep(for: .seconds(10))
                }
            }
        case .nowFollower(_, let reason):
            context.logger.warning("stopped writing reports", metadata: ["reason": "\(reason)"])
        default:
            break
        }
    }
}
// Docs: GettingStarted 2: end

/// Never called: it would trap SIGTERM and SIGINT for the test process.
func runNightlyReport(databaseURL: String) async throws {
    // Docs: GettingStarted 3: begin
    let logger = Logger(label: "reports")
    let node = try StokerNode(configuration: .init(connection: databaseURL, cluster: "reports"), logger: logger)
    let report = try Activator(election: "nightly-report", node: node, behaviour: NightlyReport())
    let group = ServiceGroup(services: [node, report], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    try await group.run()
    // Docs: GettingStarted 3: end
}

/// README.md, "Triggers".
func sendImportTrigger(databaseURL: String) async throws -> Int64 {
    // Docs: README 2: begin
    let number = try await StokerCluster.trigger(
        election: "importer", payload: "incoming/2026-12-02.csv", cluster: "billing-prod", connection: databaseURL)
    // Docs: README 2: end
    return number
}

/// Fencing: the application's PostgreSQL client in the same group as the node (`Importer` is the README example's).
func makeFencedServices(databaseURL: String, client: PostgresClient, logger: Logger) throws -> ServiceGroup {
    // Docs: Fencing 2: begin
    let node = try StokerNode(configuration: .init(connection: databaseURL, cluster: "billing-prod"), logger: logger)
    let importer = try Activator(election: "importer", node: node, behaviour: Importer())
    // Services stop in reverse order: the activator hands over first (its leader tasks finish their writes), then
    // the node leaves, and the client, first in the list, closes last.
    return ServiceGroup(
        services: [client, node, importer], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    // Docs: Fencing 2: end
}

/// Operations: a longer lease.
func tunedConfiguration(databaseURL: String) -> StokerNode.Configuration {
    // Docs: Operations 1: begin
    var configuration = StokerNode.Configuration(connection: databaseURL, cluster: "billing-prod")
    configuration.lease = .seconds(15)  // heartbeat 3 s, margin 1.5 s, statement timeout 7.5 s follow from it
    // Docs: Operations 1: end
    return configuration
}

/// Operations: graceful shutdown under Kubernetes.
func makeKubernetesServices(databaseURL: String, logger: Logger) throws -> ServiceGroup {
    // Docs: Operations 2: begin
    let node = try StokerNode(configuration: .init(connection: databaseURL, cluster: "billing-prod"), logger: logger)
    let report = try Activator(election: "nightly-report", node: node, behaviour: NightlyReport())
    var configuration = ServiceGroupConfiguration(
        services: [node, report], gracefulShutdownSignals: [.sigterm], logger: logger)
    // Below the pod's terminationGracePeriodSeconds (30 s by default): past it, the group cancels its services —
    // a hard stop — before Kubernetes sends SIGKILL.
    configuration.maximumGracefulShutdownDuration = .seconds(25)
    return ServiceGroup(configuration: configuration)
    // Docs: Operations 2: end
}

// Docs: Operations 3: begin
/// A health check for an HTTP handler: 200 while every election has a leader, 503 otherwise.
func clusterHealth(databaseURL: String) async -> (status: Int, body: String) {
    do {
        let snapshot = try await StokerCluster.snapshot(cluster: "billing-prod", connection: databaseURL)
        switch snapshot.health {
        case .healthy:
            return (200, "healthy")
        case .degraded(let problems):
            return (200, problems.joined(separator: "\n"))
        case .noLeader(let problems):
            return (503, problems.joined(separator: "\n"))
        }
    } catch {
        return (503, "cannot read the cluster: \(error)")
    }
}
// Docs: Operations 3: end

// Docs: LeaderOnlyJob 1: begin
import PostgresNIO

/// Every `interval`, imports the files that arrived, on whichever process leads "importer" — and only while it
/// leads: each write is fenced with the leadership's term.
struct PeriodicImport: StokerBehaviour {
    let client: PostgresClient
    let interval: Duration
    /// Lists the files that wait (your own code).
    let pendingFiles: @Sendable () async throws -> [String]

    /// How many files this process imported, all leaderships together.
    func initialState() -> Int { 0 }

    func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
        guard case .nowLeader(let term) = event else { return }
        // One loop per leadership: cancelled when it ends, before another process can begin.
        context.leaderTask { [client, interval, pendingFiles] in
            while !Task.isCancelled, context.isLeader {
                do {
                    for file in try await pendingFiles() {
                        try await fencedImport(
                            client, cluster: context.cluster, election: context.election, term: term, file: file,
                            logger: context.logger)
                    }
                } catch is StaleTerm {
                    return  // a newer leadership exists: stop, the demotion is on its way
                } catch {
                    context.logger.error("import failed; retrying", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: interval)
            }
        }
    }
}
// Docs: LeaderOnlyJob 1: end

/// Never called: it would trap SIGTERM and SIGINT for the test process.
func runPeriodicImport(databaseURL: String, client: PostgresClient) async throws {
    // Docs: LeaderOnlyJob 2: begin
    let logger = Logger(label: "importer")
    let node = try StokerNode(configuration: .init(connection: databaseURL, cluster: "billing-prod"), logger: logger)
    let job = PeriodicImport(client: client, interval: .seconds(60), pendingFiles: { ["incoming/a.csv"] })
    let importer = try Activator(election: "importer", node: node, behaviour: job)
    let group = ServiceGroup(
        services: [client, node, importer], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
    try await group.run()
    // Docs: LeaderOnlyJob 2: end
}

// Docs: LeaderOnlyJob 3: begin
/// Sends the digest every hour from the leader: the timer fires on every process, only the leader acts.
struct HourlyDigest: StokerBehaviour {
    /// When the last digest went out, on this process.
    func initialState() -> ContinuousClock.Instant? { nil }

    func handle(_ event: ActivatorEvent, state: inout ContinuousClock.Instant?, context: ActivatorContext)
        async throws
    {
        guard case .timer = event, context.isLeader else { return }
        // ... send the digest (a fenced write with context.term records that it went out) ...
        state = .now
    }

    func nextTimer(_ state: ContinuousClock.Instant?) -> Duration? { .seconds(3600) }
}
// Docs: LeaderOnlyJob 3: end

/// The Swift blocks of the library's own doc comments (DocC shows them too).
enum DocCommentExamples {
    // Docs: StokerBehaviour (Sources/Stoker/Activator/Behaviour.swift): begin
    struct Importer: StokerBehaviour {
        func initialState() -> Int { 0 }

        func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {
            switch event {
            case .nowLeader(let term):
                // Leader work: cancelled the moment leadership ends, before another process can lead.
                context.leaderTask {
                    while !Task.isCancelled, context.isLeader {
                        context.logger.info("importing", metadata: ["term": "\(term)"])
                        try? await Task.sleep(for: .seconds(1))
                    }
                }
            case .timer:
                state += 1
            default:
                break
            }
        }

        func nextTimer(_ state: Int) -> Duration? { .seconds(60) }
    }
    // Docs: StokerBehaviour: end

    /// `StokerCluster.watch`'s example, with what it assumes in scope.
    static func watch(url: String) async throws -> ClusterSnapshot? {
        var view: ClusterSnapshot?
        func log(_ line: String) { print(line) }
        // Docs: StokerCluster.watch (Sources/Stoker/Cluster/ClusterWatch.swift): begin
        for try await event in StokerCluster.watch(cluster: "billing", connection: url) {
            switch event {
            case .snapshot(let now): view = now
            case .nodeDown(let member, let reason): log("\(member) left: \(reason)")
            default: break
            }
        }
        // Docs: StokerCluster.watch: end
        return view
    }
}
