import ArgumentParser
import Logging
import Stoker

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

@main
struct StokerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stoker",
        abstract: "Leader election on PostgreSQL: keep a piece of work running always, and once.",
        version: "stoker \(StokerSchema.libraryVersion) (schema version \(StokerSchema.schemaVersion))",
        subcommands: [Demo.self, Migrate.self, Node.self, Status.self, Watch.self, Trigger.self]
    )

    /// As ArgumentParser's, except that an error is one line on stderr (no usage block): scripts read it.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var command = command as? AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                // --help, --version: the full text, on stdout.
                print(fullMessage(for: error))
                terminate(0)
            }
            let message = hidingConnectionStrings(self.message(for: error))
            if !message.isEmpty { writeStandardError("stoker: \(message)") }
            terminate(code.rawValue)
        }
    }
}

/// Options every subcommand that talks to PostgreSQL shares.
struct ConnectionOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "libpq connection URL or key=value string.",
            discussion: """
                Default: $DATABASE_URL, else libpq's PG* environment variables (PGHOST, PGUSER, …). A command \
                line is visible to other users of the machine: pass passwords through PGPASSWORD, ~/.pgpass or \
                $DATABASE_URL rather than --url.
                """
        )
    )
    var url: String?

    @Option(name: .long, help: "The schema Stoker's tables live in.")
    var schema: String = StokerSchema.defaultSchema

    var connection: String {
        if let url { return url }
        if let fromEnvironment = getenv("DATABASE_URL") { return String(cString: fromEnvironment) }
        return ""
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply Stoker's schema migrations (safe to run from many processes at once).",
        discussion: """
            Applies the missing files of sql/ in one transaction under an advisory lock, then checks that the \
            schema is intact. Run it as the schema's owner; --grant-to then gives a node's least-privilege role \
            what it needs.
            """
    )

    @OptionGroup var options: ConnectionOptions

    @Flag(name: .long, help: "Only check that the schema is current and intact; change nothing.")
    var check = false

    @Option(name: .customLong("grant-to"), help: "After migrating, grant this role what a Stoker node needs.")
    var grantTo: String?

    func run() async throws {
        do {
            let report: MigrationReport
            if check {
                report = try await StokerSchema.verify(connection: options.connection, schema: options.schema)
                print("schema \(options.schema) is current (version \(report.current))")
            } else {
                report = try await StokerSchema.migrate(connection: options.connection, schema: options.schema)
                if report.applied.isEmpty {
                    print("schema \(options.schema) was already current (version \(report.current))")
                } else {
                    let versions = report.applied.map(String.init).joined(separator: ", ")
                    print("schema \(options.schema): applied \(versions); now at version \(report.current)")
                }
            }
            if !report.newerVersions.isEmpty {
                let versions = report.newerVersions.map(String.init).joined(separator: ", ")
                print("note: the database also holds newer migrations (\(versions)) from a later Stoker")
            }
            if let role = grantTo {
                try await StokerSchema.grant(to: role, connection: options.connection, schema: options.schema)
                print("granted role \(role) what a Stoker node needs on schema \(options.schema)")
            }
        } catch let error as StokerError {
            // One line, no password: StokerError never holds one.
            writeStandardError("stoker migrate: \(error)\n")
            throw ExitCode(1)
        }
    }
}

/// `message` with every command-line argument that may hold a secret replaced: ArgumentParser quotes a misplaced or
/// invalid argument in its error (`Unexpected argument '…'`). Hidden: an argument holding `://`, `@` or `password`,
/// the value part of such an `--option=value`, and the two arguments after a `password` token (`password = x`).
func hidingConnectionStrings(_ message: String) -> String {
    let arguments = Array(CommandLine.arguments.dropFirst())
    var secrets: [String] = []
    for (index, argument) in arguments.enumerated() {
        let lowered = argument.lowercased()
        guard argument.contains("://") || argument.contains("@") || lowered.contains("password") else { continue }
        secrets.append(argument)
        if argument.hasPrefix("--"), let equals = argument.firstIndex(of: "=") {
            secrets.append(String(argument[argument.index(after: equals)...]))
        }
        if lowered.contains("password") {
            secrets += arguments.dropFirst(index + 1).prefix(2)
        }
    }
    var result = message
    // Longest first, so a secret that contains another is hidden whole.
    for secret in Set(secrets).filter({ !$0.isEmpty }).sorted(by: { $0.count > $1.count }) {
        result = result.replacing(secret, with: "<hidden>")
    }
    return result
}

/// `exit(3)` (inside a command type `exit` names ArgumentParser's method).
func terminate(_ code: Int32) -> Never {
    exit(code)
}

func writeStandardError(_ text: String) {
    var line = text.replacingNewlines()
    if !line.hasSuffix("\n") { line += "\n" }
    writeAll(line, to: STDERR_FILENO)
}

/// Writes `text` to `descriptor` at once, whole (no buffering: a line is seen as it is written, also through a pipe);
/// false when the descriptor is gone.
@discardableResult
func writeAll(_ text: String, to descriptor: Int32) -> Bool {
    let bytes = Array(text.utf8)
    var written = 0
    while written < bytes.count {
        let result = bytes[written...].withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        if result < 0, errno == EINTR { continue }
        if result <= 0 { return false }
        written += result
    }
    return true
}

extension String {
    /// Keeps an error on one line: libpq messages carry newlines and tabs.
    func replacingNewlines() -> String {
        var result = ""
        var pendingSpace = false
        for character in dropLast(hasSuffix("\n") ? 1 : 0) {
            if character == "\n" || character == "\t" || character == "\r" {
                pendingSpace = true
                continue
            }
            if pendingSpace {
                if result.last != " " { result.append(" ") }
                pendingSpace = false
            }
            result.append(character)
        }
        return result + "\n"
    }
}
