import Testing

@testable import Stoker

@Suite("Fence")
struct FenceTests {
    @Test("the default schema's fence statement")
    func defaultSQL() throws {
        #expect(try Fence.sql() == #"SELECT "stoker".fence($1::text, $2::text, $3::bigint)"#)
        #expect(
            try Fence.sql(schema: StokerSchema.defaultSchema)
                == #"SELECT "stoker".fence($1::text, $2::text, $3::bigint)"#)
    }

    struct Quoted: Sendable, CustomTestStringConvertible {
        let label: String
        let schema: String
        let sql: String
        var testDescription: String { label }
    }

    @Test(
        "a schema name is quoted as an identifier",
        arguments: [
            Quoted(label: "plain", schema: "ops", sql: #"SELECT "ops".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "upper case kept", schema: "Ops", sql: #"SELECT "Ops".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "one double quote", schema: #"my"schema"#,
                sql: #"SELECT "my""schema".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "only a double quote", schema: "\"", sql: #"SELECT """".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "quote-closing injection attempt", schema: #"x".evil(); --"#,
                sql: #"SELECT "x"".evil(); --".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "dot and space", schema: "a.b c", sql: #"SELECT "a.b c".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(label: "unicode", schema: "ŝtoker", sql: #"SELECT "ŝtoker".fence($1::text, $2::text, $3::bigint)"#),
            Quoted(
                label: "exactly 52 bytes", schema: String(repeating: "s", count: 52),
                sql: "SELECT \"\(String(repeating: "s", count: 52))\".fence($1::text, $2::text, $3::bigint)"),
        ])
    func quoted(_ example: Quoted) throws {
        #expect(try Fence.sql(schema: example.schema) == example.sql)
    }

    struct Invalid: Sendable, CustomTestStringConvertible {
        let label: String
        let schema: String
        var testDescription: String { label }
    }

    @Test(
        "a schema name PostgreSQL cannot hold is refused",
        arguments: [
            Invalid(label: "empty", schema: ""),
            Invalid(label: "53 bytes", schema: String(repeating: "s", count: 53)),
            Invalid(label: "53 bytes of mixed widths", schema: String(repeating: "é", count: 26) + "s"),
            Invalid(label: "with a NUL byte", schema: "sto\u{0}ker"),
        ])
    func invalid(_ example: Invalid) {
        do {
            let sql = try Fence.sql(schema: example.schema)
            Issue.record("schema \(example.label) was accepted: \(sql)")
        } catch {
            #expect(error.code == .invalidIdentifier)
            #expect(error.message.contains("schema name"), "\(error.message)")
        }
    }

    @Test("a stale term is SQLSTATE SK001")
    func staleTermSQLState() {
        #expect(Fence.staleTermSQLState == "SK001")
        #expect(Fence.staleTermSQLState == ProtocolStatements.staleTermSQLState)
    }
}
