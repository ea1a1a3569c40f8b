import StokerHarness
import Testing

@testable import Stoker

/// `stoker migrate`, judged as a user meets it: the built executable, its exit status and its output.
@Suite("stoker migrate (the built executable)", .timeLimit(.minutes(3)))
struct MigrateCommandTests {
    static let secret = "hunter2-Cli!7"

    /// The executable plus a minimal environment (no DATABASE_URL or PG* leaking in from the test process).
    static func run(_ arguments: [String], environment: [String: String] = [:]) async throws -> ProcessResult {
        try await runProcess(
            [try builtExecutable("stoker")] + arguments,
            environment: ["PATH": "/usr/bin:/bin", "LANG": "C"].merging(environment) { $1 }
        )
    }

    @Test("migrates, is idempotent, checks, and grants a node's role")
    func lifecycle() async throws {
        try await withTestDatabase { database in
            let first = try await Self.run(["migrate", "--url", database.conninfo])
            #expect(first.status == 0, "\(first.standardError)")
            #expect(first.standardOutput.contains("applied 1"), "\(first.standardOutput)")

            let again = try await Self.run(["migrate", "--url", database.conninfo])
            #expect(again.status == 0)
            #expect(again.standardOutput.contains("already current"), "\(again.standardOutput)")

            let check = try await Self.run(["migrate", "--check", "--url", database.conninfo])
            #expect(check.status == 0)
            #expect(check.standardOutput.contains("is current"))

            let role = try await database.createRole(prefix: "stk_cli", password: "unused-pw")
            let grant = try await Self.run(["migrate", "--url", database.conninfo, "--grant-to", role])
            #expect(grant.status == 0, "\(grant.standardError)")
            let privileges = try await database.admin(
                "SELECT has_table_privilege('\(role)', 'stoker.nodes', 'DELETE'), "
                    + "has_function_privilege('\(role)', 'stoker.fence(text, text, bigint)', 'EXECUTE')"
            )
            #expect(privileges.first == ["t", "t"])
        }
    }

    @Test("without --url: DATABASE_URL, else libpq's PG* variables")
    func environment() async throws {
        try await withControlledDatabase { database in
            let viaURL = try await Self.run(["migrate"], environment: ["DATABASE_URL": database.conninfo])
            #expect(viaURL.status == 0, "\(viaURL.standardError)")

            let server = database.server
            let socket = try #require(server.socketDirectory, "the controlled cluster is private")
            let viaPG = try await Self.run(
                ["migrate", "--check"],
                environment: [
                    "PGHOST": socket, "PGPORT": String(server.port), "PGDATABASE": database.name, "PGUSER": "postgres",
                ]
            )
            #expect(viaPG.status == 0, "\(viaPG.standardError)")
            #expect(viaPG.standardOutput.contains("is current"))
        }
    }

    @Test("a wrong password: non-zero exit, one line on stderr, no password anywhere")
    func wrongPassword() async throws {
        try await withControlledDatabase { database in
            let role = try await database.createRole(prefix: "stk_cli", password: "the-right-one")
            let server = database.server
            for arguments in [
                ["migrate", "--url", database.tcpConninfo(user: role, password: Self.secret)],
                [
                    "migrate", "--url",
                    "postgresql://\(role):\(Self.secret)@\(server.host):\(server.port)/\(database.name)",
                ],
            ] {
                let result = try await Self.run(arguments)
                #expect(result.status != 0)
                let lines = result.standardError.split(separator: "\n")
                #expect(lines.count == 1, "stderr: \(result.standardError)")
                #expect(result.standardError.contains("authenticationFailed"), "\(result.standardError)")
                #expect(!result.standardError.contains(Self.secret))
                #expect(!result.standardOutput.contains(Self.secret))
            }
            // The same through PGPASSWORD: the variable's value is scrubbed too.
            let viaEnvironment = try await Self.run(
                ["migrate", "--url", database.tcpConninfo(user: role, password: nil)],
                environment: ["PGPASSWORD": Self.secret]
            )
            #expect(viaEnvironment.status != 0)
            #expect(!viaEnvironment.standardError.contains(Self.secret))
        }
    }

    @Test("a malformed URL and a bad schema name: one stderr line each, non-zero exit")
    func badInput() async throws {
        for arguments in [
            ["migrate", "--url", "postgresql://svc:\(Self.secret)@db:notaport/app"],
            ["migrate", "--url", "host=/nonexistent", "--schema", String(repeating: "s", count: 60)],
            ["migrate", "--url", "postgresql://svc:\(Self.secret)@[::1/app"],
        ] {
            let result = try await Self.run(arguments)
            #expect(result.status != 0)
            #expect(result.standardError.split(separator: "\n").count == 1, "stderr: \(result.standardError)")
            #expect(!result.standardError.contains(Self.secret))
        }
    }
}
