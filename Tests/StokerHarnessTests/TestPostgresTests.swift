import Foundation
import StokerHarness
import Synchronization
import Testing

@Suite("TestPostgres")
struct TestPostgresTests {
    @Test("a private TLS cluster starts, serves SQL and TLS, and leaves nothing behind when stopped")
    func privateClusterLifecycle() async throws {
        let root = try await TestPostgres.withPrivate(.init(tls: true)) { postgres in
            let root = try #require(postgres.socketDirectory)
            #expect(postgres.isPrivate)
            #expect(postgres.host == "127.0.0.1")
            #expect(root.hasPrefix("/tmp/stoker-pg-"))
            #expect(try await postgres.admin("SELECT 1") == [["1"]])
            #expect(try await postgres.admin("SHOW ssl") == [["on"]])
            #expect(try await postgres.admin("SHOW max_connections") == [["400"]])

            let tls = try #require(postgres.tls)
            #expect(tls.serverName == "localhost")
            for file in [tls.caCertificate, tls.otherCACertificate, tls.serverCertificate] {
                #expect(FileManager.default.fileExists(atPath: file), "\(file) is missing")
            }

            try await postgres.withDatabase { database in
                #expect(try await database.admin("SELECT current_database()") == [[database.name]])
                let role = try await database.createRole(password: "it's a \\ secret")
                try await database.admin("GRANT CREATE ON SCHEMA public TO \(role)")

                // Password (SCRAM) over TCP, TLS verified against the cluster's CA and host name.
                let verified = database.tcpConninfo(
                    user: role, password: "it's a \\ secret",
                    extra: ["sslmode": "verify-full", "sslrootcert": tls.caCertificate])
                let rows = try await TestPostgres.execute(
                    "CREATE TABLE owned_by_role (x int); "
                        + "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    conninfo: verified)
                #expect(rows == [[role, "t"]])

                // The unrelated CA must not verify the server.
                let wrongCA = database.tcpConninfo(
                    user: role, password: "it's a \\ secret",
                    extra: ["sslmode": "verify-full", "sslrootcert": tls.otherCACertificate])
                await #expect(throws: TestPostgresError.self) {
                    try await TestPostgres.execute("SELECT 1", conninfo: wrongCA)
                }
                // A wrong password is refused.
                let wrongPassword = database.tcpConninfo(user: role, password: "nope")
                await #expect(throws: TestPostgresError.self) {
                    try await TestPostgres.execute("SELECT 1", conninfo: wrongPassword)
                }
            }
            return root
        }

        #expect(!FileManager.default.fileExists(atPath: root))
        #expect(processes(mentioning: root).isEmpty)
    }

    @Test("withDatabase drops its database and roles afterwards, also when the body throws")
    func withDatabaseCleansUp() async throws {
        let postgres = try await TestPostgres.shared()
        let (name, role) = try await postgres.withDatabase { database in
            let role = try await database.createRole(password: "pw")
            try await database.admin("CREATE TABLE t (x int); ALTER TABLE t OWNER TO \(role)")
            #expect(try await postgres.admin(existsSQL(database: database.name)) == [["1"]])
            return (database.name, role)
        }
        #expect(try await postgres.admin(existsSQL(database: name)).isEmpty)
        #expect(try await postgres.admin(existsSQL(role: role)).isEmpty)

        struct Boom: Error {}
        let captured = Mutex(("", ""))
        await #expect(throws: Boom.self) {
            try await postgres.withDatabase { database in
                let role = try await database.createRole(prefix: "boom", password: "pw")
                captured.withLock { $0 = (database.name, role) }
                throw Boom()
            }
        }
        let (thrownName, thrownRole) = captured.withLock { $0 }
        #expect(!thrownName.isEmpty)
        #expect(try await postgres.admin(existsSQL(database: thrownName)).isEmpty)
        #expect(try await postgres.admin(existsSQL(role: thrownRole)).isEmpty)
    }

    @Test("database conninfo keeps the admin settings and replaces only dbname")
    func databaseConninfo() async throws {
        let postgres = try await TestPostgres.shared()
        try await postgres.withDatabase { database in
            let rows = try await TestPostgres.execute("SELECT current_database()", conninfo: database.conninfo)
            #expect(rows == [[database.name]])
            #expect(database.conninfo.contains("dbname='\(database.name)'"))
        }
    }

    @Test("SQL errors carry the server message and SQLSTATE")
    func sqlErrors() async throws {
        let postgres = try await TestPostgres.shared()
        let error = await #expect(throws: TestPostgresError.self) {
            try await postgres.admin("SELECT * FROM no_such_table")
        }
        #expect(error?.sqlState == "42P01")
        #expect(error?.message.contains("no_such_table") == true)
    }
}

private func existsSQL(database: String) -> String {
    "SELECT 1 FROM pg_database WHERE datname = '\(database)'"
}

private func existsSQL(role: String) -> String {
    "SELECT 1 FROM pg_roles WHERE rolname = '\(role)'"
}

/// PIDs of processes whose command line mentions `text` (scans /proc/*/cmdline).
func processes(mentioning text: String) -> [Int32] {
    let me = ProcessInfo.processInfo.processIdentifier
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> Int32? in
        guard let pid = Int32(entry), pid != me,
            let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline")
        else { return nil }
        let commandLine = String(decoding: data.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
        return commandLine.contains(text) ? pid : nil
    }
}
