import StokerHarness
import Testing

@testable import Stoker

/// Bad input never crashes: every connection failure gets its own typed error, none holds the password.
@Suite("Connecting: typed errors, no password", .timeLimit(.minutes(2)))
struct ConnectionTests {
    static let secret = "hunter2-Zx9!q"

    @Test("a malformed URL → .invalidConnectionString, password absent")
    func malformedURL() async {
        let error = await connectError("postgresql://svc:\(Self.secret)@db.internal:port/app")
        #expect(error?.code == .invalidConnectionString)
        expectNoSecret(error, Self.secret)
    }

    @Test("a wrong password → .authenticationFailed, password absent")
    func wrongPassword() async throws {
        try await withControlledDatabase { database in
            let role = try await database.createRole(password: "the-right-one")
            let error = await connectError(database.tcpConninfo(user: role, password: Self.secret))
            #expect(error?.code == .authenticationFailed)
            #expect(error?.serverMessage?.contains("password authentication failed") == true)
            expectNoSecret(error, Self.secret)

            let url =
                "postgresql://\(role):\(Self.secret)@\(database.server.host):\(database.server.port)/\(database.name)"
            let viaURL = await connectError(url)
            #expect(viaURL?.code == .authenticationFailed)
            expectNoSecret(viaURL, Self.secret)
        }
    }

    @Test("an unknown role → .authenticationFailed; a missing database → .databaseNotFound")
    func unknownRoleAndDatabase() async throws {
        try await withControlledDatabase { database in
            let role = await connectError(database.tcpConninfo(user: "no_such_role_x", password: Self.secret))
            #expect(role?.code == .authenticationFailed)
            expectNoSecret(role, Self.secret)
            let missing = await connectError(database.conninfo + " dbname=no_such_database_x")
            #expect(missing?.code == .databaseNotFound)
        }
    }

    @Test("a host that never answers → .connectionTimeout, within connect_timeout")
    func unreachable() async throws {
        let silent = try silentListener()
        let clock = ContinuousClock()
        let start = clock.now
        let error = await connectError(
            "host=127.0.0.1 port=\(silent.port) dbname=x user=x password=\(Self.secret) connect_timeout=2"
        )
        let elapsed = start.duration(to: clock.now)
        #expect(error?.code == .connectionTimeout)
        expectNoSecret(error, Self.secret)
        // The bound fails a wait far longer than the 2 s asked for, loudly, and leaves room for a stall of a loaded host
        // (one took 13.9 s). It cannot tell the string's 2 s from the default a session adds when the string sets none
        // (10 s): that the string's value wins is a unit test of the configuration (`addingDefaults`), not a timing.
        #expect(elapsed < .seconds(60), "took \(elapsed)")
        withExtendedLifetime(silent) {}
    }

    @Test("several hosts: libpq skips a dead one and connects to the next (multi-host + connect_timeout kept)")
    func multiHost() async throws {
        let silent = try silentListener()
        let refused = try closedPort()
        try await withControlledDatabase { database in
            let role = try await database.createRole(password: Self.secret)
            let server = database.server
            let conninfo =
                "host=127.0.0.1,127.0.0.1,\(server.host) port=\(refused.port),\(silent.port),\(server.port) "
                + "dbname=\(database.name) user=\(role) password=\(Self.secret) connect_timeout=5 "
                + "target_session_attrs=read-write keepalives_idle=5 tcp_user_timeout=5000"
            let port = try await withSession(conninfo) { session in
                try await session.query("SELECT inet_server_port()").singleRow().int(0)
            }
            #expect(port == server.port)
        }
        withExtendedLifetime((silent, refused)) {}
    }

    @Test("a closed port → .connectionFailed")
    func refused() async throws {
        let closed = try closedPort()
        let error = await connectError("host=127.0.0.1 port=\(closed.port) dbname=x user=x password=\(Self.secret)")
        #expect(error?.code == .connectionFailed)
        expectNoSecret(error, Self.secret)
        withExtendedLifetime(closed) {}
    }

    @Test("a read-only session (by option, by role, by target_session_attrs) → .readOnlySession")
    func readOnly() async throws {
        try await withControlledDatabase { database in
            let role = try await database.createRole(password: Self.secret)
            let byOption = await connectError(
                database.tcpConninfo(
                    user: role,
                    password: Self.secret,
                    extra: ["options": "-c default_transaction_read_only=on"]
                )
            )
            #expect(byOption?.code == .readOnlySession)
            expectNoSecret(byOption, Self.secret)

            try await database.admin("ALTER ROLE \(role) SET default_transaction_read_only = on")
            let byRole = await connectError(database.tcpConninfo(user: role, password: Self.secret))
            #expect(byRole?.code == .readOnlySession)
            expectNoSecret(byRole, Self.secret)

            let byAttrs = await connectError(
                database.tcpConninfo(user: role, password: Self.secret, extra: ["target_session_attrs": "read-write"])
            )
            #expect(byAttrs?.code == .readOnlySession)
            expectNoSecret(byAttrs, Self.secret)
        }
    }

    @Test("TLS verify-full connects over TLS; a wrong CA is refused with .tlsFailed")
    func tls() async throws {
        try await withControlledDatabase { database in
            let files = try #require(database.server.tls, "the controlled cluster runs with TLS")
            let role = try await database.createRole(password: Self.secret)
            let verified = database.tcpConninfo(
                user: role,
                password: Self.secret,
                extra: ["host": files.serverName, "sslmode": "verify-full", "sslrootcert": files.caCertificate]
            )
            let usesTLS = try await withSession(verified) { session in
                try await session.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").singleRow().bool(0)
            }
            #expect(usesTLS)

            let wrongCA = database.tcpConninfo(
                user: role,
                password: Self.secret,
                extra: ["host": files.serverName, "sslmode": "verify-full", "sslrootcert": files.otherCACertificate]
            )
            let error = await connectError(wrongCA)
            #expect(error?.code == .tlsFailed)
            expectNoSecret(error, Self.secret)
        }
    }
}

@Suite("Statements: bound values, typed results, transactions", .timeLimit(.minutes(2)))
struct StatementTests {
    @Test(
        "bound values round-trip quotes, backslashes, unicode and 1 MB",
        arguments: [
            "it's \"quoted\"; DROP TABLE x; --",
            #"back\slash \\ \n not a newline"#,
            "unicode: żółć 🚀 ∑ 日本語 \u{200B}",
            "",
            String(repeating: "0123456789abcdef", count: 65536),  // 1 MiB
        ])
    func roundTrip(value: String) async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { session in
                let row = try await session.query(
                    "SELECT $1::text, octet_length($1::text), $2::text IS NULL",
                    [
                        value, nil,
                    ]
                ).singleRow()
                #expect(try row.string(0) == value)
                #expect(try row.int(1) == value.utf8.count)
                #expect(try row.bool(2))
            }
        }
    }

    @Test("a NUL byte is refused with .invalidParameter, never truncated; the session stays usable")
    func nulByte() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { session in
                do {
                    try await session.query("SELECT $1::text", ["before\0after"])
                    Issue.record("a NUL byte was sent")
                } catch let error as StokerError {
                    #expect(error.code == .invalidParameter)
                    #expect(error.message.contains("$1"))
                }
                #expect(try await session.query("SELECT 1").singleRow().int(0) == 1)
            }
        }
    }

    @Test("a failing statement → .queryFailed with its SQLSTATE; a failed transaction is rolled back")
    func failures() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { session in
                do {
                    try await session.query("SELECT * FROM no_such_table")
                    Issue.record("succeeded")
                } catch let error as StokerError {
                    #expect(error.code == .queryFailed)
                    #expect(error.sqlState == "42P01")
                }
                try await session.query("CREATE TABLE t (v int)")
                await #expect(throws: StokerError.self) {
                    try await session.run { connection in
                        try connection.transaction {
                            try connection.execute("INSERT INTO t VALUES (1)")
                            try connection.execute("INSERT INTO t VALUES ('not a number')")
                        }
                    }
                }
                #expect(try await session.query("SELECT count(*) FROM t").singleRow().int(0) == 0)
                let committed = try await session.run { connection in
                    try connection.transaction {
                        try connection.execute("INSERT INTO t VALUES (2)")
                        return try connection.execute("SELECT count(*) FROM t").singleRow().int(0)
                    }
                }
                #expect(committed == 1)
            }
        }
    }

    @Test("a prepared statement is prepared once per session, and again after a schema change altered its result")
    func preparedStatements() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { session in
                try await session.query("CREATE TABLE t (v int)")
                try await session.query("INSERT INTO t VALUES (7)")
                let sql = "SELECT * FROM t WHERE v = $1"
                let other = "SELECT count(*) FROM t WHERE v <> $1"
                let (first, count) = try await session.run { connection in
                    let first = try connection.executePrepared(sql, ["7"])
                    try connection.prepare(other)
                    for _ in 0..<3 { try connection.executePrepared(sql, ["7"]) }
                    let count = try connection.execute("SELECT count(*) FROM pg_prepared_statements").singleRow()
                    return (first, try count.int(0))
                }
                #expect(first.columns == ["v"] && first.rows.map(\.values) == [["7"]])
                #expect(count == 2, "statements prepared on the session: \(count)")
                // A migration adds a column while the session runs: the cached plan may not change its result type
                // (SQLSTATE 0A000), so the statement is prepared anew, once, and answers with the new columns; the
                // other statement keeps its own name and text.
                try await database.admin("ALTER TABLE t ADD COLUMN w text DEFAULT 'x'")
                let (after, untouched, afterCount) = try await session.run { connection in
                    let after = try connection.executePrepared(sql, ["7"])
                    let untouched = try connection.executePrepared(other, ["7"])
                    let count = try connection.execute("SELECT count(*) FROM pg_prepared_statements").singleRow()
                    return (after, untouched, try count.int(0))
                }
                #expect(after.columns == ["v", "w"] && after.rows.map(\.values) == [["7", "x"]])
                #expect(untouched.columns == ["count"] && untouched.rows.map(\.values) == [["0"]])
                #expect(afterCount == 2, "statements prepared on the session: \(afterCount)")
            }
        }
    }
}

@Suite("LISTEN / NOTIFY", .timeLimit(.minutes(2)))
struct NotificationTests {
    @Test("a notification from another connection wakes an idle session at once (no polling interval)")
    func wakesIdleSession() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { listener in
                try await listener.listen("wake up")
                try await withSession(database.conninfo) { sender in
                    let pollsBefore = listener.pollCount
                    try await sender.notify("wake up", payload: "hello")
                    var iterator = listener.notifications.makeAsyncIterator()
                    let received = await iterator.next()
                    #expect(received?.channel == "wake up")
                    #expect(received?.payload == "hello")
                    // The idle thread sleeps in poll() with no timeout: the notification is one wake-up, not a tick
                    // of a loop. (At most one more for the job that enqueued LISTEN's reply racing in.)
                    #expect(listener.pollCount - pollsBefore <= 2)
                }
            }
        }
    }

    @Test("waiting with a deadline: woken by a notification, or returns at the deadline after one poll")
    func deadline() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { listener in
                try await listener.listen("ch")
                let idle = try await listener.run { connection -> (PGConnection.WaitOutcome, Int, Duration) in
                    var polls = 0
                    let start = ContinuousClock.now
                    let outcome = try connection.waitForNotifications(
                        until: start + .milliseconds(150), pollCount: &polls)
                    return (outcome, polls, start.duration(to: .now))
                }
                #expect(idle.0 == .deadlineReached)
                #expect(idle.2 >= .milliseconds(150))
                #expect(idle.1 <= 2, "poll() was called \(idle.1) times: a busy loop")

                // The job tells us once it runs on the session thread: from then on a notification can only reach it
                // (sent earlier, the idle loop would have taken it for the notifications stream instead).
                let (started, startedSignal) = AsyncStream.makeStream(of: Void.self)
                async let woken = listener.run { connection -> (PGConnection.WaitOutcome, [PostgresNotification]) in
                    startedSignal.yield()
                    var polls = 0
                    let outcome = try connection.waitForNotifications(until: .now + .seconds(60), pollCount: &polls)
                    return (outcome, connection.takeNotifications())
                }
                for await _ in started { break }
                try await withSession(database.conninfo) { sender in try await sender.notify("ch", payload: "x") }
                let (outcome, notes) = try await woken
                #expect(outcome == .notified)
                #expect(notes.map(\.payload) == ["x"])
            }
        }
    }

    @Test("channel names: quotes, case and unicode are kept exactly; over 63 bytes is refused, not truncated")
    func channelNames() async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { session in
                let channel = "Mixed \"Case\" ż"
                try await session.listen(channel)
                try await session.notify(channel, payload: "p")
                var iterator = session.notifications.makeAsyncIterator()
                #expect(await iterator.next()?.channel == channel)

                let long = String(repeating: "c", count: 64)
                for attempt in [{ try await session.listen(long) }, { try await session.notify(long) }] {
                    do {
                        try await attempt()
                        Issue.record("a 64-byte channel was accepted")
                    } catch let error as StokerError {
                        #expect(error.code == .invalidIdentifier)
                    }
                }
                do {
                    try await session.notify(channel, payload: String(repeating: "x", count: 8000))
                    Issue.record("an 8000-byte payload was accepted")
                } catch let error as StokerError {
                    #expect(error.code == .invalidParameter)
                }
                try await session.unlisten(channel)
            }
        }
    }

    @Test("a session dropped without close() still closes its connection and its thread ends")
    func dropped() async throws {
        try await withTestDatabase { database in
            var session: PostgresSession? = try await PostgresSession.connect(database.conninfo)
            let pid = try #require(try await session?.query("SELECT pg_backend_pid()").singleRow().int(0))
            session = nil
            // Only the session thread's exit closes the connection.
            let gone = try await waitUntilGone(pid, in: database)
            #expect(gone, "backend \(pid) outlived its dropped session")
            #expect(session == nil)
        }
    }

    @Test("a terminated backend is seen at once: notifications end, statements fail with .connectionLost")
    func terminated() async throws {
        try await withTestDatabase { database in
            let session = try await PostgresSession.connect(database.conninfo)
            try await session.listen("x")
            let pid = try await session.query("SELECT pg_backend_pid()").singleRow().int(0)
            try await database.admin("SELECT pg_terminate_backend(\(pid))")
            for await _ in session.notifications {}  // ends when the loop sees the socket close
            do {
                try await session.query("SELECT 1")
                Issue.record("a statement ran on a dead session")
            } catch let error as StokerError {
                #expect(error.code == .connectionLost)
            }
            await session.close()
        }
    }
}

/// Cancellation and abort are hard stops: a session blocked for good is cut, never waited for.
@Suite("Session: cancellation and abort", .timeLimit(.minutes(2)))
struct SessionStopTests {
    /// Runs `body` with a session whose `INSERT` is blocked on a row another session holds, and that row's holder.
    func withBlockedInsert(
        _ body: @Sendable (TestDatabase, PostgresSession, Int, Task<QueryResult, any Error>) async throws -> Void
    ) async throws {
        try await withTestDatabase { database in
            try await withSession(database.conninfo) { holder in
                try await holder.query("CREATE TABLE t (id int PRIMARY KEY)")
                try await holder.query("BEGIN")
                try await holder.query("INSERT INTO t VALUES (1)")
                // A backend waiting for a lock notices a vanished client only through this check.
                let blocked = try await PostgresSession.connect(
                    database.conninfo + " options='-c client_connection_check_interval=100'"
                )
                let pid = try await blocked.query("SELECT pg_backend_pid()").singleRow().int(0)
                let insert = Task { try await blocked.query("INSERT INTO t VALUES (1)") }
                try await waitUntilBlocked(pid, in: database)
                try await body(database, blocked, pid, insert)
                await blocked.abort()
                try await holder.query("ROLLBACK")
            }
        }
    }

    /// The blocked insert failed with `.connectionLost` and its backend went away.
    func expectCut(
        _ insert: Task<QueryResult, any Error>,
        pid: Int,
        in database: TestDatabase,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async throws {
        do {
            _ = try await insert.value
            Issue.record("the blocked insert succeeded", sourceLocation: sourceLocation)
        } catch let error as StokerError {
            #expect(error.code == .connectionLost, sourceLocation: sourceLocation)
        }
        #expect(try await waitUntilGone(pid, in: database), sourceLocation: sourceLocation)
    }

    @Test("cancelling a statement blocked on a lock cuts the session: the task ends, the backend goes")
    func cancelRunning() async throws {
        try await withBlockedInsert { database, blocked, pid, insert in
            insert.cancel()
            try await expectCut(insert, pid: pid, in: database)
            await #expect(throws: StokerError.self) { try await blocked.query("SELECT 1") }
        }
    }

    @Test("abort() ends a session whose statement is blocked; close() afterwards returns")
    func abortRunning() async throws {
        try await withBlockedInsert { database, blocked, pid, insert in
            await blocked.abort()
            try await expectCut(insert, pid: pid, in: database)
            await blocked.close()
        }
    }

    @Test("a queued job whose task is cancelled is withdrawn; the session and the running job go on")
    func cancelQueued() async throws {
        try await withBlockedInsert { database, blocked, pid, insert in
            let queued = Task { try await blocked.query("SELECT 1") }
            queued.cancel()
            await #expect(throws: CancellationError.self) { try await queued.value }
            // The holder is still in its transaction: the insert is still blocked, its session alive.
            let alive = try await database.admin("SELECT count(*) FROM pg_stat_activity WHERE pid = \(pid)")
            #expect(alive.first?[0] == "1")
            insert.cancel()
            _ = try? await insert.value
        }
    }
}
