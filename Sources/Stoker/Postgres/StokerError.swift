/// The one error type Stoker throws.
///
/// Every failure carries a ``Code`` to switch on, a message written for the person who has to act on it, and — where
/// PostgreSQL or libpq said something — the server's SQLSTATE and message. ``connection`` describes the connection the
/// error happened on, with the password removed.
///
/// No field, and so neither ``description`` nor any log line built from it, ever holds a password: libpq's and the
/// server's messages are scrubbed of every secret the connection string or the environment held before they are stored.
public struct StokerError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What went wrong, as a stable code. New codes may be added in minor releases: keep a `default` when switching.
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private enum Base: String, Sendable, Hashable {
            case invalidConnectionString
            case connectionFailed
            case connectionTimeout
            case authenticationFailed
            case databaseNotFound
            case tlsFailed
            case unsupportedServer
            case readOnlySession
            case pooledConnection
            case connectionLost
            case sessionClosed
            case queryFailed
            case invalidParameter
            case invalidIdentifier
            case unexpectedResult
            case schemaMismatch
            case migrationFailed
            case invalidConfiguration
            case unknownElection
        }

        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// The connection string (URL or `key=value` list) could not be parsed by libpq.
        public static let invalidConnectionString = Code(.invalidConnectionString)
        /// The server could not be reached or refused the connection for a reason not covered by a narrower code.
        public static let connectionFailed = Code(.connectionFailed)
        /// No server answered within `connect_timeout`.
        public static let connectionTimeout = Code(.connectionTimeout)
        /// The server rejected the credentials (wrong password, unknown role, no `pg_hba.conf` entry).
        public static let authenticationFailed = Code(.authenticationFailed)
        /// The server is reachable but the database named in the connection string does not exist.
        public static let databaseNotFound = Code(.databaseNotFound)
        /// TLS could not be established or the server's certificate was refused (`sslmode=verify-ca/verify-full`).
        public static let tlsFailed = Code(.tlsFailed)
        /// The server is older than PostgreSQL 14, which Stoker requires (`idle_session_timeout`).
        public static let unsupportedServer = Code(.unsupportedServer)
        /// The session is read-only: a hot standby, or `default_transaction_read_only` is on. Stoker needs the primary.
        public static let readOnlySession = Code(.readOnlySession)
        /// The connection goes through a transaction-pooling proxy (PgBouncer in transaction or statement mode), which
        /// breaks session advisory locks and `LISTEN`.
        public static let pooledConnection = Code(.pooledConnection)
        /// An established connection broke (server restart, `pg_terminate_backend`, network failure).
        public static let connectionLost = Code(.connectionLost)
        /// The session was closed by this process; no further statements can run on it.
        public static let sessionClosed = Code(.sessionClosed)
        /// The server reported an error for a statement; see ``StokerError/sqlState``.
        public static let queryFailed = Code(.queryFailed)
        /// A value handed to Stoker cannot be sent to PostgreSQL as it is (a NUL byte, an oversized payload).
        public static let invalidParameter = Code(.invalidParameter)
        /// A schema, channel or other SQL name is empty, too long (over 63 bytes) or holds a NUL byte.
        public static let invalidIdentifier = Code(.invalidIdentifier)
        /// The server answered with something Stoker did not expect (a NULL, a wrong column count, an unparsable value).
        public static let unexpectedResult = Code(.unexpectedResult)
        /// The Stoker schema in the database differs from what this version expects (a dropped column, a changed type,
        /// a migration whose recorded checksum differs from the library's copy).
        public static let schemaMismatch = Code(.schemaMismatch)
        /// Applying a migration failed; nothing of it was committed.
        public static let migrationFailed = Code(.migrationFailed)
        /// A ``StokerNode/Configuration`` or ``Activator`` value is out of range or inconsistent (a lease shorter than
        /// the heartbeat, an empty name, a second activator for one election on one node).
        public static let invalidConfiguration = Code(.invalidConfiguration)
        /// The election named does not exist in the cluster (a trigger sent to it): no node has ever run an activator
        /// for it, or a name is misspelt.
        public static let unknownElection = Code(.unknownElection)

        public var description: String { base.rawValue }
    }

    /// What went wrong.
    public var code: Code
    /// What happened and, where there is one, what to do about it.
    public var message: String
    /// The five-character SQLSTATE the server sent, when it sent one.
    public var sqlState: String?
    /// The server's or libpq's own message, scrubbed of secrets.
    public var serverMessage: String?
    /// The connection the error happened on, e.g. `host=db.internal port=5432 dbname=app user=svc`, never a password.
    public var connection: String?

    public init(
        _ code: Code,
        _ message: String,
        sqlState: String? = nil,
        serverMessage: String? = nil,
        connection: String? = nil
    ) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.serverMessage = serverMessage
        self.connection = connection
    }

    public var description: String {
        var text = "StokerError.\(code): \(message)"
        if let serverMessage, !serverMessage.isEmpty {
            text += " — server said: \(serverMessage)"
        }
        if let sqlState { text += " [SQLSTATE \(sqlState)]" }
        if let connection, !connection.isEmpty { text += " (connection: \(connection))" }
        return text
    }
}
