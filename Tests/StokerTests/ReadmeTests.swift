import Foundation
import Testing

/// The README's usage example must be the code the integration tests compile and run, character for character.
@Suite("README")
struct ReadmeTests {
    /// The repository root, from this file's path (Tests/StokerTests/ReadmeTests.swift).
    static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .deletingLastPathComponent()

    static let examplePath = "Tests/StokerIntegrationTests/ReadmeExampleTests.swift"

    @Test("the usage example in README.md is exactly the code between the markers in ReadmeExampleTests.swift")
    func exampleMatchesCompiledCode() throws {
        let readme = try String(contentsOf: Self.root.appendingPathComponent("README.md"), encoding: .utf8)
        let source = try String(contentsOf: Self.root.appendingPathComponent(Self.examplePath), encoding: .utf8)

        let compiled = try #require(
            Self.region(of: source, after: "// README example: begin", before: "// README example: end"),
            "\(Self.examplePath) has no region between `// README example: begin` and `// README example: end`")
        let shown = try #require(
            Self.codeBlock(in: readme, after: "<!-- example: \(Self.examplePath) -->"),
            "README.md has no ```swift block right after `<!-- example: \(Self.examplePath) -->`")

        #expect(!compiled.isEmpty)
        if shown != compiled {
            let firstDifference =
                zip(shown, compiled).enumerated().first { $0.element.0 != $0.element.1 }?.offset
                ?? min(shown.count, compiled.count)
            Issue.record(
                """
                README.md's example differs from \(Self.examplePath) at line \(firstDifference + 1) of the example:
                  README:  \(firstDifference < shown.count ? shown[firstDifference] : "(end)")
                  source:  \(firstDifference < compiled.count ? compiled[firstDifference] : "(end)")
                Copy the region between the markers into the README's code block.
                """)
        }
    }

    /// The lines strictly between the line `begin` and the line `end` (each matched after trimming spaces).
    static func region(of text: String, after begin: String, before end: String) -> [String]? {
        let lines = lines(of: text)
        guard let start = lines.firstIndex(where: { trimmed($0) == begin }),
            let stop = lines[(start + 1)...].firstIndex(where: { trimmed($0) == end })
        else { return nil }
        return withoutBlankEdges(Array(lines[(start + 1)..<stop]))
    }

    /// The body of the first ```swift fence that follows the line `marker` (only blank lines may come between).
    static func codeBlock(in text: String, after marker: String) -> [String]? {
        let lines = lines(of: text)
        guard let markerLine = lines.firstIndex(where: { trimmed($0) == marker }) else { return nil }
        var index = markerLine + 1
        while index < lines.count, trimmed(lines[index]).isEmpty { index += 1 }
        guard index < lines.count, trimmed(lines[index]) == "```swift" else { return nil }
        let body = index + 1
        guard let close = lines[body...].firstIndex(where: { trimmed($0) == "```" }) else { return nil }
        return withoutBlankEdges(Array(lines[body..<close]))
    }

    static func lines(of text: String) -> [String] {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            line.hasSuffix("\r") ? String(line.dropLast()) : String(line)
        }
    }

    static func trimmed(_ line: String) -> String {
        line.trimmingCharacters(in: .whitespaces)
    }

    static func withoutBlankEdges(_ lines: [String]) -> [String] {
        var lines = lines
        while let first = lines.first, trimmed(first).isEmpty { lines.removeFirst() }
        while let last = lines.last, trimmed(last).isEmpty { lines.removeLast() }
        return lines
    }

    @Test("the comparison notices a changed line and accepts blank edges")
    func comparisonHelpers() {
        let source = "x\n// README example: begin\n\nlet a = 1\n\n// README example: end\n"
        let readme = "<!-- example: f -->\n\n```swift\nlet a = 1\n```\n"
        let begin = "// README example: begin"
        let marker = "<!-- example: f -->"
        #expect(Self.region(of: source, after: begin, before: "// README example: end") == ["let a = 1"])
        #expect(Self.codeBlock(in: readme, after: marker) == ["let a = 1"])
        #expect(Self.codeBlock(in: "\(marker)\ntext\n```swift\nx\n```", after: marker) == nil)
        #expect(Self.region(of: "\(begin)\n", after: begin, before: "end") == nil)
    }
}
