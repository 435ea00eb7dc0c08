//! [`ConnectionPool::checkout`]: exclusive connections, one caller at a time each (issue 13).
//!
//! The decisions are the pure core's ([`CheckoutQueue`]: who gets which connection, when a connect
//! is wanted, FIFO order, I19–I22); this module is the async layer around it: the channels that
//! carry a connection to a waiter, the connect tasks, the capacity permits, the clock.
//!
//! - Every change to an address's queue happens under its entry lock, and so does every send to a
//!   waiter's channel; a waiter that gives up (deadline, or its future dropped) looks at its
//!   channel under the same lock before leaving the line, so a connection sent to it is never lost
//!   (I22): it takes it, or gives it back as its own.
//! - Connects start only from a waiter's own future ("pumping"): on arrival, and whenever capacity
//!   may have freed (any capacity permit dropped, or a connection left idle anywhere, wakes every
//!   waiting checkout) or its address's backoff ends. A drop (of a [`Checkout`]) never spawns.
//! - At the global cap, a waiter makes room by closing an idle connection of another address,
//!   least recently used first (`with_room`, `take_lru_permit`): an idle exclusive one always, a
//!   shared one only under [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::ConnectionPool;
use crate::connection::{CallGuard, ConnId, PooledConnection};
use crate::connector::{Connector, ManagesConnections};
use crate::core::{
    Acquired, CheckoutLimits, CheckoutQueue, Permit, Placed, UnhealthyReason, WaiterId,
};
use crate::error::{PoolError, count, human};
use crate::metrics::{ConnectionMetrics, EvictionReason, PoolCounters};
use crate::pool::Inner;
use crate::slot::Slot;

/// An exclusive connection while the pool owns it or lends it: the connection itself (not shared,
/// so a checkout can hand out `&mut`), a handle that carries its id, address and metrics (its
/// `()` stands where a shared connection keeps the client), and its capacity permit (I1).
pub(crate) struct Held<C> {
    conn: C,
    meta: PooledConnection<()>,
    permit: Permit,
}

/// What a waiter's channel carries: its connection, or why it will not get one.
type Delivery<C> = Result<Held<C>, CheckoutError>;

/// The exclusive-checkout state of one address, in its slot's out-of-line part.
pub(crate) struct Exclusive<C> {
    queue: CheckoutQueue<Held<C>>,
    /// The channel of each waiter in line, in line order.
    senders: VecDeque<(WaiterId, oneshot::Sender<Delivery<C>>)>,
}

impl<C> Exclusive<C> {
    pub(crate) fn new() -> Self {
        Self {
            queue: CheckoutQueue::new(),
            senders: VecDeque::new(),
        }
    }

    /// Nothing idle, checked out or connecting, and nobody in line: the state may be freed.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn take_sender(&mut self, id: WaiterId) -> Option<oneshot::Sender<Delivery<C>>> {
        let at = self.senders.iter().position(|(w, _)| *w == id)?;
        let tx = self.senders.remove(at).map(|(_, tx)| tx);
        if self.senders.is_empty() {
            // Freed with the line (as the queue frees its own): an address idles without it.
            self.senders = VecDeque::new();
        }
        tx
    }

    /// `(idle, checked out, connecting, waiting)`.
    pub(crate) fn counts(&self) -> (usize, usize, usize, usize) {
        let q = &self.queue;
        (q.idle(), q.checked_out(), q.connecting(), q.waiting())
    }

    /// The idle connections' metrics (for stats), least recently used first.
    pub(crate) fn idle_metrics(&self) -> impl Iterator<Item = &ConnectionMetrics> {
        self.queue.idle_iter().map(|(held, _)| held.meta.metrics())
    }

    /// The least recently used idle connection: its id and when it was returned (an offset).
    pub(crate) fn least_recently_used(&self) -> Option<(ConnId, Duration)> {
        let (held, at) = self.queue.idle_iter().next()?;
        Some((held.meta.id(), at))
    }
}

/// Wakes the checkouts waiting in line, anywhere in the pool, when capacity may have freed.
pub(crate) struct Wake {
    /// Checkouts waiting now. While zero, a release costs one load and wakes nobody.
    waiting: AtomicUsize,
    notify: Notify,
    /// Set by the pool's first checkout: until then the sweeps skip their pass over the
    /// exclusive connections (a pool used only shared pays no second pass over its map).
    pub(crate) used: AtomicBool,
}

impl Wake {
    pub(crate) fn new() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            notify: Notify::new(),
            used: AtomicBool::new(false),
        }
    }

    /// Wakes every waiting checkout, if there is one, to try again. SeqCst against the waiter's
    /// increment: either this sees the waiter (and wakes it), or the waiter's next try, which
    /// comes after its increment, sees what was released.
    pub(crate) fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// Why a [`checkout`](ConnectionPool::checkout) gave no connection.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::{CheckoutError, PoolError};
/// let err = CheckoutError::TimedOut {
///     addr: "10.0.0.1:80".into(),
///     timeout: Duration::from_secs(3),
///     checked_out: 2,
/// };
/// assert_eq!(
///     err.to_string(),
///     "no connection to 10.0.0.1:80 came free within 3 s: 2 connections checked out"
/// );
/// let closed = CheckoutError::from(PoolError::Closed);
/// assert!(matches!(closed, CheckoutError::Pool(PoolError::Closed)));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CheckoutError {
    /// The caller waited its whole [`checkout_timeout`](crate::PoolConfig::checkout_timeout) in
    /// line: every connection the address may have
    /// ([`max_per_address`](crate::PoolConfig::max_per_address)) stayed checked out or
    /// connecting, and none came back.
    #[error(
        "no connection to {addr} came free within {}: {} checked out",
        human(*timeout),
        count(*checked_out as u64, "connection")
    )]
    TimedOut {
        /// The address.
        addr: CheetahString,
        /// The checkout timeout.
        timeout: Duration,
        /// The address's connections checked out when the wait ended.
        checked_out: usize,
    },
    /// The caller waited its whole checkout timeout for capacity: the pool stayed at
    /// `max_connections`, and no connection of another address was idle to close for it.
    #[error(
        "no room for a connection to {addr} within {}: the pool stayed at its cap of {max} with no idle connection to close",
        human(*timeout)
    )]
    AtCapacity {
        /// The address.
        addr: CheetahString,
        /// The checkout timeout.
        timeout: Duration,
        /// The pool's `max_connections`.
        max: usize,
    },
    /// What the pool says of the address: [`PoolError::Backoff`] (the address backs off and has
    /// no connection to wait for, or still backed off at the deadline; with the failure's
    /// cause), [`PoolError::Connect`] / [`PoolError::ConnectTimeout`] (the connect made for this
    /// caller failed, with its cause; a failed connect fails the oldest caller in line only),
    /// [`PoolError::InvalidAddress`], [`PoolError::Closed`].
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// A connection checked out for one caller alone (see [`ConnectionPool::checkout`]). It
/// dereferences to the connection, mutably too (a keep-alive HTTP/1.1 stream needs `&mut`), and
/// goes back to its address's line when dropped: to the oldest caller waiting for it, or idle.
///
/// It is closed instead of kept if it was [marked broken](Self::mark_broken), judged unhealthy by
/// the calls recorded on it ([`begin`](Self::begin)), its transport is closed (the connector's
/// `is_open`), it is older than [`max_lifetime`](crate::PoolConfig::max_lifetime), or the pool was
/// closed meanwhile (I17).
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use keyed_pool::{ConnectionPool, Connector};
/// struct Counter;
/// impl Connector for Counter {
///     type Conn = Vec<u8>;
///     type Error = std::io::Error;
///     async fn connect(&self, _addr: &str) -> std::io::Result<Vec<u8>> {
///         Ok(Vec::new())
///     }
/// }
/// let pool = ConnectionPool::builder().connector(Counter).build().unwrap();
/// let mut conn = pool.checkout("10.0.0.1:80").await.unwrap();
/// conn.push(1); // `&mut` access: nobody else holds this connection
/// drop(conn);
/// let again = pool.checkout("10.0.0.1:80").await.unwrap();
/// assert_eq!(*again, [1], "the same connection came back idle and was reused");
/// # }
/// ```
pub struct Checkout<C: Send + Sync + 'static> {
    /// `Some` until dropped.
    held: Option<Held<C>>,
    broken: bool,
    home: Arc<dyn Home<C>>,
}

/// Where a [`Checkout`] goes back to, without naming the pool's connector type.
pub(crate) trait Home<C>: Send + Sync {
    fn give_back(self: Arc<Self>, held: Held<C>, broken: bool);
}

impl<C, K> Home<C> for Inner<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    fn give_back(self: Arc<Self>, held: Held<C>, broken: bool) {
        ConnectionPool { inner: self }.give_back(held, broken);
    }
}

impl<C: Send + Sync + 'static> Checkout<C> {
    fn held(&self) -> &Held<C> {
        self.held
            .as_ref()
            .expect("a checkout holds its connection until dropped")
    }

    /// The connection's identity in the pool.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// let first = pool.checkout("10.0.0.1:80").await.unwrap().id();
    /// assert_eq!(pool.checkout("10.0.0.1:80").await.unwrap().id(), first, "reused");
    /// # }
    /// ```
    pub fn id(&self) -> ConnId {
        self.held().meta.id()
    }

    /// The address the connection is to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// assert_eq!(pool.checkout("10.0.0.1:80").await.unwrap().addr(), "10.0.0.1:80");
    /// # }
    /// ```
    pub fn addr(&self) -> &CheetahString {
        self.held().meta.addr()
    }

    /// The connection's own metrics (its calls, health, latency), kept across checkouts.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// let conn = pool.checkout("10.0.0.1:80").await.unwrap();
    /// conn.begin().failure();
    /// assert_eq!(conn.metrics().total_errors(), 1);
    /// # }
    /// ```
    pub fn metrics(&self) -> &ConnectionMetrics {
        self.held().meta.metrics()
    }

    /// Starts a call on the connection, recorded in its metrics like a shared connection's (see
    /// [`PooledConnection::begin`]): a connection judged unhealthy by its failures is closed when
    /// it comes back, and its address backs off (I9, I12).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// let conn = pool.checkout("10.0.0.1:80").await.unwrap();
    /// let call = conn.begin();
    /// call.success();
    /// assert_eq!(conn.metrics().success_count(), 1);
    /// # }
    /// ```
    pub fn begin(&self) -> CallGuard {
        self.held().meta.begin()
    }

    /// Says the connection must not be reused (a protocol error left it in an unknown state, the
    /// server asked to close it): it is closed when the checkout is dropped, instead of going back
    /// to the line. Unlike a connection judged unhealthy, this does not back the address off.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// let mut conn = pool.checkout("10.0.0.1:80").await.unwrap();
    /// let first = conn.id();
    /// conn.mark_broken();
    /// assert!(conn.is_broken());
    /// drop(conn);
    /// assert_ne!(pool.checkout("10.0.0.1:80").await.unwrap().id(), first, "a new connection");
    /// # }
    /// ```
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Whether [`mark_broken`](Self::mark_broken) was called.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use keyed_pool::{ConnectionPool, Connector};
    /// # struct Unit;
    /// # impl Connector for Unit {
    /// #     type Conn = ();
    /// #     type Error = std::io::Error;
    /// #     async fn connect(&self, _: &str) -> std::io::Result<()> { Ok(()) }
    /// # }
    /// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
    /// assert!(!pool.checkout("10.0.0.1:80").await.unwrap().is_broken());
    /// # }
    /// ```
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

impl<C: Send + Sync + 'static> std::ops::Deref for Checkout<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.held().conn
    }
}

impl<C: Send + Sync + 'static> std::ops::DerefMut for Checkout<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self
            .held
            .as_mut()
            .expect("a checkout holds its connection until dropped")
            .conn
    }
}

impl<C: Send + Sync + 'static> std::fmt::Debug for Checkout<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let meta = &self.held().meta;
        f.debug_struct("Checkout")
            .field("addr", meta.addr())
            .field("id", &meta.id())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<C: Send + Sync + 'static> Drop for Checkout<C> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            Arc::clone(&self.home).give_back(held, self.broken);
        }
    }
}

/// When a checkout gives up (I16): its start and its timeout, turned into an instant only by a
/// caller that has to wait (a hit computes no deadline, and reads no clock for it). The same
/// instant on every pass of a checkout's loop: with a check before use (a failed probe sends the
/// caller back in line) the start is fixed before the first pass, so the probes count against
/// the one deadline.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    /// Set by the first pass that has to wait (or to judge a lifetime): a hit reads no clock
    /// for it.
    start: Option<Instant>,
    timeout: Duration,
}

impl Deadline {
    /// The instant, fixing the start at `now()` if no pass has yet.
    fn at(&mut self, now: impl FnOnce() -> Instant) -> Instant {
        let start = *self.start.get_or_insert_with(now);
        crate::config::deadline_after(start, self.timeout)
    }
}

/// What a caller found on arrival, under the address's lock.
enum Arrival<C> {
    Ready(Held<C>),
    Wait(WaiterId, oneshot::Receiver<Delivery<C>>, Start),
}

/// What an attempt to start a connect for an address's line found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// No connect wanted (or the pool is closed).
    Nothing,
    /// A connect was started.
    Started,
    /// The address backs off until then.
    Backoff(Instant),
    /// The pool is at its cap.
    Full,
}

/// A caller in line: counted as waiting (so capacity released anywhere wakes it) until dropped;
/// if dropped while still armed, it leaves the line under the address's lock and gives back a
/// connection sent to it meanwhile (I22).
struct Waiting<'a, C: Send + Sync + 'static, K: ManagesConnections<C>> {
    pool: &'a ConnectionPool<C, K>,
    addr: &'a CheetahString,
    id: Option<WaiterId>,
    rx: Option<oneshot::Receiver<Delivery<C>>>,
}

impl<C: Send + Sync + 'static, K: ManagesConnections<C>> Drop for Waiting<'_, C, K> {
    fn drop(&mut self) {
        self.pool.inner.wake.waiting.fetch_sub(1, Ordering::SeqCst);
        let (Some(id), Some(mut rx)) = (self.id, self.rx.take()) else {
            return;
        };
        // Under the lock every send happens under: either the channel holds what was sent to us,
        // or we are still in line and leave it.
        let handed = self
            .pool
            .with_existing_slot(self.addr, |slot| match rx.try_recv() {
                Ok(Ok(held)) => Some(held),
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => None,
                Err(oneshot::error::TryRecvError::Empty) => {
                    if let Some(ex) = slot.exclusive_mut() {
                        ex.queue.cancel(id);
                        ex.take_sender(id);
                        // The next caller may now be first in line, the one that makes room.
                        if ex.queue.waiting() > 0 {
                            self.pool.inner.wake.wake();
                        }
                    }
                    None
                }
            })
            .unwrap_or_else(|| rx.try_recv().ok().and_then(Result::ok));
        if let Some(held) = handed {
            tracing::debug!(addr = %self.addr, conn = %held.meta.id(), "checkout cancelled: its connection goes to the next in line");
            self.pool.give_back(held, false);
        }
    }
}

/// Sends a connect's cause along as the error's source.
#[derive(Debug, thiserror::Error)]
#[error("the connect task ended without a result")]
struct ConnectAbandoned;

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<Conn = C>,
{
    /// A connection to `addr` for this caller alone, until the returned [`Checkout`] is dropped
    /// (exclusive mode, for protocols that run one request at a time on a connection: HTTP/1.1,
    /// most database wire protocols). [`get_or_connect`](Self::get_or_connect) is the shared mode
    /// (one multiplexed connection per address); an address may be used both ways, and its
    /// connections of both kinds count against the global cap (I1).
    ///
    /// - An idle connection of the address is handed out at once (the most recently returned),
    ///   unless somebody is already in line (I21). One unfit (closed transport, unhealthy, past
    ///   [`max_lifetime`](crate::PoolConfig::max_lifetime)) is closed instead, and with
    ///   [`check_idle_before_use`](crate::PoolConfig::check_idle_before_use) one quiet for longer
    ///   is probed first.
    /// - Otherwise the caller waits in line, first come first served (I21), for a connection
    ///   returned by another caller or made for it: a connect is started while the address has
    ///   fewer than [`max_per_address`](crate::PoolConfig::max_per_address) connections (I19),
    ///   one at a time (I4), when capacity allows (I1) and the address does not back off (I12).
    /// - At the global cap, an idle exclusive connection of another address is closed to make
    ///   room, least recently used first (a shared one too under
    ///   [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed)); when none is idle, the caller waits, and tries
    ///   again whenever capacity frees anywhere in the pool.
    /// - The wait ends by [`checkout_timeout`](crate::PoolConfig::checkout_timeout) (I16),
    ///   plus a probe timeout when a check before use probes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::{CheckoutError, ConnectionPool, Connector};
    /// struct Unit;
    /// impl Connector for Unit {
    ///     type Conn = ();
    ///     type Error = std::io::Error;
    ///     async fn connect(&self, _addr: &str) -> std::io::Result<()> {
    ///         Ok(())
    ///     }
    /// }
    /// let pool = ConnectionPool::builder()
    ///     .connector(Unit)
    ///     .max_per_address(1)
    ///     .checkout_timeout(Duration::from_millis(100))
    ///     .build()
    ///     .unwrap();
    /// let held = pool.checkout("10.0.0.1:80").await.unwrap();
    /// // The address's one connection is taken: the next caller waits in line, then gives up.
    /// let err = pool.checkout("10.0.0.1:80").await.unwrap_err();
    /// assert!(matches!(err, CheckoutError::TimedOut { checked_out: 1, .. }));
    /// drop(held);
    /// assert!(pool.checkout("10.0.0.1:80").await.is_ok());
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`CheckoutError::TimedOut`], [`CheckoutError::AtCapacity`], and as
    /// [`CheckoutError::Pool`]: [`PoolError::Backoff`], [`PoolError::Connect`],
    /// [`PoolError::ConnectTimeout`], [`PoolError::InvalidAddress`], [`PoolError::Closed`].
    ///
    /// # Cancel safety
    /// Cancel safe (I22). Dropped while in line, the caller leaves the line under its address's
    /// lock, and a connection handed to it meanwhile goes to the next caller in line (or idles):
    /// nothing is lost and nothing stays counted. A connect started for it runs in its own task
    /// and serves the line. Dropped during a check before use, the connection goes back (the
    /// probe records nothing). A call racing [`close`](Self::close) returns
    /// [`PoolError::Closed`] or a connection that is closed when it comes back.
    pub async fn checkout(&self, addr: impl AsRef<str>) -> Result<Checkout<C>, CheckoutError> {
        let addr = addr.as_ref();
        if self.is_closed() {
            return Err(PoolError::Closed.into());
        }
        // Validated in `arrive`, on the way to a connect only: an address with an idle connection
        // was validated when it was connected, and a hit must not pay for it again.
        let addr = crate::pool::key(addr);
        let timeout = self.inner.config.effective_checkout_timeout();
        let mut deadline = Deadline {
            start: None,
            timeout,
        };
        if self.inner.config.check_idle_before_use.is_some() {
            // Probes may send the caller round again: the deadline runs from the checkout's start.
            deadline.at(Instant::now);
        }
        loop {
            let held = self.wait_for_connection(&addr, &mut deadline).await?;
            let checkout = Checkout {
                held: Some(held),
                broken: false,
                home: Arc::clone(&self.inner) as Arc<dyn Home<C>>,
            };
            let Some(quiet) = self.inner.config.check_idle_before_use else {
                return Ok(checkout);
            };
            let held = checkout.held();
            if held.meta.metrics().since_last_checked(Instant::now()) <= quiet {
                return Ok(checkout);
            }
            if self.probe_client(&held.conn, &held.meta).await.is_ok() {
                return Ok(checkout);
            }
            // The failed probe latched the verdict (or found the transport closed): dropping the
            // checkout closes the connection (and backs the address off, as for a shared one).
            // Then the caller goes back in line.
            drop(checkout);
        }
    }

    /// An idle connection, or a place in line and the wait for one.
    async fn wait_for_connection(
        &self,
        addr: &CheetahString,
        deadline: &mut Deadline,
    ) -> Result<Held<C>, CheckoutError> {
        let (id, rx, start) = match self.arrive(addr, deadline)? {
            Arrival::Ready(held) => return Ok(held),
            Arrival::Wait(id, rx, start) => (id, rx, start),
        };
        // Counted only now that the caller waits: a hit never writes the pool-wide counter (one
        // cache line every thread would write). A release between the arrival and this increment
        // wakes nobody, but the first pass below tries again after the increment and after
        // registering for wake-ups, so it sees what was released (see `Wake::wake`).
        self.inner.wake.waiting.fetch_add(1, Ordering::SeqCst);
        // The arrival fixed the deadline's start when it put the caller in line.
        let (deadline, timeout) = (deadline.at(Instant::now), deadline.timeout);
        let mut waiting = Waiting {
            pool: self,
            addr,
            id: Some(id),
            rx: Some(rx),
        };
        let mut retry_at = match start {
            Start::Backoff(at) => Some(at),
            _ => None,
        };
        // Once at first: a release between the arrival and the registration below woke nobody.
        // Needed for correctness since the counter is bumped after the arrival, not before.
        let mut pump = true;
        // One timer for the whole wait (I16): a timer made afresh on every pass fires up to a
        // timer tick late each time, and a waiter woken again and again in its last millisecond
        // (every waiter that leaves wakes the rest) kept pushing its deadline out (found by the
        // simulation's checkout-storm: 542 ms against a 539 ms timeout).
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        loop {
            let notified = self.inner.wake.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pump {
                retry_at = match self.pump(addr, id) {
                    Start::Backoff(at) => Some(at),
                    _ => None,
                };
            }
            enum Event<C> {
                Delivered(Result<Delivery<C>, oneshot::error::RecvError>),
                Deadline,
                Retry,
            }
            let rx = waiting.rx.as_mut().expect("armed while in line");
            let event = tokio::select! {
                // `biased`: no unseeded random branch order under madsim; a connection that
                // arrived wins over the deadline.
                biased;
                delivered = rx => Event::Delivered(delivered),
                () = expiry.as_mut() => Event::Deadline,
                () = notified.as_mut() => Event::Retry,
                () = tokio::time::sleep_until(retry_at.unwrap_or(deadline)), if retry_at.is_some() => Event::Retry,
            };
            match event {
                Event::Delivered(delivered) => {
                    waiting.rx = None;
                    return delivered.unwrap_or_else(|_| Err(self.gone(addr)));
                }
                Event::Deadline => return self.expire(&mut waiting, timeout),
                Event::Retry => pump = true,
            }
        }
    }

    /// The arrival, under the address's lock: an idle connection (the unfit ones closed on the
    /// way), or a place in line, with a connect started for it if one is wanted and allowed.
    /// Validates the address (I/O-free, the connector's `validate`) only when the caller must wait.
    fn arrive(
        &self,
        addr: &CheetahString,
        deadline: &mut Deadline,
    ) -> Result<Arrival<C>, CheckoutError> {
        let limits = self.limits();
        // The clock, read once and only if needed: a hit on an address with a live exclusive
        // state and no `max_lifetime` reads none (`clock_gettime` is 16-35 ns on a VM, a tenth of
        // a checkout + return); the return reads it anyway, for the idle clock.
        let clock = std::cell::Cell::new(None);
        let now = || match clock.get() {
            Some(now) => now,
            None => {
                let now = Instant::now();
                clock.set(Some(now));
                now
            }
        };
        if !self.inner.wake.used.load(Ordering::Relaxed) {
            self.inner.wake.used.store(true, Ordering::Relaxed);
        }
        let arrival = self.slot_entry_at(addr, true, now, |slot| {
            // Under the entry lock: `close` either sees this address's state or we see the flag.
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(PoolError::Closed.into());
            }
            loop {
                let ex = slot.exclusive_or_new();
                // The deadline only for a caller that waits: a hit pays for none.
                let acquired = match ex.queue.take_idle() {
                    Some(held) => Acquired::Ready(held),
                    None => ex.queue.acquire(self.inner.offset(deadline.at(now)), limits),
                };
                match acquired {
                    Acquired::Ready(held) => match self.judge(&held, false, now) {
                        None => {
                            tracing::trace!(addr = %addr, conn = %held.meta.id(), "checked out idle connection");
                            return Ok(Arrival::Ready(held));
                        }
                        Some((reason, why)) => {
                            ex.queue.discard();
                            self.inner.retire_held(slot, held, reason, why, now());
                        }
                    },
                    Acquired::Queued { waiter, connect } => {
                        if let Err(reason) = self.inner.connector.validate(addr) {
                            if connect {
                                ex.queue.connect_not_started();
                            }
                            ex.queue.cancel(waiter);
                            return Err(PoolError::InvalidAddress {
                                addr: addr.clone(),
                                reason,
                            }
                            .into());
                        }
                        let (tx, rx) = oneshot::channel();
                        ex.senders.push_back((waiter, tx));
                        if connect {
                            // `try_start` counts it again, after the backoff and capacity checks.
                            ex.queue.connect_not_started();
                        }
                        let start = self.try_start(addr, slot, &mut None);
                        if let Start::Backoff(_) = start
                            && let Some(err) = self.backoff_error(addr, slot, now())
                            && slot.exclusive().is_some_and(|ex| ex.queue.live() == 0)
                        {
                            // Nothing could serve it before the backoff ends: say so now, as
                            // `get_or_connect` does.
                            PoolCounters::bump(&self.inner.counters.backoff_rejections);
                            if let Some(ex) = slot.exclusive_mut() {
                                ex.queue.cancel(waiter);
                                ex.take_sender(waiter);
                            }
                            return Err(err.into());
                        }
                        tracing::trace!(addr = %addr, waiter = waiter.get(), ?start, "checkout waits in line");
                        return Ok(Arrival::Wait(waiter, rx, start));
                    }
                }
            }
        });
        arrival.expect("a slot is created when there is none")
    }

    /// Starts a connect for the address's line if it wants one: the queue's limits (I19, I4),
    /// the backoff (I12), a capacity permit (`permit` if the caller freed one for it, I1). Under
    /// the address's lock.
    fn try_start(
        &self,
        addr: &CheetahString,
        slot: &mut Slot<C>,
        permit: &mut Option<Permit>,
    ) -> Start {
        let now = Instant::now();
        if self.inner.closed.load(Ordering::SeqCst) {
            return Start::Nothing;
        }
        let backoff = slot
            .ejection()
            .retry_after(self.inner.offset(now))
            .map(|left| now + left);
        let limits = self.limits();
        let Some(ex) = slot.exclusive_mut() else {
            return Start::Nothing;
        };
        if !ex.queue.start_connect(limits) {
            return Start::Nothing;
        }
        if let Some(until) = backoff {
            ex.queue.connect_not_started();
            return Start::Backoff(until);
        }
        let Some(mut permit) = permit.take().or_else(|| self.inner.ledger.try_acquire()) else {
            ex.queue.connect_not_started();
            return Start::Full;
        };
        permit.mark_connecting();
        PoolCounters::bump(&self.inner.counters.connects_attempted);
        self.inner.ex_connects.send_modify(|n| *n += 1);
        tokio::spawn(self.clone().run_connect_exclusive(addr.clone(), permit));
        Start::Started
    }

    /// Tries to start a connect for the address's line, making room at the global cap by closing
    /// an idle connection of another address (least recently used first). Only the first caller
    /// in line makes room (it is always a live future: one that gave up left the line), so a
    /// wake-up costs the others one lock of their own entry, not a pass over the map each.
    fn pump(&self, addr: &CheetahString, me: WaiterId) -> Start {
        let (start, first) = self
            .with_existing_slot(addr, |slot| {
                let start = self.try_start(addr, slot, &mut None);
                let first = slot.exclusive().and_then(|ex| ex.queue.first_waiter());
                (start, first == Some(me))
            })
            .unwrap_or((Start::Nothing, false));
        if start != Start::Full || !first {
            return start;
        }
        let made = self.with_room(addr, true, |permit| {
            match self
                .with_existing_slot(addr, |slot| self.try_start(addr, slot, permit))
                .unwrap_or(Start::Nothing)
            {
                Start::Full => None,
                start => Some(Ok(start)),
            }
        });
        made.unwrap_or(Start::Full)
    }

    /// The deadline came: under the lock, takes a connection sent at the last moment, or leaves
    /// the line and says what kept the caller waiting.
    fn expire(
        &self,
        waiting: &mut Waiting<'_, C, K>,
        timeout: Duration,
    ) -> Result<Held<C>, CheckoutError> {
        let addr = waiting.addr;
        let id = waiting.id.expect("in line");
        let mut rx = waiting.rx.take().expect("armed while in line");
        let now = Instant::now();
        let max_per_address = self.inner.config.max_per_address;
        let ledger = &self.inner.ledger;
        let decided = self.with_existing_slot(addr, |slot| {
            match rx.try_recv() {
                Ok(delivered) => return delivered,
                Err(oneshot::error::TryRecvError::Closed) => return Err(self.gone(addr)),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let backoff = self.backoff_error(addr, slot, now);
            let Some(ex) = slot.exclusive_mut() else {
                return Err(self.gone(addr));
            };
            ex.queue.cancel(id);
            ex.take_sender(id);
            if ex.queue.waiting() > 0 {
                // The next caller may now be first in line, the one that makes room.
                self.inner.wake.wake();
            }
            let live = ex.queue.live();
            if let Some(err) = backoff
                && live == 0
            {
                return Err(err.into());
            }
            let max = ledger.max();
            // At capacity only if the cap is what kept a connect from starting: with one connect
            // in flight for the address (I4), the caller waited on that connect, not on room.
            let connect_blocked = ex.queue.connecting() < self.limits().max_connecting;
            if live < max_per_address && connect_blocked && max > 0 && ledger.used() >= max {
                PoolCounters::bump(&self.inner.counters.rejected_capacity);
                return Err(CheckoutError::AtCapacity {
                    addr: addr.clone(),
                    timeout,
                    max,
                });
            }
            Err(CheckoutError::TimedOut {
                addr: addr.clone(),
                timeout,
                checked_out: ex.queue.checked_out(),
            })
        });
        let result = decided.unwrap_or_else(|| match rx.try_recv() {
            Ok(delivered) => delivered,
            Err(_) => Err(self.gone(addr)),
        });
        if let Err(err) = &result {
            tracing::debug!(addr = %addr, error = %err, "checkout gave up");
        }
        result
    }

    /// The error of a waiter whose line went away: the pool closed.
    fn gone(&self, addr: &CheetahString) -> CheckoutError {
        if self.is_closed() {
            return PoolError::Closed.into();
        }
        PoolError::Connect {
            addr: addr.clone(),
            cause: Arc::new(ConnectAbandoned),
        }
        .into()
    }

    /// The connect task of one counted connect: its connection goes to the oldest caller in line
    /// (or idles); its failure fails that caller only and backs the address off (I12, I21). Stops
    /// at once when `close` begins.
    async fn run_connect_exclusive(self, addr: CheetahString, permit: Permit) {
        let mut guard = ConnectGuard {
            pool: &self,
            addr: &addr,
            permit: Some(permit),
        };
        let timeout = self.inner.config.connect_timeout;
        tracing::debug!(addr = %addr, "connecting (exclusive)");
        let mut closing = self.inner.closing.subscribe();
        let outcome = tokio::select! {
            // `biased`: no unseeded random branch order under madsim; a close wins a tie.
            biased;
            _ = closing.wait_for(|closing| *closing) => None,
            outcome = tokio::time::timeout(timeout, self.inner.connector.connect(&addr)) => Some(outcome),
        };
        let Some(mut permit) = guard.permit.take() else {
            unreachable!("the guard holds the permit until the connect ends")
        };
        let (cause, err) = match outcome {
            // Closing: `close` fails the line; the guard gives the counted connect back.
            None => {
                guard.permit = Some(permit);
                return;
            }
            Some(Ok(Ok(conn))) => {
                permit.mark_live();
                let held = Held {
                    meta: self.new_connection(addr.clone(), ()),
                    conn,
                    permit,
                };
                return self.adopt_exclusive(&addr, held);
            }
            Some(Ok(Err(err))) => self.connect_failure(&addr, Some(err)),
            Some(Err(_elapsed)) => self.connect_failure(&addr, None),
        };
        let now = Instant::now();
        self.with_existing_slot(&addr, |slot| {
            self.inner.events.connect_failed(&addr, &err);
            if let Some(ex) = slot.exclusive_mut()
                && let Some(first) = ex.queue.connect_failed()
                && let Some(tx) = ex.take_sender(first)
            {
                // Sent under the lock: the waiter takes it, or finds it when it gives up.
                let _ = tx.send(Err(err.clone().into()));
            }
            if !self.is_closed() {
                self.inner.eject(&addr, slot, now, cause);
            }
            drop(permit);
        });
    }

    /// A connect's new connection, under the address's lock: to the oldest caller in line, or
    /// idle; closed at once if the pool closed meanwhile.
    fn adopt_exclusive(&self, addr: &CheetahString, held: Held<C>) {
        let now = Instant::now();
        let mut held = Some(held);
        self.with_existing_slot(addr, |slot| {
            if self.inner.closed.load(Ordering::SeqCst) {
                return;
            }
            let Some(ex) = slot.exclusive_mut() else {
                return;
            };
            let Some(held) = held.take() else { return };
            let id = held.meta.id();
            let placed = ex.queue.connected(held, self.inner.offset(now));
            PoolCounters::bump(&self.inner.counters.connects_succeeded);
            tracing::debug!(addr = %addr, conn = %id, "connected (exclusive)");
            self.inner.events.connect(addr, id);
            self.deliver(ex, placed, now);
            // The line may want another connect (I19 allows more than one per address); at the
            // cap, the callers in line make room themselves, so they are woken.
            if self.try_start(addr, slot, &mut None) == Start::Full {
                self.inner.wake.wake();
            }
        });
        if let Some(held) = held {
            // The pool closed (and took the line away) while this connect ran.
            self.inner.retire_orphan(held);
        }
    }
}

/// What an exclusive connect task holds until it ends: its permit until the connection is made
/// or the failure recorded. However the task ends (finished, aborted, dropped with its runtime)
/// the connect stops counting in its line and in the pool's connects in flight (I3, I17).
struct ConnectGuard<'a, C: Send + Sync + 'static, K: ManagesConnections<C>> {
    pool: &'a ConnectionPool<C, K>,
    addr: &'a CheetahString,
    /// `Some` while the connect has neither made a connection nor been recorded as failed.
    permit: Option<Permit>,
}

impl<C: Send + Sync + 'static, K: ManagesConnections<C>> Drop for ConnectGuard<'_, C, K> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.pool.with_existing_slot(self.addr, |slot| {
                if let Some(ex) = slot.exclusive_mut() {
                    ex.queue.connect_not_started();
                }
                drop(permit); // under the entry lock, with the count
            });
        }
        self.pool.inner.ex_connects.send_modify(|n| *n -= 1);
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    pub(crate) fn limits(&self) -> CheckoutLimits {
        CheckoutLimits {
            max_per_address: self.inner.config.max_per_address,
            max_connecting: 1,
        }
    }

    /// Whether `held` must be closed rather than kept or handed out, and as what: marked broken,
    /// its latched verdict or a closed transport (I8, I9), past `max_lifetime`.
    fn judge(
        &self,
        held: &Held<C>,
        broken: bool,
        now: impl FnOnce() -> Instant,
    ) -> Option<(EvictionReason, Option<UnhealthyReason>)> {
        if broken {
            return Some((EvictionReason::Broken, None));
        }
        let metrics = held.meta.metrics();
        let why = metrics.unusable_reason().or_else(|| {
            (!self.inner.connector.is_conn_open(&held.conn)).then_some(UnhealthyReason::Closed)
        });
        match why {
            Some(UnhealthyReason::Closed) => {
                return Some((EvictionReason::Closed, Some(UnhealthyReason::Closed)));
            }
            Some(why) => return Some((EvictionReason::Unhealthy, Some(why))),
            None => {}
        }
        let lifetime = self.inner.config.max_lifetime?;
        (now().saturating_duration_since(metrics.created_at()) >= lifetime)
            .then_some((EvictionReason::Lifetime, None))
    }

    /// A checked-out connection comes back (a [`Checkout`] dropped, or a cancelled waiter's): to
    /// the oldest caller in line, or idle; closed instead if unfit or the pool closed (I17).
    pub(crate) fn give_back(&self, held: Held<C>, broken: bool) {
        let now = Instant::now();
        held.meta.metrics().touch(now);
        let verdict = self.judge(&held, broken, || now);
        let addr = held.meta.addr().clone();
        let mut held = Some(held);
        let at = self.inner.offset(now);
        self.slot_entry_at(
            &addr,
            false,
            || now,
            |slot| {
                let closed = self.inner.closed.load(Ordering::SeqCst);
                let Some(ex) = slot.exclusive_mut() else {
                    return;
                };
                let Some(h) = held.take() else { return };
                match verdict {
                    None if !closed => {
                        h.meta.metrics().mark_served();
                        let placed = ex
                            .queue
                            .release(h, true, at)
                            .expect("a kept connection is placed");
                        self.deliver(ex, placed, now);
                    }
                    verdict => {
                        ex.queue.discard();
                        let (reason, why) = verdict.unwrap_or((EvictionReason::Manual, None));
                        self.inner.retire_held(slot, h, reason, why, now);
                    }
                }
            },
        );
        // No line any more: the pool closed (and its sweep took the line) while it was out.
        if let Some(held) = held {
            self.inner.retire_orphan(held);
        }
    }

    /// Hands a placed connection to its waiter; one whose waiter has gone goes to the next (I22).
    /// A connection left idle may be what a caller of another address waits for (to close it for
    /// room): they are woken.
    fn deliver(&self, ex: &mut Exclusive<C>, mut placed: Placed<Held<C>>, now: Instant) {
        loop {
            match placed {
                Placed::Idle => {
                    self.inner.wake.wake();
                    return;
                }
                Placed::Handed(waiter, held) => {
                    let Some(tx) = ex.take_sender(waiter) else {
                        debug_assert!(false, "a waiter in line has a channel");
                        return;
                    };
                    match tx.send(Ok(held)) {
                        Ok(()) => return,
                        Err(Ok(held)) => {
                            // Its waiter has gone: given back as the waiter's, to the next.
                            placed = ex
                                .queue
                                .release(held, true, self.inner.offset(now))
                                .expect("a kept connection is placed");
                        }
                        Err(Err(_)) => unreachable!("a connection was sent"),
                    }
                }
            }
        }
    }

    /// `close`: fails the line with `Closed`, closes the idle connections; the checked-out ones
    /// are closed when they come back (they find no line). Under the address's lock.
    pub(crate) fn close_exclusive(&self, slot: &mut Slot<C>) {
        let Some(mut ex) = slot.take_exclusive() else {
            return;
        };
        for (_, tx) in ex.senders.drain(..) {
            let _ = tx.send(Err(PoolError::Closed.into()));
        }
        for held in ex.queue.take_idle_where(|_, _| true) {
            self.inner.retire_orphan(held);
        }
    }

    /// The exclusive part of the idle and health sweeps: closes the idle exclusive connections
    /// returned longer than `max_idle` ago (if `idle`; I6, by the same predicate as a shared
    /// one's, I5) and those unfit for use (I8, I9), address by address under each lock. A checked-out connection is never
    /// looked at (I5). Returns how many it closed.
    pub(crate) fn sweep_exclusive(&self, now: Instant, idle: bool) -> usize {
        // Relaxed is enough: an exclusive connection exists only after a checkout set the flag
        // under an entry lock, which this pass's lookups then take.
        if !self.inner.wake.used.load(Ordering::Relaxed) {
            return 0;
        }
        let mut addrs: Vec<CheetahString> = self
            .inner
            .map
            .iter()
            .filter(|e| e.value().exclusive().is_some_and(|ex| ex.queue.idle() > 0))
            .map(|e| e.key().clone())
            .collect();
        addrs.sort_unstable();
        let max_idle = if idle {
            self.inner.config.max_idle
        } else {
            None
        };
        let at_now = self.inner.offset(now);
        let mut closed = 0;
        for addr in addrs {
            self.with_existing_slot(&addr, |slot| {
                let Some(ex) = slot.exclusive_mut() else {
                    return;
                };
                let mut verdicts = Vec::new();
                let taken = ex.queue.take_idle_where(|held, at| {
                    let verdict = if crate::core::is_idle(0, at_now.saturating_sub(at), max_idle) {
                        Some((EvictionReason::Idle, None))
                    } else {
                        self.judge(held, false, || now)
                    };
                    let take = verdict.is_some();
                    verdicts.extend(verdict);
                    take
                });
                for (held, (reason, why)) in taken.into_iter().zip(verdicts) {
                    self.inner.retire_held(slot, held, reason, why, now);
                    closed += 1;
                }
            });
        }
        closed
    }

    /// Under the room lock, the victim's entry lock held: closes the least recently used idle
    /// exclusive connection of the slot if it is still `id`, and hands its permit over.
    pub(crate) fn take_idle_exclusive_for_room(
        &self,
        slot: &mut Slot<C>,
        id: ConnId,
    ) -> Option<Permit> {
        let ex = slot.exclusive_mut()?;
        if ex.least_recently_used().map(|(lru, _)| lru) != Some(id) {
            return None;
        }
        let (held, _) = ex.queue.take_least_recently_used()?;
        let Held { conn, meta, permit } = held;
        self.inner
            .note_evicted(meta.addr(), meta.id(), EvictionReason::MakeRoom);
        tracing::debug!(addr = %meta.addr(), conn = %meta.id(), reason = "make_room", "connection evicted");
        self.inner.connector.close_conn(&conn);
        Some(permit)
    }
}

impl<C, K: ManagesConnections<C>> Inner<C, K> {
    /// Closes an exclusive connection the pool lets go of, judged as `retire` judges a shared one
    /// (an unhealthy one, or one closed young, backs its address off, I12), and only then frees
    /// its permit (I1). Under the address's entry lock.
    pub(crate) fn retire_held(
        &self,
        slot: &mut Slot<C>,
        held: Held<C>,
        reason: EvictionReason,
        why: Option<UnhealthyReason>,
        now: Instant,
    ) {
        let Held { conn, meta, permit } = held;
        self.close_evicted(
            slot,
            meta.addr(),
            meta.id(),
            &conn,
            meta.metrics(),
            reason,
            why,
            now,
        );
        drop(permit);
    }

    /// Closes an exclusive connection whose line is gone (the pool closed): as `Manual`, then
    /// frees its permit.
    pub(crate) fn retire_orphan(&self, held: Held<C>) {
        let Held { conn, meta, permit } = held;
        self.note_evicted(meta.addr(), meta.id(), EvictionReason::Manual);
        tracing::debug!(addr = %meta.addr(), conn = %meta.id(), reason = "manual", "connection evicted");
        self.connector.close_conn(&conn);
        drop(permit);
    }

    /// Every idle exclusive connection's client, for the pool's last drop (I17).
    pub(crate) fn close_idle_exclusive(&self, slot: &Slot<C>) {
        if let Some(ex) = slot.exclusive() {
            for (held, _) in ex.queue.idle_iter() {
                self.connector.close_conn(&held.conn);
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{ConnectionPool, Connector};

    struct Unit;

    impl Connector for Unit {
        type Conn = ();
        type Error = std::io::Error;

        async fn connect(&self, _addr: &str) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// I18 (nothing kept for an address that holds nothing) through the entry path's `get_mut`
    /// branch (`slot_entry_at`), which a checkout's return takes: a return that closes the address's last connection removes its slot;
    /// a kept one leaves the slot with no line buffer (issue 13's memory per idle connection).
    #[tokio::test(start_paused = true)]
    async fn i18_a_return_that_closes_the_last_connection_removes_the_slot() {
        let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
        let first = pool.checkout("10.0.0.1:80").await.unwrap();
        let id = first.id();
        drop(first);
        let idle = pool.inner.map.get(&crate::pool::key("10.0.0.1:80"));
        let ex = idle.as_ref().and_then(|slot| slot.exclusive());
        assert_eq!(
            ex.map(|ex| (ex.counts(), ex.senders.capacity())),
            Some(((1, 0, 0, 0), 0)),
            "one idle connection, and the first checkout's wait left no sender buffer"
        );
        drop(idle);
        let mut again = pool.checkout("10.0.0.1:80").await.unwrap();
        assert_eq!(again.id(), id, "the idle connection was reused");
        again.mark_broken();
        drop(again);
        assert_eq!(
            pool.inner.map.len(),
            0,
            "I18 violated: the slot of an address with nothing left is kept"
        );
        assert!(pool.is_empty());
    }
}
