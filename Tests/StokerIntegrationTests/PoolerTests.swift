import StokerTestSupport
import Testing

@testable import Stoker

/// DESIGN §3: one dedicated session per node. A transaction-pooling proxy silently breaks session advisory locks and
/// LISTEN, so connecting through one must fail loudly; a session-mode pool is fine. Checked against a real PgBouncer.
@Suite("Connecting through PgBouncer")
struct PoolerTests {
    @Test(
        "transaction and statement pooling are refused with .pooledConnection, pointing at pool_mode=session",
        arguments: [TestPgBouncer.PoolMode.transaction, .statement]
    )
    func poolingRefused(mode: TestPgBouncer.PoolMode) async throws {
        try await withBouncer(mode) { bouncer, database in
            let error = await connectError(bouncer.conninfo(database: database))
            #expect(error?.code == .pooledConnection, "got \(String(describing: error))")
            #expect(error?.message.contains("pool_mode=session") == true, "got \(String(describing: error))")
        }
    }

    @Test("session pooling is accepted and keeps one backend for the whole session")
    func sessionModeAccepted() async throws {
        try await withBouncer(.session) { bouncer, database in
            try await withSession(bouncer.conninfo(database: database)) { session in
                let one = try await session.query("SELECT 1").singleRow().int32(0)
                #expect(one == 1)
                var pids: [Int32] = []
                for _ in 0..<5 {
                    pids.append(try await session.query("SELECT pg_backend_pid()").singleRow().int32(0))
                }
                #expect(Set(pids).count == 1, "backend pids: \(pids)")
                let current = try await session.query("SELECT current_database()").singleRow().string(0)
                #expect(current == database.name)
            }
        }
    }
}

/// A fresh database on the controlled (always private) cluster with a PgBouncer in `mode` (pool size 4) in front;
/// both removed afterwards, also when `body` throws.
private func withBouncer(
    _ mode: TestPgBouncer.PoolMode, _ body: (TestPgBouncer, TestDatabase) async throws -> Void
) async throws {
    let postgres = try await TestPostgres.controlled()
    try await postgres.withDatabase { database in
        let bouncer = try await TestPgBouncer.start(inFrontOf: postgres, poolMode: mode, poolSize: 4)
        do {
            try await body(bouncer, database)
        } catch {
            await bouncer.stop()
            throw error
        }
        await bouncer.stop()
    }
}
