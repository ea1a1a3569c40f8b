import CoreMetrics
import Synchronization

/// The node's swift-metrics instruments, created once per node (per election for the gauge), with an injected
/// factory (``StokerNode/init(configuration:logger:metricsFactory:)``) or the process's bootstrapped one.
///
/// | label | kind | dimensions |
/// | --- | --- | --- |
/// | `stoker_is_leader` | gauge, 1 or 0 | `cluster`, `node`, `election` |
/// | `stoker_leadership_changes_total` | counter (every gain and every loss) | `cluster`, `node`, `election` |
/// | `stoker_reconnects_total` | counter (every new session after the first) | `cluster`, `node` |
/// | `stoker_heartbeat_rtt` | timer, nanoseconds | `cluster`, `node` |
struct NodeMetrics: Sendable {
    let factory: any MetricsFactory
    let dimensions: [(String, String)]
    let reconnects: Counter
    let heartbeatRoundTrip: Timer

    init(factory: any MetricsFactory, cluster: String, node: String) {
        self.factory = factory
        dimensions = [("cluster", cluster), ("node", node)]
        reconnects = Counter(label: "stoker_reconnects_total", dimensions: dimensions, factory: factory)
        heartbeatRoundTrip = Timer(label: "stoker_heartbeat_rtt", dimensions: dimensions, factory: factory)
    }

    func election(_ name: String) -> ElectionMetrics {
        let dimensions = self.dimensions + [("election", name)]
        return ElectionMetrics(
            isLeader: Gauge(label: "stoker_is_leader", dimensions: dimensions, factory: factory),
            changes: Counter(label: "stoker_leadership_changes_total", dimensions: dimensions, factory: factory)
        )
    }
}

struct ElectionMetrics: Sendable {
    let isLeader: Gauge
    let changes: Counter

    func leading(_ leading: Bool) {
        isLeader.record(leading ? 1 : 0)
        changes.increment()
    }
}
