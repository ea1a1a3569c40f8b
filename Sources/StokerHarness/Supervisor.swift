import CStokerSystem
import Glibc
import Synchronization

/// The detached shell that owns one private cluster from `initdb` to `rm -rf`, so the cluster goes away even when the
/// test process is killed (SIGKILL included) mid-run: the test process never runs `initdb` or `pg_ctl` itself.
///
/// Arguments: `$1` test pid, `$2` root dir, `$3` TCP port, `$4` PostgreSQL bin dir, `$5` 1 for TLS,
/// `$6` the user to run as via `runuser` (empty: run directly), `$7` the mode: `initdb` (a new cluster) or
/// `standby` (a streaming-replication hot standby of the primary whose socket directory and port are the two lines of
/// `<root>/standby-of`).
/// It creates the data directory — `initdb` (and openssl for TLS), or `pg_basebackup -R` from the primary (copying
/// its TLS files for TLS) — starts `postgres` as its own child, writes `setup.log`, then `ready` or `failed`
/// (a standby counts as started once it accepts hot-standby connections), waits until the test process is gone
/// (pid + start time from /proc, so a zombie or a reused pid counts as gone) or `stop` exists, stops the cluster with
/// `pg_ctl -m immediate`, and removes the root. Meanwhile it serves restart requests: for each file
/// `restart-<token>` it stops postgres (`-m immediate`), starts it again with the same settings, and writes
/// `restarted-<token>` (or `restart-failed-<token>`, details in `restart.log`).
///
/// It keeps the test process's stdout open (as fd 9, never written) until the very end: a runner that reads
/// the test output to EOF, like `swift test`, therefore returns only after every cluster is gone — also
/// when the test process crashed or was killed.
let supervisorScript = #"""
    trap '' INT TERM HUP
    exec 9>&1 >/dev/null 2>&1
    umask 022
    PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"
    pid=$1 root=$2 port=$3 bin=$4 tls=$5 user=$6 mode=$7
    as() { if [ -n "$user" ]; then runuser -u "$user" -- "$@"; else "$@"; fi; }
    st() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null; }
    born=$(st "$pid" | cut -d' ' -f20)
    alive() { s=$(st "$pid") && [ -n "$s" ] && [ "${s%% *}" != Z ] && [ "$(echo "$s" | cut -d' ' -f20)" = "$born" ]; }
    cd "$root" || exit 1
    echo $$ >"$root/supervisor.pid"
    certificates() {
      ossl=$(command -v openssl) || { echo "openssl not found in PATH"; return 1; }
      ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
        'extendedKeyUsage=serverAuth' 'subjectAltName=DNS:localhost,IP:127.0.0.1' >"$root/server.ext" &&
      as "$ossl" req -x509 -new $ec -days 7 -subj "/CN=Stoker Test CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$root/ca.key" -out "$root/ca.crt" &&
      as "$ossl" req -new $ec -subj "/CN=localhost" -keyout "$root/server.key" -out "$root/server.csr" &&
      as "$ossl" x509 -req -in "$root/server.csr" -CA "$root/ca.crt" -CAkey "$root/ca.key" \
        -CAserial "$root/ca.srl" -CAcreateserial -days 7 -extfile "$root/server.ext" -out "$root/server.crt" &&
      as chmod 600 "$root/server.key" &&
      as "$ossl" req -x509 -new $ec -days 7 -subj "/CN=Stoker Unrelated CA" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$root/other-ca.key" -out "$root/other-ca.crt"
    }
    running() { s=$(st "$1") && [ -n "$s" ] && [ "${s%% *}" != Z ]; }
    # Starts postgres as our own child (not daemonised by pg_ctl, so this shell reaps it: no zombie is left for
    # PID 1) and waits until its postmaster.pid (a new one: not the previous postmaster's) says ready (or, for a hot
    # standby, standby: accepting read-only connections).
    launch() {
      set -- -D "$root/data" -k "$root" -p "$port" -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400
      if [ "$tls" = 1 ]; then
        set -- "$@" -c ssl=on -c "ssl_cert_file=$root/server.crt" -c "ssl_key_file=$root/server.key"
      fi
      previous=$(head -n 1 "$root/data/postmaster.pid" 2>/dev/null)
      as "$bin/postgres" "$@" >>"$root/postgres.log" 2>&1 </dev/null &
      child=$!
      n=0
      until sed -n 8p "$root/data/postmaster.pid" 2>/dev/null | grep -Eq '^(ready|standby)' &&
            [ "$(head -n 1 "$root/data/postmaster.pid" 2>/dev/null)" != "$previous" ]; do
        running "$child" || { echo "postgres exited during startup:"; tail -n 50 "$root/postgres.log"; return 1; }
        n=$((n + 1))
        [ "$n" -le 1200 ] || { echo "postgres not ready after 60 s:"; tail -n 50 "$root/postgres.log"; return 1; }
        sleep 0.05
      done
    }
    # Immediate shutdown (like a crash: no checkpoint, clients cut off), then reap the child.
    stop_postgres() {
      if [ -f "$root/data/postmaster.pid" ]; then
        pm=$(head -n 1 "$root/data/postmaster.pid")
        as "$bin/pg_ctl" -D "$root/data" -m immediate -w -t 20 stop >/dev/null 2>&1 ||
          { [ -n "$pm" ] && kill -CONT "$pm" && kill -KILL "$pm"; } >/dev/null 2>&1
      fi
      [ -z "$child" ] || wait "$child"
    }
    # Serves the requests `restart-<token>` given as arguments: stop, launch, then `restarted-<token>` (or
    # `restart-failed-<token>`, with restart.log) for each.
    restart() {
      for request in "$@"; do rm -f "$request"; done
      stop_postgres
      if launch >>"$root/restart.log" 2>&1; then outcome=restarted; else outcome=restart-failed; fi
      for request in "$@"; do touch "$root/$outcome-${request##*/restart-}"; done
    }
    # A base backup of the running primary over its unix socket (pg_hba: `local replication all trust`), with
    # standby.signal and primary_conninfo (-R), WAL streamed alongside; TLS files are copied from the primary's root.
    standby() {
      source=$(sed -n 1p "$root/standby-of") sourceport=$(sed -n 2p "$root/standby-of")
      as "$bin/pg_basebackup" -h "$source" -p "$sourceport" -U postgres -D "$root/data" -R -X stream \
        --checkpoint=fast --no-sync || return 1
      if [ "$tls" = 1 ]; then
        for file in ca.crt server.crt server.key other-ca.crt; do
          as cp -p "$source/$file" "$root/$file" || return 1
        done
      fi
    }
    setup() {
      if [ "$mode" = standby ]; then
        standby || return 1
      else
        as "$bin/initdb" -D "$root/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
          --no-sync --no-instructions -E UTF8 --locale=C || return 1
        if [ "$tls" = 1 ]; then certificates || return 1; fi
      fi
      launch
    }
    child=
    if setup >"$root/setup.log" 2>&1; then touch "$root/ready"; else touch "$root/failed"; fi
    while alive && [ ! -e "$root/stop" ]; do
      set -- "$root"/restart-*
      [ ! -e "$1" ] || restart "$@"
      sleep 0.2
    done
    stop_postgres
    wait
    rm -rf "$root"
    """#

/// A process by pid and start time (so a reused pid is not mistaken for it).
struct ProcessIdentity: Sendable {
    let pid: Int32
    let startTime: String

    /// The process whose pid is written in `pidFile`, if it is running now.
    init?(pidFile: String) {
        guard let text = Files.contents(pidFile),
            let pid = Int32(text.split(whereSeparator: \.isWhitespace).first ?? ""),
            let fields = Files.processStatFields(pid), fields.count > 19, fields[0] != "Z"
        else { return nil }
        self.pid = pid
        self.startTime = String(fields[19])
    }

    /// Whether the process still runs (a zombie or a different process under the same pid does not count).
    var isRunning: Bool {
        guard let fields = Files.processStatFields(pid), fields.count > 19 else { return false }
        return fields[0] != "Z" && fields[19] == startTime
    }
}

/// Spawns `argv` with posix_spawn (stdin and stderr on /dev/null, stdout inherited or /dev/null, every other
/// fd closed, cwd `directory`, an empty signal mask and default dispositions) and waits for it — blocking:
/// call only on a dedicated thread. Returns the exit status (or 128 + signal).
func spawnAndWait(_ argv: [String], directory: String, inheritStandardOutput: Bool) throws -> Int32 {
    let pid = try spawnChild(
        argv, directory: directory, standardOutput: inheritStandardOutput ? .inherit : .null,
        standardError: .null)
    return try waitForExit(pid)
}

/// The roots of every private cluster this process has started and not yet seen removed, and the
/// process-wide safety nets that stop them: an `atexit` handler and the orphan watchdog.
enum ClusterRegistry {
    /// Registered cluster roots. Read by the atexit handler, so it must be a global, not instance state.
    static let roots = Mutex<Set<String>>([])

    /// Records `root` (installing the atexit handler and the watchdog on first use).
    static func register(_ root: String) {
        _ = processHooks
        roots.withLock { _ = $0.insert(root) }
    }

    /// Forgets `root` (its supervisor removed it).
    static func unregister(_ root: String) {
        roots.withLock { _ = $0.remove(root) }
    }

    /// Installed once, when the first private cluster starts.
    private static let processHooks: Void = {
        // A C function pointer: the closure captures nothing and reads only globals.
        atexit { ClusterRegistry.stopAllAtExit() }
        startOrphanWatchdog()
    }()

    /// Asks every registered cluster's supervisor to stop and waits up to 5 s for the roots to vanish.
    static func stopAllAtExit() {
        let pending = roots.withLock { $0 }
        guard !pending.isEmpty else { return }
        for root in pending { Files.touch(root + "/stop") }
        let deadline = ContinuousClock.now.advanced(by: .seconds(5))
        while pending.contains(where: Files.exists) && ContinuousClock.now < deadline {
            usleep(20_000)
        }
    }

    /// `swift test` killed with SIGKILL/SIGTERM leaves the test binary running as an orphan (it has its own
    /// process group). A thread notices the parent change and kills this process, so the supervisors see
    /// it gone and clean up. Disabled with STOKER_TEST_ORPHAN_WATCHDOG=0, or when the parent is already
    /// init (nothing to watch).
    private static func startOrphanWatchdog() {
        if Files.environment("STOKER_TEST_ORPHAN_WATCHDOG") == "0" { return }
        let parent = getppid()
        guard parent > 1 else { return }
        try? startDetachedThread {
            while true {
                usleep(250_000)
                if getppid() != parent { kill(getpid(), SIGKILL) }
            }
        }
    }
}

/// Where a private cluster's programs come from and who runs them.
struct ClusterHost {
    /// The directory holding `initdb` and `pg_ctl`.
    var binDirectory: String
    /// The user to run initdb/pg_ctl/openssl as (`postgres` when we are root), or nil to run them directly.
    var runAs: (name: String, uid: uid_t, gid: gid_t)?
    /// Absolute path of `setsid`.
    var setsid: String

    static func discover() throws -> ClusterHost {
        let bin = try findBinDirectory()
        guard let setsid = ["/usr/bin/setsid", "/bin/setsid"].first(where: Files.isExecutable) else {
            throw TestPostgresError("setsid not found in /usr/bin or /bin (util-linux is required)")
        }
        var runAs: (name: String, uid: uid_t, gid: gid_t)?
        if geteuid() == 0 {
            // initdb refuses to run as root.
            guard let user = lookUpUser("postgres") else {
                throw TestPostgresError("running as root, but there is no `postgres` user to run initdb as")
            }
            runAs = ("postgres", user.uid, user.gid)
        }
        return ClusterHost(binDirectory: bin, runAs: runAs, setsid: setsid)
    }

    /// `$PATH` first (symlinks resolved to the real bin dir), then the highest /usr/lib/postgresql/*/bin.
    private static func findBinDirectory() throws -> String {
        func usable(_ dir: String) -> Bool {
            Files.isExecutable(dir + "/initdb") && Files.isExecutable(dir + "/pg_ctl")
        }
        for dir in (Files.environment("PATH") ?? "").split(separator: ":").map(String.init) {
            let candidate = dir + "/pg_ctl"
            guard Files.isExecutable(candidate), let real = Files.realPath(candidate) else { continue }
            let realDir = String(real[..<(real.lastIndex(of: "/") ?? real.endIndex)])
            if usable(realDir) { return realDir }
        }
        let base = "/usr/lib/postgresql"
        let versions = Files.list(base)
            .filter { usable("\(base)/\($0)/bin") }
            .sorted { lhs, rhs in
                let l = lhs.split(separator: ".").map { Int($0) ?? 0 }
                let r = rhs.split(separator: ".").map { Int($0) ?? 0 }
                return l.lexicographicallyPrecedes(r)
            }
        if let newest = versions.last { return "\(base)/\(newest)/bin" }
        throw TestPostgresError(
            "PostgreSQL server programs (initdb, pg_ctl) not found in $PATH or /usr/lib/postgresql/*/bin; "
                + "install PostgreSQL or point STOKER_TEST_DATABASE_URL at an existing server")
    }

    private static func lookUpUser(_ name: String) -> (uid: uid_t, gid: gid_t)? {
        var entry = passwd()
        var found: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16_384)
        let rc = getpwnam_r(name, &entry, &buffer, buffer.count, &found)
        guard rc == 0, found != nil else { return nil }
        return (entry.pw_uid, entry.pw_gid)
    }

    /// A TCP port on 127.0.0.1 that was free a moment ago (bind :0, getsockname, close).
    static func freeLoopbackPort() throws -> Int {
        let (descriptor, port) = try loopbackSocket(listening: nil)
        close(descriptor)
        return port
    }
}

/// The port chosen for a server was taken by another process before the server bound it: the caller retries with
/// another port.
struct PortTaken: Error {
    let underlying: TestPostgresError
}

/// Starts the detached supervisor `argv` (a `setsid -f …` command line) for `root`. If it cannot be started, no
/// supervisor owns `root`: removes `files` (what was already written there) and `root` itself, then throws.
func startSupervisor(_ argv: [String], root: String, files: [String], what: String) async throws {
    do {
        let status = try await onDedicatedThread {
            try spawnAndWait(argv, directory: root, inheritStandardOutput: true)
        }
        guard status == 0 else { throw TestPostgresError("setsid exited with status \(status)") }
    } catch {
        for file in files { unlink(root + "/" + file) }
        rmdir(root)
        ClusterRegistry.unregister(root)
        throw TestPostgresError("could not start the \(what) supervisor: \(error)")
    }
}

/// Asks the supervisor that owns `root` to stop, then waits (at most 30 s) until it has removed `root` and exited.
func stopSupervised(root: String, supervisor: ProcessIdentity?) async {
    Files.touch(root + "/stop")
    let deadline = ContinuousClock.now.advanced(by: .seconds(30))
    while Files.exists(root) || supervisor?.isRunning == true, ContinuousClock.now < deadline {
        await pauseBriefly()
    }
    if !Files.exists(root) { ClusterRegistry.unregister(root) }
}

/// Waits (at most 60 s, without blocking a thread) until the supervisor that owns `root` reports `ready`. When it
/// reports `failed`, removes `root`, runs out of time or the task is cancelled, stops that supervisor and throws with
/// the tail of `log()` — ``PortTaken`` when `portTaken(log)` says the chosen port was taken meanwhile.
func awaitSupervisedReady(
    root: String,
    what: String,
    logName: String,
    log: () -> String,
    portTaken: (String) -> Bool
) async throws {
    let deadline = ContinuousClock.now.advanced(by: .seconds(60))
    while !Files.exists(root + "/ready") {
        var problem: String?
        if Files.exists(root + "/failed") {
            problem = "\(what) failed to start"
        } else if !Files.exists(root) {
            problem = "the \(what) supervisor removed \(root) before \(what) was ready"
        } else if ContinuousClock.now >= deadline {
            problem = "\(what) was not ready after 60 s"
        } else if Task.isCancelled {
            problem = "the start was cancelled"
        }
        if let problem {
            let text = log()
            await stopSupervised(root: root, supervisor: ProcessIdentity(pidFile: root + "/supervisor.pid"))
            let error = TestPostgresError("\(problem) in \(root); \(logName):\n\(Files.tail(text))")
            if portTaken(text) { throw PortTaken(underlying: error) }
            throw error
        }
        await pauseBriefly()
    }
}
