/// Checks on SQL names Stoker puts into statements itself (schema names, channel names).
///
/// Values are always bound as parameters; only names that SQL cannot take as parameters go through here, and then
/// through libpq's `PQescapeIdentifier` (see ``PGConnection/quoteIdentifier(_:)``). PostgreSQL silently truncates a
/// name longer than `max_identifier_length` (63 bytes by default), which would make two long names collide, so a name
/// that long is refused instead.
enum SQLName {
    /// PostgreSQL's default `max_identifier_length` (NAMEDATALEN − 1).
    static let defaultMaximumLength = 63

    static func validate(_ name: String, kind: String, maximumLength: Int = defaultMaximumLength) throws(StokerError) {
        if name.isEmpty {
            throw StokerError(.invalidIdentifier, "The \(kind) is empty; give it a name.")
        }
        if name.utf8.contains(0) {
            throw StokerError(
                .invalidIdentifier, "The \(kind) contains a NUL byte, which PostgreSQL names cannot hold.")
        }
        let length = name.utf8.count
        if length > maximumLength {
            throw StokerError(
                .invalidIdentifier,
                "The \(kind) \"\(name.prefix(20))…\" is \(length) bytes; PostgreSQL names are at most \(maximumLength) "
                    + "bytes and longer ones would be silently truncated. Choose a shorter name."
            )
        }
    }
}
