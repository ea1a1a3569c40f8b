import Glibc
// WakeSignal only (the proxy's stop signal); internal: not re-exported to the users of this module.
@_spi(Testing) internal import Stoker
import Synchronization

/// A loopback TCP proxy in front of a server, for partition tests: ``partition()`` blackholes every
/// connection open at that moment in both directions — nothing is forwarded, nothing is closed, as when a network
/// path silently drops packets — while connections made afterwards work normally (the partitioned client can come
/// back on a new path).
///
/// One thread accepts; one thread per connection pumps bytes between the two sockets with `poll(2)` and
/// `send(MSG_NOSIGNAL)` (a peer that has gone ends that connection, never the process with SIGPIPE). ``stop()``
/// (also at `deinit`) closes everything.
public final class TestProxy: Sendable {
    /// The loopback port clients connect to.
    public let port: Int
    private let listener: Int32
    /// Signalled once, by ``stop()``: every thread polls it beside its sockets.
    private let stopSignal: WakeSignal
    private let upstreamHost: String
    private let upstreamPort: Int

    private struct State {
        var generation = 0
        var partitioned: Set<Int> = []
        var descriptors: Set<Int32> = []
        var stopped = false
    }

    private let state = Mutex(State())

    /// Starts a proxy to `host:port` (a TCP address: `127.0.0.1` for the private test clusters).
    public init(upstreamHost host: String, upstreamPort port: Int) throws {
        let (listener, listenerPort) = try loopbackSocket(listening: 16)
        let stop: WakeSignal
        do {
            stop = try WakeSignal()
        } catch {
            close(listener)
            throw TestPostgresError("proxy: eventfd failed")
        }
        self.listener = listener
        self.stopSignal = stop
        self.port = listenerPort
        self.upstreamHost = host == "localhost" ? "127.0.0.1" : host
        self.upstreamPort = port
        try startDetachedThread { [self] in acceptLoop() }
    }

    deinit { stop() }

    /// Blackholes every connection open now, in both directions, for good.
    public func partition() {
        state.withLock { state in
            state.partitioned.formUnion(0..<state.generation)
        }
    }

    /// Closes the listener and every connection.
    public func stop() {
        // Under the lock: a pump removes its descriptors from the set before closing them, so none of these numbers
        // can have been reused.
        state.withLock { state in
            guard !state.stopped else { return }
            state.stopped = true
            stopSignal.signal()
            shutdown(listener, Int32(SHUT_RDWR))
            for descriptor in state.descriptors { shutdown(descriptor, Int32(SHUT_RDWR)) }
        }
    }

    private func acceptLoop() {
        while true {
            var descriptors = [
                pollfd(fd: listener, events: Int16(POLLIN), revents: 0),
                pollfd(fd: stopSignal.descriptor, events: Int16(POLLIN), revents: 0),
            ]
            _ = poll(&descriptors, 2, -1)
            if descriptors[1].revents != 0 || state.withLock({ $0.stopped }) { break }
            let client = accept(listener, nil, nil)
            guard client >= 0 else { continue }
            guard let server = connectUpstream() else {
                close(client)
                continue
            }
            let id: Int? = state.withLock { state in
                guard !state.stopped else { return nil }
                state.generation += 1
                state.descriptors.formUnion([client, server])
                return state.generation - 1
            }
            guard let id else {
                close(client)
                close(server)
                break
            }
            do {
                try startDetachedThread { [self] in pump(id: id, client: client, server: server) }
            } catch {
                close(client)
                close(server)
            }
        }
        close(listener)
    }

    private func connectUpstream() -> Int32? {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { return nil }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr(upstreamHost)
        address.sin_port = UInt16(upstreamPort).bigEndian
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw in
                connect(descriptor, raw, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else {
            close(descriptor)
            return nil
        }
        return descriptor
    }

    private func pump(id: Int, client: Int32, server: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65_536)
        loop: while true {
            var descriptors = [
                pollfd(fd: client, events: Int16(POLLIN), revents: 0),
                pollfd(fd: server, events: Int16(POLLIN), revents: 0),
                pollfd(fd: stopSignal.descriptor, events: Int16(POLLIN), revents: 0),
            ]
            _ = poll(&descriptors, 3, -1)
            if descriptors[2].revents != 0 { break }
            if state.withLock({ $0.partitioned.contains(id) }) {
                // Blackholed: never read, forward or close again; wait for the proxy to stop.
                var stop = pollfd(fd: stopSignal.descriptor, events: Int16(POLLIN), revents: 0)
                _ = poll(&stop, 1, -1)
                break
            }
            for (source, target) in [(0, server), (1, client)] where descriptors[source].revents != 0 {
                let count = read(descriptors[source].fd, &buffer, buffer.count)
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { break loop }
                var sent = 0
                while sent < count {
                    // send(MSG_NOSIGNAL), never write(2): writing to a socket whose peer has gone (or that stop() has
                    // shut down) raises SIGPIPE, which kills the whole test process; this returns EPIPE instead.
                    let written = buffer.withUnsafeBytes { bytes in
                        send(target, bytes.baseAddress! + sent, count - sent, Int32(MSG_NOSIGNAL))
                    }
                    if written < 0 && errno == EINTR { continue }
                    if written <= 0 { break loop }
                    sent += written
                }
            }
        }
        state.withLock { state in
            state.descriptors.remove(client)
            state.descriptors.remove(server)
        }
        close(client)
        close(server)
    }
}
