import Foundation
import Testing

/// Every Swift code block of README.md and of the DocC catalog must be code the tests compile: its text appears,
/// line for line (leading indentation aside), in one of the files that hold the documentation's examples. A
/// `Package.swift` excerpt (first line `// Package.swift`), which no test target can compile, is checked against this
/// package's own manifest instead.
@Suite("Documentation")
struct DocumentationTests {
    static let root = ReadmeTests.root

    /// The compiled files the documentation's Swift blocks are taken from.
    static let compiledFiles = [
        "Tests/StokerIntegrationTests/DocumentationExamples.swift",
        "Tests/StokerIntegrationTests/FencingTests.swift",
        "Tests/StokerIntegrationTests/ReadmeExampleTests.swift",
    ]

    static let catalog = "Sources/Stoker/Documentation.docc"

    /// A fenced code block: where it is, its language, its lines.
    struct Block: CustomStringConvertible {
        let file: String
        let line: Int
        let language: String
        let lines: [String]

        var description: String {
            "\(file):\(line) (```\(language), first line: \(lines.first.map { "`\($0)`" } ?? "empty"))"
        }
    }

    /// README.md and every .md file of the catalog.
    static func documents() throws -> [String] {
        let articles = try FileManager.default.contentsOfDirectory(
            atPath: root.appendingPathComponent(catalog).path)
        return ["README.md"] + articles.filter { $0.hasSuffix(".md") }.sorted().map { "\(catalog)/\($0)" }
    }

    /// Every fenced block of `text` (``` or ~~~ fences, indented or not), with its 1-based opening line.
    static func blocks(in text: String, file: String) -> [Block] {
        let lines = ReadmeTests.lines(of: text)
        var blocks: [Block] = []
        var index = 0
        while index < lines.count {
            let opening = ReadmeTests.trimmed(lines[index])
            guard opening.hasPrefix("```") || opening.hasPrefix("~~~") else {
                index += 1
                continue
            }
            let fence = String(opening.prefix(3))
            let language = String(opening.dropFirst(3)).trimmingCharacters(in: .whitespaces)
            var close = index + 1
            while close < lines.count, ReadmeTests.trimmed(lines[close]) != fence { close += 1 }
            blocks.append(
                Block(
                    file: file, line: index + 1, language: language,
                    lines: ReadmeTests.withoutBlankEdges(Array(lines[(index + 1)..<min(close, lines.count)]))))
            index = close + 1
        }
        return blocks
    }

    /// Lines without their leading (and trailing) spaces.
    static func normalised(_ lines: [String]) -> [String] {
        lines.map(ReadmeTests.trimmed)
    }

    /// Whether `block` occurs as consecutive lines of `file` (both normalised).
    static func contains(_ file: [String], _ block: [String]) -> Bool {
        guard !block.isEmpty, block.count <= file.count else { return false }
        for start in 0...(file.count - block.count) where file[start] == block[0] {
            if Array(file[start..<(start + block.count)]) == block { return true }
        }
        return false
    }

    static func read(_ path: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
    }

    @Test("every ```swift block of README.md and of the DocC articles is compiled code")
    func swiftBlocksAreCompiled() throws {
        let compiled = try Self.compiledFiles.map { path in
            (path, Self.normalised(ReadmeTests.lines(of: try Self.read(path))))
        }
        var checked = 0
        for document in try Self.documents() {
            for block in Self.blocks(in: try Self.read(document), file: document) where block.language == "swift" {
                checked += 1
                if block.lines.first.map(ReadmeTests.trimmed) == "// Package.swift" {
                    try checkManifestExcerpt(block)
                    continue
                }
                let wanted = Self.normalised(block.lines)
                if !compiled.contains(where: { Self.contains($0.1, wanted) }) {
                    Issue.record(
                        """
                        \(block) is not compiled code: its lines appear in none of \
                        \(Self.compiledFiles.joined(separator: ", ")). Put it there (between \
                        `// Docs: <article> <n>: begin` and `end` markers) and keep both identical.
                        """)
                }
            }
        }
        #expect(checked >= 10, "found only \(checked) Swift blocks: is the catalog where this test looks?")
    }

    /// The doc comments (`///`) of every Swift file under `Sources/Stoker`, as text: each comment line without its
    /// `///` marker, every other line empty (a block never spans code).
    static func docComments() throws -> [(file: String, text: String)] {
        let sources = root.appendingPathComponent("Sources/Stoker")
        guard let walker = FileManager.default.enumerator(atPath: sources.path) else { return [] }
        var found: [(file: String, text: String)] = []
        for case let path as String in walker where path.hasSuffix(".swift") {
            let file = "Sources/Stoker/\(path)"
            let lines = ReadmeTests.lines(of: try read(file)).map { line -> String in
                let trimmed = ReadmeTests.trimmed(line)
                guard trimmed.hasPrefix("///") else { return "" }
                let rest = trimmed.dropFirst(3)
                return String(rest.hasPrefix(" ") ? rest.dropFirst() : rest)
            }
            found.append((file, lines.joined(separator: "\n")))
        }
        return found.sorted { $0.file < $1.file }
    }

    @Test("every ```swift block of the library's doc comments is compiled code")
    func docCommentBlocksAreCompiled() throws {
        let compiled = try Self.compiledFiles.map { Self.normalised(ReadmeTests.lines(of: try Self.read($0))) }
        var checked = 0
        for (file, text) in try Self.docComments() {
            for block in Self.blocks(in: text, file: file) where block.language == "swift" {
                checked += 1
                let wanted = Self.normalised(block.lines)
                #expect(
                    compiled.contains { Self.contains($0, wanted) },
                    "\(block) is not compiled code: copy it into DocumentationExamples.swift and keep both identical")
            }
        }
        #expect(checked >= 2, "found only \(checked) Swift blocks in doc comments")
    }

    @Test("every code block names its language; the DocC catalog has the articles the landing page links")
    func blocksAreLabelledAndArticlesLinked() throws {
        for document in try Self.documents() {
            for block in Self.blocks(in: try Self.read(document), file: document) where block.language.isEmpty {
                // Plain blocks are fine for output and usage lines, never for code that looks like Swift.
                let text = block.lines.joined(separator: "\n")
                #expect(
                    !(text.contains("try await") || text.contains("func ") || text.contains("let ")),
                    "\(block) looks like Swift: fence it as ```swift (and compile it)")
            }
        }
        let landing = try Self.read("\(Self.catalog)/Stoker.md")
        for article in ["GettingStarted", "GuaranteesAndTiming", "Fencing", "Operations", "LeaderOnlyJob"] {
            #expect(landing.contains("<doc:\(article)>"), "Stoker.md does not link <doc:\(article)>")
            #expect(
                FileManager.default.fileExists(
                    atPath: Self.root.appendingPathComponent("\(Self.catalog)/\(article).md").path),
                "\(article).md is missing")
        }
    }

    /// A `Package.swift` excerpt: every `.product(name:package:)` names a package the excerpt adds, by the identity
    /// SwiftPM derives from its URL (the last path component without `.git`); `Stoker` is this package's library;
    /// the other URLs are the ones this package itself depends on.
    func checkManifestExcerpt(_ block: Block) throws {
        let manifest = try Self.read("Package.swift")
        let text = block.lines.joined(separator: "\n")
        let urls = Self.matches(of: #"\.package\(url: "([^"]+)""#, in: text)
        let identities = Set(
            urls.map { url in
                var last = url.split(separator: "/").last.map(String.init) ?? url
                if last.hasSuffix(".git") { last.removeLast(4) }
                return last.lowercased()
            })
        let products = Self.matches(of: #"\.product\(name: "([^"]+)", package: "([^"]+)"\)"#, in: text, group: 2)
        #expect(!urls.isEmpty && !products.isEmpty, "\(block) adds no package or no product")
        for package in products where !identities.contains(package.lowercased()) {
            Issue.record("\(block): package \"\(package)\" is not the identity of any URL it adds \(urls)")
        }
        #expect(
            Self.matches(of: #"\.product\(name: "([^"]+)", package: "stoker"\)"#, in: text) == ["Stoker"],
            "\(block) must use the product Stoker of the package stoker")
        #expect(manifest.contains(#".library(name: "Stoker""#))
        for url in urls where !url.contains("/stoker.git") {
            let bare = url.hasSuffix(".git") ? String(url.dropLast(4)) : url
            #expect(manifest.contains("\"\(bare)\""), "\(block): \(url) is not a dependency of this package")
        }
    }

    /// The `group`th capture of every match of `pattern` in `text`.
    static func matches(of pattern: String, in text: String, group: Int = 1) -> [String] {
        guard let regex = try? NSRegularExpression(pattern: pattern) else { return [] }
        let range = NSRange(text.startIndex..., in: text)
        return regex.matches(in: text, range: range).compactMap { match in
            Range(match.range(at: group), in: text).map { String(text[$0]) }
        }
    }

    @Test("the block finder and the comparison notice what they must")
    func helpers() {
        let text = "a\n```swift\n  let x = 1\n\n```\n- item\n\n  ```\n  out\n  ```\n"
        let found = Self.blocks(in: text, file: "f")
        #expect(found.map(\.language) == ["swift", ""])
        #expect(found.map(\.line) == [2, 8])
        #expect(found.first?.lines == ["  let x = 1"])
        let file = Self.normalised(["func f() {", "    let x = 1", "    let y = 2", "}"])
        #expect(Self.contains(file, Self.normalised(["let x = 1", "let y = 2"])))
        #expect(!Self.contains(file, Self.normalised(["let x = 1", "let z = 2"])))
        #expect(!Self.contains(file, Self.normalised(["let y = 2", "let x = 1"])))
    }
}
