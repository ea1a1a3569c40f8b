import Foundation

/// One line of `stoker node` (its JSON-lines output, one callback a line) or of `floor-client`: a JSON object.
struct Event: Sendable {
    /// `at`: CLOCK_MONOTONIC seconds when the event happened.
    let at: Double
    let node: String
    let election: String
    /// `now_leader`, `now_follower`, `shutdown`, `cluster_change`, …
    let event: String
    let term: Int?
    /// On demotions: the monotonic instant leadership ended.
    let endedAt: Double?
    let reason: String?
    /// The printing node's own incarnation (its row id in `stoker.nodes`), when it has one.
    let incarnation: Int?
    /// On `cluster_change`: `node_up` or `node_down`.
    let change: String?
    /// On `cluster_change`: the member's name and incarnation.
    let member: String?
    let memberIncarnation: Int?
    /// On `now_leader`: the members as the new leader knows them, `name#incarnation`.
    let members: [String]?

    /// Parses one line; nil when it is not such an object.
    init?(_ line: String) {
        guard line.hasPrefix("{"),
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
            let at = (object["at"] as? NSNumber)?.doubleValue,
            let event = object["event"] as? String
        else { return nil }
        self.at = at
        self.event = event
        node = object["node"] as? String ?? ""
        election = object["election"] as? String ?? ""
        term = (object["term"] as? NSNumber)?.intValue
        endedAt = (object["ended_at"] as? NSNumber)?.doubleValue
        reason = object["reason"] as? String
        incarnation = (object["incarnation"] as? NSNumber)?.intValue
        change = object["change"] as? String
        member = object["member"] as? String
        memberIncarnation = (object["member_incarnation"] as? NSNumber)?.intValue
        members = object["members"] as? [String]
    }

    var isNowLeader: Bool { event == "now_leader" }

    /// `now_follower` or `shutdown`: the end of a leadership when it carries `ended_at`.
    var isDemotion: Bool { event == "now_follower" || event == "shutdown" }

    /// A `cluster_change` `node_down` of the member incarnation `incarnation`.
    func isNodeDown(of incarnation: Int) -> Bool {
        event == "cluster_change" && change == "node_down" && memberIncarnation == incarnation
    }

    /// A `cluster_change` `node_up` of the member named `name`.
    func isNodeUp(named name: String) -> Bool {
        event == "cluster_change" && change == "node_up" && member == name
    }
}
