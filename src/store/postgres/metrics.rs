//! The PostgreSQL engine's own figures on /metrics, so an operator sees a struggling
//! database before users do: the pool (size, in use, waiting, time waited for a
//! connection) and each operation's statement latency. Per instance, like every metric.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OpLabels {
    pub op: &'static str,
}

type OpFamily = Family<OpLabels, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 50 µs (a loopback round trip) to 2.5 s (past statement_timeout_ms's default).
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5,
    ])
}

#[derive(Clone)]
pub(super) struct PgMetrics {
    pub statements: OpFamily,
    pub pool_wait: Histogram,
    pub pool_max: Gauge,
    pub pool_size: Gauge,
    pub pool_in_use: Gauge,
    pub pool_waiting: Gauge,
}

impl PgMetrics {
    pub(super) fn new() -> Self {
        PgMetrics {
            statements: OpFamily::new_with_constructor(seconds),
            pool_wait: seconds(),
            pool_max: Gauge::default(),
            pool_size: Gauge::default(),
            pool_in_use: Gauge::default(),
            pool_waiting: Gauge::default(),
        }
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("postgres");
        r.register(
            "statement_seconds",
            "Time of each store operation's statements (one round trip each), by operation",
            self.statements.clone(),
        );
        r.register(
            "pool_wait_seconds",
            "Time a request waited for a pooled connection",
            self.pool_wait.clone(),
        );
        r.register(
            "pool_max",
            "Connections the pool may open",
            self.pool_max.clone(),
        );
        r.register("pool_size", "Connections open", self.pool_size.clone());
        r.register(
            "pool_in_use",
            "Connections lent out now",
            self.pool_in_use.clone(),
        );
        r.register(
            "pool_waiting",
            "Requests waiting for a connection now",
            self.pool_waiting.clone(),
        );
    }
}
