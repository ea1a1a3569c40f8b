import CStokerLibPQ

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A parsed libpq connection string: a `postgresql://` URL or a `key=value` list.
///
/// libpq does the parsing (`PQconninfoParse`), so every parameter it knows keeps working — several hosts,
/// `target_session_attrs`, `sslmode`, `connect_timeout`, keepalives — and whatever the string leaves out comes from the
/// `PG*` environment variables at connect time, as with `psql`.
///
/// The type also knows the connection's secrets (the password fields libpq marks as such, `PGPASSWORD`, and the raw
/// text of a password in a URL that did not parse) so that no message built from libpq's or the server's words can
/// carry one.
struct ConnectionConfiguration: Sendable {
    /// The options the string set explicitly, in libpq's order (secrets included: these go to libpq only).
    let options: [(keyword: String, value: String)]
    /// A description safe to print: every explicit non-secret option, e.g. `host=db port=5432 dbname=app user=svc`.
    let redactedDescription: String
    /// Strings that must never appear in an error or a log line.
    let secrets: [String]

    /// Parses `conninfo`. An empty string is valid: everything then comes from the `PG*` environment.
    init(_ conninfo: String) throws(StokerError) {
        if conninfo.utf8.contains(0) {
            throw StokerError(
                .invalidConnectionString,
                "The connection string contains a NUL byte; remove it (libpq would silently cut the string there)."
            )
        }
        let heuristicSecrets = Self.rawSecrets(in: conninfo) + Self.environmentSecrets()
        var errorMessage: UnsafeMutablePointer<CChar>?
        guard let parsed = PQconninfoParse(conninfo, &errorMessage) else {
            let libpqMessage = errorMessage.map { String(cString: $0) } ?? "out of memory"
            if let errorMessage { PQfreemem(errorMessage) }
            throw StokerError(
                .invalidConnectionString,
                "The connection string could not be parsed. Use a URL such as "
                    + "postgresql://user@host:5432/dbname?sslmode=require or a key=value list such as "
                    + "\"host=db port=5432 dbname=app user=svc\".",
                serverMessage: Redactor(secrets: heuristicSecrets).scrub(trimmed(libpqMessage))
            )
        }
        defer { PQconninfoFree(parsed) }

        var options: [(keyword: String, value: String)] = []
        var shown: [String] = []
        var secrets = heuristicSecrets
        var index = 0
        while let keywordPointer = parsed[index].keyword {
            defer { index += 1 }
            guard let valuePointer = parsed[index].val else { continue }
            let keyword = String(cString: keywordPointer)
            let value = String(cString: valuePointer)
            options.append((keyword, value))
            let display = parsed[index].dispchar.map { String(cString: $0) } ?? ""
            if display == "*" {
                // libpq marks password fields ("password", "sslpassword") with dispchar "*": never shown.
                if !value.isEmpty { secrets.append(value) }
            } else if display != "D" {
                shown.append("\(keyword)=\(Self.quoteForDisplay(value))")
            }
        }
        self.options = options
        self.secrets = Array(Set(secrets.filter { !$0.isEmpty }))
        self.redactedDescription = shown.joined(separator: " ")
    }

    /// The value the string set for `keyword`, if any.
    func value(for keyword: String) -> String? {
        options.last(where: { $0.keyword == keyword })?.value
    }

    var redactor: Redactor { Redactor(secrets: secrets) }

    private static func quoteForDisplay(_ value: String) -> String {
        if !value.isEmpty, !value.contains(where: { $0 == " " || $0 == "'" || $0 == "\\" }) { return value }
        var quoted = "'"
        for character in value {
            if character == "'" || character == "\\" { quoted.append("\\") }
            quoted.append(character)
        }
        return quoted + "'"
    }

    /// Password text as it stands in a string that libpq may fail to parse (and then quote back in its message):
    /// the password part of a URL's user info, raw and percent-decoded, and the value of a `password=` keyword.
    static func rawSecrets(in conninfo: String) -> [String] {
        var found: [String] = []
        let lower = conninfo.lowercased()
        if lower.hasPrefix("postgresql://") || lower.hasPrefix("postgres://"),
            let schemeEnd = conninfo.firstRange(of: "://")
        {
            var rest = conninfo[schemeEnd.upperBound...]
            if let query = rest.firstIndex(of: "?") { rest = rest[..<query] }
            if let at = rest.lastIndex(of: "@") {
                let userInfo = rest[..<at]
                if let colon = userInfo.firstIndex(of: ":") {
                    let password = String(userInfo[userInfo.index(after: colon)...])
                    found.append(password)
                    if let decoded = percentDecoded(password) { found.append(decoded) }
                }
            }
            // A password given as a query parameter: ?password=...
            for pair in conninfo.split(separator: "?").dropFirst().joined(separator: "?").split(separator: "&") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                if parts.count == 2, parts[0].lowercased().hasSuffix("password") {
                    found.append(String(parts[1]))
                    if let decoded = percentDecoded(String(parts[1])) { found.append(decoded) }
                }
            }
        } else {
            // key=value form: scan for password= / sslpassword= and take the (possibly quoted) value.
            var scalars = Substring(conninfo)
            while let range = scalars.firstRange(of: "password") {
                var cursor = range.upperBound
                scalars = scalars[range.upperBound...]
                while cursor < conninfo.endIndex, conninfo[cursor] == " " { cursor = conninfo.index(after: cursor) }
                guard cursor < conninfo.endIndex, conninfo[cursor] == "=" else { continue }
                cursor = conninfo.index(after: cursor)
                while cursor < conninfo.endIndex, conninfo[cursor] == " " { cursor = conninfo.index(after: cursor) }
                guard cursor < conninfo.endIndex else { break }
                var value = ""
                if conninfo[cursor] == "'" {
                    cursor = conninfo.index(after: cursor)
                    while cursor < conninfo.endIndex, conninfo[cursor] != "'" {
                        if conninfo[cursor] == "\\" {
                            cursor = conninfo.index(after: cursor)
                            if cursor == conninfo.endIndex { break }
                        }
                        value.append(conninfo[cursor])
                        cursor = conninfo.index(after: cursor)
                    }
                } else {
                    while cursor < conninfo.endIndex, conninfo[cursor] != " " {
                        value.append(conninfo[cursor])
                        cursor = conninfo.index(after: cursor)
                    }
                }
                found.append(value)
                scalars = conninfo[cursor...]
            }
        }
        return found.filter { !$0.isEmpty }
    }

    static func environmentSecrets() -> [String] {
        guard let pointer = getenv("PGPASSWORD") else { return [] }
        let value = String(cString: pointer)
        return value.isEmpty ? [] : [value]
    }

    private static func percentDecoded(_ text: String) -> String? {
        guard text.contains("%") else { return nil }
        var bytes: [UInt8] = []
        var utf8 = text.utf8.makeIterator()
        while let byte = utf8.next() {
            if byte == UInt8(ascii: "%"), let high = utf8.next(), let low = utf8.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            {
                bytes.append(value)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Removes secrets from text that came from libpq or the server before it is stored in an error or logged.
struct Redactor: Sendable {
    let secrets: [String]

    func scrub(_ text: String) -> String {
        // Longest first, so a secret that contains another is removed whole.
        var result = text
        for secret in secrets.sorted(by: { $0.utf8.count > $1.utf8.count }) where !secret.isEmpty {
            result = result.replacingAll(secret, with: "***")
        }
        return result
    }
}

extension String {
    func replacingAll(_ target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var result = ""
        var rest = self[...]
        while let range = rest.firstRange(of: target) {
            result += rest[..<range.lowerBound]
            result += replacement
            rest = rest[range.upperBound...]
        }
        result += rest
        return result
    }
}

/// libpq messages end with a newline; some carry several lines (one per host tried).
func trimmed(_ message: String) -> String {
    var text = Substring(message)
    while let last = text.last, last == "\n" || last == " " { text = text.dropLast() }
    return String(text)
}
