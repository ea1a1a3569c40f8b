/// One notification on the cluster's channel, decoded: what the schema's triggers and `send_trigger` send
/// (`json_build_object(...)::text`, see `sql/001_initial.sql`, `sql/003_evidence.sql`, `sql/004_membership.sql` and
/// `sql/005_trigger.sql`), as the node acts on it.
///
/// Fields the node does not use (the election's `name`, the `term`) are not kept; extra fields never stop a payload
/// from decoding, so a later schema may add some.
enum ClusterEvent: Sendable, Hashable {
    /// A member joined: `{"event" : "node_up", "node" : <id>, "name" : <name>}` (a row inserted into `nodes`).
    case nodeUp(ClusterMember)
    /// A member left: `node_down`, with the same fields and its `reason` (`left`, `died`, `removed`; a missing or
    /// unknown one reads as `removed`).
    case nodeDown(ClusterMember, reason: NodeDownReason)
    /// A leadership of election `election` began: `node` is its leader's incarnation — nil when the field is null,
    /// absent or not an integer.
    case leader(election: Int, node: Int?)
    /// Election `election`'s leader handed it over gracefully (its leader cleared): a candidate may take it at once.
    case released(election: Int)
    /// A trigger was sent to election `election` (it stays in the table, payload and all, until handled): its leader reads it.
    case trigger(election: Int)

    /// A `node_up` or `node_down` payload's member, and for `node_down` its reason (a missing or unknown one reads as
    /// `removed`); nil when a field it needs is missing or of the wrong type.
    static func membership(_ fields: [String: FlatJSON.Value]) -> (ClusterMember, NodeDownReason?)? {
        guard case .string(let event)? = fields["event"], case .integer(let id)? = fields["node"],
            let node = Int(exactly: id), case .string(let name)? = fields["name"]
        else { return nil }
        guard event == "node_down" else { return (ClusterMember(id: node, name: name), nil) }
        var reason = NodeDownReason.removed
        if case .string(let name)? = fields["reason"], let named = NodeDownReason(name: name) { reason = named }
        return (ClusterMember(id: node, name: name), reason)
    }

    /// Decodes `payload`; nil for anything else or a malformed payload (the same cases the node skipped with
    /// `continue`): not a flat JSON object, no string `event`, an unknown event, or a field it needs missing or of the
    /// wrong type. A payload Stoker did not write is ignored, never an error.
    init?(payload: String) {
        guard let fields = FlatJSON.parse(payload), case .string(let event)? = fields["event"] else { return nil }
        switch event {
        case "node_up", "node_down":
            guard let (member, reason) = Self.membership(fields) else { return nil }
            self = reason.map { .nodeDown(member, reason: $0) } ?? .nodeUp(member)
        case "leader":
            guard case .integer(let election)? = fields["election"] else { return nil }
            var node: Int?
            if case .integer(let id)? = fields["node"] { node = Int(id) }
            self = .leader(election: Int(election), node: node)
        case "released":
            guard case .integer(let election)? = fields["election"] else { return nil }
            self = .released(election: Int(election))
        case "trigger":
            guard case .integer(let election)? = fields["election"] else { return nil }
            self = .trigger(election: Int(election))
        default:
            return nil
        }
    }
}
