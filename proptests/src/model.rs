//! The reference model: what the pool must do, stated with plain maps and counters on a virtual
//! clock that starts at zero. It shares no code with the pool: the health verdict, the sliding
//! window, the idle predicate, the backoff schedule, the ejection count that learns and decays,
//! and the rule for which addresses the pool keeps are restated here (docs/DESIGN.md).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
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

/// I12 restated: the un-jittered backoff at ejection count `k` (0 counts as 1), in nanoseconds,
/// `min(base · multiplier^(k−1), max)`. In floating point: the power overflows to infinity for large
/// `k`, which the cap absorbs.
pub fn grown_ns(base: Duration, max: Duration, multiplier: f64, k: u32) -> f64 {
    let grown = base.as_nanos() as f64 * multiplier.powf(f64::from(k.max(1) - 1));
    grown.min(max.as_nanos() as f64)
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
    /// Backoff growth per ejection.
    pub multiplier: f64,
    /// A connection closed younger than this counts as a failure of its address.
    pub short_lived: Duration,
    /// Quiet time that takes one step off an ejection count.
    pub decay: Duration,
    /// `max_per_address` (I19).
    pub per_address: usize,
    /// How long a checkout waits: `checkout_timeout`, or else the connect timeout (I16).
    pub checkout_timeout: Duration,
    /// Whether `checkout_timeout` is set (else the connect timeout stands in).
    pub checkout_timeout_set: bool,
    /// `busy_in_flight` (I23): the calls in flight at which a shared connection is busy;
    /// `u64::MAX` never (one shared connection per address, the behaviour before issue 13).
    pub busy: u64,
}

fn pick<T: Copy>(values: &[T], i: u8) -> T {
    values[usize::from(i) % values.len()]
}

impl From<Knobs> for Settings {
    fn from(k: Knobs) -> Self {
        let ms = Duration::from_millis;
        let base = pick(&[ms(1_000), ms(1), ms(100)], k.base);
        let timeout = pick(&[ms(3_000), ms(1), ms(50)], k.timeout);
        let checkout_timeout = pick(&[None, Some(ms(100)), Some(ms(1_000))], k.checkout_timeout);
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
            timeout,
            multiplier: pick(&[1.6, 2.0, 1.0, 16.0], k.multiplier),
            short_lived: pick(&[ms(5_000), ms(0), ms(100)], k.short_lived),
            decay: pick(&[ms(30_000), ms(1_000), ms(50), ms(1)], k.decay),
            per_address: pick(&[1, 2, 3], k.per_address),
            checkout_timeout: checkout_timeout.unwrap_or(timeout),
            checkout_timeout_set: checkout_timeout.is_some(),
            busy: pick(&[u64::MAX, 1, 2], k.busy),
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
        c.backoff.multiplier = self.multiplier;
        c.ejection.short_lived = self.short_lived;
        c.ejection.decay_interval = self.decay;
        c.connect_timeout = self.timeout;
        c.max_per_address = self.per_address;
        // `max_per_address` bounds the shared mode too (I23): with `busy` below `u64::MAX` an
        // address grows to several shared connections once every one has that many calls in
        // flight (the ops `Begin`/`Finish` hold calls across ops).
        c.busy_in_flight = self.busy;
        if self.checkout_timeout_set {
            c.checkout_timeout = Some(self.checkout_timeout);
        }
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

    /// I12 restated: the un-jittered delay at ejection count `k` ([`grown_ns`]).
    pub fn backoff(&self, k: u32) -> Duration {
        Duration::from_nanos(grown_ns(self.base, self.cap, self.multiplier, k) as u64)
    }

    /// The bounds the jittered delay at count `k` must fall in: `delay(k, unit) = max(1 ms,
    /// d · (1 + j·(2·unit − 1)))` for a draw `unit ∈ [0, 1]`, so within `[d·(1−j), d·(1+j)]`, at
    /// least 1 ms; widened by 1 µs for float rounding.
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
    /// The idle clock: the last exact use (a call's start or end, a recorded result), or the
    /// instant a sweep folded a `get`'s mark in.
    pub last_used: Duration,
    /// A `get` marked it used since the last fold (`ConnectionMetrics::pending_use`): `get` reads
    /// no clock, and the idle sweep folds the mark in at its own instant.
    pub used: bool,
    /// The last use of any kind, `get` included, exactly: what I5 ("never evicted within
    /// `max_idle` of a use") is judged against, whatever the clock says.
    pub exact_last_use: Duration,
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
    /// What tripped it, stored when the latch closed.
    pub tripped: Option<Tripped>,
    /// Marked closed (by `mark_closed`, or by the pool on finding its transport dead).
    pub marked_closed: bool,
    /// Its transport died (the connector's `is_open` is false).
    pub transport_dead: bool,
    /// The pool must have closed it through the connector (evicted, replaced, cleared, closed).
    pub closed_by_pool: bool,
}

impl MConn {
    /// `(successes, failures)` in the window ending at `now`, which slides in steps of one bucket
    /// counted from the pool's origin (model time 0), as the pool counts them since issue 16 (its
    /// connections' clocks are offsets from the pool's shared origin); bucketing from the
    /// connection's creation disagreed at bucket edges (seed 41 at 4,000 cases).
    pub fn window_counts(&self, s: &Settings, now: Duration) -> (u64, u64) {
        let w = s.bucket_us();
        let current = now.as_micros() as u64 / w;
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

    /// I5/I6 restated: idle when nothing is in flight, no `get` is pending, and the clock is older
    /// than `max_idle` (what `stats().idle` counts, which folds nothing).
    pub fn idle(&self, s: &Settings, now: Duration) -> bool {
        s.max_idle
            .is_some_and(|max| !self.used && self.in_flight == 0 && now - self.last_used > max)
    }
}

/// The evidence an unhealthy latch closed on (I9), stored then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tripped {
    /// The trailing run of failures reached the threshold; its length then.
    Run(u32),
    /// The failure ratio fired: `(failures, calls)` in the window then.
    Ratio(u64, u64),
}

/// The failure behind an address's current backoff, which `PoolError::Backoff` reports (I12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MCause {
    /// A connect failed (the connector's error).
    Refused,
    /// A connect timed out.
    TimedOut,
    /// An unhealthy connection was evicted; the reason its latch closed on.
    Tripped(Tripped),
    /// A connection closed while short-lived.
    Closed,
}

/// The ejection state of an address (I12), stored only as of its last rise: the decay since then
/// is computed, never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MEjection {
    /// The count right after the last rise.
    pub count: u32,
    /// The end of the backoff of the last rise (what the pool drew); the address is quiet from
    /// then on.
    pub until: Duration,
}

impl MEjection {
    /// The count at `now`: one step less for every whole decay interval elapsed since the backoff
    /// ended, never below zero.
    pub fn count_at(&self, decay: Duration, now: Duration) -> u32 {
        if now <= self.until {
            return self.count;
        }
        let steps = (now - self.until).as_nanos() / decay.as_nanos().max(1);
        match u32::try_from(steps) {
            Ok(steps) => self.count.saturating_sub(steps),
            Err(_) => 0,
        }
    }

    /// Backing off at `now`.
    pub fn backing_off(&self, now: Duration) -> bool {
        self.until > now
    }

    /// Nothing left to remember at `now`: not backing off, and the count decayed to zero.
    pub fn settled(&self, decay: Duration, now: Duration) -> bool {
        !self.backing_off(now) && self.count_at(decay, now) == 0
    }
}

/// A rise of an address's ejection count the model made in the current op: the pool drew the
/// deadline (jitter), which the harness reads and checks against these bounds, relative to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rise {
    /// Address index.
    pub addr: u8,
    /// The count after the rise.
    pub count: u32,
    /// Shortest delay allowed.
    pub lo: Duration,
    /// Longest delay allowed.
    pub hi: Duration,
    /// What rose it.
    pub why: &'static str,
}

impl MCause {
    fn describe(self) -> &'static str {
        match self {
            MCause::Refused => "a failed connect",
            MCause::TimedOut => "a timed-out connect",
            MCause::Tripped(_) => "an unhealthy eviction",
            MCause::Closed => "a connection closed while short-lived",
        }
    }
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
    /// Removed by hand, cleared or closed.
    pub manual: u64,
    /// Evicted to make room for another address (`WhenFull::EvictLeastRecentlyUsed`).
    pub make_room: u64,
    /// Exclusive connections returned marked broken.
    pub broken: u64,
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
    /// Transport closed: a failure of the address only if the connection was short-lived.
    Closed,
    /// Tripped the health policy: a failure of the address.
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
    /// unfit (unhealthy, or closed while short-lived), so it was evicted first and the address's
    /// ejection count rose (I12). The deadline must fall `lo..=hi` from now.
    FreshBackoff {
        /// The count after this rise.
        failures: u32,
        /// The eviction's cause.
        cause: MCause,
        /// Shortest delay allowed.
        lo: Duration,
        /// Longest delay allowed.
        hi: Duration,
    },
    /// `PoolError::Backoff` with these fields.
    Backoff {
        /// Time left.
        retry_after: Duration,
        /// The ejection count now.
        failures: u32,
        /// The cause of the last rise.
        cause: MCause,
    },
    /// `PoolError::AtCapacity`.
    AtCapacity,
    /// A new connection.
    Connected,
    /// `PoolError::Connect`; the address's count rose.
    Failed,
    /// `PoolError::ConnectTimeout`; the address's count rose.
    TimedOut,
    /// The connect was still running when `close()` began: abandoned, `PoolError::Closed`.
    Abandoned,
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
    /// Address index → its shared connections, in the pool's order (I23): the first
    /// (`Slot::conn`), then the others oldest first; removing the first promotes the next, and
    /// an insert by hand replaces the first in place. Never an empty list.
    pub live: BTreeMap<u8, Vec<usize>>,
    /// A connect started in the background by a `get_or_connect` hit that found every shared
    /// connection of the address busy (I23), not yet ended: the address. The harness ends it
    /// with [`end_growth`](Self::end_growth) once the pool's task ran.
    pub growing: Option<u8>,
    /// Background connects started so far (I23), for tests that a scenario reaches growth.
    pub growths: u64,
    /// Address index → ejection state (absent: count 0, not backing off).
    pub ejection: BTreeMap<u8, MEjection>,
    /// Address index → the cause of its last rise (absent after `mark_up`, or never risen).
    pub causes: BTreeMap<u8, MCause>,
    /// The addresses the pool keeps a slot for (I18): after every op, each one the op looked at is
    /// kept exactly when it holds something (a connection, or an unsettled ejection state); the
    /// others stay until `prune_addresses` (or an op on them) finds them settled.
    pub slots: BTreeSet<u8>,
    /// The rises of the current op, for the harness to check against the pool's draws.
    pub rises: Vec<Rise>,
    /// Expected counters.
    pub counters: Counters,
    /// Every exclusive connection the run has made, by creation order.
    pub xconns: Vec<MX>,
    /// Address index → its line of checkouts (absent: no exclusive state).
    pub lines: BTreeMap<u8, MLine>,
    /// Checkouts still waiting, by arrival: waiter id → its address and deadline.
    pub waiters: BTreeMap<usize, MWaiter>,
    /// Exclusive connections checked out, in the order the harness holds them.
    pub held: Vec<usize>,
    /// How the checkouts that ended in the current op ended, for the harness to compare.
    pub ended: Vec<(usize, Ended)>,
    /// Addresses whose server refuses the connects nobody scripted.
    pub down: BTreeSet<u8>,
    /// Waiter ids handed out so far.
    pub next_waiter: usize,
    /// The address whose shared connection the current op evicted as unfit before connecting
    /// anew: the checkouts that eviction woke tried while the connect ran, when the address had
    /// no connection to close for room, and the new one wakes nobody. Cleared before every op.
    pub hidden: Option<u8>,
}

/// An exclusive connection, as the model knows it.
#[derive(Clone, Debug)]
pub struct MX {
    /// Address index.
    pub addr: u8,
    /// The pool's id for it; 0 until the harness sees the checkout it was handed in.
    pub id: u64,
    /// The pool must have closed it (broken, evicted, closed with the pool).
    pub closed_by_pool: bool,
}

/// The exclusive state of one address (I19–I22).
#[derive(Clone, Debug, Default)]
pub struct MLine {
    /// Idle connections, least recently returned first, with the instant each came back.
    pub idle: VecDeque<(usize, Duration)>,
    /// Connections checked out.
    pub out: usize,
    /// Connects in flight (only while the model settles).
    pub connecting: usize,
    /// Callers in line, oldest first.
    pub line: VecDeque<usize>,
    /// Its callers last tried to start a connect and could not (the pool full with no room to
    /// make, or the address backing off): they sleep until something wakes every waiting
    /// checkout (capacity freed, a connection idled, a caller left a line), or their retry timer.
    /// Restated as the pool does it: under LRU with a cap, a shared connection whose last call
    /// ends, or whose connect's caller has taken it (the end of a `get_or_connect`'s handoff),
    /// wakes every line (the pool's quiet hook); one inserted by hand or made in the background
    /// (I23) wakes nobody, so a line can still sleep to its deadline (`AtCapacity`) while such a
    /// connection exists, which a new caller would close at once.
    pub asleep: bool,
    /// The retry timer its callers armed when they last met the address's backoff (its end
    /// then; `mark_up` does not move it).
    pub retry_at: Option<Duration>,
    /// A caller arrived behind others while the line slept: it tries to start a connect, but
    /// only the first caller makes room, so it starts one only into a free slot.
    pub nudged: bool,
}

impl MLine {
    /// Connections of the address (I19): idle and checked out (connects finish within the op).
    pub fn live(&self) -> usize {
        self.idle.len() + self.out + self.connecting
    }

    fn is_empty(&self) -> bool {
        self.live() == 0 && self.line.is_empty()
    }
}

/// A checkout waiting in line.
#[derive(Clone, Copy, Debug)]
pub struct MWaiter {
    /// Address index.
    pub addr: u8,
    /// When it gives up.
    pub deadline: Duration,
}

/// How a checkout ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ended {
    /// Handed exclusive connection `i` (an idle one, one returned, or one made for it).
    Conn(usize),
    /// `PoolError::Closed`.
    Closed,
    /// `PoolError::Backoff` with these fields.
    Backoff {
        /// Time left.
        retry_after: Duration,
        /// The ejection count now.
        failures: u32,
        /// The cause of the last rise.
        cause: MCause,
    },
    /// `PoolError::Connect`: the connect made for it failed.
    Refused,
    /// `CheckoutError::TimedOut` with this many of the address's connections checked out.
    TimedOut(usize),
    /// `CheckoutError::AtCapacity`.
    AtCapacity,
}

/// A victim of making room: the least recently used connection of another address nobody holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Shared(usize),
    Exclusive(u8),
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
            growing: None,
            growths: 0,
            ejection: BTreeMap::new(),
            causes: BTreeMap::new(),
            slots: BTreeSet::new(),
            rises: Vec::new(),
            counters: Counters::default(),
            xconns: Vec::new(),
            lines: BTreeMap::new(),
            waiters: BTreeMap::new(),
            held: Vec::new(),
            ended: Vec::new(),
            down: BTreeSet::new(),
            next_waiter: 0,
            hidden: None,
        }
    }

    /// An exact use of `i` (a call's start or end, a recorded result): moves the idle clock to now
    /// (never backwards, no rounding) and clears a pending `get`, which it covers.
    fn touch(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.used = false;
        c.last_used = c.last_used.max(self.now);
        c.exact_last_use = c.exact_last_use.max(self.now);
    }

    /// `get`'s use: a mark, no clock.
    fn mark_used(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.used = true;
        c.exact_last_use = c.exact_last_use.max(self.now);
    }

    /// An observer of the idle clock folds a pending `get` in at its instant (time stands still
    /// under paused time, so the pool's clock read after the mark is `now` too).
    fn fold(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if std::mem::take(&mut c.used) {
            c.last_used = c.last_used.max(self.now);
        }
    }

    fn full(&self) -> bool {
        self.s.max > 0 && self.used() >= self.s.max
    }

    /// Capacity in use (I1): shared connections, exclusive ones idle or checked out, and those
    /// checked out when the pool closed (their permits go when they come back).
    pub fn used(&self) -> usize {
        self.shared_count()
            + usize::from(self.growing.is_some())
            + self.lines.values().map(MLine::live).sum::<usize>()
            + self.out_closed()
    }

    /// Shared connections pooled, every address.
    pub fn shared_count(&self) -> usize {
        self.live.values().map(Vec::len).sum()
    }

    /// Every shared connection pooled, by address, then in the pool's order.
    pub fn all_live(&self) -> Vec<usize> {
        self.live.values().flatten().copied().collect()
    }

    /// The shared connections of `addr`, in the pool's order.
    pub fn shared(&self, addr: u8) -> &[usize] {
        self.live.get(&addr).map_or(&[], Vec::as_slice)
    }

    /// The first shared connection of `addr`: the one `peek`, `take_unclosed` and the
    /// address-keyed `record_*` name.
    pub fn first(&self, addr: u8) -> Option<usize> {
        self.shared(addr).first().copied()
    }

    /// Whether connection `i` is one of its address's shared connections.
    pub fn is_live(&self, i: usize) -> bool {
        self.shared(self.conns[i].addr).contains(&i)
    }

    /// Takes connection `i` out of its address's list (the order of the others kept).
    fn unlist(&mut self, i: usize) -> bool {
        let addr = self.conns[i].addr;
        let Some(list) = self.live.get_mut(&addr) else {
            return false;
        };
        let Some(at) = list.iter().position(|&j| j == i) else {
            return false;
        };
        list.remove(at);
        if list.is_empty() {
            self.live.remove(&addr);
        }
        true
    }

    /// Exclusive connections checked out that no line counts any more (the pool closed).
    pub fn out_closed(&self) -> usize {
        let counted: usize = self.lines.values().map(|l| l.out).sum();
        self.held.len().saturating_sub(counted)
    }

    /// The ejection state of `addr`.
    pub fn ejection(&self, addr: u8) -> MEjection {
        self.ejection.get(&addr).copied().unwrap_or_default()
    }

    /// The ejection count of `addr` now.
    pub fn count(&self, addr: u8) -> u32 {
        self.ejection(addr).count_at(self.s.decay, self.now)
    }

    /// Whether `addr` holds anything worth a slot now (I18): a connection, or an ejection state
    /// not settled.
    pub fn holds(&self, addr: u8) -> bool {
        self.live.contains_key(&addr)
            || self.growing == Some(addr)
            || !self.ejection(addr).settled(self.s.decay, self.now)
            || self.lines.get(&addr).is_some_and(|l| !l.is_empty())
    }

    /// The pool looked at the slot of `addr` (under its entry lock) and left it as the model's
    /// state now says: kept if it holds something, gone (state and all) otherwise.
    fn looked_at(&mut self, addr: u8) {
        if self.lines.get(&addr).is_some_and(MLine::is_empty) {
            self.lines.remove(&addr);
        }
        if self.holds(addr) {
            self.slots.insert(addr);
        } else {
            self.slots.remove(&addr);
            self.ejection.remove(&addr);
            self.causes.remove(&addr);
        }
    }

    /// One more failure of `addr` now (I12): the decay due is applied, the count rises by one, and
    /// a backoff of `delay(count)` starts; the pool's draw of it is set with
    /// [`set_backoff_until`](Self::set_backoff_until) (the placeholder deadline is the earliest
    /// allowed).
    fn rise(&mut self, addr: u8, cause: MCause) -> Rise {
        let count = self.count(addr).saturating_add(1);
        let (lo, hi) = self.s.backoff_bounds(count);
        self.ejection.insert(
            addr,
            MEjection {
                count,
                // Backing off from now on; where exactly, the harness reads from the pool's draw.
                until: self.now + lo,
            },
        );
        self.causes.insert(addr, cause);
        let rise = Rise {
            addr,
            count,
            lo,
            hi,
            why: cause.describe(),
        };
        self.rises.push(rise);
        rise
    }

    /// Sets the deadline of `addr`'s current backoff to what the pool drew.
    pub fn set_backoff_until(&mut self, addr: u8, until: Duration) {
        if let Some(e) = self.ejection.get_mut(&addr) {
            e.until = until;
        }
    }

    /// A connection just pooled for `addr` under id `id`; returns its index. With `first`, it
    /// takes the first place (an insert by hand replacing the first, I23); otherwise it joins
    /// the address's list last (a new connection, or the first of an address with none).
    pub fn add_conn(&mut self, addr: u8, id: u64, first: bool) -> usize {
        let i = self.conns.len();
        self.conns.push(MConn {
            addr,
            id,
            created: self.now,
            last_used: self.now,
            used: false,
            exact_last_use: self.now,
            in_flight: 0,
            run: 0,
            successes: 0,
            errors: 0,
            cancelled: 0,
            max_latency_us: 0,
            outcomes: Vec::new(),
            unhealthy: false,
            tripped: None,
            marked_closed: false,
            transport_dead: false,
            closed_by_pool: false,
        });
        let list = self.live.entry(addr).or_default();
        if first {
            list.insert(0, i);
        } else {
            list.push(i);
        }
        self.slots.insert(addr);
        i
    }

    fn retire(&mut self, i: usize) {
        self.wake_all();
        self.unlist(i);
        self.conns[i].closed_by_pool = true;
    }

    /// A connection leaves as unfit (a health sweep, or `get_or_connect` finding it so): counted
    /// by why, and a failure of its address if unhealthy or closed while short-lived (I12).
    /// Returns whether the address's count rose.
    fn evict_unfit(&mut self, i: usize, why: HealthEviction) -> bool {
        self.retire(i);
        let c = &self.conns[i];
        // Young, and it never served or its last call failed: accept-then-close, or a server that
        // died mid-request. One whose last call succeeded was closed gracefully (an HTTP/1.1
        // keep-alive's end): no failure.
        let ended_cleanly = c.successes > 0 && c.run == 0;
        let (addr, young) = (
            c.addr,
            self.now - c.created < self.s.short_lived && !ended_cleanly,
        );
        let cause = match why {
            HealthEviction::Closed => {
                self.counters.closed += 1;
                young.then_some(MCause::Closed)
            }
            HealthEviction::Unhealthy => {
                self.counters.unhealthy += 1;
                c.tripped.map(MCause::Tripped)
            }
        };
        if let Some(cause) = cause {
            self.rise(addr, cause);
        }
        cause.is_some()
    }

    /// Why connection `i` is unfit, if it is (after [`usable`](Self::usable) marked a dead
    /// transport): the latched verdict first, then a closed transport (the `mark_closed` flag, or a
    /// dead transport, which `usable` marks only on a connection still healthy). An unhealthy
    /// connection thus leaves as `Unhealthy` (a failure of its address) however its transport was
    /// later found closed.
    fn unfit(&self, i: usize) -> Option<HealthEviction> {
        let c = &self.conns[i];
        if c.unhealthy {
            Some(HealthEviction::Unhealthy)
        } else if c.marked_closed {
            Some(HealthEviction::Closed)
        } else {
            None
        }
    }

    /// The least recently used connection of another address than `addr` that nobody holds: an
    /// idle exclusive one (by the instant it came back), or if `shared_too` a shared one with
    /// nothing in flight (a pending `get` sorts as newer than any clock); ties by address, then
    /// id, then shared before exclusive.
    fn victim(&self, addr: u8, shared_too: bool) -> Option<Victim> {
        self.victim_for(addr, shared_too, None)
    }

    /// [`victim`](Self::victim), the shared connection of `hidden` left out.
    fn victim_for(&self, addr: u8, shared_too: bool, hidden: Option<u8>) -> Option<Victim> {
        let shared = self
            .live
            .iter()
            .flat_map(|(&a, list)| list.iter().map(move |&i| (a, i)))
            .filter(|&(a, i)| {
                shared_too && a != addr && hidden != Some(a) && self.conns[i].in_flight == 0
            })
            .map(|(a, i)| {
                let c = &self.conns[i];
                (c.used, c.last_used, a, c.id, false, Victim::Shared(i))
            });
        let exclusive = self
            .lines
            .iter()
            .filter(|&(&a, _)| a != addr)
            .filter_map(|(&a, l)| {
                let &(x, at) = l.idle.front()?;
                Some((false, at, a, self.xconns[x].id, true, Victim::Exclusive(a)))
            });
        shared
            .chain(exclusive)
            .min_by_key(|&(used, at, a, id, kind, _)| (used, at, a, id, kind))
            .map(|v| v.5)
    }

    /// Closes a victim to make room for another address; its slot goes to the room-maker.
    fn evict_victim(&mut self, victim: Victim) {
        let a = match victim {
            Victim::Shared(i) => {
                let a = self.conns[i].addr;
                self.unlist(i);
                self.conns[i].closed_by_pool = true;
                a
            }
            Victim::Exclusive(a) => {
                let line = self.lines.get_mut(&a).expect("a victim's line");
                let (x, _) = line.idle.pop_front().expect("a victim is idle");
                self.xconns[x].closed_by_pool = true;
                a
            }
        };
        self.counters.make_room += 1;
        self.looked_at(a);
    }

    /// `WhenFull::EvictLeastRecentlyUsed` for a shared caller: evict the least recently used
    /// connection of another address nobody holds. Returns whether one went.
    fn evict_lru_except(&mut self, addr: u8) -> bool {
        match self.victim(addr, true) {
            Some(v) => {
                self.evict_victim(v);
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
        if let Some(old) = self.first(addr) {
            // I2: a present address keeps its slot (no capacity freed, nobody woken). With
            // several shared connections the first is replaced, in its place (the caller adds
            // the new one first).
            let asleep: Vec<bool> = self.lines.values().map(|l| l.asleep).collect();
            self.retire(old);
            for (line, asleep) in self.lines.values_mut().zip(asleep) {
                line.asleep = asleep;
            }
            self.counters.replaced += 1;
            return InsertPlan::Placed;
        }
        if self.full() {
            // The first attempt looked at the address's slot and found no room.
            self.looked_at(addr);
            if !(self.s.lru && self.evict_lru_except(addr)) {
                self.counters.rejected += 1;
                return InsertPlan::Rejected;
            }
        }
        InsertPlan::Placed
    }

    /// `get(addr)`: the usable pooled connection, marked used (no clock read). Finding a dead
    /// transport on a healthy connection marks it closed (what `is_open` returning false means).
    /// Of several (I23), the usable one with the fewest calls in flight, the first in the pool's
    /// order of equals; every one is looked at (each dead transport found is marked closed).
    pub fn get(&mut self, addr: u8) -> Option<usize> {
        let i = self.least_loaded(addr)?;
        self.mark_used(i);
        Some(i)
    }

    /// I23 restated: the usable shared connection of `addr` with the fewest calls in flight, the
    /// earliest in the pool's order of equals (the oldest, but for a first replaced by hand).
    fn least_loaded(&mut self, addr: u8) -> Option<usize> {
        let list = self.shared(addr).to_vec();
        let mut best: Option<usize> = None;
        for i in list {
            if self.usable(i)
                && best.is_none_or(|b| self.conns[i].in_flight < self.conns[b].in_flight)
            {
                best = Some(i);
            }
        }
        best
    }

    /// Whether a hit on `addr` could start a background connect (I23) during an op that does
    /// several things in turn (a warm-up), ignoring the cap, the backoff and the number of
    /// connections: growth is on and one usable connection of the address is busy. Conservative
    /// on purpose: an earlier step of the op may close the address's idle connections to make
    /// room (then the busy one is the least loaded) or free a slot (a failed connect). Pure: the
    /// harness uses it to keep ops whose background connect would race their own awaits out of a
    /// run.
    pub fn may_grow(&self, addr: u8) -> bool {
        self.s.per_address > 1
            && self
                .shared(addr)
                .iter()
                .map(|&i| &self.conns[i])
                .any(|c| c.healthy() && !c.transport_dead && c.in_flight >= self.s.busy)
    }

    /// After a hit on `i` for `addr` (I23): if `i` (the least loaded, so every usable one) has at
    /// least `busy_in_flight` calls in flight, the address has fewer than `max_per_address`
    /// shared connections, no connect in flight (I4), no backoff (I12), and a free slot under
    /// the cap (I1: growing never makes room), one more connect starts in the background.
    fn grow_if_busy(&mut self, addr: u8, i: usize) {
        if self.s.per_address <= 1
            || self.conns[i].in_flight < self.s.busy
            || self.shared(addr).len() >= self.s.per_address
            || self.growing.is_some()
            || self.closed
            || self.ejection(addr).backing_off(self.now)
            || self.full()
        {
            return;
        }
        self.counters.attempted += 1;
        self.growths += 1;
        self.growing = Some(addr);
    }

    /// The background connect started by [`grow_if_busy`](Self::grow_if_busy) ends, as the
    /// server at its address says (nobody scripts it): returns its address and whether it made a
    /// connection, which the caller adds last with [`add_conn`](Self::add_conn). A refused one
    /// backs the address off (I12) and frees its slot.
    pub fn end_growth(&mut self) -> Option<(u8, bool)> {
        let addr = self.growing.take()?;
        if self.down.contains(&addr) {
            self.counters.failed += 1;
            self.wake_all();
            self.rise(addr, MCause::Refused);
            self.looked_at(addr);
            return Some((addr, false));
        }
        self.counters.succeeded += 1;
        Some((addr, true))
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

    /// `remove(addr)`: hands the connection back unclosed; its slot is free at once.
    pub fn remove(&mut self, addr: u8) -> Option<usize> {
        // The first; the next oldest takes its place (I23).
        let i = self.first(addr);
        if let Some(i) = i {
            self.unlist(i);
            self.counters.manual += 1;
            self.wake_all();
        }
        self.looked_at(addr);
        i
    }

    /// `remove_connection(conn i)`: only if it is still the one pooled for its address (I14). The
    /// address's slot is looked at either way.
    pub fn remove_connection(&mut self, i: usize) -> bool {
        let addr = self.conns[i].addr;
        let removed = self.is_live(i);
        if removed {
            self.retire(i);
            self.counters.manual += 1;
        }
        self.looked_at(addr);
        removed
    }

    /// A call starts on connection `i`. It clears a pending `get`'s mark (the call's end, later,
    /// covers that `get`) but does not move the idle clock: in flight the connection is not idle
    /// (I5), and every end of a call moves the clock to its end.
    pub fn begin(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.used = false;
        c.exact_last_use = c.exact_last_use.max(self.now);
        c.in_flight += 1;
    }

    /// A call on `i` ends as a success that took `latency` (or a result recorded without a call).
    pub fn success(&mut self, i: usize, latency: Duration) {
        let at = self.now.as_micros() as u64;
        let c = &mut self.conns[i];
        c.successes += 1;
        c.run = 0;
        c.max_latency_us = c.max_latency_us.max(latency.as_micros() as u64);
        c.outcomes.push((at, true));
        self.touch(i);
    }

    /// A call on `i` fails; returns the verdict after it (I9–I11): the latch, closed by this
    /// failure or an earlier one.
    pub fn failure(&mut self, i: usize) -> bool {
        let now = self.now;
        let s = self.s;
        let at = now.as_micros() as u64;
        let c = &mut self.conns[i];
        c.errors += 1;
        c.run += 1;
        c.outcomes.push((at, false));
        if !c.unhealthy {
            let window = c.window_counts(&s, now);
            if s.unhealthy(c.run, window) {
                c.unhealthy = true;
                c.tripped = Some(if s.threshold > 0 && c.run >= s.threshold {
                    Tripped::Run(c.run)
                } else {
                    Tripped::Ratio(window.1, window.0 + window.1)
                });
            }
        }
        let verdict = c.unhealthy;
        self.touch(i);
        verdict
    }

    /// A call on `i` is dropped unfinished.
    pub fn cancel(&mut self, i: usize) {
        self.conns[i].cancelled += 1;
        self.touch(i);
    }

    /// A call on `i` is over (after its outcome). Its last call ending makes a shared connection
    /// closable for room: under LRU with a cap, that wakes every waiting checkout (the pool's
    /// quiet hook, issue 13).
    pub fn end_call(&mut self, i: usize) {
        self.conns[i].in_flight -= 1;
        if self.conns[i].in_flight == 0 && self.s.lru && self.s.max > 0 {
            self.wake_all();
        }
    }

    /// `evict_idle()`: the connections it must evict (I5, I6).
    pub fn evict_idle(&mut self) -> Vec<usize> {
        let (s, now) = (self.s, self.now);
        if s.max_idle.is_some() {
            // The sweep's look folds every pending `get` in at its instant.
            for i in self.all_live() {
                self.fold(i);
            }
        }
        // In id order (creation order), as the pool sorts its candidates.
        let mut gone: Vec<usize> = self
            .all_live()
            .into_iter()
            .filter(|&i| self.conns[i].idle(&s, now))
            .collect();
        gone.sort_unstable();
        for &i in &gone {
            self.retire(i);
            self.counters.idle += 1;
            self.looked_at(self.conns[i].addr);
        }
        gone
    }

    /// The exclusive half of `evict_idle()`: the idle exclusive connections that came back more
    /// than `max_idle` ago (I5, I6). Returns how many.
    pub fn evict_idle_exclusive(&mut self) -> usize {
        let Some(max) = self.s.max_idle else {
            return 0;
        };
        let now = self.now;
        let mut gone = 0;
        let addrs: Vec<u8> = self.lines.keys().copied().collect();
        for a in addrs {
            let line = self.lines.get_mut(&a).expect("listed");
            let before = line.idle.len();
            let mut closed = Vec::new();
            line.idle.retain(|&(x, at)| {
                let keep = now - at <= max;
                if !keep {
                    closed.push(x);
                }
                keep
            });
            let n = before - line.idle.len();
            for x in closed {
                self.xconns[x].closed_by_pool = true;
            }
            if n > 0 {
                gone += n;
                self.counters.idle += n as u64;
                self.wake_all();
                self.looked_at(a);
            }
        }
        gone
    }

    /// `evict_unhealthy()`: the connections it must evict, and why (I8, I9); the address of each
    /// unhealthy one, and of each closed one younger than `short_lived`, rises (I12).
    pub fn evict_unhealthy(&mut self) -> Vec<(usize, HealthEviction)> {
        let mut live = self.all_live();
        // The sweep's look phase: a healthy connection with a dead transport is marked closed.
        for &i in &live {
            self.usable(i);
        }
        // Evicted in id order (creation order), as the pool sorts its candidates: the order in
        // which an address's several unfit connections raise its count (I12).
        live.sort_unstable();
        let mut gone = Vec::new();
        for i in live {
            let Some(why) = self.unfit(i) else {
                continue;
            };
            self.evict_unfit(i, why);
            self.looked_at(self.conns[i].addr);
            gone.push((i, why));
        }
        gone
    }

    /// `prune_addresses()`: forgets every address that holds nothing (I18); returns how many.
    pub fn prune(&mut self) -> usize {
        let settled: Vec<u8> = self
            .slots
            .iter()
            .copied()
            .filter(|&a| !self.holds(a))
            .collect();
        for &a in &settled {
            self.looked_at(a);
        }
        settled.len()
    }

    /// `mark_up(addr)`: the backoff ends and the count is forgotten (I12); the slot goes if
    /// nothing else holds it (I18).
    pub fn mark_up(&mut self, addr: u8) {
        if self.slots.contains(&addr) {
            self.ejection.remove(&addr);
            self.causes.remove(&addr);
            self.looked_at(addr);
        }
    }

    /// `get_or_connect(addr)` with the connect (if one is made) following `script`. Moves the
    /// clock by the time the connect takes. On `Connected` the caller adds the connection; every
    /// rise of the address's count is in [`rises`](Self::rises). With `closing`, `close()` begins
    /// while the call waits for its connect: a connect that has not finished by then (one that
    /// hangs or takes time) is abandoned.
    pub fn get_or_connect(
        &mut self,
        addr: u8,
        script: ConnectScript,
        closing: bool,
    ) -> ConnectPlan {
        if self.closed {
            return ConnectPlan::Closed;
        }
        // A hit is a `get`: marked, no clock; then, if every connection is busy, growth (I23).
        if let Some(i) = self.get(addr) {
            self.grow_if_busy(addr, i);
            return ConnectPlan::Existing(i);
        }
        let plan = self.join_or_start(addr, script, closing);
        self.looked_at(addr);
        plan
    }

    fn join_or_start(&mut self, addr: u8, script: ConnectScript, closing: bool) -> ConnectPlan {
        // A connection still pooled is unfit: it is evicted as a health sweep would, before any
        // dialling, so its failure backs the address off first (I12).
        // With several (I23), every one is unfit (none was usable), and each is evicted in the
        // pool's order, each a failure of the address if it says so.
        let stale = self.shared(addr).to_vec();
        if !stale.is_empty() {
            // Its slot freed wakes the waiting checkouts, which try while this call's connect
            // runs: the connection it makes is no room for them (see `hidden`).
            self.hidden = Some(addr);
            let mut rose = false;
            for stale in stale {
                let why = self.unfit(stale).unwrap_or(HealthEviction::Closed);
                rose |= self.evict_unfit(stale, why);
            }
            if rose {
                let e = self.ejection(addr);
                self.counters.backoff_rejections += 1;
                let (lo, hi) = self.s.backoff_bounds(e.count);
                return ConnectPlan::FreshBackoff {
                    failures: e.count,
                    cause: self.causes[&addr],
                    lo,
                    hi,
                };
            }
        }
        let e = self.ejection(addr);
        if e.backing_off(self.now) {
            self.counters.backoff_rejections += 1;
            return ConnectPlan::Backoff {
                retry_after: e.until - self.now,
                failures: e.count_at(self.s.decay, self.now),
                cause: self.causes[&addr],
            };
        }
        // I3: a slot first.
        if self.full() {
            self.looked_at(addr);
            if !(self.s.lru && self.evict_lru_except(addr)) {
                self.counters.rejected += 1;
                return ConnectPlan::AtCapacity;
            }
        }
        self.counters.attempted += 1;
        let slow = self.s.timeout.saturating_sub(Duration::from_millis(1));
        let takes_time =
            script == ConnectScript::Hang || (script == ConnectScript::Slow && !slow.is_zero());
        if closing && takes_time {
            return ConnectPlan::Abandoned;
        }
        match script {
            ConnectScript::Ok | ConnectScript::Slow => {
                if script == ConnectScript::Slow && !slow.is_zero() {
                    self.now = after_timer(self.now, slow);
                }
                // A successful connect does not reset the count (I12).
                self.counters.succeeded += 1;
                // The handoff ends with the caller: under LRU with a cap the new connection, no
                // call in flight, is now closable for room, so the checkouts waiting at the cap
                // are woken (the pool's quiet hook, since 439a532), the line of the very
                // address whose unfit connection this call evicted included.
                if self.s.lru && self.s.max > 0 {
                    self.wake_all();
                    self.hidden = None;
                }
                ConnectPlan::Connected
            }
            ConnectScript::Fail => {
                self.counters.failed += 1;
                self.wake_all();
                self.rise(addr, MCause::Refused);
                ConnectPlan::Failed
            }
            ConnectScript::Hang => {
                self.now = after_timer(self.now, self.s.timeout);
                self.counters.timed_out += 1;
                self.wake_all();
                self.rise(addr, MCause::TimedOut);
                ConnectPlan::TimedOut
            }
        }
    }

    /// `clear()`: every connection removed and closed; ejection states stay.
    pub fn clear(&mut self) {
        for i in self.all_live() {
            let a = self.conns[i].addr;
            self.retire(i);
            self.counters.manual += 1;
            self.looked_at(a);
        }
    }

    /// `close()`, a cut: everything closed, every address forgotten, new work refused (I17).
    pub fn close(&mut self) {
        self.closed = true;
        for i in self.all_live() {
            self.retire(i);
            self.counters.manual += 1;
        }
        // Callers in line get `Closed`; idle exclusive connections are closed; those checked out
        // are closed when they come back (I17).
        for (w, _) in std::mem::take(&mut self.waiters) {
            self.ended.push((w, Ended::Closed));
        }
        for line in std::mem::take(&mut self.lines).into_values() {
            for (x, _) in line.idle {
                self.xconns[x].closed_by_pool = true;
                self.counters.manual += 1;
            }
        }
        self.slots.clear();
        self.ejection.clear();
        self.causes.clear();
    }
}

/// Exclusive checkout (issue 13; docs/DESIGN.md "Exclusive checkout", I19–I22).
impl Model {
    /// Something woke every waiting checkout (capacity freed, a connection idled, a caller left
    /// a line others still wait in): every line tries again.
    fn wake_all(&mut self) {
        for line in self.lines.values_mut() {
            line.asleep = false;
        }
    }

    fn end(&mut self, w: usize, how: Ended) {
        self.waiters.remove(&w);
        self.ended.push((w, how));
    }

    /// `checkout(addr)` arrives: returns its waiter id; how it ended, if it did at once, is in
    /// [`ended`](Self::ended). The caller runs [`settle`](Self::settle) after.
    pub fn checkout(&mut self, addr: u8) -> usize {
        let w = self.next_waiter;
        self.next_waiter += 1;
        if self.closed {
            self.ended.push((w, Ended::Closed));
            return w;
        }
        let line = self.lines.entry(addr).or_default();
        // I21: an idle connection goes only to a caller that finds nobody in line; the most
        // recently returned first.
        if line.line.is_empty()
            && let Some((x, _)) = line.idle.pop_back()
        {
            line.out += 1;
            self.ended.push((w, Ended::Conn(x)));
            self.looked_at(addr);
            return w;
        }
        // Its arrival tries to start a connect for the line; only the first caller in line makes
        // room, and a later one finds the line as the first left it (asleep or not).
        if line.line.is_empty() {
            line.asleep = false;
        } else {
            line.nudged = true;
        }
        line.line.push_back(w);
        let live = line.live();
        let wants = live < self.s.per_address;
        let deadline = self.now + self.s.checkout_timeout;
        self.waiters.insert(w, MWaiter { addr, deadline });
        let e = self.ejection(addr);
        if wants && e.backing_off(self.now) && live == 0 {
            // Nothing could serve it before the backoff ends: `Backoff` at once (it leaves the
            // line under the same lock, waking nobody).
            self.counters.backoff_rejections += 1;
            if let Some(line) = self.lines.get_mut(&addr) {
                line.line.retain(|&x| x != w);
            }
            let how = Ended::Backoff {
                retry_after: e.until - self.now,
                failures: e.count_at(self.s.decay, self.now),
                cause: self.causes[&addr],
            };
            self.end(w, how);
        }
        self.looked_at(addr);
        w
    }

    fn leave_line(&mut self, addr: u8, w: usize) {
        if let Some(line) = self.lines.get_mut(&addr) {
            line.line.retain(|&x| x != w);
            if !line.line.is_empty() {
                self.wake_all();
            }
        }
    }

    /// The waiting checkouts, oldest first.
    pub fn waiting(&self) -> Vec<usize> {
        self.waiters.keys().copied().collect()
    }

    /// The oldest caller in line for `addr`.
    pub fn first_waiter(&self, addr: u8) -> Option<usize> {
        self.lines.get(&addr)?.line.front().copied()
    }

    /// The oldest caller in line, handed a connection, is dropped before it took it: it gives
    /// the connection back as its own (the caller runs [`give_back`](Self::give_back) for it),
    /// and wakes nobody.
    pub fn drop_handed(&mut self, w: usize) {
        if let Some(waiter) = self.waiters.remove(&w)
            && let Some(line) = self.lines.get_mut(&waiter.addr)
        {
            line.line.retain(|&x| x != w);
        }
    }

    /// A waiting checkout's future is dropped: it leaves the line, nothing counted (I22).
    pub fn drop_waiter(&mut self, w: usize) {
        if let Some(waiter) = self.waiters.remove(&w) {
            self.leave_line(waiter.addr, w);
            self.looked_at(waiter.addr);
        }
    }

    /// Checkout `h` (an index into [`held`](Self::held)) is dropped, `broken` or not: the
    /// connection goes to the oldest caller in line, or idles; closed if broken or the pool
    /// closed.
    pub fn give_back(&mut self, h: usize, broken: bool) {
        let x = self.held.remove(h);
        let addr = self.xconns[x].addr;
        let counted = !self.closed && self.lines.get(&addr).is_some_and(|l| l.out > 0);
        if !counted {
            // No line any more: the pool closed while it was out (I17).
            self.xconns[x].closed_by_pool = true;
            self.counters.manual += 1;
            return;
        }
        let now = self.now;
        let line = self.lines.get_mut(&addr).expect("counted");
        line.out -= 1;
        if broken {
            self.xconns[x].closed_by_pool = true;
            self.counters.broken += 1;
            self.wake_all();
        } else if let Some(w) = line.line.pop_front() {
            // I21: to the oldest caller in line.
            line.out += 1;
            self.end(w, Ended::Conn(x));
        } else {
            line.idle.push_back((x, now));
            self.wake_all();
        }
        self.looked_at(addr);
    }

    /// The checkouts that ended since the last call, by waiter id; the connections handed out
    /// join [`held`](Self::held) in that order.
    pub fn take_ended(&mut self) -> Vec<(usize, Ended)> {
        let mut ended = std::mem::take(&mut self.ended);
        ended.sort_by_key(|&(w, _)| w);
        for &(_, how) in &ended {
            if let Ended::Conn(x) = how {
                self.held.push(x);
            }
        }
        ended
    }

    /// Whether the line of `addr` wants a connect (I19: fewer connections than
    /// `max_per_address`; connects finish within the op, so none is in flight).
    fn wants_connect(&self, addr: u8) -> bool {
        self.lines
            .get(&addr)
            .is_some_and(|l| !l.line.is_empty() && l.live() < self.s.per_address)
    }

    /// Whether the line of `addr` can start a connect now: it wants one, has none in flight, does
    /// not back off, and there is room: a free slot, or an idle connection of another address
    /// its first caller may close (an exclusive one always, a shared one under LRU).
    fn can_start(&self, a: u8) -> bool {
        let l = &self.lines[&a];
        let room =
            !self.full() || (!l.asleep && self.victim_for(a, self.s.lru, self.hidden).is_some());
        !self.closed
            && self.wants_connect(a)
            && l.connecting == 0
            && !self.ejection(a).backing_off(self.now)
            && room
    }

    /// Runs the lines until no caller can do anything more, as the pool's tasks do: every line
    /// woken tries to start a connect (its first caller making room at the cap), the lines that
    /// cannot sleep; then the connects run, in the order they began (instant: each makes a
    /// connection for the oldest caller in line, or fails that caller alone and backs the
    /// address off, I12, I21); a connect's end may start the line's next connect, and a freed
    /// slot wakes every line again. `made` is the addresses the connector saw connects for, in
    /// order: where several woken lines could start, the pool's order decides (the order its
    /// tasks ran in), and the model follows it.
    ///
    /// # Errors
    /// A connect the model does not allow (I1, I12, I19), or a woken line that could connect and
    /// did not (no starvation while room exists, I21).
    pub fn settle(&mut self, made: &mut VecDeque<u8>) -> Result<(), String> {
        let mut flight: Vec<u8> = Vec::new();
        loop {
            // The woken lines try, in the order the pool's tasks ran.
            let awake: Vec<u8> = self
                .lines
                .iter()
                .filter(|&(_, l)| (!l.asleep || l.nudged) && !l.line.is_empty())
                .map(|(&a, _)| a)
                .collect();
            let mut tried = Vec::new();
            while let Some(&a) = made.front() {
                if !awake.contains(&a) || tried.contains(&a) || !self.can_start(a) {
                    break;
                }
                made.pop_front();
                tried.push(a);
                self.lines.get_mut(&a).expect("awake").nudged = false;
                self.start_connect(a);
                flight.push(a);
            }
            for &a in &awake {
                if tried.contains(&a) {
                    continue;
                }
                if self.can_start(a) {
                    return Err(format!(
                        "I21 violated (starvation): the line of address {a} could connect (room, no backoff) but nothing was dialled for it"
                    ));
                }
                let e = self.ejection(a);
                let now = self.now;
                let line = self.lines.get_mut(&a).expect("awake");
                let armed = e.backing_off(now).then_some(e.until);
                if line.asleep {
                    // A caller behind the first met the backoff: its own retry timer.
                    line.retry_at = match (line.retry_at, armed) {
                        (Some(t), Some(u)) => Some(t.min(u)),
                        (t, u) => t.or(u),
                    };
                } else {
                    line.asleep = true;
                    line.retry_at = armed;
                }
                line.nudged = false;
            }
            if flight.is_empty() {
                if let Some(&next) = made.front() {
                    return Err(format!(
                        "I19 violated: a connect to address {next} the model does not allow now (I1 cap {}, per address {}, backing off: {})",
                        self.s.max,
                        self.s.per_address,
                        self.ejection(next).backing_off(self.now)
                    ));
                }
                return Ok(());
            }
            // The connects end, in the order they began.
            for a in std::mem::take(&mut flight) {
                if self.complete_connect(a) {
                    // The connect task starts the line's next connect if it wants one.
                    if self.wants_connect(a) && !self.ejection(a).backing_off(self.now) {
                        if self.full() {
                            self.wake_all();
                        } else {
                            match made.front() {
                                Some(&next) if next == a => {
                                    made.pop_front();
                                    self.start_connect(a);
                                    flight.push(a);
                                }
                                _ => {
                                    return Err(format!(
                                        "I19 violated: the line of address {a} wants its next connect (room, per address {}) and the pool did not start it",
                                        self.s.per_address
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// At `now`, the lines whose retry timer fired try again.
    pub fn retry(&mut self) {
        let now_ms = self.now.as_nanos() / 1_000_000;
        for line in self.lines.values_mut() {
            if line
                .retry_at
                .is_some_and(|t| t.as_nanos().div_ceil(1_000_000) <= now_ms)
            {
                line.retry_at = None;
                line.asleep = false;
            }
        }
    }

    fn start_connect(&mut self, a: u8) {
        if self.full() {
            let victim = self
                .victim_for(a, self.s.lru, self.hidden)
                .expect("can_start found room");
            self.evict_victim(victim);
        }
        self.counters.attempted += 1;
        self.lines.get_mut(&a).expect("line").connecting += 1;
    }

    /// A connect of the line of `a` ends; returns whether it made a connection.
    fn complete_connect(&mut self, a: u8) -> bool {
        let line = self.lines.get_mut(&a).expect("line");
        line.connecting -= 1;
        let w = line
            .line
            .pop_front()
            .expect("a line with a connect has a caller");
        if self.down.contains(&a) {
            self.counters.failed += 1;
            self.end(w, Ended::Refused);
            self.rise(a, MCause::Refused);
            self.wake_all();
            self.looked_at(a);
            return false;
        }
        self.counters.succeeded += 1;
        let x = self.xconns.len();
        self.xconns.push(MX {
            addr: a,
            id: 0,
            closed_by_pool: false,
        });
        self.lines.get_mut(&a).expect("line").out += 1;
        self.end(w, Ended::Conn(x));
        true
    }

    /// The next instant in `(now, until]` at which a timer of a waiting checkout fires: a
    /// deadline, or the end of a backoff a line that wants a connect waits for. tokio fires a
    /// timer at the first whole millisecond tick at or after it.
    pub fn next_timer(&self, until: Duration) -> Option<Duration> {
        let tick = |t: Duration| Duration::from_millis(t.as_nanos().div_ceil(1_000_000) as u64);
        let deadlines = self.waiters.values().map(|w| tick(w.deadline));
        let retries = self
            .lines
            .iter()
            .filter(|&(&a, l)| l.asleep && self.wants_connect(a))
            .filter_map(|(_, l)| l.retry_at.map(tick));
        deadlines
            .chain(retries)
            .filter(|&t| t > self.now && t <= until)
            .min()
    }

    /// At `now`, every checkout whose deadline passed gives up and says why (I16): still backing
    /// off with nothing to wait for, the pool at its cap with no room (`AtCapacity`), or every
    /// connection of the address checked out (`TimedOut`).
    pub fn expire(&mut self) {
        let now_ms = self.now.as_nanos() / 1_000_000;
        let due: Vec<(usize, u8)> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline.as_nanos().div_ceil(1_000_000) <= now_ms)
            .map(|(&id, w)| (id, w.addr))
            .collect();
        for (w, a) in due {
            self.leave_line(a, w);
            let e = self.ejection(a);
            let line = &self.lines[&a];
            let (live, out) = (line.live(), line.out);
            let how = if e.backing_off(self.now) && live == 0 {
                Ended::Backoff {
                    retry_after: e.until - self.now,
                    failures: e.count_at(self.s.decay, self.now),
                    cause: self.causes[&a],
                }
            } else if live < self.s.per_address && self.full() {
                self.counters.rejected += 1;
                Ended::AtCapacity
            } else {
                Ended::TimedOut(out)
            };
            self.end(w, how);
            self.looked_at(a);
        }
    }
}
