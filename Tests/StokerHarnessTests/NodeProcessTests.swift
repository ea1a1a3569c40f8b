import Foundation
import Testing

@testable import StokerHarness

@Suite("NodeProcess")
struct NodeProcessTests {
    @Test("stdout lines arrive in order, one by one, while the process runs")
    func linesArriveLive() async throws {
        let started = monotonicSeconds()
        // `par` + `tial` arrive in two writes: a line split across reads is still one line.
        let process = try await NodeProcess.start([
            "/bin/sh", "-c", "echo one; echo two; printf par; sleep 0.2; printf 'tial\\nlast\\n'; exec sleep 30",
        ])
        let two = try await process.waitForLine(timeout: .seconds(30)) { $0.text == "two" }
        #expect(two.index == 1)
        #expect(process.exitStatus == nil, "the line arrived while the process runs")
        let last = try await process.waitForLine(from: 2, timeout: .seconds(30)) { $0.text == "last" }
        #expect(last.index == 3)
        #expect(process.exitStatus == nil)

        let lines = process.lines
        #expect(lines.map(\.text) == ["one", "two", "partial", "last"])
        #expect(lines.map(\.index) == [0, 1, 2, 3])
        #expect(zip(lines, lines.dropFirst()).allSatisfy { $0.receivedAt <= $1.receivedAt })
        #expect(lines.first!.receivedAt >= started && lines.last!.receivedAt <= monotonicSeconds())
        // `partial` came in two writes 0.2 s apart (almost surely two reads) and is one line. (No assertion on the
        // gap between arrival instants: on a busy host the reader may take `one`/`two` late, and that is a timing.)

        // An already printed line is found at once; `from` skips earlier ones.
        let again = try await process.waitForLine(timeout: .seconds(30)) { $0.text.hasPrefix("t") }
        #expect(again.index == 1)
        let after = try await process.waitForLine(from: 2, timeout: .seconds(30)) { !$0.text.isEmpty }
        #expect(after.index == 2)

        #expect(await process.close() == 128 + SIGKILL)
    }

    @Test("waitForLine and waitForExit time out loudly, with the output so far; the process keeps running")
    func timeouts() async throws {
        // The process outlives any stall of a loaded host by far, so "still running" below is the property itself.
        let process = try await NodeProcess.start(["/bin/sh", "-c", "echo begun; echo oops >&2; exec sleep 600"])
        _ = try await process.waitForLine(timeout: .seconds(30)) { $0.text == "begun" }
        let clock = ContinuousClock()
        let begun = clock.now
        let error = await #expect(throws: NodeProcessError.self) {
            try await process.waitForLine(timeout: .milliseconds(300)) { $0.text == "never" }
        }
        #expect(clock.now - begun >= .milliseconds(300))
        // A wait that ignored its timeout would end with the process, 600 s on, and as `.exited`: the reason below is
        // what tells them apart; this bound only fails such a wait loudly, far above any stall of a loaded host.
        #expect(clock.now - begun < .seconds(120))
        #expect(error?.reason == .timedOut)
        #expect(error?.message.contains("begun") == true)
        #expect(error?.message.contains("still running") == true)
        #expect(process.exitStatus == nil)

        let exit = await #expect(throws: NodeProcessError.self) {
            try await process.waitForExit(timeout: .milliseconds(100))
        }
        #expect(exit?.reason == .timedOut)
        #expect(exit?.message.contains("did not exit") == true)
        #expect(process.standardError == "oops\n")
        #expect(await process.close() == 128 + SIGKILL)
    }

    @Test("a process that ends before the line fails the wait at once, with its status and output")
    func exitsFirst() async throws {
        let process = try await NodeProcess.start(["/bin/sh", "-c", "echo out; echo err >&2; sleep 0.2; exit 3"])
        let clock = ContinuousClock()
        let begun = clock.now
        let error = await #expect(throws: NodeProcessError.self) {
            try await process.waitForLine(timeout: .seconds(60)) { $0.text == "never" }
        }
        #expect(clock.now - begun < .seconds(30))
        #expect(error?.reason == .exited(status: 3))
        #expect(error?.message.contains("out") == true)
        #expect(error?.message.contains("err") == true)
        #expect(try await process.waitForExit(timeout: .seconds(30)) == 3)
        // Waits after the end answer at once.
        await #expect(throws: NodeProcessError.self) {
            try await process.waitForLine(timeout: .seconds(60)) { $0.text == "never" }
        }
        #expect(try await process.waitForLine(timeout: .seconds(60)) { $0.text == "out" }.index == 0)
    }

    @Test("the exit status after SIGTERM, SIGKILL, and a clean exit on SIGTERM; SIGSTOP is not an exit")
    func signals() async throws {
        let terminated = try await NodeProcess.start(["/bin/sleep", "30"])
        #expect(terminated.signal(SIGTERM))
        #expect(try await terminated.waitForExit(timeout: .seconds(30)) == 128 + SIGTERM)
        #expect(!terminated.signal(SIGTERM), "no signal once reaped")

        let killed = try await NodeProcess.start(["/bin/sleep", "30"])
        #expect(killed.signal(SIGSTOP))
        await #expect(throws: NodeProcessError.self) { try await killed.waitForExit(timeout: .milliseconds(200)) }
        #expect(killed.kill())
        #expect(try await killed.waitForExit(timeout: .seconds(30)) == 128 + SIGKILL)

        // A process that handles SIGTERM: default dispositions and an empty mask let the trap run.
        let graceful = try await NodeProcess.start([
            "/bin/sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        _ = try await graceful.waitForLine(timeout: .seconds(30)) { $0.text == "ready" }
        graceful.signal(SIGTERM)
        #expect(try await graceful.waitForExit(timeout: .seconds(30)) == 0)
        #expect(try await graceful.waitForLine(timeout: .seconds(30)) { $0.text == "bye" }.index == 1)
    }

    @Test("the child gets only fds 0-2, an empty signal mask, no ignored signals, and the given environment")
    func childHygiene() async throws {
        // Programs exec'd directly, no shell in between (a shell blocks signals and opens pipes of its own).
        // `ls` lists its own directory descriptor too: 3.
        let descriptors = try await NodeProcess.start(["/bin/ls", "/proc/self/fd"])
        #expect(try await descriptors.waitForExit(timeout: .seconds(30)) == 0)
        #expect(await descriptors.close() == 0)
        #expect(descriptors.lines.map(\.text) == ["0", "1", "2", "3"])

        let signals = try await NodeProcess.start(["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
        #expect(try await signals.waitForExit(timeout: .seconds(30)) == 0)
        #expect(await signals.close() == 0)
        #expect(signals.lines.map(\.text) == ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"])

        let environment = try await NodeProcess.start(
            ["sh", "-c", "echo \"[$STOKER_X|${HOME:-unset}]\""],
            environment: ["STOKER_X": "a b", "PATH": "/usr/bin:/bin"])
        #expect(try await environment.waitForExit(timeout: .seconds(30)) == 0)
        #expect(await environment.close() == 0)
        #expect(environment.lines.map(\.text) == ["[a b|unset]"])
    }

    @Test("a program that cannot be started is an error at start")
    func startFailures() async throws {
        let missing = await #expect(throws: NodeProcessError.self) {
            try await NodeProcess.start(["/nonexistent/stoker-no-such-program"])
        }
        #expect(missing?.reason == .startFailed)
        #expect(missing?.message.contains("execve") == true)
        let unknown = await #expect(throws: NodeProcessError.self) {
            try await NodeProcess.start(["stoker-no-such-program-in-path"])
        }
        #expect(unknown?.message.contains("PATH") == true)
        await #expect(throws: NodeProcessError.self) { try await NodeProcess.start([]) }
    }

    @Test("a waiting task that is cancelled gets CancellationError; the process is untouched")
    func cancellation() async throws {
        let process = try await NodeProcess.start(["/bin/sleep", "30"])
        let waiter = Task { try await process.waitForLine(timeout: .seconds(60)) { _ in true } }
        try await Task.sleep(for: .milliseconds(100))
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        #expect(process.exitStatus == nil)
        #expect(await process.close() == 128 + SIGKILL)
    }

    @Test("dropping the last reference kills and reaps the child")
    func deinitKills() async throws {
        var process: NodeProcess? = try await NodeProcess.start(["/bin/sleep", "30"])
        let pid = process!.pid
        let identity = try #require(ProcessProbe(pid: pid))
        process = nil
        // Reaped, not only dead: /proc forgets it (a zombie would stay).
        #expect(await identity.reaped(within: .seconds(10)), "pid \(pid) not reaped after the handle was dropped")
    }

    /// The proof that the child dies with its parent, even by SIGKILL. An intermediate process — this test binary,
    /// running ``NodeProcessIntermediate`` — starts `sh -c 'exec sleep 1000'` as a NodeProcess and prints its pid; we
    /// SIGKILL the intermediate and look at the grandchild. The same run with the parent-death signal switched off is
    /// the control: there the grandchild survives (re-parented), which shows the check can fail.
    @Test("the child dies when its parent dies, even by SIGKILL (and survives it without the parent-death signal)")
    func diesWithParent() async throws {
        let protected = try await grandchildAfterKillingIntermediate(parentDeathSignal: true)
        defer { protected.killIfSame() }  // Only when the proof failed.
        #expect(
            await protected.gone(within: .seconds(10)),
            "grandchild \(protected.pid) still runs after its parent was killed")

        let control = try await grandchildAfterKillingIntermediate(parentDeathSignal: false)
        defer { control.killIfSame() }
        #expect(!(await control.gone(within: .seconds(1))), "without PDEATHSIG the grandchild should survive")
        let adopter = ProcessProbe(pid: control.pid)?.parent
        #expect(adopter != nil && adopter != getpid(), "re-parented (to \(adopter.map(String.init) ?? "?")), not ours")
    }

    /// Starts the intermediate, learns its grandchild, checks the chain, SIGKILLs the intermediate; returns the probe.
    private func grandchildAfterKillingIntermediate(parentDeathSignal: Bool) async throws -> ProcessProbe {
        var environment = ProcessInfo.processInfo.environment
        environment[NodeProcessIntermediate.variable] = parentDeathSignal ? "1" : "0"
        let binary = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let intermediate = try await NodeProcess.start(
            [binary, "--testing-library", "swift-testing", "--filter", "NodeProcessIntermediate"],
            environment: environment)
        let line = try await intermediate.waitForLine(timeout: .seconds(120)) { $0.text.hasPrefix("grandchild ") }
        let pid = try #require(Int32(line.text.dropFirst("grandchild ".count)))
        let grandchild = try #require(ProcessProbe(pid: pid))
        #expect(grandchild.parent == intermediate.pid, "the grandchild is the intermediate's child")
        // PR_SET_PDEATHSIG survives execve: let `sh` become `sleep` first, so the program that must die is the exec'd one.
        #expect(await grandchild.becomes("sleep", within: .seconds(10)))
        #expect(intermediate.kill())
        #expect(try await intermediate.waitForExit(timeout: .seconds(30)) == 128 + SIGKILL)
        return grandchild
    }
}

/// Not a test on its own: the intermediate process of ``NodeProcessTests/diesWithParent()``. Does nothing unless
/// `STOKER_NODEPROCESS_INTERMEDIATE` is set (`1`: default parent-death signal, `0`: none); then starts
/// `sh -c 'exec sleep 1000'`, prints `grandchild <pid>`, and waits to be killed.
@Suite("NodeProcessIntermediate")
struct NodeProcessIntermediate {
    static let variable = "STOKER_NODEPROCESS_INTERMEDIATE"

    @Test("intermediate process for the parent-death proof (idle unless started by it)")
    func intermediate() async throws {
        guard let mode = ProcessInfo.processInfo.environment[Self.variable] else { return }
        let child = try await NodeProcess.start(
            ["/bin/sh", "-c", "exec sleep 1000"], environment: nil, parentDeathSignal: mode == "1" ? SIGKILL : 0)
        print("grandchild \(child.pid)")
        fflush(nil)
        // Killed long before this ends; the bound only keeps a lost intermediate from living forever.
        try await Task.sleep(for: .seconds(600))
        withExtendedLifetime(child) {}
    }
}

/// A process by pid and start time, read from `/proc/<pid>/stat` (so a reused pid is not mistaken for it).
struct ProcessProbe {
    let pid: Int32
    let startTime: String
    let parent: Int32?
    let command: String

    init?(pid: Int32) {
        guard let fields = Self.fields(pid), fields.count > 20 else { return nil }
        self.pid = pid
        command = fields[0]
        parent = Int32(fields[2])
        startTime = fields[20]
    }

    /// `(comm)` then the fields from 3 (state) on: [comm, state, ppid, …, starttime at 20].
    private static func fields(_ pid: Int32) -> [String]? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")")
        else { return nil }
        let command = String(stat[stat.index(after: open)..<close])
        return [command] + stat[stat.index(after: close)...].split(separator: " ").map(String.init)
    }

    /// Running: present under the same start time and not a zombie.
    var isRunning: Bool {
        guard let fields = Self.fields(pid), fields.count > 20 else { return false }
        return fields[1] != "Z" && fields[20] == startTime
    }

    /// Whether it stopped running within `limit` (checked every 10 ms: a bound that fails loudly, not a pause).
    func gone(within limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now.advanced(by: limit)
        while isRunning {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return true
    }

    /// Whether it was reaped within `limit` — gone from /proc, not a zombie (checked every 10 ms).
    func reaped(within limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now.advanced(by: limit)
        while Self.fields(pid)?[20] == startTime {
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return true
    }

    /// Whether it runs `command` (its `comm`, after an exec) within `limit` (checked every 10 ms).
    func becomes(_ command: String, within limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now.advanced(by: limit)
        while isRunning {
            if Self.fields(pid)?.first == command { return true }
            if ContinuousClock.now >= deadline { return false }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return false
    }

    /// SIGKILL, if it is still this process.
    func killIfSame() {
        if isRunning { kill(pid, SIGKILL) }
    }
}
