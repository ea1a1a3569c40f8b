/// An error from the throwaway-PostgreSQL test support: a cluster that failed to start, a connection
/// that failed, or SQL the server rejected.
///
/// The description never contains a password: it holds libpq's or the server's message and, for a
/// cluster that failed to start, the tail of the supervisor's `setup.log`.
public struct TestPostgresError: Error, CustomStringConvertible, Sendable {
    /// What went wrong, in words (for a start failure, including the tail of `setup.log`).
    public var message: String
    /// The SQLSTATE the server reported, when the failure came from the server.
    public var sqlState: String?

    /// Creates an error with a message and, when the server reported one, its SQLSTATE.
    public init(_ message: String, sqlState: String? = nil) {
        self.message = message
        self.sqlState = sqlState
    }

    /// `TestPostgresError: <message>` with the SQLSTATE appended when there is one.
    public var description: String {
        if let sqlState { return "TestPostgresError [\(sqlState)]: \(message)" }
        return "TestPostgresError: \(message)"
    }
}
