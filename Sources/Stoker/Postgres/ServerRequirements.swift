/// What a server must offer for Stoker to be correct on it, as a pure check over facts read on connect.
enum ServerRequirements {
    /// The oldest supported server: `idle_session_timeout`, on which the lease rests, arrived in PostgreSQL 14.
    static let minimumServerVersion = 140000

    struct Facts: Sendable, Equatable {
        /// `PQserverVersion`, e.g. 150018.
        var serverVersion: Int
        /// `pg_is_in_recovery()`: a hot standby.
        var inRecovery: Bool
        /// `transaction_read_only` of a fresh transaction.
        var transactionReadOnly: Bool
        /// The pid libpq received in BackendKeyData.
        var protocolBackendPID: Int32
        /// `pg_backend_pid()` read in several separate transactions.
        var backendPIDs: [Int32]
        /// Behind a proxy: the backend pid a second connection saw inside an open transaction.
        var probePID: Int32? = nil
        /// Behind a proxy: our statement had to wait for a server while the probe held a transaction open.
        var starvedWhileProbing = false
    }

    /// Throws for a server Stoker must not run on; returns whether a (session-mode) proxy sits in between.
    static func check(_ facts: Facts) throws(StokerError) -> Bool {
        if facts.serverVersion < minimumServerVersion {
            throw StokerError(
                .unsupportedServer,
                "PostgreSQL \(versionText(facts.serverVersion)) is too old: Stoker needs PostgreSQL 14 or later "
                    + "(its lease relies on idle_session_timeout)."
            )
        }
        if facts.inRecovery {
            throw StokerError(
                .readOnlySession,
                "The server is a hot standby (pg_is_in_recovery() is true). Advisory locks on a standby are local to "
                    + "it and LISTEN is refused, so two leaders could coexist: connect to the read-write primary, "
                    + "e.g. with target_session_attrs=read-write."
            )
        }
        if facts.transactionReadOnly {
            throw StokerError(
                .readOnlySession,
                "The session is read-only (default_transaction_read_only is on for this role, database or "
                    + "connection). Stoker writes its membership and election rows: use a read-write session."
            )
        }
        let sharesBackend = facts.probePID.map { facts.backendPIDs.contains($0) } ?? false
        if Set(facts.backendPIDs).count > 1 || sharesBackend || facts.starvedWhileProbing {
            throw StokerError(
                .pooledConnection,
                "This session does not own its PostgreSQL backend (pids "
                    + "\(facts.backendPIDs.map(String.init).joined(separator: ", "))"
                    + "\(facts.probePID.map { "; another connection got \($0)" } ?? "")"
                    + "\(facts.starvedWhileProbing ? "; it waited for a server while another held one" : "")): the "
                    + "connection goes through a transaction-pooling proxy such as PgBouncer in transaction mode, which silently breaks session "
                    + "advisory locks and LISTEN. Connect Stoker directly to PostgreSQL, or through a pool in session "
                    + "mode (PgBouncer pool_mode=session)."
            )
        }
        return facts.backendPIDs.first.map { $0 != facts.protocolBackendPID } ?? false
    }

    static func versionText(_ version: Int) -> String {
        version >= 100000
            ? "\(version / 10000).\(version % 10000)" : "\(version / 10000).\(version / 100 % 100).\(version % 100)"
    }
}
