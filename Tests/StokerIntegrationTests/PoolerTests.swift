import StokerHarness
import Testing

@testable import Stoker

/// A node needs sessions of its own: a transaction-pooling proxy silently breaks session advisory locks and LISTEN,
/// so connecting through one must fail loudly; a session-mode pool is fine. Checked against a real PgBouncer.
@Suite("Connecting through PgBouncer", .timeLimit(.minutes(3)))
struct PoolerTests {
    @Test(
        "transaction and statement pooling are refused with .pooledConnection, pointing at pool_mode=session",
        arguments: [(TestPgBouncer.PoolMode.transaction, 4), (.transaction, 1), (.statement, 4)]
    )
    func poolingRefused(mode: TestPgBouncer.PoolMode, poolSize: Int) async throws {
        try await withBouncer(mode, poolSize: poolSize) { bouncer, database in
            let error = await connectError(bouncer.conninfo(database: database))
            #expect(error?.code == .pooledConnection, "got \(String(describing: error))")
            #expect(error?.message.contains("pool_mode=session") == true, "got \(String(describing: error))")
        }
    }

    @Test("a busy transaction-mode pool (one server, other clients queueing) is refused too")
    func busyTransactionPoolRefused() async throws {
        try await withBouncer(.transaction, poolSize: 1) { bouncer, database in
            let conninfo = bouncer.conninfo(database: database)
            // Eight other clients keep the only server busy, 0.5 s each: the queue for it is longer than the probe
            // waits, so the probe gets no answer and only our own statements can betray the pooling.
            let load = (0..<8).map { _ in
                Task {
                    while !Task.isCancelled {
                        _ = try? await TestPostgres.execute("SELECT pg_sleep(0.5)", conninfo: conninfo)
                    }
                }
            }
            // Wait (bounded) until the load runs on the server.
            var busy = false
            for _ in 0..<1000 where !busy {
                let rows = try await database.admin(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(0.5)' AND state = 'active'"
                )
                busy = rows.first?[0] != "0"
                if !busy { try await Task.sleep(for: .milliseconds(10)) }
            }
            #expect(busy, "the load never reached the server")
            let error = await connectError(conninfo)
            for task in load { task.cancel() }
            for task in load { await task.value }
            #expect(error?.code == .pooledConnection, "got \(String(describing: error))")
        }
    }

    @Test(
        "session pooling is accepted, also with a saturated pool, and keeps one backend for the whole session",
        arguments: [4, 1]
    )
    func sessionModeAccepted(poolSize: Int) async throws {
        try await withBouncer(.session, poolSize: poolSize) { bouncer, database in
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

/// A fresh database on the controlled (always private) cluster with a PgBouncer in `mode` in front;
/// both removed afterwards, also when `body` throws.
private func withBouncer(
    _ mode: TestPgBouncer.PoolMode,
    poolSize: Int = 4,
    _ body: (TestPgBouncer, TestDatabase) async throws -> Void
) async throws {
    let postgres = try await TestPostgres.controlled()
    try await postgres.withDatabase { database in
        let bouncer = try await TestPgBouncer.start(inFrontOf: postgres, poolMode: mode, poolSize: poolSize)
        do {
            try await body(bouncer, database)
        } catch {
            await bouncer.stop()
            throw error
        }
        await bouncer.stop()
    }
}
