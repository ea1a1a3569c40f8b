#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

extension StokerNode {
    /// Everything a node needs: where PostgreSQL is, which cluster it joins under which name, and the timing settings
    /// whose defaults and bounds the table below gives. Checked when the ``StokerNode`` is created; every
    /// inconsistency is a ``StokerError/Code/invalidConfiguration`` error naming the field.
    ///
    /// | setting | default | what it bounds |
    /// | --- | --- | --- |
    /// | ``lease`` | 5 s | failover after a freeze or partition ≤ lease + retry + a round-trip |
    /// | ``heartbeatInterval`` | lease / 5 | lease renewal (both sessions) |
    /// | ``retryInterval`` | the heartbeat | the followers' fallback retry; crash, server-kill and hand-over failover are
    ///   event-driven and do not wait for it |
    /// | ``margin`` | lease / 10 | how much earlier than the server the node gives leadership up |
    /// | ``statementTimeout`` | lease / 2 | the longest a statement of the node's session may run |
    /// | ``sweepInterval`` | the heartbeat, at most 1 s | a dead member's `node_down` (≤ sweep + a round-trip; when the
    ///   sweeper itself died, ≤ heartbeat + a round-trip) |
    public struct Configuration: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
        /// A libpq connection string: a `postgresql://` URL or `key=value` pairs; empty means libpq's `PG*`
        /// environment variables. Must reach a read-write primary directly or through a session-mode pooler.
        public var connection: String
        /// The cluster: every process of one service uses the same name. 1–255 bytes, no NUL.
        public var cluster: String
        /// This process's name in the cluster (shown in `whereis`, `dump` and membership events). 1–255 bytes, no
        /// NUL. Defaults to `<hostname>:<pid>`.
        public var nodeName: String
        /// The schema holding Stoker's tables (at most 52 bytes).
        public var schema: String = StokerSchema.defaultSchema
        /// Apply missing migrations when connecting (needs CREATE on the database, or on the schema once it exists).
        /// With `false` the node only checks that the schema is complete and unaltered — for a least-privilege role
        /// (see ``StokerSchema/grant(to:connection:schema:)``).
        public var migrate: Bool = true
        /// The server ends the session, releasing every lock it holds, after this long without a query
        /// (`idle_session_timeout`); the node gives leadership up `margin` before that. At least 100 ms, at most a day.
        public var lease: Duration = .seconds(5)
        /// How often the node renews its lease with a heartbeat; `nil` means `lease / 5`. At most half of
        /// `lease − margin`.
        public var heartbeatInterval: Duration?
        /// How often a follower tries to take the locks of its elections when nothing told it to; `nil` means the
        /// heartbeat interval (the retry then rides on the heartbeat's statement). Failover does not wait for it:
        /// a hand-over's `released` notification, and a dead leader's `node_down` (its witness session's end, seen by
        /// the node watching it), make followers try at once. It bounds the rare case those miss — a frozen or
        /// partitioned leader whose main session outlives its witness by a moment.
        public var retryInterval: Duration?
        /// How long before the server can release its locks the node demotes itself; `nil` means `lease / 10`. Covers
        /// scheduling delays and clock-rate differences. Must be below `lease / 2`.
        public var margin: Duration?
        /// `statement_timeout` of the node's session; `nil` means `lease / 2`. Must be below `lease`.
        public var statementTimeout: Duration?
        /// How often dead nodes are looked for; `nil` means the heartbeat interval, at most 1 s. One node of the schema
        /// — the holder of its sweeper token, which the others try to take with their heartbeats — deletes the rows
        /// whose node lock is gone, in every cluster (each such row's `node_down` goes out once, reason `died`).
        /// Reading `pg_locks` takes every lock-partition lock of the server, so it happens once per interval however
        /// many nodes there are. At most a minute.
        public var sweepInterval: Duration?
        /// The first wait before reconnecting after the session was lost; doubled (with jitter) after every failed
        /// attempt, up to ``maximumReconnectDelay``.
        public var reconnectDelay: Duration = .milliseconds(100)
        public var maximumReconnectDelay: Duration = .seconds(5)

        public init(connection: String, cluster: String, nodeName: String? = nil) {
            self.connection = connection
            self.cluster = cluster
            self.nodeName = nodeName ?? Self.defaultNodeName()
        }

        /// Every setting, with the connection string's password removed (also what `dump` and test failures show).
        public var description: String {
            let shown = (try? ConnectionConfiguration(connection).redactedDescription) ?? "(unparsable, hidden)"
            return "StokerNode.Configuration(connection: \(shown), cluster: \(cluster), nodeName: \(nodeName), "
                + "schema: \(schema), migrate: \(migrate), lease: \(lease), heartbeatInterval: "
                + "\(effectiveHeartbeatInterval), retryInterval: \(effectiveRetryInterval), margin: \(effectiveMargin), "
                + "statementTimeout: \(effectiveStatementTimeout), sweepInterval: \(effectiveSweepInterval), "
                + "reconnectDelay: \(reconnectDelay)...\(maximumReconnectDelay))"
        }

        public var debugDescription: String { description }

        /// Mirrors show the redacted description only, never the connection string.
        public var customMirror: Mirror { Mirror(self, children: ["description": description]) }

        /// `<hostname>:<pid>`.
        public static func defaultNodeName() -> String {
            "\(NodeDriver.hostName ?? "localhost"):\(getpid())"
        }

        var effectiveHeartbeatInterval: Duration { heartbeatInterval ?? lease / 5 }
        var effectiveMargin: Duration { margin ?? lease / 10 }
        var effectiveRetryInterval: Duration { retryInterval ?? effectiveHeartbeatInterval }
        var effectiveStatementTimeout: Duration { statementTimeout ?? lease / 2 }
        var effectiveSweepInterval: Duration { sweepInterval ?? min(effectiveHeartbeatInterval, .seconds(1)) }
        /// `client_connection_check_interval`: how soon a backend busy with a statement notices its client is gone.
        var connectionCheckInterval: Duration { min(.seconds(1), lease / 5) }

        /// The longest a name may be: the tables' CHECK, and far below the 8000-byte notification payload.
        public static let maximumNameLength = 255

        func validate() throws(StokerError) {
            try Self.validateName(cluster, kind: "cluster name")
            try Self.validateName(nodeName, kind: "node name")
            try StokerSchema.validate(schema: schema)
            try Self.positive(lease, "lease")
            if lease < .milliseconds(100) || lease > .seconds(86_400) {
                throw invalid("lease is \(lease); it must be between 100 ms and one day (default 5 s).")
            }
            try Self.positive(effectiveHeartbeatInterval, "heartbeatInterval")
            try Self.positive(effectiveRetryInterval, "retryInterval")
            try Self.positive(effectiveMargin, "margin")
            try Self.positive(effectiveStatementTimeout, "statementTimeout")
            try Self.positive(effectiveSweepInterval, "sweepInterval")
            if effectiveSweepInterval > .seconds(60) {
                throw invalid("sweepInterval is \(effectiveSweepInterval); it must be at most a minute (default 1 s).")
            }
            try Self.positive(reconnectDelay, "reconnectDelay")
            try Self.positive(maximumReconnectDelay, "maximumReconnectDelay")
            if effectiveMargin >= lease / 2 {
                throw invalid(
                    "margin (\(effectiveMargin)) must be below half the lease (\(lease)); default lease / 10.")
            }
            if effectiveHeartbeatInterval > (lease - effectiveMargin) / 2 {
                throw invalid(
                    "heartbeatInterval (\(effectiveHeartbeatInterval)) must be at most half of lease − margin "
                        + "(\(lease - effectiveMargin)), so one late heartbeat cannot cost the lease; default lease / 5."
                )
            }
            if effectiveStatementTimeout >= lease {
                throw invalid(
                    "statementTimeout (\(effectiveStatementTimeout)) must be shorter than the lease (\(lease)); "
                        + "default lease / 2.")
            }
            if effectiveRetryInterval > .seconds(86_400) {
                throw invalid("retryInterval is \(effectiveRetryInterval); it must be at most one day.")
            }
            if maximumReconnectDelay > .seconds(3600) {
                throw invalid("maximumReconnectDelay is \(maximumReconnectDelay); it must be at most one hour.")
            }
            if reconnectDelay > maximumReconnectDelay {
                throw invalid(
                    "reconnectDelay (\(reconnectDelay)) must not exceed maximumReconnectDelay "
                        + "(\(maximumReconnectDelay)).")
            }
        }

        static func validateName(_ name: String, kind: String) throws(StokerError) {
            if name.isEmpty {
                throw StokerError(.invalidConfiguration, "The \(kind) is empty; give it a name.")
            }
            if name.utf8.contains(0) {
                throw StokerError(.invalidConfiguration, "The \(kind) contains a NUL byte; remove it.")
            }
            let length = name.utf8.count
            if length > maximumNameLength {
                throw StokerError(
                    .invalidConfiguration,
                    "The \(kind) \"\(name.prefix(20))…\" is \(length) bytes; at most \(maximumNameLength) are allowed."
                )
            }
        }

        private static func positive(_ value: Duration, _ name: String) throws(StokerError) {
            if value <= .zero {
                throw StokerError(.invalidConfiguration, "\(name) is \(value); it must be positive.")
            }
        }

        private func invalid(_ message: String) -> StokerError {
            StokerError(.invalidConfiguration, message)
        }
    }
}

/// A NUL-terminated C buffer as a Swift string (invalid UTF-8 repaired).
func decodeCString(_ buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}

extension Duration {
    /// Whole milliseconds, rounded up (PostgreSQL's timeouts are integer milliseconds; 0 would mean "off").
    var roundedUpMilliseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
    }

    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000
    }
}
