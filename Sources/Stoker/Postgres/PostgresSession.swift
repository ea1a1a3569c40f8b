import CStokerLibPQ
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A PostgreSQL session owned by one dedicated thread.
///
/// The ``PGConnection`` is created on that thread and never leaves it; async callers hand it work as closures
/// (``run(_:)``) and are resumed through continuations, so no blocking libpq call ever runs on Swift's cooperative
/// pool. Between jobs the thread sleeps in `poll(2)` on the session's socket and an eventfd (written to when work is
/// queued): notifications are delivered the moment they arrive, with no polling interval.
///
/// When the connection breaks, queued and later jobs fail with ``StokerError/Code/connectionLost`` and
/// ``notifications`` finishes; a session is never reconnected in place (a reconnect is a new session).
final class PostgresSession: Sendable {
    /// Everything the session thread needs; the thread holds the core, never the session, so a session dropped
    /// without ``close()`` is still closed (its `deinit` asks the core to stop).
    private let core: SessionCore

    private init(core: SessionCore) { self.core = core }

    deinit { core.requestClose() }

    /// Opens a session on its own thread. Returns once the connection is up and the server passed the checks of
    /// ``ServerRequirements``; throws the connect failure otherwise.
    static func connect(_ configuration: ConnectionConfiguration) async throws -> PostgresSession {
        let core = try SessionCore(configuration: configuration)
        try await withCheckedThrowingContinuation { (ready: CheckedContinuation<Void, any Error>) in
            do {
                try startThread { core.threadMain(configuration, ready: ready) }
            } catch {
                ready.resume(throwing: error)
            }
        }
        return PostgresSession(core: core)
    }

    static func connect(_ conninfo: String) async throws -> PostgresSession {
        try await connect(ConnectionConfiguration(conninfo))
    }

    /// Opens a session, runs `body`, then closes the session — waiting until the connection is closed — also when
    /// `body` throws.
    static func with<T: Sendable>(_ conninfo: String, _ body: (PostgresSession) async throws -> T) async throws -> T {
        let session = try await connect(conninfo)
        do {
            let value = try await body(session)
            await session.close()
            return value
        } catch {
            await session.close()
            throw error
        }
    }

    /// Every notification received on a listened channel, in arrival order. Single consumer.
    var notifications: AsyncStream<PostgresNotification> { core.notifications }

    /// The connection this session was opened with, password removed.
    var connectionDescription: String { core.connectionDescription }

    /// The number of `poll(2)` calls the session thread has made so far.
    var pollCount: Int { core.polls.load(ordering: .relaxed) }

    /// Runs `body` on the session's thread with exclusive use of the connection and returns its result.
    func run<T: Sendable>(_ body: @escaping @Sendable (PGConnection) throws -> T) async throws -> T {
        try await core.run(body)
    }

    /// Runs one statement with bound parameters.
    @discardableResult
    func query(_ sql: String, _ parameters: [String?] = []) async throws -> QueryResult {
        try await run { try $0.execute(sql, parameters) }
    }

    func listen(_ channel: String) async throws {
        try await run { try $0.listen(channel) }
    }

    func unlisten(_ channel: String) async throws {
        try await run { try $0.unlisten(channel) }
    }

    func notify(_ channel: String, payload: String = "") async throws {
        try await run { try $0.notify(channel, payload: payload) }
    }

    /// Asks the thread to finish the queued jobs, close the connection and exit; returns at once.
    func requestClose() { core.requestClose() }

    /// Closes the session and waits until the connection is closed and the thread has exited.
    func close() async { await core.close() }
}

/// The state a session's thread and its callers share.
private final class SessionCore: Sendable {
    private struct Job: Sendable {
        let run: @Sendable (PGConnection) -> Void
        let fail: @Sendable (StokerError) -> Void
    }

    private struct State {
        var jobs: [Job] = []
        var closing = false
        var exited = false
        var failure: StokerError?
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())
    private let wakeDescriptor: Int32
    private let sink: AsyncStream<PostgresNotification>.Continuation
    let notifications: AsyncStream<PostgresNotification>
    /// `poll(2)` calls made by the session thread while idle; lets tests prove waiting does not spin.
    let polls = Atomic<Int>(0)
    let connectionDescription: String

    init(configuration: ConnectionConfiguration) throws(StokerError) {
        let descriptor = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard descriptor >= 0 else {
            throw StokerError(.connectionFailed, "eventfd(2) failed with errno \(errno).")
        }
        wakeDescriptor = descriptor
        (notifications, sink) = AsyncStream.makeStream(of: PostgresNotification.self, bufferingPolicy: .unbounded)
        connectionDescription = configuration.redactedDescription
    }

    deinit {
        // Only reached once the thread has exited (it holds the core) and no session refers to it: nobody can
        // write to the descriptor any more.
        closeDescriptor(wakeDescriptor)
    }

    func run<T: Sendable>(_ body: @escaping @Sendable (PGConnection) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let job = Job(
                run: { connection in
                    do {
                        continuation.resume(returning: try body(connection))
                    } catch {
                        continuation.resume(throwing: error)
                    }
                },
                fail: { error in continuation.resume(throwing: error) }
            )
            let refusal: StokerError? = state.withLock { state in
                if state.closing || state.exited {
                    return state.failure ?? Self.closedError
                }
                state.jobs.append(job)
                return nil
            }
            if let refusal {
                continuation.resume(throwing: refusal)
            } else {
                wake()
            }
        }
    }

    func requestClose() {
        state.withLock { $0.closing = true }
        wake()
    }

    func close() async {
        requestClose()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let done = state.withLock { state -> Bool in
                if state.exited { return true }
                state.exitWaiters.append(continuation)
                return false
            }
            if done { continuation.resume() }
        }
    }

    private static let closedError = StokerError(.sessionClosed, "The session was closed; open a new one.")

    private func wake() {
        var one: UInt64 = 1
        _ = write(wakeDescriptor, &one, MemoryLayout<UInt64>.size)
    }

    // MARK: - The session thread

    fileprivate func threadMain(_ configuration: ConnectionConfiguration, ready: CheckedContinuation<Void, any Error>) {
        let failure = serve(configuration, ready: ready)
        // The connection is closed (PQfinish ran when `serve` returned); now let everyone know.
        let (leftover, waiters) = state.withLock { state in
            state.exited = true
            state.closing = true
            state.failure = failure
            defer {
                state.jobs.removeAll()
                state.exitWaiters.removeAll()
            }
            return (state.jobs, state.exitWaiters)
        }
        for job in leftover { job.fail(failure ?? Self.closedError) }
        sink.finish()
        for waiter in waiters { waiter.resume() }
    }

    /// Connects, then serves jobs and notifications until closed or broken. Returns the failure that ended it.
    private func serve(_ configuration: ConnectionConfiguration, ready: CheckedContinuation<Void, any Error>)
        -> StokerError?
    {
        let connection: PGConnection
        do {
            connection = try PGConnection(configuration)
        } catch {
            ready.resume(throwing: error)
            return error
        }
        ready.resume()
        while true {
            let (jobs, closing) = state.withLock { state in
                defer { state.jobs.removeAll() }
                return (state.jobs, state.closing)
            }
            for job in jobs {
                job.run(connection)
                forward(connection.takeNotifications())
            }
            if !connection.isHealthy {
                return StokerError(
                    .connectionLost,
                    "The connection to PostgreSQL was lost.",
                    connection: connection.redactedDescription
                )
            }
            if closing { return nil }
            do {
                var calls = 0
                _ = try connection.waitForNotifications(until: nil, wakeDescriptor: wakeDescriptor, pollCount: &calls)
                polls.add(calls, ordering: .relaxed)
                forward(connection.takeNotifications())
            } catch {
                return error
            }
        }
    }

    private func forward(_ received: [PostgresNotification]) {
        for notification in received { sink.yield(notification) }
    }
}

/// Starts a detached thread running `body`. Used for the threads that own a `PGconn`.
func startThread(_ body: @escaping @Sendable () -> Void) throws(StokerError) {
    final class Body: Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }
    let context = Unmanaged.passRetained(Body(body)).toOpaque()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    defer { pthread_attr_destroy(&attributes) }
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    var thread = pthread_t()
    let result = pthread_create(
        &thread,
        &attributes,
        { context in
            guard let context else { return nil }
            let body = Unmanaged<Body>.fromOpaque(context).takeRetainedValue()
            body.run()
            return nil
        },
        context
    )
    guard result == 0 else {
        Unmanaged<Body>.fromOpaque(context).release()
        throw StokerError(.connectionFailed, "Could not start the session thread (pthread_create returned \(result)).")
    }
}

/// `close(2)`, reachable from types that have a `close()` of their own.
func closeDescriptor(_ descriptor: Int32) {
    _ = close(descriptor)
}
