import Glibc

/// A PostgreSQL server for tests: either a private, throwaway cluster this process started (`initdb` +
/// `pg_ctl` in `/tmp/stoker-pg-XXXXXX`, owned by a detached supervisor that removes it when this process
/// ends, however it ends), or an existing server named by `STOKER_TEST_DATABASE_URL` or the `PG*` variables.
///
/// Tests normally use ``shared()`` and isolate themselves with ``withDatabase(_:)``.
public final class TestPostgres: Sendable {
    /// How to start a private cluster.
    public struct Options: Sendable {
        /// Generate a CA and a server certificate and start the server with `ssl=on` (see ``TLSFiles``).
        public var tls: Bool

        /// Options for ``TestPostgres/start(_:)``; TLS is off unless asked for.
        public init(tls: Bool = false) {
            self.tls = tls
        }
    }

    /// The TLS material of a private cluster started with ``Options/tls``.
    public struct TLSFiles: Sendable, Hashable {
        /// The CA that signed the server certificate (use as `sslrootcert` with `sslmode=verify-full`).
        public let caCertificate: String
        /// A second, unrelated CA: verifying the server against it must fail ("wrong CA" tests).
        public let otherCACertificate: String
        /// The server certificate (CN=localhost, subjectAltName DNS:localhost, IP:127.0.0.1).
        public let serverCertificate: String
        /// The name the server certificate is valid for: `localhost`.
        public let serverName: String
    }

    /// True for a cluster this process started (and will remove); false for an external server.
    public let isPrivate: Bool
    /// The host to reach the server over TCP: `127.0.0.1` for private clusters; for an external server, the
    /// host libpq connected to (which may be a socket directory if the environment names one).
    public let host: String
    /// The server's port (a free loopback port chosen at start for private clusters).
    public let port: Int
    /// The unix-socket directory of a private cluster (its root directory); nil for external servers.
    public let socketDirectory: String?
    /// The data directory of a private cluster (`<root>/data`, e.g. to edit `pg_hba.conf`); nil otherwise.
    public let dataDirectory: String?
    /// Certificate files when the private cluster was started with TLS; nil otherwise.
    public let tls: TLSFiles?
    /// A conninfo for a superuser session: for private clusters
    /// `host=<socket dir> port=<port> user=postgres dbname=postgres`; for external servers the given URL,
    /// or `""` (everything from the `PG*` environment).
    public let adminConninfo: String

    /// The supervisor shell of a private cluster (``stop()`` waits until it has exited).
    private let supervisor: ProcessIdentity?
    /// The process-wide shared instance and ``controlled()``'s instance are stopped at exit, not by callers.
    private let stoppedAtExit: Bool

    private init(
        isPrivate: Bool, host: String, port: Int, root: String?, tls: TLSFiles?, adminConninfo: String,
        supervisor: ProcessIdentity? = nil, stoppedAtExit: Bool
    ) {
        self.supervisor = supervisor
        self.isPrivate = isPrivate
        self.host = host
        self.port = port
        self.socketDirectory = root
        self.dataDirectory = root.map { $0 + "/data" }
        self.tls = tls
        self.adminConninfo = adminConninfo
        self.stoppedAtExit = stoppedAtExit
    }

    // MARK: - Getting a server

    /// Starts a private cluster in a fresh `/tmp/stoker-pg-XXXXXX` directory and waits (asynchronously, up to
    /// 60 s) until it accepts connections.
    ///
    /// A detached supervisor (`setsid -f /bin/sh -c …`) runs `initdb` (`-U postgres --auth-local=trust
    /// --auth-host=scram-sha-256`) and `pg_ctl start` (`fsync=off`, `listen_addresses=127.0.0.1`,
    /// `max_connections=400`, unix socket in the root directory) — as the `postgres` user via `runuser`
    /// when this process is root. It stops the cluster and deletes the directory after ``stop()``, at
    /// process exit, or as soon as this process is gone (also after SIGKILL). `initdb`/`pg_ctl` are taken
    /// from `$PATH` (symlinks resolved) or the newest `/usr/lib/postgresql/*/bin`.
    ///
    /// With ``Options/tls`` it also creates, with openssl, `ca.crt`/`ca.key`, `server.crt`/`server.key`
    /// (signed by that CA for `localhost` and `127.0.0.1`) and an unrelated `other-ca.crt`, and starts
    /// with `ssl=on`.
    ///
    /// - Throws: ``TestPostgresError`` with the tail of `setup.log` if the cluster does not come up.
    public static func start(_ options: Options = .init()) async throws -> TestPostgres {
        try await startPrivate(options, stoppedAtExit: false)
    }

    /// Starts a private cluster (``start(_:)``), runs `body` with it, and stops it afterwards — also when `body`
    /// throws. Returns what `body` returned, once the cluster is gone.
    public static func withPrivate<T: Sendable>(
        _ options: Options = .init(),
        _ body: (TestPostgres) async throws -> T
    ) async throws -> T {
        let postgres = try await start(options)
        return try await postgres.stopping(after: body)
    }

    /// Starts a hot standby of this cluster (``startStandby()``), runs `body` with it, and stops the standby
    /// afterwards — also when `body` throws.
    public func withStandby<T: Sendable>(_ body: (TestPostgres) async throws -> T) async throws -> T {
        let standby = try await startStandby()
        return try await standby.stopping(after: body)
    }

    /// Runs `body` with this cluster, then stops it, whether `body` returned or threw.
    private func stopping<T: Sendable>(after body: (TestPostgres) async throws -> T) async throws -> T {
        do {
            let value = try await body(self)
            await stop()
            return value
        } catch {
            await stop()
            throw error
        }
    }

    /// The server every test of this process shares, created on first use:
    /// - `STOKER_TEST_DATABASE_URL` set: that existing server;
    /// - else `PGHOST` set: the server the `PG*` environment names (admin conninfo `""`);
    /// - else one private cluster with TLS, started once per process and removed at process exit.
    ///
    /// ``stop()`` on it does nothing. A failure to reach or start it is reported to every caller.
    public static func shared() async throws -> TestPostgres {
        try await sharedServer.value
    }

    /// A private cluster whose configuration a suite may change (`pg_hba.conf`, TLS, restarts): the shared
    /// one when it is private, otherwise one private cluster with TLS started for this process (once).
    ///
    /// ``stop()`` on it does nothing; it is removed at process exit.
    public static func controlled() async throws -> TestPostgres {
        try await controlledServer.value
    }

    private static let sharedServer = Task<TestPostgres, any Error> {
        if let url = Files.environment("STOKER_TEST_DATABASE_URL") {
            return try await external(conninfo: url)
        }
        if Files.environment("PGHOST") != nil {
            return try await external(conninfo: "")
        }
        return try await startPrivate(Options(tls: true), stoppedAtExit: true)
    }

    private static let controlledServer = Task<TestPostgres, any Error> {
        if Files.environment("STOKER_TEST_DATABASE_URL") == nil && Files.environment("PGHOST") == nil {
            return try await sharedServer.value
        }
        return try await startPrivate(Options(tls: true), stoppedAtExit: true)
    }

    private static func external(conninfo: String) async throws -> TestPostgres {
        _ = try Conninfo.parse(conninfo)
        let (host, port) = try await onDedicatedThread {
            let connection = try BlockingConnection(conninfo: conninfo)
            return (connection.host, connection.port)
        }
        return TestPostgres(
            isPrivate: false, host: host, port: port, root: nil, tls: nil, adminConninfo: conninfo,
            stoppedAtExit: true)
    }

    private static func startPrivate(
        _ options: Options, mode: SupervisorMode = .initdb, stoppedAtExit: Bool
    ) async throws -> TestPostgres {
        let host = try ClusterHost.discover()
        if case .standby = mode, !Files.isExecutable(host.binDirectory + "/pg_basebackup") {
            throw TestPostgresError("pg_basebackup not found in \(host.binDirectory): it is needed for a standby")
        }
        var attempt = 1
        while true {
            do {
                return try await launch(options, mode: mode, on: host, stoppedAtExit: stoppedAtExit)
            } catch is PortTaken where attempt < 3 {
                attempt += 1  // Another process took the port between our probe and postgres' bind.
            } catch let error as PortTaken {
                throw error.underlying
            }
        }
    }

    /// How the supervisor creates the data directory.
    private enum SupervisorMode {
        /// `initdb`: a new, empty cluster.
        case initdb
        /// `pg_basebackup -R` from the primary listening in `socketDirectory` on `port`: a hot standby.
        case standby(socketDirectory: String, port: Int)

        /// The supervisor script's argument `$7`.
        var name: String {
            switch self {
            case .initdb: "initdb"
            case .standby: "standby"
            }
        }

        /// The content of `<root>/standby-of` for a standby (the primary's socket directory, then its port), read by
        /// the supervisor. A file, not arguments, so that no process of the standby names the primary's directory
        /// on its command line (where leak checks look for processes of the primary).
        var primaryFile: String? {
            switch self {
            case .initdb: nil
            case .standby(let socketDirectory, let port): "\(socketDirectory)\n\(port)\n"
            }
        }
    }

    private static func launch(
        _ options: Options, mode: SupervisorMode, on host: ClusterHost, stoppedAtExit: Bool
    ) async throws -> TestPostgres {
        let root = try Files.makeTemporaryDirectory(template: "/tmp/stoker-pg-XXXXXX")
        if let user = host.runAs, chown(root, user.uid, user.gid) != 0 {
            let reason = String(cString: strerror(errno))
            rmdir(root)
            throw TestPostgresError("chown \(root) to \(user.name) failed: \(reason)")
        }
        let port: Int
        do {
            port = try ClusterHost.freeLoopbackPort()
            if let primaryFile = mode.primaryFile { try Files.write(root + "/standby-of", primaryFile) }
        } catch {
            unlink(root + "/standby-of")
            rmdir(root)
            throw error
        }
        ClusterRegistry.register(root)
        let argv = [
            host.setsid, "-f", "/bin/sh", "-c", supervisorScript, "stoker-pg-supervisor",
            String(getpid()), root, String(port), host.binDirectory, options.tls ? "1" : "0",
            host.runAs?.name ?? "", mode.name,
        ]
        try await startSupervisor(argv, root: root, files: ["standby-of"], what: "cluster")

        try await awaitSupervisedReady(
            root: root,
            what: "PostgreSQL",
            logName: "setup.log",
            log: { Files.contents(root + "/setup.log") ?? "(no setup.log)" },
            portTaken: { $0.contains("could not bind") || $0.contains("Address already in use") }
        )

        var tls: TLSFiles?
        if options.tls {
            tls = TLSFiles(
                caCertificate: root + "/ca.crt", otherCACertificate: root + "/other-ca.crt",
                serverCertificate: root + "/server.crt", serverName: "localhost")
        }
        let server = TestPostgres(
            isPrivate: true, host: "127.0.0.1", port: port, root: root, tls: tls,
            adminConninfo: Conninfo.build([
                ("host", root), ("port", String(port)), ("user", "postgres"), ("dbname", "postgres"),
            ]),
            supervisor: ProcessIdentity(pidFile: root + "/supervisor.pid"), stoppedAtExit: stoppedAtExit)
        if case .standby = mode {
            // The supervisor saw `standby` in postmaster.pid; confirm from a session that it is in recovery.
            let recovering: [[String?]]
            do {
                recovering = try await server.admin("SELECT pg_is_in_recovery()")
            } catch {
                await stopSupervised(root: root, supervisor: server.supervisor)
                throw TestPostgresError("the standby in \(root) does not accept connections: \(error)")
            }
            guard recovering == [["t"]] else {
                await stopSupervised(root: root, supervisor: server.supervisor)
                throw TestPostgresError("the standby in \(root) is not in recovery (pg_is_in_recovery() is false)")
            }
        }
        return server
    }

    /// Starts a streaming-replication hot standby of this private cluster in a fresh `/tmp/stoker-pg-XXXXXX`
    /// directory, and waits (asynchronously, up to 60 s) until it accepts connections and `pg_is_in_recovery()` is
    /// true on it.
    ///
    /// A detached supervisor, like the one of ``start(_:)``, takes a base backup with `pg_basebackup -R -X stream`
    /// over this cluster's unix socket (as the `postgres` user via `runuser` when this process is root) and starts
    /// `postgres` on it with its own socket directory and a free loopback port, with the same settings as the
    /// primary. With TLS on the primary, the standby serves the same certificate, copied into its own directory
    /// (``tls`` names the copies). The standby is a separate cluster: stop it with its own ``stop()`` — before or
    /// after this one (a standby whose primary is gone keeps serving its last state); like every private cluster it
    /// is removed at process exit, or when this process is gone, at the latest.
    ///
    /// - Throws: ``TestPostgresError`` for an external server or a stopped cluster, or (with the log) when the
    ///   standby does not come up.
    public func startStandby() async throws -> TestPostgres {
        guard isPrivate, let root = socketDirectory else {
            throw TestPostgresError(
                "startStandby() needs a private cluster; this server is external (\(host):\(port))")
        }
        guard Files.exists(root + "/ready"), !Files.exists(root + "/stop") else {
            throw TestPostgresError(
                "cannot start a standby of the cluster in \(root): it is stopped or was never ready")
        }
        return try await Self.startPrivate(
            Options(tls: tls != nil), mode: .standby(socketDirectory: root, port: port), stoppedAtExit: false)
    }

    // MARK: - Using it

    /// Runs `sql` (one or several statements, simple query protocol) as the admin in `database` (default:
    /// the admin conninfo's database), on a dedicated thread, over a fresh connection.
    ///
    /// - Returns: the rows of the last statement's result, each value as text (nil for NULL).
    /// - Throws: ``TestPostgresError`` with the server's message (and SQLSTATE) on failure.
    @discardableResult
    public func admin(_ sql: String, database: String? = nil) async throws -> [[String?]] {
        let conninfo = try database.map { try Conninfo.replacing(adminConninfo, with: [("dbname", $0)]) }
        return try await executeOnDedicatedThread(sql, conninfo: conninfo ?? adminConninfo)
    }

    /// Runs `sql` over a fresh connection made with any `conninfo` (e.g. a ``TestDatabase/tcpConninfo(user:password:extra:)``),
    /// on a dedicated thread; returns the rows of the last result.
    ///
    /// - Throws: ``TestPostgresError`` when the connection or the SQL fails.
    @discardableResult
    public static func execute(_ sql: String, conninfo: String) async throws -> [[String?]] {
        try await executeOnDedicatedThread(sql, conninfo: conninfo)
    }

    /// Creates an isolated database (`stoker_test_<random hex>`, from `template0`), runs `body` with it, then
    /// drops it (`WITH (FORCE)`, so leftover sessions do not block) together with every role created through
    /// ``TestDatabase/createRole(prefix:password:)`` — also when `body` throws.
    ///
    /// - Throws: `body`'s error if it threw; otherwise a cleanup failure, if any.
    public func withDatabase<T: Sendable>(_ body: (TestDatabase) async throws -> T) async throws -> T {
        let name = "stoker_test_" + SQL.randomHex(16)
        let conninfo = try Conninfo.replacing(adminConninfo, with: [("dbname", name)])
        try await admin("CREATE DATABASE \(SQL.identifier(name)) TEMPLATE template0")
        let database = TestDatabase(name: name, server: self, conninfo: conninfo, roles: RoleLedger())

        let outcome: Result<T, any Error>
        do {
            outcome = .success(try await body(database))
        } catch {
            outcome = .failure(error)
        }
        let cleanupError = await drop(database)
        if case .success = outcome, let cleanupError { throw cleanupError }
        return try outcome.get()
    }

    /// Drops `database` and its roles, best effort through every step; returns the first failure.
    private func drop(_ database: TestDatabase) async -> (any Error)? {
        var firstError: (any Error)?
        func attempt(_ sql: String, in db: String? = nil) async {
            do {
                try await admin(sql, database: db)
            } catch {
                if firstError == nil { firstError = error }
            }
        }
        let roles = database.roles.all
        let name = database.name
        if !roles.isEmpty {
            // Sessions in the database would make DROP OWNED wait for their locks.
            await attempt(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    + "WHERE datname = \(SQL.literal(name)) AND pid <> pg_backend_pid()")
            let owned = roles.map {
                "REASSIGN OWNED BY \(SQL.identifier($0)) TO CURRENT_USER; DROP OWNED BY \(SQL.identifier($0));"
            }
            await attempt(owned.joined(separator: " "), in: name)
        }
        await attempt("DROP DATABASE IF EXISTS \(SQL.identifier(name)) WITH (FORCE)")
        for role in roles {
            await attempt("DROP ROLE IF EXISTS \(SQL.identifier(role))")
        }
        return firstError
    }

    // MARK: - Faults

    /// Restarts a private cluster like `pg_ctl restart -m immediate`: its supervisor stops the postmaster in immediate
    /// mode — every session is cut off without a goodbye and nothing is checkpointed, as in a crash — and starts it
    /// again on the same data directory, socket directory and port. Returns once the server accepts connections
    /// again (waits asynchronously, up to 60 s).
    ///
    /// This disrupts every test using the cluster, so a test that restarts should start its own with
    /// ``start(_:)`` rather than use ``shared()`` or ``controlled()`` (allowed, but their other users fail).
    /// Concurrent calls may be served by a single restart.
    ///
    /// - Throws: ``TestPostgresError`` for an external server, a stopped cluster, or (with the log) a failed start.
    public func restart() async throws {
        guard isPrivate, let root = socketDirectory else {
            throw TestPostgresError("restart() needs a private cluster; this server is external (\(host):\(port))")
        }
        let token = SQL.randomHex(16)
        guard Files.exists(root + "/ready"), Files.touch(root + "/restart-" + token) else {
            throw TestPostgresError("cannot restart the cluster in \(root): it is stopped or was never ready")
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(60))
        while true {
            if Files.exists(root + "/restarted-" + token) {
                unlink(root + "/restarted-" + token)
                return
            }
            var problem: String?
            if Files.exists(root + "/restart-failed-" + token) {
                unlink(root + "/restart-failed-" + token)
                problem = "PostgreSQL did not come back after the restart"
            } else if !Files.exists(root) || Files.exists(root + "/stop") {
                problem = "the cluster was stopped during the restart"
            } else if ContinuousClock.now >= deadline {
                problem = "the restart did not finish within 60 s"
            }
            if let problem {
                let log = Files.contents(root + "/restart.log") ?? "(no restart.log)"
                throw TestPostgresError("\(problem) in \(root); restart.log:\n\(Files.tail(log))")
            }
            await pauseBriefly()
        }
    }

    // MARK: - Stopping

    /// Stops a private cluster started with ``start(_:)`` and waits (asynchronously, up to 30 s) until its
    /// directory is gone. Does nothing for external servers and for the ``shared()`` / ``controlled()``
    /// instances, which are removed at process exit.
    public func stop() async {
        guard isPrivate, !stoppedAtExit, let root = socketDirectory else { return }
        await stopSupervised(root: root, supervisor: supervisor)
    }

    /// Asks the supervisor of `root` to stop the cluster, and waits for it to remove `root` and exit.
}
