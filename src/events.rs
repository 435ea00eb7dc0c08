//! [`PoolEvents`]: a hook the user implements to hear what the pool does to its addresses
//! (connects, failed connects, evictions with their reason, backoffs, `mark_up`), set with
//! [`PoolBuilder::events`](crate::PoolBuilder::events).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::connection::ConnId;
use crate::error::PoolError;
use crate::metrics::EvictionReason;

/// What the pool tells a user-supplied observer. Every method has a no-op default: implement the
/// ones you need.
///
/// # Rules for the hooks
/// The pool calls a hook at the one place the event is decided, which is often **under the
/// address's entry lock** (the same rule as [`Connector::close`](crate::Connector::close)). So a
/// hook must:
/// - be quick and never block or await (count, log, send on an unbounded or `try_send` channel);
/// - **never call back into the pool** (`get`, `insert`, `stats`, …): an operation on an address of
///   the same shard would wait for the lock the hook runs under, forever;
/// - not panic (the operation it reports would be left half-done).
///
/// Hooks run on whichever task made the event happen (a caller, a connect task, the cleanup task),
/// possibly on several threads at once.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use keyed_pool::{ConnId, ConnectionPool, EvictionReason, PoolEvents};
///
/// #[derive(Default)]
/// struct Evictions(AtomicU64);
///
/// impl PoolEvents for Evictions {
///     fn on_evict(&self, _addr: &str, _id: ConnId, _reason: EvictionReason) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
///
/// let seen = Arc::new(Evictions::default());
/// let pool = ConnectionPool::builder().events(Arc::clone(&seen)).build::<u32>().unwrap();
/// pool.insert("127.0.0.1:1", 1);
/// pool.insert("127.0.0.1:1", 2); // replaces the first
/// assert_eq!(seen.0.load(Ordering::Relaxed), 1);
/// ```
pub trait PoolEvents: Send + Sync + 'static {
    /// A connect made connection `id` for `addr`, and it is pooled (called under the entry lock).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Mutex;
    /// use keyed_pool::{ConnId, ConnectionPool, Connector, PoolEvents};
    ///
    /// struct Accepts;
    /// impl Connector for Accepts {
    ///     type Conn = ();
    ///     type Error = std::io::Error;
    ///     async fn connect(&self, _addr: &str) -> std::io::Result<()> { Ok(()) }
    /// }
    /// struct Log(Mutex<Vec<String>>);
    /// impl PoolEvents for Log {
    ///     fn on_connect(&self, addr: &str, id: ConnId) {
    ///         self.0.lock().unwrap().push(format!("{addr} {id}"));
    ///     }
    /// }
    /// let log = std::sync::Arc::new(Log(Mutex::new(Vec::new())));
    /// let pool = ConnectionPool::builder().connector(Accepts).events(log.clone()).build().unwrap();
    /// let conn = pool.get_or_connect("127.0.0.1:6379").await.unwrap();
    /// assert_eq!(*log.0.lock().unwrap(), [format!("127.0.0.1:6379 {}", conn.id())]);
    /// # }
    /// ```
    fn on_connect(&self, addr: &str, id: ConnId) {
        let _ = (addr, id);
    }

    /// A connect for `addr` failed or timed out: `error` is what its callers get
    /// ([`PoolError::Connect`] or [`PoolError::ConnectTimeout`]). Called under the entry lock,
    /// before the [`on_backoff`](Self::on_backoff) it causes. A connect abandoned because the pool
    /// is closing is not reported.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use keyed_pool::{ConnectionPool, Connector, PoolError, PoolEvents};
    ///
    /// struct Refused;
    /// impl Connector for Refused {
    ///     type Conn = ();
    ///     type Error = std::io::Error;
    ///     async fn connect(&self, _addr: &str) -> std::io::Result<()> {
    ///         Err(std::io::ErrorKind::ConnectionRefused.into())
    ///     }
    /// }
    /// struct Failures(AtomicU64);
    /// impl PoolEvents for Failures {
    ///     fn on_connect_failed(&self, _addr: &str, error: &PoolError) {
    ///         assert!(matches!(error, PoolError::Connect { .. }));
    ///         self.0.fetch_add(1, Ordering::Relaxed);
    ///     }
    /// }
    /// let failures = Arc::new(Failures(AtomicU64::new(0)));
    /// let pool = ConnectionPool::builder()
    ///     .connector(Refused)
    ///     .events(failures.clone())
    ///     .build()
    ///     .unwrap();
    /// assert!(pool.get_or_connect("127.0.0.1:1").await.is_err());
    /// assert_eq!(failures.0.load(Ordering::Relaxed), 1);
    /// # }
    /// ```
    fn on_connect_failed(&self, addr: &str, error: &PoolError) {
        let _ = (addr, error);
    }

    /// Connection `id` of `addr` left the pool for `reason`: every eviction, replacement and
    /// removal (also [`take_unclosed`](crate::ConnectionPool::take_unclosed), as
    /// [`EvictionReason::Manual`]), once per connection. Called under the address's entry lock.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use keyed_pool::{ConnId, ConnectionPool, EvictionReason, PoolEvents};
    ///
    /// struct Reasons(Mutex<Vec<EvictionReason>>);
    /// impl PoolEvents for Reasons {
    ///     fn on_evict(&self, _addr: &str, _id: ConnId, reason: EvictionReason) {
    ///         self.0.lock().unwrap().push(reason);
    ///     }
    /// }
    /// let reasons = Arc::new(Reasons(Mutex::new(Vec::new())));
    /// let pool = ConnectionPool::builder().events(reasons.clone()).build::<u32>().unwrap();
    /// pool.insert("127.0.0.1:1", 1);
    /// pool.insert("127.0.0.1:1", 2);
    /// pool.clear();
    /// assert_eq!(*reasons.0.lock().unwrap(), [EvictionReason::Replaced, EvictionReason::Manual]);
    /// ```
    fn on_evict(&self, addr: &str, id: ConnId, reason: EvictionReason) {
        let _ = (addr, id, reason);
    }

    /// `addr` failed (a failed or timed-out connect, an unhealthy eviction, a connection that died
    /// young) and backs off for `delay`; its ejection count is now `ejection_count` (I12). Called
    /// under the entry lock.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use keyed_pool::{ConnectionPool, Connector, PoolEvents};
    ///
    /// struct Refused;
    /// impl Connector for Refused {
    ///     type Conn = ();
    ///     type Error = std::io::Error;
    ///     async fn connect(&self, _addr: &str) -> std::io::Result<()> {
    ///         Err(std::io::ErrorKind::ConnectionRefused.into())
    ///     }
    /// }
    /// struct Backoffs(Mutex<Vec<(Duration, u32)>>);
    /// impl PoolEvents for Backoffs {
    ///     fn on_backoff(&self, _addr: &str, delay: Duration, ejection_count: u32) {
    ///         self.0.lock().unwrap().push((delay, ejection_count));
    ///     }
    /// }
    /// let seen = Arc::new(Backoffs(Mutex::new(Vec::new())));
    /// let pool = ConnectionPool::builder()
    ///     .connector(Refused)
    ///     .backoff(Duration::from_secs(1), Duration::from_secs(60), 0.0)
    ///     .events(seen.clone())
    ///     .build()
    ///     .unwrap();
    /// let _ = pool.get_or_connect("127.0.0.1:1").await;
    /// assert_eq!(*seen.0.lock().unwrap(), [(Duration::from_secs(1), 1)]);
    /// # }
    /// ```
    fn on_backoff(&self, addr: &str, delay: Duration, ejection_count: u32) {
        let _ = (addr, delay, ejection_count);
    }

    /// [`mark_up`](crate::ConnectionPool::mark_up) was called for `addr`: its backoff ended and
    /// its ejection count was reset. Called after the entry lock is released, once per call.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use keyed_pool::{ConnectionPool, PoolEvents};
    ///
    /// struct Ups(Mutex<Vec<String>>);
    /// impl PoolEvents for Ups {
    ///     fn on_mark_up(&self, addr: &str) {
    ///         self.0.lock().unwrap().push(addr.to_string());
    ///     }
    /// }
    /// let ups = Arc::new(Ups(Mutex::new(Vec::new())));
    /// let pool = ConnectionPool::builder().events(ups.clone()).build::<u32>().unwrap();
    /// pool.mark_up("127.0.0.1:1");
    /// assert_eq!(*ups.0.lock().unwrap(), ["127.0.0.1:1"]);
    /// ```
    fn on_mark_up(&self, addr: &str) {
        let _ = addr;
    }
}

/// A shared observer is an observer: hand the pool an `Arc` and keep a clone to read what it saw.
impl<T: PoolEvents + ?Sized> PoolEvents for Arc<T> {
    fn on_connect(&self, addr: &str, id: ConnId) {
        (**self).on_connect(addr, id);
    }
    fn on_connect_failed(&self, addr: &str, error: &PoolError) {
        (**self).on_connect_failed(addr, error);
    }
    fn on_evict(&self, addr: &str, id: ConnId, reason: EvictionReason) {
        (**self).on_evict(addr, id, reason);
    }
    fn on_backoff(&self, addr: &str, delay: Duration, ejection_count: u32) {
        (**self).on_backoff(addr, delay, ejection_count);
    }
    fn on_mark_up(&self, addr: &str) {
        (**self).on_mark_up(addr);
    }
}

/// The pool's hook, if it has one: each call site costs one branch when it has none.
#[derive(Clone, Default)]
pub(crate) struct Hook(Option<Arc<dyn PoolEvents>>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

impl Hook {
    pub(crate) fn new(events: impl PoolEvents) -> Self {
        Self(Some(Arc::new(events)))
    }

    pub(crate) fn connect(&self, addr: &str, id: ConnId) {
        if let Some(events) = &self.0 {
            events.on_connect(addr, id);
        }
    }

    pub(crate) fn connect_failed(&self, addr: &str, error: &PoolError) {
        if let Some(events) = &self.0 {
            events.on_connect_failed(addr, error);
        }
    }

    pub(crate) fn evict(&self, addr: &str, id: ConnId, reason: EvictionReason) {
        if let Some(events) = &self.0 {
            events.on_evict(addr, id, reason);
        }
    }

    pub(crate) fn backoff(&self, addr: &str, delay: Duration, ejection_count: u32) {
        if let Some(events) = &self.0 {
            events.on_backoff(addr, delay, ejection_count);
        }
    }

    pub(crate) fn mark_up(&self, addr: &str) {
        if let Some(events) = &self.0 {
            events.on_mark_up(addr);
        }
    }
}
