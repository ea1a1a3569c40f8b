import Foundation
import Testing

@testable import StokerHarness

@Suite("TestPostgres.restart")
struct RestartTests {
    @Test("restart cuts every session off, keeps data, socket and port, and accepts new sessions")
    func restart() async throws {
        let (postgres, root) = try await TestPostgres.withPrivate { postgres in
            let root = try #require(postgres.socketDirectory)
            try await postgres.admin("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
            let held = try await HeldConnection.open(postgres.adminConninfo)
            let before = try await held.execute("SELECT pg_backend_pid()")

            try await postgres.restart()

            // The old session is gone: its next statement fails.
            await #expect(throws: TestPostgresError.self) { try await held.execute("SELECT 1") }
            // New sessions work, over the socket and over TCP on the same port, and the data survived.
            let after = try await postgres.admin("SELECT pg_backend_pid(), (SELECT x FROM kept)")
            #expect(after.first?.first != before.first?.first)
            #expect(after.first?.last == "42")
            let tcp = "host=127.0.0.1 port=\(postgres.port) user=postgres dbname=postgres sslmode=disable"
            await #expect(throws: TestPostgresError.self) {
                // Password auth over TCP: refused, but by the restarted server listening on the same port.
                try await TestPostgres.execute("SELECT 1", conninfo: tcp)
            }
            // Twice in a row, and concurrently, works too.
            try await postgres.restart()
            async let first: Void = postgres.restart()
            async let second: Void = postgres.restart()
            _ = try await (first, second)
            #expect(try await postgres.admin("SELECT x FROM kept") == [["42"]])
            return (postgres, root)
        }
        #expect(!FileManager.default.fileExists(atPath: root))
        #expect(processes(mentioning: root).isEmpty)
        await #expect(throws: TestPostgresError.self) { try await postgres.restart() }
    }
}

/// One libpq connection kept open across awaits, for "the old session is dead" checks.
///
/// Safety of `@unchecked Sendable`: the `BlockingConnection` is only touched inside `onDedicatedThread` calls made
/// by one test, each awaited before the next starts, so no two threads ever use it at the same time (libpq allows a
/// connection to move between threads when uses do not overlap), and each await orders the memory accesses.
private final class HeldConnection: @unchecked Sendable {
    private let connection: BlockingConnection

    private init(_ connection: BlockingConnection) {
        self.connection = connection
    }

    static func open(_ conninfo: String) async throws -> HeldConnection {
        try await onDedicatedThread { HeldConnection(try BlockingConnection(conninfo: conninfo)) }
    }

    func execute(_ sql: String) async throws -> [[String?]] {
        try await onDedicatedThread { try self.connection.execute(sql) }
    }
}
