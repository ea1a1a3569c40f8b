import CStokerSystem
import Glibc

/// Where a spawned child's stdout or stderr goes.
enum SpawnStream {
    /// `/dev/null`.
    case null
    /// The same file as ours (replaced by `/dev/null` when ours is closed).
    case inherit
    /// This descriptor of ours, duplicated onto the stream.
    case descriptor(Int32)
}

/// Spawns `argv` with posix_spawn and returns its pid without waiting: stdin on /dev/null, stdout/stderr as
/// asked, every other descriptor closed (`closefrom(3)`), an empty signal mask and default signal dispositions
/// (pool threads block most signals, and a child would inherit that mask), cwd `directory` when given.
///
/// `argv[0]` without a `/` is looked up in `$PATH`. `environment` (`KEY=value` strings) replaces ours when given.
func spawnChild(
    _ argv: [String], environment: [String]? = nil, directory: String? = nil,
    standardOutput: SpawnStream, standardError: SpawnStream
) throws -> pid_t {
    guard let program = argv.first, !program.isEmpty else {
        throw TestPostgresError("cannot spawn an empty command line")
    }
    func check(_ rc: Int32, _ what: String) throws {
        if rc != 0 { throw TestPostgresError("\(what) failed: \(String(cString: strerror(rc)))") }
    }
    var actions = posix_spawn_file_actions_t()
    try check(posix_spawn_file_actions_init(&actions), "posix_spawn_file_actions_init")
    defer { posix_spawn_file_actions_destroy(&actions) }
    try check(posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0), "addopen(0)")
    for (target, stream) in [(Int32(1), standardOutput), (Int32(2), standardError)] {
        switch stream {
        case .inherit where fcntl(target, F_GETFD) >= 0:
            break
        case .null, .inherit:
            try check(
                posix_spawn_file_actions_addopen(&actions, target, "/dev/null", O_WRONLY, 0), "addopen(\(target))")
        case .descriptor(let source):
            // dup2 clears close-on-exec on the target, so a pipe made with O_CLOEXEC still reaches the child.
            try check(posix_spawn_file_actions_adddup2(&actions, source, target), "adddup2(\(target))")
        }
    }
    try check(stoker_spawn_file_actions_addclosefrom(&actions, 3), "addclosefrom_np(3)")
    if let directory {
        try check(stoker_spawn_file_actions_addchdir(&actions, directory), "addchdir_np")
    }

    var attributes = posix_spawnattr_t()
    try check(posix_spawnattr_init(&attributes), "posix_spawnattr_init")
    defer { posix_spawnattr_destroy(&attributes) }
    var mask = sigset_t()
    sigemptyset(&mask)
    try check(posix_spawnattr_setsigmask(&attributes, &mask), "posix_spawnattr_setsigmask")
    var defaults = sigset_t()
    sigfillset(&defaults)
    try check(posix_spawnattr_setsigdefault(&attributes, &defaults), "posix_spawnattr_setsigdefault")
    try check(
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF)),
        "posix_spawnattr_setflags")

    let arguments: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
    defer { for argument in arguments { free(argument) } }
    let variables: [UnsafeMutablePointer<CChar>?]? = environment.map { $0.map { strdup($0) } + [nil] }
    defer { for variable in variables ?? [] { free(variable) } }
    var pid = pid_t()
    let rc = arguments.withUnsafeBufferPointer { argvBuffer in
        func spawn(_ envp: UnsafePointer<UnsafeMutablePointer<CChar>?>) -> Int32 {
            program.contains("/")
                ? posix_spawn(&pid, program, &actions, &attributes, argvBuffer.baseAddress!, envp)
                : posix_spawnp(&pid, program, &actions, &attributes, argvBuffer.baseAddress!, envp)
        }
        guard let variables else { return spawn(stoker_environ()) }
        return variables.withUnsafeBufferPointer { spawn($0.baseAddress!) }
    }
    try check(rc, "posix_spawn(\(program))")
    return pid
}

/// Waits for child `pid` to exit (blocking: call only on a dedicated thread) and returns its status.
func waitForExit(_ pid: pid_t) throws -> Int32 {
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        guard errno == EINTR else {
            throw TestPostgresError("waitpid failed: \(String(cString: strerror(errno)))")
        }
    }
    return exitCode(fromWaitStatus: status)
}

/// The exit code for a `waitpid` status, or 128 + the signal number for a child killed by a signal
/// (WIFEXITED / WEXITSTATUS are macros Swift cannot import).
func exitCode(fromWaitStatus status: Int32) -> Int32 {
    status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
}
