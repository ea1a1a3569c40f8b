import CStokerSystem
import Glibc
import Synchronization

/// How a process started by ``runProcess(_:environment:timeout:)`` ended, and what it printed.
public struct ProcessResult: Sendable {
    /// The exit code, or 128 + the signal number when a signal killed it (like a shell's `$?`).
    public let status: Int32
    /// Everything it wrote to stdout (lossy UTF-8).
    public let standardOutput: String
    /// Everything it wrote to stderr (lossy UTF-8).
    public let standardError: String

    /// Creates a result (for tests that fake one).
    public init(status: Int32, standardOutput: String, standardError: String) {
        self.status = status
        self.standardOutput = standardOutput
        self.standardError = standardError
    }
}

/// Runs `arguments` (`arguments[0]` a path, or a name looked up in `$PATH`) to completion and returns its exit
/// status and output. `Foundation.Process` is not used: its `waitUntilExit()` and `readDataToEndOfFile()` can hang
/// forever once a detached grandchild (a cluster's supervisor) inherits its pipes (swift-corelibs-foundation#4795).
///
/// The child is started with posix_spawn: stdin on /dev/null, stdout and stderr into pipes, every other descriptor
/// closed, an empty signal mask and default signal dispositions, and `environment` (`nil`: ours) as its whole
/// environment. A dedicated thread reads both pipes and reaps the child, so no cooperative-pool thread blocks.
/// Output still arriving after the child exited (from a grandchild holding the pipes) is collected for at most 2 s.
///
/// - Throws: ``TestPostgresError`` if it cannot be started, or if it runs longer than `timeout` — it is then
///   killed with SIGKILL and the message holds the tail of its output so far; `CancellationError` (after the same
///   SIGKILL) when the task is cancelled.
public func runProcess(
    _ arguments: [String], environment: [String: String]? = nil, timeout: Duration = .seconds(120)
) async throws -> ProcessResult {
    let variables = environment.map { $0.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" } }
    let cancellation = CancellationFlag()
    return try await withTaskCancellationHandler {
        try await onDedicatedThread {
            try runToCompletion(arguments, environment: variables, timeout: timeout, cancellation: cancellation)
        }
    } onCancel: {
        cancellation.set()
    }
}

/// The absolute path of product `name` (e.g. `stoker`) built next to the running test binary: the directory of
/// `/proc/self/exe` (`.build/debug/` when the tests run from `.build/debug/StokerPackageTests.xctest`).
///
/// - Throws: ``TestPostgresError`` naming the path looked at when there is no executable there (build it
///   first: `swift build --product <name>`; `swift test` builds every product of the package).
public func builtExecutable(_ name: String) throws -> String {
    guard let binary = Files.realPath("/proc/self/exe") else {
        throw TestPostgresError("cannot resolve /proc/self/exe: \(String(cString: strerror(errno)))")
    }
    let directory = String(binary[..<(binary.lastIndex(of: "/") ?? binary.startIndex)])
    let candidate = directory + "/" + name
    guard Files.isExecutable(candidate) else {
        throw TestPostgresError(
            "no built executable `\(name)` at \(candidate) (next to the test binary \(binary)); "
                + "build it first with `swift build --product \(name)` using the same build path and configuration")
    }
    return candidate
}

/// Set when the task running a process is cancelled; read by the thread that waits for it.
private final class CancellationFlag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
}

/// Spawns `argv`, reads its stdout and stderr until both close, reaps it, and enforces `timeout`. Blocking: runs on
/// a dedicated thread.
private func runToCompletion(
    _ argv: [String], environment: [String]?, timeout: Duration, cancellation: CancellationFlag
) throws -> ProcessResult {
    var outputPipe: [Int32] = [-1, -1]
    var errorPipe: [Int32] = [-1, -1]
    guard stoker_pipe_cloexec(&outputPipe) == 0 else {
        throw TestPostgresError("pipe2 failed: \(String(cString: strerror(errno)))")
    }
    guard stoker_pipe_cloexec(&errorPipe) == 0 else {
        let reason = String(cString: strerror(errno))
        for descriptor in outputPipe { close(descriptor) }
        throw TestPostgresError("pipe2 failed: \(reason)")
    }
    let pid: pid_t
    do {
        pid = try spawnChild(
            argv, environment: environment, standardOutput: .descriptor(outputPipe[1]),
            standardError: .descriptor(errorPipe[1]))
    } catch {
        for descriptor in outputPipe + errorPipe { close(descriptor) }
        throw error
    }
    close(outputPipe[1])
    close(errorPipe[1])

    var streams = [Stream(descriptor: outputPipe[0]), Stream(descriptor: errorPipe[0])]
    defer {
        for stream in streams where stream.isOpen { close(stream.descriptor) }
    }
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: timeout)
    var status: Int32?
    var exitedAt: ContinuousClock.Instant?
    var chunk = [UInt8](repeating: 0, count: 65_536)

    while true {
        if status == nil {
            var raw: Int32 = 0
            let reaped = waitpid(pid, &raw, WNOHANG)
            if reaped == pid {
                status = exitCode(fromWaitStatus: raw)
                exitedAt = clock.now
            } else if reaped < 0 && errno != EINTR {
                throw TestPostgresError("waitpid failed: \(String(cString: strerror(errno)))")
            }
        }
        let open = streams.indices.filter { streams[$0].isOpen }
        if let status {
            // Done once both pipes are at EOF, or 2 s after the exit if a grandchild still holds them.
            if open.isEmpty || clock.now - exitedAt! > .seconds(2) {
                return ProcessResult(
                    status: status, standardOutput: streams[0].text, standardError: streams[1].text)
            }
        } else if clock.now >= deadline || cancellation.isSet {
            kill(pid, SIGKILL)
            _ = try? waitForExit(pid)
            if cancellation.isSet { throw CancellationError() }
            throw TestPostgresError(
                "`\(argv.joined(separator: " "))` did not finish within \(timeout) and was killed with SIGKILL; "
                    + "stdout so far:\n\(Files.tail(streams[0].text, limit: 2_000))\n"
                    + "stderr so far:\n\(Files.tail(streams[1].text, limit: 2_000))")
        }

        var descriptors = open.map { pollfd(fd: streams[$0].descriptor, events: Int16(POLLIN), revents: 0) }
        // With both pipes closed only the exit is awaited: poll briefly, as a sleep.
        let ready = poll(&descriptors, nfds_t(descriptors.count), open.isEmpty ? 5 : 50)
        guard ready > 0 else { continue }
        for (slot, index) in open.enumerated() where descriptors[slot].revents != 0 {
            let count = chunk.withUnsafeMutableBytes { read(streams[index].descriptor, $0.baseAddress, $0.count) }
            if count > 0 {
                streams[index].bytes.append(contentsOf: chunk[0..<count])
            } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                close(streams[index].descriptor)
                streams[index].isOpen = false
            }
        }
    }
}

/// The read end of one of the child's output pipes and what came through it.
private struct Stream {
    let descriptor: Int32
    var isOpen = true
    var bytes: [UInt8] = []

    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    var text: String { String(decoding: bytes, as: UTF8.self) }
}
