import Glibc

/// Small file-system helpers on top of Glibc (no Foundation needed).
public enum Files {
    /// Whether `path` exists (any file type).
    static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }

    /// Whether `path` exists and is executable by us.
    static func isExecutable(_ path: String) -> Bool {
        access(path, X_OK) == 0
    }

    /// Creates `path` if missing (like `touch`). Returns false if it could not be created.
    @discardableResult
    static func touch(_ path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }

    /// The content of `path` (lossy UTF-8), read until EOF — also a /proc file, whose size says nothing — or nil if it
    /// cannot be read.
    public static func contents(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16_384)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `/proc/<pid>/stat` from field 3 (state) on — field n at index n − 3 — split after the last `)`, since the
    /// command name in field 2 may hold spaces and parentheses; nil when the process is gone.
    public static func processStatFields(_ pid: Int32) -> [Substring]? {
        guard let stat = contents("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ")
    }

    /// The names of process `pid`'s threads (`/proc/<pid>/task/*/comm`), as `top -H` and `ps -L` show them; empty when
    /// the process is gone.
    public static func threadNames(_ pid: Int32) -> [String] {
        list("/proc/\(pid)/task").compactMap { task in
            contents("/proc/\(pid)/task/\(task)/comm").map { String($0.prefix { $0 != "\n" }) }
        }
    }

    /// Creates or truncates `path` (mode 0644) and writes `text` to it.
    static func write(_ path: String, _ text: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TestPostgresError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw TestPostgresError("cannot write \(path): \(String(cString: strerror(errno)))") }
            bytes = bytes.dropFirst(n)
        }
    }

    /// The canonical absolute path of `path` (symlinks resolved), or nil.
    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// The names in directory `path` (without `.` and `..`); empty if it cannot be read.
    static func list(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Creates a fresh `0700` directory from a `mkdtemp` template ending in `XXXXXX`.
    static func makeTemporaryDirectory(template: String) throws -> String {
        var buffer = Array(template.utf8CString)
        let made = buffer.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
        guard made else {
            throw TestPostgresError("mkdtemp(\(template)) failed: \(String(cString: strerror(errno)))")
        }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The value of environment variable `name`, or nil when unset or empty.
    static func environment(_ name: String) -> String? {
        guard let value = getenv(name) else { return nil }
        let string = String(cString: value)
        return string.isEmpty ? nil : string
    }

    /// The last `limit` characters of `text`, marked when cut.
    static func tail(_ text: String, limit: Int = 4_000) -> String {
        text.count <= limit ? text : "…" + String(text.suffix(limit))
    }
}

/// The path of this process's executable (`/proc/self/exe` resolved), or nil where it cannot be read: the bench and
/// `stoker demo` run the `stoker` built beside them, or themselves.
public func currentExecutablePath() -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { return nil }
    return String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
