//! The threaded tier: random operations from several OS threads (2–4, `std::thread::scope`) on a
//! pool driven by a multi-thread tokio runtime (async operations through `Handle::block_on` from
//! each thread; connects run in the pool's own tasks on the runtime's workers), judged from
//! outside the pool:
//! - by a connector that keeps its own books ([`BooksConnector`]: connections open, closes per
//!   connection, connects in flight per address), checked at the instant they change;
//! - by the history of each round (every operation's invocation and response on one logical clock,
//!   with its result): what was handed out after `close()` returned, and, for the operations that do
//!   not depend on time, whether some serial order consistent with real time explains every result
//!   (linearizability, `keyed_pool_proptests::linearize`).
//!
//! Seeds are fixed (`1..=THREADED_ROUNDS`); each round's configuration and per-thread programs come
//! from its seed; the interleaving is the OS's. A failure prints its seed, the command that replays
//! the seed (its programs, `THREADED_REPEAT` times), how many rounds failed, how long the first took
//! to appear, and the shortest violating history found.
//!
//! Environment: `THREADED_ROUNDS` (rounds of every test), `THREADED_SCALE` (a factor on each
//! test's default rounds, for a longer search), `THREADED_SEED` (run that seed only),
//! `THREADED_REPEAT` (times a replayed seed runs, default 100).
//!
//! The tests: `i1_open_at_the_connector_never_exceeds_the_cap`,
//! `i2_insert_racing_remove_of_its_address_never_fails_for_capacity`,
//! `i4_one_connect_in_flight_per_address_and_its_waiters_get_its_result`,
//! `i17_nothing_open_or_handed_out_after_close`, `linearizable_insert_get_remove_close`,
//! `i1_i19_i20_i22_checkout_from_threads_under_the_cap` (exclusive checkout, issue 13).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use keyed_pool::{CheetahString, ConnectionPool, PoolError, PooledConnection, WhenFull};
use keyed_pool_proptests::books::{
    BookConn, BooksConfig, BooksConnector, BooksError, Entry, Origin, Standing, XorShift, env_u64,
    threaded_seeds,
};
use keyed_pool_proptests::linearize::{self, Event, Op, Res, Spec};
use tokio::runtime::{Handle, Runtime};

type Pool = ConnectionPool<BookConn, BooksConnector>;

/// How long a round may take to settle (connect tasks ending) after its threads returned.
const SETTLE: Duration = Duration::from_secs(10);

/// Text of a `get_or_connect` error that carries the connector's own error.
const CONNECT_REFUSED: &str = "Connect(refused by the connector)";

fn addr(i: u8) -> CheetahString {
    format!("10.0.0.{i}:7000").into()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("multi-thread runtime")
}

// ---------------------------------------------------------------------------------------------
// Rounds: a configuration and one program per thread, all drawn from the seed.

/// One step of a thread's program.
#[derive(Debug, Clone, Copy)]
enum Step {
    TryInsert(u8),
    /// `try_insert` if `peek` finds the address empty (into an address only this thread inserts
    /// into, so that it replaces nothing); nothing otherwise.
    InsertIfEmpty(u8),
    Insert(u8),
    Get(u8),
    Remove(u8),
    /// `remove_connection` of a held handle (picked modulo the handles held).
    RemoveConnection(u8),
    /// Kill the transport of a held handle (picked modulo the handles held).
    Kill(u8),
    GetOrConnect(u8),
    Call(u8, bool),
    EvictIdle,
    EvictUnhealthy,
    Close,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    TryInsert,
    Insert,
    Get,
    Remove,
    RemoveConnection,
    Kill,
    GetOrConnect,
    Call,
    EvictIdle,
    EvictUnhealthy,
}

/// A round: the pool's configuration, the books', and the programs.
#[derive(Debug, Clone)]
struct Round {
    spec: Spec,
    max_idle: Duration,
    consecutive_failures: u32,
    books: BooksConfig,
    programs: Vec<Vec<Step>>,
}

impl Round {
    fn describe(&self) -> String {
        format!(
            "max_connections = {}, {}, max_idle = {:?}, consecutive_failures = {}, {} addresses, \
             {} threads × {:?} steps, connect plans (ok, slow, fail) = {:?}",
            self.spec.cap,
            if self.spec.lru {
                "EvictLeastRecentlyUsed"
            } else {
                "Reject"
            },
            self.max_idle,
            self.consecutive_failures,
            self.books.addrs.len(),
            self.programs.len(),
            self.programs.iter().map(Vec::len).collect::<Vec<_>>(),
            self.books.plan_weights,
        )
    }
}

/// A program of `len` steps over `addrs` addresses, drawn with `weights`.
fn program(rng: &mut XorShift, len: u64, addrs: u8, weights: &[(Kind, u32)]) -> Vec<Step> {
    let w: Vec<u32> = weights.iter().map(|&(_, w)| w).collect();
    (0..len)
        .map(|_| {
            let a = rng.below(u64::from(addrs)) as u8;
            let pick = rng.below(256) as u8;
            match weights[rng.weighted(&w)].0 {
                Kind::TryInsert => Step::TryInsert(a),
                Kind::Insert => Step::Insert(a),
                Kind::Get => Step::Get(a),
                Kind::Remove => Step::Remove(a),
                Kind::RemoveConnection => Step::RemoveConnection(pick),
                Kind::Kill => Step::Kill(pick),
                Kind::GetOrConnect => Step::GetOrConnect(a),
                Kind::Call => Step::Call(a, rng.below(2) == 0),
                Kind::EvictIdle => Step::EvictIdle,
                Kind::EvictUnhealthy => Step::EvictUnhealthy,
            }
        })
        .collect()
}

/// Puts one `close()` into the program of one thread, somewhere in its middle half.
fn insert_close(rng: &mut XorShift, programs: &mut [Vec<Step>]) {
    let t = rng.below(programs.len() as u64) as usize;
    let len = programs[t].len() as u64;
    let at = rng.range(len / 4, (3 * len / 4).max(len / 4)) as usize;
    programs[t].insert(at, Step::Close);
}

fn books_config(cap: Option<usize>, addrs: u8, plan_weights: [u32; 3], seed: u64) -> BooksConfig {
    BooksConfig {
        cap,
        addrs: (0..addrs).map(addr).collect(),
        per_address: None,
        plan_weights,
        plan_seed: seed,
        slow: Duration::from_millis(1),
        close_takes: Duration::from_micros(50),
    }
}

// ---------------------------------------------------------------------------------------------
// Playing a round.

/// What a round left behind: the pool (settled: no connect in flight), its history.
struct Played {
    pool: Pool,
    events: Vec<Event>,
    /// Failures found while playing (a connect that never ended).
    failures: Vec<Failure>,
}

fn play(rt: &Runtime, round: &Round) -> Played {
    let clock = Arc::new(AtomicU64::new(0));
    let books = BooksConnector::new(round.books.clone(), Arc::clone(&clock));
    let pool = ConnectionPool::builder()
        .max_connections(round.spec.cap)
        .max_idle(round.max_idle)
        .consecutive_failures(round.consecutive_failures)
        .backoff(Duration::from_millis(1), Duration::from_millis(2), 0.0)
        .connect_timeout(Duration::from_secs(1))
        .when_full(if round.spec.lru {
            WhenFull::EvictLeastRecentlyUsed
        } else {
            WhenFull::Reject
        })
        .connector(books)
        .build::<BookConn>()
        .expect("valid config");
    let barrier = Barrier::new(round.programs.len());
    let handle = rt.handle();
    let mut events: Vec<Event> = std::thread::scope(|s| {
        let threads: Vec<_> = round
            .programs
            .iter()
            .enumerate()
            .map(|(t, steps)| {
                let (pool, clock, barrier) = (&pool, &*clock, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    run_thread(pool, clock, handle, t, steps)
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a round thread panicked"))
            .collect()
    });
    events.sort_by_key(|e| e.inv);
    let mut failures = Vec::new();
    let start = Instant::now();
    while pool.connector().connects_in_flight() > 0 || pool.stats().reserved > 0 {
        if start.elapsed() > SETTLE {
            failures.push(Failure::new(
                "I16: a connect outlived its callers",
                format!(
                    "I16 violated: a connect is still in flight {SETTLE:?} after every caller returned"
                ),
            ));
            break;
        }
        std::thread::yield_now();
    }
    Played {
        pool,
        events,
        failures,
    }
}

fn error_text(e: &PoolError) -> Res {
    match e {
        PoolError::AtCapacity { .. } => Res::AtCapacity,
        PoolError::Closed => Res::Closed,
        PoolError::Connect { cause, .. } if cause.downcast_ref::<BooksError>().is_some() => {
            Res::Error(CONNECT_REFUSED.to_string())
        }
        PoolError::Connect { cause, .. } => Res::Error(format!("Connect({cause})")),
        PoolError::Backoff { .. } => Res::Error("Backoff".to_string()),
        PoolError::ConnectTimeout { .. } => Res::Error("ConnectTimeout".to_string()),
        other => Res::Error(other.to_string()),
    }
}

/// A `get_or_connect` error that is not the connector's: the connect succeeded, yet the caller got
/// an error.
fn stale_connect_error(res: &Res) -> bool {
    matches!(res, Res::Error(e) if e.starts_with("Connect(") && e != CONNECT_REFUSED)
}

fn serial_of(c: &PooledConnection<BookConn>) -> u64 {
    c.client().serial()
}

fn addr_index(c: &PooledConnection<BookConn>) -> u8 {
    let a = c.addr().as_str();
    a["10.0.0.".len()..a.len() - ":7000".len()]
        .parse()
        .expect("an address of this tier")
}

/// Keeps a handle for later `remove_connection` / `kill` steps (the last few).
fn hold(held: &mut Vec<PooledConnection<BookConn>>, c: PooledConnection<BookConn>) {
    held.push(c);
    if held.len() > 6 {
        held.remove(0);
    }
}

/// Runs one thread's program; returns its events.
fn run_thread(pool: &Pool, clock: &AtomicU64, rt: &Handle, t: usize, steps: &[Step]) -> Vec<Event> {
    let books = pool.connector();
    let tick = || clock.fetch_add(1, SeqCst);
    let mut held: Vec<PooledConnection<BookConn>> = Vec::new();
    let mut events = Vec::with_capacity(steps.len());
    for &step in steps {
        let (inv, op, res, ret) = match step {
            Step::InsertIfEmpty(a) if pool.peek(addr(a)).is_some() => continue,
            Step::TryInsert(a) | Step::Insert(a) | Step::InsertIfEmpty(a) => {
                let conn = books.by_hand(&addr(a));
                let serial = conn.serial();
                let inv = tick();
                // `insert` (the bool API) answers yes or no; `try_insert` gives the connection, or
                // why not.
                type Got = Result<Option<PooledConnection<BookConn>>, Option<PoolError>>;
                let (op, got): (Op, Got) = if matches!(step, Step::Insert(_)) {
                    let ok = pool.insert(addr(a), conn);
                    (
                        Op::Insert { addr: a, serial },
                        if ok { Ok(None) } else { Err(None) },
                    )
                } else {
                    let got = pool.try_insert(addr(a), conn);
                    (
                        Op::TryInsert { addr: a, serial },
                        got.map(Some).map_err(Some),
                    )
                };
                let ret = tick();
                let res = match got {
                    Ok(pooled) => {
                        books.accepted(serial);
                        let handle = pooled
                            .or_else(|| pool.peek(addr(a)).filter(|c| serial_of(c) == serial));
                        if let Some(c) = handle {
                            hold(&mut held, c);
                        }
                        match op {
                            Op::Insert { .. } => Res::Inserted(true),
                            _ => Res::Conn(serial),
                        }
                    }
                    Err(e) => {
                        books.refused(serial);
                        e.as_ref().map_or(Res::Inserted(false), error_text)
                    }
                };
                (inv, op, res, ret)
            }
            Step::Get(a) => {
                let inv = tick();
                let got = pool.get(addr(a));
                let ret = tick();
                let res = Res::Found(got.as_ref().map(serial_of));
                if let Some(c) = got {
                    hold(&mut held, c);
                }
                (inv, Op::Get { addr: a }, res, ret)
            }
            Step::Remove(a) => {
                let inv = tick();
                let got = pool.take_unclosed(addr(a));
                let ret = tick();
                let res = Res::Found(got.as_ref().map(serial_of));
                // The connection is the caller's now: close it, as its owner.
                if let Some(c) = got {
                    books.close_as_owner(c.client());
                }
                (inv, Op::Remove { addr: a }, res, ret)
            }
            Step::RemoveConnection(pick) | Step::Kill(pick) => {
                if held.is_empty() {
                    continue;
                }
                let c = held[usize::from(pick) % held.len()].clone();
                let (a, serial) = (addr_index(&c), serial_of(&c));
                if matches!(step, Step::Kill(_)) {
                    let inv = tick();
                    books.kill(c.client());
                    let ret = tick();
                    (inv, Op::Kill { addr: a, serial }, Res::Done, ret)
                } else {
                    let inv = tick();
                    let removed = pool.remove_connection(&c);
                    let ret = tick();
                    (
                        inv,
                        Op::RemoveConnection { addr: a, serial },
                        Res::Removed(removed),
                        ret,
                    )
                }
            }
            Step::GetOrConnect(a) => {
                let inv = tick();
                let got = rt.block_on(pool.get_or_connect(&addr(a)));
                let ret = tick();
                let res = match got {
                    Ok(c) => {
                        let serial = serial_of(&c);
                        hold(&mut held, c);
                        Res::Conn(serial)
                    }
                    Err(e) => error_text(&e),
                };
                (inv, Op::GetOrConnect { addr: a }, res, ret)
            }
            Step::Call(a, ok) => {
                let inv = tick();
                let got = pool.get(addr(a));
                if let Some(c) = &got {
                    let call = c.begin();
                    std::thread::yield_now();
                    if ok {
                        call.success();
                    } else {
                        let _ = call.failure();
                    }
                }
                let ret = tick();
                (
                    inv,
                    Op::Call { addr: a, ok },
                    Res::Found(got.as_ref().map(serial_of)),
                    ret,
                )
            }
            Step::EvictIdle | Step::EvictUnhealthy => {
                let idle = matches!(step, Step::EvictIdle);
                let inv = tick();
                let n = if idle {
                    rt.block_on(pool.evict_idle())
                } else {
                    rt.block_on(pool.evict_unhealthy())
                };
                let ret = tick();
                let op = if idle {
                    Op::EvictIdle
                } else {
                    Op::EvictUnhealthy
                };
                (inv, op, Res::Evicted(n), ret)
            }
            Step::Close => {
                books.closing_on_this_thread(true);
                let inv = tick();
                rt.block_on(pool.close());
                let ret = tick();
                books.closing_on_this_thread(false);
                (inv, Op::Close, Res::Done, ret)
            }
        };
        events.push(Event {
            thread: t,
            inv,
            ret,
            op,
            res,
        });
    }
    events
}

// ---------------------------------------------------------------------------------------------
// Failures and the driver of a test's rounds.

/// One violation found in a round.
#[derive(Debug, Clone)]
struct Failure {
    /// The invariant and defect, short: groups rounds that found the same thing.
    tag: String,
    /// Starts with `I<n> violated:`.
    message: String,
    /// The violating history (filled in by the driver when the check leaves it empty).
    history: String,
    /// Operations in `history`.
    size: usize,
}

impl Failure {
    fn new(tag: &str, message: String) -> Self {
        Self {
            tag: tag.to_string(),
            message,
            history: String::new(),
            size: usize::MAX,
        }
    }
}

/// What the driver keeps of each kind of failure.
struct Caught {
    rounds: u64,
    first_seed: u64,
    first_after: Duration,
    shortest_seed: u64,
    shortest: Failure,
    config: String,
}

/// Runs the rounds of test `name` (seeds `1..=rounds`, or the replayed seed), each through
/// `round`, which returns the round's description, its history and its failures. Panics at the
/// end if any round failed, with every kind of failure found.
fn drive(
    name: &str,
    default_rounds: u64,
    mut round: impl FnMut(u64) -> (String, Vec<Event>, Vec<Failure>),
) {
    let replay = env_u64("THREADED_SEED");
    let seeds = threaded_seeds(default_rounds);
    let start = Instant::now();
    let mut caught: BTreeMap<String, Caught> = BTreeMap::new();
    let mut failed_rounds = 0u64;
    for &seed in &seeds {
        let (config, events, failures) = round(seed);
        failed_rounds += u64::from(!failures.is_empty());
        let mut tags_this_round = Vec::new();
        for mut f in failures {
            if f.history.is_empty() {
                f.history = linearize::render(&events);
                f.size = events.len();
            }
            let entry = caught.entry(f.tag.clone()).or_insert_with(|| Caught {
                rounds: 0,
                first_seed: seed,
                first_after: start.elapsed(),
                shortest_seed: seed,
                shortest: f.clone(),
                config: config.clone(),
            });
            if !tags_this_round.contains(&f.tag) {
                entry.rounds += 1;
                tags_this_round.push(f.tag.clone());
            }
            if f.size < entry.shortest.size {
                entry.shortest_seed = seed;
                entry.shortest = f;
                entry.config = config.clone();
            }
        }
    }
    let elapsed = start.elapsed();
    let range = match replay {
        Some(seed) => format!("seed {seed} × {}", seeds.len()),
        None => format!("seeds 1..={}", seeds.len()),
    };
    eprintln!(
        "threaded::{name}: {} rounds ({range}) in {:.2} s; {failed_rounds} failed",
        seeds.len(),
        elapsed.as_secs_f64()
    );
    for (tag, c) in &caught {
        eprintln!(
            "  caught [{tag}]: {} round(s), first seed {} after {:.2} s",
            c.rounds,
            c.first_seed,
            c.first_after.as_secs_f64()
        );
    }
    if caught.is_empty() {
        return;
    }
    let mut report = String::new();
    let mut kinds: Vec<&Caught> = caught.values().collect();
    kinds.sort_by_key(|c| (c.first_after, c.first_seed));
    for (i, c) in kinds.iter().enumerate() {
        if i > 0 {
            report.push_str("\n--- also caught:\n");
        }
        report.push_str(&format!(
            "{}\n  caught in {} of {} rounds ({range}); first at seed {} after {:.2} s\n  \
             shortest violating history found (seed {}, {} operations; {}):\n{}  \
             replay: THREADED_SEED={} cargo test -p keyed-pool-proptests --test threaded {name}\n",
            c.shortest.message,
            c.rounds,
            seeds.len(),
            c.first_seed,
            c.first_after.as_secs_f64(),
            c.shortest_seed,
            c.shortest.size,
            c.config,
            c.shortest.history,
            c.shortest_seed,
        ));
    }
    panic!("{report}");
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the books tests.

fn books_failures(played: &Played) -> Vec<Failure> {
    played
        .pool
        .connector()
        .violations()
        .into_iter()
        .map(|v| Failure::new(&v.tag, v.message))
        .collect()
}

fn describe_entry(e: &Entry, events: &[Event]) -> String {
    let how = match e.origin {
        Origin::Connected => "made by connect".to_string(),
        Origin::ByHand => {
            let by = events.iter().find(|ev| {
                matches!(ev.op, Op::TryInsert { serial, .. } | Op::Insert { serial, .. } if serial == e.serial)
            });
            match by {
                Some(ev) => format!("accepted by t{} {} -> {}", ev.thread, ev.op, ev.res),
                None => "made by hand".to_string(),
            }
        }
    };
    format!("#{} ({}, {how})", e.serial, e.addr)
}

/// Before any `close()`: every connection the pool accepted is pooled and unclosed, or was let go
/// and closed once. Then closes the pool and checks that everything is closed.
fn audit_then_close(rt: &Runtime, played: &Played) -> Vec<Failure> {
    let (pool, books) = (&played.pool, played.pool.connector());
    let mut failures = Vec::new();
    let pooled: Vec<u64> = books
        .entries()
        .iter()
        .filter_map(|e| pool.peek(&e.addr).map(|c| serial_of(&c)))
        .collect();
    for e in books.entries() {
        if e.standing != Standing::Accepted {
            continue;
        }
        let is_pooled = pooled.contains(&e.serial);
        if is_pooled && e.closes > 0 {
            failures.push(Failure::new(
                "I14: a pooled connection was closed",
                format!(
                    "I14 violated: {} is pooled but was closed {} time(s)",
                    describe_entry(&e, &played.events),
                    e.closes
                ),
            ));
        }
        if !is_pooled && e.closes == 0 {
            failures.push(Failure::new(
                "I17: a connection left the pool without being closed",
                format!(
                    "I17 violated: {} left the pool and was never closed",
                    describe_entry(&e, &played.events)
                ),
            ));
        }
    }
    books.closing_on_this_thread(true);
    rt.block_on(pool.close());
    books.closing_on_this_thread(false);
    failures.extend(closed_pool_failures(played, "the final close()"));
    failures
}

/// After `close()` returned and every operation ended: nothing pooled, nothing open at the
/// connector, every connection closed once.
fn closed_pool_failures(played: &Played, which: &str) -> Vec<Failure> {
    let (pool, books) = (&played.pool, played.pool.connector());
    let mut failures = Vec::new();
    let entries = books.entries();
    let still: Vec<String> = entries
        .iter()
        .filter(|e| {
            pool.peek(&e.addr)
                .is_some_and(|c| serial_of(&c) == e.serial)
        })
        .map(|e| describe_entry(e, &played.events))
        .collect();
    if !still.is_empty() || !pool.is_empty() {
        failures.push(Failure::new(
            "I17: a connection pooled after close() returned (try_insert racing close: issue 11 #1)",
            format!(
                "I17 violated: after {which} returned and every operation ended, {} connection(s) \
                 still pooled: {} (issue 11 #1: try_insert checks is_closed() once, before placing, \
                 so an insert racing close() lands after close() emptied the pool)",
                pool.len(),
                still.join(", ")
            ),
        ));
    }
    // Those still pooled are reported above.
    let open: Vec<String> = entries
        .iter()
        .filter(|e| e.standing == Standing::Accepted && e.closes == 0)
        .filter(|e| pool.peek(&e.addr).is_none_or(|c| serial_of(&c) != e.serial))
        .map(|e| describe_entry(e, &played.events))
        .collect();
    if !open.is_empty() {
        failures.push(Failure::new(
            "I17: a connection open at the connector after close() returned",
            format!(
                "I17 violated: after {which} returned and every operation ended, {} connection(s) \
                 the pool accepted were never closed: {}",
                open.len(),
                open.join(", ")
            ),
        ));
    }
    if still.is_empty() && open.is_empty() {
        assert_eq!(
            books.open(),
            0,
            "the books' open count drifted (a test bug)"
        );
    }
    failures
}

/// The books at the instant `close` returned, rebuilt from their ticks: every connection the pool
/// accepted was closed by then (its close had begun) unless `remove()` handed it back, and no
/// connect returned one afterwards. (Connections still pooled at the end are reported by
/// [`closed_pool_failures`].)
fn open_when_close_returned(played: &Played, close: &Event) -> Vec<Failure> {
    let pool = &played.pool;
    let mut failures = Vec::new();
    for e in pool.connector().entries() {
        if e.standing != Standing::Accepted || e.closed_by_owner {
            continue;
        }
        let still_pooled = pool
            .peek(&e.addr)
            .is_some_and(|c| serial_of(&c) == e.serial);
        if e.origin == Origin::Connected && e.made_at > close.ret {
            failures.push(Failure::new(
                "I17: a connect returned a connection after close() returned",
                format!(
                    "I17 violated: {} was returned by the connector at tick {}, after close() \
                     returned (tick {}): close() does not wait for the connects in flight, so the \
                     pool still opens connections after the cut",
                    describe_entry(&e, &played.events),
                    e.made_at,
                    close.ret
                ),
            ));
        } else if e.made_at < close.ret
            && e.closed_at.is_none_or(|c| c > close.ret)
            && !still_pooled
        {
            failures.push(Failure::new(
                "I17: a connection open at the connector when close() returned",
                format!(
                    "I17 violated: {} was open when close() returned (tick {}){}: close() empties \
                     the map but does not wait for the removals already under way (an eviction, a \
                     replacement, a connect being pooled) to close their connections",
                    describe_entry(&e, &played.events),
                    close.ret,
                    e.closed_at
                        .map(|c| format!(" and closed only at tick {c}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    failures
}

/// The connections that `ev`, a `get_or_connect(a)` that failed although a connect succeeded,
/// may have waited for: those the connector made for `a` before `ev` returned, from the last one
/// made before `ev` began on (its flight's connection is one of them: one connect in flight per
/// address, and a flight leaves the pool before it publishes its connection).
fn waited_for<'e>(entries: &'e [Entry], ev: &Event) -> Vec<&'e Entry> {
    let Op::GetOrConnect { addr: a } = ev.op else {
        return Vec::new();
    };
    let mut made: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.origin == Origin::Connected && e.addr == addr(a) && e.made_at < ev.ret)
        .collect();
    made.sort_by_key(|e| e.made_at);
    let before = made.iter().filter(|e| e.made_at < ev.inv).count();
    made.split_off(before.saturating_sub(1))
}

/// Which of `candidates` (from [`waited_for`]) the pool closed before `ev` returned, if none of them
/// had its transport killed or was closed by the test: then the caller's error was the pool's own
/// doing. `by` picks the closes that count (all of them must be of that kind, at least one).
fn closed_by_the_pool<'e>(
    candidates: &[&'e Entry],
    ev: &Event,
    by: impl Fn(&Entry) -> bool,
) -> Option<&'e Entry> {
    if candidates.iter().any(|e| e.killed || e.closed_by_owner) {
        return None;
    }
    let closed: Vec<&Entry> = candidates
        .iter()
        .copied()
        .filter(|e| e.closed_at.is_some_and(|c| c < ev.ret))
        .collect();
    (!closed.is_empty() && closed.iter().all(|e| by(e))).then(|| closed[closed.len() - 1])
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// I1 as the connector sees it: with inserts by hand, connects (succeeding, failing, slow), calls
/// (failing ones make connections unhealthy), transports dying, `remove_connection` and idle and
/// health sweeps racing from 2–4 threads, the connections open at the connector never exceed
/// `max_connections` at the instant one more opens. Also (books): one connect in flight per
/// address (I4), every connection closed once, none leaked, all closed by `close()` (I17).
///
/// Connects go to shared addresses; each thread inserts by hand only into an address of its own,
/// and only when it is empty: a connection made by hand that replaced another would be open
/// together with it (the caller opened it before inserting it, and I2 gives it the slot of the
/// one it replaces), which is no fault of the pool's. No `remove()` either: it hands its
/// connection back open and frees its slot at once.
#[test]
fn i1_open_at_the_connector_never_exceeds_the_cap() {
    let rt = runtime();
    drive(
        "i1_open_at_the_connector_never_exceeds_the_cap",
        400,
        |seed| {
            let mut rng = XorShift::new(seed);
            let cap = rng.range(1, 4) as usize;
            let lru = rng.below(2) == 1;
            let shared = (cap as u64 + rng.range(1, 2)) as u8;
            let threads = rng.range(2, 4);
            let addrs = shared + threads as u8;
            let weights = [
                (Kind::TryInsert, 3),
                (Kind::Get, 1),
                (Kind::GetOrConnect, 4),
                (Kind::RemoveConnection, 2),
                (Kind::Call, 2),
                (Kind::Kill, 1),
                (Kind::EvictIdle, 1),
                (Kind::EvictUnhealthy, 1),
            ];
            let programs = (0..threads)
                .map(|t| {
                    let len = rng.range(10, 20);
                    let own = shared + t as u8;
                    program(&mut rng, len, addrs, &weights)
                        .into_iter()
                        .map(|s| match s {
                            Step::TryInsert(_) => Step::InsertIfEmpty(own),
                            Step::GetOrConnect(a) => Step::GetOrConnect(a % shared),
                            s => s,
                        })
                        .collect()
                })
                .collect();
            let round = Round {
                spec: Spec { cap, lru },
                max_idle: Duration::from_millis(2),
                consecutive_failures: 2,
                books: books_config(Some(cap), addrs, [5, 2, 2], seed),
                programs,
            };
            let played = play(&rt, &round);
            let mut failures = played.failures.clone();
            failures.extend(audit_then_close(&rt, &played));
            failures.extend(books_failures(&played));
            (round.describe(), played.events, failures)
        },
    );
}

/// I4: however `get_or_connect` callers race (connects succeeding, failing and slow; transports
/// dying and health sweeps making addresses reconnect; LRU evictions under pressure), the
/// connector never has two connects in flight for one address, and the callers that waited for a
/// connect that succeeded get its connection (or, if the transport died meanwhile, an error): never
/// an error because the pool itself closed the connection before handing it to them.
#[test]
fn i4_one_connect_in_flight_per_address_and_its_waiters_get_its_result() {
    let rt = runtime();
    drive(
        "i4_one_connect_in_flight_per_address_and_its_waiters_get_its_result",
        400,
        |seed| {
            let mut rng = XorShift::new(seed);
            let cap = rng.range(1, 3) as usize;
            let lru = rng.below(2) == 1;
            // Under Reject nothing would free a slot: give every address one.
            let addrs = if lru {
                (cap as u64 + rng.range(1, 2)) as u8
            } else {
                cap as u8
            };
            let threads = rng.range(2, 4);
            let weights = [
                (Kind::GetOrConnect, 6),
                (Kind::Get, 1),
                (Kind::Call, 2),
                (Kind::Kill, 1),
                (Kind::EvictUnhealthy, 1),
            ];
            let programs = (0..threads)
                .map(|_| {
                    let len = rng.range(10, 20);
                    program(&mut rng, len, addrs, &weights)
                        .into_iter()
                        // Calls succeed here: a connection turns unusable only by dying or by
                        // the pool's own doing.
                        .map(|s| match s {
                            Step::Call(a, _) => Step::Call(a, true),
                            s => s,
                        })
                        .collect()
                })
                .collect();
            let round = Round {
                spec: Spec { cap, lru },
                max_idle: Duration::ZERO,
                consecutive_failures: 5,
                books: books_config(Some(cap), addrs, [4, 3, 2], seed),
                programs,
            };
            let played = play(&rt, &round);
            let mut failures = played.failures.clone();
            let entries = played.pool.connector().entries();
            for ev in &played.events {
                if !stale_connect_error(&ev.res) {
                    continue;
                }
                if let Some(e) = closed_by_the_pool(&waited_for(&entries, ev), ev, |_| true) {
                    failures.push(Failure::new(
                        "I4: waiters of a successful connect got an error (issue 11 #7)",
                        format!(
                            "I4 violated: t{} {} -> {} although its connect succeeded: {} was \
                             closed by the pool before its waiters received it (issue 11 #7: \
                             under {} the connection made for waiting callers is evicted to make \
                             room for another address before they wake)",
                            ev.thread,
                            ev.op,
                            ev.res,
                            describe_entry(e, &played.events),
                            if lru {
                                "EvictLeastRecentlyUsed"
                            } else {
                                "Reject"
                            }
                        ),
                    ));
                }
            }
            failures.extend(audit_then_close(&rt, &played));
            failures.extend(books_failures(&played));
            (round.describe(), played.events, failures)
        },
    );
}

/// I17: one thread closes the pool in the middle of a random history (inserts, gets, connects,
/// removals, calls, sweeps). Every operation invoked after `close()` returned returns `Closed` /
/// `None` / `false` / 0; a `get_or_connect` racing the close gets `Closed` or a connection, never
/// a stale connect error; once every operation has ended, nothing is pooled and nothing the pool
/// accepted is open at the connector (connections `remove()` handed back are closed by their
/// owner); every connection was closed exactly once.
#[test]
fn i17_nothing_open_or_handed_out_after_close() {
    let rt = runtime();
    drive("i17_nothing_open_or_handed_out_after_close", 1000, |seed| {
        let mut rng = XorShift::new(seed);
        let cap = rng.range(1, 4) as usize;
        let lru = rng.below(2) == 1;
        let addrs = rng.range(2, 4) as u8;
        let threads = rng.range(2, 4);
        let weights = [
            (Kind::TryInsert, 4),
            (Kind::Insert, 1),
            (Kind::Get, 2),
            (Kind::GetOrConnect, 4),
            (Kind::Remove, 1),
            (Kind::RemoveConnection, 1),
            (Kind::Call, 1),
            (Kind::Kill, 1),
            (Kind::EvictIdle, 1),
            (Kind::EvictUnhealthy, 1),
        ];
        let mut programs: Vec<Vec<Step>> = (0..threads)
            .map(|_| {
                let len = rng.range(8, 16);
                program(&mut rng, len, addrs, &weights)
            })
            .collect();
        insert_close(&mut rng, &mut programs);
        let round = Round {
            spec: Spec { cap, lru },
            max_idle: Duration::from_millis(2),
            consecutive_failures: 2,
            // `remove()` frees its slot while the connection it hands back is open: no cap here.
            books: books_config(None, addrs, [5, 3, 1], seed),
            programs,
        };
        let played = play(&rt, &round);
        let mut failures = played.failures.clone();
        let close = played
            .events
            .iter()
            .find(|e| e.op == Op::Close)
            .expect("every round closes")
            .clone();
        let entries = played.pool.connector().entries();
        for ev in &played.events {
            if ev.inv > close.ret {
                let handed_out = match &ev.res {
                    Res::Conn(s) | Res::Found(Some(s)) => Some(*s),
                    _ => None,
                };
                let wrong = match (&ev.op, &ev.res) {
                    (Op::Kill { .. }, _) => false,
                    (Op::TryInsert { .. } | Op::GetOrConnect { .. }, r) => *r != Res::Closed,
                    (Op::Insert { .. }, r) => *r != Res::Inserted(false),
                    (Op::Get { .. } | Op::Remove { .. } | Op::Call { .. }, r) => {
                        *r != Res::Found(None)
                    }
                    (Op::RemoveConnection { .. }, r) => *r != Res::Removed(false),
                    (Op::EvictIdle | Op::EvictUnhealthy, r) => *r != Res::Evicted(0),
                    (Op::Close, _) => false,
                };
                if !wrong {
                    continue;
                }
                let whose = handed_out
                    .and_then(|s| entries.iter().find(|e| e.serial == s))
                    .map(|e| format!(": {}", describe_entry(e, &played.events)))
                    .unwrap_or_default();
                let (tag, why) = if matches!(ev.op, Op::TryInsert { .. } | Op::Insert { .. }) {
                    (
                        "I17: an insert invoked after close() returned was accepted",
                        "inserts after close() must return Closed",
                    )
                } else {
                    (
                        "I17: a connection pooled after close() returned (try_insert racing close: issue 11 #1)",
                        "the pool still held a connection after close() returned (issue 11 #1: \
                         try_insert checks is_closed() once, before placing, so an insert racing \
                         close() lands after close() emptied the pool)",
                    )
                };
                failures.push(Failure::new(
                    tag,
                    format!(
                        "I17 violated: t{} {} invoked after close() returned gave {}{whose}; {why}",
                        ev.thread, ev.op, ev.res
                    ),
                ));
            } else if stale_connect_error(&ev.res) && ev.overlaps(&close) {
                let candidates = waited_for(&entries, ev);
                if let Some(e) = closed_by_the_pool(&candidates, ev, |e| e.closed_by_pool_close) {
                    failures.push(Failure::new(
                        "I17: get_or_connect racing close() got a stale connect error (issue 11 #11)",
                        format!(
                            "I17 violated: t{} {} racing close() returned {} instead of Closed or a \
                             connection: its connect succeeded ({}) and close() closed the connection \
                             before the caller received it (issue 11 #11)",
                            ev.thread,
                            ev.op,
                            ev.res,
                            describe_entry(e, &played.events)
                        ),
                    ));
                }
            }
        }
        failures.extend(open_when_close_returned(&played, &close));
        failures.extend(closed_pool_failures(&played, "close()"));
        failures.extend(books_failures(&played));
        (round.describe(), played.events, failures)
    });
}

/// The history is not linearizable: a failure with the shortest witness found, diagnosed.
fn linearizability_failures(spec: Spec, events: &[Event]) -> Vec<Failure> {
    if linearize::linearizable(spec, events) {
        return Vec::new();
    }
    let small = linearize::minimize(spec, events);
    let (tag, message) = linearize::diagnose(spec, events, &small);
    vec![Failure {
        tag,
        message: format!(
            "{message}\n  (the round's {} operations are not linearizable; the history below is a \
             part of them that alone is not)",
            events.len()
        ),
        history: small.render(),
        size: small.events.len(),
    }]
}

/// I2 where it is narrowest: with `max_connections = 1` and one address, four threads insert and
/// remove that address without pause (a few thousand operations each per round). In every state
/// an insert must succeed (the address is present and is replaced, or absent and the only slot is
/// free), so a refusal for capacity is a violation, shown with the operations that overlapped it
/// (issue 11 #5: `remove()` releases the slot after dropping the shard lock,
/// and an insert in between finds the address absent and the slot taken).
#[test]
fn i2_insert_racing_remove_of_its_address_never_fails_for_capacity() {
    let rt = runtime();
    drive(
        "i2_insert_racing_remove_of_its_address_never_fails_for_capacity",
        60,
        |seed| {
            let mut rng = XorShift::new(seed);
            let spec = Spec {
                cap: 1,
                lru: rng.below(2) == 1,
            };
            // `remove_connection` too: every removal path must free its slot under the entry lock.
            let weights = [
                (Kind::TryInsert, 4),
                (Kind::Insert, 1),
                (Kind::Remove, 3),
                (Kind::RemoveConnection, 2),
            ];
            // More threads than cores: a thread preempted inside `remove()` holds the window
            // open for the others.
            let programs = (0..4)
                .map(|_| {
                    let len = rng.range(2000, 4000);
                    program(&mut rng, len, 1, &weights)
                })
                .collect();
            let round = Round {
                spec,
                max_idle: Duration::ZERO,
                consecutive_failures: 5,
                books: BooksConfig {
                    close_takes: Duration::ZERO,
                    ..books_config(None, 1, [1, 0, 0], seed)
                },
                programs,
            };
            let played = play(&rt, &round);
            let mut failures = played.failures.clone();
            // Any refusal is a violation here, no search needed: its witness is the refusal and
            // what overlapped it (a search of four long threads could take minutes).
            let events = &played.events;
            if let Some(r) = events.iter().find(|e| {
                matches!(
                    (e.op, &e.res),
                    (Op::TryInsert { .. }, Res::AtCapacity | Res::Closed)
                        | (Op::Insert { .. }, Res::Inserted(false))
                )
            }) {
                let around: Vec<Event> = events
                    .iter()
                    .filter(|e| e.overlaps(r) || *e == r)
                    .cloned()
                    .collect();
                let remover = around.iter().find(|e| {
                    matches!(e.op, Op::Remove { .. }) && matches!(e.res, Res::Found(Some(_)))
                });
                failures.push(Failure {
                    tag: "I2: try_insert racing remove of the same address refused at capacity \
                          (issue 11 #5)"
                        .to_string(),
                    message: format!(
                        "I2 violated: {} -> {} with max_connections = 1 and a0 the only address: \
                         in every state an insert succeeds (a0 present: replaced, never refused; \
                         a0 absent: the only slot is free){} (issue 11 #5: remove() releases the \
                         slot after dropping the shard lock)",
                        r.op,
                        r.res,
                        remover
                            .map(|m| format!(", and {} -> {} overlapped it", m.op, m.res))
                            .unwrap_or_default()
                    ),
                    history: format!(
                        "    the refused insert and the {} operation(s) that overlapped it:\n{}",
                        around.len() - 1,
                        linearize::render(&around)
                    ),
                    size: around.len(),
                });
            }
            failures.extend(books_failures(&played));
            (round.describe(), played.events, failures)
        },
    );
}

/// Linearizability of the operations that do not depend on time (`try_insert`/`insert`, `get`,
/// `remove`, `remove_connection`, `close`) on a pool with idle eviction off, against the
/// sequential model of `keyed_pool_proptests::linearize` (I1, I2, I14, I17). Three rounds in four
/// are short histories (2–4 threads × 4–6 operations over 2–3 addresses, `close()` in half of
/// them, caps 1–3, Reject and LRU); one in four is a hot spot (cap 1, one or two addresses,
/// threads inserting and removing the same address).
#[test]
fn linearizable_insert_get_remove_close() {
    let rt = runtime();
    drive("linearizable_insert_get_remove_close", 3000, |seed| {
        let mut rng = XorShift::new(seed);
        let hot = seed % 8 == 0;
        let (spec, addrs, threads, lens, weights, close) = if hot {
            (
                Spec { cap: 1, lru: false },
                rng.range(1, 2) as u8,
                2,
                (100, 200),
                vec![
                    (Kind::TryInsert, 4),
                    (Kind::Insert, 1),
                    (Kind::Remove, 3),
                    (Kind::RemoveConnection, 1),
                    (Kind::Get, 1),
                ],
                rng.below(4) == 0,
            )
        } else {
            (
                Spec {
                    cap: rng.range(1, 3) as usize,
                    lru: rng.below(2) == 1,
                },
                rng.range(2, 3) as u8,
                rng.range(2, 4),
                (4, 6),
                vec![
                    (Kind::TryInsert, 3),
                    (Kind::Insert, 1),
                    (Kind::Get, 3),
                    (Kind::Remove, 2),
                    (Kind::RemoveConnection, 2),
                ],
                rng.below(2) == 0,
            )
        };
        let mut programs: Vec<Vec<Step>> = (0..threads)
            .map(|_| {
                let len = rng.range(lens.0, lens.1);
                program(&mut rng, len, addrs, &weights)
            })
            .collect();
        if close {
            insert_close(&mut rng, &mut programs);
        }
        let round = Round {
            spec,
            max_idle: Duration::ZERO,
            consecutive_failures: 5,
            // No connects here; closes (by the owners of removed connections) take no time, so
            // that the threads keep colliding.
            books: BooksConfig {
                close_takes: Duration::ZERO,
                ..books_config(None, addrs, [1, 0, 0], seed)
            },
            programs,
        };
        let played = play(&rt, &round);
        let mut failures = played.failures.clone();
        failures.extend(linearizability_failures(spec, &played.events));
        failures.extend(books_failures(&played));
        (round.describe(), played.events, failures)
    });
}

// ---------------------------------------------------------------------------------------------
// Exclusive checkout from threads (issue 13).

/// One step of a checkout thread's program.
#[derive(Debug, Clone, Copy)]
enum CoStep {
    /// `checkout(addr)`, kept on success (a thread holds at most two; beyond that it returns the
    /// oldest first).
    Checkout(u8),
    /// `checkout(addr)` dropped after this many microseconds if still waiting (I22).
    Cancel(u8, u64),
    /// Return a held connection (picked modulo the held ones).
    Return(u8),
    /// Mark a held connection broken, then return it: it must be closed.
    Broken(u8),
    /// Kill a held connection's transport (its server went away), then return it: it must be
    /// closed (I8).
    Kill(u8),
}

/// The callers' own books: which caller holds which connection (I20), and a log of what each
/// thread did on the books' clock, for the failure's history.
#[derive(Default)]
struct CoBooks {
    held: std::sync::Mutex<BTreeMap<u64, usize>>,
    log: std::sync::Mutex<Vec<(u64, String)>>,
    failures: std::sync::Mutex<Vec<Failure>>,
}

impl CoBooks {
    fn note(&self, clock: &AtomicU64, t: usize, what: String) {
        let at = clock.fetch_add(1, SeqCst);
        self.log.lock().unwrap().push((at, format!("t{t}: {what}")));
    }

    fn fail(&self, tag: &str, message: String) {
        self.failures
            .lock()
            .unwrap()
            .push(Failure::new(tag, message));
    }

    /// The last `n` entries of the log, in clock order.
    fn history(&self, n: usize) -> (String, usize) {
        let mut log = self.log.lock().unwrap().clone();
        log.sort_by_key(|(at, _)| *at);
        let tail = &log[log.len().saturating_sub(n)..];
        let text = tail
            .iter()
            .map(|(at, line)| format!("    {at:>6} {line}\n"))
            .collect::<String>();
        (text, tail.len())
    }
}

type Held = keyed_pool::Checkout<BookConn>;

/// A connection handed to thread `t`: no other caller holds it (I20), and it was neither closed
/// nor dead when handed out (I20: only idle ones or ones made or returned for the caller; I8).
fn took(books: &CoBooks, clock: &AtomicU64, t: usize, co: &Held) {
    let serial = co.serial();
    books.note(clock, t, format!("checkout {} -> #{serial}", co.addr()));
    if let Some(other) = books.held.lock().unwrap().insert(serial, t) {
        books.fail(
            "I20: one connection checked out to two callers",
            format!(
                "I20 violated: #{serial} ({}) handed to thread {t} while thread {other} holds it",
                co.addr()
            ),
        );
    }
    if !co.is_transport_open() {
        books.fail(
            "I20: a closed or dead connection handed out",
            format!(
                "I20 violated: #{serial} ({}) handed to thread {t} with its transport closed (closed by the pool, or killed and returned before)",
                co.addr()
            ),
        );
    }
}

/// Thread `t` gives `co` back: off the callers' books first (the pool may hand it to another
/// caller the moment it is dropped), then dropped; one that must be discarded (marked broken,
/// transport killed) is closed at the connector by the time the drop returns (I22, I8).
fn give_back(
    books: &CoBooks,
    pool: &CoPool,
    clock: &AtomicU64,
    t: usize,
    mut co: Held,
    how: CoStep,
) {
    let serial = co.serial();
    let conn_was_open = co.is_transport_open();
    if books.held.lock().unwrap().remove(&serial) != Some(t) {
        books.fail(
            "I20: one connection checked out to two callers",
            format!("I20 violated: thread {t} returns #{serial}, which the callers' books say it did not hold"),
        );
    }
    let discard = match how {
        CoStep::Broken(_) => {
            co.mark_broken();
            true
        }
        CoStep::Kill(_) => {
            pool.connector().kill(&co);
            true
        }
        _ => false,
    };
    books.note(clock, t, format!("return #{serial} {how:?}"));
    drop(co);
    if discard {
        let closes = pool
            .connector()
            .entries()
            .into_iter()
            .find(|e| e.serial == serial)
            .map_or(0, |e| e.closes);
        if closes == 0 && conn_was_open {
            books.fail(
                "I22: a discarded checkout was not closed",
                format!(
                    "I22 violated: #{serial} came back {how:?} and is not closed at the connector"
                ),
            );
        }
    }
}

type CoPool = ConnectionPool<BookConn, BooksConnector>;

fn run_checkout_thread(
    pool: &CoPool,
    books: &CoBooks,
    clock: &AtomicU64,
    rt: &Handle,
    t: usize,
    steps: &[CoStep],
) {
    let mut held: Vec<Held> = Vec::new();
    for &step in steps {
        match step {
            CoStep::Checkout(a) | CoStep::Cancel(a, _) => {
                if held.len() >= 2 {
                    let co = held.remove(0);
                    give_back(books, pool, clock, t, co, CoStep::Return(0));
                }
                let addr = addr(a);
                let result = match step {
                    CoStep::Cancel(_, us) => rt.block_on(async {
                        tokio::time::timeout(Duration::from_micros(us), pool.checkout(&addr))
                            .await
                            .ok()
                    }),
                    _ => Some(rt.block_on(pool.checkout(&addr))),
                };
                match result {
                    Some(Ok(co)) => {
                        took(books, clock, t, &co);
                        held.push(co);
                    }
                    Some(Err(e)) => books.note(clock, t, format!("checkout {addr} -> {e}")),
                    None => books.note(clock, t, format!("checkout {addr} cancelled")),
                }
            }
            CoStep::Return(i) | CoStep::Broken(i) | CoStep::Kill(i) => {
                if !held.is_empty() {
                    let co = held.remove(usize::from(i) % held.len());
                    give_back(books, pool, clock, t, co, step);
                }
            }
        }
    }
    for co in held {
        give_back(books, pool, clock, t, co, CoStep::Return(0));
    }
}

/// I1, I19, I20, I22 under exclusive checkout from real threads: 2–4 OS threads check out,
/// return, mark broken, kill and cancel waiters at random on 2–4 addresses, with
/// `max_per_address` 1–3 and a global cap below the addresses' sum (connects succeed, are slow
/// or fail, as the books' plans say). Judged from outside: the connector's books hold the cap
/// and `max_per_address` at every connection opened (I1, I19) and see one connect per address at
/// a time (I4) and every close once (I17); the callers' books see no connection held by two
/// callers, none handed out closed or dead (I20) and every discarded one closed on return (I22).
/// Once every thread has returned everything: nothing counted (checked out, waiting), the slots
/// equal the connections open at the connector, every address can hold `max_per_address`
/// connections at once again (a waiter cancelled at any point leaked nothing, I22), and after
/// `close()` every connection the connector opened is closed, exactly once.
#[test]
fn i1_i19_i20_i22_checkout_from_threads_under_the_cap() {
    let rt = runtime();
    let name = "i1_i19_i20_i22_checkout_from_threads_under_the_cap";
    drive(name, 120, |seed| {
        let mut rng = XorShift::new(seed);
        let addrs = rng.range(2, 4) as u8;
        let per_address = rng.range(1, 3) as usize;
        let cap = rng
            .range(
                per_address as u64,
                u64::from(addrs) * per_address as u64 - 1,
            )
            .max(1) as usize;
        let threads = rng.range(2, 4) as usize;
        let weights = [5u32, 2, 3, 1, 1];
        let programs: Vec<Vec<CoStep>> = (0..threads)
            .map(|_| {
                (0..rng.range(30, 60))
                    .map(|_| {
                        let a = rng.below(u64::from(addrs)) as u8;
                        let i = rng.below(4) as u8;
                        match rng.weighted(&weights) {
                            0 => CoStep::Checkout(a),
                            1 => CoStep::Cancel(a, rng.range(1, 3000)),
                            2 => CoStep::Return(i),
                            3 => CoStep::Broken(i),
                            _ => CoStep::Kill(i),
                        }
                    })
                    .collect()
            })
            .collect();
        let plan_weights = [6, 2, 1];
        let config = format!(
            "max_connections = {cap}, max_per_address = {per_address}, {addrs} addresses, \
             {threads} threads × {:?} steps, connect plans (ok, slow, fail) = {plan_weights:?}",
            programs.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let clock = Arc::new(AtomicU64::new(0));
        let connector = BooksConnector::new(
            BooksConfig {
                per_address: Some(per_address),
                ..books_config(Some(cap), addrs, plan_weights, seed)
            },
            Arc::clone(&clock),
        );
        let pool: CoPool = ConnectionPool::builder()
            .max_connections(cap)
            .max_per_address(per_address)
            .checkout_timeout(Duration::from_millis(5))
            .backoff(Duration::from_millis(1), Duration::from_millis(2), 0.0)
            .connect_timeout(Duration::from_secs(1))
            .connector(connector)
            .build::<BookConn>()
            .expect("valid config");
        let books = CoBooks::default();
        let barrier = Barrier::new(threads);
        let handle = rt.handle();
        std::thread::scope(|s| {
            for (t, steps) in programs.iter().enumerate() {
                let (pool, books, clock, barrier) = (&pool, &books, &*clock, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    run_checkout_thread(pool, books, clock, handle, t, steps);
                });
            }
        });
        let mut failures: Vec<Failure> = std::mem::take(&mut *books.failures.lock().unwrap());
        // Connect tasks of cancelled callers end on their own (bounded by the connect timeout).
        let start = Instant::now();
        while pool.connector().connects_in_flight() > 0 || pool.stats().reserved > 0 {
            if start.elapsed() > SETTLE {
                failures.push(Failure::new(
                    "I16: a connect outlived its callers",
                    format!("I16 violated: a connect is still in flight {SETTLE:?} after every caller returned"),
                ));
                break;
            }
            std::thread::yield_now();
        }
        let stats = pool.stats();
        if stats.checked_out != 0 || stats.waiting != 0 {
            failures.push(Failure::new(
                "I22: something stayed counted",
                format!(
                    "I22 violated: with every caller gone the pool counts {} checked out and {} waiting",
                    stats.checked_out, stats.waiting
                ),
            ));
        }
        // Pool-side on purpose: a permit leaked by a cancelled caller shows outside only when
        // the cap is reached with a slot held by nothing.
        let open = pool.connector().open();
        if pool.used_slots() as i64 != open || pool.len() as i64 != open {
            failures.push(Failure::new(
                "I22: slots held by nothing",
                format!(
                    "I22 violated: at rest {} slots used and {} connections pooled, {open} open at the connector",
                    pool.used_slots(),
                    pool.len()
                ),
            ));
        }
        // Every address can hold max_per_address connections at once again, one after the
        // other (the cap is at least that, and idle ones elsewhere are closed for room).
        for a in 0..addrs {
            let addr = addr(a);
            let mut held: Vec<Held> = Vec::new();
            let until = Instant::now() + Duration::from_secs(2);
            let mut last = String::new();
            while held.len() < per_address && Instant::now() < until {
                match rt.block_on(pool.checkout(&addr)) {
                    Ok(co) => {
                        took(&books, &clock, 0, &co);
                        held.push(co);
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if held.len() < per_address {
                failures.push(Failure::new(
                    "I22: an address cannot fill up to max_per_address again",
                    format!(
                        "I22 violated: {addr} got only {} of its {per_address} connections at once after the threads ended (last error: {last}): a count leaked",
                        held.len()
                    ),
                ));
            }
            for co in held {
                give_back(&books, &pool, &clock, 0, co, CoStep::Return(0));
            }
        }
        failures.extend(std::mem::take(&mut *books.failures.lock().unwrap()));
        let connector = pool.connector();
        connector.closing_on_this_thread(true);
        rt.block_on(pool.close());
        connector.closing_on_this_thread(false);
        let entries = connector.entries();
        let opened = entries.len();
        let closed = entries.iter().filter(|e| e.closes > 0).count();
        if connector.open() != 0 || closed != opened {
            failures.push(Failure::new(
                "I22: connections left open after close()",
                format!(
                    "I22 violated: after close() with nothing checked out the connector opened {opened} and closed {closed} ({} still open)",
                    connector.open()
                ),
            ));
        }
        failures.extend(
            connector
                .violations()
                .into_iter()
                .map(|v| Failure::new(&v.tag, v.message)),
        );
        let (history, size) = books.history(60);
        for f in &mut failures {
            f.history = history.clone();
            f.size = size;
        }
        (config, Vec::new(), failures)
    });
}
