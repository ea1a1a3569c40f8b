import Testing

@testable import Stoker

/// The cluster channel's payloads, decoded from the exact text the schema's triggers send
/// (`json_build_object(...)::text`: `"key" : value`, pairs joined by `, `), and what is ignored.
@Suite("Cluster events")
struct ClusterEventTests {
    struct Case: Sendable, CustomTestStringConvertible {
        let label: String
        let payload: String
        let expected: ClusterEvent?
        var testDescription: String { label }
    }

    static let decoded: [Case] = [
        // notify_node_change (001): json_build_object('event', 'node_up', 'node', NEW.id, 'name', NEW.name)
        Case(
            label: "node_up",
            payload: #"{"event" : "node_up", "node" : 5, "name" : "host-1:4242"}"#,
            expected: .nodeUp(ClusterMember(id: 5, name: "host-1:4242"))),
        // 001's json_build_object('event', 'node_down', 'node', OLD.id, 'name', OLD.name): no reason.
        Case(
            label: "node_down without a reason",
            payload: #"{"event" : "node_down", "node" : 12, "name" : "b"}"#,
            expected: .nodeDown(ClusterMember(id: 12, name: "b"), reason: .removed)),
        // 004 adds 'reason', coalesce(nullif(current_setting('stoker.node_down_reason', true), ''), 'removed').
        Case(
            label: "node_down, left",
            payload: #"{"event" : "node_down", "node" : 12, "name" : "b", "reason" : "left"}"#,
            expected: .nodeDown(ClusterMember(id: 12, name: "b"), reason: .left)),
        Case(
            label: "node_down, died",
            payload: #"{"event" : "node_down", "node" : 12, "name" : "b", "reason" : "died"}"#,
            expected: .nodeDown(ClusterMember(id: 12, name: "b"), reason: .died)),
        Case(
            label: "node_down, removed",
            payload: #"{"event" : "node_down", "node" : 12, "name" : "b", "reason" : "removed"}"#,
            expected: .nodeDown(ClusterMember(id: 12, name: "b"), reason: .removed)),
        Case(
            label: "node_down with a reason this version does not know",
            payload: #"{"event" : "node_down", "node" : 12, "name" : "b", "reason" : "evicted"}"#,
            expected: .nodeDown(ClusterMember(id: 12, name: "b"), reason: .removed)),
        Case(
            label: "node_up with a name JSON escapes",
            payload: #"{"event" : "node_up", "node" : 7, "name" : "a \"quoted\" n\u00e4me\ttab"}"#,
            expected: .nodeUp(ClusterMember(id: 7, name: "a \"quoted\" n\u{E4}me\ttab"))),
        // notify_election_change (003): json_build_object('event', 'leader', 'election', NEW.id, 'name', NEW.name,
        // 'term', NEW.term, 'node', NEW.leader_node)
        Case(
            label: "leader",
            payload: #"{"event" : "leader", "election" : 3, "name" : "importer", "term" : 7, "node" : 41}"#,
            expected: .leader(election: 3, node: 41)),
        Case(
            label: "leader with a null node",
            payload: #"{"event" : "leader", "election" : 3, "name" : "importer", "term" : 8, "node" : null}"#,
            expected: .leader(election: 3, node: nil)),
        Case(
            label: "leader without a node field",
            payload: #"{"event" : "leader", "election" : 4, "name" : "e", "term" : 1}"#,
            expected: .leader(election: 4, node: nil)),
        Case(
            label: "leader with a node that is not an integer",
            payload: #"{"event" : "leader", "election" : 4, "name" : "e", "term" : 1, "node" : "41"}"#,
            expected: .leader(election: 4, node: nil)),
        // json_build_object('event', 'released', 'election', NEW.id, 'name', NEW.name, 'term', NEW.term)
        Case(
            label: "released, with the largest bigint term",
            payload: #"{"event" : "released", "election" : 9, "name" : "e", "term" : 9223372036854775807}"#,
            expected: .released(election: 9)),
        // json_build_object('event', 'trigger', 'election', v_election, 'name', p_election, 'sequence', v_sequence)
        Case(
            label: "trigger",
            payload: #"{"event" : "trigger", "election" : 4, "name" : "e", "sequence" : 12}"#,
            expected: .trigger(election: 4)),
        Case(
            label: "compact JSON, fields in another order, an extra field",
            payload: #"{"name":"a","node":2,"event":"node_down","extra":null}"#,
            expected: .nodeDown(ClusterMember(id: 2, name: "a"), reason: .removed)),
    ]

    static let ignored: [Case] = [
        Case(label: "empty", payload: "", expected: nil),
        Case(label: "not JSON", payload: "node_up 5", expected: nil),
        Case(label: "an application's payload on the channel", payload: "hello", expected: nil),
        Case(label: "a JSON array", payload: #"["event", "node_up"]"#, expected: nil),
        Case(label: "truncated", payload: #"{"event" : "node_up", "node" : 5, "name" : "a""#, expected: nil),
        Case(
            label: "nested object", payload: #"{"event" : "node_up", "node" : {"id" : 5}, "name" : "a"}"#, expected: nil
        ),
        Case(label: "no event", payload: #"{"node" : 5, "name" : "a"}"#, expected: nil),
        Case(label: "a null event", payload: #"{"event" : null, "node" : 5, "name" : "a"}"#, expected: nil),
        Case(label: "an integer event", payload: #"{"event" : 1, "node" : 5, "name" : "a"}"#, expected: nil),
        Case(label: "an unknown event", payload: #"{"event" : "node_moved", "node" : 5, "name" : "a"}"#, expected: nil),
        Case(
            label: "an event in another case", payload: #"{"event" : "NODE_UP", "node" : 5, "name" : "a"}"#,
            expected: nil),
        Case(label: "node_up without a node", payload: #"{"event" : "node_up", "name" : "a"}"#, expected: nil),
        Case(label: "node_up without a name", payload: #"{"event" : "node_up", "node" : 5}"#, expected: nil),
        Case(
            label: "node_down with a null name", payload: #"{"event" : "node_down", "node" : 5, "name" : null}"#,
            expected: nil),
        Case(
            label: "node_down with a string node", payload: #"{"event" : "node_down", "node" : "5", "name" : "a"}"#,
            expected: nil),
        Case(label: "leader without an election", payload: #"{"event" : "leader", "node" : 5}"#, expected: nil),
        Case(
            label: "leader with a null election", payload: #"{"event" : "leader", "election" : null, "node" : 5}"#,
            expected: nil),
        Case(
            label: "released without an election", payload: #"{"event" : "released", "name" : "e", "term" : 2}"#,
            expected: nil),
        Case(
            label: "released with a string election", payload: #"{"event" : "released", "election" : "3"}"#,
            expected: nil),
        Case(label: "trigger without an election", payload: #"{"event" : "trigger", "sequence" : 1}"#, expected: nil),
        Case(label: "a fractional number", payload: #"{"event" : "released", "election" : 3.5}"#, expected: nil),
        Case(label: "trailing garbage", payload: #"{"event" : "released", "election" : 3} x"#, expected: nil),
    ]

    @Test("each event, from the JSON the triggers send", arguments: decoded)
    func decodes(_ entry: Case) {
        #expect(ClusterEvent(payload: entry.payload) == entry.expected)
    }

    @Test("malformed payloads and unknown events are ignored", arguments: ignored)
    func ignores(_ entry: Case) {
        #expect(ClusterEvent(payload: entry.payload) == nil)
    }
}
