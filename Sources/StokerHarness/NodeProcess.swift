import CStokerSystem
import Glibc
import Synchronization

/// The current instant of `CLOCK_MONOTONIC`, in seconds: the clock of `stoker node`'s `at` and `ended_at`, shared
/// by every process on the host. (Swift's `ContinuousClock` is `CLOCK_BOOTTIME` on Linux.)
public func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1_000_000_000
}

/// Why a ``NodeProcess`` could not be started, or a wait on one failed.
public struct NodeProcessError: Error, CustomStringConvertible, Sendable {
    /// What went wrong.
    public enum Reason: Sendable, Equatable {
        /// The process could not be started (program not found, not executable, fork failed, …).
        case startFailed
        /// The wait's timeout passed first.
        case timedOut
        /// The process ended (with this status: exit code, or 128 + signal) and printed no matching line.
        case exited(status: Int32)
    }

    /// What went wrong.
    public let reason: Reason
    /// The whole story, with the tail of the process's stdout and stderr where it helps.
    public let message: String

    /// `NodeProcessError: <message>`.
    public var description: String { "NodeProcessError: \(message)" }
}

/// A long-running child process whose stdout is read line by line while it runs — for tests and benchmarks that
/// drive `stoker node` processes and judge them by what they print.
///
/// The child starts with stdin on /dev/null, stdout and stderr into pipes, every other descriptor closed, an empty
/// signal mask, default signal dispositions, and `environment` (when given) as its whole environment — like
/// ``runProcess(_:environment:timeout:)``. It gets `SIGKILL` as its parent-death signal: it dies with this process,
/// however this process ends (also by SIGKILL), so nothing is left behind.
///
/// A dedicated thread (not the cooperative pool) forks the child, reads both pipes, records every stdout line with
/// the instant it arrived, and reaps the child. It is the forking thread on purpose: Linux sends the parent-death
/// signal when the thread that forked exits, and this one lives until it has reaped the child. Waits
/// (``waitForLine(from:timeout:where:)``, ``waitForExit(timeout:)``) are resumed by that thread as lines and the exit
/// arrive; nothing polls.
///
/// Dropping the last reference sends SIGKILL; the thread then reaps the child. ``close()`` does the same and waits.
public final class NodeProcess: Sendable {
    /// One line the process wrote to stdout, without its newline.
    public struct Line: Sendable, Hashable {
        /// Its position among the process's stdout lines, from 0.
        public let index: Int
        /// The text (lossy UTF-8), without the trailing `\n`.
        public let text: String
        /// When this process read it: seconds of `CLOCK_MONOTONIC` (see ``monotonicSeconds()``).
        public let receivedAt: Double
    }

    /// The child's process id.
    public let pid: Int32
    /// The command line it was started with.
    public let arguments: [String]
    /// The state shared with the reader thread (which keeps it alive until the child is reaped).
    private let core: Core

    private init(pid: Int32, arguments: [String], core: Core) {
        self.pid = pid
        self.arguments = arguments
        self.core = core
    }

    deinit {
        core.signal(SIGKILL)
    }

    /// Starts `arguments` (`arguments[0]` a path, or a name looked up in our `$PATH`) and returns once it runs
    /// (after its `execve` succeeded).
    ///
    /// - Parameters:
    ///   - arguments: the command line: the program (a path, or a name looked up in our `$PATH`), then its
    ///     arguments.
    ///   - environment: the child's whole environment; `nil`: ours.
    /// - Throws: ``NodeProcessError`` with ``NodeProcessError/Reason/startFailed`` when it cannot be started.
    public static func start(_ arguments: [String], environment: [String: String]? = nil) async throws -> NodeProcess {
        try await start(arguments, environment: environment, parentDeathSignal: SIGKILL)
    }

    /// ``start(_:environment:)`` with a choice of parent-death signal (0: none — only for the test proving that
    /// the default matters).
    static func start(
        _ arguments: [String], environment: [String: String]?, parentDeathSignal: Int32
    ) async throws -> NodeProcess {
        let program = try resolve(arguments.first ?? "")
        let variables = environment.map { $0.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" } }
        let core = Core(command: arguments.joined(separator: " "))
        let pid = try await withCheckedThrowingContinuation { (started: CheckedContinuation<pid_t, any Error>) in
            do {
                try startDetachedThread {
                    core.run(
                        program: program, arguments: arguments, environment: variables,
                        parentDeathSignal: parentDeathSignal, started: started)
                }
            } catch {
                started.resume(throwing: NodeProcessError(reason: .startFailed, message: "\(error)"))
            }
        }
        return NodeProcess(pid: pid, arguments: arguments, core: core)
    }

    /// `program` itself when it contains a `/`, else the first executable of that name in our `$PATH`.
    private static func resolve(_ program: String) throws -> String {
        guard !program.isEmpty else {
            throw NodeProcessError(reason: .startFailed, message: "cannot start an empty command line")
        }
        if program.contains("/") { return program }
        let path = Files.environment("PATH") ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") where Files.isExecutable("\(directory)/\(program)") {
            return "\(directory)/\(program)"
        }
        throw NodeProcessError(reason: .startFailed, message: "cannot start `\(program)`: not found in $PATH (\(path))")
    }

    // MARK: - Snapshots

    /// Every complete stdout line so far (and, once the process has ended, an unterminated last one).
    public var lines: [Line] { core.state.withLock { $0.lines } }

    /// Everything it wrote to stderr so far (lossy UTF-8).
    public var standardError: String { core.state.withLock { String(decoding: $0.standardError, as: UTF8.self) } }

    /// Its exit status once reaped — the exit code, or 128 + the signal that killed it — else nil.
    public var exitStatus: Int32? { core.state.withLock { $0.status } }

    // MARK: - Signals

    /// Sends `signo` (e.g. `SIGTERM`, `SIGSTOP`, `SIGCONT`) to the process, unless it has already been reaped
    /// (so a reused pid is never hit). Returns whether the signal was sent.
    @discardableResult
    public func signal(_ signo: Int32) -> Bool {
        core.signal(signo)
    }

    /// Sends `SIGKILL` (see ``signal(_:)``).
    @discardableResult
    public func kill() -> Bool {
        core.signal(SIGKILL)
    }

    /// Kills the process (SIGKILL, unless it has already exited) and waits until it is reaped and its output read.
    /// Returns its exit status.
    @discardableResult
    public func close() async -> Int32 {
        core.signal(SIGKILL)
        return await core.finished()
    }

    // MARK: - Waiting

    /// Waits for the first stdout line at index `from` or later for which `predicate` holds — already printed or
    /// yet to come — and returns it.
    ///
    /// `predicate` runs on the reader thread or the caller's, never under a lock; it may read this process.
    ///
    /// - Throws: ``NodeProcessError`` — ``NodeProcessError/Reason/timedOut`` after `timeout`, or
    ///   ``NodeProcessError/Reason/exited(status:)`` when the process ends first — whose message holds the tail of
    ///   its stdout and stderr; `CancellationError` when the task is cancelled.
    public func waitForLine(
        from index: Int = 0, timeout: Duration, where predicate: @escaping @Sendable (Line) -> Bool
    ) async throws -> Line {
        try await core.wait(.line(from: max(0, index)), timeout: timeout) { id, continuation in
            core.registerLineWaiter(id, from: max(0, index), predicate: predicate, continuation: continuation)
        }
    }

    /// The first line, among `processes`, that `predicate` accepts — given the process's index in `processes` and
    /// the line — from line `marks[i]` of process `i` on (nil: from each one's first line): the index of the process
    /// that printed it, and the line. A process that ends, or times out, without one does not end the wait for the
    /// others.
    ///
    /// - Throws: when none printed one, ``NodeProcessError`` with the last failure's reason and every failure's
    ///   message, one per line; `CancellationError` when the task is cancelled.
    public static func firstLine(
        among processes: [NodeProcess], from marks: [Int]? = nil, timeout: Duration,
        where predicate: @escaping @Sendable (_ index: Int, _ line: Line) -> Bool
    ) async throws -> (index: Int, line: Line) {
        try await withThrowingTaskGroup(of: (Int, Line).self) { group in
            for (index, process) in processes.enumerated() {
                let mark = marks.map { index < $0.count ? $0[index] : 0 } ?? 0
                group.addTask {
                    (index, try await process.waitForLine(from: mark, timeout: timeout) { predicate(index, $0) })
                }
            }
            var failures: [any Error] = []
            while let next = await group.nextResult() {
                switch next {
                case .success(let found):
                    group.cancelAll()
                    return found
                case .failure(let error):
                    failures.append(error)
                }
            }
            if Task.isCancelled || failures.contains(where: { $0 is CancellationError }) { throw CancellationError() }
            let reason = failures.compactMap { ($0 as? NodeProcessError)?.reason }.last ?? .timedOut
            let message = failures.isEmpty ? "no process to wait on" : failures.map { "\($0)" }.joined(separator: "\n")
            throw NodeProcessError(reason: reason, message: message)
        }
    }

    /// Waits until the process has exited and been reaped; returns its status (exit code, or 128 + signal).
    ///
    /// - Throws: ``NodeProcessError`` with ``NodeProcessError/Reason/timedOut`` (and the output's tail) after
    ///   `timeout` — the process keeps running; `CancellationError` when the task is cancelled.
    public func waitForExit(timeout: Duration) async throws -> Int32 {
        try await core.wait(.exit, timeout: timeout) { id, continuation in
            core.registerExitWaiter(id, continuation: continuation)
        }
    }
}

// MARK: - Shared state and the reader thread

extension NodeProcess {
    /// What a waiter waits for.
    fileprivate enum Purpose {
        case line(from: Int)
        case exit
    }

    /// One wait, by id: reserved before its continuation exists (so a timeout or cancellation that comes first is
    /// remembered), then waiting.
    fileprivate enum Slot {
        case reserved(Purpose)
        case expired(any Error)
        case line(from: Int, predicate: @Sendable (Line) -> Bool, continuation: CheckedContinuation<Line, any Error>)
        case exit(CheckedContinuation<Int32, any Error>)
    }

    fileprivate struct State {
        var pid: pid_t = 0
        var status: Int32?
        var lines: [Line] = []
        var standardError: [UInt8] = []
        /// Set once the reader thread is done: the child reaped and its pipes closed (no more lines will come).
        var finished = false
        var nextID = 0
        var slots: [Int: Slot] = [:]
        var finishWaiters: [CheckedContinuation<Int32, Never>] = []
    }

    /// The state the reader thread and every handle share.
    fileprivate final class Core: Sendable {
        let command: String
        let state = Mutex(State())

        init(command: String) {
            self.command = command
        }

        // MARK: Signals

        @discardableResult
        func signal(_ signo: Int32) -> Bool {
            // Under the lock the reader thread reaps with: the pid is still ours while `status` is nil.
            state.withLock { state in
                guard state.pid > 0, state.status == nil else { return false }
                return Glibc.kill(state.pid, signo) == 0
            }
        }

        // MARK: Waits

        /// Reserves a slot, arms the timeout, and suspends until `register`'s continuation is resumed.
        func wait<T: Sendable>(
            _ purpose: Purpose, timeout: Duration,
            register: (Int, CheckedContinuation<T, any Error>) -> Void
        ) async throws -> T {
            let id = state.withLock { state in
                state.nextID += 1
                state.slots[state.nextID] = .reserved(purpose)
                return state.nextID
            }
            let timer = Task { [self] in
                do { try await Task.sleep(for: timeout) } catch { return }
                expire(id, error: nil, timeout: timeout)
            }
            defer { timer.cancel() }
            return try await withTaskCancellationHandler {
                try await withCheckedThrowingContinuation { register(id, $0) }
            } onCancel: {
                expire(id, error: CancellationError(), timeout: timeout)
            }
        }

        /// Ends wait `id` with `error` (nil: a timeout error built here), or remembers it for the registration to come.
        private func expire(_ id: Int, error: (any Error)?, timeout: Duration) {
            enum Outcome {
                case none
                case line(CheckedContinuation<Line, any Error>, any Error)
                case exit(CheckedContinuation<Int32, any Error>, any Error)
            }
            let outcome: Outcome = state.withLock { state in
                guard let slot = state.slots[id] else { return .none }
                func failure(_ purpose: Purpose) -> any Error {
                    error ?? timedOut(purpose, after: timeout, state)
                }
                switch slot {
                case .expired:
                    return .none
                case .reserved(let purpose):
                    state.slots[id] = .expired(failure(purpose))
                    return .none
                case .line(let from, _, let continuation):
                    state.slots[id] = nil
                    return .line(continuation, failure(.line(from: from)))
                case .exit(let continuation):
                    state.slots[id] = nil
                    return .exit(continuation, failure(.exit))
                }
            }
            switch outcome {
            case .none: break
            case .line(let continuation, let error): continuation.resume(throwing: error)
            case .exit(let continuation, let error): continuation.resume(throwing: error)
            }
        }

        /// Scans the lines printed so far (outside the lock) and either answers at once or leaves the waiter for the
        /// reader thread, which evaluates every later line.
        func registerLineWaiter(
            _ id: Int, from start: Int, predicate: @escaping @Sendable (Line) -> Bool,
            continuation: CheckedContinuation<Line, any Error>
        ) {
            enum Step {
                case resume(Result<Line, any Error>)
                case scan(ArraySlice<Line>)
                case registered
            }
            var scanned = start
            while true {
                let step: Step = state.withLock { state in
                    if case .expired(let error)? = state.slots[id] {
                        state.slots[id] = nil
                        return .resume(.failure(error))
                    }
                    if scanned < state.lines.count { return .scan(state.lines[scanned...]) }
                    if state.finished {
                        state.slots[id] = nil
                        return .resume(.failure(exitedFirst(from: start, state)))
                    }
                    // Every line from `scanned` on is new to this waiter: the reader thread judges them.
                    state.slots[id] = .line(from: scanned, predicate: predicate, continuation: continuation)
                    return .registered
                }
                switch step {
                case .registered:
                    return
                case .resume(let result):
                    continuation.resume(with: result)
                    return
                case .scan(let batch):
                    if let hit = batch.first(where: predicate) {
                        state.withLock { _ = $0.slots.removeValue(forKey: id) }
                        continuation.resume(returning: hit)
                        return
                    }
                    scanned = batch.endIndex
                }
            }
        }

        func registerExitWaiter(_ id: Int, continuation: CheckedContinuation<Int32, any Error>) {
            let result: Result<Int32, any Error>? = state.withLock { state in
                if case .expired(let error)? = state.slots[id] {
                    state.slots[id] = nil
                    return .failure(error)
                }
                if let status = state.status {
                    state.slots[id] = nil
                    return .success(status)
                }
                state.slots[id] = .exit(continuation)
                return nil
            }
            if let result { continuation.resume(with: result) }
        }

        /// Waits until the reader thread is done; returns the exit status.
        func finished() async -> Int32 {
            await withCheckedContinuation { continuation in
                let status: Int32? = state.withLock { state in
                    if state.finished, let status = state.status { return status }
                    state.finishWaiters.append(continuation)
                    return nil
                }
                if let status { continuation.resume(returning: status) }
            }
        }

        // MARK: Messages (built under the lock, from the state)

        private func timedOut(_ purpose: Purpose, after timeout: Duration, _ state: State) -> NodeProcessError {
            let what: String
            switch purpose {
            case .line(let from): what = "printed no matching line (from line \(from) on)"
            case .exit: what = "did not exit"
            }
            let running = state.status.map { "it exited with status \($0)" } ?? "it is still running"
            return NodeProcessError(
                reason: .timedOut,
                message: "`\(command)` (pid \(state.pid)) \(what) within \(timeout); \(running).\(tails(state))")
        }

        private func exitedFirst(from start: Int, _ state: State) -> NodeProcessError {
            let status = state.status ?? -1
            return NodeProcessError(
                reason: .exited(status: status),
                message: "`\(command)` (pid \(state.pid)) ended with status \(status) before printing a matching "
                    + "line (from line \(start) on).\(tails(state))")
        }

        private func tails(_ state: State) -> String {
            let stdout = state.lines.suffix(20).map(\.text).joined(separator: "\n")
            let stderr = Files.tail(String(decoding: state.standardError, as: UTF8.self), limit: 2_000)
            return "\nlast stdout lines (\(state.lines.count) in all):\n\(stdout)\nstderr tail:\n\(stderr)"
        }

        // MARK: The reader thread

        /// The body of the dedicated thread: forks the child (so the parent-death signal is tied to this thread),
        /// reports the pid to `started`, then reads, reaps and finishes.
        func run(
            program: String, arguments: [String], environment: [String]?, parentDeathSignal: Int32,
            started: CheckedContinuation<pid_t, any Error>
        ) {
            let pipes: (output: [Int32], error: [Int32])
            let pid: pid_t
            do {
                pipes = try makePipes()
                do {
                    pid = try spawn(
                        program: program, arguments: arguments, environment: environment,
                        standardOutput: pipes.output[1], standardError: pipes.error[1], deathSignal: parentDeathSignal)
                } catch {
                    for descriptor in pipes.output + pipes.error { Glibc.close(descriptor) }
                    throw error
                }
            } catch {
                started.resume(throwing: error)
                return
            }
            Glibc.close(pipes.output[1])
            Glibc.close(pipes.error[1])
            // Readable once the child has exited; without it (old kernels) exits are noticed by a 20 ms poll timeout.
            let exitDescriptor = stoker_pidfd_open(pid)
            state.withLock { $0.pid = pid }
            started.resume(returning: pid)
            readUntilDone(pid: pid, output: pipes.output[0], error: pipes.error[0], exitDescriptor: exitDescriptor)
        }

        private func makePipes() throws -> (output: [Int32], error: [Int32]) {
            var output: [Int32] = [-1, -1]
            var error: [Int32] = [-1, -1]
            guard stoker_pipe_cloexec(&output) == 0 else {
                throw NodeProcessError(
                    reason: .startFailed, message: "pipe2 failed: \(String(cString: strerror(errno)))")
            }
            guard stoker_pipe_cloexec(&error) == 0 else {
                let reason = String(cString: strerror(errno))
                for descriptor in output { Glibc.close(descriptor) }
                throw NodeProcessError(reason: .startFailed, message: "pipe2 failed: \(reason)")
            }
            return (output, error)
        }

        private func spawn(
            program: String, arguments: [String], environment: [String]?, standardOutput: Int32,
            standardError: Int32, deathSignal: Int32
        ) throws -> pid_t {
            let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
            defer { for argument in argv { free(argument) } }
            let envp: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup($0) } + [nil] }
            defer { for variable in envp ?? [] { free(variable) } }
            var pid = pid_t()
            var failedStep: UnsafePointer<CChar>?
            let rc = argv.withUnsafeBufferPointer { argvBuffer in
                func spawn(_ variables: UnsafePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
                    stoker_spawn_dying_with_thread(
                        program, argvBuffer.baseAddress, variables, standardOutput, standardError, deathSignal, &pid,
                        &failedStep)
                }
                guard let envp else { return spawn(stoker_environ()) }
                return envp.withUnsafeBufferPointer { spawn($0.baseAddress) }
            }
            guard rc == 0 else {
                let step = failedStep.map { String(cString: $0) } ?? "fork"
                throw NodeProcessError(
                    reason: .startFailed,
                    message: "cannot start `\(command)`: \(step) failed: \(String(cString: strerror(rc)))")
            }
            return pid
        }

        /// Reads both pipes until the child is reaped and they are closed (or 2 s after the exit, when a grandchild
        /// still holds them), answering waiters as lines and the exit arrive.
        private func readUntilDone(pid: pid_t, output: Int32, error: Int32, exitDescriptor: Int32) {
            var outputOpen = true
            var errorOpen = true
            var exitDescriptor = exitDescriptor
            var partial: [UInt8] = []
            var reapedAt: ContinuousClock.Instant?
            var chunk = [UInt8](repeating: 0, count: 65_536)
            let clock = ContinuousClock()

            while true {
                var descriptors: [pollfd] = []
                if outputOpen { descriptors.append(pollfd(fd: output, events: Int16(POLLIN), revents: 0)) }
                if errorOpen { descriptors.append(pollfd(fd: error, events: Int16(POLLIN), revents: 0)) }
                if exitDescriptor >= 0 {
                    descriptors.append(pollfd(fd: exitDescriptor, events: Int16(POLLIN), revents: 0))
                }
                let timeout: Int32
                if let reapedAt {
                    let left = Duration.seconds(2) - (clock.now - reapedAt)
                    timeout = Int32(max(0, (left / .milliseconds(1)).rounded(.up)))
                } else {
                    timeout = exitDescriptor >= 0 ? -1 : 20
                }
                let ready = descriptors.isEmpty ? 0 : poll(&descriptors, nfds_t(descriptors.count), timeout)
                if ready < 0 && errno != EINTR {
                    // Cannot wait for events any more (never seen): end the child, reap it, and stop reading.
                    signal(SIGKILL)
                    var info = siginfo_t()
                    while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR {}
                    _ = reap(pid)
                    for descriptor in [outputOpen ? output : -1, errorOpen ? error : -1, exitDescriptor]
                    where descriptor >= 0 {
                        Glibc.close(descriptor)
                    }
                    finish(partial: partial, at: monotonicSeconds())
                    return
                }
                let now = monotonicSeconds()
                for descriptor in descriptors where descriptor.revents != 0 {
                    guard descriptor.fd == output || descriptor.fd == error else { continue }
                    let count = chunk.withUnsafeMutableBytes { Glibc.read(descriptor.fd, $0.baseAddress, $0.count) }
                    if count > 0 {
                        if descriptor.fd == output {
                            received(chunk[0..<count], at: now, partial: &partial)
                        } else {
                            state.withLock { $0.standardError.append(contentsOf: chunk[0..<count]) }
                        }
                    } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                        Glibc.close(descriptor.fd)
                        if descriptor.fd == output { outputOpen = false } else { errorOpen = false }
                    }
                }
                if reapedAt == nil, reap(pid) {
                    reapedAt = clock.now
                    if exitDescriptor >= 0 {
                        Glibc.close(exitDescriptor)
                        exitDescriptor = -1
                    }
                }
                if let reapedAt, (!outputOpen && !errorOpen) || clock.now - reapedAt >= .seconds(2) {
                    if outputOpen { Glibc.close(output) }
                    if errorOpen { Glibc.close(error) }
                    finish(partial: partial, at: monotonicSeconds())
                    return
                }
            }
        }

        /// `waitpid(WNOHANG)` under the lock (so ``signal(_:)`` never targets a reaped pid); resumes the exit
        /// waiters. Returns whether the child has been reaped.
        private func reap(_ pid: pid_t) -> Bool {
            let reaped: (status: Int32, waiters: [CheckedContinuation<Int32, any Error>])? = state.withLock { state in
                var raw: Int32 = 0
                let reaped = waitpid(pid, &raw, WNOHANG)
                if reaped == pid {
                    state.status = exitCode(fromWaitStatus: raw)
                } else if reaped < 0 && errno == ECHILD {
                    state.status = -1  // Reaped behind our back (SIGCHLD set to SIG_IGN): the status is lost.
                } else {
                    return nil
                }
                var waiters: [CheckedContinuation<Int32, any Error>] = []
                for (id, slot) in state.slots {
                    if case .exit(let continuation) = slot {
                        waiters.append(continuation)
                        state.slots[id] = nil
                    }
                }
                return (state.status ?? -1, waiters)
            }
            guard let reaped else { return false }
            for continuation in reaped.waiters { continuation.resume(returning: reaped.status) }
            return true
        }

        /// Splits a chunk of stdout into lines (keeping an unterminated tail in `partial`), records them, and answers
        /// the waiters whose predicate one of them satisfies (predicates run here, outside the lock).
        private func received(_ bytes: ArraySlice<UInt8>, at instant: Double, partial: inout [UInt8]) {
            var texts: [String] = []
            var start = bytes.startIndex
            while let newline = bytes[start...].firstIndex(of: UInt8(ascii: "\n")) {
                partial.append(contentsOf: bytes[start..<newline])
                texts.append(String(decoding: partial, as: UTF8.self))
                partial.removeAll(keepingCapacity: true)
                start = newline + 1
            }
            partial.append(contentsOf: bytes[start...])
            if !texts.isEmpty { record(texts, at: instant) }
        }

        private func record(_ texts: [String], at instant: Double) {
            typealias Candidate = (id: Int, from: Int, predicate: @Sendable (Line) -> Bool)
            let (batch, candidates): ([Line], [Candidate]) = state.withLock { state in
                let first = state.lines.count
                let batch = texts.enumerated().map {
                    Line(index: first + $0.offset, text: $0.element, receivedAt: instant)
                }
                state.lines.append(contentsOf: batch)
                let candidates = state.slots.compactMap { id, slot -> Candidate? in
                    guard case .line(let from, let predicate, _) = slot else { return nil }
                    return (id, from, predicate)
                }
                return (batch, candidates)
            }
            guard !candidates.isEmpty else { return }
            var hits: [(id: Int, line: Line)] = []
            for candidate in candidates {
                if let hit = batch.first(where: { $0.index >= candidate.from && candidate.predicate($0) }) {
                    hits.append((candidate.id, hit))
                }
            }
            guard !hits.isEmpty else { return }
            let resumed: [(CheckedContinuation<Line, any Error>, Line)] = state.withLock { state in
                hits.compactMap { hit in
                    guard case .line(_, _, let continuation)? = state.slots[hit.id] else { return nil }
                    state.slots[hit.id] = nil
                    return (continuation, hit.line)
                }
            }
            for (continuation, line) in resumed { continuation.resume(returning: line) }
        }

        /// Records the unterminated last line, marks the process finished, and fails the line waiters still waiting.
        private func finish(partial: [UInt8], at instant: Double) {
            if !partial.isEmpty { record([String(decoding: partial, as: UTF8.self)], at: instant) }
            typealias Failed = (continuation: CheckedContinuation<Line, any Error>, error: any Error)
            let (failed, finishers, status) = state.withLock {
                state -> ([Failed], [CheckedContinuation<Int32, Never>], Int32) in
                state.finished = true
                var failed: [Failed] = []
                for (id, slot) in state.slots {
                    if case .line(let from, _, let continuation) = slot {
                        failed.append((continuation, exitedFirst(from: from, state)))
                        state.slots[id] = nil
                    }
                }
                let finishers = state.finishWaiters
                state.finishWaiters = []
                return (failed, finishers, state.status ?? -1)
            }
            for (continuation, error) in failed { continuation.resume(throwing: error) }
            for continuation in finishers { continuation.resume(returning: status) }
        }
    }
}
