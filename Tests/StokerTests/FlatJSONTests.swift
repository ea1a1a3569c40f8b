import Testing

@testable import Stoker

/// The notification payloads: what PostgreSQL's `json_build_object(...)::text` writes, and what must be ignored.
@Suite("Flat JSON payloads")
struct FlatJSONTests {
    typealias Value = FlatJSON.Value

    struct Case: Sendable, CustomTestStringConvertible {
        let label: String
        let text: String
        let expected: [String: Value]
        var testDescription: String { label }
    }

    static let parsed: [Case] = [
        Case(
            label: "node_up as json_build_object writes it",
            text: #"{"event" : "node_up", "node" : 5, "name" : "a"}"#,
            expected: ["event": .string("node_up"), "node": .integer(5), "name": .string("a")]),
        Case(
            label: "node_down",
            text: #"{"event" : "node_down", "node" : 12, "name" : "host-1:4242"}"#,
            expected: ["event": .string("node_down"), "node": .integer(12), "name": .string("host-1:4242")]),
        Case(
            label: "leader with a null node",
            text: #"{"event" : "leader", "election" : 3, "name" : "importer", "term" : 7, "node" : null}"#,
            expected: [
                "event": .string("leader"), "election": .integer(3), "name": .string("importer"),
                "term": .integer(7), "node": .null,
            ]),
        Case(
            label: "released with the largest bigint term",
            text: #"{"event" : "released", "election" : 1, "name" : "e", "term" : 9223372036854775807}"#,
            expected: [
                "event": .string("released"), "election": .integer(1), "name": .string("e"),
                "term": .integer(.max),
            ]),
        Case(
            label: "compact form without spaces",
            text: #"{"event":"node_up","node":5,"name":"a"}"#,
            expected: ["event": .string("node_up"), "node": .integer(5), "name": .string("a")]),
        Case(
            label: "whitespace everywhere (tabs, newlines, CR)",
            text: " \t{\n\"a\"\r:\t1 ,\n \"b\" : \"x\" }\n ",
            expected: ["a": .integer(1), "b": .string("x")]),
        Case(label: "empty object", text: "{}", expected: [:]),
        Case(label: "empty object with spaces", text: " { } ", expected: [:]),
        Case(label: "empty string value", text: #"{"name" : ""}"#, expected: ["name": .string("")]),
        Case(label: "negative number", text: #"{"node" : -42}"#, expected: ["node": .integer(-42)]),
        Case(label: "zero", text: #"{"node" : 0}"#, expected: ["node": .integer(0)]),
        Case(
            label: "smallest bigint", text: #"{"term" : -9223372036854775808}"#,
            expected: ["term": .integer(.min)]),
        Case(label: "escaped quote", text: #"{"name" : "say \"hi\""}"#, expected: ["name": .string("say \"hi\"")]),
        Case(label: "escaped backslash", text: #"{"name" : "a\\b"}"#, expected: ["name": .string("a\\b")]),
        Case(
            label: "escaped backslash before a closing quote", text: #"{"name" : "a\\"}"#,
            expected: ["name": .string("a\\")]),
        Case(
            label: "escaped newline", text: #"{"name" : "line1\nline2"}"#, expected: ["name": .string("line1\nline2")]),
        Case(
            label: "every short escape", text: #"{"s" : "\"\\\/\b\f\n\r\t"}"#,
            expected: ["s": .string("\"\\/\u{08}\u{0C}\n\r\t")]),
        Case(label: "\\u00e9", text: #"{"name" : "caf\u00e9"}"#, expected: ["name": .string("café")]),
        Case(label: "\\u00C9 upper-case hex", text: #"{"name" : "\u00C9"}"#, expected: ["name": .string("É")]),
        Case(
            label: "control character as json_build_object escapes it", text: #"{"name" : "a\u0001b"}"#,
            expected: ["name": .string("a\u{01}b")]),
        Case(
            label: "surrogate pair \\ud83d\\ude00", text: #"{"name" : "x\ud83d\ude00y"}"#,
            expected: ["name": .string("x😀y")]),
        Case(
            label: "raw unicode name (json_build_object leaves non-ASCII as is)",
            text: #"{"event" : "node_up", "node" : 1, "name" : "ノード-é-🚀"}"#,
            expected: ["event": .string("node_up"), "node": .integer(1), "name": .string("ノード-é-🚀")]),
        Case(
            label: "raw unicode mixed with escapes", text: #"{"name" : "é\"ü\u00e9日\\"}"#,
            expected: ["name": .string("é\"üé日\\")]),
        Case(
            label: "combining mark right after an escape", text: #"{"name" : "\u0065\u0301"}"#,
            expected: ["name": .string("e\u{301}")]),
        Case(label: "unicode key", text: #"{"clé" : 1}"#, expected: ["clé": .integer(1)]),
        Case(
            label: "punctuation inside a string", text: #"{"name" : "{a}, [b] : c"}"#,
            expected: ["name": .string("{a}, [b] : c")]),
        Case(label: "duplicate key: the last wins", text: #"{"a" : 1, "a" : 2}"#, expected: ["a": .integer(2)]),
    ]

    @Test("a payload is parsed", arguments: parsed)
    func parses(_ example: Case) throws {
        let fields = try #require(FlatJSON.parse(example.text))
        #expect(fields == example.expected)
    }

    struct Malformed: Sendable, CustomTestStringConvertible {
        let label: String
        let text: String
        var testDescription: String { label }
    }

    static let malformed: [Malformed] = [
        Malformed(label: "empty string", text: ""),
        Malformed(label: "only spaces", text: "   "),
        Malformed(label: "truncated after the brace", text: "{"),
        Malformed(label: "truncated inside a key", text: #"{"eve"#),
        Malformed(label: "truncated after a key", text: #"{"event""#),
        Malformed(label: "truncated after a colon", text: #"{"event" :"#),
        Malformed(label: "truncated inside a string value", text: #"{"event" : "node_u"#),
        Malformed(label: "truncated after a value", text: #"{"event" : "node_up""#),
        Malformed(label: "truncated after a comma", text: #"{"event" : "node_up","#),
        Malformed(label: "truncated inside an escape", text: #"{"name" : "a\"#),
        Malformed(label: "truncated \\u escape", text: #"{"name" : "\u00e"}"#),
        Malformed(label: "truncated number payload", text: #"{"node" : 5"#),
        Malformed(label: "trailing garbage", text: #"{"node" : 5} x"#),
        Malformed(label: "two objects", text: #"{"a" : 1}{"b" : 2}"#),
        Malformed(label: "trailing comma", text: #"{"a" : 1,}"#),
        Malformed(label: "missing comma", text: #"{"a" : 1 "b" : 2}"#),
        Malformed(label: "missing colon", text: #"{"a" 1}"#),
        Malformed(label: "nested object", text: #"{"a" : {"b" : 1}}"#),
        Malformed(label: "array value", text: #"{"a" : [1, 2]}"#),
        Malformed(label: "top-level array", text: #"[{"a" : 1}]"#),
        Malformed(label: "bare word value", text: #"{"a" : node_up}"#),
        Malformed(label: "true", text: #"{"a" : true}"#),
        Malformed(label: "false", text: #"{"a" : false}"#),
        Malformed(label: "nul (truncated null)", text: #"{"a" : nul}"#),
        Malformed(label: "nullx", text: #"{"a" : nullx}"#),
        Malformed(label: "bare word at top level", text: "node_up"),
        Malformed(label: "bare string at top level", text: #""node_up""#),
        Malformed(label: "unquoted key", text: #"{event : "node_up"}"#),
        Malformed(label: "single-quoted string", text: #"{"a" : 'x'}"#),
        Malformed(label: "fractional number", text: #"{"a" : 1.5}"#),
        Malformed(label: "exponent", text: #"{"a" : 1e5}"#),
        Malformed(label: "lone minus", text: #"{"a" : -}"#),
        Malformed(label: "plus sign", text: #"{"a" : +5}"#),
        Malformed(label: "number beyond Int64", text: #"{"a" : 9223372036854775808}"#),
        Malformed(label: "number below Int64", text: #"{"a" : -9223372036854775809}"#),
        Malformed(label: "lone high surrogate", text: #"{"a" : "\ud83d"}"#),
        Malformed(label: "high surrogate followed by a letter", text: #"{"a" : "\ud83dx"}"#),
        Malformed(label: "high surrogate followed by a non-surrogate escape", text: #"{"a" : "\ud83d\u0041"}"#),
        Malformed(label: "two high surrogates", text: #"{"a" : "\ud83d\ud83d"}"#),
        Malformed(label: "lone low surrogate", text: #"{"a" : "\ude00"}"#),
        Malformed(label: "unknown escape", text: #"{"a" : "\x41"}"#),
        Malformed(label: "non-hex \\u escape", text: #"{"a" : "\uzzzz"}"#),
    ]

    @Test("a malformed payload is nil", arguments: malformed)
    func rejects(_ example: Malformed) {
        #expect(FlatJSON.parse(example.text) == nil)
    }
}
