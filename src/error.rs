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
    #[error(
        "pool is at capacity (max {max}): {}, {connecting} connecting",
        count(*live as u64, "live connection")
    )]
    AtCapacity {
        /// The configured maximum.
        max: usize,
        /// Slots held by live connections when the request was refused.
        live: usize,
        /// Slots reserved by connects in flight when the request was refused (they count against
        /// the maximum until their connect ends).
        connecting: usize,
    },
    /// The address failed recently and is backing off (I12): no connect is made before
    /// `retry_after` has passed.
    #[error(
        "{addr} is backing off after {}; retry in {}",
        count(u64::from(*failures), "failure"),
        human(*retry_after)
    )]
    Backoff {
        /// The address.
        addr: CheetahString,
        /// Time left until the next connect may be attempted.
        retry_after: Duration,
        /// The address's ejection count (see
        /// [`ConnectionPool::ejection_count`](crate::ConnectionPool::ejection_count)).
        failures: u32,
        /// The last failure (also the error's `source()`).
        #[source]
        cause: Cause,
    },
    /// The connector failed to connect.
    #[error("connect to {addr} failed")]
    Connect {
        /// The address.
        addr: CheetahString,
        /// The connector's error.
        #[source]
        cause: Cause,
    },
    /// The connector did not finish within the connect timeout (I16).
    #[error("connect to {addr} timed out after {}", human(*timeout))]
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

impl PoolError {
    /// The error behind this one, if there is one: the connector's error for
    /// [`Connect`](Self::Connect), the last failure for [`Backoff`](Self::Backoff).
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            Self::Connect { cause, .. } | Self::Backoff { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// The connector's own error, typed, if this error (or the failure behind a backoff) carries
    /// one of type `E`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keyed_pool::PoolError;
    /// let err = PoolError::Connect {
    ///     addr: "127.0.0.1:1".into(),
    ///     cause: Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
    /// };
    /// let io = err.connector_error::<std::io::Error>().expect("an io::Error");
    /// assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    /// assert_eq!(err.to_string(), "connect to 127.0.0.1:1 failed");
    /// ```
    pub fn connector_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let cause: &(dyn std::error::Error + 'static) = self.cause()?.as_ref();
        cause.downcast_ref::<E>()
    }
}

/// `n` and the noun, singular or plural: "1 connection", "3 connections".
pub(crate) fn count(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// A duration for people: "750 µs", "828 ms", "1.2 s", "2 min 5 s".
pub(crate) fn human(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 1_000 {
        format!("{micros} µs")
    } else if micros < 1_000_000 {
        format!("{} ms", (micros + 500) / 1_000)
    } else if d < Duration::from_secs(60) {
        let tenths = (micros + 50_000) / 100_000;
        if tenths.is_multiple_of(10) {
            format!("{} s", tenths / 10)
        } else {
            format!("{}.{} s", tenths / 10, tenths % 10)
        }
    } else {
        let secs = d.as_secs();
        match secs % 60 {
            0 => format!("{} min", secs / 60),
            s => format!("{} min {s} s", secs / 60),
        }
    }
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
    /// The call timeout, when set, must be at least 1 ms.
    #[error("call timeout {timeout:?} is shorter than 1 ms")]
    CallTimeoutTooShort {
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
    /// `probe_idle` and `check_idle_before_use` must be at least 1 ms.
    #[error("{setting} {value:?} is shorter than 1 ms")]
    ProbeIdleTooShort {
        /// Which setting.
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// `probe_idle` must be below `max_idle`, or no connection would live long enough to be probed.
    #[error(
        "probe_idle {probe_idle:?} is not below max_idle {max_idle:?}: nothing would be probed"
    )]
    ProbeIdleNotBelowMaxIdle {
        /// The `probe_idle` given.
        probe_idle: Duration,
        /// The `max_idle` given.
        max_idle: Duration,
    },
    /// The probe timeout must be at least 1 ms.
    #[error("probe timeout {timeout:?} is shorter than 1 ms")]
    ProbeTimeoutTooShort {
        /// The value given.
        timeout: Duration,
    },
    /// At least one probe must be allowed at a time.
    #[error("probe concurrency must be at least 1")]
    ZeroProbeConcurrency,
    /// `max_per_address` must be at least 1.
    #[error("max_per_address must be at least 1")]
    ZeroMaxPerAddress,
    /// `busy_in_flight` must be at least 1 (a connection with no call in flight is not busy).
    #[error("busy_in_flight must be at least 1")]
    ZeroBusyInFlight,
    /// The checkout timeout, when set, must be at least 1 ms.
    #[error("checkout timeout {timeout:?} is shorter than 1 ms")]
    CheckoutTimeoutTooShort {
        /// The value given.
        timeout: Duration,
    },
    /// `max_lifetime`, when set, must be at least 1 ms.
    #[error("max lifetime {lifetime:?} is shorter than 1 ms")]
    MaxLifetimeTooShort {
        /// The value given.
        lifetime: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let ms = Duration::from_millis;
        assert_eq!(human(Duration::from_micros(750)), "750 µs");
        assert_eq!(human(Duration::from_nanos(827_749_772)), "828 ms");
        assert_eq!(human(ms(1_000)), "1 s");
        assert_eq!(human(ms(1_249)), "1.2 s");
        assert_eq!(human(ms(59_960)), "60 s");
        assert_eq!(human(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(human(Duration::from_secs(120)), "2 min");
    }

    #[test]
    fn counts_are_singular_or_plural() {
        assert_eq!(count(1, "failure"), "1 failure");
        assert_eq!(count(3, "failure"), "3 failures");
        assert_eq!(count(0, "connection"), "0 connections");
    }

    #[test]
    fn the_cause_appears_once_in_the_chain() {
        use std::error::Error;
        let io = std::io::Error::other("Connection refused (os error 111)");
        let connect = PoolError::Connect {
            addr: "a:1".into(),
            cause: Arc::new(io),
        };
        let backoff = PoolError::Backoff {
            addr: "a:1".into(),
            retry_after: Duration::from_millis(827),
            failures: 1,
            cause: Arc::new(connect.clone()),
        };
        let mut chain = vec![backoff.to_string()];
        let mut next = backoff.source();
        while let Some(err) = next {
            chain.push(err.to_string());
            next = err.source();
        }
        assert_eq!(
            chain,
            [
                "a:1 is backing off after 1 failure; retry in 827 ms",
                "connect to a:1 failed",
                "Connection refused (os error 111)"
            ]
        );
    }
}
