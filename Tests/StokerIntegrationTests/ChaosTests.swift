import StokerHarness
import Synchronization
import Testing

@_spi(Testing) @testable import Stoker

#if canImport(Glibc)
    import Glibc
#endif

/// Faults one after another on a live cluster — the one property checked over the whole history at the end.
@Suite("Chaos")
struct ChaosTests {
    enum Fault: CaseIterable, Sendable {
        case gracefulStop, crash, freezeLoop, freezeThreads, terminateBackend
    }

    @Test(
        "4 nodes × 3 elections through a seeded series of faults: never two leaders, every leadership demoted, terms rise"
    )
    func randomFaults() async throws {
        try await withTestDatabase { database in
            let history = History()
            let elections = ["e1", "e2", "e3"]
            // STOKER_CHAOS_SEED / STOKER_CHAOS_ROUNDS explore other sequences; the defaults are what CI runs.
            let seed = getenv("STOKER_CHAOS_SEED").flatMap { UInt64(String(cString: $0)) } ?? 0x5707_4E52
            let rounds = getenv("STOKER_CHAOS_ROUNDS").flatMap { Int(String(cString: $0)) } ?? 12
            var random = SplitMix64(seed: seed)  // the same faults on every run of one seed
            try await withNodes { nodes in
                func start(_ name: String) throws -> TestNode {
                    nodes.add(
                        try TestNode(name, database: database, elections: elections, history: history) {
                            $0.lease = .seconds(1)
                        })
                }
                var live = try ["a", "b", "c", "d"].map(start)
                try await history.wait("every election has a leader") { entries in
                    elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                }
                for round in 0..<rounds {
                    let index = Int(random.next() % UInt64(live.count))
                    let victim = live[index]
                    let fault = Fault.allCases[Int(random.next() % UInt64(Fault.allCases.count))]
                    let before = history.entries.count
                    if getenv("STOKER_CHAOS_VERBOSE") != nil, let origin = history.entries.first?.at {
                        print("round \(round): \(fault) of \(victim.name) at +\(origin.duration(to: .now))")
                        fflush(nil)
                    }
                    switch fault {
                    case .gracefulStop:
                        try await victim.stop()
                        live[index] = try start(victim.name)
                    case .crash:
                        await victim.crash()
                        live[index] = try start(victim.name)
                    case .freezeLoop:
                        victim.node.freezeLoop(for: .milliseconds(1_300))
                    case .freezeThreads:
                        victim.node.freezeThreads(for: .milliseconds(1_300))
                    case .terminateBackend:
                        if let pid = victim.node.backendPID {
                            _ = try await database.admin("SELECT pg_terminate_backend(\(pid))")
                        }
                    }
                    // One fault at a time (never two leaders is promised for any single fault; two at once — a
                    // frozen loop that the server also kills — is what fencing is for): a freeze has ended before the
                    // next fault.
                    try await eventually("the freeze of \(victim.name) ends") { !victim.node.isFrozen }
                    // The fault has played out once every election has a leader again and the victim's leaderships
                    // (if any) have been demoted.
                    try await history.wait("round \(round) (\(fault) of \(victim.name)) settles") { entries in
                        let earlier = Array(entries.prefix(before))
                        let led = elections.filter { History.leaders(earlier, election: $0) == [victim.name] }
                        let demoted = entries.dropFirst(before).filter { $0.node == victim.name && $0.isDemotion }
                        return Set(led).isSubset(of: Set(demoted.map(\.election)))
                            && elections.allSatisfy { History.leaders(entries, election: $0).count == 1 }
                    }
                }
                for node in live { try await node.stop() }
                for election in elections { #expect(try await lockHolders(election, in: database) == 0) }
                history.check(complete: true)
            }
        }
    }
}
