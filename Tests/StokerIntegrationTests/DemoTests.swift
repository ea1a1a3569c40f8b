import Foundation
import StokerHarness
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `stoker demo`, run as a newcomer would: it finishes by itself, shows every failover and the verdict, and leaves
/// nothing behind — also when interrupted halfway.
@Suite("stoker demo (real processes)", .serialized, .timeLimit(.minutes(3)))
struct DemoTests {
    /// The PostgreSQL directory and the node processes the demo said it started.
    static func started(_ output: String) -> (directory: String?, pids: [Int32]) {
        var directory: String?
        if let range = output.range(of: "started in ") {
            directory = String(output[range.upperBound...].prefix { $0 != " " })
        }
        var pids: [Int32] = []
        var rest = Substring(output)
        while let range = rest.range(of: "(pid ") {
            rest = rest[range.upperBound...]
            if let pid = Int32(rest.prefix { $0.isNumber }) { pids.append(pid) }
        }
        return (directory, pids)
    }

    /// Waits (a generous bound) until the directory is gone and none of `pids` runs.
    static func expectNothingLeft(_ output: String) async throws {
        let (directory, pids) = Self.started(output)
        let root = try #require(directory, "the demo did not say where PostgreSQL ran: \(output)")
        #expect(root.hasPrefix("/tmp/stoker-pg-"), "\(root)")
        #expect(pids.count >= 3, "\(output)")
        let deadline = ContinuousClock.now + .seconds(30)
        var left: [String] = []
        repeat {
            left = []
            if FileManager.default.fileExists(atPath: root) { left.append(root) }
            for pid in pids where kill(pid, 0) == 0 { left.append("pid \(pid)") }
            if left.isEmpty { return }
            try await Task.sleep(for: .milliseconds(50))
        } while ContinuousClock.now < deadline
        Issue.record("left behind: \(left)")
    }

    @Test("the demo runs to its end: four failovers, the crashed node's node_down, no overlap, nothing left")
    func runsToTheEnd() async throws {
        let demo = try await NodeProcess.start([try builtExecutable("stoker"), "demo"])
        let status = try await demo.waitForExit(timeout: .seconds(120))
        let output = demo.lines.map(\.text).joined(separator: "\n")
        #expect(status == 0, "\(output)\n\(demo.standardError)")
        for step in ["1. crash", "2. freeze", "3. server kill", "4. graceful stop"] {
            #expect(output.contains(step), "\(step) missing:\n\(output)")
        }
        #expect(output.components(separatedBy: " leads (term ").count - 1 == 5, "\(output)")
        // The crashed leader's death reaches its successor as a node_down — unless the sweep removed its row before
        // that leadership began, which the demo then says (a leadership hears only of members it began with).
        #expect(
            output.contains("hears node_down a (died)") || output.contains("began with a already swept"), "\(output)")
        #expect(output.contains("no overlap"), "\(output)")
        #expect(output.contains("directory removed"), "\(output)")
        try await Self.expectNothingLeft(output)
    }

    @Test("Ctrl-C halfway: the demo stops, says so, and leaves nothing behind")
    func interrupted() async throws {
        let demo = try await NodeProcess.start([try builtExecutable("stoker"), "demo"])
        _ = try await demo.waitForLine(timeout: .seconds(60)) { $0.text.hasPrefix("2. freeze") }
        _ = demo.signal(SIGINT)
        let status = try await demo.waitForExit(timeout: .seconds(60))
        let output = demo.lines.map(\.text).joined(separator: "\n")
        #expect(status == 130, "\(output)\n\(demo.standardError)")
        #expect(output.contains("interrupted"), "\(output)")
        try await Self.expectNothingLeft(output)
    }
}
