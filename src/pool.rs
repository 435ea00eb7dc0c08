//! [`ConnectionPool`]: the map of [`Slot`]s, one per address, and its operations. Everything about
//! an address (its connection and capacity permit, its connect in flight, its ejection state) is
//! decided under that address's entry lock; every removal is conditional on the connection's id and
//! re-checks its predicate there; no map guard is ever held across an `.await`.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cheetah_string::CheetahString;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cleanup::CleanupControl;
use crate::config::{PoolConfig, WhenFull};
use crate::connection::{ConnId, PooledConnection, SharedMetrics};
use crate::connector::{ManagesConnections, NoConnector};
use crate::core::{CapacityLedger, UnhealthyReason};
use crate::error::{Cause, ConfigError, PoolError};
use crate::events::{Hook, PoolEvents};
use crate::metrics::{
    ConnectStats, ConnectionMetrics, EvictionReason, EvictionStats, PoolCounters, PoolStats,
};
use crate::slot::{Pooled, Slot};
use crate::sweep::LruTake;

/// The hasher of the pool's map: foldhash's fast variant, where std's default is SipHash-1-3.
/// Every `get`, and every removal a sweep makes, hashes its address once; SipHash was ~40 % of a
/// `get`'s instructions and ~225 instructions of each removal a sweep of 100,000 idle connections
/// makes (issue 16, BENCHMARKS.md "The map's hasher"). The keys are server addresses the pool's
/// owner chooses (configuration, a name server's routes), not a stranger's input, so foldhash's
/// "minimal" resistance to collision attacks (a seed per pool, unknown outside the process) is
/// enough; SipHash's stronger one is what a map keyed by request data needs.
///
/// The seed comes from std's `RandomState` rather than foldhash's own `RandomState`, which mixes
/// in addresses (ASLR) and the time: std's is seeded by madsim inside a simulation, so a seed
/// replays the same map layout, hence the same sweep order.
type AddrHasher = foldhash::fast::FixedState;

/// A fresh [`AddrHasher`] with a per-pool seed (see there for why std's `RandomState` draws it).
fn addr_hasher() -> AddrHasher {
    foldhash::fast::FixedState::with_seed(RandomState::new().hash_one(0_u64))
}

/// How many times a caller that must make room looks for a victim before it gives up: each look
/// either takes a slot, or found its candidates gone (taken by another eviction or removal), which
/// only a burst of concurrent changes can repeat.
pub(crate) const MAX_ROOM_ATTEMPTS: usize = 16;

/// The exclusive connections of a slot, idle or checked out.
fn exclusive_live<C>(slot: &Slot<C>) -> usize {
    slot.exclusive().map_or(0, |ex| {
        let (idle, checked_out, _, _) = ex.counts();
        idle + checked_out
    })
}

/// The map's key for an address given as a string. Addresses of up to 23 bytes (every IPv4
/// `host:port`) are stored inline by `CheetahString`, so this does not allocate for them.
pub(crate) fn key(addr: &str) -> CheetahString {
    CheetahString::from_slice(addr)
}

/// An async connection pool keyed by server address.
///
/// It keeps shared connections per address (handles any number of callers use at once: one per
/// address by default, up to [`max_per_address`](PoolConfig::max_per_address) under load, I23)
/// and lends exclusive ones ([`checkout`](Self::checkout)), caps the number of connections,
/// evicts idle and unhealthy ones, backs off from failing addresses, and keeps metrics per
/// connection. Clones share one pool. See the crate docs for the guarantees (I1–I23).
///
/// `C` is the connection type; `K` the [`Connector`](crate::Connector) that creates and checks
/// connections ([`NoConnector`] for a pool filled by hand with [`insert`](Self::insert)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
///
/// let pool: ConnectionPool<String> = ConnectionPool::new(2, Duration::from_secs(60));
/// assert!(pool.insert("127.0.0.1:10911", "client for broker-a".to_string()));
/// let conn = pool.get("127.0.0.1:10911").expect("just inserted");
/// assert_eq!(conn.client(), "client for broker-a");
/// assert_eq!(pool.stats().total, 1);
/// # }
/// ```
pub struct ConnectionPool<C, K = NoConnector>
where
    K: ManagesConnections<C>,
{
    pub(crate) inner: Arc<Inner<C, K>>,
}

impl<C, K: ManagesConnections<C>> Clone for ConnectionPool<C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C, K: ManagesConnections<C>> std::fmt::Debug for ConnectionPool<C, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("addresses", &self.inner.map.len())
            .field("used_slots", &self.inner.ledger.used())
            .field("max_connections", &self.inner.ledger.max())
            .field("closed", &self.inner.closed.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner<C, K: ManagesConnections<C>> {
    pub(crate) map: DashMap<CheetahString, Slot<C>, AddrHasher>,
    pub(crate) ledger: Arc<CapacityLedger>,
    pub(crate) config: PoolConfig,
    /// What every connection's metrics share: the time origin, `config.health`, the call outcomes
    /// of every connection the pool ever had, and `config.call_timeout`.
    pub(crate) conns: Arc<crate::metrics::PoolShared>,
    pub(crate) connector: K,
    pub(crate) counters: PoolCounters,
    pub(crate) next_id: AtomicU64,
    pub(crate) closed: AtomicBool,
    /// Serialises making room under `WhenFull::EvictLeastRecentlyUsed`, so that two callers never
    /// both evict for the same address and a freed slot goes to the caller that evicted for it.
    /// Taken only on that slow path (the pool is full), before any entry lock.
    pub(crate) room: crate::sync::Mutex<()>,
    /// Turns `true` when `close` begins: every connect task stops at once.
    pub(crate) closing: watch::Sender<bool>,
    /// Wakes the checkouts waiting in line when capacity may have freed (issue 13); the
    /// ledger's release hook calls it.
    pub(crate) wake: Arc<crate::checkout::Wake>,
    /// Exclusive connects in flight (their tasks), which `close` waits for (I17).
    pub(crate) ex_connects: watch::Sender<usize>,
    /// The origin of the offsets the pure core's ejection state is kept in.
    origin: Instant,
    pub(crate) cleanup: CleanupControl,
    jitter_seed: RandomState,
    jitter_draws: AtomicU64,
    /// The user's [`PoolEvents`], if any.
    pub(crate) events: Hook,
    /// The pool's name: the `pool` label of its exported metrics.
    pub(crate) name: Arc<str>,
    #[cfg(feature = "metrics")]
    pub(crate) export: crate::export::ExportState,
}

impl<C, K: ManagesConnections<C>> Inner<C, K> {
    /// A uniform draw in `[0, 1]` for backoff jitter. `RandomState` is seeded by madsim inside a
    /// simulation, so a seed replays the same jitter.
    pub(crate) fn jitter_unit(&self) -> f64 {
        let n = self.jitter_draws.fetch_add(1, Ordering::Relaxed);
        (self.jitter_seed.hash_one(n) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `now` as the core's offset.
    pub(crate) fn offset(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    /// The instant of a core offset.
    pub(crate) fn instant_at(&self, offset: Duration) -> Instant {
        self.origin + offset
    }

    /// One more failure of the address of `slot` at `now`: its ejection count rises and it backs
    /// off (I12). Called under the address's entry lock.
    pub(crate) fn eject(
        &self,
        addr: &CheetahString,
        slot: &mut Slot<C>,
        now: Instant,
        cause: Cause,
    ) {
        let config = &self.config;
        let delay = slot.eject(
            self.offset(now),
            &config.backoff,
            &config.ejection,
            self.jitter_unit(),
            cause,
        );
        let ejections = slot.ejection().count_at(self.offset(now), &config.ejection);
        tracing::debug!(addr = %addr, ejections, ?delay, "backing off");
        self.events.backoff(addr, delay, ejections);
    }

    /// Counts an eviction and tells the user's hook: every connection that leaves the pool comes
    /// through here once, under its address's entry lock.
    pub(crate) fn note_evicted(&self, addr: &str, id: ConnId, reason: EvictionReason) {
        self.counters.evicted(reason);
        self.events.evict(addr, id, reason);
    }

    /// Closes a connection the pool lets go of and only then frees its capacity slot (I1 as the
    /// connector sees it), under the address's entry lock. A connection that leaves unhealthy, or
    /// closed younger than `ejection.short_lived`, counts as a failure of its address (I12).
    pub(crate) fn retire(
        &self,
        slot: &mut Slot<C>,
        pooled: Pooled<C>,
        reason: EvictionReason,
        why: Option<UnhealthyReason>,
        now: Instant,
    ) {
        let conn = &pooled.conn;
        self.close_evicted(
            slot,
            conn.addr(),
            conn.id(),
            conn.client(),
            conn.metrics(),
            reason,
            why,
            now,
        );
        // The slot's permit goes last: the connection is out of the map and closed.
        drop(pooled);
    }

    /// The part of retiring a connection, shared or exclusive, before its permit goes: counted,
    /// closed through the connector, and judged (a connection that leaves unhealthy, or closed
    /// younger than `ejection.short_lived` unless it served and its last call succeeded, counts
    /// as a failure of its address, I12).
    ///
    /// "Unless it served and its last call succeeded": a server that closes a connection between
    /// requests after answering on it (an HTTP/1.1 keep-alive timeout or request limit, often
    /// under 5 s) closes it gracefully; one that closes without ever answering (accept-then-close)
    /// or dies failing a request in flight is failing. Found with nginx
    /// (issue 13): every graceful close of an idle keep-alive backed the address off.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn close_evicted(
        &self,
        slot: &mut Slot<C>,
        addr: &CheetahString,
        id: ConnId,
        client: &C,
        metrics: &ConnectionMetrics,
        reason: EvictionReason,
        why: Option<UnhealthyReason>,
        now: Instant,
    ) {
        self.note_evicted(addr, id, reason);
        tracing::debug!(addr = %addr, conn = %id, reason = reason.as_str(), "connection evicted");
        self.connector.close_conn(client);
        // The age matters only for a closed connection (and its log line): idle sweeps of many
        // connections skip the clock arithmetic.
        let age = || now.saturating_duration_since(metrics.created_at());
        let failed = match reason {
            EvictionReason::Unhealthy => true,
            EvictionReason::Closed => {
                age() < self.config.ejection.short_lived && !metrics.ended_cleanly()
            }
            _ => false,
        };
        if failed {
            let why = why.unwrap_or(UnhealthyReason::Closed);
            if why == UnhealthyReason::Closed {
                tracing::info!(addr = %addr, conn = %id, age = ?age(), "connection died young");
            } else {
                tracing::info!(addr = %addr, conn = %id, cause = %why, "evicting unhealthy connection");
            }
            self.eject(addr, slot, now, Arc::new(why));
        }
    }

    /// Closes a connection evicted to make room and hands its permit to the caller that made
    /// the room, under the victim's entry lock.
    pub(crate) fn retire_for_room(&self, pooled: Pooled<C>) -> crate::core::Permit {
        let Pooled { conn, permit, .. } = pooled;
        self.note_evicted(conn.addr(), conn.id(), EvictionReason::MakeRoom);
        tracing::debug!(addr = %conn.addr(), conn = %conn.id(), reason = "make_room", "connection evicted");
        self.connector.close_conn(conn.client());
        permit
    }
}

impl<C, K: ManagesConnections<C>> Drop for Inner<C, K> {
    fn drop(&mut self) {
        // I17: the last handle is gone, so whatever the pool held is closed, before the permits go
        // with the map. The cleanup task sees its stop channel close with this struct and ends.
        for entry in self.map.iter() {
            for pooled in entry.value().shared() {
                self.connector.close_conn(pooled.conn.client());
            }
            self.close_idle_exclusive(entry.value());
        }
    }
}

impl<C: Send + Sync + 'static> ConnectionPool<C, NoConnector> {
    /// A pool of at most `max_connections` connections (`0` = unlimited) that evicts connections
    /// unused for longer than `max_idle` (`Duration::ZERO` disables idle eviction), with every other
    /// setting at its default (see [`PoolConfig`]). The signature of the original pool.
    pub fn new(max_connections: usize, max_idle: Duration) -> Self {
        let config = PoolConfig {
            max_connections,
            max_idle: (!max_idle.is_zero()).then_some(max_idle),
            ..PoolConfig::default()
        };
        Self::from_parts(config, NoConnector, PoolExtras::default())
    }
}

impl ConnectionPool<(), NoConnector> {
    /// A builder for every setting, starting from the defaults of [`PoolConfig`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder()
    ///     .max_connections(64)
    ///     .max_idle(Duration::from_secs(30))
    ///     .build::<String>()
    ///     .unwrap();
    /// assert_eq!(pool.config().max_connections, 64);
    ///
    /// let bad = ConnectionPool::builder().failure_ratio(0.0).build::<String>();
    /// assert!(matches!(bad, Err(ConfigError::FailureRatioOutOfRange { .. })));
    /// ```
    pub fn builder() -> PoolBuilder<NoConnector> {
        PoolBuilder {
            config: PoolConfig::default(),
            connector: NoConnector,
            extras: PoolExtras::default(),
        }
    }
}

/// Builds a [`ConnectionPool`]; [`build`](Self::build) validates the whole configuration.
#[derive(Debug, Clone)]
#[must_use]
pub struct PoolBuilder<K> {
    config: PoolConfig,
    connector: K,
    extras: PoolExtras,
}

/// What a pool is built with besides its configuration and connector.
#[derive(Debug, Clone)]
pub(crate) struct PoolExtras {
    events: Hook,
    name: Arc<str>,
    #[cfg(feature = "metrics")]
    export_addresses: usize,
}

impl Default for PoolExtras {
    fn default() -> Self {
        Self {
            events: Hook::default(),
            name: Arc::from("default"),
            #[cfg(feature = "metrics")]
            export_addresses: crate::export::DEFAULT_EXPORTED_ADDRESSES,
        }
    }
}

impl<K> PoolBuilder<K> {
    /// Uses `connector` to create, check and close connections.
    pub fn connector<K2>(self, connector: K2) -> PoolBuilder<K2> {
        PoolBuilder {
            config: self.config,
            connector,
            extras: self.extras,
        }
    }

    /// Replaces the whole configuration.
    pub fn config(mut self, config: PoolConfig) -> Self {
        self.config = config;
        self
    }

    /// See [`PoolConfig::max_connections`].
    pub fn max_connections(mut self, max: usize) -> Self {
        self.config.max_connections = max;
        self
    }

    /// See [`PoolConfig::max_idle`]; `Duration::ZERO` disables idle eviction.
    pub fn max_idle(mut self, max_idle: Duration) -> Self {
        self.config.max_idle = (!max_idle.is_zero()).then_some(max_idle);
        self
    }

    /// See [`HealthPolicy::consecutive_failures`](crate::core::HealthPolicy::consecutive_failures).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.config.health.consecutive_failures = n;
        self
    }

    /// See [`HealthPolicy::failure_ratio`](crate::core::HealthPolicy::failure_ratio).
    pub fn failure_ratio(mut self, ratio: f64) -> Self {
        self.config.health.failure_ratio = ratio;
        self
    }

    /// See [`HealthPolicy::window`](crate::core::HealthPolicy::window).
    pub fn health_window(mut self, window: Duration) -> Self {
        self.config.health.window = window;
        self
    }

    /// See [`HealthPolicy::min_requests`](crate::core::HealthPolicy::min_requests).
    pub fn min_requests(mut self, n: u32) -> Self {
        self.config.health.min_requests = n;
        self
    }

    /// The base, cap and jitter of the [`BackoffPolicy`](crate::core::BackoffPolicy) (its
    /// multiplier stays as it is).
    pub fn backoff(mut self, base: Duration, max: Duration, jitter: f64) -> Self {
        self.config.backoff.base = base;
        self.config.backoff.max = max;
        self.config.backoff.jitter = jitter;
        self
    }

    /// The whole [`BackoffPolicy`](crate::core::BackoffPolicy).
    pub fn backoff_policy(mut self, policy: crate::core::BackoffPolicy) -> Self {
        self.config.backoff = policy;
        self
    }

    /// See [`EjectionPolicy`](crate::core::EjectionPolicy).
    pub fn ejection(mut self, policy: crate::core::EjectionPolicy) -> Self {
        self.config.ejection = policy;
        self
    }

    /// See [`PoolConfig::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// See [`PoolConfig::when_full`].
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.config.when_full = policy;
        self
    }

    /// See [`PoolConfig::call_timeout`]: bounds each [`ConnectionPool::call`] unless the call
    /// sets its own.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder()
    ///     .call_timeout(Duration::from_millis(500))
    ///     .build::<String>()
    ///     .unwrap();
    /// assert_eq!(pool.config().call_timeout, Some(Duration::from_millis(500)));
    /// let bad = ConnectionPool::builder().call_timeout(Duration::ZERO).build::<String>();
    /// assert!(matches!(bad, Err(ConfigError::CallTimeoutTooShort { .. })));
    /// ```
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = Some(timeout);
        self
    }

    /// Calls `events` when the pool connects, fails to connect, evicts, backs off and is told
    /// `mark_up` (see [`PoolEvents`] for the rules a hook follows). Without it, each of those
    /// places costs one branch.
    ///
    /// ```
    /// use keyed_pool::{ConnectionPool, PoolEvents};
    /// struct Quiet;
    /// impl PoolEvents for Quiet {}
    /// let pool = ConnectionPool::builder().events(Quiet).build::<u32>().unwrap();
    /// assert!(pool.insert("127.0.0.1:1", 1));
    /// ```
    pub fn events(mut self, events: impl PoolEvents) -> Self {
        self.extras.events = Hook::new(events);
        self
    }

    /// Names the pool: the `pool` label of its exported metrics, so several pools in one process
    /// are told apart. Default: `"default"`.
    ///
    /// ```
    /// use keyed_pool::ConnectionPool;
    /// let pool = ConnectionPool::builder().name("brokers").build::<u32>().unwrap();
    /// assert_eq!(pool.name(), "brokers");
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.extras.name = Arc::from(name.into());
        self
    }

    /// At most `max` addresses get per-address series in
    /// [`export_metrics`](ConnectionPool::export_metrics) (the first in sorted order; `0`: none),
    /// which bounds the `addr` label's cardinality. Default:
    /// [`DEFAULT_EXPORTED_ADDRESSES`](crate::DEFAULT_EXPORTED_ADDRESSES).
    ///
    /// ```
    /// use keyed_pool::ConnectionPool;
    /// let pool = ConnectionPool::builder().export_addresses(16).build::<u32>().unwrap();
    /// # drop(pool);
    /// ```
    #[cfg(feature = "metrics")]
    pub fn export_addresses(mut self, max: usize) -> Self {
        self.extras.export_addresses = max;
        self
    }

    /// See [`PoolConfig::shard_amount`].
    pub fn shard_amount(mut self, shards: usize) -> Self {
        self.config.shard_amount = shards;
        self
    }

    /// See [`PoolConfig::probe_idle`]: the cleanup task probes connections quiet for longer than
    /// `quiet`.
    pub fn probe_idle(mut self, quiet: Duration) -> Self {
        self.config.probe_idle = Some(quiet);
        self
    }

    /// See [`PoolConfig::probe_timeout`].
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.config.probe_timeout = Some(timeout);
        self
    }

    /// See [`PoolConfig::probe_concurrency`].
    pub fn probe_concurrency(mut self, probes: usize) -> Self {
        self.config.probe_concurrency = probes;
        self
    }

    /// See [`PoolConfig::check_idle_before_use`]: `get_or_connect` probes a connection quiet for
    /// longer than `quiet` before handing it out.
    pub fn check_idle_before_use(mut self, quiet: Duration) -> Self {
        self.config.check_idle_before_use = Some(quiet);
        self
    }

    /// See [`PoolConfig::max_per_address`]: connections an address may have, shared
    /// ([`get_or_connect`](ConnectionPool::get_or_connect)) or exclusive
    /// ([`checkout`](ConnectionPool::checkout)).
    ///
    /// ```
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder().max_per_address(8).build::<u32>().unwrap();
    /// assert_eq!(pool.config().max_per_address, 8);
    /// let bad = ConnectionPool::builder().max_per_address(0).build::<u32>();
    /// assert_eq!(bad.unwrap_err(), ConfigError::ZeroMaxPerAddress);
    /// ```
    pub fn max_per_address(mut self, max: usize) -> Self {
        self.config.max_per_address = max;
        self
    }

    /// See [`PoolConfig::busy_in_flight`]: the calls in flight at which a shared connection is
    /// busy, and another is connected when every one of its address is.
    ///
    /// ```
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder()
    ///     .max_per_address(4)
    ///     .busy_in_flight(32)
    ///     .build::<u32>()
    ///     .unwrap();
    /// assert_eq!(pool.config().busy_in_flight, 32);
    /// let bad = ConnectionPool::builder().busy_in_flight(0).build::<u32>();
    /// assert_eq!(bad.unwrap_err(), ConfigError::ZeroBusyInFlight);
    /// ```
    pub fn busy_in_flight(mut self, calls: u64) -> Self {
        self.config.busy_in_flight = calls;
        self
    }

    /// See [`PoolConfig::checkout_timeout`]: how long a
    /// [`checkout`](ConnectionPool::checkout) waits in line.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder()
    ///     .checkout_timeout(Duration::from_millis(250))
    ///     .build::<u32>()
    ///     .unwrap();
    /// assert_eq!(pool.config().checkout_timeout, Some(Duration::from_millis(250)));
    /// let bad = ConnectionPool::builder().checkout_timeout(Duration::ZERO).build::<u32>();
    /// assert!(matches!(bad, Err(ConfigError::CheckoutTimeoutTooShort { .. })));
    /// ```
    pub fn checkout_timeout(mut self, timeout: Duration) -> Self {
        self.config.checkout_timeout = Some(timeout);
        self
    }

    /// See [`PoolConfig::max_lifetime`]: a checked-out connection older than `lifetime` is
    /// closed when it comes back.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::{ConfigError, ConnectionPool};
    /// let pool = ConnectionPool::builder()
    ///     .max_lifetime(Duration::from_secs(600))
    ///     .build::<u32>()
    ///     .unwrap();
    /// assert_eq!(pool.config().max_lifetime, Some(Duration::from_secs(600)));
    /// let bad = ConnectionPool::builder().max_lifetime(Duration::ZERO).build::<u32>();
    /// assert!(matches!(bad, Err(ConfigError::MaxLifetimeTooShort { .. })));
    /// ```
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.config.max_lifetime = Some(lifetime);
        self
    }

    /// Validates the configuration and builds the pool.
    ///
    /// # Errors
    /// The first problem [`PoolConfig::validate`] finds.
    pub fn build<C>(self) -> Result<ConnectionPool<C, K>, ConfigError>
    where
        C: Send + Sync + 'static,
        K: ManagesConnections<C>,
    {
        self.config.validate()?;
        Ok(ConnectionPool::from_parts(
            self.config,
            self.connector,
            self.extras,
        ))
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    fn from_parts(config: PoolConfig, connector: K, extras: PoolExtras) -> Self {
        let shards = config.shard_amount;
        let origin = Instant::now();
        let wake = Arc::new(crate::checkout::Wake::new());
        let waker = Arc::clone(&wake);
        // Every released slot may be the one a checkout waits for (issue 13).
        let hook: crate::core::ReleaseHook = Arc::new(move || waker.wake());
        // A shared connection whose last call ends may be closed to make room only under
        // `EvictLeastRecentlyUsed`, and room is wanted only under a cap.
        let on_quiet = (config.when_full == WhenFull::EvictLeastRecentlyUsed
            && config.max_connections > 0)
            .then(|| Arc::clone(&hook));
        Self {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher_and_shard_amount(addr_hasher(), shards),
                ledger: Arc::new(CapacityLedger::with_release_hook(
                    config.max_connections,
                    hook,
                )),
                wake,
                ex_connects: watch::Sender::new(0),
                conns: Arc::new(crate::metrics::PoolShared::for_pool(
                    origin,
                    config.health,
                    config.call_timeout,
                    on_quiet,
                )),
                connector,
                counters: PoolCounters::default(),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                room: crate::sync::Mutex::new(()),
                closing: watch::Sender::new(false),
                origin,
                cleanup: CleanupControl::new(),
                jitter_seed: RandomState::new(),
                jitter_draws: AtomicU64::new(0),
                events: extras.events,
                name: extras.name,
                #[cfg(feature = "metrics")]
                export: crate::export::ExportState::new(extras.export_addresses),
                config,
            }),
        }
    }

    /// The validated configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// The pool's name (see [`PoolBuilder::name`]).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The connector.
    pub fn connector(&self) -> &K {
        &self.inner.connector
    }

    /// `true` once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    pub(crate) fn new_connection<T>(&self, addr: CheetahString, conn: T) -> PooledConnection<T> {
        let id = ConnId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let metrics = ConnectionMetrics::in_pool(&self.inner.conns, Instant::now());
        PooledConnection::new(id, addr, conn, metrics)
    }

    /// Whether `conn` may be handed out (I8, I9); a transport found closed is marked so.
    pub(crate) fn usable(&self, conn: &PooledConnection<C>) -> bool {
        if !conn.is_healthy() {
            return false;
        }
        if !self.inner.connector.is_conn_open(conn.client()) {
            conn.mark_closed();
            return false;
        }
        true
    }

    /// Why `conn` is unfit for use, if it is: its latched verdict, or a closed transport.
    pub(crate) fn unusable_reason(&self, conn: &PooledConnection<C>) -> Option<UnhealthyReason> {
        conn.metrics().unusable_reason().or_else(|| {
            (!self.inner.connector.is_conn_open(conn.client())).then_some(UnhealthyReason::Closed)
        })
    }

    /// Runs `f` on the slot of `addr` under its entry's write lock, creating the slot if there is
    /// none, and removes the slot afterwards if `f` left it vacant (I18), or else frees its
    /// out-of-line part if `f` left that settled.
    pub(crate) fn with_slot<R>(
        &self,
        addr: &CheetahString,
        f: impl FnOnce(&mut Slot<C>) -> R,
    ) -> R {
        let mut f = Some(f);
        self.slot_entry(addr, true, |slot| (f.take().expect("called once"))(slot))
            .expect("a slot is created when there is none")
    }

    /// Like [`with_slot`](Self::with_slot), but `None` without calling `f` when `addr` has no slot.
    pub(crate) fn with_existing_slot<R>(
        &self,
        addr: &CheetahString,
        f: impl FnOnce(&mut Slot<C>) -> R,
    ) -> Option<R> {
        self.slot_entry(addr, false, f)
    }

    fn slot_entry<R>(
        &self,
        addr: &CheetahString,
        create: bool,
        f: impl FnOnce(&mut Slot<C>) -> R,
    ) -> Option<R> {
        self.slot_entry_at(addr, create, Instant::now, f)
    }

    /// The address's slot under its entry lock, as [`with_slot`](Self::with_slot) (`create`) and
    /// [`with_existing_slot`](Self::with_existing_slot) give it, for a caller that may have read
    /// the clock already: `now` is called only when the slot's vacancy must be judged (not for an
    /// address holding exclusive state: a checkout's arrival and return read no clock for it).
    ///
    /// After `f`, the slot is removed if it is vacant (I18), or tidied. An existing slot is reached
    /// with `get_mut` on the borrowed key (no key clone, as `entry` needs; issue 13's checkout
    /// cost), and one left vacant is removed by a second lookup that checks again under the lock
    /// (another caller may have used it in between); that happens once per address going idle
    /// for good.
    pub(crate) fn slot_entry_at<R>(
        &self,
        addr: &CheetahString,
        create: bool,
        now: impl FnOnce() -> Instant,
        f: impl FnOnce(&mut Slot<C>) -> R,
    ) -> Option<R> {
        let policy = &self.inner.config.ejection;
        if let Some(mut slot) = self.inner.map.get_mut(addr) {
            let result = f(&mut slot);
            if slot.exclusive().is_some_and(|ex| !ex.is_empty()) {
                // Exclusive state: the slot is not vacant, and `tidy` would free nothing (it frees
                // only an empty exclusive state, or a settled out-of-line part, which this is not).
                return Some(result);
            }
            let at = self.inner.offset(now());
            if slot.is_vacant(at, policy) {
                drop(slot);
                self.inner
                    .map
                    .remove_if(addr, |_, slot| slot.is_vacant(at, policy));
            } else {
                slot.tidy(at, policy);
            }
            return Some(result);
        }
        if !create {
            return None;
        }
        let at = self.inner.offset(now());
        // Another caller may have created it since the lookup above.
        match self.inner.map.entry(addr.clone()) {
            Entry::Occupied(mut occupied) => {
                let result = f(occupied.get_mut());
                if occupied.get().is_vacant(at, policy) {
                    occupied.remove();
                } else {
                    occupied.get_mut().tidy(at, policy);
                }
                Some(result)
            }
            Entry::Vacant(vacant) => {
                let mut slot = Slot::default();
                let result = f(&mut slot);
                if !slot.is_vacant(at, policy) {
                    slot.tidy(at, policy);
                    vacant.insert(slot);
                }
                Some(result)
            }
        }
    }

    /// Evicts the slot's shared connections that are unfit (their latched verdict, or a closed
    /// transport), as `Unhealthy` or `Closed`, under the entry lock: the one place both a sweep and
    /// `get_or_connect` decide that. `only`: just that connection. Returns how many it evicted.
    pub(crate) fn evict_unfit(
        &self,
        slot: &mut Slot<C>,
        only: Option<ConnId>,
        now: Instant,
    ) -> usize {
        let unfit: Vec<(ConnId, UnhealthyReason)> = slot
            .shared()
            .filter(|p| only.is_none_or(|id| p.conn.id() == id))
            .filter_map(|p| Some((p.conn.id(), self.unusable_reason(&p.conn)?)))
            .collect();
        for &(id, why) in &unfit {
            let reason = if why == UnhealthyReason::Closed {
                EvictionReason::Closed
            } else {
                EvictionReason::Unhealthy
            };
            if let Some(pooled) = slot.take_shared_if(id, |_| true) {
                self.inner.retire(slot, pooled, reason, Some(why), now);
            }
        }
        unfit.len()
    }

    /// The slow path under [`WhenFull::EvictLeastRecentlyUsed`], one caller at a time (the room
    /// lock): `attempt` decides again for `addr`, given the slot freed for it so far, and returns
    /// `None` while the pool is still full; between attempts the least recently used connection of
    /// another address is closed and its slot handed over. Refuses only when nothing is evictable.
    ///
    /// `for_checkout`: a checkout waiter makes the room (issue 13). It may close an idle exclusive
    /// connection whatever the policy (nobody holds one), a shared one only under
    /// [`WhenFull::EvictLeastRecentlyUsed`]; and finding no room is not counted as a refusal (the
    /// waiter waits on).
    pub(crate) fn with_room<R>(
        &self,
        addr: &CheetahString,
        for_checkout: bool,
        mut attempt: impl FnMut(&mut Option<crate::core::Permit>) -> Option<Result<R, PoolError>>,
    ) -> Result<R, PoolError> {
        let shared_too =
            !for_checkout || self.inner.config.when_full == WhenFull::EvictLeastRecentlyUsed;
        let refuse = || {
            if for_checkout {
                let ledger = &self.inner.ledger;
                PoolError::AtCapacity {
                    max: ledger.max(),
                    live: ledger.used().saturating_sub(ledger.connecting()),
                    connecting: ledger.connecting(),
                }
            } else {
                self.at_capacity()
            }
        };
        let _room = self.inner.room.lock();
        // While we make room, a slot freed by a removal is ours, not a racer's: otherwise a
        // remove-and-insert elsewhere could take every slot freed under us, and we would refuse
        // although the pool was never full of connections in use (I1's linearizability). Racers
        // refused by it come here and wait on the room lock. One holder at a time: the room lock.
        let last = self.inner.ledger.reserve_last();
        // Declared after the room guard and the reservation, so a freed slot left unused goes back
        // before either does: otherwise the next caller could find the pool full and evict for
        // nothing.
        let mut permit = None;
        let mut nothing_seen = false;
        for _ in 0..MAX_ROOM_ATTEMPTS {
            if permit.is_none() {
                permit = last.as_ref().and_then(|last| last.try_acquire());
            }
            // Another caller may have placed this address, or freed a slot, meanwhile.
            if let Some(result) = attempt(&mut permit) {
                return result;
            }
            match self.take_lru_permit(addr, shared_too) {
                LruTake::Taken(freed) => permit = Some(freed),
                LruTake::Raced => nothing_seen = false,
                // Nothing to evict, seen twice around a failed attempt: the pool is full of
                // connections in use (or of this address's own racers).
                LruTake::Nothing if !nothing_seen => nothing_seen = true,
                LruTake::Nothing if self.is_closed() => return Err(PoolError::Closed),
                LruTake::Nothing => return Err(refuse()),
            }
        }
        Err(refuse())
    }

    /// The healthy connection pooled for `addr`, if any: of several (I23), the one with the fewest
    /// calls in flight. Marks it used (I5): it reads no clock, and
    /// writes only the first time between two idle sweeps (see
    /// [`ConnectionMetrics::mark_used`]), so a connection used only through `get` is evicted at most
    /// one sweep interval later than its exact idle edge, never earlier (I6). Never returns a
    /// connection judged unhealthy or whose transport is known closed (I8, I9). Lock-free for
    /// readers of different shards; never waits.
    pub fn get(&self, addr: impl AsRef<str>) -> Option<PooledConnection<C>> {
        let slot = self.inner.map.get(addr.as_ref())?;
        let slot = slot.value();
        let first = &slot.conn.as_ref()?.conn;
        let conn = if slot.has_more() {
            self.least_loaded_cold(slot)?
        } else if self.usable(first) {
            first
        } else {
            return None;
        };
        // Marked under the shard's read lock. A sweep re-checks under the write lock, which it
        // cannot take while this guard lives: either it ran entirely before this `get` (and the
        // connection was gone, or not taken), or it finds the mark and folds it in at its own
        // instant or later, and so does not take the connection (I7).
        conn.metrics().mark_used();
        Some(conn.clone())
    }

    /// The usable shared connection of `slot` with the fewest calls in flight, the oldest of
    /// equals (issue 13's shared mode).
    pub(crate) fn least_loaded<'s>(&self, slot: &'s Slot<C>) -> Option<&'s PooledConnection<C>> {
        slot.shared()
            .map(|p| &p.conn)
            .filter(|conn| self.usable(conn))
            .min_by_key(|conn| conn.metrics().in_flight())
    }

    /// [`least_loaded`](Self::least_loaded) off `get`'s hot path: only addresses with several
    /// shared connections come here.
    #[cold]
    #[inline(never)]
    fn least_loaded_cold<'s>(&self, slot: &'s Slot<C>) -> Option<&'s PooledConnection<C>> {
        self.least_loaded(slot)
    }

    /// Pools `conn` for `addr`. Returns `false` if the pool is full (and its [`WhenFull`] policy
    /// found no room) or closed. Replacing the connection of an address already present never fails
    /// for capacity and never changes the count (I2); the replaced connection is closed.
    pub fn insert(&self, addr: impl Into<CheetahString>, conn: C) -> bool {
        self.try_insert(addr, conn).is_ok()
    }

    /// Like [`insert`](Self::insert), but returns the new pooled connection, or why it was refused.
    ///
    /// # Errors
    /// [`PoolError::AtCapacity`] when full, [`PoolError::Closed`] after [`close`](Self::close)
    /// began (decided under the address's lock, so an insert racing `close` is either closed by it
    /// or refused, I17).
    pub fn try_insert(
        &self,
        addr: impl Into<CheetahString>,
        conn: C,
    ) -> Result<PooledConnection<C>, PoolError> {
        if self.is_closed() {
            return Err(PoolError::Closed);
        }
        let pooled = self.new_connection(addr.into(), conn);
        let mut permit = None;
        match self.place(&pooled, &mut permit) {
            Ok(()) => return Ok(pooled),
            Err(PoolError::AtCapacity { .. })
                if self.inner.config.when_full == WhenFull::EvictLeastRecentlyUsed => {}
            Err(PoolError::AtCapacity { .. }) => return Err(self.at_capacity()),
            Err(err) => return Err(err),
        }
        // The slow path: full, and the policy allows making room.
        self.with_room(pooled.addr(), false, |permit| {
            match self.place(&pooled, permit) {
                Ok(()) => Some(Ok(pooled.clone())),
                Err(PoolError::AtCapacity { .. }) => None,
                Err(err) => Some(Err(err)),
            }
        })
    }

    pub(crate) fn at_capacity(&self) -> PoolError {
        PoolCounters::bump(&self.inner.counters.rejected_capacity);
        let ledger = &self.inner.ledger;
        let connecting = ledger.connecting();
        PoolError::AtCapacity {
            max: ledger.max(),
            live: ledger.used().saturating_sub(connecting),
            connecting,
        }
    }

    /// Puts a connection made by hand in its address's slot: a replacement takes over the slot's
    /// permit (I2), a new one takes `permit` if the caller freed one for it, or a permit of its own.
    fn place(
        &self,
        pooled: &PooledConnection<C>,
        permit: &mut Option<crate::core::Permit>,
    ) -> Result<(), PoolError> {
        self.with_slot(pooled.addr(), |slot| {
            // Under the entry lock: `close` either sees this connection in its sweep or we see the
            // flag here (it is set before the sweep takes any lock).
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(PoolError::Closed);
            }
            // With several shared connections (issue 13), a connection inserted by hand replaces
            // the first.
            match slot.conn.take() {
                Some(old) => {
                    let Pooled { conn, permit, .. } = old;
                    slot.conn = Some(Pooled {
                        conn: pooled.clone(),
                        permit,
                        handoff: None,
                    });
                    self.inner
                        .note_evicted(conn.addr(), conn.id(), EvictionReason::Replaced);
                    tracing::debug!(addr = %conn.addr(), conn = %conn.id(), reason = "replaced", "connection evicted");
                    self.inner.connector.close_conn(conn.client());
                }
                None => {
                    let permit = permit
                        .take()
                        .or_else(|| self.inner.ledger.try_acquire())
                        // Mapped to the full error, with its counts, by the caller.
                        .ok_or(PoolError::AtCapacity {
                            max: self.inner.ledger.max(),
                            live: 0,
                            connecting: 0,
                        })?;
                    slot.conn = Some(Pooled {
                        conn: pooled.clone(),
                        permit,
                        handoff: None,
                    });
                }
            }
            tracing::debug!(addr = %pooled.addr(), conn = %pooled.id(), "connection pooled");
            Ok(())
        })
    }

    /// Takes whatever connection is pooled for `addr` out of the pool and hands it back
    /// **unclosed**: the caller now owns it (the connector's `close` is not called), and its
    /// capacity slot is free at once. To remove and close, use
    /// [`remove_connection`](Self::remove_connection) (one specific connection) or
    /// [`clear`](Self::clear) (all).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<String> = ConnectionPool::new(1, Duration::ZERO);
    /// assert!(pool.insert("127.0.0.1:1", "client".to_string()));
    /// let conn = pool.take_unclosed("127.0.0.1:1").expect("it was pooled");
    /// assert_eq!(conn.client(), "client");
    /// assert!(pool.is_empty());
    /// // Its slot is free at once.
    /// assert!(pool.insert("127.0.0.1:2", "another".to_string()));
    /// ```
    pub fn take_unclosed(&self, addr: impl AsRef<str>) -> Option<PooledConnection<C>> {
        let addr = &key(addr.as_ref());
        let conn = self
            .with_existing_slot(addr, |slot| {
                // The permit goes with the `Pooled`, here, under the entry lock: an insert for this
                // address right after finds the slot free (I2).
                slot.take_first().map(|pooled| pooled.conn)
            })
            .flatten()?;
        self.inner
            .note_evicted(addr, conn.id(), EvictionReason::Manual);
        tracing::debug!(addr = %addr, conn = %conn.id(), reason = "manual", "connection removed");
        Some(conn)
    }

    /// The original pool's name for [`take_unclosed`](Self::take_unclosed), which says what it
    /// does: the connection comes back unclosed.
    #[deprecated(
        since = "0.2.0",
        note = "hands the connection back unclosed: use `take_unclosed`, or `remove_connection` to close it"
    )]
    pub fn remove(&self, addr: impl AsRef<str>) -> Option<PooledConnection<C>> {
        self.take_unclosed(addr)
    }

    /// Removes `conn` if, and only if, it is still pooled for its address (I14), and closes it.
    /// Returns whether it was removed.
    pub fn remove_connection(&self, conn: &PooledConnection<C>) -> bool {
        self.remove_if(conn.addr(), conn.id(), EvictionReason::Manual, |_| true)
    }

    /// The conditional removal every eviction goes through: under the address's entry lock, removes
    /// `(addr, id)` only if it is still that connection and `still` holds for it (I7, I14), then
    /// closes it and frees its slot.
    pub(crate) fn remove_if(
        &self,
        addr: &CheetahString,
        id: ConnId,
        reason: EvictionReason,
        still: impl FnOnce(&Pooled<C>) -> bool,
    ) -> bool {
        let now = Instant::now();
        self.with_existing_slot(addr, |slot| {
            let Some(pooled) = slot.take_shared_if(id, still) else {
                return false;
            };
            self.inner.retire(slot, pooled, reason, None, now);
            true
        })
        .unwrap_or(false)
    }

    /// Removes and closes every connection. Connects in flight and backoffs are left as they are.
    pub fn clear(&self) {
        self.clear_with(EvictionReason::Manual);
    }

    pub(crate) fn clear_with(&self, reason: EvictionReason) {
        for (addr, id) in self.snapshot_ids() {
            self.remove_if(&addr, id, reason, |_| true);
        }
    }

    /// `(addr, id)` of every live connection, sorted, so that what follows from it does not depend
    /// on the map's iteration order (a simulation seed must replay exactly).
    pub(crate) fn snapshot_ids(&self) -> Vec<(CheetahString, ConnId)> {
        let mut ids: Vec<_> = self
            .inner
            .map
            .iter()
            .flat_map(|e| {
                let addr = e.key();
                e.value()
                    .shared()
                    .map(|p| (addr.clone(), p.conn.id()))
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The (first) connection pooled for `addr`, whatever its health: the common path of `peek`,
    /// `get_metrics` and the `record_*` calls.
    fn pooled(&self, addr: &str) -> Option<PooledConnection<C>> {
        let slot = self.inner.map.get(addr)?;
        Some(slot.value().conn.as_ref()?.conn.clone())
    }

    /// The metrics of the connection pooled for `addr` (whatever its health).
    pub fn get_metrics(&self, addr: impl AsRef<str>) -> Option<SharedMetrics> {
        self.pooled(addr.as_ref()).map(|conn| conn.shared_metrics())
    }

    /// The connection pooled for `addr` whatever its health, without moving its idle clock.
    pub fn peek(&self, addr: impl AsRef<str>) -> Option<PooledConnection<C>> {
        self.pooled(addr.as_ref())
    }

    /// Records a successful call of `latency` against the connection pooled for `addr` now (the
    /// original's interface; prefer [`PooledConnection::begin`], which cannot hit a successor).
    pub fn record_success(&self, addr: impl AsRef<str>, latency: Duration) {
        if let Some(conn) = self.pooled(addr.as_ref()) {
            conn.record_success(latency);
        }
    }

    /// Records a failed call against the connection pooled for `addr` now. See
    /// [`record_success`](Self::record_success).
    pub fn record_error(&self, addr: impl AsRef<str>) {
        if let Some(conn) = self.pooled(addr.as_ref()) {
            conn.record_error();
        }
    }

    /// Live connections, counted address by address (O(addresses)). While connections are added
    /// and removed concurrently the count is not a snapshot; [`used_slots`](Self::used_slots) is the
    /// exact figure the cap (I1) is held against.
    ///
    /// Exclusive connections ([`checkout`](Self::checkout)) count too, idle or checked out.
    pub fn len(&self) -> usize {
        self.inner
            .map
            .iter()
            .map(|e| e.value().shared_count() + exclusive_live(e.value()))
            .sum()
    }

    /// `true` when no connection is pooled, shared or exclusive.
    pub fn is_empty(&self) -> bool {
        !self
            .inner
            .map
            .iter()
            .any(|e| e.value().conn.is_some() || exclusive_live(e.value()) > 0)
    }

    /// Slots in use: live connections plus connects in flight (I3: never above the cap).
    pub fn used_slots(&self) -> usize {
        self.inner.ledger.used()
    }

    /// Addresses the pool keeps any state for: a connection, a connect in flight, or an ejection
    /// state that has not decayed yet. Bounded by the live addresses plus those backing off or
    /// recently failed (I18): an address with nothing left to remember leaves at once, or at the
    /// next sweep of [`prune_addresses`](Self::prune_addresses) once its ejection count decays.
    pub fn tracked_addresses(&self) -> usize {
        self.inner.map.len()
    }

    /// A snapshot of the pool.
    pub fn stats(&self) -> PoolStats {
        let now = Instant::now();
        let max_idle = self.inner.config.max_idle;
        let mut stats = PoolStats {
            max_connections: self.inner.ledger.max(),
            ..PoolStats::default()
        };
        for entry in self.inner.map.iter() {
            let slot = entry.value();
            stats.reserved += usize::from(slot.flight().is_some());
            if let Some(ex) = slot.exclusive() {
                let (idle, checked_out, connecting, waiting) = ex.counts();
                stats.total += idle + checked_out;
                stats.idle += idle;
                stats.healthy += checked_out + ex.idle_metrics().filter(|m| m.is_healthy()).count();
                stats.reserved += connecting;
                stats.checked_out += checked_out;
                stats.waiting += waiting;
            }
            for pooled in slot.shared() {
                let m = pooled.conn.metrics();
                stats.total += 1;
                stats.healthy += usize::from(m.is_healthy());
                // A gauge: read without folding pending uses, so looking does not move the clock.
                stats.idle += usize::from(m.seems_idle_at(now, max_idle));
                stats.in_flight += m.in_flight();
            }
        }
        self.inner.conns.fill_totals(&mut stats);
        let c = &self.inner.counters;
        let load = |a: &crate::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        stats.evictions = EvictionStats {
            idle: load(&c.evicted_idle),
            unhealthy: load(&c.evicted_unhealthy),
            closed: load(&c.evicted_closed),
            replaced: load(&c.evicted_replaced),
            manual: load(&c.evicted_manual),
            make_room: load(&c.evicted_make_room),
            broken: load(&c.evicted_broken),
            lifetime: load(&c.evicted_lifetime),
        };
        stats.rejected_capacity = load(&c.rejected_capacity);
        stats.connects = ConnectStats {
            attempted: load(&c.connects_attempted),
            succeeded: load(&c.connects_succeeded),
            failed: load(&c.connects_failed),
            timed_out: load(&c.connects_timed_out),
            shared: load(&c.connects_shared),
            backoff_rejections: load(&c.backoff_rejections),
        };
        stats
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The map's hasher is seeded per pool (see `AddrHasher`): a fixed seed would let anyone who
    /// knows the crate build colliding addresses ahead of time, for every pool alike.
    #[test]
    fn each_pool_seeds_its_map_hasher_afresh() {
        let seeds: Vec<u64> = (0..4)
            .map(|_| addr_hasher().hash_one("10.0.0.1:10911"))
            .collect();
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            seeds.len(),
            "two pools' map hashers hashed an address alike: {seeds:?}"
        );
        assert_ne!(
            seeds[0],
            AddrHasher::default().hash_one("10.0.0.1:10911"),
            "the map hasher kept foldhash's fixed default seed"
        );
    }

    /// Issue 17: `jitter_unit` returning a constant (0, 1 or -1) passed every test. The draw must
    /// stay in `[0, 1]`, vary, and spread over the whole unit interval (I12's jitter band is
    /// `delay(k) * (1 ± jitter)`, so a constant draw would put every address on the same edge).
    #[tokio::test(start_paused = true)]
    async fn i12_jitter_draws_are_uniform_in_the_unit_interval() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(60));
        let draws: Vec<f64> = (0..4000).map(|_| pool.inner.jitter_unit()).collect();
        for &u in &draws {
            assert!(
                (0.0..=1.0).contains(&u),
                "I12 violated: jitter draw {u} outside [0, 1]"
            );
        }
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        // 4000 uniform draws: the mean's standard deviation is 0.0046; 0.05 is > 10 of them.
        assert!(
            (mean - 0.5).abs() < 0.05,
            "jitter draws are not uniform: mean {mean}"
        );
        for quarter in 0..4 {
            let (lo, hi) = (quarter as f64 / 4.0, (quarter + 1) as f64 / 4.0);
            let n = draws.iter().filter(|&&u| lo <= u && u < hi).count();
            assert!(
                (800..=1200).contains(&n),
                "jitter draws are not uniform: {n} of 4000 in [{lo}, {hi})"
            );
        }
        let distinct: std::collections::HashSet<u64> = draws.iter().map(|u| u.to_bits()).collect();
        assert!(
            distinct.len() > 3990,
            "jitter draws repeat: {} distinct",
            distinct.len()
        );
    }
}
