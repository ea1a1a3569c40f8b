import CStokerLibPQ
import Glibc

/// One libpq connection, confined to the dedicated thread that created it (deliberately not Sendable).
///
/// Every call blocks: use it only inside `onDedicatedThread`.
final class BlockingConnection {
    private let raw: OpaquePointer

    /// Connects with `conninfo` (key=value or URL), silencing server NOTICEs.
    init(conninfo: String) throws {
        guard let raw = PQconnectdb(conninfo) else {
            throw TestPostgresError("could not connect: libpq is out of memory")
        }
        guard PQstatus(raw) == CONNECTION_OK else {
            let message = Self.trimmed(PQerrorMessage(raw))
            PQfinish(raw)
            throw TestPostgresError("could not connect: \(message)")
        }
        // Without this, libpq prints every NOTICE ("… does not exist, skipping") to stderr.
        PQsetNoticeProcessor(raw, { _, _ in }, nil)
        self.raw = raw
    }

    deinit { PQfinish(raw) }

    /// The host libpq connected to (a socket directory for unix-socket connections).
    var host: String { PQhost(raw).map { String(cString: $0) } ?? "" }

    /// The port libpq connected to.
    var port: Int { PQport(raw).flatMap { Int(String(cString: $0)) } ?? 5432 }

    /// The user name of this session.
    var user: String { PQuser(raw).map { String(cString: $0) } ?? "" }

    /// The database of this session.
    var database: String { PQdb(raw).map { String(cString: $0) } ?? "" }

    /// Runs `sql` (one or more statements, simple query protocol) and returns the rows of the last result.
    func execute(_ sql: String) throws -> [[String?]] {
        guard let result = PQexec(raw, sql) else {
            throw TestPostgresError("query failed: \(Self.trimmed(PQerrorMessage(raw)))")
        }
        defer { PQclear(result) }
        switch PQresultStatus(result) {
        case PGRES_TUPLES_OK, PGRES_COMMAND_OK, PGRES_EMPTY_QUERY:
            break
        default:
            let sqlState = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) }
            throw TestPostgresError(Self.trimmed(PQresultErrorMessage(result)), sqlState: sqlState)
        }
        let rowCount = PQntuples(result)
        let columnCount = PQnfields(result)
        var rows: [[String?]] = []
        rows.reserveCapacity(Int(rowCount))
        for row in 0..<rowCount {
            var values: [String?] = []
            values.reserveCapacity(Int(columnCount))
            for column in 0..<columnCount {
                if PQgetisnull(result, row, column) != 0 {
                    values.append(nil)
                } else {
                    values.append(String(cString: PQgetvalue(result, row, column)))
                }
            }
            rows.append(values)
        }
        return rows
    }

    /// `value` as a safely quoted SQL string literal (PQescapeLiteral, which knows the session's encoding
    /// and `standard_conforming_strings`).
    func literal(_ value: String) throws -> String {
        guard let escaped = PQescapeLiteral(raw, value, value.utf8.count) else {
            throw TestPostgresError("PQescapeLiteral failed: \(Self.trimmed(PQerrorMessage(raw)))")
        }
        defer { PQfreemem(escaped) }
        return String(cString: escaped)
    }

    private static func trimmed(_ message: UnsafePointer<CChar>?) -> String {
        guard let message else { return "unknown libpq error" }
        var text = Substring(String(cString: message))
        while let last = text.last, last.isWhitespace { text.removeLast() }
        return String(text)
    }
}

/// Connects, runs `sql`, disconnects — on a dedicated thread.
func executeOnDedicatedThread(_ sql: String, conninfo: String) async throws -> [[String?]] {
    try await onDedicatedThread {
        try BlockingConnection(conninfo: conninfo).execute(sql)
    }
}

/// libpq connection strings: parse with `PQconninfoParse`, rebuild as quoted key=value pairs.
enum Conninfo {
    /// The explicitly given (keyword, value) pairs of `conninfo` (key=value or URL form), in libpq's order.
    static func parse(_ conninfo: String) throws -> [(keyword: String, value: String)] {
        var errorMessage: UnsafeMutablePointer<CChar>?
        guard let options = PQconninfoParse(conninfo, &errorMessage) else {
            var message = "invalid connection string"
            if let errorMessage {
                message += ": " + String(cString: errorMessage).trimmingTrailingWhitespace()
                PQfreemem(errorMessage)
            }
            throw TestPostgresError(message)
        }
        defer { PQconninfoFree(options) }
        var pairs: [(keyword: String, value: String)] = []
        var option = options
        while let keyword = option.pointee.keyword {
            if let value = option.pointee.val {
                pairs.append((String(cString: keyword), String(cString: value)))
            }
            option += 1
        }
        return pairs
    }

    /// `conninfo` with the given keywords set (replaced or added), rebuilt in key=value form.
    static func replacing(_ conninfo: String, with overrides: [(keyword: String, value: String)]) throws -> String {
        var pairs = try parse(conninfo)
        for override in overrides {
            if let index = pairs.firstIndex(where: { $0.keyword == override.keyword }) {
                pairs[index].value = override.value
            } else {
                pairs.append(override)
            }
        }
        return build(pairs)
    }

    /// Key=value pairs, each value single-quoted with `\` and `'` backslash-escaped (libpq's rules).
    static func build(_ pairs: [(keyword: String, value: String)]) -> String {
        pairs.map { "\($0.keyword)=\(quote($0.value))" }.joined(separator: " ")
    }

    /// One conninfo value, quoted per libpq rules.
    static func quote(_ value: String) -> String {
        var quoted = "'"
        for character in value {
            if character == "\\" || character == "'" { quoted.append("\\") }
            quoted.append(character)
        }
        return quoted + "'"
    }
}

/// SQL quoting for names this module generates or receives.
enum SQL {
    /// `name` as a double-quoted SQL identifier.
    static func identifier(_ name: String) -> String {
        "\"" + name.replacing("\"", with: "\"\"") + "\""
    }

    /// `value` as a standard-conforming SQL string literal (only for values without backslash semantics,
    /// i.e. names; passwords go through `BlockingConnection.literal`).
    static func literal(_ value: String) -> String {
        "'" + value.replacing("'", with: "''") + "'"
    }

    /// `count` random lowercase hex digits.
    static func randomHex(_ count: Int) -> String {
        let digits = Array("0123456789abcdef")
        return String((0..<count).map { _ in digits.randomElement()! })
    }
}

extension String {
    fileprivate func trimmingTrailingWhitespace() -> String {
        var text = Substring(self)
        while let last = text.last, last.isWhitespace { text.removeLast() }
        return String(text)
    }
}
