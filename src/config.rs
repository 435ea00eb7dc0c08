use std::time::Duration;

use crate::ConfigError;
use crate::core::{BackoffPolicy, EjectionPolicy, HealthPolicy};

/// The most shards [`PoolConfig::shard_amount`] accepts: more buys no concurrency on any real
/// machine, and a huge value would only exhaust memory when the pool is built.
pub const MAX_SHARDS: usize = 4096;

/// What the pool does when a new connection needs a slot and every slot is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse: `insert` returns `false`, `get_or_connect` returns
    /// [`PoolError::AtCapacity`](crate::PoolError::AtCapacity). The default: it never closes a
    /// connection somebody else may be about to use.
    #[default]
    Reject,
    /// Evict the least-recently-used *idle-capable* connection of another address (one with no call
    /// in flight) to make room; reject only if there is none. Suits clients that talk to more
    /// brokers than they keep connections for.
    EvictLeastRecentlyUsed,
}

/// Everything the pool can be configured with. Build one with
/// [`ConnectionPool::builder`](crate::ConnectionPool::builder); every field has a documented default.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Cap on live connections plus connects in flight; `0` = unlimited. Default: unlimited.
    pub max_connections: usize,
    /// A connection unused for longer than this, with no call in flight, is evicted by the next idle
    /// sweep. `None` disables idle eviction. Default: 5 minutes.
    pub max_idle: Option<Duration>,
    /// When a connection counts as unhealthy.
    pub health: HealthPolicy,
    /// How long an address backs off at each ejection count.
    pub backoff: BackoffPolicy,
    /// What raises and lowers an address's ejection count.
    pub ejection: EjectionPolicy,
    /// Bound on every connect. Default: 3 s (RocketMQ's client default).
    pub connect_timeout: Duration,
    /// What to do when every slot is taken. Default: [`WhenFull::Reject`].
    pub when_full: WhenFull,
    /// Bound on each call made with [`ConnectionPool::call`](crate::ConnectionPool::call) or
    /// [`PooledConnection::call`](crate::PooledConnection::call) (not on the connect, which
    /// `connect_timeout` bounds); a call that runs longer is dropped and recorded as a failure.
    /// Overridable per call. `None`: unbounded. Default: `None` (most clients bound their requests
    /// themselves).
    pub call_timeout: Option<Duration>,
    /// Shards of the address map; a power of two in `2..=4096`. Fixed rather than derived from the CPU count
    /// so that a simulation seed replays the same on any machine. Default: 32.
    pub shard_amount: usize,
    /// Liveness between uses: each round of the cleanup task probes, through the connector's
    /// [`probe`](crate::Connector::probe), every connection with no call in flight that has
    /// neither been used nor probed for longer than this, so a connection whose server died is
    /// found before a caller finds it. Must be below `max_idle`. A probe is not a use: it never
    /// keeps a connection from being evicted as idle. `None` (the default) disables probing.
    pub probe_idle: Option<Duration>,
    /// Bound on each probe; a probe that has not answered by then counts as failed. `None` (the
    /// default) uses `connect_timeout`.
    pub probe_timeout: Option<Duration>,
    /// How many probes one probing round runs at once; the rest wait their turn. Default: 16.
    pub probe_concurrency: usize,
    /// Check before use: [`get_or_connect`](crate::ConnectionPool::get_or_connect) probes a pooled
    /// connection neither used nor probed for longer than this before handing it out, and connects
    /// afresh if the probe fails. `None` (the default) hands pooled connections out unprobed.
    pub check_idle_before_use: Option<Duration>,
    /// Connections an address may have in each mode, under the global cap. At least 1. Default: 1.
    ///
    /// - Shared: [`get_or_connect`](crate::ConnectionPool::get_or_connect) keeps up to this many
    ///   connections of an address and hands out the least loaded; it opens another when every
    ///   one has [`busy_in_flight`](Self::busy_in_flight) calls in flight (I23).
    /// - Exclusive: [`checkout`](crate::ConnectionPool::checkout)'s connections of an address,
    ///   idle, checked out and connecting (I19).
    pub max_per_address: usize,
    /// Shared mode: a connection with at least this many calls in flight (started with
    /// [`begin`](crate::PooledConnection::begin) or [`call`](crate::ConnectionPool::call)) is busy;
    /// when every connection of an address is busy and `max_per_address` allows,
    /// `get_or_connect` connects another in the background. At least 1. Default: 1 (a second call
    /// at once asks for a second connection). A multiplexed protocol sets it higher.
    pub busy_in_flight: u64,
    /// How long [`checkout`](crate::ConnectionPool::checkout) waits in line for a connection
    /// (I16). `None` (the default) uses `connect_timeout`: a caller waits no longer for a free
    /// connection than it would for a new one.
    pub checkout_timeout: Option<Duration>,
    /// A checked-out connection older than this is closed when it comes back instead of being
    /// kept (an idle one past it is closed instead of being handed out). `None` (the default):
    /// connections live until evicted for another reason.
    pub max_lifetime: Option<Duration>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            max_idle: Some(Duration::from_secs(300)),
            health: HealthPolicy::default(),
            backoff: BackoffPolicy::default(),
            ejection: EjectionPolicy::default(),
            connect_timeout: Duration::from_secs(3),
            when_full: WhenFull::Reject,
            call_timeout: None,
            shard_amount: 32,
            probe_idle: None,
            probe_timeout: None,
            probe_concurrency: 16,
            check_idle_before_use: None,
            max_per_address: 1,
            busy_in_flight: 1,
            checkout_timeout: None,
            max_lifetime: None,
        }
    }
}

impl PoolConfig {
    /// Checks every field; the first problem found is returned.
    ///
    /// ```
    /// use keyed_pool::{ConfigError, PoolConfig};
    /// let mut config = PoolConfig::default();
    /// assert_eq!(config.validate(), Ok(()));
    /// config.health.failure_ratio = 1.5;
    /// assert_eq!(config.validate(), Err(ConfigError::FailureRatioOutOfRange { ratio: 1.5 }));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.health.validate()?;
        self.backoff.validate()?;
        self.ejection.validate()?;
        if self.connect_timeout < Duration::from_millis(1) {
            return Err(ConfigError::ConnectTimeoutTooShort {
                timeout: self.connect_timeout,
            });
        }
        if let Some(timeout) = self.call_timeout
            && timeout < Duration::from_millis(1)
        {
            return Err(ConfigError::CallTimeoutTooShort { timeout });
        }
        if !(2..=MAX_SHARDS).contains(&self.shard_amount) || !self.shard_amount.is_power_of_two() {
            return Err(ConfigError::BadShardAmount {
                shards: self.shard_amount,
            });
        }
        self.validate_probing()?;
        self.validate_checkout()
    }

    fn validate_checkout(&self) -> Result<(), ConfigError> {
        if self.max_per_address == 0 {
            return Err(ConfigError::ZeroMaxPerAddress);
        }
        if self.busy_in_flight == 0 {
            return Err(ConfigError::ZeroBusyInFlight);
        }
        if let Some(timeout) = self.checkout_timeout
            && timeout < Duration::from_millis(1)
        {
            return Err(ConfigError::CheckoutTimeoutTooShort { timeout });
        }
        if let Some(lifetime) = self.max_lifetime
            && lifetime < Duration::from_millis(1)
        {
            return Err(ConfigError::MaxLifetimeTooShort { lifetime });
        }
        Ok(())
    }

    /// How long a checkout waits: `checkout_timeout`, or else `connect_timeout`.
    pub(crate) fn effective_checkout_timeout(&self) -> Duration {
        self.checkout_timeout.unwrap_or(self.connect_timeout)
    }

    fn validate_probing(&self) -> Result<(), ConfigError> {
        let short = |setting, value: Option<Duration>| match value {
            Some(value) if value < Duration::from_millis(1) => {
                Err(ConfigError::ProbeIdleTooShort { setting, value })
            }
            _ => Ok(()),
        };
        short("probe_idle", self.probe_idle)?;
        short("check_idle_before_use", self.check_idle_before_use)?;
        if let (Some(probe_idle), Some(max_idle)) = (self.probe_idle, self.max_idle)
            && probe_idle >= max_idle
        {
            return Err(ConfigError::ProbeIdleNotBelowMaxIdle {
                probe_idle,
                max_idle,
            });
        }
        if let Some(timeout) = self.probe_timeout
            && timeout < Duration::from_millis(1)
        {
            return Err(ConfigError::ProbeTimeoutTooShort { timeout });
        }
        if self.probe_concurrency == 0 {
            return Err(ConfigError::ZeroProbeConcurrency);
        }
        Ok(())
    }

    /// The bound on one probe: `probe_timeout`, or else `connect_timeout`.
    pub(crate) fn effective_probe_timeout(&self) -> Duration {
        self.probe_timeout.unwrap_or(self.connect_timeout)
    }
}

/// `now + timeout`, or 30 years on when that overflows: any timeout of 1 ms or more is a valid
/// setting, and `Instant + Duration::MAX` panics.
pub(crate) fn deadline_after(now: tokio::time::Instant, timeout: Duration) -> tokio::time::Instant {
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}
