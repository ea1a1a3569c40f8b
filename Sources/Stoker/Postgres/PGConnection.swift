import CStokerLibPQ

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// One libpq connection (`PGconn`).
///
/// Deliberately **not** `Sendable`: it is created on the thread that owns it (see ``PostgresSession``) and the
/// compiler refuses to let it leave that thread. Every call here may block on the network, so none of them may run
/// on Swift's cooperative thread pool.
final class PGConnection {
    private let raw: OpaquePointer
    /// Set by libpq's notice receiver (on this thread, inside a libpq call) when the server announces the end of
    /// the session with a FATAL/PANIC outside a statement. Lives as long as the connection: `deinit` runs `PQfinish`
    /// before the stored properties are released.
    private let fatalNotice = FatalNotice()
    let configuration: ConnectionConfiguration
    /// Notifications libpq has received but nobody has taken yet.
    private var notifications: [PostgresNotification] = []
    /// The server's `max_identifier_length`, read on connect.
    private(set) var maximumIdentifierLength = SQLName.defaultMaximumLength
    /// `true` when the backend pid libpq got in the protocol differs from `pg_backend_pid()`: a proxy sits between.
    private(set) var isBehindProxy = false
    /// The statements prepared on this session (``prepare(_:)``): SQL text → statement name.
    private var prepared: [String: String] = [:]
    /// How many names ``prepare(_:)`` has given out: `stoker_<n>` is never reused on a session.
    private var preparedNames = 0

    /// Connects (blocking), then checks that the server can carry Stoker: PostgreSQL ≥ 14, a read-write primary,
    /// and no transaction-pooling proxy in between.
    ///
    /// - Parameter isProbe: `true` for the short-lived second connection of the pooling check (it checks nothing).
    init(_ configuration: ConnectionConfiguration, isProbe: Bool = false) throws(StokerError) {
        self.configuration = configuration
        var keywords = configuration.options.map(\.keyword)
        var values = configuration.options.map(\.value)
        if configuration.value(for: "fallback_application_name") == nil {
            keywords.append("fallback_application_name")
            values.append("stoker")
        }
        // Swift strings are UTF-8: always ask for it, whatever the string or PGCLIENTENCODING said.
        keywords.append("client_encoding")
        values.append("UTF8")
        let connection = withCStringArray(keywords) { keywordPointers in
            withCStringArray(values) { valuePointers in
                PQconnectdbParams(keywordPointers, valuePointers, 0)
            }
        }
        guard let connection else {
            throw StokerError(.connectionFailed, "libpq could not allocate a connection (out of memory).")
        }
        guard PQstatus(connection) == CONNECTION_OK else {
            let message = trimmed(String(cString: PQerrorMessage(connection)))
            PQfinish(connection)
            throw Self.connectFailure(
                message, redactor: configuration.redactor, connection: configuration.redactedDescription)
        }
        self.raw = connection
        // libpq's default notice processor prints to stderr (e.g. the FATAL of an administrator's
        // pg_terminate_backend on an idle session). A library must not write there: the loss is reported through
        // `.connectionLost` and the server's message instead.
        //
        // A FATAL or PANIC arriving outside a statement (libpq hands it to the notice receiver, and the connection
        // stays "OK" until the socket's EOF) means the session is over *now*: PostgreSQL sends it before it releases
        // the session's locks, so the owner must treat it as the loss at once, not wait for the EOF: a successor may
        // be granted those locks any moment now, and two nodes must never both act as leader.
        PQsetNoticeReceiver(
            connection,
            { context, result in
                guard let context, let result,
                    let severity = PQresultErrorField(result, Int32(UInt8(ascii: "V"))).map({ String(cString: $0) }),
                    severity == "FATAL" || severity == "PANIC"
                else { return }
                let box = Unmanaged<FatalNotice>.fromOpaque(context).takeUnretainedValue()
                box.message =
                    PQresultErrorField(result, Int32(UInt8(ascii: "M"))).map { String(cString: $0) } ?? severity
            },
            Unmanaged.passUnretained(fatalNotice).toOpaque()
        )
        if !isProbe { try verifyServer() }
    }

    deinit {
        PQfinish(raw)
    }

    // MARK: - Facts about the session

    /// The description of this connection with the password removed (the host and port libpq actually used).
    var redactedDescription: String {
        let host = PQhost(raw).map { String(cString: $0) } ?? ""
        let port = PQport(raw).map { String(cString: $0) } ?? ""
        let database = PQdb(raw).map { String(cString: $0) } ?? ""
        let user = PQuser(raw).map { String(cString: $0) } ?? ""
        return configuration.redactor.scrub("host=\(host) port=\(port) dbname=\(database) user=\(user)")
    }

    /// The server version as an integer, e.g. 150018 for 15.18.
    var serverVersion: Int { Int(PQserverVersion(raw)) }

    /// The backend pid libpq received when the session started (a proxy may invent its own).
    var protocolBackendPID: Int32 { PQbackendPID(raw) }

    /// The socket to `poll` on; it changes only on reconnect, which makes a new `PGConnection`.
    var socket: Int32 { PQsocket(raw) }

    /// Connected, and no FATAL notice has announced the session's end: `false` once libpq has seen the connection break.
    var isHealthy: Bool { PQstatus(raw) == CONNECTION_OK && fatalNotice.message == nil }

    /// The session stands and no transaction block is open: a failed statement can be followed by another (to
    /// deallocate and prepare again) without a transaction's error state in the way.
    private var isIdle: Bool { isHealthy && PQtransactionStatus(raw) == PQTRANS_IDLE }

    // MARK: - Statements

    /// Runs one statement with bound parameters (text format; `nil` is NULL). Values are never spliced into SQL.
    @discardableResult
    func execute(_ sql: String, _ parameters: [String?] = []) throws(StokerError) -> QueryResult {
        try check(sql, parameters)
        return try finish(
            withCStringArray(parameters) { pointers in
                PQexecParams(raw, sql, Int32(parameters.count), nil, pointers, nil, nil, 0)
            })
    }

    /// Prepares `sql` as a named statement of this session, once (a round trip the first time): ``executePrepared(_:_:)``
    /// and ``sendPrepared(_:_:)`` then skip the server's parsing and, once it settles on a generic plan, the planning.
    /// For a session that runs the same few statements all its life — a node's heartbeats and waits — parsing and
    /// planning were a third of the server's CPU (a profile of an idle 50-node cluster). Named statements live as long
    /// as the session: only session pooling keeps them, and that is the only pooling a connection accepts.
    func prepare(_ sql: String) throws(StokerError) {
        try check(sql)
        _ = try preparedName(sql)
    }

    /// Runs `sql` as a prepared statement (see ``prepare(_:)``; prepared now if it is not yet) with bound parameters.
    /// A statement the schema changed under (a migration while the session runs) is prepared anew, once.
    @discardableResult
    func executePrepared(_ sql: String, _ parameters: [String?]) throws(StokerError) -> QueryResult {
        try check(sql, parameters)
        do {
            return try runPrepared(try preparedName(sql), parameters)
        } catch let error where error.sqlState == Self.cachedPlanChanged && isIdle {
            // "cached plan must not change result type", raised when the statement is bound, before it runs: forget
            // the statement and prepare it again under a new name.
            guard let name = prepared.removeValue(forKey: sql) else { throw error }
            try execute("DEALLOCATE \(name)")
            return try runPrepared(try preparedName(sql), parameters)
        }
    }

    /// Sends `sql` as a prepared statement (see ``prepare(_:)``) without waiting for the answer; collect it with
    /// ``awaitResult(until:)``.
    func sendPrepared(_ sql: String, _ parameters: [String?]) throws(StokerError) {
        try check(sql, parameters)
        let name = try preparedName(sql)
        let sent = withCStringArray(parameters) { pointers in
            PQsendQueryPrepared(raw, name, Int32(parameters.count), pointers, nil, nil, 0)
        }
        if sent == 0 {
            throw failure(sqlState: nil, serverMessage: trimmed(String(cString: PQerrorMessage(raw))))
        }
    }

    /// SQLSTATE 0A000 (feature_not_supported): what a prepared statement whose result columns a migration changed
    /// fails with ("cached plan must not change result type").
    private static let cachedPlanChanged = "0A000"

    /// The name `sql` is prepared under on this session, preparing it first if need be. Callers ``check(_:_:)`` it.
    private func preparedName(_ sql: String) throws(StokerError) -> String {
        if let name = prepared[sql] { return name }
        preparedNames += 1
        let name = "stoker_\(preparedNames)"
        do {
            try prepare(sql, as: name)
        } catch  where error.sqlState == Self.duplicatePreparedStatement && isIdle {
            // Left on the server connection by an earlier client of a session pool that does not reset it.
            try execute("DEALLOCATE \(name)")
            try prepare(sql, as: name)
        }
        prepared[sql] = name
        return name
    }

    /// SQLSTATE 42P05 (duplicate_prepared_statement).
    private static let duplicatePreparedStatement = "42P05"

    private func prepare(_ sql: String, as name: String) throws(StokerError) {
        _ = try finish(PQprepare(raw, name, sql, 0, nil))
    }

    private func runPrepared(_ name: String, _ parameters: [String?]) throws(StokerError) -> QueryResult {
        try finish(
            withCStringArray(parameters) { pointers in
                PQexecPrepared(raw, name, Int32(parameters.count), pointers, nil, nil, 0)
            })
    }

    /// What a statement's `PGresult` says (cleared here), after taking the notifications that came with it; throws
    /// when the session has ended meanwhile.
    private func finish(_ result: OpaquePointer?) throws(StokerError) -> QueryResult {
        defer { if let result { PQclear(result) } }
        drainNotifications()
        let value = try makeResult(result)
        try requireHealthy()
        return value
    }

    /// Refuses a NUL byte in the SQL text or a parameter: libpq would cut the string there.
    private func check(_ sql: String, _ parameters: [String?] = []) throws(StokerError) {
        if sql.utf8.contains(0) {
            throw StokerError(.invalidParameter, "The SQL text contains a NUL byte.")
        }
        for (index, parameter) in parameters.enumerated() where parameter?.utf8.contains(0) == true {
            throw StokerError(
                .invalidParameter,
                "Parameter $\(index + 1) contains a NUL byte, which PostgreSQL text cannot hold; "
                    + "remove it or store the value as bytea."
            )
        }
    }

    /// Runs SQL that may hold several statements and no parameters (simple query protocol), e.g. a migration file.
    @discardableResult
    func executeScript(_ sql: String) throws(StokerError) -> QueryResult {
        try check(sql)
        return try finish(PQexec(raw, sql))
    }

    /// Sends `sql` (no parameters; several statements allowed) without waiting for the answer; collect it with
    /// ``awaitResult(until:)``.
    func send(_ sql: String) throws(StokerError) {
        if PQsendQuery(raw, sql) == 0 {
            throw failure(sqlState: nil, serverMessage: trimmed(String(cString: PQerrorMessage(raw))))
        }
    }

    /// Waits for the answer to ``send(_:)`` until `deadline` (`nil`: no deadline) in `poll(2)`. Returns the last
    /// statement's rows, or `nil` when the deadline passed first — the statement is then still pending: call again,
    /// or drop the connection.
    func awaitResult(until deadline: ContinuousClock.Instant?) throws(StokerError) -> QueryResult? {
        var outcome: Result<QueryResult, StokerError>?
        while true {
            if PQconsumeInput(raw) == 0 {
                throw failure(sqlState: nil, serverMessage: trimmed(String(cString: PQerrorMessage(raw))))
            }
            while PQisBusy(raw) == 0 {
                guard let result = PQgetResult(raw) else {
                    drainNotifications()
                    switch outcome {
                    case .success(let rows)?: return rows
                    case .failure(let error)?: throw error
                    case nil: throw StokerError(.unexpectedResult, "The server sent no result.")
                    }
                }
                defer { PQclear(result) }
                do {
                    let rows = try makeResult(result)
                    if case .failure = outcome {} else { outcome = .success(rows) }
                } catch {
                    if case .failure = outcome {} else { outcome = .failure(error) }
                }
            }
            var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, deadline.map { Self.milliseconds(until: $0) } ?? -1)
            if ready < 0, errno != EINTR {
                throw StokerError(
                    .connectionLost, "poll(2) failed with errno \(errno).", connection: redactedDescription)
            }
            if ready == 0, let deadline, ContinuousClock.now >= deadline { return nil }
        }
    }

    /// Runs `body` inside BEGIN … COMMIT; rolls back when it throws (if the connection still stands).
    @discardableResult
    func transaction<T>(_ body: () throws -> T) throws -> T {
        try inTransaction(ending: "COMMIT", body)
    }

    /// Runs `body` inside BEGIN … ROLLBACK, also when it returns: nothing it writes is committed, seen by another
    /// session or notified. Session-level advisory locks are not transactional: those it takes or gives back stay so.
    @discardableResult
    func rolledBack<T>(_ body: () throws -> T) throws -> T {
        try inTransaction(ending: "ROLLBACK", body)
    }

    private func inTransaction<T>(ending end: String, _ body: () throws -> T) throws -> T {
        try execute("BEGIN")
        do {
            let value = try body()
            try execute(end)
            return value
        } catch {
            if isHealthy, PQtransactionStatus(raw) != PQTRANS_IDLE {
                _ = try? execute("ROLLBACK")
            }
            throw error
        }
    }

    private func makeResult(_ result: OpaquePointer?) throws(StokerError) -> QueryResult {
        guard let result else {
            throw failure(sqlState: nil, serverMessage: trimmed(String(cString: PQerrorMessage(raw))))
        }
        switch PQresultStatus(result) {
        case PGRES_COMMAND_OK, PGRES_EMPTY_QUERY:
            return QueryResult(columns: [], rows: [], affectedRows: Self.affectedRows(result))
        case PGRES_TUPLES_OK:
            let columnCount = Int(PQnfields(result))
            let rowCount = Int(PQntuples(result))
            let columns = (0..<columnCount).map { String(cString: PQfname(result, Int32($0))) }
            var rows: [QueryResult.Row] = []
            rows.reserveCapacity(rowCount)
            for row in 0..<Int32(rowCount) {
                var values: [String?] = []
                values.reserveCapacity(columnCount)
                for column in 0..<Int32(columnCount) {
                    if PQgetisnull(result, row, column) != 0 {
                        values.append(nil)
                    } else {
                        let length = Int(PQgetlength(result, row, column))
                        let bytes = UnsafeRawBufferPointer(start: PQgetvalue(result, row, column), count: length)
                        values.append(String(decoding: bytes, as: UTF8.self))
                    }
                }
                rows.append(QueryResult.Row(values: values))
            }
            return QueryResult(columns: columns, rows: rows, affectedRows: nil)
        default:
            let sqlState = Self.field(result, "C")
            var message = Self.field(result, "M") ?? trimmed(String(cString: PQresultErrorMessage(result)))
            if let detail = Self.field(result, "D") { message += " DETAIL: \(detail)" }
            if let hint = Self.field(result, "H") { message += " HINT: \(hint)" }
            // FATAL and PANIC end the session, also when libpq has not yet seen the socket close (the never-translated
            // severity, field V).
            let severity = Self.field(result, "V")
            throw failure(
                sqlState: sqlState, serverMessage: message, endsSession: severity == "FATAL" || severity == "PANIC")
        }
    }

    private func failure(sqlState: String?, serverMessage: String, endsSession: Bool = false) -> StokerError {
        let scrubbed = configuration.redactor.scrub(serverMessage)
        if endsSession || !isHealthy {
            return StokerError(
                .connectionLost,
                "The connection to PostgreSQL was lost.",
                sqlState: sqlState,
                serverMessage: scrubbed,
                connection: redactedDescription
            )
        }
        return StokerError(
            .queryFailed,
            "PostgreSQL rejected the statement.",
            sqlState: sqlState,
            serverMessage: scrubbed,
            connection: redactedDescription
        )
    }

    private static func field(_ result: OpaquePointer, _ code: Unicode.Scalar) -> String? {
        PQresultErrorField(result, Int32(code.value)).map { String(cString: $0) }
    }

    private static func affectedRows(_ result: OpaquePointer) -> Int? {
        guard let text = PQcmdTuples(result) else { return nil }
        return Int(String(cString: text))
    }

    // MARK: - Names

    /// Quotes a name with libpq's `PQescapeIdentifier`, after ``SQLName/validate(_:kind:maximumLength:)``.
    func quoteIdentifier(_ name: String, kind: String = "name") throws(StokerError) -> String {
        try SQLName.validate(name, kind: kind, maximumLength: maximumIdentifierLength)
        guard let quoted = PQescapeIdentifier(raw, name, name.utf8.count) else {
            throw StokerError(
                .invalidIdentifier,
                "libpq could not quote the \(kind): \(trimmed(String(cString: PQerrorMessage(raw))))"
            )
        }
        defer { PQfreemem(quoted) }
        return String(cString: quoted)
    }

    // MARK: - LISTEN / NOTIFY

    /// The largest payload `NOTIFY` accepts (the server's limit is "shorter than 8000 bytes").
    static let maximumPayloadLength = 7999

    func listen(_ channel: String) throws(StokerError) {
        try execute("LISTEN \(quoteIdentifier(channel, kind: "channel name"))")
    }

    func unlisten(_ channel: String) throws(StokerError) {
        try execute("UNLISTEN \(quoteIdentifier(channel, kind: "channel name"))")
    }

    func notify(_ channel: String, payload: String) throws(StokerError) {
        try SQLName.validate(channel, kind: "channel name", maximumLength: maximumIdentifierLength)
        if payload.utf8.count > Self.maximumPayloadLength {
            throw StokerError(
                .invalidParameter,
                "The notification payload is \(payload.utf8.count) bytes; PostgreSQL accepts at most "
                    + "\(Self.maximumPayloadLength). Send a key and keep the data in a table."
            )
        }
        try execute("SELECT pg_notify($1, $2)", [channel, payload])
    }

    /// Hands out the notifications received so far (after statements and ``waitForNotifications(until:wakeDescriptor:)``).
    func takeNotifications() -> [PostgresNotification] {
        defer { notifications.removeAll() }
        return notifications
    }

    /// Throws ``StokerError/Code/connectionLost`` when the session is over — also when a FATAL arrived right behind a
    /// good reply: that reply must not be taken as proof the session lives.
    private func requireHealthy() throws(StokerError) {
        guard !isHealthy else { return }
        throw connectionLost()
    }

    /// The session is over: the server's FATAL if one came, else libpq's message — scrubbed of secrets.
    func connectionLost() -> StokerError {
        StokerError(
            .connectionLost,
            "The connection to PostgreSQL was lost.",
            serverMessage: configuration.redactor.scrub(
                fatalNotice.message ?? trimmed(String(cString: PQerrorMessage(raw)))),
            connection: redactedDescription
        )
    }

    /// Reads whatever arrived on the socket; throws ``StokerError/Code/connectionLost`` when the connection broke.
    func consumeInput() throws(StokerError) {
        let consumed = PQconsumeInput(raw)
        // PQconsumeInput only fills the buffer; PQnotifies parses it — and hands a FATAL to the notice receiver. Parse
        // first, then judge the connection: a FATAL read together with a notification must not wait for the EOF.
        drainNotifications()
        if consumed == 0 { throw connectionLost() }
        try requireHealthy()
    }

    private func drainNotifications() {
        while let notify = PQnotifies(raw) {
            notifications.append(
                PostgresNotification(
                    channel: String(cString: notify.pointee.relname),
                    payload: String(cString: notify.pointee.extra),
                    senderPID: notify.pointee.be_pid
                )
            )
            PQfreemem(notify)
        }
    }

    enum WaitOutcome: Equatable {
        /// At least one notification is ready in ``takeNotifications()``.
        case notified
        /// `wakeDescriptor` (an eventfd) was written to; its counter has been reset.
        case woken
        /// The deadline passed with nothing to report.
        case deadlineReached
        /// `watchDescriptor` (another connection's socket) is readable; nothing was read from it.
        case watched
    }

    /// Sleeps in `poll(2)` on the connection's socket (and `wakeDescriptor` and `watchDescriptor`, when given) until a
    /// notification arrives, the wake descriptor fires, the watched descriptor becomes readable or `deadline` passes
    /// (`nil`: no deadline). No busy loop, no sleep loop: the thread wakes only when the kernel has something for it or
    /// the deadline is due. `pollCount` counts the `poll` calls.
    func waitForNotifications(
        until deadline: ContinuousClock.Instant?,
        wakeDescriptor: Int32? = nil,
        watchDescriptor: Int32? = nil,
        pollCount: inout Int
    ) throws(StokerError) -> WaitOutcome {
        drainNotifications()
        if !isHealthy { try consumeInput() }  // a FATAL already parsed: report the loss now, not at the EOF
        if !notifications.isEmpty { return .notified }
        while true {
            var descriptors = [pollfd(fd: socket, events: Int16(POLLIN), revents: 0)]
            if let wakeDescriptor {
                descriptors.append(pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0))
            }
            if let watchDescriptor, watchDescriptor >= 0 {
                descriptors.append(pollfd(fd: watchDescriptor, events: Int16(POLLIN), revents: 0))
            }
            let timeout = deadline.map { Self.milliseconds(until: $0) } ?? -1
            pollCount += 1
            let ready = poll(&descriptors, nfds_t(descriptors.count), timeout)
            if ready < 0 {
                if errno == EINTR { continue }
                throw StokerError(
                    .connectionLost, "poll(2) failed with errno \(errno).", connection: redactedDescription)
            }
            if ready == 0 {
                if let deadline, ContinuousClock.now >= deadline { return .deadlineReached }
                continue
            }
            if descriptors[0].revents != 0 {
                try consumeInput()
                if !notifications.isEmpty { return .notified }
            }
            if let wake = descriptors.firstIndex(where: { $0.fd == wakeDescriptor }), wake > 0,
                descriptors[wake].revents != 0
            {
                var counter: UInt64 = 0
                _ = read(descriptors[wake].fd, &counter, MemoryLayout<UInt64>.size)
                return .woken
            }
            if let watched = descriptors.firstIndex(where: { $0.fd == watchDescriptor }), watched > 0,
                descriptors[watched].revents != 0
            {
                return .watched
            }
        }
    }

    /// Milliseconds until `deadline`, rounded up so that a poll never returns just before it is due.
    private static func milliseconds(until deadline: ContinuousClock.Instant) -> Int32 {
        let remaining = ContinuousClock.now.duration(to: deadline)
        if remaining <= .zero { return 0 }
        let (seconds, attoseconds) = remaining.components
        let milliseconds = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: milliseconds)
    }

    // MARK: - Server checks

    /// How long any step of the pooling probe waits for an answer.
    static let probeWait = Duration.seconds(2)

    /// Refuses servers Stoker cannot be correct on (see ``ServerRequirements``).
    private func verifyServer() throws(StokerError) {
        let facts = try execute(
            """
            SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), pg_backend_pid(),
                   current_setting('max_identifier_length')
            """
        ).singleRow()
        var report = ServerRequirements.Facts(
            serverVersion: serverVersion,
            inRecovery: try facts.bool(0),
            transactionReadOnly: try facts.string(1) == "on",
            protocolBackendPID: protocolBackendPID,
            backendPIDs: [try facts.int32(2)]
        )
        if report.backendPIDs[0] != protocolBackendPID {
            try probeForPooling(&report)
        } else {
            // Separate statements are separate transactions: a pooling proxy may hand each to another backend.
            report.backendPIDs.append(try execute("SELECT pg_backend_pid()").singleRow().int32(0))
        }
        do {
            isBehindProxy = try ServerRequirements.check(report)
        } catch var error {
            error.connection = redactedDescription
            throw error
        }
        maximumIdentifierLength = (try? facts.int(3)) ?? SQLName.defaultMaximumLength
    }

    /// A proxy invented the pid libpq got (PgBouncer does, in every mode). Whether it pools by transaction shows
    /// only under contention — a lone client gets the same idle server back — so make some: a probe connection asks
    /// for a transaction (in transaction mode it is handed the server our last statement used, or queues for one
    /// when the pool is busy) and, while it holds or waits for that server, we read our backend pid again. A
    /// session-mode client owns its server: it is answered at once, on the same backend, which the probe never
    /// shares. A transaction-mode client needs a server from the pool for every statement: it waits (refused), or
    /// runs elsewhere (refused), or shares the probe's (refused). Every wait is bounded by ``probeWait``.
    private func probeForPooling(_ report: inout ServerRequirements.Facts) throws(StokerError) {
        let probe = try PGConnection(configuration, isProbe: true)
        do {
            try probe.send("BEGIN; SELECT pg_backend_pid()")
            if let rows = try probe.awaitResult(until: .now + Self.probeWait) {
                report.probePID = try rows.singleRow().int32(0)
            }
        } catch {
            // PgBouncer in statement mode refuses transaction blocks (and drops the client).
            throw StokerError(
                .pooledConnection,
                "The connection goes through a proxy that refuses transaction blocks (PgBouncer in statement "
                    + "mode), which breaks session advisory locks and LISTEN. Connect Stoker directly to "
                    + "PostgreSQL, or through a pool in session mode (PgBouncer pool_mode=session).",
                sqlState: error.sqlState,
                serverMessage: error.serverMessage,
                connection: redactedDescription
            )
        }
        for _ in 0..<2 {
            try send("SELECT pg_backend_pid()")
            guard let rows = try awaitResult(until: .now + Self.probeWait) else {
                // Waiting for a server while the probe holds or queues for one: our backend is not ours alone.
                // The connection is refused and closed with the statement still pending.
                report.starvedWhileProbing = true
                return
            }
            report.backendPIDs.append(try rows.singleRow().int32(0))
        }
        if report.probePID == nil, let rows = try? probe.awaitResult(until: .now) {
            report.probePID = try? rows.singleRow().int32(0)  // the probe was answered meanwhile
        }
    }

    // MARK: - Connect failures

    /// Sorts libpq's connect failure message into a code. libpq has no SQLSTATE for a failed connection, so this reads
    /// the (English, C-locale) message libpq and the server give; anything unrecognised stays `.connectionFailed`.
    /// The code is chosen on libpq's raw message, before redaction (a password such as "failed" must not change it).
    static func connectFailure(_ message: String, redactor: Redactor, connection: String) -> StokerError {
        let lower = message.lowercased()
        func has(_ fragments: String...) -> Bool { fragments.contains { lower.contains($0) } }
        let code: StokerError.Code
        let advice: String
        if lower.hasPrefix("invalid "), has("connection option", "value:", "port number") {
            code = .invalidConnectionString
            advice = "libpq refused a value in the connection string. Fix the parameter named below."
        } else if has("timeout expired") {
            code = .connectionTimeout
            advice =
                "No PostgreSQL server answered within connect_timeout. Check the host, the port and the network path."
        } else if has("database \"") && has("does not exist") {
            code = .databaseNotFound
            advice = "The database does not exist on the server. Create it or fix dbname."
        } else if has(
            "password authentication failed", "authentication failed", "no password supplied",
            "no pg_hba.conf entry", "pg_hba.conf rejects", "password is required"
        ) || (has("role \"") && has("does not exist")) {
            code = .authenticationFailed
            advice =
                "PostgreSQL refused the credentials. Check the user name and password (or ~/.pgpass, PGPASSWORD) "
                + "and that pg_hba.conf admits this client."
        } else if has("ssl", "certificate", "tls") {
            code = .tlsFailed
            advice =
                "TLS could not be set up or the server's certificate was refused. Check sslmode, sslrootcert "
                + "and that the host name matches the certificate."
        } else if has("read-only", "hot standby", "in recovery", "is not in read-write") {
            code = .readOnlySession
            advice = "The server refused a read-write session (target_session_attrs). Point Stoker at the primary."
        } else {
            code = .connectionFailed
            advice = "Could not connect to PostgreSQL. Check the host, the port and that the server is running."
        }
        return StokerError(code, advice, serverMessage: redactor.scrub(message), connection: connection)
    }
}

/// Calls `body` with a NULL-terminated array of C strings (`nil` entries stay NULL: SQL NULL for parameters) that
/// live for the duration of the call.
private func withCStringArray<R>(_ strings: [String?], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let duplicates = strings.map { $0.map { strdup($0) } ?? nil }
    defer {
        for duplicate in duplicates { free(duplicate) }
    }
    let pointers: [UnsafePointer<CChar>?] = duplicates.map { $0.map { UnsafePointer($0) } } + [nil]
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}

/// The notice receiver's out-parameter: written and read only on the connection's owner thread.
private final class FatalNotice {
    var message: String?
}
