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

    private struct Entry {
        let keyword: String
        let value: String
        let isSecret: Bool
        let isShown: Bool
    }

    /// Parses `conninfo`. An empty string is valid: everything then comes from the `PG*` environment.
    init(_ conninfo: String) throws(StokerError) {
        if conninfo.utf8.contains(0) {
            throw StokerError(
                .invalidConnectionString,
                "The connection string contains a NUL byte; remove it (libpq would silently cut the string there)."
            )
        }
        try Self.refuseAmbiguousURL(conninfo)
        // As PQconnectdb would: a dbname that itself looks like a connection string is a database name here, not
        // expanded (only PQconnectdbParams' expand_dbname does that). rawSecrets still finds a password in it.
        let entries = try Self.parse(conninfo)
        let secrets =
            entries.filter(\.isSecret).map(\.value) + Self.rawSecrets(in: conninfo)
            + Self.environmentSecrets()
        self.secrets = Array(Set(secrets.filter { !$0.isEmpty }))
        self.options = entries.map { ($0.keyword, $0.value) }
        self.redactedDescription = Redactor(secrets: self.secrets).scrub(
            entries.filter(\.isShown).map { "\($0.keyword)=\(Self.quoteForDisplay($0.value))" }
                .joined(separator: " ")
        )
    }

    private init(options: [(keyword: String, value: String)], redactedDescription: String, secrets: [String]) {
        self.options = options
        self.redactedDescription = redactedDescription
        self.secrets = secrets
    }

    /// This configuration with `defaults` added for every keyword neither the string nor (where libpq has one) its
    /// environment variable set. The description is unchanged: it shows what the user wrote.
    func addingDefaults(_ defaults: [(keyword: String, value: String, environment: String?)]) -> ConnectionConfiguration
    {
        var options = self.options
        for (keyword, value, variable) in defaults where self.value(for: keyword) == nil {
            if let variable, getenv(variable) != nil { continue }
            options.append((keyword, value))
        }
        return ConnectionConfiguration(options: options, redactedDescription: redactedDescription, secrets: secrets)
    }

    /// Checks the values libpq would refuse only when connecting (its parser checks the syntax, not the values), so
    /// a node can report them when it is created. Names the keyword and the allowed values; never echoes a secret.
    func validateValues() throws(StokerError) {
        let choices: [String: [String]] = [
            "sslmode": ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"],
            "gssencmode": ["disable", "prefer", "require"],
            "target_session_attrs": ["any", "read-write", "read-only", "primary", "standby", "prefer-standby"],
            "channel_binding": ["disable", "prefer", "require"],
        ]
        for (keyword, allowed) in choices.sorted(by: { $0.key < $1.key }) {
            if let value = value(for: keyword), !allowed.contains(value) {
                throw StokerError(
                    .invalidConnectionString,
                    "The connection string sets \(keyword) to \(Self.quoteForDisplay(redactor.scrub(value))); "
                        + "use one of \(allowed.joined(separator: ", ")).")
            }
        }
        for keyword in [
            "port", "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
            "keepalives_count", "tcp_user_timeout",
        ] {
            guard let value = value(for: keyword), !value.isEmpty else { continue }
            let parts = keyword == "port" ? value.split(separator: ",", omittingEmptySubsequences: false) : [value[...]]
            for part in parts where !part.isEmpty && Int(part.trimmingSpaces) == nil {
                throw StokerError(
                    .invalidConnectionString,
                    "The connection string sets \(keyword) to \(Self.quoteForDisplay(redactor.scrub(value))), "
                        + "which is not a whole number.")
            }
        }
    }

    /// The value the string set for `keyword`, if any.
    func value(for keyword: String) -> String? {
        options.last(where: { $0.keyword == keyword })?.value
    }

    var redactor: Redactor { Redactor(secrets: secrets) }

    private static func parse(_ conninfo: String) throws(StokerError) -> [Entry] {
        var errorMessage: UnsafeMutablePointer<CChar>?
        guard let parsed = PQconninfoParse(conninfo, &errorMessage) else {
            let libpqMessage = errorMessage.map { String(cString: $0) } ?? "out of memory"
            if let errorMessage { PQfreemem(errorMessage) }
            throw StokerError(
                .invalidConnectionString,
                "The connection string could not be parsed. Use a URL such as "
                    + "postgresql://user@host:5432/dbname?sslmode=require or a key=value list such as "
                    + "\"host=db port=5432 dbname=app user=svc\".",
                serverMessage: Redactor(secrets: rawSecrets(in: conninfo) + environmentSecrets())
                    .scrub(hidingQuotedText(trimmed(libpqMessage)))
            )
        }
        defer { PQconninfoFree(parsed) }
        var entries: [Entry] = []
        var index = 0
        while let keywordPointer = parsed[index].keyword {
            defer { index += 1 }
            guard let valuePointer = parsed[index].val else { continue }
            // libpq marks password fields ("password", "sslpassword") with dispchar "*", debug ones with "D".
            let display = parsed[index].dispchar.map { String(cString: $0) } ?? ""
            entries.append(
                Entry(
                    keyword: String(cString: keywordPointer),
                    value: String(cString: valuePointer),
                    isSecret: display == "*",
                    isShown: display != "*" && display != "D"
                )
            )
        }
        return entries
    }

    /// Every keyword libpq knows: the only quoted words of a parse error that are safe to repeat.
    private static let knownKeywords: Set<String> = {
        guard let defaults = PQconndefaults() else { return [] }
        defer { PQconninfoFree(defaults) }
        var keywords: Set<String> = []
        var index = 0
        while let keyword = defaults[index].keyword {
            keywords.insert(String(cString: keyword))
            index += 1
        }
        return keywords
    }()

    /// A parse error quotes the piece of the string it stumbled on — which may be a password (`missing "=" after
    /// "hunter2"`, `invalid percent-encoded token: "pa%zz"`), and a password may itself hold a `"`. So this fails
    /// closed: quoted keywords and single punctuation characters stay; from the first other quoted piece on, every
    /// thing up to the message's last `"` is hidden. A message quoted in another language's marks (libpq translates
    /// when the process set a locale) is withheld whole.
    static func hidingQuotedText(_ message: String) -> String {
        if message.contains(where: { "«»„“”‹›「」".contains($0) }) {
            return "(libpq's message is withheld: it may quote the connection string)"
        }
        var result = ""
        var rest = Substring(message)
        while let open = rest.firstIndex(of: "\"") {
            result += rest[...open]
            let afterOpen = rest.index(after: open)
            guard let close = rest[afterOpen...].firstIndex(of: "\"") else { return result + "…" }
            let quoted = rest[afterOpen..<close]
            let harmless =
                knownKeywords.contains(String(quoted))
                || (quoted.count == 1 && quoted.first.map { !$0.isLetter && !$0.isNumber } == true)
            if harmless {
                result += quoted + "\""
                rest = rest[rest.index(after: close)...]
            } else {
                // Hide through the last quote: a `"` inside the secret must not end the hidden part early.
                let last = rest.lastIndex(of: "\"")!
                result += "…\""
                rest = rest[rest.index(after: last)...]
            }
        }
        return result + rest
    }

    /// libpq ends a URL's user info at the first `@` or `/`: a password holding a raw `@` or `/` is split into host,
    /// port and database instead, where no redaction can recognise it. Refuse such URLs without echoing them.
    private static func refuseAmbiguousURL(_ conninfo: String) throws(StokerError) {
        let lower = conninfo.lowercased()
        // Unicode scalars, as libpq reads bytes: a combining mark must not hide an '@' or a '/'.
        let text = conninfo.unicodeScalars
        guard lower.hasPrefix("postgresql://") || lower.hasPrefix("postgres://"),
            let scheme = text.firstRange(of: "://".unicodeScalars)
        else { return }
        let rest = text[scheme.upperBound...]
        let firstSlash = rest.firstIndex(of: "/") ?? rest.endIndex
        var afterUserInfo = rest
        if let firstAt = rest.firstIndex(of: "@"), firstAt < firstSlash {
            afterUserInfo = rest[rest.index(after: firstAt)...]
        }
        let hostAndPath = afterUserInfo[..<(afterUserInfo.firstIndex(of: "?") ?? afterUserInfo.endIndex)]
        if hostAndPath.contains("@") {
            throw StokerError(
                .invalidConnectionString,
                "The URL holds an '@' that libpq would not read as the end of the user info: percent-encode '@' "
                    + "as %40 and '/' as %2F in the user name and password."
            )
        }
    }

    private static func quoteForDisplay(_ value: String) -> String {
        if !value.isEmpty, !value.contains(where: { $0 == " " || $0 == "'" || $0 == "\\" }) { return value }
        var quoted = "'"
        for character in value {
            if character == "'" || character == "\\" { quoted.append("\\") }
            quoted.append(character)
        }
        return quoted + "'"
    }

    /// Password text as it stands in the raw string, found without libpq (whose parse may have failed or split the
    /// string differently): the password of every `scheme://user:password@` in it, raw and percent-decoded, every
    /// `password=` query parameter, and the value of every `password=` keyword. Over-matching is harmless: these
    /// strings are only ever removed from messages.
    static func rawSecrets(in conninfo: String) -> [String] {
        // Unicode scalars, not Characters: a combining mark after ':' or '@' would merge with it into another
        // Character and hide the delimiter.
        let text = conninfo.unicodeScalars
        var found: [String] = []
        func add(_ candidate: Substring.UnicodeScalarView) {
            let value = String(candidate)
            found.append(value)
            if let decoded = percentDecoded(value) { found.append(decoded) }
            if value.hasSuffix("'") { found.append(String(value.dropLast())) }
        }
        // URLs, wherever they stand (a leading space, "jdbc:postgresql://", a dbname holding a URL).
        var searchFrom = text.startIndex
        while let scheme = text[searchFrom...].firstRange(of: "://".unicodeScalars) {
            searchFrom = scheme.upperBound
            let rest = text[scheme.upperBound...].prefix { $0 != " " && $0 != "\t" && $0 != "\n" }
            if let at = rest.lastIndex(of: "@"), let colon = rest[..<at].firstIndex(of: ":") {
                add(rest[rest.index(after: colon)..<at])
            }
            if let query = rest.firstIndex(of: "?") {
                for pair in rest[rest.index(after: query)...].split(separator: "&") {
                    let parts = pair.split(separator: "=", maxSplits: 1)
                    if parts.count == 2, String(parts[0]).lowercased().hasSuffix("password") { add(parts[1]) }
                }
            }
        }
        // key=value: the (possibly quoted) value after every "password" keyword.
        var rest = text[...]
        while let keyword = rest.firstRange(of: "password".unicodeScalars) {
            var cursor = keyword.upperBound
            rest = text[keyword.upperBound...]
            while cursor < text.endIndex, text[cursor] == " " { cursor = text.index(after: cursor) }
            guard cursor < text.endIndex, text[cursor] == "=" else { continue }
            cursor = text.index(after: cursor)
            while cursor < text.endIndex, text[cursor] == " " { cursor = text.index(after: cursor) }
            var value = String.UnicodeScalarView()
            if cursor < text.endIndex, text[cursor] == "'" {
                cursor = text.index(after: cursor)
                while cursor < text.endIndex, text[cursor] != "'" {
                    if text[cursor] == "\\" {
                        cursor = text.index(after: cursor)
                        if cursor == text.endIndex { break }
                    }
                    value.append(text[cursor])
                    cursor = text.index(after: cursor)
                }
            } else {
                while cursor < text.endIndex, text[cursor] != " " {
                    value.append(text[cursor])
                    cursor = text.index(after: cursor)
                }
            }
            add(Substring(String(value)).unicodeScalars)
            rest = text[cursor...]
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
///
/// Matching is on UTF-8 bytes, not on Swift `Character`s: a secret starting with a combining mark would otherwise
/// merge with the character before it in the message and go unmatched.
struct Redactor: Sendable {
    let secrets: [String]

    func scrub(_ text: String) -> String {
        var bytes = Array(text.utf8)
        // Longest first, so a secret that contains another is removed whole.
        for secret in secrets.sorted(by: { $0.utf8.count > $1.utf8.count }) where !secret.isEmpty {
            bytes = Self.replacing(Array(secret.utf8), in: bytes, with: Array("***".utf8))
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func replacing(_ target: [UInt8], in bytes: [UInt8], with replacement: [UInt8]) -> [UInt8] {
        guard bytes.count >= target.count else { return bytes }
        var result: [UInt8] = []
        result.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            if index + target.count <= bytes.count, bytes[index..<index + target.count].elementsEqual(target) {
                result += replacement
                index += target.count
            } else {
                result.append(bytes[index])
                index += 1
            }
        }
        return result
    }
}

/// libpq messages end with a newline; some carry several lines (one per host tried).
func trimmed(_ message: String) -> String {
    var text = Substring(message)
    while let last = text.last, last == "\n" || last == " " { text = text.dropLast() }
    return String(text)
}

extension Substring {
    var trimmingSpaces: Substring {
        var text = self
        while text.first == " " { text.removeFirst() }
        while text.last == " " { text.removeLast() }
        return text
    }
}
