//! The books kept outside the pool: what the client's connector saw (every connect, every
//! connection made, every close the pool asked for) and, through the brokers' own books, when each
//! connection was accepted. The invariant checks judge the pool from these, not from its own
//! counters: I1 (open + connecting at the connector), I3 (a refusal for capacity while fewer slots
//! can be in use), I4, I5, I6, I9, I12 (gaps after every ejection the books can prove, measured at
//! the connector and between the brokers' accepts), I17 (closed exactly once, nothing open after
//! `close()`), I18 (the pool's per-address state bounded by what the books say may still be
//! tracked).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::core::BackoffPolicy;
use tokio::time::Instant;

use crate::broker::BrokerState;
use crate::record::Recorder;
use crate::trace;

/// A connection that dies (is evicted as closed or unhealthy) within this long of being made counts
/// as an ejection of its address: the pool's `ejection.short_lived`. The scenarios keep the
/// default, so the books read it from there.
pub fn short_lived() -> Duration {
    keyed_pool::core::EjectionPolicy::default().short_lived
}

/// An address's ejection count decays one step per this long without failure and without backing
/// off: the pool's `ejection.decay_interval`, the default as for [`short_lived`].
pub fn decay_interval() -> Duration {
    keyed_pool::core::EjectionPolicy::default().decay_interval
}

/// What the client knows of one connection, shared by the connection and the connector's books.
#[derive(Debug)]
pub struct ConnBook {
    /// Client-side serial number (unique within a simulation).
    pub serial: u64,
    /// The address it was connected to.
    pub addr: String,
    /// When the connector handed it out (the pool makes its connection in the same poll).
    pub made_at: Instant,
    /// Its local socket address (the broker sees it as the peer).
    pub local: Option<SocketAddr>,
    /// The pool owns it: made by the pool's connect, or accepted by `insert`.
    pub pooled: AtomicBool,
    /// The transport works as far as the client knows (false after EOF/reset or the pool's close).
    pub open: AtomicBool,
    /// The pool (or the scenario, for a connection it removed) called `Connector::close` on it.
    pub closed_by_pool: AtomicBool,
    /// Calls in flight as the client counts them.
    pub in_flight: AtomicU64,
    /// Last use as the client sees it, in virtual nanoseconds since the start.
    pub last_use_ns: AtomicU64,
    /// When a call's verdict said "unhealthy", in virtual nanoseconds since the start (0 = never).
    /// A liveness probe the broker did not answer condemns it too (the pool's rule: decisive).
    pub condemned_ns: AtomicU64,
    /// Liveness probes the broker answered (the pool records each as a successful call).
    pub probes_ok: AtomicU64,
    /// Calls started on it (any of them may have succeeded, as far as the books know).
    pub calls_started: AtomicU64,
    /// Liveness probes that failed or timed out (the pool records each as a failed call).
    pub probes_failed: AtomicU64,
}

impl ConnBook {
    /// `true` if the connection may have served a call: the pool does not count a connection
    /// that dies young as an ejection once it has (a graceful close, I12), so the books prove a
    /// short-lived death only for one that certainly never did.
    pub fn may_have_served(&self) -> bool {
        self.calls_started.load(Ordering::SeqCst) > 0 || self.probes_ok.load(Ordering::SeqCst) > 0
    }

    /// `true` once a call's verdict said unhealthy.
    pub fn condemned(&self) -> bool {
        self.condemned_ns.load(Ordering::SeqCst) != 0
    }
}

/// One ejection the books can prove, and the count they prove after it.
#[derive(Clone, Copy, Debug)]
struct Ejection {
    at: Instant,
    /// The lower bound on the pool's ejection count right after this ejection.
    k: u32,
    /// The connection whose eviction it was (`None`: a failed connect).
    serial: Option<u64>,
}

/// What the books know of one address.
#[derive(Default, Debug)]
struct AddrLog {
    /// Connects in progress at the connector.
    in_progress: u32,
    /// Connect attempts so far.
    attempts: u64,
    /// Connections to it open at the connector (made, not yet closed by the pool).
    open: u32,
    /// `get_or_connect` calls of the scenario in progress for it.
    calls: u32,
    /// The last successful connect.
    last_ok: Option<Instant>,
    /// The last connect that ended, either way.
    last_end: Option<Instant>,
    /// Lower bound on the pool's ejection count (I12): ejections proven from outside, decayed as
    /// fast as the schedule could possibly decay them, reset by `mark_up`.
    last: Option<Ejection>,
    /// Upper bound on the pool's ejection count since the last `mark_up`: every failed connect,
    /// and for every connection the pool let go of by itself one if its transport had died and one
    /// if a verdict had condemned it (an unhealthy eviction may also be a short-lived death). Not
    /// decayed.
    k_upper: u32,
    /// The last instant the pool may still keep state for this address (I18), if it is not live.
    tracked_until: Option<Instant>,
}

impl AddrLog {
    fn live(&self) -> bool {
        self.in_progress > 0 || self.open > 0 || self.calls > 0
    }

    /// The proven lower bound on the ejection count at `now`.
    fn k_lower(&self, now: Instant) -> u32 {
        self.last.map_or(0, |e| decayed(e.k, e.at, now))
    }
}

/// `k` less the most decay steps the schedule allows between `since` and `now`.
fn decayed(k: u32, since: Instant, now: Instant) -> u32 {
    let steps = now.saturating_duration_since(since).as_nanos() / decay_interval().as_nanos();
    k.saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
}

/// A broker-side I12 check waiting for the broker to accept the connect it is about.
#[derive(Debug)]
struct GapCheck {
    id: u64,
    broker: Arc<BrokerState>,
    /// The last accept at that broker no later than the ejection.
    prev_accept: Instant,
    ejected_at: Instant,
    k: u32,
    min: Duration,
    started: Instant,
    local: Option<SocketAddr>,
}

/// The I18 bound: how many addresses the pool may keep state for, from the books alone.
#[derive(Default, Debug)]
struct TrackBound {
    /// Addresses with a connection open, a connect in progress or a caller waiting.
    live: u64,
    /// Multiset of the `tracked_until` of addresses that are not live.
    until: BTreeMap<Instant, u64>,
    /// Size of `until`.
    pending: u64,
}

impl TrackBound {
    fn prune(&mut self, now: Instant) {
        while let Some((&at, &n)) = self.until.first_key_value() {
            if at > now {
                break;
            }
            self.until.remove(&at);
            self.pending -= n;
        }
    }

    fn add(&mut self, at: Instant) {
        *self.until.entry(at).or_default() += 1;
        self.pending += 1;
    }

    fn remove(&mut self, at: Instant) {
        if let Some(n) = self.until.get_mut(&at) {
            *n -= 1;
            self.pending -= 1;
            if *n == 0 {
                self.until.remove(&at);
            }
        }
    }
}

/// The connector's books, shared with the scenario.
pub struct Registry {
    /// Where violations and trace events go.
    pub rec: Arc<Recorder>,
    /// The pool's backoff policy (for I12).
    pub backoff: BackoffPolicy,
    /// The pool's `max_idle` (for I5, I6); `None` = no idle eviction.
    pub max_idle: Option<Duration>,
    /// The pool's cap (I1); 0 = unlimited.
    pub max_connections: usize,
    /// The pool may evict least-recently-used connections to make room (they may be fresh, and
    /// such an eviction is not an ejection).
    pub lru: bool,
    /// While set, the pool may close healthy connections (close, drop, clear, manual removal), and
    /// what it closes is no ejection.
    pub manual: AtomicBool,
    /// The pool's bound on a liveness probe: a probe the pool drops at it timed out (a failure it
    /// records); one dropped sooner was cancelled (nothing recorded).
    pub probe_timeout: Duration,
    /// The connector pings the broker before handing a connection out (default). Without it a
    /// connect is the TCP connect alone, as the library's TCP connector does.
    pub handshake: AtomicBool,
    /// The cleanup task's interval while it runs (I6, I9, I18 apply only then), in ns (0 = none).
    sweep_ns: AtomicU64,
    /// I19 (a scenario that uses only `checkout`) or I23 (only the shared mode): connections open
    /// plus connects in progress per address never exceed this (0 = not checked: `max_per_address`
    /// bounds each mode on its own, so a scenario mixing them cannot judge it from the connector).
    per_address: AtomicU64,
    brokers: BTreeMap<String, Arc<BrokerState>>,
    next_serial: AtomicU64,
    /// Connections that exist on the client side (not yet dropped).
    live: AtomicI64,
    connects: AtomicU64,
    connecting: AtomicI64,
    /// Connections made and not yet closed by the pool: what is open at the connector.
    open: StdMutex<BTreeMap<u64, Arc<ConnBook>>>,
    addrs: StdMutex<BTreeMap<String, AddrLog>>,
    tracked: StdMutex<TrackBound>,
    gaps: StdMutex<VecDeque<GapCheck>>,
    next_gap: AtomicU64,
}

impl Registry {
    /// Books for a pool with this configuration; `brokers` are the servers whose accept logs the
    /// broker-side I12 check reads.
    pub fn new(
        rec: Arc<Recorder>,
        config: &keyed_pool::PoolConfig,
        brokers: BTreeMap<String, Arc<BrokerState>>,
    ) -> Self {
        Self {
            rec,
            backoff: config.backoff,
            max_idle: config.max_idle,
            max_connections: config.max_connections,
            lru: config.when_full == keyed_pool::WhenFull::EvictLeastRecentlyUsed,
            manual: AtomicBool::new(false),
            probe_timeout: config.probe_timeout.unwrap_or(config.connect_timeout),
            handshake: AtomicBool::new(true),
            sweep_ns: AtomicU64::new(0),
            per_address: AtomicU64::new(0),
            brokers,
            next_serial: AtomicU64::new(1),
            live: AtomicI64::new(0),
            connects: AtomicU64::new(0),
            connecting: AtomicI64::new(0),
            open: StdMutex::new(BTreeMap::new()),
            addrs: StdMutex::new(BTreeMap::new()),
            tracked: StdMutex::new(TrackBound::default()),
            gaps: StdMutex::new(VecDeque::new()),
            next_gap: AtomicU64::new(1),
        }
    }

    /// The cleanup task runs every `interval` from now on (`None`: it stopped).
    pub fn set_sweeping(&self, interval: Option<Duration>) {
        let ns = interval.map_or(0, |i| {
            u64::try_from(i.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        self.sweep_ns.store(ns, Ordering::SeqCst);
    }

    /// The cleanup task's interval while it runs.
    pub fn sweeping(&self) -> Option<Duration> {
        match self.sweep_ns.load(Ordering::SeqCst) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// From now on every address is held to `max` connections open plus connects in progress at
    /// the connector (I19), checked where that count grows (a connect starts) and at every sample.
    pub fn set_per_address(&self, max: usize) {
        self.per_address.store(max as u64, Ordering::SeqCst);
    }

    /// Connects to `addr` in progress at the connector.
    pub fn connecting_to(&self, addr: &str) -> u32 {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .map_or(0, |l| l.in_progress)
    }

    /// When the last connect to `addr` ended (succeeded or failed), if one did.
    pub fn last_connect_end(&self, addr: &str) -> Option<Instant> {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .and_then(|l| l.last_end)
    }

    /// I19 at the connector, for every address (see [`set_per_address`](Self::set_per_address)).
    pub fn check_per_address(&self, what: &str) {
        let max = self.per_address.load(Ordering::SeqCst);
        if max == 0 {
            return;
        }
        let addrs = self.addrs.lock().expect("books lock");
        for (addr, log) in addrs.iter() {
            let n = u64::from(log.open) + u64::from(log.in_progress);
            if n > max {
                self.rec.fail(
                    "I19",
                    format!(
                        "{what}: {} connection(s) open and {} connect(s) in progress to {addr} at \
                         the connector; max_per_address {max}",
                        log.open, log.in_progress
                    ),
                );
            }
        }
    }

    /// How long after the pool may drop an address's state the cleanup task has surely done so:
    /// two intervals (the phase of the task, and a sweep that yields), plus timer rounding.
    fn grace(&self) -> Duration {
        self.sweeping().unwrap_or(Duration::from_secs(1)) * 2 + Duration::from_millis(5)
    }

    /// Connections that exist on the client side (not yet dropped).
    pub fn live(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections open at the connector: made and not yet closed by the pool.
    pub fn open(&self) -> usize {
        self.open.lock().expect("books lock").len()
    }

    /// Connections open at the connector to `addr`.
    pub fn open_to(&self, addr: &str) -> u32 {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .map_or(0, |l| l.open)
    }

    /// Connects in progress at the connector.
    pub fn connecting(&self) -> i64 {
        self.connecting.load(Ordering::SeqCst)
    }

    /// The books of every connection open at the connector.
    pub fn open_books(&self) -> Vec<Arc<ConnBook>> {
        self.open
            .lock()
            .expect("books lock")
            .values()
            .cloned()
            .collect()
    }

    /// Connect attempts so far (all addresses).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }

    /// Connect attempts to `addr` so far.
    pub fn connects_to(&self, addr: &str) -> u64 {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .map_or(0, |l| l.attempts)
    }

    /// The proven lower bound on `addr`'s ejection count now (I12).
    pub fn k_lower(&self, addr: &str) -> u32 {
        let now = Instant::now();
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .map_or(0, |l| l.k_lower(now))
    }

    /// An upper bound on `addr`'s ejection count (for the liveness bound, I15).
    pub fn k_upper(&self, addr: &str) -> u32 {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .map_or(0, |l| l.k_upper)
    }

    /// Runs `f` on `addr`'s log and keeps the I18 bound in step with it.
    fn with_addr<R>(&self, addr: &str, f: impl FnOnce(&mut AddrLog, Instant) -> R) -> R {
        let now = Instant::now();
        let mut addrs = self.addrs.lock().expect("books lock");
        let log = addrs.entry(addr.to_string()).or_default();
        let mut tracked = self.tracked.lock().expect("books lock");
        tracked.prune(now);
        let was_live = log.live();
        let old_until = log.tracked_until.filter(|&u| u > now);
        let out = f(log, now);
        let is_live = log.live();
        let new_until = log.tracked_until.filter(|&u| u > now);
        if !was_live && let Some(u) = old_until {
            tracked.remove(u);
        }
        if !is_live && let Some(u) = new_until {
            tracked.add(u);
        }
        match (was_live, is_live) {
            (false, true) => tracked.live += 1,
            (true, false) => tracked.live -= 1,
            _ => {}
        }
        out
    }

    /// Records an ejection the books prove, and how long the address may stay tracked after it.
    fn eject(log: &mut AddrLog, now: Instant, serial: Option<u64>) {
        let k = log.k_lower(now).saturating_add(1);
        log.last = Some(Ejection { at: now, k, serial });
    }

    /// Counts one failure the pool may have counted, for the upper bounds (I15, I18).
    fn may_eject(&self, log: &mut AddrLog, now: Instant, weight: u32) {
        log.k_upper = log.k_upper.saturating_add(weight);
        // Backing off for at most delay(k, full jitter), then k decay intervals.
        let k = log.k_upper;
        let until =
            now + self.backoff.delay(k, 1.0) + decay_interval().saturating_mul(k) + self.grace();
        log.tracked_until = Some(log.tracked_until.map_or(until, |u| u.max(until)));
    }

    /// The address lost its last connection or connect: the pool may keep its state a little
    /// longer (until its next sweep).
    fn settle(&self, log: &mut AddrLog, now: Instant) {
        let until = now + self.grace();
        log.tracked_until = Some(log.tracked_until.map_or(until, |u| u.max(until)));
    }

    /// The scenario called `mark_up(addr)`: the pool forgets the address's ejections.
    pub fn marked_up(&self, addr: &str) {
        self.with_addr(addr, |log, _| {
            log.last = None;
            log.k_upper = 0;
        });
        trace!(self.rec, "mark-up {addr}");
    }

    /// A `get_or_connect` of the scenario starts (I3, I18 count the address as live meanwhile).
    pub fn call_begin(&self, addr: &str) {
        self.with_addr(addr, |log, _| log.calls += 1);
    }

    /// The `get_or_connect` ended.
    pub fn call_end(&self, addr: &str) {
        self.with_addr(addr, |log, now| {
            log.calls = log.calls.saturating_sub(1);
            if !log.live() {
                self.settle(log, now);
            }
        });
    }

    /// I1 as the connector sees it: connections open plus connects in progress never exceed the
    /// cap. Called wherever the count grows, so it holds at every instant, and at every sample.
    pub fn check_cap(&self, what: &str) {
        let max = self.max_connections;
        if max == 0 {
            return;
        }
        let open = self.open();
        let connecting = usize::try_from(self.connecting()).unwrap_or(0);
        if open + connecting > max {
            self.rec.fail(
                "I1",
                format!(
                    "{what}: {open} connections open and {connecting} connects in progress at the \
                     connector; max {max}"
                ),
            );
        }
    }

    /// I3 from outside: the pool refused `addr` for capacity, so every slot must be in use by
    /// something the books see: a connection open, a connect in progress, or a caller of another
    /// address waiting for a connect that has not reached the connector yet.
    pub fn check_refusal(&self, addr: &str) {
        let max = self.max_connections;
        let open = self.open();
        let connecting = usize::try_from(self.connecting()).unwrap_or(0);
        let waiting = self
            .addrs
            .lock()
            .expect("books lock")
            .iter()
            .filter(|(a, l)| *a != addr && l.calls > 0 && l.open == 0 && l.in_progress == 0)
            .count();
        if max == 0 || open + connecting + waiting < max {
            self.rec.fail(
                "I3",
                format!(
                    "get_or_connect({addr}) refused at capacity (max {max}) while the connector \
                     sees {open} open, {connecting} connecting and {waiting} other caller(s) \
                     waiting: a slot is held by nothing"
                ),
            );
        }
    }

    /// A connect starts: I4 (one per address), I1, and I12 (no connect before the backoff of the
    /// last proven ejection has passed, with the lowest jitter draw).
    pub fn begin_connect(self: &Arc<Self>, addr: &str) -> ConnectAttempt {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.connecting.fetch_add(1, Ordering::SeqCst);
        let (attempt_no, gap) = self.with_addr(addr, |log, now| {
            log.attempts += 1;
            if log.in_progress > 0 {
                self.rec.fail(
                    "I4",
                    format!(
                        "a second connect to {addr} started while {} was in flight",
                        log.in_progress
                    ),
                );
            }
            log.in_progress += 1;
            let mut gap = None;
            if let Some(e) = log.last {
                let lower = self.backoff.delay(e.k, 0.0);
                let waited = now.saturating_duration_since(e.at);
                if waited + Duration::from_micros(1) < lower {
                    self.rec.fail(
                        "I12",
                        format!(
                            "connect to {addr} only {waited:?} after its ejection #{} ({}); the \
                             backoff schedule requires at least {lower:?}",
                            e.k,
                            e.serial.map_or("a failed connect".to_string(), |s| format!(
                                "connection s{s} evicted"
                            ))
                        ),
                    );
                }
                // Measured at the broker too: the connection evicted was accepted before its
                // eviction, the new one is accepted after this connect starts.
                if e.serial.is_some()
                    && let Some(broker) = self.brokers.get(addr)
                    && let Some(prev_accept) = broker.last_accept_by(e.at)
                {
                    let id = self.next_gap.fetch_add(1, Ordering::SeqCst);
                    self.gaps.lock().expect("books lock").push_back(GapCheck {
                        id,
                        broker: Arc::clone(broker),
                        prev_accept,
                        ejected_at: e.at,
                        k: e.k,
                        min: lower,
                        started: now,
                        local: None,
                    });
                    gap = Some(id);
                }
            }
            (log.attempts, gap)
        });
        self.check_cap(&format!("connect to {addr}"));
        self.check_per_address(&format!("connect to {addr}"));
        trace!(self.rec, "connect {addr} #{attempt_no}");
        ConnectAttempt {
            reg: Arc::clone(self),
            addr: addr.to_string(),
            gap,
            done: false,
        }
    }

    fn end_connect(&self, addr: &str, ok: bool) {
        self.connecting.fetch_sub(1, Ordering::SeqCst);
        self.with_addr(addr, |log, now| {
            log.in_progress = log.in_progress.saturating_sub(1);
            log.last_end = Some(now);
            if ok {
                log.last_ok = Some(now);
            } else {
                Self::eject(log, now, None);
                self.may_eject(log, now, 1);
            }
            if !log.live() {
                self.settle(log, now);
            }
        });
        trace!(self.rec, "connect {addr} ok={ok}");
    }

    /// A new connection: in the books, open at the connector.
    pub fn made(&self, addr: &str, local: Option<SocketAddr>, by_hand: bool) -> Arc<ConnBook> {
        let serial = self.next_serial.fetch_add(1, Ordering::SeqCst);
        let book = Arc::new(ConnBook {
            serial,
            addr: addr.to_string(),
            made_at: Instant::now(),
            local,
            pooled: AtomicBool::new(!by_hand),
            open: AtomicBool::new(true),
            closed_by_pool: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            last_use_ns: AtomicU64::new(self.rec.now_ns()),
            condemned_ns: AtomicU64::new(0),
            probes_ok: AtomicU64::new(0),
            probes_failed: AtomicU64::new(0),
            calls_started: AtomicU64::new(0),
        });
        self.live.fetch_add(1, Ordering::SeqCst);
        self.open
            .lock()
            .expect("books lock")
            .insert(serial, Arc::clone(&book));
        self.with_addr(addr, |log, _| log.open += 1);
        trace!(self.rec, "conn s{serial} {addr}");
        book
    }

    /// The connection's last handle is gone. One the pool owned and never closed is a leak (I17).
    pub fn dropped(&self, book: &ConnBook) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        if book.closed_by_pool.swap(true, Ordering::SeqCst) {
            return;
        }
        if book.pooled.load(Ordering::SeqCst) {
            self.rec.fail(
                "I17",
                format!(
                    "connection s{} to {} was dropped without the pool ever closing it",
                    book.serial, book.addr
                ),
            );
        }
        self.forget(book, false);
    }

    /// Takes `book` off the open list; `by_pool`: the pool closed it (else it was dropped).
    fn forget(&self, book: &ConnBook, by_pool: bool) {
        self.open.lock().expect("books lock").remove(&book.serial);
        let manual = self.manual.load(Ordering::SeqCst);
        self.with_addr(&book.addr, |log, now| {
            log.open = log.open.saturating_sub(1);
            if by_pool && !manual {
                self.judge_close(book, log, now);
            }
            if !log.live() {
                self.settle(log, now);
            }
        });
    }

    /// The pool let go of `book` by itself (no manual removal): an ejection if the books can prove
    /// it was one. It was used within `max_idle` (so not evicted as idle, I5) and not replaced by a
    /// connect landing at this instant, and either its transport had died and it was made less
    /// than `short_lived` ago (evicted as closed), or a call's verdict had condemned it while its
    /// transport still worked (evicted as unhealthy). LRU evictions are no ejections, so under LRU
    /// only failed connects are proven.
    fn judge_close(&self, book: &ConnBook, log: &mut AddrLog, now: Instant) {
        let transport_open = book.open.load(Ordering::SeqCst);
        // At most: one for a dead transport (a short-lived death), one for a verdict that said
        // unhealthy (an unhealthy eviction). A healthy connection closed by the pool was idle or
        // made room: no ejection.
        let weight = u32::from(!transport_open) + u32::from(book.condemned());
        if weight > 0 {
            self.may_eject(log, now, weight);
        }
        if self.lru {
            return;
        }
        let since_use = Duration::from_nanos(
            self.rec
                .now_ns()
                .saturating_sub(book.last_use_ns.load(Ordering::SeqCst)),
        );
        // Used within max_idle, so not an idle eviction (I5); not replaced by a connect landing
        // at this instant.
        let not_idle = self.max_idle.is_none_or(|max| since_use <= max) && log.last_ok != Some(now);
        let short_lived = not_idle
            && !transport_open
            && !book.may_have_served()
            && now.duration_since(book.made_at) < short_lived();
        let unhealthy = not_idle && transport_open && book.condemned();
        if short_lived || unhealthy {
            Self::eject(log, now, Some(book.serial));
            trace!(
                self.rec,
                "ejection {} s{} k>={} ({})",
                book.addr,
                book.serial,
                log.last.map_or(0, |e| e.k),
                if short_lived {
                    "short-lived"
                } else {
                    "unhealthy"
                }
            );
        }
    }

    /// `Connector::close` was called on `book`: exactly once, and it leaves the open list.
    /// Returns `false` if it had been closed before.
    pub fn closed(&self, book: &ConnBook) -> bool {
        if book.closed_by_pool.swap(true, Ordering::SeqCst) {
            self.rec.fail(
                "ACC",
                format!("the pool closed connection s{} twice", book.serial),
            );
            return false;
        }
        self.forget(book, true);
        true
    }

    /// `true` if a connect to `addr` completed at this very instant.
    pub fn connected_now(&self, addr: &str) -> bool {
        self.addrs
            .lock()
            .expect("books lock")
            .get(addr)
            .and_then(|l| l.last_ok)
            == Some(Instant::now())
    }

    /// The I18 bound now: addresses that are live plus those that may still be backing off or
    /// have an ejection count not yet decayed to 0 (upper bounds throughout). `None` while no
    /// cleanup task runs (the bound assumes one).
    pub fn tracked_bound(&self) -> Option<(u64, u64)> {
        self.sweeping()?;
        let mut t = self.tracked.lock().expect("books lock");
        t.prune(Instant::now());
        Some((t.live, t.pending))
    }

    /// A few of the addresses the books say may still be tracked, and until when (for messages).
    pub fn pending_sample(&self) -> String {
        let now = Instant::now();
        let addrs = self.addrs.lock().expect("books lock");
        addrs
            .iter()
            .filter(|(_, l)| !l.live() && l.tracked_until.is_some_and(|u| u > now))
            .take(3)
            .map(|(a, l)| {
                format!(
                    "{a} until t={:.3}ms (k<={})",
                    self.rec.ms_of(l.tracked_until.unwrap_or(now)),
                    l.k_upper
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Runs the broker-side I12 checks whose connect the broker has accepted by now; `last`: drop
    /// the ones never accepted (their connect failed before reaching the broker).
    pub fn settle_gaps(&self, last: bool) {
        let mut gaps = self.gaps.lock().expect("books lock");
        gaps.retain(|g| {
            let Some(local) = g.local else {
                return !last;
            };
            let Some(accepted) = g.broker.accepted_from(local, g.started) else {
                return !last;
            };
            let gap = accepted.saturating_duration_since(g.prev_accept);
            if gap + Duration::from_micros(1) < g.min {
                self.rec.fail(
                    "I12",
                    format!(
                        "{} accepted a connection {gap:?} after the previous one (ejection #{} \
                         at t={:.3}ms in between); the backoff schedule requires at least {:?}",
                        g.broker.addr,
                        g.k,
                        self.rec.ms_of(g.ejected_at),
                        g.min
                    ),
                );
            }
            false
        });
    }

    fn gap_local(&self, id: u64, local: SocketAddr) {
        let mut gaps = self.gaps.lock().expect("books lock");
        if let Some(g) = gaps.iter_mut().find(|g| g.id == id) {
            g.local = Some(local);
        }
    }

    /// The connect of a pending gap check ended; one that never reached the broker has nothing to
    /// measure.
    fn gap_done(&self, id: u64) {
        self.gaps
            .lock()
            .expect("books lock")
            .retain(|g| g.id != id || g.local.is_some());
    }
}

/// One connect in progress; dropped unfinished = timed out or cancelled (a failure).
pub struct ConnectAttempt {
    reg: Arc<Registry>,
    addr: String,
    gap: Option<u64>,
    done: bool,
}

impl ConnectAttempt {
    /// The TCP connect is through: the broker will see it as a peer at `local`.
    pub fn socket(&self, local: SocketAddr) {
        if let Some(id) = self.gap {
            self.reg.gap_local(id, local);
        }
    }

    /// The connect ended.
    pub fn finish(mut self, ok: bool) {
        self.done = true;
        self.end(ok);
    }

    fn end(&self, ok: bool) {
        if let Some(id) = self.gap {
            self.reg.gap_done(id);
        }
        self.reg.end_connect(&self.addr, ok);
    }
}

impl Drop for ConnectAttempt {
    fn drop(&mut self) {
        if !self.done {
            self.end(false);
        }
    }
}
