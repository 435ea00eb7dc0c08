//! [`PooledConnection`], a shared handle to one pooled connection, and [`CallGuard`], the in-flight
//! guard of one call made through it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::time::Instant;

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

struct Entry<C> {
    id: ConnId,
    addr: CheetahString,
    metrics: Arc<ConnectionMetrics>,
    conn: C,
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
            .field("addr", &self.entry.addr)
            .field("id", &self.entry.id)
            .field("in_flight", &self.entry.metrics.in_flight())
            .field("healthy", &self.entry.metrics.is_healthy())
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
                id,
                addr,
                metrics: Arc::new(metrics),
                conn,
            }),
        }
    }

    /// This connection's identity.
    pub fn id(&self) -> ConnId {
        self.entry.id
    }

    /// The address it is pooled under.
    pub fn addr(&self) -> &CheetahString {
        &self.entry.addr
    }

    /// The connection (named as in the original pool, which held RocketMQ clients).
    pub fn client(&self) -> &C {
        &self.entry.conn
    }

    /// This connection's metrics.
    pub fn metrics(&self) -> &Arc<ConnectionMetrics> {
        &self.entry.metrics
    }

    /// `false` once judged unhealthy or known closed; such a connection is never handed out again.
    pub fn is_healthy(&self) -> bool {
        self.entry.metrics.is_healthy()
    }

    /// The idle predicate now: nothing in flight and unused for longer than `max_idle`.
    pub fn is_idle(&self, max_idle: Duration) -> bool {
        self.entry
            .metrics
            .is_idle_at(Instant::now(), Some(max_idle))
    }

    /// Time since the connection was created.
    pub fn age(&self) -> Duration {
        Instant::now().saturating_duration_since(self.entry.metrics.created_at())
    }

    /// Records a successful call of `latency` made without a [`CallGuard`].
    pub fn record_success(&self, latency: Duration) {
        self.entry
            .metrics
            .record_success_at(Instant::now(), latency);
    }

    /// Records a failed call made without a [`CallGuard`]; returns the verdict after it.
    pub fn record_error(&self) -> Verdict {
        self.entry.metrics.record_error_at(Instant::now())
    }

    /// Marks the transport closed: `get` never returns this connection again (I8), and the next
    /// health sweep removes it.
    pub fn mark_closed(&self) {
        self.entry.metrics.mark_closed();
    }

    /// Starts a call: the connection counts as in flight until the guard is finished with
    /// [`CallGuard::success`] or [`CallGuard::failure`], or dropped (cancelled: neither outcome is
    /// recorded, but the idle clock moves).
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
    /// # }
    /// ```
    pub fn begin(&self) -> CallGuard {
        let started = Instant::now();
        self.entry.metrics.call_started(started);
        CallGuard {
            metrics: Arc::clone(&self.entry.metrics),
            started,
            finished: false,
        }
    }
}

/// One call in flight on a pooled connection. Finish it with [`success`](Self::success) or
/// [`failure`](Self::failure); dropping it unfinished counts the call as cancelled. It owns what it
/// needs, so it can move into another task.
#[must_use = "a call guard dropped at once records a cancelled call"]
#[derive(Debug)]
pub struct CallGuard {
    metrics: Arc<ConnectionMetrics>,
    started: Instant,
    finished: bool,
}

impl CallGuard {
    /// When the call started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The call succeeded; its latency is the time since [`PooledConnection::begin`].
    pub fn success(mut self) {
        let now = Instant::now();
        self.metrics
            .record_success_at(now, now.saturating_duration_since(self.started));
        self.finish();
    }

    /// The call failed; returns the connection's verdict after it.
    pub fn failure(mut self) -> Verdict {
        let verdict = self.metrics.record_error_at(Instant::now());
        self.finish();
        verdict
    }

    fn finish(&mut self) {
        self.finished = true;
        self.metrics.call_ended();
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.record_cancelled_at(Instant::now());
            self.metrics.call_ended();
        }
    }
}
