import Glibc

/// The detached shell that owns one PgBouncer from start to `rm -rf`, like the cluster's supervisor
/// (`supervisorScript`), so it goes away even when the test process is killed mid-run.
///
/// Arguments: `$1` test pid, `$2` root dir (holding `pgbouncer.ini`), `$3` the pgbouncer binary, `$4` the user to run
/// it as via `runuser` (empty: run directly; pgbouncer refuses to run as root). It starts pgbouncer as its own child,
/// writes `ready` once the log says `process up:` (or `failed`), waits until the test process is gone (pid + start
/// time) or `stop` exists, stops pgbouncer (SIGTERM: immediate shutdown in 1.18; SIGKILL after 5 s), and removes
/// the root. Like the cluster's supervisor it keeps the test process's stdout open (fd 9) until the end.
let bouncerSupervisorScript = #"""
    trap '' INT TERM HUP
    exec 9>&1 >/dev/null 2>&1
    umask 022
    PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"
    pid=$1 root=$2 exe=$3 user=$4
    as() { if [ -n "$user" ]; then runuser -u "$user" -- "$@"; else "$@"; fi; }
    st() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null; }
    born=$(st "$pid" | cut -d' ' -f20)
    alive() { s=$(st "$pid") && [ -n "$s" ] && [ "${s%% *}" != Z ] && [ "$(echo "$s" | cut -d' ' -f20)" = "$born" ]; }
    running() { s=$(st "$1") && [ -n "$s" ] && [ "${s%% *}" != Z ]; }
    ours() { [ -n "$1" ] && running "$1" && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$root/pgbouncer.ini"; }
    cd "$root" || exit 1
    echo $$ >"$root/supervisor.pid"
    as "$exe" "$root/pgbouncer.ini" >"$root/pgbouncer.out" 2>&1 </dev/null &
    child=$!
    result=ready n=0
    until grep -q 'process up:' "$root/pgbouncer.log" 2>/dev/null; do
      running "$child" || { result=failed; break; }
      n=$((n + 1))
      [ "$n" -le 1200 ] || { echo "pgbouncer not up after 60 s" >>"$root/pgbouncer.out"; result=failed; break; }
      sleep 0.05
    done
    touch "$root/$result"
    while alive && [ ! -e "$root/stop" ]; do sleep 0.2; done
    bouncer=$(cat "$root/pgbouncer.pid" 2>/dev/null)
    ours "$bouncer" && kill -TERM "$bouncer"
    kill -TERM "$child"
    n=0
    while { running "$child" || ours "$bouncer"; } && [ "$n" -lt 100 ]; do n=$((n + 1)); sleep 0.05; done
    ours "$bouncer" && kill -KILL "$bouncer"
    running "$child" && kill -KILL "$child"
    wait
    rm -rf "$root"
    """#

/// A PgBouncer in front of a private ``TestPostgres`` cluster, for tests of how Stoker behaves behind a pool.
///
/// It listens on a free loopback port (no unix socket), lets user `postgres` in without a password
/// (`auth_type=trust`), and forwards every database to the cluster's unix socket. A detached supervisor owns it and
/// removes it and its `/tmp/stoker-pg-XXXXXX` directory after ``stop()``, at process exit, or as soon as the test
/// process is gone (also after SIGKILL).
public final class TestPgBouncer: Sendable {
    /// PgBouncer's `pool_mode`.
    public enum PoolMode: String, Sendable, CaseIterable {
        /// A server connection per client connection, for the client's whole session.
        case session
        /// A server connection per transaction (session state — advisory locks, LISTEN — is not kept).
        case transaction
        /// A server connection per statement; multi-statement transactions are refused.
        case statement
    }

    /// The loopback TCP port PgBouncer listens on.
    public let port: Int
    /// The pool mode it was started with.
    public let poolMode: PoolMode
    /// Its directory (`/tmp/stoker-pg-XXXXXX`, holding `pgbouncer.ini`, `pgbouncer.log`, `pgbouncer.pid`).
    public let directory: String
    /// Its supervisor shell (``stop()`` waits until it has exited).
    private let supervisor: ProcessIdentity?

    private init(port: Int, poolMode: PoolMode, directory: String, supervisor: ProcessIdentity?) {
        self.port = port
        self.poolMode = poolMode
        self.directory = directory
        self.supervisor = supervisor
    }

    /// A conninfo for `database` through this bouncer: `host=127.0.0.1 port=<port> dbname=<name> user=postgres`.
    public func conninfo(database: TestDatabase) -> String {
        conninfo(databaseName: database.name)
    }

    /// A conninfo for the database named `databaseName` through this bouncer, as user `postgres`.
    public func conninfo(databaseName: String) -> String {
        Conninfo.build([
            ("host", "127.0.0.1"), ("port", String(port)), ("dbname", databaseName), ("user", "postgres"),
        ])
    }

    /// Starts PgBouncer in front of the private cluster `postgres` and waits (asynchronously, up to 60 s) until it
    /// is up.
    ///
    /// Configuration: `listen_addr=127.0.0.1` on a free port, `unix_socket_dir` empty, `auth_type=trust` with an
    /// `auth_file` listing `"postgres" ""`, `* = host=<cluster socket dir> port=<cluster port>`, the given
    /// `pool_mode` and `default_pool_size=poolSize`, `server_login_retry=1` (so it reconnects soon after a cluster
    /// restart). It runs as `postgres` (via `runuser`) when this process is root. `pgbouncer` is taken from `$PATH`,
    /// then `/usr/sbin`, `/usr/bin`.
    ///
    /// - Throws: ``TestPostgresError`` when `postgres` is not a private cluster, when pgbouncer is not installed, or
    ///   (with its log) when it does not come up.
    public static func start(inFrontOf postgres: TestPostgres, poolMode: PoolMode, poolSize: Int = 4) async throws
        -> TestPgBouncer
    {
        guard postgres.isPrivate, let socketDirectory = postgres.socketDirectory else {
            throw TestPostgresError(
                "TestPgBouncer needs a private cluster (TestPostgres.start() or .controlled()); this server is "
                    + "external (\(postgres.host):\(postgres.port)), and its socket directory and auth are unknown")
        }
        guard poolSize > 0 else { throw TestPostgresError("poolSize must be positive, got \(poolSize)") }
        let executable = try findExecutable()
        let host = try ClusterHost.discover()
        var attempt = 1
        while true {
            do {
                return try await launch(
                    executable: executable, host: host, socketDirectory: socketDirectory,
                    serverPort: postgres.port, poolMode: poolMode, poolSize: poolSize)
            } catch is PortTaken where attempt < 3 {
                attempt += 1  // Another process took the port between our probe and pgbouncer's bind.
            } catch let error as PortTaken {
                throw error.underlying
            }
        }
    }

    /// Stops PgBouncer and waits (asynchronously, up to 30 s) until it and its directory are gone.
    public func stop() async {
        await stopSupervised(root: directory, supervisor: supervisor)
    }

    // MARK: - Internals

    private static func findExecutable() throws -> String {
        let path = (Files.environment("PATH") ?? "").split(separator: ":").map(String.init)
        let candidates = (path + ["/usr/sbin", "/usr/bin"]).map { $0 + "/pgbouncer" }
        guard let found = candidates.first(where: Files.isExecutable) else {
            throw TestPostgresError(
                "pgbouncer not found in $PATH, /usr/sbin or /usr/bin; install it (e.g. `apt-get install pgbouncer`)")
        }
        return found
    }

    private static func launch(
        executable: String, host: ClusterHost, socketDirectory: String, serverPort: Int, poolMode: PoolMode,
        poolSize: Int
    ) async throws -> TestPgBouncer {
        let root = try Files.makeTemporaryDirectory(template: "/tmp/stoker-pg-XXXXXX")
        let port: Int
        do {
            if let user = host.runAs, chown(root, user.uid, user.gid) != 0 {
                throw TestPostgresError("chown \(root) to \(user.name) failed: \(String(cString: strerror(errno)))")
            }
            port = try ClusterHost.freeLoopbackPort()
            try Files.write(root + "/users.txt", "\"postgres\" \"\"\n")
            try Files.write(
                root + "/pgbouncer.ini",
                """
                ;; Written by StokerHarness.TestPgBouncer.
                [databases]
                * = host=\(socketDirectory) port=\(serverPort)

                [pgbouncer]
                listen_addr = 127.0.0.1
                listen_port = \(port)
                unix_socket_dir =
                auth_type = trust
                auth_file = \(root)/users.txt
                pool_mode = \(poolMode.rawValue)
                default_pool_size = \(poolSize)
                server_login_retry = 1
                logfile = \(root)/pgbouncer.log
                pidfile = \(root)/pgbouncer.pid

                """)
        } catch {
            for file in ["users.txt", "pgbouncer.ini"] { unlink(root + "/" + file) }
            rmdir(root)
            throw error
        }
        ClusterRegistry.register(root)
        let argv = [
            host.setsid, "-f", "/bin/sh", "-c", bouncerSupervisorScript, "stoker-pgbouncer-supervisor",
            String(getpid()), root, executable, host.runAs?.name ?? "",
        ]
        try await startSupervisor(argv, root: root, files: ["users.txt", "pgbouncer.ini"], what: "pgbouncer")

        try await awaitSupervisedReady(
            root: root,
            what: "pgbouncer",
            logName: "log",
            log: {
                (Files.contents(root + "/pgbouncer.log") ?? "(no pgbouncer.log)") + "\n"
                    + (Files.contents(root + "/pgbouncer.out") ?? "")
            },
            portTaken: { $0.contains("Address already in use") }
        )
        return TestPgBouncer(
            port: port, poolMode: poolMode, directory: root,
            supervisor: ProcessIdentity(pidFile: root + "/supervisor.pid"))
    }

}
