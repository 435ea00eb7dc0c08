//! The `config` fuzz target (and its proptest twin): arbitrary configuration values.
//!
//! Validation is restated here from docs/DESIGN.md ("a config that makes no sense is a clear error,
//! never a panic"): `PoolConfig::validate` and `PoolBuilder::build` must accept exactly the configs
//! that satisfy every rule, name a rule that is broken when they refuse, and never panic; the pure
//! core must be total on whatever values it is given; and a pool built from a valid config must
//! survive a short workout.

use std::time::Duration;

use arbitrary::Arbitrary;
use keyed_pool::core::{BackoffPolicy, Ejection, EjectionPolicy, HealthPolicy, is_idle};
use keyed_pool::{ConfigError, ConnectionPool, PoolConfig, WhenFull};

use crate::harness::{FakeConn, ScriptedConnector};
use crate::ops::{ConnectScript, addr};

/// A duration drawn where it matters: around 1 ms, small, or anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawDuration {
    /// Nanoseconds (below 1 ms up to ~4 s).
    Nanos(u32),
    /// Milliseconds.
    Millis(u16),
    /// Any duration, up to `Duration::MAX`.
    Any(Duration),
}

impl RawDuration {
    /// The duration.
    pub fn get(self) -> Duration {
        match self {
            Self::Nanos(n) => Duration::from_nanos(u64::from(n)),
            Self::Millis(ms) => Duration::from_millis(u64::from(ms)),
            Self::Any(d) => d,
        }
    }
}

/// Every configurable value, raw, plus inputs for the pure core.
#[derive(Arbitrary, Clone, Debug, PartialEq)]
pub struct RawConfig {
    /// `max_connections`.
    pub max_connections: u16,
    /// `max_idle`.
    pub max_idle: Option<RawDuration>,
    /// `health.consecutive_failures`.
    pub consecutive_failures: u32,
    /// `health.failure_ratio`.
    pub failure_ratio: f64,
    /// `health.window`.
    pub window: RawDuration,
    /// `health.min_requests`.
    pub min_requests: u32,
    /// `backoff.base`.
    pub base: RawDuration,
    /// `backoff.max`.
    pub cap: RawDuration,
    /// `backoff.jitter`.
    pub jitter: f64,
    /// `connect_timeout`.
    pub connect_timeout: RawDuration,
    /// `when_full` is LRU.
    pub lru: bool,
    /// `shard_amount`.
    pub shard_amount: u64,
    /// A failure count for `BackoffPolicy::delay`.
    pub k: u32,
    /// A jitter draw for `BackoffPolicy::delay` (any float, NaN included).
    pub unit: f64,
    /// Inputs for `HealthPolicy::verdict`.
    pub verdict: (u32, u64, u64),
    /// `backoff.multiplier`; `None` keeps the default. The fields from here on were added after the
    /// corpus was made: an input that ends before them decodes as it did (as `None`), so the
    /// committed corpus and regressions keep their meaning.
    pub multiplier: Option<f64>,
    /// `ejection.short_lived`; `None` keeps the default.
    pub short_lived: Option<RawDuration>,
    /// `ejection.decay_interval`; `None` keeps the default.
    pub decay_interval: Option<RawDuration>,
}

impl RawConfig {
    /// The `PoolConfig` these values make.
    pub fn config(&self) -> PoolConfig {
        let mut c = PoolConfig::default();
        c.max_connections = usize::from(self.max_connections);
        c.max_idle = self.max_idle.map(RawDuration::get);
        c.health = HealthPolicy {
            consecutive_failures: self.consecutive_failures,
            failure_ratio: self.failure_ratio,
            window: self.window.get(),
            min_requests: self.min_requests,
        };
        let defaults = (BackoffPolicy::default(), EjectionPolicy::default());
        c.backoff = BackoffPolicy {
            base: self.base.get(),
            max: self.cap.get(),
            multiplier: self.multiplier.unwrap_or(defaults.0.multiplier),
            jitter: self.jitter,
        };
        c.ejection = EjectionPolicy {
            short_lived: self
                .short_lived
                .map_or(defaults.1.short_lived, RawDuration::get),
            decay_interval: self
                .decay_interval
                .map_or(defaults.1.decay_interval, RawDuration::get),
        };
        c.connect_timeout = self.connect_timeout.get();
        c.when_full = if self.lru {
            WhenFull::EvictLeastRecentlyUsed
        } else {
            WhenFull::Reject
        };
        c.shard_amount = usize::try_from(self.shard_amount).unwrap_or(usize::MAX);
        c
    }
}

const MS: Duration = Duration::from_millis(1);

/// The rules a config must satisfy, restated; returns the names of those it breaks.
pub fn broken_rules(c: &PoolConfig) -> Vec<&'static str> {
    let mut broken = Vec::new();
    let ratio = c.health.failure_ratio;
    if !(ratio > 0.0 && ratio <= 1.0) {
        broken.push("failure_ratio");
    }
    if c.health.window < MS {
        broken.push("window");
    }
    if c.health.min_requests == 0 {
        broken.push("min_requests");
    }
    if c.backoff.base < MS {
        broken.push("backoff_base");
    }
    if c.backoff.max < c.backoff.base {
        broken.push("backoff_max");
    }
    if !(c.backoff.multiplier >= 1.0 && c.backoff.multiplier <= 16.0) {
        broken.push("multiplier");
    }
    if !(c.backoff.jitter >= 0.0 && c.backoff.jitter < 1.0) {
        broken.push("jitter");
    }
    if c.ejection.decay_interval < MS {
        broken.push("decay_interval");
    }
    if c.connect_timeout < MS {
        broken.push("connect_timeout");
    }
    if !(2..=MAX_SHARDS).contains(&c.shard_amount) || !c.shard_amount.is_power_of_two() {
        broken.push("shard_amount");
    }
    broken
}

/// The rule a `ConfigError` reports as broken.
pub fn rule_of(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::FailureRatioOutOfRange { .. } => "failure_ratio",
        ConfigError::WindowTooShort { .. } => "window",
        ConfigError::ZeroMinRequests => "min_requests",
        ConfigError::BackoffBaseTooSmall { .. } => "backoff_base",
        ConfigError::BackoffMaxBelowBase { .. } => "backoff_max",
        ConfigError::MultiplierOutOfRange { .. } => "multiplier",
        ConfigError::JitterOutOfRange { .. } => "jitter",
        ConfigError::DecayIntervalTooShort { .. } => "decay_interval",
        ConfigError::ConnectTimeoutTooShort { .. } => "connect_timeout",
        ConfigError::IntervalTooShort { .. } => "interval",
        ConfigError::BadShardAmount { .. } => "shard_amount",
        _ => "unknown",
    }
}

/// The most shards a config may ask for: the map allocates every shard up front, so a huge amount
/// would only exhaust memory when the pool is built (`shard_amount(1 << 62)` once validated and
/// then panicked in `build`).
pub const MAX_SHARDS: usize = 1 << 12;

/// The whole check of one raw config.
///
/// # Panics
/// When validation disagrees with the rules, or anything panics inside the pool.
pub fn check(raw: &RawConfig) {
    let config = raw.config();
    let broken = broken_rules(&config);
    match config.validate() {
        Ok(()) => assert!(
            broken.is_empty(),
            "validate accepted a config breaking {broken:?}: {config:?}"
        ),
        Err(e) => {
            assert!(
                broken.contains(&rule_of(&e)),
                "validate refused with {e:?} (rule {}), but the broken rules are {broken:?}: {config:?}",
                rule_of(&e)
            );
            assert!(!e.to_string().is_empty());
        }
    }
    check_core(raw, &config);
    // Refused configs are built too: `build` must refuse them without allocating anything.
    let built = ConnectionPool::builder()
        .config(config.clone())
        .connector(ScriptedConnector::new(MS))
        .build::<FakeConn>();
    assert_eq!(
        built.is_ok(),
        broken.is_empty(),
        "build and the rules disagree on {config:?}"
    );
    assert_eq!(
        built.is_ok(),
        config.validate().is_ok(),
        "build and validate disagree"
    );
    if let Ok(pool) = built {
        workout(pool, &config);
    }
}

/// The pure core is total: any policy, any `k`, any draw (I12: never zero, never shrinking in `k`
/// for a valid policy), any ejection policy and instants, any verdict inputs, any idle inputs.
fn check_core(raw: &RawConfig, config: &PoolConfig) {
    let policy = config.backoff;
    let d = policy.delay(raw.k, raw.unit);
    assert!(
        d >= MS,
        "I12 violated: delay({}) = {d:?} < 1 ms for {policy:?}",
        raw.k
    );
    if policy.validate().is_ok() {
        let next = policy.delay(raw.k.saturating_add(1), raw.unit);
        assert!(
            next >= d,
            "I12 violated: delay shrinks from {d:?} to {next:?} at k = {} for {policy:?}",
            raw.k
        );
    }
    // The ejection state on raw instants (the config's durations as offsets): total, a rise
    // always backs off (at least 1 ms, saturating at the end of time), a reset settles.
    let ejection = config.ejection;
    let now = raw.window.get();
    let mut e = Ejection::default();
    for _ in 0..raw.k % 4 {
        let delay = e.eject(now, &policy, &ejection, raw.unit);
        assert!(
            delay >= MS,
            "I12 violated: a rise at {now:?} backs off {delay:?} < 1 ms for {policy:?}"
        );
        assert!(
            e.retry_after(now).is_some() || now.checked_add(delay).is_none(),
            "I12 violated: a rise at {now:?} left no backoff"
        );
    }
    for at in [now, raw.cap.get(), config.connect_timeout, Duration::MAX] {
        let _ = (e.count_at(at, &ejection), e.is_settled(at, &ejection));
    }
    e.reset();
    assert!(
        e.is_settled(now, &ejection),
        "I12 violated: mark_up's reset left state behind"
    );
    let (run, ok, bad) = raw.verdict;
    let health = config.health;
    let verdict = health.verdict(run, (ok, bad));
    if health.validate().is_ok()
        && ok.saturating_add(bad) < u64::from(health.min_requests)
        && (health.consecutive_failures == 0 || run < health.consecutive_failures)
    {
        assert!(
            !verdict.is_unhealthy(),
            "I11 violated: {verdict:?} with {} calls below the minimum volume {}",
            ok.saturating_add(bad),
            health.min_requests
        );
    }
    let _ = is_idle(u64::from(run), raw.window.get(), config.max_idle);
}

/// A short workout of a pool built from an arbitrary valid config: nothing may panic, and the cap
/// holds (I1).
fn workout(pool: ConnectionPool<FakeConn, ScriptedConnector>, config: &PoolConfig) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let max = config.max_connections;
        let cap = |pool: &ConnectionPool<FakeConn, ScriptedConnector>| {
            assert!(
                max == 0 || (pool.len() <= max && pool.used_slots() <= max),
                "I1 violated"
            );
        };
        for i in 0..3 {
            pool.insert(addr(i), FakeConn::new(u64::from(i)));
            cap(&pool);
        }
        if let Some(conn) = pool.get(addr(0)) {
            for _ in 0..25 {
                let call = conn.begin();
                let _ = call.failure();
            }
            conn.begin().success();
        }
        pool.record_error(addr(1));
        pool.record_success(addr(1), Duration::MAX);
        let _ = pool.evict_unhealthy().await;
        for script in [ConnectScript::Fail, ConnectScript::Fail, ConnectScript::Ok] {
            pool.connector().script(Some(script));
            let _ = pool.get_or_connect(&addr(4)).await;
            cap(&pool);
        }
        pool.connector().script(None);
        let _ = pool.backoff_until(addr(4));
        let _ = pool.ejection_count(addr(4));
        pool.mark_up(addr(4));
        pool.connector().script(Some(ConnectScript::Ok));
        if let Ok(conn) = pool.get_or_connect(&addr(4)).await {
            conn.mark_closed(); // dies young: a failure of its address
        }
        pool.connector().script(None);
        let _ = pool.evict_unhealthy().await;
        cap(&pool);
        tokio::time::advance(Duration::from_secs(3600)).await;
        let _ = pool.evict_idle().await;
        let _ = pool.prune_addresses().await;
        let _ = pool.stats();
        cap(&pool);
        pool.close().await;
        assert!(pool.is_empty(), "I17 violated: close left connections");
        assert_eq!(
            (pool.used_slots(), pool.tracked_addresses()),
            (0, 0),
            "I17 violated: close left slots or addresses (I18)"
        );
    });
}
