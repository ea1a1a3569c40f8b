import Foundation
import StokerHarness
import Synchronization
import Testing

@testable import Stoker

#if canImport(Glibc)
    import Glibc
#endif

/// `StokerCluster.watch`, judged against real `stoker node` processes: joins, the leader, deaths and leaves arrive
/// once each, with their reason; the first failure is thrown; cancelling or dropping the watch closes its session; a
/// lost session comes back with a fresh snapshot.
@Suite("Cluster watch", .serialized, .timeLimit(.minutes(3)))
struct ClusterWatchTests {
    @Test("joins, the leader, a killed follower (died, once) and a leader that leaves (released, then left)")
    func joinsLeaderDeathAndLeave() async throws {
        try await withTestDatabase { database in
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            try await withParticipants(database) { group in
                // The cluster exists before the watch starts, so the watch listens before any node joins.
                try await database.admin("INSERT INTO stoker.clusters (name) VALUES ('\(group.cluster)')")
                try await WatchRecorder.with(StokerCluster.watch(cluster: group.cluster, connection: database.conninfo))
                { watch in
                    let (first, snapshot) = try await watch.first("the first snapshot") { _ in true }
                    #expect(first == 0)
                    #expect(snapshot == .snapshot(ClusterSnapshot(cluster: group.cluster, members: [], elections: [])))
                    try await group.start("a", elections: ["e"])
                    try await group.start("b", elections: ["e"])
                    var joined: [String: ClusterMember] = [:]
                    for name in ["a", "b"] {
                        let (_, event) = try await watch.first("nodeUp of \(name)") { $0.joined?.name == name }
                        joined[name] = event.joined
                    }
                    // The first leader of e, named: its nodeUp came before it.
                    let (_, leaderEvent) = try await watch.first("a leader of e") { $0.leadership?.election == "e" }
                    let leadership = try #require(leaderEvent.leadership)
                    let leader = try #require(leadership.leader, "the leader is not named: \(watch.events)")
                    #expect(joined[leader.name] == leader)
                    // The process that leads says the same: its now_leader line, with the same term.
                    let (leaderProcess, line) = try await group.firstLine(among: group.all, timeout: .seconds(60)) {
                        $0.event == "now_leader" && $0.election == "e"
                    }
                    #expect(leaderProcess.name == leader.name)
                    #expect(line.term == leadership.term)

                    let follower = try #require(group.all.first { $0.name != leader.name })
                    let followerMember = try #require(joined[follower.name])
                    group.markKilled(follower.name, at: monotonicSeconds())
                    _ = follower.process.signal(SIGKILL)
                    let (_, death) = try await watch.first("nodeDown of the killed \(follower.name)") {
                        $0.departed?.member == followerMember
                    }
                    #expect(death == .nodeDown(followerMember, reason: .died))

                    _ = leaderProcess.process.signal(SIGTERM)
                    let (leftAt, leave) = try await watch.first("nodeDown of the leaving \(leader.name)") {
                        $0.departed?.member == leader
                    }
                    #expect(leave == .nodeDown(leader, reason: .left))
                    // It handed e over before it left.
                    let released = watch.events.firstIndex(of: .released(election: "e", term: leadership.term))
                    #expect(released.map { $0 < leftAt } == true, "no release of e before the leave: \(watch.events)")
                    #expect(try await leaderProcess.process.waitForExit(timeout: .seconds(30)) == 0)
                    _ = await leaderProcess.process.close()

                    let events = watch.events
                    #expect(events.filter { $0.departed?.member == followerMember }.count == 1, "\(events)")
                    #expect(events.filter { $0.departed?.member == leader }.count == 1, "\(events)")
                    for member in joined.values {
                        #expect(events.filter { $0.joined == member }.count == 1, "\(events)")
                    }
                    // No loss, so no re-sync: one snapshot, the first element.
                    #expect(events.filter(\.isSnapshot).count == 1, "\(events)")
                }
                #expect(group.history().problems(complete: true) == [])
            }
        }
    }

    @Test("a cluster that does not exist yet: an empty snapshot, then its snapshot once a node creates it")
    func clusterAppears() async throws {
        try await withTestDatabase { database in
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            try await withParticipants(database) { group in
                try await WatchRecorder.with(StokerCluster.watch(cluster: group.cluster, connection: database.conninfo))
                { watch in
                    let (_, first) = try await watch.first("the first snapshot") { _ in true }
                    #expect(first == .snapshot(ClusterSnapshot(cluster: group.cluster, members: [], elections: [])))
                    try await group.start("a", elections: ["e"])
                    let (second, appeared) = try await watch.first("the snapshot of the new cluster", from: 1) {
                        $0.isSnapshot
                    }
                    #expect(second == 1, "\(watch.events)")
                    // a is in that snapshot, or joins after it (once either way).
                    guard case .snapshot(let snapshot) = appeared else { return }
                    let listed = snapshot.members.contains { $0.member.name == "a" }
                    if !listed {
                        _ = try await watch.first("nodeUp of a") { $0.joined?.name == "a" }
                    }
                    _ = try await group.firstLine(among: group.all, timeout: .seconds(60)) {
                        $0.event == "now_leader" && $0.election == "e"
                    }
                    try await group.stopAll()
                    _ = try await watch.first("nodeDown of a") { $0.departed?.member.name == "a" }
                    #expect(watch.events.filter { $0.joined?.name == "a" }.count == (listed ? 0 : 1))
                }
            }
        }
    }

    @Test("the first failure is thrown by the first next(), without a password; then the sequence is over")
    func firstFailureIsThrown() async throws {
        try await withTestDatabase { database in
            // Not migrated: no schema.
            let missing = await Self.firstError(StokerCluster.watch(cluster: "c", connection: database.conninfo))
            #expect(missing?.code == .schemaMismatch, "\(String(describing: missing))")
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            let other = await Self.firstError(
                StokerCluster.watch(cluster: "c", connection: database.conninfo, schema: "no_such_schema"))
            #expect(other?.code == .schemaMismatch, "\(String(describing: other))")
            let badSchema = await Self.firstError(
                StokerCluster.watch(cluster: "c", connection: database.conninfo, schema: ""))
            #expect(badSchema?.code == .invalidIdentifier, "\(String(describing: badSchema))")
            let badCluster = await Self.firstError(StokerCluster.watch(cluster: "", connection: database.conninfo))
            #expect(badCluster?.code == .invalidConfiguration, "\(String(describing: badCluster))")
            let port = try closedPort()
            let secret = "watch-secret-\(UInt32.random(in: 0...UInt32.max))"
            let refused = await Self.firstError(
                StokerCluster.watch(
                    cluster: "c",
                    connection: "host=127.0.0.1 port=\(port.port) user=nobody password=\(secret) connect_timeout=5"))
            #expect(refused?.code == .connectionFailed, "\(String(describing: refused))")
            expectNoSecret(refused, secret)
        }
    }

    @Test("cancelling the consuming task ends the sequence and closes the session", arguments: [true, false])
    func cancellation(clusterExists: Bool) async throws {
        try await withTestDatabase { database in
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            let cluster = "c\(UInt32.random(in: 0...UInt32.max))"
            if clusterExists { try await database.admin("INSERT INTO stoker.clusters (name) VALUES ('\(cluster)')") }
            let name = "watch-\(UInt32.random(in: 0...UInt32.max))"
            let watch = WatchRecorder.start(
                StokerCluster.watch(cluster: cluster, connection: database.conninfo + " application_name=\(name)"))
            _ = try await watch.first("the first snapshot") { _ in true }
            let pid = try #require(try await Self.backends(named: name, in: database).first)
            #expect(try await Self.backends(named: name, in: database).count == 1)
            // Returns once the consuming loop ended: next() returned nil (it throws nothing).
            let failure = await watch.stop()
            #expect(failure == nil, "\(String(describing: failure))")
            #expect(try await waitUntilGone(pid, in: database), "the watch's backend is still there")
            #expect(try await Self.backends(named: name, in: database).isEmpty)
        }
    }

    @Test("an iterator that is dropped closes its session")
    func droppedIterator() async throws {
        try await withTestDatabase { database in
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            try await database.admin("INSERT INTO stoker.clusters (name) VALUES ('c')")
            let name = "watch-\(UInt32.random(in: 0...UInt32.max))"
            let changes = StokerCluster.watch(cluster: "c", connection: database.conninfo + " application_name=\(name)")
            var iterator: ClusterChanges.Iterator? = changes.makeAsyncIterator()
            let first = try await iterator?.next()
            #expect(first?.isSnapshot == true)
            let pid = try #require(try await Self.backends(named: name, in: database).first)
            iterator = nil
            #expect(try await waitUntilGone(pid, in: database), "the dropped watch's backend is still there")
        }
    }

    @Test("a lost session: the watch reconnects, yields a fresh snapshot and goes on")
    func reconnect() async throws {
        try await withTestDatabase { database in
            _ = try await StokerSchema.migrate(connection: database.conninfo)
            try await withParticipants(database) { group in
                try await group.start("a", elections: ["e"])
                try await group.waitForCluster(election: "e", size: 1)
                let name = "watch-\(UInt32.random(in: 0...UInt32.max))"
                try await WatchRecorder.with(
                    StokerCluster.watch(
                        cluster: group.cluster, connection: database.conninfo + " application_name=\(name)")
                ) { watch in
                    let (_, first) = try await watch.first("the first snapshot") { _ in true }
                    guard case .snapshot(let before) = first else { return }
                    #expect(before.members.map(\.member.name) == ["a"])
                    let pid = try #require(try await Self.backends(named: name, in: database).first)
                    _ = try await database.admin("SELECT pg_terminate_backend(\(pid))")
                    let (second, resync) = try await watch.first("the snapshot after the reconnect", from: 1) {
                        $0.isSnapshot
                    }
                    #expect(second == 1, "\(watch.events)")
                    guard case .snapshot(let after) = resync else { return }
                    #expect(after.members.map(\.member) == before.members.map(\.member))
                    #expect(after.elections.map(\.leader) == before.elections.map(\.leader))
                    #expect(try await waitUntilGone(pid, in: database), "the lost session's backend is still there")
                    let now = try await Self.backends(named: name, in: database)
                    #expect(now.count == 1, "one session of the watch: \(now)")
                    // Listening again: a join after the reconnect arrives.
                    try await group.start("b", elections: ["e"])
                    let (joinedAt, _) = try await watch.first("nodeUp of b") { $0.joined?.name == "b" }
                    #expect(joinedAt > second)
                }
                try await group.stopAll()
            }
        }
    }

    @Test("payloads decode; a change a snapshot already holds, or an older one, is not delivered")
    func decodingAndDeduplication() throws {
        #expect(
            WatchedChange(payload: #"{"event" : "node_up", "node" : 7, "name" : "a"}"#)
                == .nodeUp(ClusterMember(id: 7, name: "a")))
        #expect(
            WatchedChange(payload: #"{"event":"node_down","node":7,"name":"a","reason":"died"}"#)
                == .nodeDown(ClusterMember(id: 7, name: "a"), reason: .died))
        #expect(
            WatchedChange(payload: #"{"event":"node_down","node":7,"name":"a"}"#)
                == .nodeDown(ClusterMember(id: 7, name: "a"), reason: .removed))
        #expect(
            WatchedChange(payload: #"{"event":"node_down","node":7,"name":"a","reason":"eaten"}"#)
                == .nodeDown(ClusterMember(id: 7, name: "a"), reason: .removed))
        #expect(
            WatchedChange(payload: #"{"event":"leader","election":3,"name":"e","term":9,"node":7}"#)
                == .leader(election: "e", term: 9, node: 7))
        #expect(
            WatchedChange(payload: #"{"event":"released","election":3,"name":"e","term":9}"#)
                == .released(election: "e", term: 9))
        #expect(
            WatchedChange(payload: #"{"event":"trigger","election":3,"name":"e","sequence":4,"extra":null}"#)
                == .trigger(election: "e", sequence: 4))
        for junk in [
            "", "node_up", #"{"event":"node_up","node":"7","name":"a"}"#, #"{"event":"leader","name":"e"}"#,
            #"{"event":"released","election":3,"term":9}"#, #"{"event":"trigger","name":"e"}"#,
            #"{"event":"other"}"#, #"{"node":7}"#, #"[1]"#,
        ] {
            #expect(WatchedChange(payload: junk) == nil, "\(junk)")
        }

        let a = ClusterMember(id: 1, name: "a")
        let b = ClusterMember(id: 2, name: "b")
        let c = ClusterMember(id: 3, name: "c")
        func member(_ m: ClusterMember) -> ClusterSnapshot.Member {
            ClusterSnapshot.Member(
                member: m, host: "h", pid: 1, uptime: .zero, sinceHeartbeat: .zero, draining: false, leads: [])
        }
        var known = KnownCluster(
            ClusterSnapshot(
                cluster: "k", members: [member(a), member(b)],
                elections: [
                    ClusterSnapshot.Election(name: "e", term: 5, leader: b, leaderFor: .zero),
                    ClusterSnapshot.Election(name: "f", term: 2, leader: nil, leaderFor: nil),
                ]))
        #expect(known.apply(.nodeUp(a)) == nil, "a is in the snapshot")
        #expect(known.apply(.leader(election: "e", term: 4, node: 1)) == nil, "older than the snapshot")
        #expect(known.apply(.leader(election: "e", term: 5, node: 2)) == nil, "the snapshot's leader")
        #expect(known.apply(.released(election: "e", term: 4)) == nil, "older than the snapshot")
        // f's term 2 was issued but had not begun: its begin is news.
        #expect(known.apply(.leader(election: "f", term: 2, node: 1)) == .leader(election: "f", term: 2, leader: a))
        #expect(known.apply(.nodeUp(c)) == .nodeUp(c))
        #expect(known.apply(.leader(election: "e", term: 6, node: 3)) == .leader(election: "e", term: 6, leader: c))
        #expect(known.apply(.released(election: "e", term: 6)) == .released(election: "e", term: 6))
        #expect(known.apply(.nodeDown(c, reason: .left)) == .nodeDown(c, reason: .left))
        #expect(known.apply(.leader(election: "e", term: 7, node: 99)) == .leader(election: "e", term: 7, leader: nil))
        #expect(known.apply(.leader(election: "g", term: 1, node: 2)) == .leader(election: "g", term: 1, leader: b))
        #expect(known.apply(.trigger(election: "e", sequence: 1)) == .trigger(election: "e", sequence: 1))
    }

    /// The error the first `next()` of `changes` throws (an issue is recorded if it does not throw a ``StokerError``,
    /// or if the sequence goes on after it).
    static func firstError(_ changes: ClusterChanges, sourceLocation: SourceLocation = #_sourceLocation) async
        -> StokerError?
    {
        var iterator = changes.makeAsyncIterator()
        do {
            let event = try await iterator.next()
            Issue.record("no error; the first element was \(String(describing: event))", sourceLocation: sourceLocation)
            return nil
        } catch let error as StokerError {
            do {
                let after = try await iterator.next()
                #expect(after == nil, "the sequence went on after its failure", sourceLocation: sourceLocation)
            } catch {
                Issue.record("a second error: \(error)", sourceLocation: sourceLocation)
            }
            return error
        } catch {
            Issue.record("not a StokerError: \(error)", sourceLocation: sourceLocation)
            return nil
        }
    }

    /// The backend pids of the sessions named `name` (`application_name`) in `database`.
    static func backends(named name: String, in database: TestDatabase) async throws -> [Int] {
        try await database.admin("SELECT pid FROM pg_stat_activity WHERE application_name = '\(name)' ORDER BY pid")
            .compactMap { $0.first.flatMap { $0 }.flatMap { Int($0) } }
    }
}

extension ClusterWatchEvent {
    var isSnapshot: Bool {
        if case .snapshot = self { return true }
        return false
    }

    var joined: ClusterMember? {
        if case .nodeUp(let member) = self { return member }
        return nil
    }

    var departed: (member: ClusterMember, reason: NodeDownReason)? {
        if case .nodeDown(let member, let reason) = self { return (member, reason) }
        return nil
    }

    var leadership: (election: String, term: Int64, leader: ClusterMember?)? {
        if case .leader(let election, let term, let leader) = self { return (election, term, leader) }
        return nil
    }
}

/// A watch consumed by a task of its own, every element recorded; tests wait for the element they expect.
final class WatchRecorder: Sendable {
    private struct Waiter {
        let from: Int
        let predicate: @Sendable (ClusterWatchEvent) -> Bool
        let continuation: CheckedContinuation<Int?, Never>
    }

    private struct State {
        var events: [ClusterWatchEvent] = []
        /// Set when the sequence ended: `.success` when `next()` returned nil.
        var end: Result<Void, any Error>?
        var waiters: [UInt64: Waiter] = [:]
        var nextWaiter: UInt64 = 0
        /// Waiters whose timer fired before they were registered.
        var expired: Set<UInt64> = []
    }

    private let state = Mutex(State())
    private let consumer = Mutex<Task<Void, Never>?>(nil)

    private init() {}

    static func start(_ changes: ClusterChanges) -> WatchRecorder {
        let recorder = WatchRecorder()
        let task = Task {
            do {
                for try await event in changes { recorder.record(event) }
                recorder.ended(.success(()))
            } catch {
                recorder.ended(.failure(error))
            }
        }
        recorder.consumer.withLock { $0 = task }
        return recorder
    }

    /// Runs `body` with a recorder of `changes`; stops it afterwards, also when `body` throws.
    static func with<T: Sendable>(_ changes: ClusterChanges, _ body: (WatchRecorder) async throws -> T) async throws
        -> T
    {
        let recorder = start(changes)
        do {
            let result = try await body(recorder)
            _ = await recorder.stop()
            return result
        } catch {
            _ = await recorder.stop()
            throw error
        }
    }

    var events: [ClusterWatchEvent] { state.withLock { $0.events } }

    /// Cancels the consuming task and waits until its loop is over; returns the error the sequence threw, if any.
    func stop() async -> (any Error)? {
        let task = consumer.withLock { $0 }
        task?.cancel()
        await task?.value
        return state.withLock { state -> (any Error)? in
            if case .failure(let error) = state.end { return error }
            return nil
        }
    }

    /// The first element at `from` or later that `predicate` accepts, and its index — already recorded or to come.
    /// Fails the test (recording what was seen) when none came within `timeout` or the sequence ended first.
    func first(
        _ what: String,
        from: Int = 0,
        timeout: Duration = .seconds(60),
        sourceLocation: SourceLocation = #_sourceLocation,
        where predicate: @escaping @Sendable (ClusterWatchEvent) -> Bool
    ) async throws -> (Int, ClusterWatchEvent) {
        let id = state.withLock { state in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        let timer = Task {
            try? await Task.sleep(for: timeout)
            self.resolve(id, with: nil)
        }
        defer { timer.cancel() }
        let found = await withCheckedContinuation { (continuation: CheckedContinuation<Int?, Never>) in
            let immediate: Int?? = state.withLock { state in
                if let index = state.events.indices.first(where: { $0 >= from && predicate(state.events[$0]) }) {
                    return .some(index)
                }
                if state.end != nil || state.expired.remove(id) != nil { return .some(nil) }
                state.waiters[id] = Waiter(from: from, predicate: predicate, continuation: continuation)
                return nil
            }
            if let immediate { continuation.resume(returning: immediate) }
        }
        let (events, end) = state.withLock { state in
            state.expired.remove(id)
            return (state.events, state.end)
        }
        guard let found else {
            let reason = end.map { "the sequence ended (\($0))" } ?? "none within \(timeout)"
            Issue.record("waited for \(what): \(reason); seen: \(events)", sourceLocation: sourceLocation)
            throw WatchTimedOut(what: what)
        }
        return (found, events[found])
    }

    private func record(_ event: ClusterWatchEvent) {
        let (index, ready) = state.withLock { state -> (Int, [CheckedContinuation<Int?, Never>]) in
            state.events.append(event)
            let index = state.events.count - 1
            let matched = state.waiters.filter { index >= $0.value.from && $0.value.predicate(event) }
            for key in matched.keys { state.waiters[key] = nil }
            return (index, matched.values.map(\.continuation))
        }
        for continuation in ready { continuation.resume(returning: index) }
    }

    private func ended(_ end: Result<Void, any Error>) {
        let waiting = state.withLock { state -> [Waiter] in
            state.end = end
            defer { state.waiters.removeAll() }
            return Array(state.waiters.values)
        }
        for waiter in waiting { waiter.continuation.resume(returning: nil) }
    }

    private func resolve(_ id: UInt64, with index: Int?) {
        let waiter = state.withLock { state in
            let waiter = state.waiters.removeValue(forKey: id)
            // A timer that fires before its waiter was registered: the registration finds it here.
            if waiter == nil { state.expired.insert(id) }
            return waiter
        }
        waiter?.continuation.resume(returning: index)
    }
}

struct WatchTimedOut: Error, CustomStringConvertible {
    let what: String
    var description: String { "timed out waiting for \(what)" }
}
