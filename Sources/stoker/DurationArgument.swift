import ArgumentParser

/// A duration on the command line: a number and a unit, as `250ms`, `2s`, `1.5s`, `1m` (units `ns`, `us`, `ms`,
/// `s`, `m`, `h`).
struct DurationArgument: ExpressibleByArgument, Sendable, Hashable, CustomStringConvertible {
    let duration: Duration
    private let text: String

    init?(argument: String) {
        guard let duration = Self.parse(argument) else { return nil }
        self.duration = duration
        text = argument
    }

    var description: String { text }

    static let units: [(suffix: String, nanoseconds: Int64)] = [
        ("ns", 1), ("us", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ]

    /// `nil` for anything but digits (with at most one `.` and 9 decimals) followed by one of ``units``.
    static func parse(_ text: String) -> Duration? {
        let digits = text.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
        let unit = text.dropFirst(digits.count)
        guard let scale = units.first(where: { $0.suffix == unit })?.nanoseconds, !digits.isEmpty else { return nil }
        let parts = digits.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, let whole = Int64(parts[0].isEmpty ? "0" : parts[0]) else { return nil }
        var fraction: Int64 = 0
        var fractionScale: Int64 = 1
        if parts.count == 2 {
            guard !parts[1].isEmpty, parts[1].count <= 9, let value = Int64(parts[1]) else { return nil }
            fraction = value
            for _ in 0..<parts[1].count { fractionScale *= 10 }
        }
        let (wholeNanoseconds, overflow) = whole.multipliedReportingOverflow(by: scale)
        guard !overflow else { return nil }
        // fraction < fractionScale ≤ 10⁹ and scale ≤ 3.6 × 10¹²: compute in two steps to stay within Int64.
        let fractionNanoseconds =
            fraction * (scale / fractionScale) + fraction * (scale % fractionScale) / fractionScale
        let (total, overflowTotal) = wholeNanoseconds.addingReportingOverflow(fractionNanoseconds)
        guard !overflowTotal else { return nil }
        return .nanoseconds(total)
    }

    static var defaultCompletionKind: CompletionKind { .default }
}
