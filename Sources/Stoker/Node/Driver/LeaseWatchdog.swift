#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The lease watchdog thread: ends every leadership at the lease deadline, even while the session thread is blocked
/// in libpq, then cuts both sockets — it never waits for the session thread.
extension NodeDriver {
    func watchdogThread() {
        while true {
            let step = state.withLock { locked in
                let step = locked.machine.watchdogTurn()
                if case .hold = step { locked.holding += 1 }
                return step
            }
            switch step {
            case .exit:
                return
            case .hold(let duration):
                hold(duration, releasedAfter: .milliseconds(100), waitingOn: watchdogSignal)
                state.withLock { $0.holding -= 1 }
            case .sleep(let deadline, let generation):
                watchdogSignal.wait(timeout: deadline.map { ContinuousClock.now.duration(to: $0) })
                if let deadline, ContinuousClock.now >= deadline { expireLease(generation: generation) }
            }
        }
    }

    /// The lease of session `generation` may have run out (the machine checks again: a reply may just have extended
    /// it). Leadership ended at the deadline, whenever this thread got to run: that is what `isLeader` said already.
    func expireLease(generation: UInt64) {
        let (expired, events) = withMachineDeferringEvents {
            $0.machine.leaseDeadlinePassed(generation: generation, now: .now)
        }
        guard let ending = expired else { return log(events) }
        lose(ending, reason: .leaseExpired, cut: generation, events: events)
        sessionSignal.signal()
    }
}
