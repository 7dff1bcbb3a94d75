//! Prometheus metrics for GET /metrics, in one registry owned by the app (no globals, so
//! several servers can run in one test process). Counters are bumped where things happen;
//! gauges of state (users, store size, tracked addresses) are read at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SendLabels {
    pub provider: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabels {
    pub limiter: &'static str,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to 5 s: a code login is a few ms, a password check tens of ms, a slow
    // provider seconds.
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: LatencyFamily,
    pub sms_sends: Family<SendLabels, Counter>,
    pub verifications: Family<ResultLabels, Counter>,
    pub logins: Family<MethodLabels, Counter>,
    pub registrations: Family<MethodLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub users: Gauge,
    pub store_bytes: Gauge,
    pub pending_codes: Gauge,
    pub tracked_addresses: Family<LimiterLabels, Gauge>,
    /// Mirrors [`crate::logging::writer::dropped_total`] at scrape time.
    log_lines_dropped: Counter,
    /// The process's RSS, read at scrape time.
    resident_memory: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The service's metrics, with the figures of its store's engine.
    pub fn new(engine: Option<&dyn crate::store::Engine>) -> Self {
        let mut registry = Registry::with_prefix("smsauth");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = LatencyFamily::new_with_constructor(latency_histogram);
        let sms_sends = Family::<SendLabels, Counter>::default();
        let verifications = Family::<ResultLabels, Counter>::default();
        let logins = Family::<MethodLabels, Counter>::default();
        let registrations = Family::<MethodLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let users = Gauge::default();
        let store_bytes = Gauge::default();
        let pending_codes = Gauge::default();
        let tracked_addresses = Family::<LimiterLabels, Gauge>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer, by route",
            latency.clone(),
        );
        registry.register(
            "sms_sends",
            "Codes handed to the SMS provider, by result (ok, rejected, failed)",
            sms_sends.clone(),
        );
        registry.register(
            "code_verifications",
            "Code checks by result (ok, wrong, invalid, dead, locked)",
            verifications.clone(),
        );
        registry.register(
            "logins",
            "Successful logins by method (sms, password, wechat)",
            logins.clone(),
        );
        registry.register(
            "registrations",
            "Accounts created, by method (sms, password, wechat)",
            registrations.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a limit, by limit",
            rate_limited.clone(),
        );
        registry.register("users", "Accounts in the store", users.clone());
        registry.register(
            "store_size_bytes",
            "Bytes the store takes on disk",
            store_bytes.clone(),
        );
        registry.register(
            "pending_codes",
            "Codes sent and not yet used or expired",
            pending_codes.clone(),
        );
        registry.register(
            "limiter_tracked_addresses",
            "Client addresses held by each in-memory limiter",
            tracked_addresses.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Memory the process holds in RAM (RSS), read at scrape time",
            resident_memory.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log's reader fell behind",
            log_lines_dropped.clone(),
        );
        if let Some(engine) = engine {
            engine.register_metrics(&mut registry);
        }
        Metrics {
            registry,
            requests,
            latency,
            sms_sends,
            verifications,
            logins,
            registrations,
            rate_limited,
            users,
            store_bytes,
            pending_codes,
            tracked_addresses,
            log_lines_dropped,
            resident_memory,
        }
    }

    /// Brings the figures kept outside the app (the log's) up to date, at scrape time.
    pub fn observe(&self) {
        let total = crate::logging::writer::dropped_total();
        self.log_lines_dropped
            .inc_by(total.saturating_sub(self.log_lines_dropped.get()));
        if let Some(bytes) = resident_bytes() {
            self.resident_memory.set(bytes as i64);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn verification(&self, result: &'static str) {
        self.verifications
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn login(&self, method: &'static str) {
        self.logins.get_or_create(&MethodLabels { method }).inc();
    }

    pub fn registration(&self, method: &'static str) {
        self.registrations
            .get_or_create(&MethodLabels { method })
            .inc();
    }
}

/// The process's resident set: the second field of /proc/self/statm, in pages. None where
/// there is no procfs.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
