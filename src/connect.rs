//! [`ConnectionPool::get_or_connect`]: one connect in flight per address with a shared result (I4),
//! a capacity slot reserved before connecting (I3), a bounded wait (I16) and backoff from failing
//! addresses (I12).
//!
//! The connect runs in a task of its own, not in the caller's future: a caller dropped at any await
//! point leaves nothing behind (no slot, no dangling flight), and the connect it started still
//! completes for the callers that remain (or pools the connection for the next one).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::PooledConnection;
use crate::connector::{Connector, ManagesConnections};
use crate::core::{Permit, UnhealthyReason};
use crate::error::{Cause, PoolError};
use crate::metrics::{EvictionReason, PoolCounters};
use crate::slot::{Flight, FlightResult, Pooled, Slot};
use crate::{ConnectionPool, WhenFull};

/// How long a waiter waits past its flight's deadline for the flight's own verdict. The connect
/// task times out *at* the deadline and publishes at once, so waiters normally return with it, after
/// the slot is back (I3); the grace only bounds the wait if the task were starved. It covers timer
/// rounding (tokio's timers have millisecond resolution).
pub(crate) const WAIT_GRACE: Duration = Duration::from_millis(5);

/// The cause recorded when a connect task ended without publishing a result (its runtime shut
/// down under it).
#[derive(Debug, thiserror::Error)]
#[error("the connect task ended without a result")]
struct ConnectAbandoned;

/// What a connect task holds until it ends, given back however it ends: its capacity permit
/// (unless the connection it paid for was pooled) and its flight record. A task dropped mid-connect
/// (its runtime shut down under it) thus leaks no slot (I3) and leaves no dead flight for later
/// callers to join; their waits end with a "connect task ended" error.
struct FlightGuard<'a, C: Send + Sync + 'static, K: Connector<Conn = C>> {
    pool: &'a ConnectionPool<C, K>,
    addr: &'a CheetahString,
    flight: u64,
    permit: Option<Permit>,
}

impl<C: Send + Sync + 'static, K: Connector<Conn = C>> Drop for FlightGuard<'_, C, K> {
    fn drop(&mut self) {
        let permit = self.permit.take();
        let flight = self.flight;
        self.pool.with_existing_slot(self.addr, |slot| {
            slot.end_flight(flight);
            drop(permit); // under the entry lock, with the flight
        });
    }
}

/// The cause handed to a waiter whose freshly made connection closed before it could be used.
#[derive(Debug, thiserror::Error)]
#[error("the new connection closed before it could be handed out")]
struct ClosedAfterConnect;

enum Joined<C> {
    Ready(PooledConnection<C>),
    Wait(Instant, watch::Receiver<FlightResult<C>>),
}

/// What `join_or_start` decided under the entry lock.
enum Decision<C> {
    Done(Result<Joined<C>, PoolError>),
    Full,
    Start {
        id: u64,
        deadline: Instant,
        tx: watch::Sender<FlightResult<C>>,
        rx: watch::Receiver<FlightResult<C>>,
        permit: Permit,
    },
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<Conn = C>,
{
    /// A healthy pooled connection for `addr`, connecting through the connector if there is none.
    ///
    /// - Concurrent callers for one address share a single connect and its result, error included
    ///   (I4).
    /// - With [`max_per_address`](crate::PoolConfig::max_per_address) above 1, a hit returns the
    ///   least-loaded connection of the address, and when even that one has
    ///   [`busy_in_flight`](crate::PoolConfig::busy_in_flight) calls in flight, another is
    ///   connected in the background (the caller does not wait for it), up to that many, one
    ///   connect at a time, under the global cap and never by making room (I23).
    /// - A capacity slot is reserved before connecting and returned if the connect fails (I3).
    /// - Waiting is bounded by the connect timeout (I16), plus the probe timeout when a check
    ///   before use probes (below).
    /// - After a failed connect, an unhealthy eviction, or a connection that died young, the
    ///   address backs off (I12): until the delay has passed, callers get [`PoolError::Backoff`] at
    ///   once, with the last cause. The delay grows with the address's ejection count, which a
    ///   successful connect does not reset (see [`ejection_count`](Self::ejection_count)).
    /// - With [`check_idle_before_use`](crate::PoolConfig::check_idle_before_use) set, a pooled
    ///   connection neither used nor probed for longer than it is [probed](Self::probe) first; if
    ///   the probe fails the connection is evicted and the caller gets a fresh connect, or the
    ///   backoff error if the failure backed the address off (a server that did not answer, I12).
    ///
    /// # Errors
    /// [`PoolError::InvalidAddress`] (no connect attempted), [`PoolError::Backoff`],
    /// [`PoolError::AtCapacity`], [`PoolError::Connect`], [`PoolError::ConnectTimeout`],
    /// [`PoolError::Closed`].
    ///
    /// # Cancel safety
    /// Cancel safe. Dropping the future at any await point leaks no slot and leaves no flight
    /// behind: the connect runs in its own task, which pools its connection or returns its slot;
    /// a check before use dropped mid-probe records nothing and leaves no call in flight.
    /// A call racing [`close`](Self::close) returns [`PoolError::Closed`] or a connection that the
    /// close then closes.
    pub async fn get_or_connect(
        &self,
        addr: impl AsRef<str>,
    ) -> Result<PooledConnection<C>, PoolError> {
        let addr = addr.as_ref();
        if self.is_closed() {
            return Err(PoolError::Closed);
        }
        // With the check off, a hit costs a `get` and this one branch.
        if let Some(quiet) = self.inner.config.check_idle_before_use {
            if let Some(conn) = self.get_checked(addr, quiet).await {
                self.grow_if_busy(addr, &conn);
                return Ok(conn);
            }
        } else if let Some(conn) = self.get(addr) {
            self.grow_if_busy(addr, &conn);
            return Ok(conn);
        }
        // Validated only on the way to a connect: a pooled address was validated when it was
        // connected (or inserted by hand), and a hit must cost no more than a `get`.
        let addr = &crate::pool::key(addr);
        if let Err(reason) = self.inner.connector.validate(addr) {
            return Err(PoolError::InvalidAddress {
                addr: addr.clone(),
                reason,
            });
        }
        let (deadline, mut rx) = match self.join_or_start(addr)? {
            Joined::Ready(conn) => return Ok(conn),
            Joined::Wait(deadline, rx) => (deadline, rx),
        };
        // `rx` is held until the connection is checked: while it lives, the connection is not taken
        // to make room for another address (`Pooled::in_handoff`).
        let conn = self.wait_flight(addr, deadline, &mut rx).await;
        // I8: the flight's connection may have died while we waited (another waiter used it first
        // and found it closed). Never hand it out; say why rather than wait again past the deadline.
        let usable = matches!(&conn, Ok(conn) if self.usable(conn));
        // The handoff may end with this caller: the connection may now be closed to make room,
        // so the checkouts waiting at the cap try again (under `EvictLeastRecentlyUsed`).
        drop(rx);
        self.inner.conns.quiet();
        let conn = conn?;
        if usable {
            Ok(conn)
        } else if self.is_closed() {
            Err(PoolError::Closed)
        } else {
            Err(PoolError::Connect {
                addr: addr.clone(),
                cause: Arc::new(ClosedAfterConnect),
            })
        }
    }

    /// Shared mode with several connections per address (issue 13): `least` is the least loaded
    /// connection of `addr`, just handed out. If it is busy (at least
    /// [`busy_in_flight`](crate::PoolConfig::busy_in_flight) calls in flight), so is every other;
    /// then, if the address has fewer than `max_per_address` shared connections, no connect in
    /// flight (I4), no backoff, and a free slot under the cap (growing never makes room), one more
    /// connect starts in the background. The caller does not wait for it: it has its connection.
    #[inline]
    fn grow_if_busy(&self, addr: &str, least: &PooledConnection<C>) {
        if self.inner.config.max_per_address > 1 {
            self.grow_if_busy_cold(addr, least);
        }
    }

    /// The rest of [`grow_if_busy`](Self::grow_if_busy), off the hot path of the default
    /// (one connection per address).
    #[cold]
    #[inline(never)]
    fn grow_if_busy_cold(&self, addr: &str, least: &PooledConnection<C>) {
        let config = &self.inner.config;
        if least.metrics().in_flight() < config.busy_in_flight {
            return;
        }
        let addr = crate::pool::key(addr);
        let now = Instant::now();
        let decision = self.with_existing_slot(&addr, |slot| {
            // Decided again under the entry lock: another caller may have grown it meanwhile. A
            // connection that may not be handed out (unhealthy, closed) is not spare capacity.
            let busy = self
                .least_loaded(slot)
                .is_none_or(|conn| conn.metrics().in_flight() >= config.busy_in_flight);
            if !busy
                || slot.shared_count() >= config.max_per_address
                || slot.flight().is_some()
                || self.inner.closed.load(Ordering::SeqCst)
                || self.backoff_error(&addr, slot, now).is_some()
            {
                return None;
            }
            let permit = self.inner.ledger.try_acquire()?;
            tracing::debug!(addr = %addr, connections = slot.shared_count(), "every connection busy: connecting another");
            Some(self.start_flight(slot, now, permit))
        });
        if let Some(Some(decision)) = decision {
            // Nobody waits on this flight; its connection joins the address's when it is made.
            let _ = self.launch(&addr, decision);
        }
    }

    pub(crate) fn backoff_error(
        &self,
        addr: &CheetahString,
        slot: &Slot<C>,
        now: Instant,
    ) -> Option<PoolError> {
        let at = self.inner.offset(now);
        let ejection = slot.ejection();
        let retry_after = ejection.retry_after(at)?;
        Some(PoolError::Backoff {
            addr: addr.clone(),
            retry_after,
            failures: ejection.count_at(at, &self.inner.config.ejection),
            cause: slot
                .cause()
                .cloned()
                .unwrap_or_else(|| Arc::new(UnhealthyReason::Closed)),
        })
    }

    /// Joins the connect in flight for `addr`, or reserves a slot and starts one; all of it decided
    /// under the address's entry lock, so exactly one caller starts a flight and every other caller
    /// joins it (I4). When the pool is full and the policy allows, makes room first, one caller at
    /// a time (the room lock), taking the evicted connection's slot for itself. Never awaits.
    fn join_or_start(&self, addr: &CheetahString) -> Result<Joined<C>, PoolError> {
        let mut permit = None;
        match self.decide(addr, &mut permit) {
            Decision::Full if self.inner.config.when_full == WhenFull::EvictLeastRecentlyUsed => {}
            decision => return self.launch(addr, decision),
        }
        self.with_room(addr, false, |permit| match self.decide(addr, permit) {
            Decision::Full => None,
            decision => Some(self.launch(addr, decision)),
        })
    }

    /// Acts on a decision: spawns the connect task of a new flight.
    fn launch(&self, addr: &CheetahString, decision: Decision<C>) -> Result<Joined<C>, PoolError> {
        match decision {
            Decision::Done(result) => result,
            Decision::Full => Err(self.at_capacity()),
            Decision::Start {
                id,
                deadline,
                tx,
                rx,
                permit,
            } => {
                let task = self
                    .clone()
                    .run_connect(addr.clone(), id, deadline, tx, permit);
                tokio::spawn(task);
                Ok(Joined::Wait(deadline, rx))
            }
        }
    }

    /// The decision for `addr`, under its entry lock. A new flight takes `permit` if the caller
    /// freed one for it, else a permit of its own.
    fn decide(&self, addr: &CheetahString, permit: &mut Option<Permit>) -> Decision<C> {
        let now = Instant::now();
        self.with_slot(addr, |slot| {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Decision::Done(Err(PoolError::Closed));
            }
            if let Some(conn) = self.least_loaded(slot) {
                conn.metrics().touch(now);
                return Decision::Done(Ok(Joined::Ready(conn.clone())));
            }
            // Unfit but still pooled: evict them now rather than at the next sweep, so their
            // failure backs the address off before we would dial again (I12).
            self.evict_unfit(slot, None, now);
            if let Some(flight) = slot.flight() {
                PoolCounters::bump(&self.inner.counters.connects_shared);
                return Decision::Done(Ok(Joined::Wait(flight.deadline, flight.rx.clone())));
            }
            if let Some(err) = self.backoff_error(addr, slot, now) {
                PoolCounters::bump(&self.inner.counters.backoff_rejections);
                return Decision::Done(Err(err));
            }
            let Some(permit) = permit.take().or_else(|| self.inner.ledger.try_acquire()) else {
                return Decision::Full;
            };
            self.start_flight(slot, now, permit)
        })
    }

    /// Records a new connect in flight for the slot, holding `permit`, under the entry lock (the
    /// caller checked there was none, I4).
    fn start_flight(&self, slot: &mut Slot<C>, now: Instant, mut permit: Permit) -> Decision<C> {
        permit.mark_connecting();
        let (tx, rx) = watch::channel(None);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline = crate::config::deadline_after(now, self.inner.config.connect_timeout);
        slot.start_flight(Flight {
            id,
            deadline,
            rx: rx.clone(),
        });
        PoolCounters::bump(&self.inner.counters.connects_attempted);
        Decision::Start {
            id,
            deadline,
            tx,
            rx,
            permit,
        }
    }

    async fn wait_flight(
        &self,
        addr: &CheetahString,
        deadline: Instant,
        rx: &mut watch::Receiver<FlightResult<C>>,
    ) -> Result<PooledConnection<C>, PoolError> {
        let timeout = self.inner.config.connect_timeout;
        let wait = deadline.saturating_duration_since(Instant::now()) + WAIT_GRACE;
        match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(result)) => match &*result {
                Some(result) => result.clone(),
                None => Err(self.abandoned(addr)),
            },
            Ok(Err(_closed)) => Err(self.abandoned(addr)),
            Err(_elapsed) => Err(PoolError::ConnectTimeout {
                addr: addr.clone(),
                timeout,
            }),
        }
    }

    fn abandoned(&self, addr: &CheetahString) -> PoolError {
        if self.is_closed() {
            return PoolError::Closed;
        }
        PoolError::Connect {
            addr: addr.clone(),
            cause: Arc::new(ConnectAbandoned),
        }
    }

    /// The connect task: owns the reserved permit until the connection is pooled or the permit is
    /// given back, retires the flight, then publishes the result. Stops at once when `close` begins.
    async fn run_connect(
        self,
        addr: CheetahString,
        flight: u64,
        deadline: Instant,
        tx: watch::Sender<FlightResult<C>>,
        permit: Permit,
    ) {
        let mut guard = FlightGuard {
            pool: &self,
            addr: &addr,
            flight,
            permit: Some(permit),
        };
        tracing::debug!(addr = %addr, "connecting");
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut closing = self.inner.closing.subscribe();
        let outcome = tokio::select! {
            // `biased`: no unseeded random branch order under madsim; a close wins a tie.
            biased;
            _ = closing.wait_for(|closing| *closing) => None,
            outcome = tokio::time::timeout(remaining, self.inner.connector.connect(&addr)) => Some(outcome),
        };
        let permit = guard.permit.take();
        let result = match outcome {
            None => {
                tracing::debug!(addr = %addr, "connect abandoned: the pool is closing");
                Err(PoolError::Closed)
            }
            Some(Ok(Ok(conn))) => match self.adopt(&addr, flight, conn, permit, tx) {
                // Published by `adopt`, under the entry lock, with the sender kept for the handoff.
                Ok(()) => return drop(guard),
                Err((err, tx)) => {
                    drop(guard);
                    tx.send_replace(Some(Err(err)));
                    return;
                }
            },
            Some(Ok(Err(err))) => {
                let (cause, err) = self.connect_failure(&addr, Some(err));
                self.fail_flight(&addr, flight, cause, &err, permit);
                Err(err)
            }
            Some(Err(_elapsed)) => {
                let (cause, err) = self.connect_failure(&addr, None);
                self.fail_flight(&addr, flight, cause, &err, permit);
                Err(err)
            }
        };
        // The flight is retired and the permit placed or given back before publishing: a waiter
        // woken by the result that calls again at once must start afresh (and meet the backoff just
        // recorded), not join this finished flight; and it must find the slot free (I3).
        drop(guard);
        tx.send_replace(Some(result));
    }

    /// A connect that made no connection, counted and logged once, shared and exclusive alike:
    /// `failed` is the connector's error, `None` a timeout. Returns the cause the address's
    /// backoff remembers (I12) and the error its callers get.
    pub(crate) fn connect_failure(
        &self,
        addr: &CheetahString,
        failed: Option<K::Error>,
    ) -> (Cause, PoolError) {
        let counters = &self.inner.counters;
        match failed {
            Some(err) => {
                PoolCounters::bump(&counters.connects_failed);
                let cause: Cause = Arc::new(err);
                tracing::warn!(addr = %addr, error = %cause, "connect failed");
                let err = PoolError::Connect {
                    addr: addr.clone(),
                    cause: Arc::clone(&cause),
                };
                (cause, err)
            }
            None => {
                PoolCounters::bump(&counters.connects_timed_out);
                let timeout = self.inner.config.connect_timeout;
                let err = PoolError::ConnectTimeout {
                    addr: addr.clone(),
                    timeout,
                };
                tracing::warn!(addr = %addr, ?timeout, "connect timed out");
                (Arc::new(err.clone()), err)
            }
        }
    }

    /// A failed connect (`err`, for the user's hook): under the entry lock, the flight is retired,
    /// the address backs off (I12) and the permit is given back, in one step.
    fn fail_flight(
        &self,
        addr: &CheetahString,
        flight: u64,
        cause: Cause,
        err: &PoolError,
        permit: Option<Permit>,
    ) {
        let now = Instant::now();
        self.with_slot(addr, |slot| {
            slot.end_flight(flight);
            self.inner.events.connect_failed(addr, err);
            if !self.is_closed() {
                self.inner.eject(addr, slot, now, cause);
            }
            drop(permit);
        });
    }

    /// Pools a freshly connected `conn` with the permit its connect reserved, retires the flight
    /// and publishes the connection to its waiters, all in one step under the entry lock; the
    /// sender stays with the connection for its handoff. After `close` began, closes it instead,
    /// gives the permit back, and returns the sender for the caller to publish `Closed`.
    #[allow(clippy::type_complexity)]
    fn adopt(
        &self,
        addr: &CheetahString,
        flight: u64,
        conn: C,
        permit: Option<Permit>,
        tx: watch::Sender<FlightResult<C>>,
    ) -> Result<(), (PoolError, watch::Sender<FlightResult<C>>)> {
        let now = Instant::now();
        let pooled = self.new_connection(addr.clone(), conn);
        self.with_slot(addr, |slot| {
            slot.end_flight(flight);
            let Some(mut permit) = permit else {
                unreachable!("a connect task holds its permit until it adopts or fails")
            };
            permit.mark_live();
            if self.inner.closed.load(Ordering::SeqCst) {
                self.inner.connector.close(pooled.client());
                drop(permit);
                return Err((PoolError::Closed, tx));
            }
            tx.send_replace(Some(Ok(pooled.clone())));
            let fresh = Pooled {
                conn: pooled.clone(),
                permit,
                handoff: Some(tx),
            };
            // One more shared connection while the address has room for it (issue 13); otherwise
            // (a connection inserted by hand while we connected) the first is replaced, and frees
            // its own slot.
            if slot.shared_count() < self.inner.config.max_per_address {
                slot.push_shared(fresh);
            } else if let Some(old) = slot.conn.replace(fresh) {
                self.inner
                    .retire(slot, old, EvictionReason::Replaced, None, now);
            }
            PoolCounters::bump(&self.inner.counters.connects_succeeded);
            tracing::debug!(addr = %pooled.addr(), conn = %pooled.id(), "connected");
            self.inner.events.connect(addr, pooled.id());
            Ok(())
        })
    }
}

/// An address's backoff state: for every pool, with or without a connector.
impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// When `addr` may be connected again, if it is backing off now.
    pub fn backoff_until(&self, addr: impl AsRef<str>) -> Option<Instant> {
        let now = Instant::now();
        let slot = self.inner.map.get(addr.as_ref())?;
        let retry_after = slot.ejection().retry_after(self.inner.offset(now))?;
        Some(now + retry_after)
    }

    /// The ejection count of `addr` (see [`ejection_count`](Self::ejection_count)); kept under
    /// its first name.
    pub fn backoff_failures(&self, addr: impl AsRef<str>) -> u32 {
        self.ejection_count(addr)
    }

    /// The ejection count of `addr` now: how far up its backoff schedule it is (I12). It rises with
    /// every failed connect, unhealthy eviction and connection that dies young, survives successful
    /// connects, and decays by one per quiet
    /// [`decay_interval`](crate::core::EjectionPolicy::decay_interval).
    pub fn ejection_count(&self, addr: impl AsRef<str>) -> u32 {
        let at = self.inner.offset(Instant::now());
        self.inner.map.get(addr.as_ref()).map_or(0, |slot| {
            slot.ejection().count_at(at, &self.inner.config.ejection)
        })
    }

    /// Ends the backoff of `addr` at once and forgets its ejection count: for a user with a
    /// topology signal that the server is back (a RocketMQ route update, a cluster's "node up"
    /// event), as gRPC resets its backoff out of band.
    pub fn mark_up(&self, addr: impl AsRef<str>) {
        let addr = crate::pool::key(addr.as_ref());
        self.with_existing_slot(&addr, |slot| {
            slot.reset_ejection();
        });
        tracing::debug!(addr = %addr, "marked up: backoff ended");
        self.inner.events.mark_up(&addr);
    }
}
