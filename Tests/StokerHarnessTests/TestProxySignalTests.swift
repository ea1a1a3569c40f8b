import Glibc
import Synchronization
import Testing

@testable import StokerHarness

/// SIGPIPE deliveries to this process while ``countingSIGPIPE(_:)`` has its handler installed.
private let sigpipeDeliveries = Atomic<Int>(0)

/// The proxy writes into a connection whose peer has gone (or that ``TestProxy/stop()`` shut down). With a bare
/// `write(2)` the kernel raises SIGPIPE, whose default action kills the whole test process (seen in CI: signal 13).
/// The check cannot let the process die, so it replaces the disposition with a handler that counts deliveries for
/// the duration of the scenario (restoring the old one after), and asserts the count stayed 0. Nothing blocks
/// SIGPIPE: the proxy is even created on a thread that unblocks it, so its threads inherit an open mask. (The handler
/// is process-wide: a SIGPIPE from another test in that window counts too — it would have killed the run anyway.)
///
/// Both scenarios get the proxy's pump stuck in a write to the upstream first: the upstream never reads, and the
/// client sends until nothing moves. Only then is the socket taken away under the write, so the failing write is
/// certain, not a race with the pump's poll. (A plain reset of an established connection would not do: Linux reports
/// its first failing write as ECONNRESET, without SIGPIPE; a reset after the peer's FIN, or a local shutdown, is
/// EPIPE, with it.)
@Suite("TestProxy SIGPIPE", .serialized)
struct TestProxySignalTests {
    @Test("an upstream that half-closes and then resets while the proxy writes to it ends that connection, no SIGPIPE")
    func upstreamResetWhileWriting() async throws {
        let deliveries = try await countingSIGPIPE {
            try await withStuckConnection { _, client, upstream in
                // FIN first (the proxy's side goes to CLOSE_WAIT, its blocked write keeps waiting), then an RST
                // (SO_LINGER 0): the reset of a CLOSE_WAIT socket fails the pending write with EPIPE.
                #expect(shutdown(upstream, Int32(SHUT_WR)) == 0)
                var abortive = linger(l_onoff: 1, l_linger: 0)
                let size = socklen_t(MemoryLayout<linger>.size)
                #expect(setsockopt(upstream, SOL_SOCKET, SO_LINGER, &abortive, size) == 0)
                close(upstream)
                try waitForReset(client)
            }
        }
        #expect(deliveries == 0, "the proxy's write to a reset upstream raised SIGPIPE")
    }

    @Test("stop() while the proxy is blocked writing to the upstream raises no SIGPIPE")
    func stopWhileWriting() async throws {
        let deliveries = try await countingSIGPIPE {
            try await withStuckConnection { proxy, client, upstream in
                defer { close(upstream) }
                // shutdown(SHUT_RDWR) under the pump's blocked write: that write fails with EPIPE.
                proxy.stop()
                try waitForReset(client)
            }
        }
        #expect(deliveries == 0, "the proxy's write to a socket stop() had shut down raised SIGPIPE")
    }
}

/// Runs `body` with a SIGPIPE handler that counts deliveries, then restores the previous disposition; returns the
/// count. Tests in this suite run one at a time, so the save/restore pairs never interleave.
private func countingSIGPIPE(_ body: () async throws -> Void) async throws -> Int {
    sigpipeDeliveries.store(0, ordering: .sequentiallyConsistent)  // also initialises the global before any signal
    var counting = sigaction()
    counting.__sigaction_handler.sa_handler = { _ in
        sigpipeDeliveries.wrappingAdd(1, ordering: .sequentiallyConsistent)
    }
    sigemptyset(&counting.sa_mask)
    counting.sa_flags = SA_RESTART
    var previous = sigaction()
    try #require(sigaction(SIGPIPE, &counting, &previous) == 0)
    defer { sigaction(SIGPIPE, &previous, nil) }
    try await body()
    return sigpipeDeliveries.load(ordering: .sequentiallyConsistent)
}

/// A proxy in front of a loopback upstream that accepts and never reads, and a non-blocking client connected
/// through it that has sent until nothing moves for half a second: every buffer on the way is full, so the proxy's
/// pump sits in a write to the upstream. Runs `body(proxy, client, upstream)` on a dedicated thread; `body` owns
/// (closes) `upstream`.
private func withStuckConnection(
    _ body: @escaping @Sendable (TestProxy, Int32, Int32) throws -> Void
) async throws {
    let (listener, upstreamPort) = try loopbackSocket(listening: 1)
    defer { close(listener) }
    // Created on a thread with SIGPIPE unblocked: the proxy's accept and pump threads inherit that mask, so a SIGPIPE
    // from its writes is delivered (and counted), whatever mask the cooperative pool's threads have.
    let proxy = try await onDedicatedThread {
        var pipeOnly = sigset_t()
        sigemptyset(&pipeOnly)
        sigaddset(&pipeOnly, SIGPIPE)
        pthread_sigmask(SIG_UNBLOCK, &pipeOnly, nil)
        return try TestProxy(upstreamHost: "127.0.0.1", upstreamPort: upstreamPort)
    }
    defer { proxy.stop() }
    try await onDedicatedThread {
        let client = try connectLoopback(port: proxy.port)
        defer { close(client) }
        var pending = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        guard poll(&pending, 1, 10_000) == 1 else { throw TestPostgresError("the proxy never connected upstream") }
        let upstream = accept(listener, nil, nil)
        guard upstream >= 0 else { throw TestPostgresError("accept failed: \(String(cString: strerror(errno)))") }
        do {
            try sendUntilStuck(client)
        } catch {
            close(upstream)
            throw error
        }
        try body(proxy, client, upstream)
    }
}

/// A blocking TCP connection to 127.0.0.1:`port`, then made non-blocking.
private func connectLoopback(port: Int) throws -> Int32 {
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard descriptor >= 0 else { throw TestPostgresError("socket failed") }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(port).bigEndian
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard connected == 0, fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) | O_NONBLOCK) == 0 else {
        close(descriptor)
        throw TestPostgresError("connect to 127.0.0.1:\(port) failed: \(String(cString: strerror(errno)))")
    }
    return descriptor
}

/// Sends (MSG_NOSIGNAL: the test itself must not raise SIGPIPE) until the socket stays unwritable for 500 ms.
private func sendUntilStuck(_ client: Int32) throws {
    let chunk = [UInt8](repeating: 0x55, count: 65_536)
    var total = 0
    while true {
        let sent = chunk.withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent > 0 {
            total += sent
            guard total < 1 << 30 else { throw TestPostgresError("1 GiB went through a proxy that should be stuck") }
            continue
        }
        guard sent < 0, errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR else {
            let reason = String(cString: strerror(errno))
            throw TestPostgresError("send to the proxy failed after \(total) bytes: \(reason)")
        }
        var writable = pollfd(fd: client, events: Int16(POLLOUT), revents: 0)
        let ready = poll(&writable, 1, 500)
        if ready == 0 { return }
        if ready > 0 && writable.revents & Int16(POLLOUT) == 0 {
            throw TestPostgresError("the proxy closed the connection while the client was sending")
        }
    }
}

/// Waits (up to 10 s) until the proxy has closed its end of `client` — a reset, since it leaves unread data — which
/// it does only after its pump's failed write, so a SIGPIPE from that write has been delivered by then.
private func waitForReset(_ client: Int32) throws {
    // Events 0: only POLLERR/POLLHUP are reported. A FIN alone (stop()'s shutdown) is neither.
    var closed = pollfd(fd: client, events: 0, revents: 0)
    var remaining = 10_000
    while remaining > 0 {
        let result = poll(&closed, 1, 100)
        if result > 0 { return }
        if result < 0 && errno != EINTR { throw TestPostgresError("poll failed: \(String(cString: strerror(errno)))") }
        remaining -= 100
    }
    throw TestPostgresError("the proxy did not close the client's connection within 10 s")
}
