//! [`PooledConnection`], a shared handle to one pooled connection, and [`CallGuard`], the in-flight
//! guard of one call made through it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::time::Instant;

use crate::call::CallOutcome;
use crate::core::Verdict;
use crate::metrics::ConnectionMetrics;

/// The identity of one pooled connection, unique within its pool. Removal is conditional on it
/// (I14): removing `(addr, id₁)` never removes a successor `(addr, id₂)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub(crate) u64);

impl ConnId {
    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The part of a pooled connection that does not depend on its type: what a [`CallGuard`] and a
/// [`SharedMetrics`] need. It lives in the connection's one allocation, beside the connection.
///
/// In a fixed order (`repr(C)`), metrics first, as [`Entry`] puts this first: the metrics' hot
/// fields then sit on the cache line of the `Arc`'s counts (see [`ConnectionMetrics`]).
#[derive(Debug)]
#[repr(C)]
struct Shared {
    metrics: ConnectionMetrics,
    id: ConnId,
    addr: CheetahString,
}

/// One pooled connection: one allocation (issue 16: the handle, the guard's part and the metrics
/// were three, a cache miss each at 100,000 connections). `repr(C)`, the shared part first, so
/// that the metrics' hot fields follow the `Arc`'s counts on their cache line, whatever the size
/// of `C` (an allocation is 16-byte aligned, so the two share a line three times in four).
#[repr(C)]
struct Entry<C> {
    shared: Shared,
    conn: C,
}

/// The type-erased view of an [`Entry`], so a [`CallGuard`] and a [`SharedMetrics`] share the
/// connection's one allocation without naming its type (and without `unsafe`: the non-generic part
/// is reached through the vtable, not by a pointer cast).
trait HasShared: Send + Sync {
    fn shared(&self) -> &Shared;
}

impl<C: Send + Sync> HasShared for Entry<C> {
    fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// A shared handle to one connection's [`ConnectionMetrics`] (it dereferences to them), as
/// [`ConnectionPool::get_metrics`](crate::ConnectionPool::get_metrics) returns it. It shares the
/// connection's allocation, so while it lives the connection's value is not dropped (the pool
/// still closes it through the connector when it lets it go).
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::ZERO);
/// pool.insert("127.0.0.1:1", 1);
/// let metrics = pool.get_metrics("127.0.0.1:1").unwrap();
/// pool.get("127.0.0.1:1").unwrap().record_success(Duration::from_millis(1));
/// assert_eq!(metrics.success_count(), 1);
/// ```
#[derive(Clone)]
pub struct SharedMetrics {
    entry: Arc<dyn HasShared>,
}

impl std::ops::Deref for SharedMetrics {
    type Target = ConnectionMetrics;

    fn deref(&self) -> &ConnectionMetrics {
        &self.entry.shared().metrics
    }
}

impl fmt::Debug for SharedMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A cheap, cloneable handle to one pooled connection: the connection itself (shared, as a
/// multiplexed client is), its [`ConnId`], and its own [`ConnectionMetrics`].
///
/// Make each call through [`begin`](Self::begin), so the pool knows a call is in flight (and never
/// evicts the connection as idle meanwhile, I5) and learns its outcome and latency.
pub struct PooledConnection<C> {
    entry: Arc<Entry<C>>,
}

impl<C> Clone for PooledConnection<C> {
    fn clone(&self) -> Self {
        Self {
            entry: Arc::clone(&self.entry),
        }
    }
}

impl<C> fmt::Debug for PooledConnection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("addr", &self.entry.shared.addr)
            .field("id", &self.entry.shared.id)
            .field("in_flight", &self.entry.shared.metrics.in_flight())
            .field("healthy", &self.entry.shared.metrics.is_healthy())
            .finish_non_exhaustive()
    }
}

impl<C> PooledConnection<C> {
    pub(crate) fn new(
        id: ConnId,
        addr: CheetahString,
        conn: C,
        metrics: ConnectionMetrics,
    ) -> Self {
        Self {
            entry: Arc::new(Entry {
                shared: Shared { id, addr, metrics },
                conn,
            }),
        }
    }

    /// This connection's identity.
    pub fn id(&self) -> ConnId {
        self.entry.shared.id
    }

    /// The address it is pooled under.
    pub fn addr(&self) -> &CheetahString {
        &self.entry.shared.addr
    }

    /// The connection (named as in the original pool, which held RocketMQ clients).
    pub fn client(&self) -> &C {
        &self.entry.conn
    }

    /// This connection's metrics.
    pub fn metrics(&self) -> &ConnectionMetrics {
        &self.entry.shared.metrics
    }

    /// `false` once judged unhealthy or known closed; such a connection is never handed out again.
    pub fn is_healthy(&self) -> bool {
        self.entry.shared.metrics.is_healthy()
    }

    /// The idle predicate now: nothing in flight and unused for longer than `max_idle`.
    pub fn is_idle(&self, max_idle: Duration) -> bool {
        self.entry
            .shared
            .metrics
            .is_idle_at(Instant::now(), Some(max_idle))
    }

    /// Time since the connection was created.
    pub fn age(&self) -> Duration {
        Instant::now().saturating_duration_since(self.entry.shared.metrics.created_at())
    }

    /// Records a successful call of `latency` made without a [`CallGuard`].
    pub fn record_success(&self, latency: Duration) {
        let metrics = &self.entry.shared.metrics;
        metrics.record_success_at(metrics.now_for_use(), latency);
    }

    /// Records a failed call made without a [`CallGuard`]; returns the verdict after it.
    pub fn record_error(&self) -> Verdict {
        let metrics = &self.entry.shared.metrics;
        metrics.record_error_at(metrics.now_for_use())
    }

    /// Marks the transport closed: `get` never returns this connection again (I8), and the next
    /// health sweep removes it.
    pub fn mark_closed(&self) {
        self.entry.shared.metrics.mark_closed();
    }

    /// The default timeout of [`call`](Self::call) on this connection: the pool's
    /// [`call_timeout`](crate::PoolConfig::call_timeout) when the connection was made.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool = ConnectionPool::builder()
    ///     .call_timeout(Duration::from_millis(250))
    ///     .build::<&str>()
    ///     .unwrap();
    /// let conn = pool.try_insert("127.0.0.1:9876", "a client").unwrap();
    /// assert_eq!(conn.call_timeout(), Some(Duration::from_millis(250)));
    /// ```
    pub fn call_timeout(&self) -> Option<Duration> {
        self.entry.shared.metrics.call_timeout()
    }
}

impl<C: Send + Sync + 'static> PooledConnection<C> {
    /// A handle to this connection's metrics that outlives the borrow (see [`SharedMetrics`]).
    pub fn shared_metrics(&self) -> SharedMetrics {
        SharedMetrics {
            entry: Arc::clone(&self.entry) as Arc<dyn HasShared>,
        }
    }

    /// Starts a call by hand: the connection counts as in flight until the guard is finished with
    /// [`CallGuard::success`], [`CallGuard::failure`] or [`CallGuard::finish`], or dropped
    /// (cancelled: neither outcome is recorded, but the idle clock moves).
    ///
    /// A guard dropped unfinished (an early `return` or `?` between `begin` and `success`) is not
    /// a failure: the connection's health never sees it. It is counted
    /// ([`ConnectionMetrics::cancelled_count`]) and logged: at `debug` every time, and at `warn`
    /// the first time on each connection. Prefer [`ConnectionPool::call`](crate::ConnectionPool::call)
    /// or [`call`](Self::call), which record the outcome from the call's `Result`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::from_secs(60));
    /// assert!(pool.insert("127.0.0.1:9876", "a client"));
    /// let conn = pool.get("127.0.0.1:9876").unwrap();
    /// let call = conn.begin();
    /// assert_eq!(conn.metrics().in_flight(), 1);
    /// call.success();
    /// assert_eq!(conn.metrics().in_flight(), 0);
    /// assert_eq!(conn.metrics().success_count(), 1);
    ///
    /// // Dropped unfinished: cancelled, not failed (and logged).
    /// drop(conn.begin());
    /// assert_eq!(conn.metrics().cancelled_count(), 1);
    /// assert_eq!(conn.metrics().total_errors(), 0);
    /// # }
    /// ```
    pub fn begin(&self) -> CallGuard {
        self.start(false)
    }

    /// A guard whose cancellation is expected (the call API's: its caller dropped the call's
    /// future), so it is logged at `debug` only.
    pub(crate) fn begin_quiet(&self) -> CallGuard {
        self.start(true)
    }

    fn start(&self, quiet: bool) -> CallGuard {
        let started = self.entry.shared.metrics.now_for_use();
        self.entry.shared.metrics.call_started();
        CallGuard {
            entry: Arc::clone(&self.entry) as Arc<dyn HasShared>,
            started,
            finished: false,
            quiet,
        }
    }
}

/// One call in flight on a pooled connection. Finish it with [`success`](Self::success),
/// [`failure`](Self::failure) or [`finish`](Self::finish); dropping it unfinished counts the call
/// as cancelled, which the connection's health does not see, and logs it (see
/// [`PooledConnection::begin`]). It owns what it needs, so it can move into another task.
#[must_use = "a call guard dropped at once records a cancelled call"]
pub struct CallGuard {
    /// The connection's one allocation, type-erased: one `Arc` clone per call.
    entry: Arc<dyn HasShared>,
    started: Instant,
    finished: bool,
    quiet: bool,
}

impl fmt::Debug for CallGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.entry.shared();
        f.debug_struct("CallGuard")
            .field("addr", &shared.addr)
            .field("id", &shared.id)
            .field("started", &self.started)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl CallGuard {
    fn shared(&self) -> &Shared {
        self.entry.shared()
    }

    /// When the call started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The call succeeded; its latency is the time since [`PooledConnection::begin`].
    pub fn success(self) {
        self.finish(CallOutcome::Success);
    }

    /// The call failed; returns the connection's verdict after it.
    pub fn failure(self) -> Verdict {
        self.finish(CallOutcome::Failure)
    }

    /// Finishes the call with `outcome`: as [`success`](Self::success) or
    /// [`failure`](Self::failure) would, or, for [`CallOutcome::Neither`], counted as cancelled
    /// without the warning of a guard dropped unfinished (the outcome says nothing about the
    /// server). Returns the connection's health verdict after it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::{CallOutcome, ConnectionPool};
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::ZERO);
    /// let conn = pool.try_insert("127.0.0.1:9876", "a client").unwrap();
    /// conn.begin().finish(CallOutcome::Failure);
    /// conn.begin().finish(CallOutcome::Neither);
    /// assert_eq!(conn.metrics().total_errors(), 1);
    /// assert_eq!(conn.metrics().cancelled_count(), 1);
    /// ```
    pub fn finish(mut self, outcome: CallOutcome) -> Verdict {
        let metrics = &self.shared().metrics;
        let now = metrics.now_for_use();
        let verdict = match outcome {
            CallOutcome::Failure => metrics.record_error_at(now),
            CallOutcome::Success => {
                metrics.record_success_at(now, now.saturating_duration_since(self.started));
                latched(metrics)
            }
            CallOutcome::Neither => {
                metrics.record_cancelled_at(now);
                latched(metrics)
            }
        };
        self.end();
        verdict
    }

    /// The connection's address.
    pub(crate) fn addr(&self) -> &CheetahString {
        &self.shared().addr
    }

    /// The connection's id.
    pub(crate) fn conn_id(&self) -> ConnId {
        self.shared().id
    }

    fn end(&mut self) {
        self.finished = true;
        self.shared().metrics.call_ended();
    }
}

/// The health verdict latched so far (a closed transport is not a health verdict).
fn latched(metrics: &ConnectionMetrics) -> Verdict {
    match metrics.unusable_reason() {
        Some(reason) if reason != crate::core::UnhealthyReason::Closed => {
            Verdict::Unhealthy(reason)
        }
        _ => Verdict::Healthy,
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let now = self.shared().metrics.now_for_use();
        self.shared().metrics.record_cancelled_at(now);
        self.shared().metrics.call_ended();
        let (addr, conn) = (&self.shared().addr, self.shared().id);
        // The first unfinished guard of a connection is worth a warning (a `?` between `begin` and
        // `success` hides every failure from health eviction); the rest would flood the log.
        let first = !self.quiet && self.shared().metrics.first_unfinished();
        if first {
            tracing::warn!(
                addr = %addr,
                conn = %conn,
                "a call guard was dropped without success() or failure(): counted as cancelled, \
                 which health eviction does not see; use pool.call() or finish the guard (further \
                 ones on this connection are logged at debug)"
            );
        } else if self.quiet {
            tracing::debug!(addr = %addr, conn = %conn, "call cancelled: its caller dropped it");
        } else {
            tracing::debug!(addr = %addr, conn = %conn, "call cancelled: its guard was dropped unfinished");
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::mem::offset_of;

    use super::{Entry, Shared};

    /// Issue 16's layout: the metrics open the connection's allocation, right after the `Arc`'s
    /// counts, so their hot fields share that cache line
    /// (`metrics::tests::the_hot_fields_come_first`).
    #[test]
    fn the_metrics_open_the_entry() {
        assert_eq!(offset_of!(Entry<[u64; 3]>, shared), 0);
        assert_eq!(offset_of!(Shared, metrics), 0);
    }
}
