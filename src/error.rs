use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;

/// A shareable error cause: one connect's error is handed to every caller that waited on it.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Why the pool could not hand out a connection.
///
/// Cheap to clone: every caller that shared one connect receives the same error (I4).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Every slot is taken by a live connection or a connect in flight, and the pool's
    /// [`WhenFull`](crate::WhenFull) policy found nothing to make room with.
    #[error("pool is at capacity ({max} connections)")]
    AtCapacity {
        /// The configured maximum.
        max: usize,
    },
    /// The address failed recently and is backing off (I12): no connect is made before
    /// `retry_after` has passed.
    #[error("{addr} is backing off after {failures} failure(s); retry in {retry_after:?}: {cause}")]
    Backoff {
        /// The address.
        addr: CheetahString,
        /// Time left until the next connect may be attempted.
        retry_after: Duration,
        /// Consecutive failures of the address so far.
        failures: u32,
        /// The last failure.
        cause: Cause,
    },
    /// The connector failed to connect.
    #[error("connect to {addr} failed: {cause}")]
    Connect {
        /// The address.
        addr: CheetahString,
        /// The connector's error.
        #[source]
        cause: Cause,
    },
    /// The connector did not finish within the connect timeout (I16).
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address.
        addr: CheetahString,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// The address is malformed; no connect was attempted.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: CheetahString,
        /// What is wrong with it.
        reason: String,
    },
    /// The pool was closed with [`ConnectionPool::close`](crate::ConnectionPool::close).
    #[error("the pool is closed")]
    Closed,
}

/// A configuration that makes no sense. Returned by
/// [`PoolBuilder::build`](crate::PoolBuilder::build); the pool never panics on its config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `failure_ratio` must be in `(0, 1]`.
    #[error("failure ratio {ratio} is not in (0, 1]")]
    FailureRatioOutOfRange {
        /// The value given.
        ratio: f64,
    },
    /// The health window must be at least 1 ms.
    #[error("health window {window:?} is shorter than 1 ms")]
    WindowTooShort {
        /// The value given.
        window: Duration,
    },
    /// `min_requests` must be at least 1.
    #[error("the minimum request volume of the failure-ratio detector must be at least 1")]
    ZeroMinRequests,
    /// The backoff base must be at least 1 ms.
    #[error("backoff base {base:?} is shorter than 1 ms")]
    BackoffBaseTooSmall {
        /// The value given.
        base: Duration,
    },
    /// The backoff cap must not be below its base.
    #[error("backoff cap {max:?} is below its base {base:?}")]
    BackoffMaxBelowBase {
        /// The base given.
        base: Duration,
        /// The cap given.
        max: Duration,
    },
    /// The backoff multiplier must be in `[1, 16]`.
    #[error("backoff multiplier {multiplier} is not in [1, 16]")]
    MultiplierOutOfRange {
        /// The value given.
        multiplier: f64,
    },
    /// The ejection decay interval must be at least 1 ms.
    #[error("ejection decay interval {interval:?} is shorter than 1 ms")]
    DecayIntervalTooShort {
        /// The value given.
        interval: Duration,
    },
    /// Jitter must be in `[0, 1)`.
    #[error("backoff jitter {jitter} is not in [0, 1)")]
    JitterOutOfRange {
        /// The value given.
        jitter: f64,
    },
    /// The connect timeout must be at least 1 ms.
    #[error("connect timeout {timeout:?} is shorter than 1 ms")]
    ConnectTimeoutTooShort {
        /// The value given.
        timeout: Duration,
    },
    /// The cleanup interval must be at least 1 ms.
    #[error("cleanup interval {interval:?} is shorter than 1 ms")]
    IntervalTooShort {
        /// The value given.
        interval: Duration,
    },
    /// The shard amount must be a power of two in `2..=4096`.
    #[error("shard amount {shards} is not a power of two in 2..=4096")]
    BadShardAmount {
        /// The value given.
        shards: usize,
    },
}
