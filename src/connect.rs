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
use dashmap::mapref::entry::Entry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::PooledConnection;
use crate::connector::Connector;
use crate::error::{Cause, PoolError};
use crate::metrics::{EvictionReason, PoolCounters};
use crate::{ConnectionPool, WhenFull};

/// The backoff state of one address (I12).
#[derive(Debug)]
pub(crate) struct AddrBackoff {
    /// Consecutive failures (failed connects and unhealthy evictions) since the last success.
    pub(crate) failures: u32,
    /// No connect before this instant.
    pub(crate) until: Instant,
    pub(crate) cause: Cause,
}

type FlightResult<C> = Option<Result<PooledConnection<C>, PoolError>>;

/// A connect in flight for one address; its result is published once on the watch channel.
pub(crate) struct Flight<C> {
    id: u64,
    /// When the connect gives up; every waiter's wait is bounded by it (I16).
    deadline: Instant,
    rx: watch::Receiver<FlightResult<C>>,
}

/// How long a waiter waits past its flight's deadline for the flight's own verdict. The connect
/// task times out *at* the deadline and publishes at once, so waiters normally return with it, after
/// the slot is back (I3); the grace only bounds the wait if the task were starved. It covers timer
/// rounding (tokio's timers have millisecond resolution).
const WAIT_GRACE: Duration = Duration::from_millis(5);

/// The cause recorded when a connect task ended without publishing a result (its runtime shut
/// down under it).
#[derive(Debug, thiserror::Error)]
#[error("the connect task ended without a result")]
struct ConnectAbandoned;

/// What a connect task holds until it ends, given back however it ends: its capacity slot (unless
/// the connection was pooled in it) and its entry in the flight map. A task dropped mid-connect (its
/// runtime shut down under it) thus leaks no slot (I3) and leaves no dead flight for later callers
/// to join; their waits end with a "connect task ended" error.
struct FlightGuard<'a, C, K: Connector<C>> {
    pool: &'a ConnectionPool<C, K>,
    addr: &'a CheetahString,
    flight: u64,
    slot_held: bool,
}

impl<C, K: Connector<C>> Drop for FlightGuard<'_, C, K> {
    fn drop(&mut self) {
        let inner = &self.pool.inner;
        if self.slot_held {
            inner.ledger.release();
        }
        inner
            .flights
            .remove_if(self.addr, |_, f| f.id == self.flight);
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

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<C>,
{
    /// A healthy pooled connection for `addr`, connecting through the connector if there is none.
    ///
    /// - Concurrent callers for one address share a single connect and its result, error included
    ///   (I4).
    /// - A capacity slot is reserved before connecting and returned if the connect fails (I3).
    /// - Waiting is bounded by the connect timeout (I16).
    /// - After a failed connect or an unhealthy eviction the address backs off (I12): until the
    ///   delay has passed, callers get [`PoolError::Backoff`] at once, with the last cause.
    ///
    /// # Errors
    /// [`PoolError::InvalidAddress`] (no connect attempted), [`PoolError::Backoff`],
    /// [`PoolError::AtCapacity`], [`PoolError::Connect`], [`PoolError::ConnectTimeout`],
    /// [`PoolError::Closed`].
    ///
    /// # Cancel safety
    /// Cancel safe. Dropping the future at any await point leaks no slot and leaves no flight
    /// behind: the connect runs in its own task, which pools its connection or returns its slot.
    pub async fn get_or_connect(
        &self,
        addr: &CheetahString,
    ) -> Result<PooledConnection<C>, PoolError> {
        if self.is_closed() {
            return Err(PoolError::Closed);
        }
        if let Some(conn) = self.get(addr) {
            return Ok(conn);
        }
        // Validated only on the way to a connect: a pooled address was validated when it was
        // connected (or inserted by hand), and a hit must cost no more than a `get`.
        if let Err(reason) = self.inner.connector.validate(addr) {
            return Err(PoolError::InvalidAddress {
                addr: addr.clone(),
                reason,
            });
        }
        // An unfit connection still pooled is evicted now rather than by the next sweep, so an
        // unhealthy one starts its address's backoff before we would dial again (I12).
        if let Some(stale) = self.peek(addr) {
            self.evict_unhealthy_candidates(Instant::now(), &[(addr.clone(), stale.id())]);
        }
        let conn = match self.join_or_start(addr)? {
            Joined::Ready(conn) => return Ok(conn),
            Joined::Wait(deadline, rx) => self.wait_flight(addr, deadline, rx).await?,
        };
        // I8: the flight's connection may have died while we waited (another waiter used it first
        // and found it closed). Never hand it out; say so rather than wait again past the deadline.
        if self.usable(&conn) {
            Ok(conn)
        } else {
            Err(PoolError::Connect {
                addr: addr.clone(),
                cause: Arc::new(ClosedAfterConnect),
            })
        }
    }

    fn backoff_error(&self, addr: &CheetahString, now: Instant) -> Option<PoolError> {
        let backoff = self.inner.backoff.get(addr)?;
        (backoff.until > now).then(|| PoolError::Backoff {
            addr: addr.clone(),
            retry_after: backoff.until - now,
            failures: backoff.failures,
            cause: Arc::clone(&backoff.cause),
        })
    }

    /// Joins the flight of `addr`, or reserves a slot and starts one. Never awaits.
    fn join_or_start(&self, addr: &CheetahString) -> Result<Joined<C>, PoolError> {
        if let Some(flight) = self.inner.flights.get(addr) {
            PoolCounters::bump(&self.inner.counters.connects_shared);
            return Ok(Joined::Wait(flight.deadline, flight.rx.clone()));
        }
        if let Some(err) = self.backoff_error(addr, Instant::now()) {
            PoolCounters::bump(&self.inner.counters.backoff_rejections);
            return Err(err);
        }
        // Everything else is decided under the flight entry, so that exactly one caller starts the
        // flight and every other caller joins it (I4). The slot is reserved only then: a caller that
        // raced in between must join the flight, not find the slot that flight holds taken and be
        // turned away as at capacity. (Lock order: the flight entry, then the map.)
        match self.inner.flights.entry(addr.clone()) {
            Entry::Occupied(flight) => {
                PoolCounters::bump(&self.inner.counters.connects_shared);
                let flight = flight.get();
                Ok(Joined::Wait(flight.deadline, flight.rx.clone()))
            }
            Entry::Vacant(vacant) => {
                // A flight may have finished between our first look and here. It pooled its
                // connection, or recorded its backoff, before it left `flights`: honour either.
                if let Some(conn) = self.get(addr) {
                    return Ok(Joined::Ready(conn));
                }
                if let Some(err) = self.backoff_error(addr, Instant::now()) {
                    PoolCounters::bump(&self.inner.counters.backoff_rejections);
                    return Err(err);
                }
                if !self.reserve_slot(addr) {
                    return Err(self.at_capacity());
                }
                let (tx, rx) = watch::channel(None);
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                // `checked_add`: any timeout >= 1 ms is valid, and `Instant + Duration::MAX` panics.
                let now = Instant::now();
                let deadline = now
                    .checked_add(self.inner.config.connect_timeout)
                    .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600));
                vacant.insert(Flight {
                    id,
                    deadline,
                    rx: rx.clone(),
                });
                PoolCounters::bump(&self.inner.counters.connects_attempted);
                tokio::spawn(self.clone().run_connect(addr.clone(), id, deadline, tx));
                Ok(Joined::Wait(deadline, rx))
            }
        }
    }

    /// Takes a slot for a new connection, making room by LRU eviction if the policy allows (I3).
    fn reserve_slot(&self, addr: &CheetahString) -> bool {
        self.inner.ledger.try_acquire()
            || (self.inner.config.when_full == WhenFull::EvictLeastRecentlyUsed
                && self.evict_lru_except(addr)
                && self.inner.ledger.try_acquire())
    }

    async fn wait_flight(
        &self,
        addr: &CheetahString,
        deadline: Instant,
        mut rx: watch::Receiver<FlightResult<C>>,
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
        PoolError::Connect {
            addr: addr.clone(),
            cause: Arc::new(ConnectAbandoned),
        }
    }

    /// The connect task: owns the reserved slot until the connection is pooled or the slot is given
    /// back, retires the flight, then publishes the result.
    async fn run_connect(
        self,
        addr: CheetahString,
        flight: u64,
        deadline: Instant,
        tx: watch::Sender<FlightResult<C>>,
    ) {
        let mut guard = FlightGuard {
            pool: &self,
            addr: &addr,
            flight,
            slot_held: true,
        };
        let timeout = self.inner.config.connect_timeout;
        tracing::debug!(addr = %addr, "connecting");
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outcome = tokio::time::timeout(remaining, self.inner.connector.connect(&addr)).await;
        let counters = &self.inner.counters;
        let result = match outcome {
            Ok(Ok(conn)) => self.adopt(addr.clone(), conn, &mut guard.slot_held),
            Ok(Err(err)) => {
                PoolCounters::bump(&counters.connects_failed);
                let cause: Cause = Arc::new(err);
                tracing::warn!(addr = %addr, error = %cause, "connect failed");
                self.record_backoff(&addr, Arc::clone(&cause));
                Err(PoolError::Connect {
                    addr: addr.clone(),
                    cause,
                })
            }
            Err(_elapsed) => {
                PoolCounters::bump(&counters.connects_timed_out);
                let err = PoolError::ConnectTimeout {
                    addr: addr.clone(),
                    timeout,
                };
                tracing::warn!(addr = %addr, ?timeout, "connect timed out");
                self.record_backoff(&addr, Arc::new(err.clone()));
                Err(err)
            }
        };
        // Give the slot back (unless pooled) and retire the flight before publishing: a waiter woken
        // by the result that calls again at once must start afresh (and meet the backoff just
        // recorded), not join this finished flight and receive its stale result; and it must find
        // the slot free (I3). Waiters already hold their receivers.
        drop(guard);
        tx.send_replace(Some(result));
    }

    /// Pools a freshly connected `conn` in the slot its connect reserved; clears `slot_held` once
    /// the slot belongs to the pooled connection.
    fn adopt(
        &self,
        addr: CheetahString,
        conn: C,
        slot_held: &mut bool,
    ) -> Result<PooledConnection<C>, PoolError> {
        if self.is_closed() {
            self.inner.connector.close(&conn);
            return Err(PoolError::Closed);
        }
        let pooled = self.new_connection(addr, conn);
        // Cannot fail: the slot is held. On a replacement `place` returns the reservation itself.
        self.place(pooled.clone(), true)?;
        *slot_held = false;
        PoolCounters::bump(&self.inner.counters.connects_succeeded);
        self.inner.backoff.remove(pooled.addr());
        // `close` may have swept the map just before we pooled: then remove our own connection.
        if self.inner.closed.load(Ordering::SeqCst) {
            self.remove_if(pooled.addr(), pooled.id(), EvictionReason::Manual, |_| true);
            return Err(PoolError::Closed);
        }
        tracing::debug!(addr = %pooled.addr(), conn = %pooled.id(), "connected");
        Ok(pooled)
    }

    /// Counts one more failure of `addr` and schedules its next permitted connect (I12).
    pub(crate) fn record_backoff(&self, addr: &CheetahString, cause: Cause) {
        let now = Instant::now();
        let policy = self.inner.config.backoff;
        let unit = self.inner.jitter_unit();
        let mut state = self
            .inner
            .backoff
            .entry(addr.clone())
            .or_insert_with(|| AddrBackoff {
                failures: 0,
                until: now,
                cause: Arc::clone(&cause),
            });
        state.failures = state.failures.saturating_add(1);
        let delay = policy.delay(state.failures, unit);
        // A delay beyond the clock's range (only with an absurd cap) backs off for a year instead.
        state.until = now
            .checked_add(delay)
            .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
            .unwrap_or(now);
        state.cause = cause;
        tracing::debug!(addr = %addr, failures = state.failures, ?delay, "backing off");
    }

    /// When `addr` may be connected again, if it is backing off now.
    pub fn backoff_until(&self, addr: &CheetahString) -> Option<Instant> {
        let until = self.inner.backoff.get(addr)?.until;
        (until > Instant::now()).then_some(until)
    }

    /// Consecutive failures of `addr` counted by its backoff (0 once a connect succeeds).
    pub fn backoff_failures(&self, addr: &CheetahString) -> u32 {
        self.inner.backoff.get(addr).map_or(0, |b| b.failures)
    }

    /// The ejection count of `addr`: how far up its backoff schedule it is (I12).
    pub fn ejection_count(&self, addr: &CheetahString) -> u32 {
        self.backoff_failures(addr)
    }

    /// Ends the backoff of `addr` at once and forgets its ejection count: for a user with a
    /// topology signal that the server is back (a route update, a cluster's "node up" event).
    pub fn mark_up(&self, addr: &CheetahString) {
        self.inner.backoff.remove(addr);
    }

    /// Addresses the pool keeps any state for: a connection, a connect in flight, or an ejection
    /// record. Bounded by live addresses plus addresses backing off.
    pub fn tracked_addresses(&self) -> usize {
        let mut keys: std::collections::HashSet<CheetahString> =
            self.inner.map.iter().map(|e| e.key().clone()).collect();
        keys.extend(self.inner.flights.iter().map(|e| e.key().clone()));
        keys.extend(self.inner.backoff.iter().map(|e| e.key().clone()));
        keys.len()
    }

    /// Checks `conn` actively with the connector's [`probe`](Connector::probe), bounded by the
    /// connect timeout, and records the outcome as a call on it.
    ///
    /// # Errors
    /// [`PoolError::Connect`] with the probe's error, or [`PoolError::ConnectTimeout`].
    pub async fn probe(&self, conn: &PooledConnection<C>) -> Result<(), PoolError> {
        let timeout = self.inner.config.connect_timeout;
        let call = conn.begin();
        match tokio::time::timeout(timeout, self.inner.connector.probe(conn.client())).await {
            Ok(Ok(())) => {
                call.success();
                Ok(())
            }
            Ok(Err(err)) => {
                call.failure();
                Err(PoolError::Connect {
                    addr: conn.addr().clone(),
                    cause: Arc::new(err),
                })
            }
            Err(_) => {
                call.failure();
                Err(PoolError::ConnectTimeout {
                    addr: conn.addr().clone(),
                    timeout,
                })
            }
        }
    }
}
