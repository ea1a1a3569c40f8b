import Foundation
import StokerHarness
import Testing

@Suite("TestPostgres.startStandby", .timeLimit(.minutes(3)))
struct StandbyTests {
    @Test("a standby streams the primary's rows, is in recovery, and both leave nothing behind when stopped")
    func standbyReplicates() async throws {
        let (primaryRoot, standbyRoot) = try await TestPostgres.withPrivate { primary in
            let primaryRoot = try #require(primary.socketDirectory)
            try await primary.admin("CREATE TABLE replicated (x int); INSERT INTO replicated VALUES (42)")
            let standbyRoot = try await primary.withStandby { standby in
                let root = try #require(standby.socketDirectory)
                #expect(standby.isPrivate)
                #expect(standby.tls == nil)
                #expect(root.hasPrefix("/tmp/stoker-pg-"))
                #expect(root != primaryRoot)
                #expect(standby.port != primary.port)
                #expect(standby.adminConninfo.contains(root))
                #expect(try await standby.admin("SELECT pg_is_in_recovery()") == [["t"]])
                #expect(try await primary.admin("SELECT pg_is_in_recovery()") == [["f"]])

                // A row written after the base backup arrives by streaming.
                try await primary.admin("INSERT INTO replicated VALUES (43)")
                let rows = try await eventually(within: .seconds(60)) {
                    let rows = try await standby.admin("SELECT x FROM replicated ORDER BY x")
                    return rows.count == 2 ? rows : nil
                }
                #expect(rows == [["42"], ["43"]])
                // The standby refuses writes.
                let error = await #expect(throws: TestPostgresError.self) {
                    try await standby.admin("INSERT INTO replicated VALUES (44)")
                }
                #expect(error?.sqlState == "25006")
                return root
            }
            return (primaryRoot, standbyRoot)
        }

        for root in [primaryRoot, standbyRoot] {
            #expect(!FileManager.default.fileExists(atPath: root), "\(root) is left")
            #expect(processes(mentioning: root).isEmpty, "processes are left in \(root)")
        }
    }

    @Test("a standby outlives its stopped primary and is then stopped on its own")
    func primaryStoppedFirst() async throws {
        let primary = try await TestPostgres.start(.init(tls: true))
        let primaryRoot = try #require(primary.socketDirectory)
        let standby: TestPostgres
        do {
            standby = try await primary.startStandby()
        } catch {
            await primary.stop()
            throw error
        }
        let root = try #require(standby.socketDirectory)
        await primary.stop()
        do {
            #expect(!FileManager.default.fileExists(atPath: primaryRoot))
            #expect(processes(mentioning: primaryRoot).isEmpty)
            // TLS material was copied into the standby's own directory.
            let tls = try #require(standby.tls)
            #expect(tls.caCertificate.hasPrefix(root + "/"))
            #expect(FileManager.default.fileExists(atPath: tls.serverCertificate))
            #expect(try await standby.admin("SHOW ssl") == [["on"]])
            #expect(try await standby.admin("SELECT pg_is_in_recovery()") == [["t"]])
            await #expect(throws: TestPostgresError.self) { try await primary.startStandby() }
        } catch {
            await standby.stop()
            throw error
        }
        await standby.stop()
        #expect(!FileManager.default.fileExists(atPath: root))
        #expect(processes(mentioning: root).isEmpty)
    }
}

/// Polls `probe` (every 50 ms) until it returns a value, for at most `limit`; throws the last probe error or a
/// timeout.
private func eventually<T: Sendable>(
    within limit: Duration, _ probe: () async throws -> T?
) async throws -> T {
    let deadline = ContinuousClock.now.advanced(by: limit)
    while true {
        if let value = try await probe() { return value }
        guard ContinuousClock.now < deadline else {
            throw TestPostgresError("the condition did not hold within \(limit)")
        }
        try await Task.sleep(for: .milliseconds(50))
    }
}
