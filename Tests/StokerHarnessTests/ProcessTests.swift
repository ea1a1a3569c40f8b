import Foundation
import StokerHarness
import Testing

@Suite("runProcess")
struct ProcessTests {
    @Test("exit status, stdout and stderr are reported separately")
    func statusAndOutput() async throws {
        let result = try await runProcess(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
        #expect(result.status == 3)
        #expect(result.standardOutput == "out\n")
        #expect(result.standardError == "err\n")
    }

    @Test("a signal death reports 128 + the signal, like a shell")
    func signalStatus() async throws {
        let result = try await runProcess(["/bin/sh", "-c", "kill -TERM $$"])
        #expect(result.status == 128 + 15)
    }

    @Test("a bare name is looked up in PATH; the environment replaces ours when given")
    func pathAndEnvironment() async throws {
        let inherited = try await runProcess(["sh", "-c", "echo \"$HOME\""])
        #expect(inherited.status == 0)
        #expect(inherited.standardOutput != "\n")

        let replaced = try await runProcess(
            ["/bin/sh", "-c", "echo \"${STOKER_X}|${HOME:-unset}\""], environment: ["STOKER_X": "a b"])
        #expect(replaced.standardOutput == "a b|unset\n")
    }

    @Test("large output on both pipes does not deadlock")
    func largeOutput() async throws {
        let result = try await runProcess([
            "/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a; head -c 300000 /dev/zero | tr '\\0' b >&2",
        ])
        #expect(result.status == 0)
        #expect(result.standardOutput.utf8.count == 1_000_000)
        #expect(result.standardError.utf8.count == 300_000)
    }

    @Test("a process that outlives its timeout is killed and reported with its output so far")
    func timeout() async throws {
        let started = ContinuousClock.now
        let error = await #expect(throws: TestPostgresError.self) {
            try await runProcess(["/bin/sh", "-c", "echo begun; exec sleep 300"], timeout: .milliseconds(300))
        }
        // Killed, not waited for: back long before the 300 s the process would have run (a loaded host can take
        // seconds to schedule the kill and the reads; the property is that it did not wait).
        #expect(ContinuousClock.now - started < .seconds(120))
        #expect(error?.message.contains("SIGKILL") == true)
        #expect(error?.message.contains("begun") == true)
    }

    @Test("cancelling the task kills the process")
    func cancellation() async throws {
        let started = ContinuousClock.now
        let task = Task { try await runProcess(["/bin/sleep", "300"]) }
        try await Task.sleep(for: .milliseconds(200))
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        // Killed, not waited for: back long before the 300 s the process would have run.
        #expect(ContinuousClock.now - started < .seconds(120))
    }

    @Test("a program that does not exist is an error, not a status")
    func missingProgram() async throws {
        await #expect(throws: TestPostgresError.self) {
            try await runProcess(["/nonexistent/stoker-no-such-program"])
        }
    }

    @Test("builtExecutable finds products next to the test binary and names the path when missing")
    func builtExecutables() throws {
        let name = try runningTestBinaryName()
        #expect(name.hasSuffix("PackageTests.xctest"))
        let bundle = try builtExecutable(name)
        #expect(bundle.hasSuffix("/" + name))
        let error = #expect(throws: TestPostgresError.self) { try builtExecutable("stoker-no-such-product") }
        #expect(error?.message.contains("/stoker-no-such-product") == true)
    }
}

/// The file name of the running test binary (e.g. `StokerPackageTests.xctest`), from `/proc/self/exe`.
func runningTestBinaryName() throws -> String {
    let path = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    return String(path.split(separator: "/").last ?? "")
}
