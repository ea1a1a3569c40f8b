import CStokerLibPQ
import CStokerSystem
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
                try startThread(.listener) { core.threadMain(configuration, ready: ready) }
            } catch {
                ready.resume(throwing: error)
            }
        }
        return PostgresSession(core: core)
    }

    /// A short session (migrate, verify, grant, whereis): libpq's `connect_timeout` defaults to 10 s here (unless the
    /// string or `PGCONNECT_TIMEOUT` sets it), so a host that drops packets fails the call instead of hanging it.
    static func connect(_ conninfo: String) async throws -> PostgresSession {
        try await connect(
            ConnectionConfiguration(conninfo).addingDefaults([("connect_timeout", "10", "PGCONNECT_TIMEOUT")]))
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
            // Not close(): a statement of this session may be blocked for good (e.g. on a lock another session of
            // the failed body holds), and waiting for it would turn the failure into a hang.
            await session.abort()
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
    ///
    /// Cancelling the calling task withdraws the job if it has not started; if it has, the session is cut (a hard
    /// stop, as ``abort()``) and the job fails with ``StokerError/Code/connectionLost``.
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

    /// Closes the session and waits until the connection is closed and the thread has exited. Queued statements
    /// run first; a statement that never ends (one waiting for a lock) keeps it waiting: see ``abort()``.
    func close() async { await core.close() }

    /// Cuts the connection at once, as a crash would: the statement in flight and the queued ones fail with
    /// ``StokerError/Code/connectionLost``. Waits until the thread has exited. The server ends an idle session at
    /// once; a backend still running a statement (waiting for a lock, say) notices only when the statement ends or
    /// at its next `client_connection_check_interval`, which a Stoker node sets.
    func abort() async { await core.abort() }
}

/// The state a session's thread and its callers share.
private final class SessionCore: Sendable {
    private struct Job: Sendable {
        let id: UInt64
        let run: @Sendable (PGConnection) -> Void
        let fail: @Sendable (any Error) -> Void
    }

    private struct State {
        var jobs: [Job] = []
        var closing = false
        var exited = false
        var failure: StokerError?
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
        /// The connection's socket while it is open, for ``abort()``; cleared before the connection is closed, so
        /// `shutdown(2)` can never reach a descriptor number the system has handed out again.
        var socket: Int32?
        var nextJobID: UInt64 = 0
        /// Jobs whose `run` has begun but which are not queued yet, and those of them cancelled meanwhile.
        var announced: Set<UInt64> = []
        var cancelledEarly: Set<UInt64> = []
        /// The job the thread is running.
        var running: UInt64?
    }

    private let state = Mutex(State())
    /// Written to when work is queued or the session should close. Closed only with the core: once the thread has
    /// exited (it holds the core) and no session refers to it, so nobody can write to it any more.
    private let wakeSignal: WakeSignal
    private let sink: AsyncStream<PostgresNotification>.Continuation
    let notifications: AsyncStream<PostgresNotification>
    /// `poll(2)` calls made by the session thread while idle; lets tests prove waiting does not spin.
    let polls = Atomic<Int>(0)
    let connectionDescription: String

    init(configuration: ConnectionConfiguration) throws(StokerError) {
        wakeSignal = try WakeSignal()
        (notifications, sink) = AsyncStream.makeStream(of: PostgresNotification.self, bufferingPolicy: .unbounded)
        connectionDescription = configuration.redactedDescription
    }

    func run<T: Sendable>(_ body: @escaping @Sendable (PGConnection) throws -> T) async throws -> T {
        let id = state.withLock { state in
            state.nextJobID += 1
            state.announced.insert(state.nextJobID)
            return state.nextJobID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
                let job = Job(
                    id: id,
                    run: { connection in
                        do {
                            continuation.resume(returning: try body(connection))
                        } catch {
                            continuation.resume(throwing: error)
                        }
                    },
                    fail: { error in continuation.resume(throwing: error) }
                )
                let refusal: (any Error)? = state.withLock { state in
                    state.announced.remove(id)
                    if state.cancelledEarly.remove(id) != nil { return CancellationError() }
                    if state.closing || state.exited { return state.failure ?? Self.closedError }
                    state.jobs.append(job)
                    return nil
                }
                if let refusal {
                    continuation.resume(throwing: refusal)
                } else {
                    wake()
                }
            }
        } onCancel: {
            cancel(id)
        }
    }

    /// Cancellation is a hard stop: a queued job is withdrawn (it fails with `CancellationError`); a job already
    /// running cannot be taken back from libpq, so the session is cut as by ``abort()`` and it fails with
    /// `.connectionLost` (the server ends the statement as described at ``PostgresSession/abort()``).
    private func cancel(_ id: UInt64) {
        let withdrawn: Job? = state.withLock { state in
            if state.announced.contains(id) {
                state.cancelledEarly.insert(id)
                return nil
            }
            if let index = state.jobs.firstIndex(where: { $0.id == id }) { return state.jobs.remove(at: index) }
            if state.running == id {
                state.closing = true
                if let socket = state.socket { _ = shutdown(socket, Int32(SHUT_RDWR)) }
            }
            return nil
        }
        withdrawn?.fail(CancellationError())
        wake()
    }

    func requestClose() {
        state.withLock { $0.closing = true }
        wake()
    }

    func close() async {
        requestClose()
        await exited()
    }

    func abort() async {
        state.withLock { state in
            state.closing = true
            // shutdown, not close: the descriptor stays libpq's; the blocked call sees the connection end.
            if let socket = state.socket { _ = shutdown(socket, Int32(SHUT_RDWR)) }
        }
        wake()
        await exited()
    }

    private func exited() async {
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
        wakeSignal.signal()
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
        // A duplicate for cancel/abort's shutdown(2): libpq closes its own descriptor when it sees the EOF, and the
        // number could then be handed to anything else this process opens.
        let socket = dup(connection.socket)
        state.withLock { $0.socket = socket >= 0 ? socket : nil }
        let failure = serve(connection)
        state.withLock { $0.socket = nil }
        if socket >= 0 { closeDescriptor(socket) }
        withExtendedLifetime(connection) {}  // PQfinish (deinit) only after the socket was cleared
        return failure
    }

    private func serve(_ connection: PGConnection) -> StokerError? {
        while true {
            // One job at a time, marked as running, so that cancellation knows whether it can still withdraw it.
            let (job, closing) = state.withLock { state -> (Job?, Bool) in
                state.running = nil
                guard !state.jobs.isEmpty else { return (nil, state.closing) }
                let job = state.jobs.removeFirst()
                state.running = job.id
                return (job, state.closing)
            }
            if let job {
                job.run(connection)
                forward(connection.takeNotifications())
            }
            if !connection.isHealthy {
                return connection.connectionLost()
            }
            if job != nil { continue }
            if closing { return nil }
            do {
                var calls = 0
                _ = try connection.waitForNotifications(
                    until: nil, wakeDescriptor: wakeSignal.descriptor, pollCount: &calls)
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

/// The threads Stoker starts, by the name each carries (what `top -H`, `ps -L`, gdb and perf show).
enum StokerThread: String, CaseIterable, Sendable {
    /// A node's session thread: both of its sessions.
    case session = "stoker-session"
    /// A node's lease watchdog.
    case watchdog = "stoker-watchdog"
    /// A ``PostgresSession`` (the cluster view's listening session).
    case listener = "stoker-listen"
}

/// Starts a detached thread running `body`, named after `kind`. Used for the threads that own or guard a `PGconn`.
func startThread(_ kind: StokerThread, _ body: @escaping @Sendable () -> Void) throws(StokerError) {
    final class Body: Sendable {
        let kind: StokerThread
        let run: @Sendable () -> Void
        init(_ kind: StokerThread, _ run: @escaping @Sendable () -> Void) {
            self.kind = kind
            self.run = run
        }
    }
    let context = Unmanaged.passRetained(Body(kind, body)).toOpaque()
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
            // Best effort: a name only shows in tools.
            _ = stoker_thread_set_name(body.kind.rawValue)
            body.run()
            return nil
        },
        context
    )
    guard result == 0 else {
        Unmanaged<Body>.fromOpaque(context).release()
        throw StokerError(
            .connectionFailed, "Could not start the \(kind.rawValue) thread (pthread_create returned \(result)).")
    }
}

/// `close(2)`, reachable from types that have a `close()` of their own.
func closeDescriptor(_ descriptor: Int32) {
    _ = close(descriptor)
}
