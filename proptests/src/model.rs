//! The reference model: what the pool must do, stated with plain maps and counters on a virtual
//! clock that starts at zero. It shares no code with the pool: the health verdict, the sliding
//! window, the idle predicate and the backoff schedule are restated here from DESIGN.md.

use std::collections::BTreeMap;
use std::time::Duration;

use keyed_pool::{PoolConfig, WhenFull};

use crate::ops::{ConnectScript, Knobs};

/// The clock after the runtime sleeps, with nothing else to do, until a timer set at `now` to
/// fire after `d`. tokio's timers tick in whole milliseconds from the runtime's start (the run's
/// clock starts with the runtime): the deadline is rounded up to a tick, and paused time advances
/// by whole ticks from the tick `now` falls in, so a sub-millisecond offset of `now` is kept.
pub fn after_timer(now: Duration, d: Duration) -> Duration {
    let when = (now + d).as_nanos().div_ceil(1_000_000);
    let current = now.as_nanos() / 1_000_000;
    now + Duration::from_millis(when.saturating_sub(current) as u64)
}

/// The configuration a [`Knobs`] stands for, as plain values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Cap on connections; 0 = unlimited.
    pub max: usize,
    /// Idle limit; `None` = no idle eviction.
    pub max_idle: Option<Duration>,
    /// Consecutive failures that make a connection unhealthy; 0 = off.
    pub threshold: u32,
    /// Failure ratio of the window detector.
    pub ratio: f64,
    /// Minimum calls in the window before the ratio may fire.
    pub min_requests: u32,
    /// Health window.
    pub window: Duration,
    /// `WhenFull::EvictLeastRecentlyUsed`.
    pub lru: bool,
    /// Backoff jitter.
    pub jitter: f64,
    /// Backoff base.
    pub base: Duration,
    /// Backoff cap.
    pub cap: Duration,
    /// Connect timeout.
    pub timeout: Duration,
}

fn pick<T: Copy>(values: &[T], i: u8) -> T {
    values[usize::from(i) % values.len()]
}

impl From<Knobs> for Settings {
    fn from(k: Knobs) -> Self {
        let ms = Duration::from_millis;
        let base = pick(&[ms(1_000), ms(1), ms(100)], k.base);
        Self {
            max: usize::from(k.max % 5),
            max_idle: pick(
                &[Some(ms(1_000)), Some(ms(50)), Some(ms(60_000)), None],
                k.idle,
            ),
            threshold: pick(&[5, 1, 2, 3, 0], k.threshold),
            ratio: pick(&[0.5, 0.25, 1.0], k.ratio),
            min_requests: pick(&[20, 1, 3], k.min_requests),
            window: pick(&[ms(10_000), ms(80), ms(1)], k.window),
            lru: k.lru,
            jitter: pick(&[0.0, 0.2], k.jitter),
            base,
            cap: base * pick(&[120, 1, 4], k.cap),
            timeout: pick(&[ms(3_000), ms(1), ms(50)], k.timeout),
        }
    }
}

impl Settings {
    /// The pool configuration these settings stand for.
    pub fn pool_config(&self) -> PoolConfig {
        let mut c = PoolConfig::default();
        c.max_connections = self.max;
        c.max_idle = self.max_idle;
        c.health.consecutive_failures = self.threshold;
        c.health.failure_ratio = self.ratio;
        c.health.min_requests = self.min_requests;
        c.health.window = self.window;
        c.backoff.base = self.base;
        c.backoff.max = self.cap;
        c.backoff.jitter = self.jitter;
        c.connect_timeout = self.timeout;
        c.when_full = if self.lru {
            WhenFull::EvictLeastRecentlyUsed
        } else {
            WhenFull::Reject
        };
        c
    }

    /// I9/I11 restated: unhealthy when the trailing run of failures reaches the threshold, or when
    /// at least `min_requests` calls fall in the window and the failures among them reach the ratio.
    pub fn unhealthy(&self, run: u32, (successes, failures): (u64, u64)) -> bool {
        let total = successes + failures;
        (self.threshold > 0 && run >= self.threshold)
            || (total >= u64::from(self.min_requests)
                && total > 0
                && failures as f64 >= self.ratio * total as f64)
    }

    /// I12 restated: the un-jittered delay after the `k`-th failure, `min(base·2^(k−1), cap)`.
    pub fn backoff(&self, k: u32) -> Duration {
        let exp = k.max(1) - 1;
        let grown = if exp >= 64 {
            None
        } else {
            self.base.as_nanos().checked_mul(1u128 << exp)
        };
        match grown {
            Some(ns) if ns < self.cap.as_nanos() => Duration::from_nanos(ns as u64),
            _ => self.cap,
        }
    }

    /// The bounds the jittered delay must fall in: `[d·(1−j), d·(1+j)]`, at least 1 ms, widened by
    /// 1 µs for float rounding.
    pub fn backoff_bounds(&self, k: u32) -> (Duration, Duration) {
        let d = self.backoff(k).as_secs_f64();
        let floor = Duration::from_millis(1);
        let lo = Duration::from_secs_f64(d * (1.0 - self.jitter)).max(floor);
        let hi = Duration::from_secs_f64(d * (1.0 + self.jitter)).max(floor);
        let us = Duration::from_micros(1);
        (lo.saturating_sub(us), hi + us)
    }

    /// The width of one bucket of the health window, in µs.
    fn bucket_us(&self) -> u64 {
        (self.window.as_micros() as u64 / 8).max(1)
    }
}

/// What the model knows of one connection (live or gone: handles outlive removal).
#[derive(Clone, Debug)]
pub struct MConn {
    /// Address index.
    pub addr: u8,
    /// The pool's id for it.
    pub id: u64,
    /// Creation time.
    pub created: Duration,
    /// Last use (get, a call's start or end, a recorded result).
    pub last_used: Duration,
    /// Calls in flight.
    pub in_flight: u64,
    /// Trailing run of failures (I10).
    pub run: u32,
    /// Successful calls.
    pub successes: u64,
    /// Failed calls.
    pub errors: u64,
    /// Cancelled calls.
    pub cancelled: u64,
    /// Largest success latency, µs.
    pub max_latency_us: u64,
    /// Every outcome: (µs since creation, success).
    pub outcomes: Vec<(u64, bool)>,
    /// A failure tripped the health policy (latched, I9).
    pub unhealthy: bool,
    /// Marked closed (by `mark_closed`, or by the pool on finding its transport dead).
    pub marked_closed: bool,
    /// Its transport died (the connector's `is_open` is false).
    pub transport_dead: bool,
    /// The pool must have closed it through the connector (evicted, replaced, cleared, closed).
    pub closed_by_pool: bool,
}

impl MConn {
    /// `(successes, failures)` in the window ending at `now`, which slides in steps of one bucket
    /// from the connection's creation.
    pub fn window_counts(&self, s: &Settings, now: Duration) -> (u64, u64) {
        let w = s.bucket_us();
        let current = (now - self.created).as_micros() as u64 / w;
        self.outcomes
            .iter()
            .filter(|(at, _)| current - at / w < 8)
            .fold((0, 0), |(ok, bad), &(_, success)| {
                if success {
                    (ok + 1, bad)
                } else {
                    (ok, bad + 1)
                }
            })
    }

    /// Neither judged unhealthy nor marked closed (`PooledConnection::is_healthy`).
    pub fn healthy(&self) -> bool {
        !self.unhealthy && !self.marked_closed
    }

    /// I5/I6 restated: idle when nothing is in flight and unused for longer than `max_idle`.
    pub fn idle(&self, s: &Settings, now: Duration) -> bool {
        s.max_idle
            .is_some_and(|max| self.in_flight == 0 && now - self.last_used > max)
    }
}

/// Backoff state of an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MBackoff {
    /// Consecutive failures.
    pub failures: u32,
    /// No connect before this.
    pub until: Duration,
}

/// Counters the pool's `stats()` must agree with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Evicted as idle.
    pub idle: u64,
    /// Evicted as unhealthy.
    pub unhealthy: u64,
    /// Evicted with a closed transport.
    pub closed: u64,
    /// Replaced by an insert or a connect.
    pub replaced: u64,
    /// Removed by hand, cleared, closed or evicted to make room.
    pub manual: u64,
    /// Refused for capacity.
    pub rejected: u64,
    /// Connects started.
    pub attempted: u64,
    /// Callers that joined a connect already in flight.
    pub shared: u64,
    /// Connects that succeeded.
    pub succeeded: u64,
    /// Connects that failed.
    pub failed: u64,
    /// Connects that timed out.
    pub timed_out: u64,
    /// `get_or_connect` refused by backoff.
    pub backoff_rejections: u64,
}

/// Why the model evicts a connection in a health sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthEviction {
    /// Transport closed: no backoff.
    Closed,
    /// Tripped the health policy: the address backs off.
    Unhealthy,
}

/// What `try_insert` must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertPlan {
    /// Pool closed.
    Closed,
    /// At capacity.
    Rejected,
    /// Pooled (the model has already retired what it replaced or evicted to make room).
    Placed,
}

/// What `get_or_connect` must return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectPlan {
    /// `PoolError::Closed`.
    Closed,
    /// The pooled connection with this index.
    Existing(usize),
    /// `PoolError::Backoff` of a backoff that began in this very call: the pooled connection was
    /// unhealthy, so it was evicted first and the address started to back off (I12). The deadline
    /// must fall `lo..=hi` from now.
    FreshBackoff {
        /// Failures so far, this one included.
        failures: u32,
        /// Shortest delay allowed.
        lo: Duration,
        /// Longest delay allowed.
        hi: Duration,
    },
    /// `PoolError::Backoff` with these fields.
    Backoff {
        /// Time left.
        retry_after: Duration,
        /// Failures so far.
        failures: u32,
    },
    /// `PoolError::AtCapacity`.
    AtCapacity,
    /// A new connection.
    Connected,
    /// `PoolError::Connect`; the address backs off.
    Failed,
    /// `PoolError::ConnectTimeout`; the address backs off.
    TimedOut,
}

/// The reference model of one pool.
#[derive(Clone, Debug)]
pub struct Model {
    /// Configuration.
    pub s: Settings,
    /// Virtual time since the start of the run.
    pub now: Duration,
    /// `close()` was called.
    pub closed: bool,
    /// Every connection the run has seen, by creation order.
    pub conns: Vec<MConn>,
    /// Address index → the connection pooled for it.
    pub live: BTreeMap<u8, usize>,
    /// Address index → backoff state.
    pub backoff: BTreeMap<u8, MBackoff>,
    /// Expected counters.
    pub counters: Counters,
}

impl Model {
    /// An empty pool with these settings.
    pub fn new(s: Settings) -> Self {
        Self {
            s,
            now: Duration::ZERO,
            closed: false,
            conns: Vec::new(),
            live: BTreeMap::new(),
            backoff: BTreeMap::new(),
            counters: Counters::default(),
        }
    }

    /// Moves the idle clock of `i` to now (exactly: never backwards, no rounding).
    fn touch(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.last_used = c.last_used.max(self.now);
    }

    fn full(&self) -> bool {
        self.s.max > 0 && self.live.len() >= self.s.max
    }

    /// A connection just pooled for `addr` under id `id`; returns its index.
    pub fn add_conn(&mut self, addr: u8, id: u64) -> usize {
        let i = self.conns.len();
        self.conns.push(MConn {
            addr,
            id,
            created: self.now,
            last_used: self.now,
            in_flight: 0,
            run: 0,
            successes: 0,
            errors: 0,
            cancelled: 0,
            max_latency_us: 0,
            outcomes: Vec::new(),
            unhealthy: false,
            marked_closed: false,
            transport_dead: false,
            closed_by_pool: false,
        });
        self.live.insert(addr, i);
        i
    }

    fn retire(&mut self, i: usize) {
        let addr = self.conns[i].addr;
        if self.live.get(&addr) == Some(&i) {
            self.live.remove(&addr);
        }
        self.conns[i].closed_by_pool = true;
    }

    /// `WhenFull::EvictLeastRecentlyUsed`: evict the least recently used connection of another
    /// address with nothing in flight (ties by address, then id). Returns whether one went.
    fn evict_lru_except(&mut self, addr: u8) -> bool {
        let victim = self
            .live
            .iter()
            .filter(|&(&a, &i)| a != addr && self.conns[i].in_flight == 0)
            .map(|(&a, &i)| (self.conns[i].last_used, a, self.conns[i].id, i))
            .min();
        match victim {
            Some((_, _, _, i)) => {
                self.retire(i);
                self.counters.manual += 1;
                true
            }
            None => false,
        }
    }

    /// `try_insert(addr, _)`. When it returns `Placed`, the caller adds the connection with
    /// [`add_conn`](Self::add_conn).
    pub fn insert(&mut self, addr: u8) -> InsertPlan {
        if self.closed {
            return InsertPlan::Closed;
        }
        if let Some(&old) = self.live.get(&addr) {
            // I2: a present address keeps its slot.
            self.retire(old);
            self.counters.replaced += 1;
            return InsertPlan::Placed;
        }
        if self.full() && !(self.s.lru && self.evict_lru_except(addr)) {
            self.counters.rejected += 1;
            return InsertPlan::Rejected;
        }
        InsertPlan::Placed
    }

    /// `get(addr)`: the usable pooled connection, touched. Finding a dead transport on a healthy
    /// connection marks it closed (what `is_open` returning false means).
    pub fn get(&mut self, addr: u8) -> Option<usize> {
        let &i = self.live.get(&addr)?;
        if !self.usable(i) {
            return None;
        }
        self.touch(i);
        Some(i)
    }

    fn usable(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        if !c.healthy() {
            return false;
        }
        if c.transport_dead {
            c.marked_closed = true;
            return false;
        }
        true
    }

    /// `remove(addr)`: hands the connection back unclosed.
    pub fn remove(&mut self, addr: u8) -> Option<usize> {
        let i = self.live.remove(&addr)?;
        self.counters.manual += 1;
        Some(i)
    }

    /// `remove_connection(conn i)`: only if it is still the one pooled for its address (I14).
    pub fn remove_connection(&mut self, i: usize) -> bool {
        if self.live.get(&self.conns[i].addr) != Some(&i) {
            return false;
        }
        self.retire(i);
        self.counters.manual += 1;
        true
    }

    /// A call starts on connection `i`.
    pub fn begin(&mut self, i: usize) {
        self.touch(i);
        self.conns[i].in_flight += 1;
    }

    /// A call on `i` ends as a success that took `latency` (or a result recorded without a call).
    pub fn success(&mut self, i: usize, latency: Duration) {
        let at = (self.now - self.conns[i].created).as_micros() as u64;
        let c = &mut self.conns[i];
        c.successes += 1;
        c.run = 0;
        c.max_latency_us = c.max_latency_us.max(latency.as_micros() as u64);
        c.outcomes.push((at, true));
        self.touch(i);
    }

    /// A call on `i` fails; returns the verdict of this failure (I9–I11), which latches.
    pub fn failure(&mut self, i: usize) -> bool {
        let now = self.now;
        let s = self.s;
        let at = (now - self.conns[i].created).as_micros() as u64;
        let c = &mut self.conns[i];
        c.errors += 1;
        c.run += 1;
        c.outcomes.push((at, false));
        let verdict = s.unhealthy(c.run, c.window_counts(&s, now));
        c.unhealthy |= verdict;
        self.touch(i);
        verdict
    }

    /// A call on `i` is dropped unfinished.
    pub fn cancel(&mut self, i: usize) {
        self.conns[i].cancelled += 1;
        self.touch(i);
    }

    /// A call on `i` is over (after its outcome).
    pub fn end_call(&mut self, i: usize) {
        self.conns[i].in_flight -= 1;
    }

    /// `evict_idle()`: the connections it must evict (I5, I6).
    pub fn evict_idle(&mut self) -> Vec<usize> {
        let (s, now) = (self.s, self.now);
        let gone: Vec<usize> = self
            .live
            .values()
            .copied()
            .filter(|&i| self.conns[i].idle(&s, now))
            .collect();
        for &i in &gone {
            self.retire(i);
            self.counters.idle += 1;
        }
        gone
    }

    /// `evict_unhealthy()`: the connections it must evict, and why (I8, I9). The caller records
    /// the backoff of each `Unhealthy` address with [`backoff_failure`](Self::backoff_failure).
    pub fn evict_unhealthy(&mut self) -> Vec<(usize, HealthEviction)> {
        let live: Vec<usize> = self.live.values().copied().collect();
        let mut gone = Vec::new();
        for i in live {
            // The sweep's look phase: a healthy connection with a dead transport is marked closed.
            self.usable(i);
            let c = &self.conns[i];
            let why = if c.marked_closed {
                HealthEviction::Closed
            } else if c.unhealthy {
                HealthEviction::Unhealthy
            } else {
                continue;
            };
            self.retire(i);
            match why {
                HealthEviction::Closed => self.counters.closed += 1,
                HealthEviction::Unhealthy => self.counters.unhealthy += 1,
            }
            gone.push((i, why));
        }
        gone
    }

    /// One more failure of `addr`: returns the bounds its new deadline must fall in, relative to
    /// now. The caller then sets the deadline the pool drew (jitter) with
    /// [`set_backoff_until`](Self::set_backoff_until).
    pub fn backoff_failure(&mut self, addr: u8) -> (u32, Duration, Duration) {
        let now = self.now;
        let b = self.backoff.entry(addr).or_insert(MBackoff {
            failures: 0,
            until: now,
        });
        b.failures = b.failures.saturating_add(1);
        let (lo, hi) = self.s.backoff_bounds(b.failures);
        (b.failures, lo, hi)
    }

    /// Sets the deadline of `addr` to what the pool drew.
    pub fn set_backoff_until(&mut self, addr: u8, until: Duration) {
        if let Some(b) = self.backoff.get_mut(&addr) {
            b.until = until;
        }
    }

    /// `get_or_connect(addr)` with the connect (if one is made) following `script`. Moves the
    /// clock by the time the connect takes. On `Connected` the caller adds the connection; on
    /// `Failed`/`TimedOut` it records the backoff.
    pub fn get_or_connect(&mut self, addr: u8, script: ConnectScript) -> ConnectPlan {
        if self.closed {
            return ConnectPlan::Closed;
        }
        if let Some(i) = self.get(addr) {
            return ConnectPlan::Existing(i);
        }
        // A connection still pooled is unfit: it is evicted as a health sweep would, before any
        // dialling, so an unhealthy one starts the backoff of its address (I12).
        if let Some(&stale) = self.live.get(&addr) {
            self.retire(stale);
            if self.conns[stale].marked_closed {
                self.counters.closed += 1;
            } else {
                self.counters.unhealthy += 1;
                let (failures, lo, hi) = self.backoff_failure(addr);
                self.counters.backoff_rejections += 1;
                return ConnectPlan::FreshBackoff { failures, lo, hi };
            }
        }
        if let Some(b) = self.backoff.get(&addr)
            && b.until > self.now
        {
            self.counters.backoff_rejections += 1;
            return ConnectPlan::Backoff {
                retry_after: b.until - self.now,
                failures: b.failures,
            };
        }
        // I3: a slot first.
        if self.full() && !(self.s.lru && self.evict_lru_except(addr)) {
            self.counters.rejected += 1;
            return ConnectPlan::AtCapacity;
        }
        self.counters.attempted += 1;
        match script {
            ConnectScript::Ok | ConnectScript::Slow => {
                if script == ConnectScript::Slow {
                    let slow = self.s.timeout.saturating_sub(Duration::from_millis(1));
                    if !slow.is_zero() {
                        self.now = after_timer(self.now, slow);
                    }
                }
                self.counters.succeeded += 1;
                self.backoff.remove(&addr);
                ConnectPlan::Connected
            }
            ConnectScript::Fail => {
                self.counters.failed += 1;
                ConnectPlan::Failed
            }
            ConnectScript::Hang => {
                self.now = after_timer(self.now, self.s.timeout);
                self.counters.timed_out += 1;
                ConnectPlan::TimedOut
            }
        }
    }

    /// `clear()`.
    pub fn clear(&mut self) {
        let live: Vec<usize> = self.live.values().copied().collect();
        for i in live {
            self.retire(i);
            self.counters.manual += 1;
        }
    }

    /// `close()`: everything closed, backoff forgotten, new work refused.
    pub fn close(&mut self) {
        self.closed = true;
        self.clear();
        self.backoff.clear();
    }
}
