//! Metrics: per connection ([`ConnectionMetrics`]) and pool-wide ([`PoolStats`]).

use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::time::Instant;

use crate::ConnectionPool;
use crate::connection::ConnId;
use crate::connector::ManagesConnections;
use crate::slot::Slot;

use crate::core::{
    CallClaim, CallRecord, HealthPolicy, LatencySnapshot, UnhealthyReason, Verdict, is_idle,
};
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicU8, AtomicU64, Ordering};

const FLAG_UNHEALTHY: u8 = 1;
const FLAG_CLOSED: u8 = 2;
/// Set by `get` (a use at some instant it did not read), cleared when an observer of the idle clock
/// folds it in (see [`ConnectionMetrics::mark_used`]).
const FLAG_USED: u8 = 4;
/// Set by the first call guard dropped unfinished, which alone is logged at `warn`. Kept here, in
/// a spare bit, rather than in a byte of its own padded to 8 in every connection (issue 16).
const FLAG_WARNED_UNFINISHED: u8 = 8;
/// An exclusive connection came back from a checkout fit for use: it served its holder, whether or
/// not the holder recorded calls (I12: it no longer counts as dying young without serving).
const FLAG_SERVED: u8 = 16;
/// The flags that make a connection unfit for use.
const FLAGS_UNFIT: u8 = FLAG_UNHEALTHY | FLAG_CLOSED;

/// The metrics and health state of **one** connection (I13): a replaced connection's successor
/// starts from zero, and results recorded against the old one never reach it.
///
/// The state machine is the core's: a [`CallClaim`] (calls in flight and a sweep's claim, one
/// atomic word) and a [`CallRecord`] (outcomes, the failure run, the window, the unhealthy latch)
/// under a short lock taken once per finished call. What `get` reads and writes on every hit (the
/// health flags and the "used" mark) are one atomic byte beside it.
///
/// The idle clock has two parts: an exact clock that calls, recorded results and
/// [`touch`](Self::touch) move, and a "used" mark that [`ConnectionPool::get`](crate::ConnectionPool::get)
/// sets without reading the clock ([`mark_used`](Self::mark_used)). The mark means "used at some
/// instant not later than whoever sees it"; the idle sweep and the snapshots fold it into the clock
/// at their own instant (never earlier than the use), so a connection is never taken as idle early
/// (I5) and may be taken up to one sweep interval late (I6's bound is `max_idle + 2 × interval`). Time is the runtime's clock (virtual under madsim and
/// under tokio's paused time), relative to the connection's creation.
///
/// Every outcome is also added to the pool's cumulative call counters (shared by all the pool's
/// connections, so they survive evictions): a few relaxed atomic adds per call on top of the lock.
/// Each successful call's latency goes to this connection's latency distribution
/// ([`latency`](Self::latency)), kept under the record's lock.
///
/// A connection that never failed and never had a call cancelled keeps everything here in its one
/// allocation; the first failure or cancel allocates the failure side of its record (80 bytes), and
/// the first success its latency distribution (456 bytes).
///
/// The fields are in a fixed order (`repr(C)`), hottest first: a pooled connection's metrics open
/// its one allocation, right after the `Arc`'s counts (see `connection::Entry`), so the flag byte
/// every `get` reads, and the claim, idle clock, creation offset and pool part every call touches,
/// share the cache line that the handle's clone writes anyway (issue 16: with the flag byte at the
/// end, a `get` at 100,000 connections missed the cache once more than the floor, measured with
/// cachegrind in BENCHMARKS.md).
#[derive(Debug)]
#[repr(C)]
pub struct ConnectionMetrics {
    /// `FLAG_UNHEALTHY` (the record's latch closed), `FLAG_CLOSED` and `FLAG_USED`, for a lock-free
    /// `get` that reads one byte and writes it only when the mark is clear.
    flags: AtomicU8,
    /// This connection's stripe of the pool's totals (see `totals`): a byte beside the flags.
    stripe: u8,
    claim: CallClaim,
    /// Nanoseconds since the pool's origin (`pool.origin`) of the last use folded in; only moves
    /// forward, and starts at `born_ns`. Exact for calls and recorded results (at `max_idle` after
    /// one a connection is fresh); a `get` is only marked (`FLAG_USED`) and folded in later, at an
    /// instant not earlier than the `get`.
    last_used_ns: AtomicU64,
    /// When the connection was made, in nanoseconds since the pool's origin: 8 bytes where an
    /// `Instant` is 16 (issue 16).
    born_ns: u64,
    /// What every connection of the pool shares (its origin, health policy, cumulative totals and
    /// call timeout): one `Arc` where copies of each cost 32 more bytes per connection (issue 16).
    pool: Arc<PoolShared>,
    /// The outcome record and the latency distribution, under one short lock taken once per
    /// finished call.
    record: Mutex<Outcomes>,
    /// Nanoseconds since the pool's origin of the last liveness probe that ended (0: never). Apart from
    /// the idle clock: a probe is not a use (I5, I6), but it spaces the next probe.
    probed_ns: AtomicU64,
}

/// What a connection's record lock guards.
#[derive(Debug, Default)]
struct Outcomes {
    record: CallRecord,
    /// Latencies of this connection's successful calls. One per connection: a replacement starts
    /// empty, like the rest of its metrics (I13). Allocated by the first success (issue 16: 456
    /// bytes inline in every connection were most of its memory, and a connection that never
    /// completes a call needs none). Plain counters under the record's lock, which a success takes
    /// anyway: a pointer of 8 bytes where a lock-free `OnceLock<Box<LatencyHistogram>>` beside the
    /// lock was 16, and plain adds where the histogram's were atomic.
    latency: Option<Box<LatencySnapshot>>,
}

/// What every connection of a pool shares, reached through one `Arc` in each connection's metrics
/// (issue 16: the policy's `Arc`, the totals' `Arc`, the call timeout and the creation `Instant`
/// were 48 bytes in every connection; the `Arc` and a creation offset are 16).
pub(crate) struct PoolShared {
    /// The instant every connection clock counts from: the pool's creation (or a connection's own
    /// creation, for one made by hand with [`ConnectionMetrics::new`]).
    origin: Instant,
    health: HealthPolicy,
    /// The pool's cumulative counters (none for a connection made without a pool); each
    /// connection adds to its own stripe of them (`ConnectionMetrics::stripe`).
    totals: Option<CallTotals>,
    /// The pool's [`call_timeout`](crate::PoolConfig::call_timeout): the default of
    /// [`PooledConnection::call`](crate::PooledConnection::call).
    call_timeout: Option<Duration>,
    /// Run when a connection's last call (or probe) in flight ends, so that it may now be closed
    /// to make room: under [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull) with a cap, it
    /// wakes the checkouts waiting at the cap (issue 13; without it a waiter slept to its
    /// deadline while a fresh caller made room at once). `None` otherwise: one branch per call.
    on_quiet: Option<crate::core::ReleaseHook>,
}

impl std::fmt::Debug for PoolShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolShared")
            .field("origin", &self.origin)
            .field("health", &self.health)
            .field("totals", &self.totals)
            .field("call_timeout", &self.call_timeout)
            .field("on_quiet", &self.on_quiet.is_some())
            .finish()
    }
}

impl PoolShared {
    /// A pool's: its connections count time from `origin`, are judged by `health`, add their
    /// outcomes to one set of totals, and default to `call_timeout`.
    pub(crate) fn for_pool(
        origin: Instant,
        health: HealthPolicy,
        call_timeout: Option<Duration>,
        on_quiet: Option<crate::core::ReleaseHook>,
    ) -> Self {
        Self {
            origin,
            health,
            totals: Some(CallTotals::default()),
            call_timeout,
            on_quiet,
        }
    }

    /// A connection may have just become closable to make room (its last call ended, or the last
    /// caller waiting for its connect took it): runs the quiet hook, if the pool has one.
    pub(crate) fn quiet(&self) {
        if let Some(on_quiet) = &self.on_quiet {
            on_quiet();
        }
    }

    /// The pool's cumulative counters.
    pub(crate) fn fill_totals(&self, stats: &mut PoolStats) {
        if let Some(totals) = &self.totals {
            totals.fill(stats);
        }
    }
}

impl ConnectionMetrics {
    /// Fresh metrics for a connection created at `created_at`, judged by `health` (copied into a
    /// shared part of its own, as a pool's connections share their pool's). A pooled connection's
    /// outcomes also go to the pool's cumulative counters (see [`PoolStats`]); these, made without
    /// a pool, only here.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionMetrics;
    /// use keyed_pool::core::HealthPolicy;
    /// let now = tokio::time::Instant::now();
    /// let m = ConnectionMetrics::new(now, HealthPolicy::default());
    /// m.record_success_at(now, Duration::from_millis(3));
    /// assert_eq!(m.success_count(), 1);
    /// assert_eq!(m.latency().count(), 1);
    /// ```
    pub fn new(created_at: Instant, health: impl Into<Arc<HealthPolicy>>) -> Self {
        let shared = PoolShared {
            origin: created_at,
            health: *health.into(),
            totals: None,
            call_timeout: None,
            on_quiet: None,
        };
        Self::in_pool(&Arc::new(shared), created_at)
    }

    /// A pool's connection made at `created_at` (not before the pool's origin): every outcome is
    /// also added to the pool's totals, which outlive the connection.
    pub(crate) fn in_pool(pool: &Arc<PoolShared>, created_at: Instant) -> Self {
        let born_ns = nanos(created_at.saturating_duration_since(pool.origin));
        Self {
            flags: AtomicU8::new(0),
            stripe: pool.totals.as_ref().map_or(0, CallTotals::next_stripe),
            claim: CallClaim::default(),
            last_used_ns: AtomicU64::new(born_ns),
            born_ns,
            pool: Arc::clone(pool),
            record: Mutex::new(Outcomes::default()),
            probed_ns: AtomicU64::new(0),
        }
    }

    /// The pool's [`call_timeout`](crate::PoolConfig::call_timeout) (`None` for a connection made
    /// by hand).
    pub(crate) fn call_timeout(&self) -> Option<Duration> {
        self.pool.call_timeout
    }

    /// The distribution of this connection's successful calls' latencies.
    pub fn latency(&self) -> LatencySnapshot {
        self.record
            .lock()
            .latency
            .as_deref()
            .copied()
            .unwrap_or_default()
    }

    /// `now` as an offset since the pool's origin: the time base of the idle clock, the probe
    /// clock and the record (the same for every connection of a pool).
    fn at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.pool.origin)
    }

    /// `true` the first time it is called on this connection: whether an unfinished call guard is
    /// the first, the one worth a warning.
    pub(crate) fn first_unfinished(&self) -> bool {
        self.flags
            .fetch_or(FLAG_WARNED_UNFINISHED, Ordering::Relaxed)
            & FLAG_WARNED_UNFINISHED
            == 0
    }

    /// Moves the idle clock to `now` (never backwards).
    pub fn touch(&self, now: Instant) {
        self.touch_at(self.at(now));
    }

    /// [`touch`](Self::touch) at an offset since the pool's origin already computed: a recorded
    /// outcome needs the offset for its record too, and `Instant` arithmetic is a fifth of a
    /// call's instructions (issue 16's instruction counts).
    fn touch_at(&self, at: Duration) {
        self.last_used_ns.fetch_max(nanos(at), Ordering::AcqRel);
    }

    /// Marks the connection used now without reading the clock: what `get` does on every hit. It
    /// writes only when the mark is clear, so repeated hits between two sweeps read one byte and
    /// write nothing (no cache line bounces between the cores that share a connection).
    ///
    /// The use is folded into the idle clock by the next observer that needs it (the idle sweep,
    /// [`is_idle_at`](Self::is_idle_at), [`since_last_use`](Self::since_last_use)), at that
    /// observer's instant: never earlier than the use, so the connection is never idle early (I5).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionMetrics;
    /// use keyed_pool::core::HealthPolicy;
    /// let t0 = tokio::time::Instant::now();
    /// let m = ConnectionMetrics::new(t0, HealthPolicy::default());
    /// m.mark_used();
    /// assert!(m.pending_use());
    /// assert_eq!(m.last_used(), t0, "not folded in yet");
    /// let later = t0 + Duration::from_secs(60);
    /// assert!(!m.is_idle_at(later, Some(Duration::from_secs(10))), "I5: the use is folded at 60 s");
    /// assert!(!m.pending_use());
    /// assert_eq!(m.last_used(), later);
    /// ```
    pub fn mark_used(&self) {
        // Load first: a `fetch_or` would write (and take the line exclusive) on every hit.
        if self.flags.load(Ordering::Relaxed) & FLAG_USED == 0 {
            self.flags.fetch_or(FLAG_USED, Ordering::Release);
        }
    }

    /// `true` while a [`mark_used`](Self::mark_used) has not been folded into the idle clock yet
    /// ([`last_used`](Self::last_used) does not include it).
    pub fn pending_use(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAG_USED != 0
    }

    /// The clock for an exact use about to be recorded (a call's start or end, a recorded result),
    /// read after clearing a pending `get`'s mark: a `get` that found the mark set came before the
    /// clear, hence before this instant, so the use recorded at it covers that `get` too and the
    /// edge stays exact. Without the clear, a `get` before every call would leave every connection
    /// to the next sweep's fold.
    pub(crate) fn now_for_use(&self) -> Instant {
        if self.flags.load(Ordering::Relaxed) & FLAG_USED != 0 {
            self.flags.fetch_and(!FLAG_USED, Ordering::AcqRel);
        }
        Instant::now()
    }

    /// Folds a pending use into the idle clock, at `now` or, if the clock has moved past `now`
    /// since the observer read it, at the clock read after the mark was taken: the use happened
    /// before the mark was cleared, so it is never recorded as earlier than it was (I5), and a
    /// sweep that read `now` before a racing `get` does not take that `get` for an older one.
    fn fold(&self, now: Instant) {
        // Clear first, then read the clock: a `get` that finds the mark still set (and so writes
        // nothing) came before the clear, hence before this clock read.
        if self.take_mark() {
            self.touch(now.max(Instant::now()));
        }
    }

    /// Clears the "used" mark and returns whether it was set, without folding it: the first half
    /// of [`fold`](Self::fold), for a sweep that folds a chunk of marks at one clock reading
    /// ([`MarkFolds`]). Until the fold the use is in neither the mark nor the clock, so the caller
    /// must keep every idle eviction of this connection out until it has folded: a sweep holds the
    /// shard's read lock from the clear to the fold, and an eviction needs the write lock.
    pub(crate) fn take_mark(&self) -> bool {
        // Load first: most connections a sweep looks at carry no mark, and a load does not take
        // the line exclusive (a `get` on another core keeps reading it).
        self.flags.load(Ordering::Relaxed) & FLAG_USED != 0
            && self.flags.fetch_and(!FLAG_USED, Ordering::AcqRel) & FLAG_USED != 0
    }

    /// Notes that the connection served a caller (an exclusive connection returned fit).
    pub(crate) fn mark_served(&self) {
        if self.flags.load(Ordering::Relaxed) & FLAG_SERVED == 0 {
            self.flags.fetch_or(FLAG_SERVED, Ordering::Relaxed);
        }
    }

    /// Whether the connection served and its last recorded call did not fail: a successful call
    /// recorded (or, exclusive, returned fit from a checkout) and no failure since. A connection
    /// found closed young counts against its address unless it ended so (I12): a server that
    /// closes between requests (a keep-alive's end) closes gracefully, one that dies failing a
    /// request in flight, or never answers at all, does not.
    pub(crate) fn ended_cleanly(&self) -> bool {
        let record = &self.record.lock().record;
        let served =
            self.flags.load(Ordering::Relaxed) & FLAG_SERVED != 0 || record.successes() > 0;
        served && record.consecutive_failures() == 0
    }

    /// Records a successful call that took `latency`, finished at `now`.
    pub fn record_success_at(&self, now: Instant, latency: Duration) {
        let at = self.at(now);
        {
            let latency_us = micros(latency);
            let mut outcomes = self.record.lock();
            outcomes
                .record
                .success_us(&self.pool.health, micros(at), latency_us);
            outcomes
                .latency
                .get_or_insert_with(Box::default)
                .record_us(latency_us);
        }
        if let Some(totals) = &self.pool.totals {
            totals.success(self.stripe, latency);
        }
        self.touch_at(at);
    }

    /// Records a failed call finished at `now`; returns the verdict after it. An unhealthy verdict
    /// is latched with its reason: the connection stays unhealthy whatever comes after (I9).
    pub fn record_error_at(&self, now: Instant) -> Verdict {
        let at = self.at(now);
        let verdict = self.record.lock().record.failure(&self.pool.health, at);
        if let Some(totals) = &self.pool.totals {
            totals.failure(self.stripe);
        }
        self.touch_at(at);
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

    /// Why the connection is unusable, if it is: the reason its unhealthy latch closed on (stored
    /// then, so it names the evidence that tripped it), or else a closed transport. An unhealthy
    /// connection stays unhealthy however its transport is later found closed, so its eviction
    /// counts against its address either way (I12).
    pub fn unusable_reason(&self) -> Option<UnhealthyReason> {
        let flags = self.flags.load(Ordering::Acquire);
        if flags & FLAG_UNHEALTHY != 0 {
            return self.record.lock().record.unhealthy();
        }
        if flags & FLAG_CLOSED != 0 {
            return Some(UnhealthyReason::Closed);
        }
        None
    }

    /// `true` unless the connection was judged unhealthy or its transport is known closed.
    pub fn is_healthy(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAGS_UNFIT == 0
    }

    /// `true` once the transport was marked closed.
    pub fn is_closed(&self) -> bool {
        self.flags.load(Ordering::Acquire) & FLAG_CLOSED != 0
    }

    /// The idle predicate at `now` (I5): nothing in flight and unused for longer than `max_idle`.
    /// A pending use ([`mark_used`](Self::mark_used)) is folded into the idle clock first, so the
    /// connection counts as used at `now` (or later, see [`mark_used`](Self::mark_used)).
    pub fn is_idle_at(&self, now: Instant, max_idle: Option<Duration>) -> bool {
        if max_idle.is_none() {
            return false;
        }
        self.fold(now);
        is_idle(self.in_flight(), self.since_clock(now), max_idle)
    }

    /// The idle predicate at `now` without folding a pending use: a connection marked used is not
    /// idle. For gauges (`stats().idle`), which must not move the clock they report on, and for the
    /// idle sweep's look once [`MarkFolds::take`] found no mark.
    pub(crate) fn seems_idle_at(&self, now: Instant, max_idle: Option<Duration>) -> bool {
        !self.pending_use() && is_idle(self.in_flight(), self.since_clock(now), max_idle)
    }

    /// [`seems_idle_at`](Self::seems_idle_at) at a sweep's instant, for a sweep that judges many
    /// connections at one instant: compared in the idle clock's own nanoseconds, `now` converted
    /// once per sweep ([`SweepInstant`]), where building and subtracting an `Instant` per
    /// connection was half of an idle look's instructions (issue 16). The same predicate to the
    /// nanosecond (I5, I6); a connection counting from another origin is judged by `seems_idle_at`.
    pub(crate) fn seems_idle_at_sweep(&self, at: &SweepInstant, max_idle: Duration) -> bool {
        if self.pool.origin != at.origin {
            return self.seems_idle_at(at.now, Some(max_idle));
        }
        !self.pending_use() && self.in_flight() == 0 && self.idle_past(at, max_idle)
    }

    /// [`try_retire_idle`](Self::try_retire_idle) at a sweep's instant, compared as
    /// [`seems_idle_at_sweep`](Self::seems_idle_at_sweep) compares: the same claim, the same
    /// fold first (I5, I7), no `Instant` arithmetic per eviction.
    pub(crate) fn try_retire_idle_sweep(&self, at: &SweepInstant, max_idle: Duration) -> bool {
        if self.pool.origin != at.origin {
            return self.try_retire_idle(at.now, Some(max_idle));
        }
        self.claim.try_retire(|| {
            self.fold(at.now);
            self.idle_past(at, max_idle)
        })
    }

    /// Whether the idle clock is more than `max_idle` before the sweep's instant, in nanoseconds
    /// since the shared origin (`at.origin` is this connection's): `now - last_used() > max_idle`.
    fn idle_past(&self, at: &SweepInstant, max_idle: Duration) -> bool {
        at.now_ns
            .saturating_sub(self.last_used_ns.load(Ordering::Acquire))
            > nanos(max_idle)
    }

    /// Claims the connection for eviction as idle, atomically with respect to calls starting (I5):
    /// succeeds only if no call is in flight and it is idle at `now`, a pending use folded in first.
    /// On success the connection stays marked retired.
    ///
    /// The pool calls it under the shard's write lock, which no `get` of that shard holds at the
    /// same time: a `get` that ran after the sweep looked left its mark before this, and the fold
    /// counts it as a use at `now` or later, so the connection stays (I7).
    pub(crate) fn try_retire_idle(&self, now: Instant, max_idle: Option<Duration>) -> bool {
        self.claim.try_retire(|| {
            self.fold(now);
            is_idle(0, self.since_clock(now), max_idle)
        })
    }

    /// Claims the connection for eviction if no call is in flight, whatever its idle clock (to make
    /// room under `WhenFull::EvictLeastRecentlyUsed`). Stays marked retired.
    pub(crate) fn try_retire_unused(&self) -> bool {
        self.claim.try_retire(|| true)
    }

    /// A call starts. It does not move the idle clock: while it is in flight the claim keeps the
    /// connection from idle eviction (I5), and every way a call ends (success, failure, cancelled)
    /// moves the clock to its end, which is later. One clock offset and one atomic max fewer per
    /// call (issue 16).
    pub(crate) fn call_started(&self) {
        self.claim.call_started();
    }

    /// A call ends (after its outcome was recorded, so the idle clock has moved first).
    pub(crate) fn call_ended(&self) {
        self.claim_ended();
    }

    /// A call or probe ends; if it was the last in flight, the pool's quiet hook runs (see
    /// [`PoolShared::on_quiet`]).
    fn claim_ended(&self) {
        if self.claim.call_ended() {
            self.pool.quiet();
        }
    }

    /// A liveness probe starts: it counts as a call in flight (so no sweep evicts the connection
    /// under it, I5) but does not move the idle clock (a probe is not a use, I6).
    pub(crate) fn probe_started(&self) {
        self.claim.call_started();
    }

    /// A liveness probe ended at `now` with `end`: its outcome is recorded as a call, the probe
    /// clock moves, the idle clock does not. Returns the verdict after it.
    pub(crate) fn probe_ended(&self, now: Instant, end: ProbeEnd) -> Verdict {
        let at = self.at(now);
        let verdict = {
            let record = &mut self.record.lock().record;
            match end {
                ProbeEnd::Answered(latency) => record.success(&self.pool.health, at, latency),
                ProbeEnd::Silent => {
                    record.probe_failure(&self.pool.health, at);
                }
                ProbeEnd::Closed => {
                    record.failure(&self.pool.health, at);
                }
                ProbeEnd::Dropped => {}
            }
            record
                .unhealthy()
                .map_or(Verdict::Healthy, Verdict::Unhealthy)
        };
        if verdict.is_unhealthy() {
            self.flags.fetch_or(FLAG_UNHEALTHY, Ordering::AcqRel);
        }
        if end == ProbeEnd::Closed {
            self.mark_closed();
        }
        if end != ProbeEnd::Dropped {
            // At least 1 ns: 0 means "never probed".
            let ns = nanos(at).max(1);
            self.probed_ns.fetch_max(ns, Ordering::AcqRel);
        }
        self.claim_ended();
        verdict
    }

    /// When a liveness probe of this connection last ended, if one has.
    pub fn last_probed(&self) -> Option<Instant> {
        match self.probed_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.pool.origin + Duration::from_nanos(ns)),
        }
    }

    /// Time at `now` since the connection last showed it was alive: its last use or its last
    /// probe, whichever is later. What [`PoolConfig::probe_idle`](crate::PoolConfig::probe_idle)
    /// and [`PoolConfig::check_idle_before_use`](crate::PoolConfig::check_idle_before_use) are
    /// compared with.
    pub fn since_last_checked(&self, now: Instant) -> Duration {
        self.fold(now);
        let last = self
            .last_used()
            .max(self.last_probed().unwrap_or_else(|| self.created_at()));
        now.saturating_duration_since(last)
    }

    pub(crate) fn record_cancelled_at(&self, now: Instant) {
        self.record.lock().record.cancelled();
        if let Some(totals) = &self.pool.totals {
            totals.cancelled(self.stripe);
        }
        self.touch(now);
    }

    /// When the connection was created.
    pub fn created_at(&self) -> Instant {
        self.pool.origin + Duration::from_nanos(self.born_ns)
    }

    /// The idle clock: when the connection was last used (a call, a recorded result, or a `get`
    /// folded in since). A `get` not folded in yet ([`pending_use`](Self::pending_use)) is not in
    /// it; [`since_last_use`](Self::since_last_use) folds it.
    pub fn last_used(&self) -> Instant {
        self.pool.origin + Duration::from_nanos(self.last_used_ns.load(Ordering::Acquire))
    }

    /// Time since the last use, at `now`, a pending use folded in first (as used at `now`).
    pub fn since_last_use(&self, now: Instant) -> Duration {
        self.fold(now);
        self.since_clock(now)
    }

    /// Time at `now` since the idle clock, whatever is pending.
    fn since_clock(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_used())
    }

    /// Calls in flight (begun with [`PooledConnection::begin`](crate::PooledConnection::begin), not
    /// yet finished or dropped).
    pub fn in_flight(&self) -> u64 {
        self.claim.in_flight()
    }

    /// Finished calls: successes plus errors (cancelled calls are not counted).
    pub fn request_count(&self) -> u64 {
        let record = &self.record.lock().record;
        record.successes() + record.failures()
    }

    /// Successful calls.
    pub fn success_count(&self) -> u64 {
        self.record.lock().record.successes()
    }

    /// Failed calls.
    pub fn total_errors(&self) -> u64 {
        self.record.lock().record.failures()
    }

    /// Calls dropped before they finished.
    pub fn cancelled_count(&self) -> u64 {
        self.record.lock().record.cancelled_count()
    }

    /// Length of the trailing run of failures (I10).
    pub fn consecutive_errors(&self) -> u32 {
        self.record.lock().record.consecutive_failures()
    }

    /// Mean latency of successful calls; zero before the first.
    pub fn avg_latency(&self) -> Duration {
        let record = &self.record.lock().record;
        match record.successes() {
            0 => Duration::ZERO,
            n => Duration::from_micros(record.latency_sum_us() / n),
        }
    }

    /// Highest latency of a successful call.
    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.record.lock().record.latency_max_us())
    }

    /// Errors over finished calls, in `[0, 1]`; zero before the first.
    pub fn error_rate(&self) -> f64 {
        let record = &self.record.lock().record;
        let total = record.successes() + record.failures();
        if total == 0 {
            0.0
        } else {
            record.failures() as f64 / total as f64
        }
    }

    /// `(successes, failures)` in the health window ending at `now`.
    pub fn window_counts(&self, now: Instant) -> (u64, u64) {
        self.record
            .lock()
            .record
            .window_counts(&self.pool.health, self.at(now))
    }

    /// A consistent copy of the outcome record.
    pub fn record(&self) -> CallRecord {
        self.record.lock().record.clone()
    }
}

/// How a liveness probe ended, as [`ConnectionMetrics::probe_ended`] records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeEnd {
    /// The server answered, after this long: a success.
    Answered(Duration),
    /// No answer (an error or the timeout) while the transport looked open: a failure, and
    /// decisive (the server does not answer).
    Silent,
    /// The transport was found closed: a failure, and the connection is marked closed (so it is
    /// evicted as closed, which backs its address off only if it died young, I12).
    Closed,
    /// The probe was dropped unfinished: nothing recorded, the probe clock stays.
    Dropped,
}

/// `d` in microseconds, saturating: the record's unit.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `d` in nanoseconds, saturating (at 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A sweep's instant as the idle clocks of a pool's connections count it: nanoseconds since the
/// pool's origin, computed once per sweep (see [`ConnectionMetrics::seems_idle_at_sweep`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SweepInstant {
    now: Instant,
    origin: Instant,
    now_ns: u64,
}

impl SweepInstant {
    /// `now` for the connections of the pool whose shared part is `shared`.
    pub(crate) fn new(shared: &PoolShared, now: Instant) -> Self {
        Self {
            now,
            origin: shared.origin,
            now_ns: nanos(now.saturating_duration_since(shared.origin)),
        }
    }
}

/// How many taken marks [`MarkFolds`] folds at one clock reading: the reading (about 200 ns on a
/// VM whose clock source traps, issue 16) is shared by up to this many connections, and the shard
/// read locks it keeps are held for at most this many folds longer.
pub(crate) const FOLD_CHUNK: usize = 256;

/// The "used" marks an idle sweep's look has taken ([`ConnectionMetrics::take_mark`]) and not yet
/// folded into their idle clocks: folded a chunk at a time, at **one** clock reading taken after
/// every clear of the chunk (issue 16: one reading per marked connection was 20 ms of a sweep of
/// 100,000 connections used since the last one).
///
/// Exact, as the fold of one mark is (I5): a `get` that found a mark set (and so wrote nothing) came
/// before that mark's clear, which came before the chunk's reading, so the use is recorded at an
/// instant not earlier than it happened. A `get` after the clear sets the mark again and is folded
/// by a later observer.
///
/// Each entry is a `holder` that keeps the connection's map entry under its shard's read lock (a
/// dashmap `RefMulti`) until its fold. That is what keeps I5 and I7: between its clear and its
/// fold a connection's use is in neither the mark nor the clock, and an idle eviction's re-check
/// (`try_retire_idle`) runs under the shard's write lock, so it cannot see that gap. The look
/// iterates the shards in order, so a chunk may hold the read locks of a few consecutive shards:
/// always taken in ascending shard order, and no other code holds one entry lock while it waits
/// for another, so no cycle of waits can form.
///
/// Dropped with marks pending (a panic mid-look), it folds them, so no use is ever lost.
pub(crate) struct MarkFolds<T> {
    /// The observer's instant: a fold is never at an earlier one (the clock could not move back,
    /// but an observer may pass a later instant than the clock's, as the tests do).
    now: Instant,
    taken: Vec<T>,
    metrics: fn(&T) -> Option<&ConnectionMetrics>,
    /// Folds at each reading (`FOLD_CHUNK` outside the unit tests).
    chunk: usize,
}

impl<T> MarkFolds<T> {
    /// No marks taken yet, for an observer at `now`; `metrics` reaches a holder's connection.
    pub(crate) fn new(now: Instant, metrics: fn(&T) -> Option<&ConnectionMetrics>) -> Self {
        Self::with_chunk(now, metrics, FOLD_CHUNK)
    }

    pub(crate) fn with_chunk(
        now: Instant,
        metrics: fn(&T) -> Option<&ConnectionMetrics>,
        chunk: usize,
    ) -> Self {
        let chunk = chunk.max(1);
        Self {
            now,
            taken: Vec::with_capacity(chunk.min(FOLD_CHUNK)),
            metrics,
            chunk,
        }
    }

    /// Takes the mark of `holder`'s connection if it is set, keeping `holder` until the mark is
    /// folded, and returns `None`: the connection counts as used at the chunk's reading, which is
    /// not earlier than `now`, so it is not idle at `now`. Returns `holder` back when there was no
    /// mark (or no connection), for the caller to judge by the clock as it is.
    pub(crate) fn take(&mut self, holder: T) -> Option<T> {
        let Some(metrics) = (self.metrics)(&holder) else {
            return Some(holder);
        };
        if !metrics.take_mark() {
            return Some(holder);
        }
        self.taken.push(holder);
        if self.taken.len() >= self.chunk {
            self.fold();
        }
        None
    }

    /// Folds every mark taken so far at one clock reading, read now (after every clear), or at the
    /// observer's `now` if that is later, and lets go of their holders.
    pub(crate) fn fold(&mut self) {
        if self.taken.is_empty() {
            return;
        }
        self.fold_at(self.now.max(Instant::now()));
    }

    /// [`fold`](Self::fold) at `at`, which the caller read after every clear it folds (the loom
    /// tests pass a modelled clock).
    pub(crate) fn fold_at(&mut self, at: Instant) {
        for holder in self.taken.drain(..) {
            if let Some(metrics) = (self.metrics)(&holder) {
                metrics.touch(at);
            }
        }
    }

    /// Marks taken and not folded yet.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.taken.len()
    }
}

impl<T> Drop for MarkFolds<T> {
    fn drop(&mut self) {
        self.fold();
    }
}

/// Cumulative call outcomes over every connection that shares them (for a pool: every connection it
/// ever had, including calls finished on a connection after it left the pool). They only grow,
/// whatever is evicted, so a rate over them is meaningful.
///
/// Striped: each connection adds to one of [`STRIPES`] cells of four relaxed counters, each cell on
/// cache lines of its own, so calls on different connections on different cores do not fight over
/// one line (as they would over a single pool-wide line written by every call). A read sums the
/// cells. Each counter is exact on its own and only grows, so a later read never sums less; read
/// together while calls finish, the counters may be a few calls apart (a success counted before
/// its latency is added).
#[derive(Debug, Default)]
pub(crate) struct CallTotals {
    cells: [TotalsCell; STRIPES],
    next: AtomicU64,
}

/// How many cells [`CallTotals`] is striped over: 2 KiB per pool.
pub(crate) const STRIPES: usize = 16;
// A connection's stripe is stored in a byte.
const _: () = assert!(STRIPES <= 256);

/// One stripe of [`CallTotals`], aligned to 128 bytes (two cache lines: the adjacent-line
/// prefetcher pairs them), so no two stripes share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct TotalsCell {
    successes: AtomicU64,
    failures: AtomicU64,
    cancelled: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl CallTotals {
    /// The stripe for a new connection: round robin.
    fn next_stripe(&self) -> u8 {
        // `STRIPES <= 256` (asserted at compile time), so the remainder fits a byte.
        (self.next.fetch_add(1, Ordering::Relaxed) % STRIPES as u64) as u8
    }

    fn success(&self, stripe: u8, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let cell = &self.cells[usize::from(stripe)];
        cell.successes.fetch_add(1, Ordering::Relaxed);
        cell.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn failure(&self, stripe: u8) {
        self.cells[usize::from(stripe)]
            .failures
            .fetch_add(1, Ordering::Relaxed);
    }

    fn cancelled(&self, stripe: u8) {
        self.cells[usize::from(stripe)]
            .cancelled
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Fills the cumulative call fields of `stats`.
    pub(crate) fn fill(&self, stats: &mut PoolStats) {
        let sum = |counter: fn(&TotalsCell) -> &AtomicU64| {
            self.cells.iter().fold(0u64, |n, cell| {
                n.wrapping_add(counter(cell).load(Ordering::Relaxed))
            })
        };
        stats.total_successes = sum(|c| &c.successes);
        stats.total_errors = sum(|c| &c.failures);
        stats.total_requests = stats.total_successes.saturating_add(stats.total_errors);
        stats.total_cancelled = sum(|c| &c.cancelled);
        stats.latency_sum = Duration::from_micros(sum(|c| &c.latency_sum_us));
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
    /// Removed by the user (`remove`, `remove_connection`, `clear`, `close`).
    Manual,
    /// Closed to make room for another address under
    /// [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed).
    MakeRoom,
    /// Marked broken by the caller that had it checked out
    /// ([`Checkout::mark_broken`](crate::Checkout::mark_broken)), and closed when it came back.
    Broken,
    /// Older than [`max_lifetime`](crate::PoolConfig::max_lifetime): closed when it came back,
    /// or instead of being handed out.
    Lifetime,
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
            Self::MakeRoom => "make_room",
            Self::Broken => "broken",
            Self::Lifetime => "lifetime",
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
    pub evicted_make_room: AtomicU64,
    pub evicted_broken: AtomicU64,
    pub evicted_lifetime: AtomicU64,
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
            EvictionReason::MakeRoom => &self.evicted_make_room,
            EvictionReason::Broken => &self.evicted_broken,
            EvictionReason::Lifetime => &self.evicted_lifetime,
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
    /// See [`EvictionReason::MakeRoom`].
    pub make_room: u64,
    /// See [`EvictionReason::Broken`].
    pub broken: u64,
    /// See [`EvictionReason::Lifetime`].
    pub lifetime: u64,
}

impl EvictionStats {
    /// All evictions.
    pub fn total(&self) -> u64 {
        self.idle
            + self.unhealthy
            + self.closed
            + self.replaced
            + self.manual
            + self.make_room
            + self.broken
            + self.lifetime
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

/// A snapshot of the pool.
///
/// Two kinds of fields:
/// - **gauges**, the state now: `total`, `healthy`, `idle`, `in_flight`, `reserved`,
///   `max_connections`;
/// - **cumulative counters**, since the pool was built, which never go back, whatever is evicted:
///   `total_requests`, `total_successes`, `total_errors`, `total_cancelled`, `latency_sum`,
///   `evictions`, `rejected_capacity`, `connects`. The call counters cover every call recorded on
///   any connection the pool made or was given, also one recorded after its connection left.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// let pool: ConnectionPool<&str> = ConnectionPool::new(0, Duration::ZERO);
/// pool.insert("127.0.0.1:1", "client");
/// let conn = pool.get("127.0.0.1:1").unwrap();
/// conn.record_error();
/// conn.record_success(Duration::from_millis(2));
/// assert!(pool.remove_connection(&conn));
/// let stats = pool.stats();
/// assert_eq!(stats.total, 0, "a gauge: nothing is pooled now");
/// assert_eq!((stats.total_requests, stats.total_errors), (2, 1), "cumulative: kept");
/// assert_eq!(stats.avg_latency(), Duration::from_millis(2));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Live connections, shared and exclusive (idle or checked out) (gauge).
    pub total: usize,
    /// Live connections neither unhealthy nor closed (gauge). A checked-out exclusive connection
    /// counts as healthy: its verdict is taken when it comes back.
    pub healthy: usize,
    /// Live connections that are idle now: shared ones by the idle clock, exclusive ones waiting
    /// in their line for a caller (gauge).
    pub idle: usize,
    /// Calls in flight over all live connections (gauge).
    pub in_flight: u64,
    /// Slots held by connects in flight, shared and exclusive (gauge).
    pub reserved: usize,
    /// Exclusive connections checked out now (gauge; also counted in `total` and `healthy`).
    pub checked_out: usize,
    /// Callers waiting in line for an exclusive connection now (gauge).
    pub waiting: usize,
    /// The configured cap; `0` = unlimited.
    pub max_connections: usize,
    /// Finished calls, successes plus failures, since the pool was built (cumulative). Until 0.2
    /// this summed only the live connections and dropped when one was evicted.
    pub total_requests: u64,
    /// Successful calls since the pool was built (cumulative).
    pub total_successes: u64,
    /// Failed calls since the pool was built (cumulative). Until 0.2 this summed only the live
    /// connections.
    pub total_errors: u64,
    /// Calls dropped before they finished, since the pool was built (cumulative).
    pub total_cancelled: u64,
    /// The sum of the successful calls' latencies since the pool was built (cumulative; its count
    /// is `total_successes`).
    pub latency_sum: Duration,
    /// Evictions by reason (cumulative).
    pub evictions: EvictionStats,
    /// Inserts and connects refused because the pool was full (cumulative).
    pub rejected_capacity: u64,
    /// Connect outcomes (cumulative).
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

    /// `total_errors / total_requests`, over the pool's life; zero before any request.
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

    /// Mean latency of the successful calls since the pool was built; zero before the first.
    pub fn avg_latency(&self) -> Duration {
        match u32::try_from(self.total_successes) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.latency_sum / n,
            Err(_) => Duration::from_secs_f64(
                self.latency_sum.as_secs_f64() / self.total_successes as f64,
            ),
        }
    }
}

/// One address the pool keeps state for, as [`ConnectionPool::addresses`] saw it: its connection
/// (if any), whether a connect is in flight, and its ejection state (I12).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AddressState {
    /// The address.
    pub addr: CheetahString,
    /// Its (first) shared connection, if it has one.
    pub connection: Option<ConnectionState>,
    /// Its further shared connections, oldest first: empty unless
    /// [`max_per_address`](crate::PoolConfig::max_per_address) is above 1 and its load asked
    /// for more (see [`ConnectionPool::get_or_connect`](crate::ConnectionPool::get_or_connect)).
    pub more_connections: Vec<ConnectionState>,
    /// `true` while a connect for it is in flight.
    pub connecting: bool,
    /// Its ejection count now (see [`ConnectionPool::ejection_count`]).
    pub ejection_count: u32,
    /// When it may be connected again, while it backs off.
    pub backoff_until: Option<Instant>,
    /// Its exclusive connections and line (see
    /// [`ConnectionPool::checkout`](crate::ConnectionPool::checkout)).
    pub exclusive: ExclusiveState,
}

/// An address's exclusive connections and the callers in line for them, in an [`AddressState`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use keyed_pool::{ConnectionPool, Connector};
/// struct Unit;
/// impl Connector for Unit {
///     type Conn = ();
///     type Error = std::io::Error;
///     async fn connect(&self, _addr: &str) -> std::io::Result<()> {
///         Ok(())
///     }
/// }
/// let pool = ConnectionPool::builder().connector(Unit).build().unwrap();
/// let held = pool.checkout("10.0.0.1:80").await.unwrap();
/// let state = pool.address("10.0.0.1:80").unwrap().exclusive;
/// assert_eq!((state.idle, state.checked_out, state.connecting, state.waiting), (0, 1, 0, 0));
/// drop(held);
/// assert_eq!(pool.address("10.0.0.1:80").unwrap().exclusive.idle, 1);
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExclusiveState {
    /// Idle, in line for the next caller.
    pub idle: usize,
    /// Checked out to a caller.
    pub checked_out: usize,
    /// Connects in flight for the line.
    pub connecting: usize,
    /// Callers in line.
    pub waiting: usize,
}

/// A pooled connection's state, in an [`AddressState`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConnectionState {
    /// Its identity.
    pub id: ConnId,
    /// Neither judged unhealthy nor known closed. The connector's `is_open` is not asked for a
    /// snapshot: a transport that closed since the last `get` or sweep shows as healthy here.
    pub healthy: bool,
    /// Its transport was found closed.
    pub closed: bool,
    /// Calls in flight.
    pub in_flight: u64,
    /// Time since its last use.
    pub idle_for: Duration,
    /// Time since it was made.
    pub age: Duration,
    /// Finished calls on it (successes plus failures).
    pub requests: u64,
    /// Failed calls on it.
    pub errors: u64,
    /// Its trailing run of failures (I10).
    pub consecutive_errors: u32,
    /// The distribution of its successful calls' latencies.
    pub latency: LatencySnapshot,
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// Every address the pool keeps state for, sorted: those with a connection, a connect in
    /// flight, or an ejection state that has not settled (I18), so an address backing off with no
    /// connection is listed too. A snapshot: each address is read under its shard's read lock and
    /// copied; no lock is held once it returns, so the caller may do anything with it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::ZERO);
    /// pool.insert("127.0.0.1:2", 2);
    /// pool.insert("127.0.0.1:1", 1);
    /// pool.get("127.0.0.1:1").unwrap().record_success(Duration::from_millis(4));
    /// let addrs = pool.addresses();
    /// assert_eq!(addrs.len(), 2);
    /// assert_eq!(addrs[0].addr, "127.0.0.1:1");
    /// let conn = addrs[0].connection.as_ref().unwrap();
    /// assert!(conn.healthy);
    /// assert_eq!(conn.latency.count(), 1);
    /// assert_eq!(addrs[0].ejection_count, 0);
    /// ```
    pub fn addresses(&self) -> Vec<AddressState> {
        let now = Instant::now();
        let mut states: Vec<_> = self
            .inner
            .map
            .iter()
            .map(|e| self.address_state(e.key(), e.value(), now))
            .collect();
        states.sort_unstable_by(|a, b| a.addr.cmp(&b.addr));
        states
    }

    /// The state of one address, or `None` if the pool keeps nothing for it. See
    /// [`addresses`](Self::addresses).
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::ZERO);
    /// assert!(pool.address("127.0.0.1:1").is_none());
    /// pool.insert("127.0.0.1:1", 1);
    /// let state = pool.address("127.0.0.1:1").unwrap();
    /// assert!(!state.connecting && state.backoff_until.is_none());
    /// ```
    pub fn address(&self, addr: impl AsRef<str>) -> Option<AddressState> {
        let now = Instant::now();
        let entry = self.inner.map.get(addr.as_ref())?;
        Some(self.address_state(entry.key(), entry.value(), now))
    }

    fn address_state(&self, addr: &CheetahString, slot: &Slot<C>, now: Instant) -> AddressState {
        let at = self.inner.offset(now);
        let state = |pooled: &crate::slot::Pooled<C>| {
            let m = pooled.conn.metrics();
            let record = m.record();
            ConnectionState {
                id: pooled.conn.id(),
                healthy: m.is_healthy(),
                closed: m.is_closed(),
                in_flight: m.in_flight(),
                idle_for: m.since_last_use(now),
                age: now.saturating_duration_since(m.created_at()),
                requests: record.successes() + record.failures(),
                errors: record.failures(),
                consecutive_errors: record.consecutive_failures(),
                latency: m.latency(),
            }
        };
        AddressState {
            addr: addr.clone(),
            connection: slot.conn.as_ref().map(state),
            more_connections: slot.more().iter().map(state).collect(),
            connecting: slot.flight().is_some(),
            ejection_count: slot.ejection().count_at(at, &self.inner.config.ejection),
            backoff_until: slot.ejection().retry_after(at).map(|left| now + left),
            exclusive: slot.exclusive().map_or_else(ExclusiveState::default, |ex| {
                let (idle, checked_out, connecting, waiting) = ex.counts();
                ExclusiveState {
                    idle,
                    checked_out,
                    connecting,
                    waiting,
                }
            }),
        }
    }
}

// Not under loom: loom's atomics exist only inside `loom::model` (the loom tier checks these
// metrics in `core::loom_tests`).
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Issue 16's layout: what every `get` reads (the flag byte) and what every call touches (the
    /// claim, the idle clock, the creation offset, the pool's shared part) come first, within the 48 bytes
    /// that follow the `Arc`'s two counts on their cache line (three times in four: an allocation
    /// is 16-byte aligned; `connection::tests::the_metrics_open_the_entry`). A field added in
    /// front of them, or a reordering, fails here rather than in a benchmark.
    #[test]
    fn the_hot_fields_come_first() {
        use std::mem::{offset_of, size_of};
        assert_eq!(offset_of!(ConnectionMetrics, flags), 0);
        let hot_end = offset_of!(ConnectionMetrics, pool) + size_of::<Arc<PoolShared>>();
        assert!(
            hot_end <= 48,
            "the hot fields end at byte {hot_end}, past the Arc counts' line"
        );
    }

    /// Issue 16's compact record: the record and the latency distribution's pointer under one
    /// lock, 88 bytes where the record's lock was 152 and the histogram's `OnceLock` 16 more. A
    /// field added to a connection's metrics fails here rather than in the memory benchmark.
    #[test]
    fn the_metrics_are_compact() {
        use std::mem::size_of;
        assert!(
            size_of::<Mutex<Outcomes>>() <= 88,
            "the record's lock is {} B",
            size_of::<Mutex<Outcomes>>()
        );
        assert!(
            size_of::<ConnectionMetrics>() <= 136,
            "ConnectionMetrics is {} B (216 before issue 16's compact record)",
            size_of::<ConnectionMetrics>()
        );
    }

    /// The latency distribution under the record's lock: allocated by the first success only (a
    /// failure, a cancel or a probe's answer records no latency), and the snapshot counts every
    /// success's latency.
    #[test]
    fn the_latency_distribution_comes_with_the_first_success() {
        let t0 = Instant::now();
        let m = ConnectionMetrics::new(t0, HealthPolicy::default());
        m.record_error_at(t0);
        m.record_cancelled_at(t0);
        m.claim.call_started();
        m.probe_ended(t0, ProbeEnd::Answered(Duration::from_millis(7)));
        assert!(m.record.lock().latency.is_none(), "no call succeeded yet");
        assert_eq!(m.latency().count(), 0);
        for ms in [1, 2, 40] {
            m.record_success_at(t0, Duration::from_millis(ms));
        }
        let snap = m.latency();
        assert_eq!(snap.count(), 3);
        assert_eq!(snap.sum(), Duration::from_millis(43));
        assert_eq!(
            m.success_count(),
            4,
            "the probe's answer is a success of the record"
        );
    }

    fn itself<'a>(m: &'a &ConnectionMetrics) -> Option<&'a ConnectionMetrics> {
        Some(*m)
    }

    /// Issue 16's chunked fold: marks taken one by one, time passing between the takes (the look
    /// goes on meanwhile), then one reading for the chunk. Each use is folded at that reading,
    /// not earlier than it happened (I5), and a `get` after its mark was taken is left marked for
    /// a later fold, not lost.
    #[tokio::test(start_paused = true)]
    async fn i5_a_chunk_of_marks_is_folded_at_one_reading_after_every_clear() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let conns: Vec<_> = (0..3)
            .map(|_| ConnectionMetrics::new(t0, HealthPolicy::default()))
            .collect();
        conns[0].mark_used();
        conns[2].mark_used();
        let mut folds = MarkFolds::with_chunk(t0, itself, 8);
        assert!(folds.take(&conns[0]).is_none(), "marked: taken");
        tokio::time::sleep(ms).await;
        assert!(folds.take(&conns[1]).is_some(), "not marked: handed back");
        conns[0].mark_used(); // a `get` after its mark was taken
        tokio::time::sleep(ms).await;
        assert!(folds.take(&conns[2]).is_none());
        assert_eq!(folds.pending(), 2);
        assert_eq!(
            conns[2].last_used(),
            t0,
            "nothing folded before the reading"
        );
        tokio::time::sleep(ms).await;
        // (Under madsim the clock moves a little with every step, so the reading is bracketed.)
        let before = Instant::now();
        folds.fold();
        let after = Instant::now();
        assert_eq!(folds.pending(), 0);
        let reading = conns[2].last_used();
        assert!(
            (before..=after).contains(&reading),
            "I5 violated: folded at {:?}, not at a reading taken by the fold",
            reading - t0
        );
        assert_eq!(
            conns[0].last_used(),
            reading,
            "not folded at the chunk's one reading"
        );
        assert!(
            conns[0].pending_use(),
            "I5 violated: a get after the take was lost"
        );
        assert!(!conns[2].pending_use());
        assert_eq!(conns[1].last_used(), t0, "an unmarked one is not touched");
    }

    /// A chunk folds by itself once full, at the observer's instant when that is later than the
    /// clock; and dropped with marks pending, it folds them (no use is lost).
    #[tokio::test(start_paused = true)]
    async fn i5_a_full_chunk_folds_and_a_dropped_one_too() {
        let t0 = Instant::now();
        let conns: Vec<_> = (0..3)
            .map(|_| ConnectionMetrics::new(t0, HealthPolicy::default()))
            .collect();
        for m in &conns {
            m.mark_used();
        }
        let observer = t0 + Duration::from_secs(5);
        let mut folds = MarkFolds::with_chunk(observer, itself, 2);
        assert!(folds.take(&conns[0]).is_none());
        assert!(folds.take(&conns[1]).is_none());
        assert_eq!(folds.pending(), 0, "a full chunk folds at once");
        assert_eq!(conns[0].last_used(), observer, "at the later of the two");
        assert!(folds.take(&conns[2]).is_none());
        tokio::time::sleep(Duration::from_secs(9)).await;
        let before = Instant::now();
        drop(folds);
        assert!(
            conns[2].last_used() >= before,
            "I5 violated: a mark taken and dropped unfolded"
        );
    }

    // The model test drives a paused runtime of its own (madsim has no `runtime::Builder`): not
    // under madsim, where the sweep's own tests cover the fold.
    #[cfg(not(madsim))]
    #[derive(Clone, Copy, Debug)]
    enum FoldOp {
        Get(usize),
        Advance(u16),
        Take(usize),
        Fold,
    }

    #[cfg(not(madsim))]
    fn fold_op() -> impl proptest::strategy::Strategy<Value = FoldOp> {
        use proptest::prelude::*;
        prop_oneof![
            (0..4usize).prop_map(FoldOp::Get),
            (0..20u16).prop_map(FoldOp::Advance),
            (0..4usize).prop_map(FoldOp::Take),
            Just(FoldOp::Fold),
        ]
    }

    #[cfg(not(madsim))]
    proptest::proptest! {
        /// Random interleavings of `get`s, time, takes and folds on four connections, in virtual
        /// time, against a model of the marks. After every step, for every connection: a take
        /// finds the mark exactly when a `get` left one (nothing lost, nothing invented); a use
        /// is in the mark, in the chunk not yet folded, or in the clock at an instant not earlier
        /// than it happened (I5); and the clock is never ahead of the later of the present and the
        /// observer (a fold reads the clock, it does not guess).
        #[test]
        fn i5_chunked_folds_never_record_a_use_early(
            ops in proptest::collection::vec(fold_op(), 1..60),
            chunk in 1..4usize,
            ahead in 0..30u64,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let t0 = Instant::now();
                let conns: Vec<_> = (0..4)
                    .map(|_| ConnectionMetrics::new(t0, HealthPolicy::default()))
                    .collect();
                let observer = t0 + Duration::from_millis(ahead);
                let mut folds = MarkFolds::with_chunk(observer, itself, chunk);
                let mut marked = [false; 4];
                let mut in_chunk = [false; 4];
                let mut last_get: [Option<Instant>; 4] = [None; 4];
                for op in ops {
                    match op {
                        FoldOp::Get(i) => {
                            conns[i].mark_used();
                            marked[i] = true;
                            last_get[i] = Some(Instant::now());
                        }
                        FoldOp::Advance(ms) => {
                            tokio::time::advance(Duration::from_millis(u64::from(ms))).await;
                        }
                        FoldOp::Take(i) => {
                            let taken = folds.take(&conns[i]).is_none();
                            assert_eq!(taken, marked[i], "a take found a mark the model has not");
                            if taken {
                                marked[i] = false;
                                in_chunk[i] = true;
                            }
                            if folds.pending() == 0 {
                                in_chunk = [false; 4];
                            }
                        }
                        FoldOp::Fold => {
                            folds.fold();
                            in_chunk = [false; 4];
                        }
                    }
                    let latest = Instant::now().max(observer);
                    for (i, m) in conns.iter().enumerate() {
                        assert_eq!(m.pending_use(), marked[i]);
                        if let Some(used) = last_get[i] && !marked[i] && !in_chunk[i] {
                            assert!(
                                m.last_used() >= used,
                                "I5 violated: connection {i} used at {:?}, clock at {:?}",
                                used - t0,
                                m.last_used() - t0
                            );
                        }
                        assert!(m.last_used() <= latest, "a fold ahead of its reading");
                    }
                }
            });
        }
    }

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
