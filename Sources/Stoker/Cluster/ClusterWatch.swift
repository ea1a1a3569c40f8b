extension StokerCluster {
    /// Membership and leadership changes of `cluster` as they happen, on a session of its own, until the consumer
    /// stops iterating or its task is cancelled.
    ///
    /// Nothing connects until the first `next()`. The first element is a ``ClusterWatchEvent/snapshot(_:)`` of the
    /// cluster; the changes follow, in the order the server committed them (the session listens on the cluster's
    /// notification channel before it reads the snapshot, so no change falls between the two). See
    /// ``ClusterChanges`` for reconnects and for what ends the sequence.
    ///
    /// ```swift
    /// for try await event in StokerCluster.watch(cluster: "billing", connection: url) {
    ///     switch event {
    ///     case .snapshot(let now): view = now
    ///     case .nodeDown(let member, let reason): log("\(member) left: \(reason)")
    ///     default: break
    ///     }
    /// }
    /// ```
    ///
    /// A bad name, a first connection that fails, or a schema that does not exist is a ``StokerError`` thrown by the
    /// first `next()`.
    public static func watch(
        cluster: String,
        connection: String,
        schema: String = StokerSchema.defaultSchema
    ) -> ClusterChanges {
        ClusterChanges(cluster: cluster, schema: schema, connection: connection)
    }

    /// `cluster`'s snapshot (the one statement of ``snapshotQuery(schema:namespace:)``) as `connection` reads it now;
    /// an unknown cluster is empty. Runs on the session's thread.
    static func readSnapshot(
        cluster: String,
        statements: ProtocolStatements,
        on connection: PGConnection
    ) throws -> ClusterSnapshot {
        let quoted = try connection.quoteIdentifier(statements.schema, kind: "schema name")
        let rows = try connection.execute(
            snapshotQuery(schema: quoted, namespace: statements.lockNamespace), [cluster]
        ).rows
        var snapshot = ClusterSnapshot(cluster: cluster, members: [], elections: [])
        for row in rows {
            /// The member in columns `id` and `id + 1`, when not NULL.
            func member(_ id: Int) throws(StokerError) -> ClusterMember? {
                row.isNull(id) ? nil : ClusterMember(id: try row.int(id), name: try row.string(id + 1))
            }
            switch try row.string(0) {
            case "m":
                snapshot.members.append(
                    ClusterSnapshot.Member(
                        member: ClusterMember(id: try row.int(1), name: try row.string(2)),
                        host: try row.string(3), pid: try row.int(4),
                        uptime: .milliseconds(try row.int(5)), sinceHeartbeat: .milliseconds(try row.int(6)),
                        draining: try row.bool(7), leads: []))
            case "s":
                snapshot.unswept.append(ClusterMember(id: try row.int(1), name: try row.string(2)))
            default:
                let leader = try member(4)
                let recorded = try member(7)
                snapshot.elections.append(
                    ClusterSnapshot.Election(
                        name: try row.string(2), term: Int64(try row.int(3)), leader: leader,
                        leaderFor: row.isNull(6) ? nil : .milliseconds(try row.int(6)),
                        recordedLeader: recorded == leader ? nil : recorded, waiter: try member(9),
                        pendingTriggers: try row.int(11)))
            }
        }
        for election in snapshot.elections {
            guard let leader = election.leader,
                let index = snapshot.members.firstIndex(where: { $0.member == leader })
            else { continue }
            snapshot.members[index].leads.append(election.name)
        }
        return snapshot
    }
}

/// One element of ``ClusterChanges``: the whole cluster (``snapshot(_:)``), or one change, as the server committed it.
///
/// Apply the changes to the last snapshot, in order, to know the cluster as it is. Each change is delivered once;
/// a change committed while a snapshot was being read may be in that snapshot and still be delivered after it, but
/// never one that would take the view back in time (a leadership older than the snapshot's term) and never a
/// ``nodeUp(_:)`` of a member or a ``leader(election:term:leader:)`` the snapshot already shows.
public enum ClusterWatchEvent: Sendable, Hashable {
    /// The cluster as it is, as ``StokerCluster/snapshot(cluster:connection:schema:)`` reads it: the first element;
    /// again after every reconnect; and once more when a cluster that did not exist when the watch began comes into
    /// being. It replaces everything known before: notifications are lost while the watch is disconnected, so the
    /// changes of that gap are not delivered one by one — only their outcome, in this snapshot.
    case snapshot(ClusterSnapshot)
    /// A node joined the cluster: a new incarnation (a node that reconnects, or comes back from a freeze, joins again
    /// with a new ``ClusterMember/id``).
    case nodeUp(ClusterMember)
    /// A node is no longer a member (its row was deleted), and why: it ``NodeDownReason/left`` gracefully (it handed
    /// what it led over first, each a ``released(election:term:)``), it ``NodeDownReason/died`` (its session ended
    /// or was cut off, and a sweep removed it — what it led is no longer held), or it was ``NodeDownReason/removed``
    /// by hand.
    case nodeDown(ClusterMember, reason: NodeDownReason)
    /// A leadership of `election` began: `leader` now leads it with fencing token `term`.
    ///
    /// This is sent when the leadership begins, which is not always when its term is issued: a node that wins the
    /// election's lock while its predecessor may still be acting first waits for evidence that the predecessor
    /// stopped (its session gone, its acknowledgement, or its lease run out), and is announced only then. A term that
    /// never began is never announced; a later snapshot shows it as the election's term, with no leader. `leader` is
    /// `nil` when the node is not among the members this watch knows (those of the last snapshot, and those a
    /// ``nodeUp(_:)`` announced since).
    case leader(election: String, term: Int64, leader: ClusterMember?)
    /// The leader of `election` at `term` handed it over gracefully (it resigned, or its node is leaving): the
    /// election has no leader until the next ``leader(election:term:leader:)``, and a candidate may take it at once.
    case released(election: String, term: Int64)
    /// A trigger was sent to `election`, the `sequence`-th of that election (its payload is not included).
    case trigger(election: String, sequence: Int64)
}

/// The changes of one cluster as they happen (``StokerCluster/watch(cluster:connection:schema:)``).
///
/// Each iterator is a watch of its own, with its own PostgreSQL session, opened on the first `next()`; iterate a
/// value twice and you watch twice. The session is meant to sit idle: the server's `idle_session_timeout` is turned
/// off for it, and TCP keepalives notice a connection that silently died within about 16 s (unless the connection
/// string sets keepalives of its own). Changes that arrive while nobody calls `next()` wait in memory.
///
/// **A cluster that does not exist yet** (no node ever joined it) reads as an empty snapshot; the watch then looks
/// for it every second on its session, and once it exists, listens and yields its snapshot.
///
/// **Reconnects.** When the session is lost (the server restarted or ended it, the network broke), the watch
/// reconnects by itself, after 100 ms doubling up to 5 s (jittered) while attempts fail, listens again and yields a
/// fresh ``ClusterWatchEvent/snapshot(_:)``. Only the first connection's failure — a bad name, a connection string
/// or credentials that do not work, a schema that does not exist — is thrown, by the first `next()`; later ones are
/// retried for as long as the watch is iterated.
///
/// **Ending.** Cancelling the task that iterates ends the sequence (`next()` returns `nil`) once the session is
/// closed; an iterator that is dropped closes its session shortly after. The first `next()` may take as long as the
/// connection's `connect_timeout` (10 s unless set) to notice a cancellation while it connects.
public struct ClusterChanges: AsyncSequence, Sendable {
    public typealias Element = ClusterWatchEvent
    public typealias Failure = any Error

    /// The cluster watched.
    public let cluster: String
    /// The Stoker schema it lives in.
    public let schema: String
    /// Not public: it may hold a password.
    let connection: String

    public func makeAsyncIterator() -> Iterator {
        Iterator(cluster: cluster, schema: schema, connection: connection)
    }

    /// One watch: its session and what it knows of the cluster. Not `Sendable`: one task iterates it.
    public struct Iterator: AsyncIteratorProtocol {
        public typealias Element = ClusterWatchEvent
        public typealias Failure = any Error

        private enum Phase {
            /// Nothing done yet: the first `next()` validates and connects, and throws what fails.
            case initial
            /// Connected; the cluster does not exist yet: look for it every second.
            case awaitingCluster
            /// Connected and listening on the cluster's channel.
            case listening
            /// The session was lost: reconnect after a backoff.
            case reconnecting
            /// Cancelled or failed at first: `nil` from now on.
            case finished
        }

        private let target: WatchTarget
        private var phase = Phase.initial
        private var session: PostgresSession?
        private var notifications: AsyncStream<PostgresNotification>.Iterator?
        /// The schema's statements, as the current session read them (every new session reads them again).
        private var statements: ProtocolStatements?
        private var channel: String?
        private var connectedAt = ContinuousClock.now
        private var policy = ReconnectPolicy(first: .milliseconds(100), maximum: .seconds(5), resetAfter: .seconds(5))
        private var known = KnownCluster()

        init(cluster: String, schema: String, connection: String) {
            target = WatchTarget(cluster: cluster, schema: schema, connection: connection)
        }

        public mutating func next() async throws -> ClusterWatchEvent? {
            try await next(isolation: nil)
        }

        public mutating func next(isolation actor: isolated (any Actor)?) async throws(any Error) -> ClusterWatchEvent?
        {
            while true {
                if Task.isCancelled, phase != .finished {
                    await finish(isolation: actor)
                    return nil
                }
                switch phase {
                case .finished:
                    return nil
                case .initial:
                    do {
                        return subscribe(try await WatchTarget.open(target))
                    } catch {
                        await finish(isolation: actor)
                        if Task.isCancelled { return nil }
                        throw error
                    }
                case .reconnecting:
                    do {
                        try await Task.sleep(for: policy.backOff(random: Double.random(in: 0...1)))
                    } catch {
                        continue  // cancelled: finish above
                    }
                    do {
                        return subscribe(try await WatchTarget.open(target))
                    } catch {
                        continue  // back off longer (or finish, if cancelled)
                    }
                case .awaitingCluster:
                    do {
                        try await Task.sleep(for: .seconds(1))
                    } catch {
                        continue
                    }
                    guard let session, let statements else {
                        await lost(isolation: actor)
                        continue
                    }
                    let target = target
                    do {
                        if let found = try await session.run({ connection in
                            try target.listen(statements: statements, on: connection, onlyIfFound: true)
                        }) {
                            return adopt(found)
                        }
                    } catch {
                        await lost(isolation: actor)
                    }
                case .listening:
                    guard let notification = await notifications?.next(isolation: actor) else {
                        // Finished: the session ended (or the task was cancelled, which the loop's top handles).
                        if !Task.isCancelled { await lost(isolation: actor) }
                        continue
                    }
                    guard notification.channel == channel, let change = WatchedChange(payload: notification.payload),
                        let event = known.apply(change)
                    else { continue }
                    return event
                }
            }
        }

        /// A new session, listening (or waiting for the cluster): its snapshot is the next element.
        private mutating func subscribe(_ opened: WatchTarget.Opened) -> ClusterWatchEvent {
            session = opened.session
            statements = opened.statements
            notifications = opened.session.notifications.makeAsyncIterator()
            connectedAt = .now
            return adopt(opened.subscription)
        }

        /// What a session read right after it listened (or found the cluster missing).
        private mutating func adopt(_ subscription: WatchTarget.Subscription) -> ClusterWatchEvent {
            channel = subscription.channel
            phase = subscription.channel == nil ? .awaitingCluster : .listening
            known = KnownCluster(subscription.snapshot)
            return .snapshot(subscription.snapshot)
        }

        /// The session ended or failed: close what is left of it and reconnect.
        private mutating func lost(isolation actor: isolated (any Actor)?) async {
            policy.sessionEnded(joined: true, lasted: connectedAt.duration(to: .now))
            await closeSession(isolation: actor)
            phase = .reconnecting
        }

        private mutating func finish(isolation actor: isolated (any Actor)?) async {
            phase = .finished
            await closeSession(isolation: actor)
        }

        private mutating func closeSession(isolation actor: isolated (any Actor)?) async {
            notifications = nil
            channel = nil
            if let session {
                self.session = nil
                await session.close()
            }
        }
    }
}

/// What a watch connects to, and the steps of a connection.
private struct WatchTarget: Sendable {
    let cluster: String
    let schema: String
    let connection: String

    /// A new session and what it read: the schema's statements, and the subscription.
    struct Opened: Sendable {
        let session: PostgresSession
        let statements: ProtocolStatements
        let subscription: Subscription
    }

    /// The channel listened on (`nil`: the cluster does not exist yet) and the snapshot read after the `LISTEN`.
    struct Subscription: Sendable {
        let channel: String?
        let snapshot: ClusterSnapshot
    }

    /// Validates the names, connects and subscribes. Throws what fails; a session that failed after it connected
    /// is closed.
    static func open(_ target: WatchTarget) async throws -> Opened {
        try StokerNode.Configuration.validateName(target.cluster, kind: "cluster name")
        try StokerSchema.validate(schema: target.schema)
        let configuration = try ConnectionConfiguration(target.connection)
        try configuration.validateValues()
        // A watch sits idle for long: keepalives notice a peer that vanished without a word (a partition, a host
        // gone). Whatever the string (or PGCONNECT_TIMEOUT) sets wins.
        let session = try await PostgresSession.connect(
            configuration.addingDefaults([
                ("connect_timeout", "10", "PGCONNECT_TIMEOUT"),
                ("keepalives", "1", nil),
                ("keepalives_idle", "10", nil),
                ("keepalives_interval", "2", nil),
                ("keepalives_count", "3", nil),
                ("fallback_application_name", "stoker watch", nil),
            ]))
        do {
            let (statements, subscription) = try await session.run { connection in
                let statements = try ProtocolStatements.of(schema: target.schema, on: connection)
                // Idle by design: a server-wide idle_session_timeout would end it again and again.
                try connection.execute("SELECT set_config('idle_session_timeout', '0', false)")
                let subscription = try target.listen(statements: statements, on: connection, onlyIfFound: false)
                guard let subscription else {
                    throw StokerError(.unexpectedResult, "The cluster lookup gave no answer.")
                }
                return (statements, subscription)
            }
            return Opened(session: session, statements: statements, subscription: subscription)
        } catch {
            await session.abort()
            throw error
        }
    }

    /// Looks the cluster up; when it exists, `LISTEN`s on its channel and then reads its snapshot, so a change
    /// committed after the snapshot's statement began is a notification. When it does not: an empty snapshot, or
    /// `nil` with `onlyIfFound`. Runs on the session's thread.
    func listen(
        statements: ProtocolStatements,
        on connection: PGConnection,
        onlyIfFound: Bool
    ) throws -> Subscription? {
        let quoted = try connection.quoteIdentifier(schema, kind: "schema name")
        guard
            let row = try connection.execute("SELECT id FROM \(quoted).clusters WHERE name = $1", [cluster]).rows.first
        else {
            return onlyIfFound
                ? nil
                : Subscription(channel: nil, snapshot: ClusterSnapshot(cluster: cluster, members: [], elections: []))
        }
        let channel = statements.channel(clusterID: try row.int(0))
        try connection.listen(channel)
        return Subscription(
            channel: channel,
            snapshot: try StokerCluster.readSnapshot(cluster: cluster, statements: statements, on: connection))
    }
}

/// One notification on a cluster's channel, decoded as the watch reports it (the schema's triggers and functions
/// send `json_build_object(...)::text`). `nil` for anything else: a payload Stoker did not write is skipped.
enum WatchedChange: Sendable, Hashable {
    case nodeUp(ClusterMember)
    case nodeDown(ClusterMember, reason: NodeDownReason)
    case leader(election: String, term: Int64, node: Int?)
    case released(election: String, term: Int64)
    case trigger(election: String, sequence: Int64)

    init?(payload: String) {
        guard let fields = FlatJSON.parse(payload), case .string(let event)? = fields["event"] else { return nil }
        switch event {
        case "node_up", "node_down":
            guard let (member, reason) = ClusterEvent.membership(fields) else { return nil }
            self = reason.map { .nodeDown(member, reason: $0) } ?? .nodeUp(member)
        case "leader":
            guard case .string(let election)? = fields["name"], case .integer(let term)? = fields["term"] else {
                return nil
            }
            var node: Int?
            if case .integer(let id)? = fields["node"] { node = Int(exactly: id) }
            self = .leader(election: election, term: term, node: node)
        case "released":
            guard case .string(let election)? = fields["name"], case .integer(let term)? = fields["term"] else {
                return nil
            }
            self = .released(election: election, term: term)
        case "trigger":
            guard case .string(let election)? = fields["name"], case .integer(let sequence)? = fields["sequence"] else {
                return nil
            }
            self = .trigger(election: election, sequence: sequence)
        default:
            return nil
        }
    }
}

/// What a watch knows of its cluster since its last snapshot: the members (to name a leader) and, per election, the
/// last term and begun leader — so that a change the snapshot already holds is not delivered again, and one older
/// than it is not delivered at all.
struct KnownCluster: Sendable {
    private var members: [Int: ClusterMember] = [:]
    /// Election name → its last known term, and the node that began leading at it (nil: none known).
    private var elections: [String: (term: Int64, leader: Int?)] = [:]

    init() {}

    init(_ snapshot: ClusterSnapshot) {
        for member in snapshot.members { members[member.member.id] = member.member }
        for election in snapshot.elections {
            elections[election.name] = (election.term, election.leader?.id)
        }
    }

    /// The event for `change`, after which it is known; `nil` when it is already known or older than what is.
    mutating func apply(_ change: WatchedChange) -> ClusterWatchEvent? {
        switch change {
        case .nodeUp(let member):
            // Incarnation ids are never reused: a known one is the snapshot's (it joined while the snapshot was read).
            guard members.updateValue(member, forKey: member.id) == nil else { return nil }
            return .nodeUp(member)
        case .nodeDown(let member, let reason):
            members[member.id] = nil
            return .nodeDown(member, reason: reason)
        case .leader(let election, let term, let node):
            if let last = elections[election] {
                // Terms only rise: a lower one is older than the snapshot, the same one with its leader is in it.
                if term < last.term || (term == last.term && node != nil && node == last.leader) { return nil }
            }
            elections[election] = (term, node)
            return .leader(election: election, term: term, leader: node.flatMap { members[$0] })
        case .released(let election, let term):
            if let last = elections[election] {
                if term < last.term { return nil }
            }
            elections[election] = (term, nil)
            return .released(election: election, term: term)
        case .trigger(let election, let sequence):
            return .trigger(election: election, sequence: sequence)
        }
    }
}
