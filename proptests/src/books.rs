//! The connector of the threaded tier (`tests/threaded.rs`): a [`BooksConnector`] keeps its own
//! books of what the pool did to it, so the tier judges the pool from outside, never by the pool's
//! own counters (`used_slots()`, `stats()`), which agree with themselves while the connector has
//! more connections open than the cap allows.
//!
//! The books, and what they check at the instant they change:
//! - connections open right now: one more when `connect` returns `Ok` (or, for a connection made by
//!   hand, when the test registers it with [`accepted`](BooksConnector::accepted) after
//!   `try_insert` returned `Ok`), one fewer when [`Connector::close`] ends; checked against the cap
//!   at every increment (I1 as the connector sees it). A connection made by hand is open before
//!   the pool sees it, so one that replaces the connection of its address is open together with
//!   the one it replaces, which I2 lets it take the slot of: histories checked against the cap
//!   insert by hand only where nothing can be replaced (see `tests/threaded.rs`);
//! - closes per connection: a second close of one connection is a violation (I17: every
//!   connection closed once);
//! - connects in flight per address: at most one at any instant (I4).
//!
//! Violations are recorded (never panicked: the connector runs inside the pool, on the runtime's
//! threads) and read back by the test with [`violations`](BooksConnector::violations).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use keyed_pool::{CheetahString, Connector};

/// A number from the environment, if set (a typo panics with its name rather than being ignored).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// The seeds a threaded test runs: `THREADED_SEED` alone, `THREADED_REPEAT` times (default 100),
/// to replay one; else `1..=THREADED_ROUNDS`, or `default_rounds` scaled by `THREADED_SCALE`.
pub fn threaded_seeds(default_rounds: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("THREADED_SEED") {
        return vec![seed; env_u64("THREADED_REPEAT").unwrap_or(100) as usize];
    }
    let scaled = std::env::var("THREADED_SCALE").ok().map(|v| {
        let x: f64 = v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("THREADED_SCALE={v:?} is not a number"));
        (default_rounds as f64 * x).round() as u64
    });
    let rounds = env_u64("THREADED_ROUNDS")
        .or(scaled)
        .unwrap_or(default_rounds);
    (1..=rounds).collect()
}

/// A small deterministic generator (xorshift64): every random choice of the tier comes from one,
/// seeded from the round's seed, so a seed names the same programs on every run.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        let mut g = Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        g.next_u64();
        g
    }

    /// The next raw value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// An index drawn with the given weights.
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut x = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if x < u64::from(w) {
                return i;
            }
            x -= u64::from(w);
        }
        weights.len() - 1
    }
}

/// A connection of the books: its serial (unique within a connector), its address, and a transport
/// flag ([`Connector::is_open`]) that the connector's `close` clears and a test may clear by hand
/// ([`kill`](Self::kill): the server went away).
#[derive(Debug)]
pub struct BookConn {
    serial: u64,
    addr: CheetahString,
    transport_open: AtomicBool,
}

impl BookConn {
    /// The serial the books know it by.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The address it was made for.
    pub fn addr(&self) -> &CheetahString {
        &self.addr
    }

    /// The transport dies (the server closed it): `is_open` reports `false` from now on. The
    /// connection still counts as open at the connector until the pool closes it.
    pub fn kill(&self) {
        self.transport_open.store(false, SeqCst);
    }

    /// Whether `kill` was called, or the connector closed it.
    pub fn is_transport_open(&self) -> bool {
        self.transport_open.load(SeqCst)
    }
}

/// Who made a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `Connector::connect` returned it.
    Connected,
    /// The test made it by hand for `try_insert` / `insert`.
    ByHand,
}

/// Where a connection stands in the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Made by hand; the `try_insert` it was given to has not returned yet.
    Made,
    /// The pool has (or had) it: connected, or accepted by `try_insert`.
    Accepted,
    /// Made by hand and refused by `try_insert`: never the pool's.
    Refused,
}

/// One connection in the books.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its serial.
    pub serial: u64,
    /// Its address.
    pub addr: CheetahString,
    /// Who made it.
    pub origin: Origin,
    /// Where it stands.
    pub standing: Standing,
    /// Tick (of the shared history clock) at which it was made (connect returned, or made by hand).
    pub made_at: u64,
    /// Times it was closed (by the pool through `Connector::close`, or by its owner after
    /// `remove()` handed it back).
    pub closes: u32,
    /// Tick of its first close.
    pub closed_at: Option<u64>,
    /// Its first close ran on the thread running `pool.close()`, while it ran.
    pub closed_by_pool_close: bool,
    /// Its first close was its owner's (after `remove()`), not the pool's.
    pub closed_by_owner: bool,
    /// `kill` was called on it by the test (its transport died).
    pub killed: bool,
    /// Its first close has ended (until then it still counts as open).
    pub close_ended: bool,
}

/// What one connect does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectPlan {
    /// Yields once, then succeeds.
    Ok,
    /// Sleeps [`BooksConfig::slow`], then succeeds.
    Slow,
    /// Yields once, then fails with [`BooksError`].
    Fail,
}

/// How a [`BooksConnector`] behaves.
#[derive(Debug, Clone)]
pub struct BooksConfig {
    /// The cap open connections are held against at every increment (`None`: not checked, e.g.
    /// in histories with `remove()`, which frees its slot while the connection it hands back is
    /// still open).
    pub cap: Option<usize>,
    /// The addresses the tier uses (connects in flight are counted per address).
    pub addrs: Vec<CheetahString>,
    /// The bound on connections open per address, checked at every increment as the cap is (I19
    /// for histories that use only `checkout`, I23 for those that use only the shared mode:
    /// `max_per_address` bounds each mode on its own). `None`: not checked.
    pub per_address: Option<usize>,
    /// Weights of [`ConnectPlan::Ok`], [`ConnectPlan::Slow`], [`ConnectPlan::Fail`].
    pub plan_weights: [u32; 3],
    /// Seed of the connect plans (drawn in connect order, so which connect gets which plan is the
    /// interleaving's).
    pub plan_seed: u64,
    /// How long a slow connect sleeps.
    pub slow: Duration,
    /// How long `close` takes before the connection stops counting as open (a real close is not
    /// instant; this widens the window in which a pool that frees a slot before closing lets a new
    /// connection open while the old one still is).
    pub close_takes: Duration,
}

/// The error of a connect scripted to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BooksError;

impl std::fmt::Display for BooksError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection refused (scripted by the books connector)")
    }
}

impl std::error::Error for BooksError {}

/// One violation seen by the books.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The invariant and defect, short (groups violations of one kind across rounds).
    pub tag: String,
    /// The full message, starting with `I<n> violated:`.
    pub message: String,
}

/// Tag of an I1 violation at the connector.
pub const TAG_I1: &str = "I1: more connections open at the connector than the cap (a slot freed before its connection was closed: issue 11 #6)";
/// Tag of an I4 violation at the connector.
pub const TAG_I4: &str = "I4: two connects in flight for one address";
/// Tag of an I19 violation at the connector.
pub const TAG_I19: &str =
    "I19: more connections open to one address at the connector than max_per_address";
/// Tag of a second close.
pub const TAG_DOUBLE_CLOSE: &str = "I17: a connection closed twice";
/// Tag of a close of a connection the pool refused.
pub const TAG_CLOSED_REFUSED: &str = "I17: the pool closed a connection try_insert refused";

/// A connector that keeps books of what the pool does to it (see the module docs).
#[derive(Debug)]
pub struct BooksConnector {
    cfg: BooksConfig,
    clock: Arc<AtomicU64>,
    in_flight: Vec<AtomicUsize>,
    open: AtomicI64,
    peak: AtomicI64,
    next_serial: AtomicU64,
    connects: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
    violations: Mutex<Vec<Violation>>,
    plans: Mutex<XorShift>,
    closer: Mutex<Option<ThreadId>>,
}

/// Counts a connect in flight for its address until dropped (a connect cancelled by the pool's
/// timeout is dropped mid-way and must leave the count too).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not hide the books.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BooksConnector {
    /// A connector with empty books; `clock` is the history clock of the test (ticked here at every
    /// connect and close, so the books' instants are comparable with the history's).
    pub fn new(cfg: BooksConfig, clock: Arc<AtomicU64>) -> Self {
        Self {
            in_flight: cfg.addrs.iter().map(|_| AtomicUsize::new(0)).collect(),
            plans: Mutex::new(XorShift::new(cfg.plan_seed)),
            cfg,
            clock,
            open: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            next_serial: AtomicU64::new(1),
            connects: AtomicU64::new(0),
            entries: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            closer: Mutex::new(None),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst)
    }

    fn violation(&self, tag: &str, message: String) {
        lock(&self.violations).push(Violation {
            tag: tag.to_string(),
            message,
        });
    }

    fn make(&self, addr: &CheetahString, origin: Origin) -> BookConn {
        let serial = self.next_serial.fetch_add(1, SeqCst);
        let standing = match origin {
            Origin::Connected => Standing::Accepted,
            Origin::ByHand => Standing::Made,
        };
        lock(&self.entries).insert(
            serial,
            Entry {
                serial,
                addr: addr.clone(),
                origin,
                standing,
                made_at: self.tick(),
                closes: 0,
                closed_at: None,
                closed_by_pool_close: false,
                closed_by_owner: false,
                killed: false,
                close_ended: false,
            },
        );
        BookConn {
            serial,
            addr: addr.clone(),
            transport_open: AtomicBool::new(true),
        }
    }

    /// One more connection open; checked against the cap at this instant (I1). Called with the
    /// books locked, so that the count and the entries agree.
    fn count_open(&self, entries: &HashMap<u64, Entry>, serial: u64) {
        let now = self.open.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        if let Some(max) = self.cfg.per_address {
            let me = &entries[&serial];
            let open: BTreeSet<u64> = entries
                .values()
                .filter(|e| e.addr == me.addr && e.standing == Standing::Accepted && !e.close_ended)
                .map(|e| e.serial)
                .collect();
            if open.len() > max {
                self.violation(
                    TAG_I19,
                    format!(
                        "I19 violated: {} connections open to {} at the connector as #{serial} \
                         opened, max_per_address = {max}; open (or still closing): {open:?}",
                        open.len(),
                        me.addr
                    ),
                );
            }
        }
        let Some(cap) = self.cfg.cap else { return };
        if now <= cap as i64 {
            return;
        }
        let me = &entries[&serial];
        let open: BTreeSet<u64> = entries
            .values()
            .filter(|e| e.standing == Standing::Accepted && e.closes == 0)
            .map(|e| e.serial)
            .collect();
        let closing: BTreeSet<u64> = entries
            .values()
            .filter(|e| e.standing == Standing::Accepted && e.closes > 0 && !e.close_ended)
            .map(|e| e.serial)
            .collect();
        let how = match me.origin {
            Origin::Connected => "returned by connect",
            Origin::ByHand => "accepted by try_insert",
        };
        self.violation(
            TAG_I1,
            format!(
                "I1 violated: {now} connections open at the connector, max_connections = {cap}, as \
                 #{serial} ({how}, {}) opened; open: {open:?}, still closing: {closing:?}. The \
                 pool gave a slot back before the connection that held it was closed (issue 11 #6: \
                 every eviction releases its slot before it closes the connection)",
                me.addr
            ),
        );
    }

    /// A connection made by hand for `try_insert(addr, ..)`; register the outcome with
    /// [`accepted`](Self::accepted) or [`refused`](Self::refused) once `try_insert` returns.
    pub fn by_hand(&self, addr: &CheetahString) -> BookConn {
        self.make(addr, Origin::ByHand)
    }

    /// `try_insert` returned `Ok` for the hand-made connection `serial`: it counts as open from now
    /// (unless the pool already closed it), checked against the cap (I1).
    pub fn accepted(&self, serial: u64) {
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(&serial).expect("a serial of these books");
        assert_eq!(e.standing, Standing::Made, "accepted twice (a test bug)");
        e.standing = Standing::Accepted;
        if e.closes == 0 {
            self.count_open(&entries, serial);
        }
    }

    /// `try_insert` refused the hand-made connection `serial`: it never was the pool's.
    pub fn refused(&self, serial: u64) {
        let closes = {
            let mut entries = lock(&self.entries);
            let e = entries.get_mut(&serial).expect("a serial of these books");
            assert_eq!(e.standing, Standing::Made, "refused twice (a test bug)");
            e.standing = Standing::Refused;
            e.closes
        };
        if closes > 0 {
            self.violation(
                TAG_CLOSED_REFUSED,
                format!("I17 violated: the pool closed #{serial}, which try_insert refused"),
            );
        }
    }

    /// The test kills the transport of `conn` (the server went away).
    pub fn kill(&self, conn: &BookConn) {
        conn.kill();
        if let Some(e) = lock(&self.entries).get_mut(&conn.serial) {
            e.killed = true;
        }
    }

    /// The owner of a connection handed back by `remove()` closes it (it is the caller's now).
    pub fn close_as_owner(&self, conn: &BookConn) {
        self.record_close(conn, true);
    }

    /// Marks the current thread as the one running `pool.close()` (`true`) or not any more.
    pub fn closing_on_this_thread(&self, closing: bool) {
        *lock(&self.closer) = closing.then(|| std::thread::current().id());
    }

    fn record_close(&self, conn: &BookConn, by_owner: bool) {
        let at = self.tick();
        conn.transport_open.store(false, SeqCst);
        let by_pool_close = !by_owner && *lock(&self.closer) == Some(std::thread::current().id());
        let (closes, counted, standing) = {
            let mut entries = lock(&self.entries);
            let e = entries
                .get_mut(&conn.serial)
                .expect("a connection of these books");
            e.closes += 1;
            if e.closes == 1 {
                e.closed_at = Some(at);
                e.closed_by_pool_close = by_pool_close;
                e.closed_by_owner = by_owner;
            }
            (e.closes, e.standing == Standing::Accepted, e.standing)
        };
        if closes > 1 {
            self.violation(
                TAG_DOUBLE_CLOSE,
                format!(
                    "I17 violated: #{} ({}) closed {closes} times{}",
                    conn.serial,
                    conn.addr,
                    if by_owner {
                        " (the last by the caller that remove() handed it to: the pool closed a connection it had handed back)"
                    } else {
                        ""
                    }
                ),
            );
            return;
        }
        if standing == Standing::Refused && !by_owner {
            self.violation(
                TAG_CLOSED_REFUSED,
                format!(
                    "I17 violated: the pool closed #{}, which try_insert refused",
                    conn.serial
                ),
            );
        }
        // A close takes a moment; the connection is open until it ends.
        if !self.cfg.close_takes.is_zero() {
            let start = std::time::Instant::now();
            while start.elapsed() < self.cfg.close_takes {
                std::thread::yield_now();
            }
        }
        let mut entries = lock(&self.entries);
        if counted {
            self.open.fetch_sub(1, SeqCst);
        }
        if let Some(e) = entries.get_mut(&conn.serial) {
            e.close_ended = true;
        }
    }

    /// Violations recorded so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).clone()
    }

    /// Records a violation found by the test (so that all of a round's violations are in one list).
    pub fn report(&self, tag: &str, message: String) {
        self.violation(tag, message);
    }

    /// Connections open at the connector now.
    pub fn open(&self) -> i64 {
        self.open.load(SeqCst)
    }

    /// The most connections ever open at once.
    pub fn peak(&self) -> i64 {
        self.peak.load(SeqCst)
    }

    /// Connects in flight now, all addresses together.
    pub fn connects_in_flight(&self) -> usize {
        self.in_flight.iter().map(|n| n.load(SeqCst)).sum()
    }

    /// Connects started so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(SeqCst)
    }

    /// A copy of the books.
    pub fn entries(&self) -> Vec<Entry> {
        let mut all: Vec<Entry> = lock(&self.entries).values().cloned().collect();
        all.sort_by_key(|e| e.serial);
        all
    }

    fn next_plan(&self) -> ConnectPlan {
        match lock(&self.plans).weighted(&self.cfg.plan_weights) {
            0 => ConnectPlan::Ok,
            1 => ConnectPlan::Slow,
            _ => ConnectPlan::Fail,
        }
    }
}

impl Connector for BooksConnector {
    type Conn = BookConn;
    type Error = BooksError;

    async fn connect(&self, addr: &str) -> Result<BookConn, BooksError> {
        self.connects.fetch_add(1, SeqCst);
        let i = self
            .cfg
            .addrs
            .iter()
            .position(|a| a == addr)
            .expect("an address of the books");
        let now = self.in_flight[i].fetch_add(1, SeqCst) + 1;
        let _in_flight = InFlight(&self.in_flight[i]);
        if now > 1 {
            self.violation(
                TAG_I4,
                format!("I4 violated: {now} connects in flight for {addr} at once"),
            );
        }
        match self.next_plan() {
            ConnectPlan::Ok => tokio::task::yield_now().await,
            ConnectPlan::Slow => tokio::time::sleep(self.cfg.slow).await,
            ConnectPlan::Fail => {
                tokio::task::yield_now().await;
                return Err(BooksError);
            }
        }
        let conn = self.make(&addr.into(), Origin::Connected);
        self.count_open(&lock(&self.entries), conn.serial);
        Ok(conn)
    }

    fn is_open(&self, conn: &BookConn) -> bool {
        conn.is_transport_open()
    }

    fn close(&self, conn: &BookConn) {
        self.record_close(conn, false);
    }
}
