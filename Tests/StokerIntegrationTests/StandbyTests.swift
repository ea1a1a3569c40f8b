import StokerHarness
import Testing

@testable import Stoker

@Suite("Hot standby", .timeLimit(.minutes(3)))
struct StandbyTests {
    @Test("a hot standby is refused as read-only; a host list falls through to the primary with read-write")
    func standbyRefused() async throws {
        try await TestPostgres.withPrivate(.init(tls: false)) { primary in
            try await primary.withStandby { standby in
                let primaryDirectory = try #require(primary.socketDirectory)
                let standbyDirectory = try #require(standby.socketDirectory)

                // (a) Connecting to the standby alone.
                let error = await connectError(standby.adminConninfo)
                #expect(error?.code == .readOnlySession)
                #expect(error?.message.contains("hot standby") == true, "\(String(describing: error))")

                // (b) Standby first, primary second: libpq skips the standby for target_session_attrs=read-write.
                let both =
                    "host=\(standbyDirectory),\(primaryDirectory) port=\(standby.port),\(primary.port) "
                    + "dbname=postgres user=postgres target_session_attrs=read-write"
                let inRecovery = try await withSession(both) { session in
                    try await session.query("SELECT pg_is_in_recovery()").singleRow().bool(0)
                }
                #expect(!inRecovery)

                // (c) Migrating the standby.
                do {
                    try await StokerSchema.migrate(connection: standby.adminConninfo)
                    Issue.record("migrating the standby succeeded")
                } catch let error as StokerError {
                    #expect(error.code == .readOnlySession, "\(error)")
                }
            }
        }
    }
}
