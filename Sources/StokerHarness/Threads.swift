import Glibc

/// Carries a thread body across the `pthread_create` C boundary.
private final class ThreadBody {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
}

/// Starts a detached OS thread (not a cooperative-pool thread) that runs `body`.
func startDetachedThread(_ body: @escaping @Sendable () -> Void) throws {
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(
        &thread, nil,
        { argument in
            guard let argument else { return nil }
            Unmanaged<ThreadBody>.fromOpaque(argument).takeRetainedValue().run()
            return nil
        }, box)
    guard rc == 0 else {
        Unmanaged<ThreadBody>.fromOpaque(box).release()
        throw TestPostgresError("pthread_create failed: \(String(cString: strerror(rc)))")
    }
    pthread_detach(thread)
}

/// Runs blocking `work` (libpq, waitpid, usleep) on a dedicated thread and resumes the caller with its
/// result, so the two-thread cooperative pool is never blocked.
///
/// CPU-bound test work (thousands of state-machine steps) belongs here too: computing for seconds on the pool, which
/// has one thread per core, delays every other test's timers and continuations by as long, and on a loaded host that
/// turned other tests' generous wall-clock bounds into failures. Make the test's assertions on what `work` returns:
/// `#expect` and `Issue.record` need the test's task, which this thread does not have.
public func onDedicatedThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        do {
            try startDetachedThread { continuation.resume(with: Result { try work() }) }
        } catch {
            continuation.resume(throwing: error)
        }
    }
}

/// Waits about 25 ms without blocking a pool thread; keeps waiting (on a dedicated thread) even when
/// the current task is cancelled, so cleanup loops never spin.
func pauseBriefly() async {
    do {
        try await Task.sleep(for: .milliseconds(25))
    } catch {
        _ = try? await onDedicatedThread { usleep(25_000) }
    }
}
