import StokerHarness
import Synchronization
import Testing

@_spi(Testing) @testable import Stoker

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The eventfd wake-up the node's and the sessions' threads sleep on: a signal is never lost (made before the wait, it
/// ends the wait at once), several are one wake-up, and a wait with no signal lasts its timeout.
@Suite("Wake signal")
struct WakeSignalTests {
    @Test("a signal made before the wait ends it at once, and is consumed")
    func signalThenWait() throws {
        let signal = try WakeSignal()
        signal.signal()
        let started = ContinuousClock.now
        #expect(signal.wait(timeout: .seconds(10)))
        #expect(started.duration(to: .now) < .seconds(5))
        #expect(!signal.wait(timeout: .zero), "the wait reset the counter")
    }

    @Test("without a signal, a wait lasts its timeout and returns false")
    func timeout() throws {
        let signal = try WakeSignal()
        let started = ContinuousClock.now
        #expect(!signal.wait(timeout: .milliseconds(50)))
        #expect(started.duration(to: .now) >= .milliseconds(50))
        #expect(!signal.wait(timeout: .zero))
    }

    @Test("several signals before a wait are one wake-up")
    func coalesced() throws {
        let signal = try WakeSignal()
        for _ in 0..<5 { signal.signal() }
        #expect(signal.wait(timeout: .zero))
        #expect(!signal.wait(timeout: .milliseconds(20)))
    }

    @Test("reset discards a pending signal, and returns at once without one")
    func reset() throws {
        let signal = try WakeSignal()
        signal.reset()  // counter 0: non-blocking, returns
        signal.signal()
        signal.reset()
        #expect(!signal.wait(timeout: .milliseconds(20)))
    }

    @Test("the descriptor polls readable once signalled, as another thread's poll(2) beside its socket sees it")
    func descriptorReadable() throws {
        let signal = try WakeSignal()
        var entry = pollfd(fd: signal.descriptor, events: Int16(POLLIN), revents: 0)
        #expect(poll(&entry, 1, 0) == 0)
        signal.signal()
        entry.revents = 0
        #expect(poll(&entry, 1, 0) == 1)
        #expect(entry.revents & Int16(POLLIN) != 0)
        signal.reset()
        entry.revents = 0
        #expect(poll(&entry, 1, 0) == 0)
    }

    @Test("a signal from another thread wakes a waiter blocked in poll(2)")
    func signalFromAnotherThread() throws {
        let signal = try WakeSignal()
        let started = ContinuousClock.now
        try startThread(.session) {
            var pause = timespec(tv_sec: 0, tv_nsec: 50_000_000)
            _ = nanosleep(&pause, nil)
            signal.signal()
        }
        #expect(signal.wait(timeout: .seconds(30)))
        let waited = started.duration(to: .now)
        #expect(waited >= .milliseconds(40), "the wait ended before the other thread signalled")
        #expect(waited < .seconds(20), "the signal did not wake the waiter")
    }

    @Test("a wait with no timeout sleeps until signalled")
    func waitForever() throws {
        let signal = try WakeSignal()
        try startThread(.watchdog) {
            var pause = timespec(tv_sec: 0, tv_nsec: 20_000_000)
            _ = nanosleep(&pause, nil)
            signal.signal()
        }
        #expect(signal.wait(timeout: nil))
    }
}

@Suite("Stoker's threads")
struct StokerThreadTests {
    @Test("each thread Stoker starts carries its name", arguments: StokerThread.allCases)
    func named(_ kind: StokerThread) throws {
        let signal = try WakeSignal()
        let seen = Mutex<String?>(nil)
        try startThread(kind) {
            let name = Files.contents("/proc/thread-self/comm").map { String($0.prefix { $0 != "\n" }) }
            seen.withLock { $0 = name }
            signal.signal()
        }
        #expect(signal.wait(timeout: .seconds(30)), "the thread did not run")
        #expect(seen.withLock { $0 } == kind.rawValue)
    }
}
