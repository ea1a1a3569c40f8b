import Testing

@testable import Stoker

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The copy of sql/ the library runs must be byte-identical to sql/, the schema's single source of truth (what a DBA
/// or another migration tool applies).
@Suite("Embedded migrations")
struct MigrationFilesTests {
    /// The repository root, from this file's path.
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path
    }()

    static func sqlFiles() throws -> [String] {
        guard let directory = opendir(root + "/sql") else { throw CocoaLikeError("cannot open \(root)/sql") }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) {
                String(cString: $0.bindMemory(to: CChar.self).baseAddress!)
            }
            if name.hasSuffix(".sql"), name.first?.isNumber == true { names.append(name) }
        }
        return names.sorted()
    }

    static func read(_ path: String) throws -> [UInt8] {
        guard let file = fopen(path, "rb") else { throw CocoaLikeError("cannot open \(path)") }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = fread(&buffer, 1, buffer.count, file)
            if count == 0 { break }
            bytes += buffer[0..<count]
        }
        return bytes
    }

    @Test("the same files, in the same order, under the same versions")
    func sameFiles() throws {
        #expect(try Self.sqlFiles() == Migration.all.map(\.fileName))
        #expect(Migration.all.map(\.version) == Array(1...Migration.all.count))
    }

    @Test("every embedded file is byte-identical to sql/ (if not: run scripts/embed-sql)")
    func byteIdentical() throws {
        for migration in Migration.all {
            let onDisk = try Self.read(Self.root + "/sql/" + migration.fileName)
            #expect(onDisk == Array(migration.sql.utf8), "\(migration.fileName) differs: run scripts/embed-sql")
        }
    }
}

struct CocoaLikeError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite("Schema manifest")
struct SchemaManifestTests {
    typealias Column = (table: String, column: String, definition: String)
    static let searchPath = "search_path=s, pg_temp"

    static func complete() -> [Column] {
        SchemaManifest.columns.flatMap { table in table.columns.map { (table.table, $0.name, $0.definition) } }
    }

    static func functions() -> [SchemaManifest.FoundFunction] {
        let bodies = SchemaManifest.expectedBodies(in: Migration.all)
        return SchemaManifest.functions.map {
            SchemaManifest.FoundFunction(
                signature: $0.signature,
                body: bodies[$0.name] ?? "",
                securityDefiner: $0.securityDefiner,
                settings: [searchPath]
            )
        }
    }

    static func triggers() -> [String: SchemaManifest.FoundTrigger] {
        SchemaManifest.triggers.mapValues {
            SchemaManifest.FoundTrigger(fires: true, function: $0.function, type: $0.type, hasCondition: false)
        }
    }

    static func differences(
        columns: [Column] = complete(),
        constraints: Set<String> = SchemaManifest.constraints,
        functions: [SchemaManifest.FoundFunction] = functions(),
        triggers: [String: SchemaManifest.FoundTrigger] = triggers()
    ) -> [String] {
        SchemaManifest.differences(
            schema: "s",
            columns: columns,
            constraints: constraints,
            functions: functions,
            triggers: triggers,
            searchPath: searchPath
        )
    }

    @Test("the bodies of every function are found in the migrations")
    func bodies() {
        let bodies = SchemaManifest.expectedBodies(in: Migration.all)
        #expect(Set(bodies.keys) == Set(SchemaManifest.functions.map(\.name)))
        #expect(bodies["fence"]?.contains("FOR SHARE OF e") == true)
        #expect(bodies["fence"]?.hasPrefix("\nDECLARE") == true)
    }

    @Test("an intact schema has no differences; extra columns and constraints are tolerated")
    func intact() {
        let problems = Self.differences(
            columns: Self.complete() + [("nodes", "added_later", "text")],
            constraints: SchemaManifest.constraints.union(["nodes u (name)"])
        )
        #expect(problems.isEmpty, "\(problems)")
    }

    @Test("each kind of tampering is named")
    func tampered() {
        var columns = Self.complete().filter { !($0.table == "nodes" && $0.column == "heartbeat_at") }
        columns = columns.map {
            $0.table == "elections" && $0.column == "term" ? ("elections", "term", "text not null") : $0
        }
        columns = columns.filter { $0.table != "clusters" }
        var functions = Self.functions().filter { $0.signature != "notify_node_change()" }
        functions = functions.map { function in
            guard function.signature.hasPrefix("fence(") else { return function }
            return .init(
                signature: function.signature,
                body: "BEGIN RETURN p_term; END",
                securityDefiner: false,
                settings: ["search_path=public"]
            )
        }
        var triggers = Self.triggers()
        triggers["nodes.nodes_notify"] = .init(
            fires: false, function: "notify_node_change", type: 5, hasCondition: true)
        triggers["elections.elections_notify"] = .init(fires: true, function: "other", type: 17, hasCondition: false)
        let problems = Self.differences(
            columns: columns,
            constraints: SchemaManifest.constraints.subtracting(["elections u (cluster_id,name)"]),
            functions: functions,
            triggers: triggers
        )
        let fence = "function s.fence(p_cluster text, p_election text, p_term bigint)"
        #expect(
            problems == [
                "table s.clusters is missing",
                "column s.nodes.heartbeat_at is missing",
                "column s.elections.term is text not null, expected bigint not null default 0",
                "constraint elections u (cluster_id,name) in schema s is missing",
                "function s.notify_node_change() is missing",
                "\(fence) was changed: its body differs from sql/",
                "\(fence) should be SECURITY DEFINER",
                "\(fence) does not pin search_path=s, pg_temp (it sets [\"search_path=public\"])",
                "trigger elections.elections_notify in schema s calls other, expected notify_election_change",
                "trigger nodes.nodes_notify in schema s is disabled",
                "trigger nodes.nodes_notify in schema s no longer fires AFTER INSERT OR DELETE FOR EACH ROW",
                "trigger nodes.nodes_notify in schema s has a WHEN condition",
            ]
        )
    }
}
