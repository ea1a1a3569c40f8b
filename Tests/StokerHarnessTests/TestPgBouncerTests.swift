import Foundation
import StokerHarness
import Testing

private let childReportVariable = "STOKER_TEST_KILL_CHILD_REPORT"

@Suite("TestPgBouncer")
struct TestPgBouncerTests {
    @Test("a bouncer in front of a private cluster forwards SQL and leaves nothing behind when stopped")
    func lifecycle() async throws {
        try await TestPostgres.withPrivate { postgres in
            try await postgres.withDatabase { database in
                let bouncer = try await TestPgBouncer.start(inFrontOf: postgres, poolMode: .session, poolSize: 2)
                let directory = bouncer.directory
                do {
                    #expect(directory.hasPrefix("/tmp/stoker-pg-"))
                    #expect(bouncer.port != postgres.port)
                    #expect(!processes(mentioning: directory + "/pgbouncer.ini").isEmpty)
                    let conninfo = bouncer.conninfo(database: database)
                    #expect(conninfo.contains("port='\(bouncer.port)'"))
                    let rows = try await TestPostgres.execute(
                        "SELECT current_database(), current_user, current_setting('port')", conninfo: conninfo)
                    #expect(rows == [[database.name, "postgres", String(postgres.port)]])
                } catch {
                    await bouncer.stop()
                    throw error
                }
                await bouncer.stop()
                #expect(!FileManager.default.fileExists(atPath: directory))
                #expect(processes(mentioning: directory).isEmpty)
            }
        }
    }

    @Test("cluster and bouncer vanish soon after the test process is killed with SIGKILL")
    func killedTestProcess() async throws {
        let report = "/tmp/stoker-kill-report-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: report) }
        var environment = ProcessInfo.processInfo.environment
        environment[childReportVariable] = report
        let testBinary = try builtExecutable(runningTestBinaryName())
        let child = Task {
            try await runProcess(
                [
                    testBinary, "--testing-library", "swift-testing",
                    "--filter", "childHoldingClusterAndBouncer",
                ],
                environment: environment, timeout: .seconds(90))
        }
        var lines: [String] = []
        let deadline = ContinuousClock.now.advanced(by: .seconds(60))
        while lines.count < 3, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
            let text = (try? String(contentsOfFile: report, encoding: .utf8)) ?? ""
            lines = text.hasSuffix("\n") ? text.split(separator: "\n").map(String.init) : []
        }
        guard lines.count == 3, let pid = Int32(lines[0]) else {
            child.cancel()
            let result = try? await child.value
            Issue.record("the child never reported its cluster: \(String(describing: result))")
            return
        }
        kill(pid, SIGKILL)
        let result = try await child.value
        #expect(result.status == 128 + SIGKILL)

        let directories = Array(lines[1...])
        let gone = ContinuousClock.now.advanced(by: .seconds(20))
        while directories.contains(where: FileManager.default.fileExists(atPath:)), ContinuousClock.now < gone {
            try await Task.sleep(for: .milliseconds(50))
        }
        for directory in directories {
            #expect(!FileManager.default.fileExists(atPath: directory), "\(directory) left behind")
            #expect(processes(mentioning: directory).isEmpty, "processes left for \(directory)")
        }
    }

    /// Runs only as the child of ``killedTestProcess()``: starts a cluster and a bouncer, reports
    /// `pid\nclusterRoot\nbouncerDirectory\n`, and waits to be killed.
    @Test(
        "helper: holds a cluster and a bouncer until killed (only when run by killedTestProcess)",
        .enabled(if: ProcessInfo.processInfo.environment[childReportVariable] != nil, "a child of killedTestProcess")
    )
    func childHoldingClusterAndBouncer() async throws {
        let report = try #require(ProcessInfo.processInfo.environment[childReportVariable])
        let postgres = try await TestPostgres.start()
        let bouncer = try await TestPgBouncer.start(inFrontOf: postgres, poolMode: .transaction)
        let text = "\(getpid())\n\(postgres.socketDirectory ?? "")\n\(bouncer.directory)\n"
        try text.write(toFile: report + ".tmp", atomically: false, encoding: .utf8)
        rename(report + ".tmp", report)
        try await Task.sleep(for: .seconds(60))
    }

    @Test(
        "an external server is refused with a clear error",
        .enabled(
            if: ProcessInfo.processInfo.environment["STOKER_TEST_DATABASE_URL"] != nil
                || ProcessInfo.processInfo.environment["PGHOST"] != nil,
            "needs an external server (STOKER_TEST_DATABASE_URL or PGHOST)"
        )
    )
    func externalRefused() async throws {
        let shared = try await TestPostgres.shared()
        try #require(!shared.isPrivate)
        let error = await #expect(throws: TestPostgresError.self) {
            try await TestPgBouncer.start(inFrontOf: shared, poolMode: .session)
        }
        #expect(error?.message.contains("private cluster") == true)
    }
}
