import ServiceLifecycle
import StokerHarness
import Testing

@testable import Stoker

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A fresh database on the shared test server (a private throwaway cluster unless STOKER_TEST_DATABASE_URL is set),
/// dropped afterwards.
func withTestDatabase<T: Sendable>(_ body: (TestDatabase) async throws -> T) async throws -> T {
    try await TestPostgres.shared().withDatabase(body)
}

/// A fresh database on a cluster whose authentication and TLS the tests control (password auth over TCP, TLS on).
func withControlledDatabase<T: Sendable>(_ body: (TestDatabase) async throws -> T) async throws -> T {
    try await TestPostgres.controlled().withDatabase(body)
}

/// Runs `group` while `body` runs, then stops it gracefully and waits for its end; when `body` (or the group) throws,
/// the group is cancelled and awaited first, and the error rethrown.
func whileRunning<T>(_ group: ServiceGroup, _ body: () async throws -> T) async throws -> T {
    let run = Task { try await group.run() }
    do {
        let value = try await body()
        await group.triggerGracefulShutdown()
        try await run.value
        return value
    } catch {
        run.cancel()
        _ = try? await run.value
        throw error
    }
}

/// Opens a session, runs `body`, closes the session (also when `body` throws).
func withSession<T: Sendable>(_ conninfo: String, _ body: (PostgresSession) async throws -> T) async throws -> T {
    try await PostgresSession.with(conninfo, body)
}

/// Waits (bounded: 30 s) until backend `pid` waits for a lock. Asks from a fresh admin connection each time: inside
/// a transaction PostgreSQL keeps showing the same `pg_stat_activity` snapshot.
func waitUntilBlocked(_ pid: Int, in database: TestDatabase, sourceLocation: SourceLocation = #_sourceLocation)
    async throws
{
    for _ in 0..<3000 {
        let rows = try await database.admin(
            "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = \(pid)"
        )
        if rows.first?[0] == "t" { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("backend \(pid) never waited for a lock", sourceLocation: sourceLocation)
}

/// Waits (bounded: 30 s) until backend `pid` has gone.
func waitUntilGone(_ pid: Int, in database: TestDatabase) async throws -> Bool {
    for _ in 0..<3000 {
        let rows = try await database.admin("SELECT count(*) FROM pg_stat_activity WHERE pid = \(pid)")
        if rows.first?[0] == "0" { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return false
}

/// Connects and expects a ``StokerError``; returns it (records an issue if the connection succeeded).
func connectError(_ conninfo: String, sourceLocation: SourceLocation = #_sourceLocation) async -> StokerError? {
    do {
        let session = try await PostgresSession.connect(conninfo)
        await session.close()
        Issue.record("the connection succeeded", sourceLocation: sourceLocation)
        return nil
    } catch let error as StokerError {
        return error
    } catch {
        Issue.record("not a StokerError: \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Asserts that no text a user could see of `error` holds `secret`.
func expectNoSecret(_ error: StokerError?, _ secret: String, sourceLocation: SourceLocation = #_sourceLocation) {
    guard let error else { return }
    for text in [error.description, error.message, error.serverMessage ?? "", error.connection ?? "", "\(error)"] {
        #expect(!text.contains(secret), "leaked: \(text)", sourceLocation: sourceLocation)
    }
}

/// A loopback TCP socket that swallows connection attempts: listening, it completes the handshake in the kernel but
/// never accepts nor answers (a host that hangs); not listening, it refuses at once (a closed port). Either way the
/// port stays reserved while the object lives, so no other process can take it in between.
final class LoopbackSocket: Sendable {
    let port: Int
    private let descriptor: Int32

    init(listening: Bool) throws {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw StokerError(.connectionFailed, "socket() failed") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw -> Int32 in
                guard bind(descriptor, raw, length) == 0 else { return -1 }
                if listening, listen(descriptor, 8) != 0 { return -1 }
                return getsockname(descriptor, raw, &length)
            }
        }
        guard bound == 0 else {
            closeSocket(descriptor)
            throw StokerError(.connectionFailed, "bind/listen failed")
        }
        self.descriptor = descriptor
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit { closeSocket(descriptor) }
}

/// A host that never answers: connections are accepted by the kernel and then left hanging.
func silentListener() throws -> LoopbackSocket { try LoopbackSocket(listening: true) }

/// A closed port: bound (so it stays ours) but not listening, so connections are refused at once.
func closedPort() throws -> LoopbackSocket { try LoopbackSocket(listening: false) }

private func closeSocket(_ descriptor: Int32) {
    _ = close(descriptor)
}

/// Polls `condition` every 20 ms until it holds; fails loudly after `limit` (a generous bound, not a measurement).
func waitUntil(
    _ what: String,
    within limit: Duration = .seconds(60),
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now.advanced(by: limit)
    while !(try await condition()) {
        guard ContinuousClock.now < deadline else {
            Issue.record("timed out after \(limit) waiting until \(what)", sourceLocation: sourceLocation)
            throw History.TimedOut(what: what)
        }
        try await Task.sleep(for: .milliseconds(20))
    }
}
