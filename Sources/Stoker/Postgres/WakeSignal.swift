import CStokerLibPQ  // for eventfd (sys/eventfd.h, which Glibc does not export)

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// An eventfd(2) one thread writes to wake another out of poll(2).
///
/// The threads that own a `PGconn` sleep in `poll(2)` — on their socket and this descriptor — and never on a condition
/// variable: the kernel wakes them for the socket and for ``signal()`` alike, with no polling interval. The counter is
/// non-blocking, so signals made while nobody waits coalesce into one wake-up instead of being lost or queued.
///
/// The descriptor is closed when the signal goes away: keep the signal alive as long as any thread may poll on
/// ``descriptor`` (its owner's threads hold the owner, which holds the signal).
///
/// SPI for the test support's proxy (`TestProxy`), which stops its threads with one.
@_spi(Testing) public final class WakeSignal: Sendable {
    /// The eventfd: poll it for `POLLIN` beside other descriptors; ``reset()`` once it fired.
    public let descriptor: Int32

    /// Opens a non-blocking, close-on-exec eventfd with its counter at 0.
    public init() throws(StokerError) {
        let descriptor = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard descriptor >= 0 else {
            throw StokerError(.connectionFailed, "eventfd(2) failed with errno \(errno).")
        }
        self.descriptor = descriptor
    }

    deinit {
        // No thread can be polling it any more: each holds what holds this signal while it runs.
        closeDescriptor(descriptor)
    }

    /// Wakes whoever polls the descriptor now, or the next poll (adds 1 to the counter).
    public func signal() {
        var one: UInt64 = 1
        _ = write(descriptor, &one, MemoryLayout<UInt64>.size)
    }

    /// Reads the counter — setting it back to 0 — and discards it; does nothing (never blocks) when it is 0.
    public func reset() {
        var counter: UInt64 = 0
        _ = read(descriptor, &counter, MemoryLayout<UInt64>.size)
    }

    /// Sleeps in poll(2) on the descriptor until signalled or `timeout` passes (nil: forever); resets it when
    /// signalled; returns whether it was signalled.
    ///
    /// A signal made before the call counts: it returns at once. Several signals before the wake-up are one. An
    /// interrupted poll (`EINTR`) sleeps again for what is left; any other poll failure returns `false` at once.
    @discardableResult
    public func wait(timeout: Duration?) -> Bool {
        let deadline = timeout.map { ContinuousClock.now + $0 }
        while true {
            var entry = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, deadline.map { Self.milliseconds(until: $0) } ?? -1)
            if ready < 0 {
                if errno == EINTR { continue }
                return false
            }
            if ready > 0, entry.revents != 0 {
                reset()
                return true
            }
            // Timed out: poll rounds its timeout to milliseconds (up, here), so this is the deadline unless the clock
            // disagrees by a hair; then sleep the rest.
            if let deadline, ContinuousClock.now >= deadline { return false }
        }
    }

    /// Milliseconds until `deadline`, rounded up (a poll never returns just before it), 0 once due, and at most
    /// `Int32.max` (poll's limit: about 24 days; the caller's loop sleeps again for the rest).
    private static func milliseconds(until deadline: ContinuousClock.Instant) -> Int32 {
        let remaining = ContinuousClock.now.duration(to: deadline)
        if remaining <= .zero { return 0 }
        if remaining >= .milliseconds(Int32.max) { return .max }
        return Int32(remaining.roundedUpMilliseconds)
    }
}
