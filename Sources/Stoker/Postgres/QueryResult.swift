/// The rows a statement returned, copied out of libpq (text format), with typed accessors that throw
/// ``StokerError/Code/unexpectedResult`` instead of trapping.
struct QueryResult: Sendable {
    /// Column names, in order.
    let columns: [String]
    /// The rows, each as many values as ``columns``; `nil` is SQL NULL.
    let rows: [Row]
    /// The number of rows an INSERT/UPDATE/DELETE touched (`PQcmdTuples`), when the command reports one.
    let affectedRows: Int?

    struct Row: Sendable {
        let values: [String?]

        subscript(_ column: Int) -> String? { column < values.count ? values[column] : nil }

        func isNull(_ column: Int) -> Bool { self[column] == nil }

        func string(_ column: Int) throws(StokerError) -> String {
            guard column < values.count else {
                throw StokerError(
                    .unexpectedResult, "The result has \(values.count) columns; column \(column) was read.")
            }
            guard let value = values[column] else {
                throw StokerError(.unexpectedResult, "Column \(column) is NULL where a value was expected.")
            }
            return value
        }

        func int(_ column: Int) throws(StokerError) -> Int {
            let text = try string(column)
            guard let value = Int(text) else {
                throw StokerError(.unexpectedResult, "Column \(column) holds \"\(text.prefix(40))\", not an integer.")
            }
            return value
        }

        func int32(_ column: Int) throws(StokerError) -> Int32 {
            let value = try int(column)
            guard let narrow = Int32(exactly: value) else {
                throw StokerError(.unexpectedResult, "Column \(column) holds \(value), outside the 32-bit range.")
            }
            return narrow
        }

        func bool(_ column: Int) throws(StokerError) -> Bool {
            switch try string(column) {
            case "t", "true", "on": return true
            case "f", "false", "off": return false
            case let other:
                throw StokerError(.unexpectedResult, "Column \(column) holds \"\(other.prefix(40))\", not a boolean.")
            }
        }

        /// The boolean, or `nil` for NULL.
        func optionalBool(_ column: Int) throws(StokerError) -> Bool? {
            isNull(column) ? nil : try bool(column)
        }

        /// The integer, or `nil` for NULL.
        func optionalInt(_ column: Int) throws(StokerError) -> Int? {
            isNull(column) ? nil : try int(column)
        }
    }

    /// The only row, or an error naming how many there were.
    func singleRow() throws(StokerError) -> Row {
        guard rows.count == 1 else {
            throw StokerError(.unexpectedResult, "Expected exactly one row, got \(rows.count).")
        }
        return rows[0]
    }
}

/// A notification received on a channel this session listens on.
struct PostgresNotification: Sendable, Hashable {
    /// The channel, exactly as given to `LISTEN` (case preserved).
    let channel: String
    /// The payload text (empty when none was sent).
    let payload: String
    /// The process id of the backend that sent it.
    let senderPID: Int32
}
