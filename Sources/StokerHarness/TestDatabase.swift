import Synchronization

/// One isolated database on a ``TestPostgres`` server, valid inside ``TestPostgres/withDatabase(_:)``.
public struct TestDatabase: Sendable {
    /// The database name (`stoker_test_<random hex>`).
    public let name: String
    /// The server the database lives on.
    public let server: TestPostgres
    /// A key=value conninfo for this database as the admin: the server's admin conninfo (URL or key=value)
    /// with `dbname` replaced, values quoted per libpq rules.
    public let conninfo: String
    /// The roles created through ``createRole(prefix:password:)``, dropped with the database.
    let roles: RoleLedger

    /// A conninfo over TCP (`host`/`port` of the server, `127.0.0.1` for private clusters) to this database as
    /// `user`, for password-authentication and TLS tests. `extra` key=values (e.g. `sslmode`, `sslrootcert`)
    /// are appended in key order and override the defaults.
    public func tcpConninfo(user: String, password: String?, extra: [String: String] = [:]) -> String {
        var pairs: [(keyword: String, value: String)] = [
            ("host", server.host), ("port", String(server.port)), ("dbname", name), ("user", user),
        ]
        if let password { pairs.append(("password", password)) }
        for (keyword, value) in extra.sorted(by: { $0.key < $1.key }) {
            if let index = pairs.firstIndex(where: { $0.keyword == keyword }) {
                pairs[index].value = value
            } else {
                pairs.append((keyword, value))
            }
        }
        return Conninfo.build(pairs)
    }

    /// Creates a login role `<prefix>_<random hex>` with `password` (escaped by libpq, stored as SCRAM), and
    /// records it so ``TestPostgres/withDatabase(_:)`` drops it (after `REASSIGN OWNED` / `DROP OWNED` in
    /// this database). Keep `prefix` short: role names are cut at 63 bytes.
    ///
    /// - Returns: the role name (lowercase, usable unquoted).
    public func createRole(prefix: String = "stoker_role", password: String) async throws -> String {
        let role = "\(prefix)_\(SQL.randomHex(12))"
        let conninfo = server.adminConninfo
        roles.add(role)
        try await onDedicatedThread {
            let connection = try BlockingConnection(conninfo: conninfo)
            let literal = try connection.literal(password)
            _ = try connection.execute("CREATE ROLE \(SQL.identifier(role)) LOGIN PASSWORD \(literal)")
        }
        return role
    }

    /// Runs `sql` as the admin in this database (see ``TestPostgres/admin(_:database:)``).
    @discardableResult
    public func admin(_ sql: String) async throws -> [[String?]] {
        try await server.admin(sql, database: name)
    }
}

/// The roles one ``TestDatabase`` created; shared by every copy of that struct.
final class RoleLedger: Sendable {
    private let names = Mutex<[String]>([])

    func add(_ role: String) {
        names.withLock { $0.append(role) }
    }

    var all: [String] {
        names.withLock { $0 }
    }
}
