//! Lock-free metrics: per connection ([`ConnectionMetrics`]) and pool-wide ([`PoolStats`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::core::{HealthPolicy, HealthWindow, UnhealthyReason, Verdict, is_idle};

/// Set in `state` while an idle sweep holds a connection, and forever once it evicted it.
const RETIRED: u64 = 1 << 63;
const IN_FLIGHT_MASK: u64 = RETIRED - 1;

const FLAG_UNHEALTHY: u8 = 1;
const FLAG_CLOSED: u8 = 2;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The metrics and health state of **one** connection (I13): a replaced connection's successor
/// starts from zero, and results recorded against the old one never reach it.
///
/// Every field is an atomic; recording never takes a lock. Latencies are kept in microseconds;
/// [`avg_latency`](Self::avg_latency) divides by successful calls only, [`error_rate`](Self::error_rate)
/// by all finished calls. Time is measured on the runtime's clock (virtual under madsim and under
/// tokio's paused time), relative to the connection's creation.
#[derive(Debug)]
pub struct ConnectionMetrics {
    created_at: Instant,
    /// The pool's policy, shared by all its connections (not copied into each).
    health: Arc<HealthPolicy>,
    /// Nanoseconds since `created_at` of the last use; only moves forward. Exact (not rounded to
    /// microseconds), so the idle edge is exact: at `max_idle` after a use a connection is fresh.
    last_used_ns: AtomicU64,
    /// `RETIRED` bit | calls in flight. One word, so an idle sweep's claim and a call's start are
    /// ordered against each other (I5).
    state: AtomicU64,
    flags: AtomicU8,
    consecutive_errors: AtomicU32,
    successes: AtomicU64,
    errors: AtomicU64,
    cancelled: AtomicU64,
    latency_sum_us: AtomicU64,
    latency_max_us: AtomicU64,
    window: HealthWindow,
}

impl ConnectionMetrics {
    /// Fresh metrics for a connection created at `created_at`, judged by `health` (a policy, or
    /// one shared by many connections as the pool does).
    pub fn new(created_at: Instant, health: impl Into<Arc<HealthPolicy>>) -> Self {
        Self {
            created_at,
            health: health.into(),
            last_used_ns: AtomicU64::new(0),
            state: AtomicU64::new(0),
            flags: AtomicU8::new(0),
            consecutive_errors: AtomicU32::new(0),
            successes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            latency_sum_us: AtomicU64::new(0),
            latency_max_us: AtomicU64::new(0),
            window: HealthWindow::default(),
        }
    }

    fn elapsed_us(&self, now: Instant) -> u64 {
        micros(now.saturating_duration_since(self.created_at))
    }

    /// Moves the idle clock to `now` (never backwards).
    pub fn touch(&self, now: Instant) {
        let ns = u64::try_from(now.saturating_duration_since(self.created_at).as_nanos())
            .unwrap_or(u64::MAX);
        self.last_used_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Records a successful call that took `latency`, finished at `now`.
    pub fn record_success_at(&self, now: Instant, latency: Duration) {
        let us = micros(latency);
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        // Read before writing: on the hot path most calls change neither, and a write would move
        // the cache line between cores for nothing.
        if us > self.latency_max_us.load(Ordering::Relaxed) {
            self.latency_max_us.fetch_max(us, Ordering::Relaxed);
        }
        // A failure racing between the load and here is ordered after this success, so skipping
        // the store when the run is already 0 keeps I10 exact.
        if self.consecutive_errors.load(Ordering::Acquire) != 0 {
            self.consecutive_errors.store(0, Ordering::Release);
        }
        self.window
            .record(self.health.window, self.elapsed_us(now), true);
        self.touch(now);
    }

    /// Records a failed call finished at `now`; returns the verdict after it. An unhealthy verdict
    /// is latched: the connection stays unhealthy whatever comes after (I9).
    pub fn record_error_at(&self, now: Instant) -> Verdict {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let run = self
            .consecutive_errors
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let elapsed = self.elapsed_us(now);
        self.window.record(self.health.window, elapsed, false);
        self.touch(now);
        let verdict = self
            .health
            .verdict(run, self.window.counts(self.health.window, elapsed));
        if verdict.is_unhealthy() {
            self.flags.fetch_or(FLAG_UNHEALTHY, Ordering::AcqRel);
        }
        verdict
    }

    /// Marks the transport as closed: the connection is never handed out again (I8) and the next
    /// health sweep removes it.
    pub fn mark_closed(&self) {
        self.flags.fetch_or(FLAG_CLOSED, Ordering::AcqRel);
    }

    /// Why the connection is unusable, if it is: a latched unhealthy verdict or a closed transport.
    pub fn unusable_reason(&self, now: Instant) -> Option<UnhealthyReason> {
        let flags = self.flags.load(Ordering::Acquire);
        if flags & FLAG_CLOSED != 0 {
            return Some(UnhealthyReason::Closed);
        }
        if flags & FLAG_UNHEALTHY != 0 {
            return match self.health.verdict(
                self.consecutive_errors(),
                self.window.counts(self.health.window, self.elapsed_us(now)),
            ) {
                Verdict::Unhealthy(reason) => Some(reason),
                // Latched earlier; the evidence has since slid out of the window.
                Verdict::Healthy => Some(UnhealthyReason::FailureRatio {
                    failures: 0,
                    total: 0,
                }),
            };
        }
        None
    }

    /// `true` unless the connection was judged unhealthy or its transport is known closed.
    pub fn is_healthy(&self) -> bool {
        self.flags.load(Ordering::Acquire) == 0
    }

    /// `true` once the transport was marked closed.
    pub fn is_closed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAG_CLOSED != 0
    }

    /// The idle predicate at `now` (I5): nothing in flight and unused for longer than `max_idle`.
    pub fn is_idle_at(&self, now: Instant, max_idle: Option<Duration>) -> bool {
        is_idle(self.in_flight(), self.since_last_use(now), max_idle)
    }

    /// Claims the connection for eviction as idle, atomically with respect to calls starting (I5):
    /// succeeds only if no call is in flight and it is idle at `now`. On success the connection
    /// stays marked retired.
    pub(crate) fn try_retire_idle(&self, now: Instant, max_idle: Option<Duration>) -> bool {
        if self
            .state
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // Read the clock only after the claim: a call that finished before the claim has moved it.
        if is_idle(0, self.since_last_use(now), max_idle) {
            true
        } else {
            self.state.fetch_and(!RETIRED, Ordering::AcqRel);
            false
        }
    }

    /// Claims the connection for eviction if no call is in flight, whatever its idle clock (to make
    /// room under `WhenFull::EvictLeastRecentlyUsed`). Stays marked retired.
    pub(crate) fn try_retire_unused(&self) -> bool {
        self.state
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A call starts.
    pub(crate) fn call_started(&self, now: Instant) {
        self.touch(now);
        self.state.fetch_add(1, Ordering::AcqRel);
    }

    /// A call ends (after its outcome was recorded, so the idle clock has moved first).
    pub(crate) fn call_ended(&self) {
        self.state.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn record_cancelled_at(&self, now: Instant) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.touch(now);
    }

    /// When the connection was created.
    pub fn created_at(&self) -> Instant {
        self.created_at
    }

    /// When the connection was last used (`get`, a call, or a recorded result).
    pub fn last_used(&self) -> Instant {
        self.created_at + Duration::from_nanos(self.last_used_ns.load(Ordering::Acquire))
    }

    /// Time since the last use, at `now`.
    pub fn since_last_use(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_used())
    }

    /// Calls in flight (begun with [`PooledConnection::begin`](crate::PooledConnection::begin), not
    /// yet finished or dropped).
    pub fn in_flight(&self) -> u64 {
        self.state.load(Ordering::Acquire) & IN_FLIGHT_MASK
    }

    /// Finished calls: successes plus errors (cancelled calls are not counted).
    pub fn request_count(&self) -> u64 {
        self.success_count() + self.total_errors()
    }

    /// Successful calls.
    pub fn success_count(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// Failed calls.
    pub fn total_errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Calls dropped before they finished.
    pub fn cancelled_count(&self) -> u64 {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Length of the trailing run of failures (I10).
    pub fn consecutive_errors(&self) -> u32 {
        self.consecutive_errors.load(Ordering::Acquire)
    }

    /// Mean latency of successful calls; zero before the first.
    pub fn avg_latency(&self) -> Duration {
        let n = self.success_count();
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.latency_sum_us.load(Ordering::Relaxed) / n)
    }

    /// Highest latency of a successful call.
    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.latency_max_us.load(Ordering::Relaxed))
    }

    /// Errors over finished calls, in `[0, 1]`; zero before the first.
    pub fn error_rate(&self) -> f64 {
        let total = self.request_count();
        if total == 0 {
            0.0
        } else {
            self.total_errors() as f64 / total as f64
        }
    }

    /// `(successes, failures)` in the health window ending at `now`.
    pub fn window_counts(&self, now: Instant) -> (u64, u64) {
        self.window.counts(self.health.window, self.elapsed_us(now))
    }
}

/// Why a connection left the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EvictionReason {
    /// Unused for longer than `max_idle` with no call in flight.
    Idle,
    /// Judged unhealthy by its failures.
    Unhealthy,
    /// Its transport was found closed.
    Closed,
    /// Another connection was inserted for its address.
    Replaced,
    /// Removed by the user (`remove`, `remove_connection`, `clear`) or to make room under
    /// [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed).
    Manual,
}

impl EvictionReason {
    /// A short lowercase name, as used in tracing events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Unhealthy => "unhealthy",
            Self::Closed => "closed",
            Self::Replaced => "replaced",
            Self::Manual => "manual",
        }
    }
}

/// Pool-wide counters, monotonic over the pool's life.
#[derive(Debug, Default)]
pub(crate) struct PoolCounters {
    pub evicted_idle: AtomicU64,
    pub evicted_unhealthy: AtomicU64,
    pub evicted_closed: AtomicU64,
    pub evicted_replaced: AtomicU64,
    pub evicted_manual: AtomicU64,
    pub rejected_capacity: AtomicU64,
    pub connects_attempted: AtomicU64,
    pub connects_succeeded: AtomicU64,
    pub connects_failed: AtomicU64,
    pub connects_timed_out: AtomicU64,
    pub connects_shared: AtomicU64,
    pub backoff_rejections: AtomicU64,
}

impl PoolCounters {
    pub(crate) fn evicted(&self, reason: EvictionReason) {
        let counter = match reason {
            EvictionReason::Idle => &self.evicted_idle,
            EvictionReason::Unhealthy => &self.evicted_unhealthy,
            EvictionReason::Closed => &self.evicted_closed,
            EvictionReason::Replaced => &self.evicted_replaced,
            EvictionReason::Manual => &self.evicted_manual,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Evictions by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionStats {
    /// See [`EvictionReason::Idle`].
    pub idle: u64,
    /// See [`EvictionReason::Unhealthy`].
    pub unhealthy: u64,
    /// See [`EvictionReason::Closed`].
    pub closed: u64,
    /// See [`EvictionReason::Replaced`].
    pub replaced: u64,
    /// See [`EvictionReason::Manual`].
    pub manual: u64,
}

impl EvictionStats {
    /// All evictions.
    pub fn total(&self) -> u64 {
        self.idle + self.unhealthy + self.closed + self.replaced + self.manual
    }
}

/// Connect outcomes of [`ConnectionPool::get_or_connect`](crate::ConnectionPool::get_or_connect).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectStats {
    /// Connects started (one per flight).
    pub attempted: u64,
    /// Connects that produced a pooled connection.
    pub succeeded: u64,
    /// Connects the connector failed.
    pub failed: u64,
    /// Connects cut off by the connect timeout.
    pub timed_out: u64,
    /// Callers that joined a connect already in flight instead of starting one (I4).
    pub shared: u64,
    /// Callers turned away because their address was backing off (I12).
    pub backoff_rejections: u64,
}

/// A snapshot of the pool. The per-connection sums cover the connections live at the time of the
/// call; the counters cover the pool's whole life.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Live connections.
    pub total: usize,
    /// Live connections neither unhealthy nor closed.
    pub healthy: usize,
    /// Live connections that are idle now.
    pub idle: usize,
    /// Calls in flight over all live connections.
    pub in_flight: u64,
    /// Slots held by connects in flight.
    pub reserved: usize,
    /// The configured cap; `0` = unlimited.
    pub max_connections: usize,
    /// Finished calls over all live connections.
    pub total_requests: u64,
    /// Failed calls over all live connections.
    pub total_errors: u64,
    /// Evictions by reason.
    pub evictions: EvictionStats,
    /// Inserts and connects refused because the pool was full.
    pub rejected_capacity: u64,
    /// Connect outcomes.
    pub connects: ConnectStats,
}

impl PoolStats {
    /// `total / max_connections`; zero for an unlimited pool.
    pub fn utilization(&self) -> f64 {
        if self.max_connections == 0 {
            0.0
        } else {
            self.total as f64 / self.max_connections as f64
        }
    }

    /// `total_errors / total_requests`; zero before any request.
    pub fn error_rate(&self) -> f64 {
        if self.total_requests == 0 {
            0.0
        } else {
            self.total_errors as f64 / self.total_requests as f64
        }
    }

    /// Live connections that are not idle.
    pub fn active(&self) -> usize {
        self.total.saturating_sub(self.idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the simulation (idle-edge, every seed): the idle clock rounded a use down to whole
    /// microseconds, so a connection used exactly `max_idle` ago looked idle.
    #[test]
    fn i5_the_idle_clock_is_exact_below_a_microsecond() {
        let t0 = Instant::now();
        let max_idle = Some(Duration::from_secs(10));
        let m = ConnectionMetrics::new(t0, HealthPolicy::default());
        let used = t0 + Duration::from_nanos(1_500);
        m.touch(used);
        assert_eq!(m.last_used(), used);
        let edge = used + Duration::from_secs(10);
        assert!(
            !m.is_idle_at(edge, max_idle),
            "I5 violated at exactly max_idle"
        );
        assert!(
            !m.try_retire_idle(edge, max_idle),
            "I5 violated by the claim"
        );
        assert!(
            m.is_idle_at(edge + Duration::from_nanos(1), max_idle),
            "I6: 1 ns past is idle"
        );
    }
}
