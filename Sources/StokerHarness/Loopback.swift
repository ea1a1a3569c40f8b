import Glibc

/// A TCP socket (close-on-exec) bound to 127.0.0.1 on a port the kernel picks, and listening when `backlog` is
/// given. The caller owns the descriptor.
func loopbackSocket(listening backlog: Int32?) throws -> (descriptor: Int32, port: Int) {
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard descriptor >= 0 else { throw TestPostgresError("socket failed: \(String(cString: strerror(errno)))") }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
            bind(descriptor, pointer, length) == 0 && (backlog.map { listen(descriptor, $0) == 0 } ?? true)
                && getsockname(descriptor, pointer, &length) == 0
        }
    }
    guard bound else {
        let reason = String(cString: strerror(errno))
        close(descriptor)
        throw TestPostgresError("bind/listen on 127.0.0.1:0 failed: \(reason)")
    }
    return (descriptor, Int(UInt16(bigEndian: address.sin_port)))
}

/// A loopback TCP listener that never accepts: a client's connection completes into its backlog and then hears
/// nothing, as from a server that hangs. For testing what a client does while its connection attempt is stuck.
public final class SilentListener: Sendable {
    /// The port clients connect to (on 127.0.0.1).
    public let port: Int
    private let descriptor: Int32

    public init() throws {
        (descriptor, port) = try loopbackSocket(listening: 4)
    }

    deinit { close(descriptor) }

    /// Returns once a connection waits in the backlog (on a dedicated thread, not the cooperative pool).
    ///
    /// - Throws: ``TestPostgresError`` when none came within `timeout`.
    public func waitForPendingConnection(timeout: Duration) async throws {
        let descriptor = self.descriptor
        let milliseconds = Int32(
            clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        let ready = try await onDedicatedThread { () -> Bool in
            var pending = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            while true {
                let result = poll(&pending, 1, milliseconds)
                if result < 0 && errno == EINTR { continue }
                return result > 0
            }
        }
        guard ready else { throw TestPostgresError("no connection reached 127.0.0.1:\(port) within \(timeout)") }
    }
}
