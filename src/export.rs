//! Export through the [`metrics`] facade (feature `metrics`): [`ConnectionPool::export_metrics`]
//! writes a snapshot of the pool ([`stats`](ConnectionPool::stats) and
//! [`addresses`](ConnectionPool::addresses)) to whatever recorder is installed (Prometheus,
//! StatsD, …), and [`describe_metrics`] describes every name once.
//!
//! **From snapshots, not per call.** Calls record into the pool's own atomics (a few relaxed adds);
//! the export reads them, usually once per cleanup round (the cleanup task calls `export_metrics`
//! at every tick when the feature is on), so the hot path pays nothing for the facade and a pool
//! without a recorder pays nothing at all. Cumulative figures go out with
//! [`Counter::absolute`](metrics::Counter::absolute) (they never go back, so the facade's counter
//! semantics hold), the state now with gauges, and each connection's latency distribution as
//! quantile gauges (`quantile="0.5"`, `"0.9"`, `"0.99"`, as a Prometheus summary shows them).
//!
//! **Names** follow the facade's and Prometheus' conventions: `keyed_pool_` prefix, snake case,
//! `_total` on counters, base units in the name (`_seconds`, `_microseconds`).
//!
//! **Labels and their cardinality.** Every series has `pool` (the [`name`](ConnectionPool::name)
//! the user gave the pool, a handful per process). Pool-wide series add only a bounded enum label
//! (`reason`: six eviction reasons; `outcome`: three connect outcomes). Per-address series add
//! `addr`, for at most [`export_addresses`](crate::PoolBuilder::export_addresses) addresses
//! (default [`DEFAULT_EXPORTED_ADDRESSES`]), the first in sorted order: the pool keeps state only
//! for live, connecting or recently failed addresses (I18), and the cap bounds even that. When an
//! address leaves the pool (or the cap), its series are written once more with zeroes (not
//! connected, nothing in flight, no backoff) and then left alone; a recorder with an idle timeout
//! (`PrometheusBuilder::idle_timeout`) then drops them.

use std::collections::BTreeSet;

use cheetah_string::CheetahString;
use metrics::{Label, Unit, counter, describe_counter, describe_gauge, gauge};
use tokio::time::Instant;

use crate::ConnectionPool;
use crate::connector::ManagesConnections;
use crate::metrics::{AddressState, EvictionReason};

/// How many addresses get per-address series by default.
pub const DEFAULT_EXPORTED_ADDRESSES: usize = 256;

/// The quantiles exported from each connection's latency distribution.
const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99")];

/// Every name [`ConnectionPool::export_metrics`] writes, with its kind, unit and help text.
mod names {
    pub const REQUESTS: &str = "keyed_pool_requests_total";
    pub const ERRORS: &str = "keyed_pool_request_errors_total";
    pub const CANCELLED: &str = "keyed_pool_requests_cancelled_total";
    pub const DURATION_SUM: &str = "keyed_pool_request_duration_microseconds_total";
    pub const EVICTIONS: &str = "keyed_pool_evictions_total";
    pub const CONNECTS: &str = "keyed_pool_connects_total";
    pub const CONNECTS_SHARED: &str = "keyed_pool_connects_shared_total";
    pub const BACKOFF_REJECTIONS: &str = "keyed_pool_backoff_rejections_total";
    pub const CAPACITY_REJECTIONS: &str = "keyed_pool_capacity_rejections_total";
    pub const CONNECTIONS: &str = "keyed_pool_connections";
    pub const HEALTHY: &str = "keyed_pool_connections_healthy";
    pub const IDLE: &str = "keyed_pool_connections_idle";
    pub const CONNECTING: &str = "keyed_pool_connects_in_flight";
    pub const IN_FLIGHT: &str = "keyed_pool_calls_in_flight";
    pub const MAX: &str = "keyed_pool_max_connections";
    pub const ADDRESSES: &str = "keyed_pool_addresses";
    pub const ADDR_CONNECTED: &str = "keyed_pool_address_connected";
    pub const ADDR_HEALTHY: &str = "keyed_pool_address_healthy";
    pub const ADDR_IN_FLIGHT: &str = "keyed_pool_address_calls_in_flight";
    pub const ADDR_EJECTIONS: &str = "keyed_pool_address_ejections";
    pub const ADDR_BACKOFF: &str = "keyed_pool_address_backoff_seconds";
    pub const ADDR_LATENCY: &str = "keyed_pool_address_request_duration_seconds";
}

/// Describes every metric [`ConnectionPool::export_metrics`] writes (unit and help text) to the
/// recorder installed now. Call it once after installing a recorder; calling it again is harmless.
///
/// ```
/// let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
/// let handle = recorder.handle();
/// metrics::with_local_recorder(&recorder, || {
///     keyed_pool::describe_metrics();
///     metrics::counter!("keyed_pool_requests_total", "pool" => "demo").absolute(3);
/// });
/// assert!(handle.render().contains("# HELP keyed_pool_requests_total"));
/// ```
pub fn describe_metrics() {
    use names::*;
    let count = Unit::Count;
    describe_counter!(
        REQUESTS,
        count,
        "Finished calls (successes and failures) since the pool was built"
    );
    describe_counter!(ERRORS, count, "Failed calls since the pool was built");
    describe_counter!(
        CANCELLED,
        count,
        "Calls dropped before they finished since the pool was built"
    );
    describe_counter!(
        DURATION_SUM,
        Unit::Microseconds,
        "Sum of the successful calls' latencies since the pool was built (its count: requests - errors)"
    );
    describe_counter!(
        EVICTIONS,
        count,
        "Connections that left the pool, by reason"
    );
    describe_counter!(CONNECTS, count, "Finished connects, by outcome");
    describe_counter!(
        CONNECTS_SHARED,
        count,
        "Callers that joined a connect already in flight"
    );
    describe_counter!(
        BACKOFF_REJECTIONS,
        count,
        "Callers turned away because their address was backing off"
    );
    describe_counter!(
        CAPACITY_REJECTIONS,
        count,
        "Inserts and connects refused because the pool was full"
    );
    describe_gauge!(CONNECTIONS, count, "Live connections");
    describe_gauge!(
        HEALTHY,
        count,
        "Live connections neither unhealthy nor closed"
    );
    describe_gauge!(IDLE, count, "Live connections idle now");
    describe_gauge!(CONNECTING, count, "Connects in flight (slots they reserve)");
    describe_gauge!(
        IN_FLIGHT,
        count,
        "Calls in flight over the live connections"
    );
    describe_gauge!(MAX, count, "The cap on connections; 0 = unlimited");
    describe_gauge!(
        ADDRESSES,
        count,
        "Addresses the pool keeps state for (connected, connecting or backing off)"
    );
    describe_gauge!(
        ADDR_CONNECTED,
        count,
        "1 if the address has a live connection"
    );
    describe_gauge!(
        ADDR_HEALTHY,
        count,
        "1 if the address's connection is neither unhealthy nor closed"
    );
    describe_gauge!(
        ADDR_IN_FLIGHT,
        count,
        "Calls in flight on the address's connection"
    );
    describe_gauge!(ADDR_EJECTIONS, count, "The address's ejection count");
    describe_gauge!(
        ADDR_BACKOFF,
        Unit::Seconds,
        "Backoff left before the address may be connected again"
    );
    describe_gauge!(
        ADDR_LATENCY,
        Unit::Seconds,
        "Quantiles of the latency of the successful calls on the address's connection (while it has none: its last one's)"
    );
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// Writes a snapshot of the pool to the `metrics` recorder installed now (see the module docs
    /// for the names, the labels and how their cardinality is bounded). The cleanup task calls it
    /// every round; call it yourself before a scrape for figures fresher than one round. Costs one
    /// pass over the addresses, like [`stats`](Self::stats); does nothing useful (and nothing
    /// harmful) without a recorder.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    /// let handle = recorder.handle();
    /// let pool = ConnectionPool::builder().name("brokers").build::<u32>().unwrap();
    /// pool.insert("127.0.0.1:10911", 1);
    /// pool.get("127.0.0.1:10911").unwrap().record_error();
    /// metrics::with_local_recorder(&recorder, || pool.export_metrics());
    /// let text = handle.render();
    /// assert!(text.contains(r#"keyed_pool_request_errors_total{pool="brokers"} 1"#));
    /// assert!(text.contains(r#"keyed_pool_address_connected{pool="brokers",addr="127.0.0.1:10911"} 1"#));
    /// ```
    pub fn export_metrics(&self) {
        use names::*;
        let stats = self.stats();
        let pool = Label::new("pool", self.name().to_string());
        let labels = || vec![pool.clone()];
        let with =
            |key: &'static str, value: &'static str| vec![pool.clone(), Label::new(key, value)];

        counter!(REQUESTS, labels()).absolute(stats.total_requests);
        counter!(ERRORS, labels()).absolute(stats.total_errors);
        counter!(CANCELLED, labels()).absolute(stats.total_cancelled);
        let sum_us = u64::try_from(stats.latency_sum.as_micros()).unwrap_or(u64::MAX);
        counter!(DURATION_SUM, labels()).absolute(sum_us);
        let e = stats.evictions;
        for (reason, n) in [
            (EvictionReason::Idle, e.idle),
            (EvictionReason::Unhealthy, e.unhealthy),
            (EvictionReason::Closed, e.closed),
            (EvictionReason::Replaced, e.replaced),
            (EvictionReason::Manual, e.manual),
            (EvictionReason::MakeRoom, e.make_room),
            (EvictionReason::Broken, e.broken),
            (EvictionReason::Lifetime, e.lifetime),
        ] {
            counter!(EVICTIONS, with("reason", reason.as_str())).absolute(n);
        }
        let c = stats.connects;
        for (outcome, n) in [
            ("succeeded", c.succeeded),
            ("failed", c.failed),
            ("timed_out", c.timed_out),
        ] {
            counter!(CONNECTS, with("outcome", outcome)).absolute(n);
        }
        counter!(CONNECTS_SHARED, labels()).absolute(c.shared);
        counter!(BACKOFF_REJECTIONS, labels()).absolute(c.backoff_rejections);
        counter!(CAPACITY_REJECTIONS, labels()).absolute(stats.rejected_capacity);

        gauge!(CONNECTIONS, labels()).set(stats.total as f64);
        gauge!(HEALTHY, labels()).set(stats.healthy as f64);
        gauge!(IDLE, labels()).set(stats.idle as f64);
        gauge!(CONNECTING, labels()).set(stats.reserved as f64);
        gauge!(IN_FLIGHT, labels()).set(stats.in_flight as f64);
        gauge!(MAX, labels()).set(stats.max_connections as f64);

        let addresses = self.addresses();
        gauge!(ADDRESSES, labels()).set(addresses.len() as f64);
        let now = Instant::now();
        let limit = self.inner.export.addresses;
        let mut exported = BTreeSet::new();
        for state in addresses.iter().take(limit) {
            export_address(&pool, state, now);
            exported.insert(state.addr.clone());
        }
        // The addresses exported last time and gone now: zero their gauges once, so a dashboard
        // does not show a departed address as connected.
        let gone: Vec<CheetahString> = {
            let mut last = self.inner.export.last.lock();
            let gone = last.difference(&exported).cloned().collect();
            *last = exported;
            gone
        };
        for addr in gone {
            let labels = vec![pool.clone(), Label::new("addr", addr.to_string())];
            for name in [
                ADDR_CONNECTED,
                ADDR_HEALTHY,
                ADDR_IN_FLIGHT,
                ADDR_EJECTIONS,
                ADDR_BACKOFF,
            ] {
                gauge!(name, labels.clone()).set(0.0);
            }
        }
    }
}

/// The per-address series of one address.
fn export_address(pool: &Label, state: &AddressState, now: Instant) {
    use names::*;
    let labels = vec![pool.clone(), Label::new("addr", state.addr.to_string())];
    let conn = state.connection.as_ref();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge!(ADDR_CONNECTED, labels.clone()).set(flag(conn.is_some()));
    gauge!(ADDR_HEALTHY, labels.clone()).set(flag(conn.is_some_and(|c| c.healthy)));
    gauge!(ADDR_IN_FLIGHT, labels.clone()).set(conn.map_or(0, |c| c.in_flight) as f64);
    gauge!(ADDR_EJECTIONS, labels.clone()).set(f64::from(state.ejection_count));
    let backoff = state.backoff_until.map_or(0.0, |until| {
        until.saturating_duration_since(now).as_secs_f64()
    });
    gauge!(ADDR_BACKOFF, labels.clone()).set(backoff);
    let Some(latency) = conn.map(|c| &c.latency) else {
        return;
    };
    for (q, name) in QUANTILES {
        if let Some(value) = latency.quantile(q) {
            let mut labels = labels.clone();
            labels.push(Label::new("quantile", name));
            gauge!(ADDR_LATENCY, labels).set(value.as_secs_f64());
        }
    }
}

/// What the pool keeps for its export: the cap on per-address series and the addresses exported
/// last time.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) addresses: usize,
    last: crate::sync::Mutex<BTreeSet<CheetahString>>,
}

impl ExportState {
    pub(crate) fn new(addresses: usize) -> Self {
        Self {
            addresses,
            last: crate::sync::Mutex::new(BTreeSet::new()),
        }
    }
}
