import ArgumentParser
import CStokerLibPQ
import Foundation
import Glibc
import StokerHarness
import Synchronization

/// `stoker-bench floor-client`: the floor — the fastest failover bare PostgreSQL allows — as one participant.
///
/// Waits in the lock's queue (`SET lock_timeout`, then `SELECT pg_advisory_lock(K)` again after each 55P03), so it
/// is granted the lock the instant the holder's session releases it; prints `now_leader`; then holds the lock,
/// sending `SELECT 1` every heartbeat so the server's `idle_session_timeout` (= the lease) drops it only when it is
/// frozen. SIGTERM/SIGINT: unlock, print `shutdown` with `ended_at`, exit 0. A lost session while leading: print
/// `now_follower` with `ended_at` (when it noticed), exit 1.
///
/// With `--sessions 2`, a second session holds `key + 1` while this one leads, and a successor takes `key + 1` (on its
/// first session, then moves it to its second) once it holds `key`: it begins only when both of its predecessor's
/// sessions are gone, as a Stoker successor needs its predecessor's main session and witness gone. Nothing else: no
/// term, no row, no notification — the floor of evidence carried by two sessions.
///
/// Single-purpose and synchronous: every libpq call blocks the main thread, which is all this process does.
struct FloorClient: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "floor-client",
        abstract: "One bare-libpq participant of the floor (used by `failover`).",
        shouldDisplay: false
    )

    @Option(name: .long, help: "libpq connection string.")
    var url: String

    @Option(name: .long, help: "The advisory lock key (single-bigint form).")
    var key: Int64

    @Option(name: .customLong("lock-timeout"), help: "lock_timeout of each wait in the queue.")
    var lockTimeout: BenchDuration = BenchDuration(parsing: "100ms")!

    @Option(name: .customLong("idle-timeout"), help: "idle_session_timeout of the session (the lease).")
    var idleTimeout: BenchDuration = BenchDuration(parsing: "5s")!

    @Option(name: .long, help: "Keep-alive interval while holding the lock (default: idle timeout / 5).")
    var heartbeat: BenchDuration?

    @Option(
        name: .long,
        help: "Sessions: 1, or 2 (the second holds key + 1, and a successor waits for both keys: both sessions gone).")
    var sessions: Int = 1

    func validate() throws {
        guard (1...2).contains(sessions) else { throw ValidationError("--sessions must be 1 or 2 (got \(sessions)).") }
    }

    func run() throws {
        let stop = try TerminationPipe()
        let node = "floor-\(getpid())"
        let connections = (0..<sessions).map { _ in PQconnectdb(url) }
        defer { for connection in connections { PQfinish(connection) } }
        var all: [FloorSession] = []
        for (index, connection) in connections.enumerated() {
            guard let connection else { fail("could not connect: out of memory") }
            guard PQstatus(connection) == CONNECTION_OK else {
                fail("could not connect: \(String(cString: PQerrorMessage(connection)))")
            }
            PQsetNoticeProcessor(connection, { _, _ in }, nil)
            let session = FloorSession(connection: connection)
            try session.command("SET application_name = '\(node)\(index == 0 ? "" : "/w")'")
            try session.command("SET lock_timeout = '\(lockTimeout.milliseconds)ms'")
            // The second session idles while the first waits in the queue: its timeout starts once it holds its key.
            if index == 0 { try session.command("SET idle_session_timeout = '\(idleTimeout.milliseconds)ms'") }
            all.append(session)
        }
        let session = all[0]
        let second = key + 1

        // With two sessions, the predecessor's second one holds `second` until it is gone too; then it moves to ours
        // (nobody else waits for it: the other candidates wait for `key`, which this session holds).
        var granted: Double?
        for each in all.count == 2 ? [key, second] : [key] {
            granted = waitInQueue(session, key: each, stop: stop)
            if granted == nil { break }
        }
        guard let grantedAt = granted else {
            emit(["\"event\":\"shutdown\"", "\"reason\":\"graceful_shutdown\""], node: node)
            return
        }
        let term = (try? session.value("SELECT nextval('stoker_bench_floor_term')")).flatMap { Int($0) } ?? 0
        emit(["\"event\":\"now_leader\"", "\"term\":\(term)"], node: node, at: grantedAt)
        if all.count == 2 {
            try session.command("SELECT pg_advisory_unlock(\(second))")
            try all[1].command("SELECT pg_advisory_lock(\(second))")
            try all[1].command("SET idle_session_timeout = '\(idleTimeout.milliseconds)ms'")
        }

        // Hold it.
        let interval = Int32(clamping: (heartbeat ?? idleTimeout).milliseconds / (heartbeat == nil ? 5 : 1))
        while true {
            var descriptors =
                [pollfd(fd: stop.descriptor, events: Int16(POLLIN), revents: 0)]
                + all.map { pollfd(fd: PQsocket($0.connection), events: Int16(POLLIN), revents: 0) }
            let ready = poll(&descriptors, nfds_t(descriptors.count), interval)
            if ready < 0 && errno != EINTR { fail("poll failed: \(String(cString: strerror(errno)))") }
            if descriptors[0].revents != 0 {
                // Leadership ends before the unlock is sent: the server may grant the successor before we read the reply.
                let endedAt = monotonicSeconds()
                // The second key first: a successor granted `key` then finds it free.
                if all.count == 2 { _ = all[1].execute("SELECT pg_advisory_unlock(\(second))") }
                _ = session.execute("SELECT pg_advisory_unlock(\(key))")
                emit(
                    [
                        "\"event\":\"shutdown\"", "\"reason\":\"graceful_shutdown\"", "\"term\":\(term)",
                        "\"ended_at\":\(seconds(endedAt))", "\"unlocked_at\":\(seconds(monotonicSeconds()))",
                    ], node: node)
                return
            }
            var lost = false
            for (index, each) in all.enumerated() where !lost {
                if descriptors[index + 1].revents != 0 {
                    // Readable while idle: the server is closing the session (idle_session_timeout, termination).
                    lost = PQconsumeInput(each.connection) == 0 || PQstatus(each.connection) != CONNECTION_OK
                } else if ready == 0 {
                    if case .failed = each.execute("SELECT 1") { lost = true }
                }
            }
            if lost {
                emit(
                    [
                        "\"event\":\"now_follower\"", "\"reason\":\"connection_lost\"", "\"term\":\(term)",
                        "\"ended_at\":\(seconds(monotonicSeconds()))",
                    ], node: node)
                throw ExitCode(1)
            }
        }
    }

    /// Waits in the lock's queue, one `lock_timeout` at a time; returns the instant the grant arrived, or nil when
    /// SIGTERM/SIGINT came first (checked between two waits).
    private func waitInQueue(_ session: FloorSession, key: Int64, stop: TerminationPipe) -> Double? {
        while !stop.isRequested {
            let outcome = session.execute("SELECT pg_advisory_lock(\(key))")
            let at = monotonicSeconds()
            switch outcome {
            case .ok:
                return at
            case .failed(let sqlState, _) where sqlState == "55P03":
                continue  // lock_not_available: the wait timed out; wait again.
            case .failed(let sqlState, let message):
                fail("pg_advisory_lock failed [\(sqlState)]: \(message)")
            }
        }
        return nil
    }

    /// Writes one JSON line to stdout (unbuffered: straight to fd 1).
    private func emit(_ fields: [String], node: String, at: Double = monotonicSeconds()) {
        let head = ["\"at\":\(seconds(at))", "\"node\":\"\(node)\"", "\"election\":\"floor\""]
        writeAll(1, "{" + (head + fields).joined(separator: ",") + "}\n")
    }

    private func seconds(_ value: Double) -> String { String(format: "%.6f", value) }

    private func fail(_ message: String) -> Never {
        writeAll(2, "floor-client: \(message)\n")
        Glibc.exit(1)
    }
}

/// Writes all of `text` to `descriptor`.
private func writeAll(_ descriptor: Int32, _ text: String) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let written = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        bytes = bytes.dropFirst(written)
    }
}

/// The result of one statement.
private enum Outcome {
    case ok
    case failed(sqlState: String, message: String)
}

/// Blocking statements on the floor client's one connection (deliberately not Sendable: main thread only).
private struct FloorSession {
    let connection: OpaquePointer

    func execute(_ sql: String) -> Outcome {
        let result = PQexec(connection, sql)
        defer { PQclear(result) }
        switch PQresultStatus(result) {
        case PGRES_COMMAND_OK, PGRES_TUPLES_OK:
            return .ok
        default:
            let sqlState = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) } ?? ""
            let message = String(cString: PQerrorMessage(connection)).trimmingCharacters(in: .whitespacesAndNewlines)
            return .failed(sqlState: sqlState, message: message)
        }
    }

    func command(_ sql: String) throws {
        if case .failed(let sqlState, let message) = execute(sql) {
            throw BenchError("`\(sql)` failed [\(sqlState)]: \(message)")
        }
    }

    /// The first column of the first row.
    func value(_ sql: String) throws -> String {
        let result = PQexec(connection, sql)
        defer { PQclear(result) }
        guard PQresultStatus(result) == PGRES_TUPLES_OK, PQntuples(result) > 0 else {
            throw BenchError("`\(sql)` failed: \(String(cString: PQerrorMessage(connection)))")
        }
        return String(cString: PQgetvalue(result, 0, 0))
    }
}

/// SIGTERM and SIGINT as a readable pipe (the handler only writes one byte: async-signal-safe), so the holder's
/// poll wakes on them whichever thread the signal lands on.
private struct TerminationPipe {
    /// The write end for the handler: a global, because a C signal handler cannot capture anything.
    /// Set before the handlers are installed, so the handler never sees it initialised lazily.
    static let writeEnd = Atomic<Int32>(-1)

    let descriptor: Int32

    init() throws {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { throw BenchError("pipe failed: \(String(cString: strerror(errno)))") }
        for end in ends {
            // Never blocks the handler (a full pipe already says enough); not inherited by anything we start.
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
            _ = fcntl(end, F_SETFL, O_NONBLOCK)
        }
        descriptor = ends[0]
        Self.writeEnd.store(ends[1], ordering: .sequentiallyConsistent)
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in
            var byte: UInt8 = 1
            _ = write(TerminationPipe.writeEnd.load(ordering: .relaxed), &byte, 1)
        }
        sigemptyset(&action.sa_mask)
        action.sa_flags = SA_RESTART
        sigaction(SIGTERM, &action, nil)
        sigaction(SIGINT, &action, nil)
    }

    /// Whether a signal has arrived (non-blocking).
    var isRequested: Bool {
        var descriptors = [pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)]
        return poll(&descriptors, 1, 0) > 0
    }
}
