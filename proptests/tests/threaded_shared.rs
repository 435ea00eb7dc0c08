//! The threaded tier for the shared mode with several connections per address (issue 13, I23):
//! OS threads (2–3, `std::thread::scope`) run random programs of `get_or_connect` + a call left
//! in flight, calls ending (success or failure), transports dying, `get`, `remove_connection`
//! and sweeps, on a pool driven by a multi-thread tokio runtime, with `max_per_address` 2–4 and a
//! global cap that is sometimes below what the addresses could grow to. Judged from outside, by
//! the connector's books ([`BooksConnector`]):
//!
//! - **I1** never more connections open at the connector than the cap (checked by the books at
//!   every connect);
//! - **I4** never two connects in flight for one address (checked by the books);
//! - **I23** never more than `max_per_address` connections of one address open at the connector
//!   (checked by each thread after each of its steps, on a snapshot of the books: a connection
//!   leaves its address and is closed under one entry lock, and one joins under it, so every
//!   snapshot must hold it);
//! - **I8** nothing handed out is known dead: a connection whose transport the test killed before
//!   a `get` or `get_or_connect` began is never handed out by it;
//! - **I17** after `close()`, every connection made is closed, once.
//!
//! Seeds are fixed (`1..=THREADED_ROUNDS`, default 400; `THREADED_SCALE` multiplies it); the
//! interleaving is the OS's. A failure prints the seed, its configuration and the command that
//! replays it (`THREADED_SEED=<seed>`, run `THREADED_REPEAT` times, default 100).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyed_pool::{CallGuard, CheetahString, ConnectionPool, PooledConnection};
use keyed_pool_proptests::books::{
    BookConn, BooksConfig, BooksConnector, Standing, XorShift, threaded_seeds,
};
use tokio::runtime::Runtime;

type Pool = ConnectionPool<BookConn, BooksConnector>;

const DEFAULT_ROUNDS: u64 = 400;

fn addr(i: u8) -> CheetahString {
    format!("10.0.1.{i}:7000").into()
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// `get_or_connect` and leave a call in flight on what it returned.
    Busy(u8),
    /// `get` (a hit or nothing), checked like `Busy`'s result, and no call.
    Get(u8),
    /// End a held call (picked modulo those held): success, or a failure.
    End(u8, bool),
    /// Kill the transport of a held connection (picked modulo those held).
    Kill(u8),
    /// `remove_connection` of a held connection (picked modulo those held).
    Remove(u8),
    EvictIdle,
    EvictUnhealthy,
}

#[derive(Debug, Clone)]
struct Round {
    addrs: u8,
    cap: usize,
    per_address: usize,
    busy_at: u64,
    programs: Vec<Vec<Step>>,
}

fn round(seed: u64) -> Round {
    let mut rng = XorShift::new(seed);
    let addrs = rng.range(1, 3) as u8;
    let per_address = rng.range(2, 4) as usize;
    // Below what every address could grow to in half the rounds.
    let cap = if rng.below(2) == 0 {
        rng.range(2, (addrs as usize * per_address) as u64) as usize
    } else {
        addrs as usize * per_address
    };
    let busy_at = rng.range(1, 2);
    let threads = rng.range(2, 3);
    let programs = (0..threads)
        .map(|_| {
            (0..rng.range(20, 60))
                .map(|_| {
                    let a = rng.below(u64::from(addrs)) as u8;
                    let pick = rng.below(8) as u8;
                    match rng.weighted(&[30, 8, 25, 4, 3, 3, 3]) {
                        0 => Step::Busy(a),
                        1 => Step::Get(a),
                        2 => Step::End(pick, rng.below(5) != 0),
                        3 => Step::Kill(pick),
                        4 => Step::Remove(pick),
                        5 => Step::EvictIdle,
                        _ => Step::EvictUnhealthy,
                    }
                })
                .collect()
        })
        .collect();
    Round {
        addrs,
        cap,
        per_address,
        busy_at,
        programs,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("multi-thread runtime")
}

/// I23 on a snapshot of the books: connections of each address open at the connector. Also
/// returns the most open for one address, so the test can show it exercised growth at all.
fn per_address_check(pool: &Pool, max: usize) -> (usize, Option<String>) {
    let mut open: HashMap<CheetahString, usize> = HashMap::new();
    for e in pool.connector().entries() {
        if e.standing == Standing::Accepted && e.closes == 0 {
            *open.entry(e.addr).or_default() += 1;
        }
    }
    let most = open.values().copied().max().unwrap_or(0);
    let violation = open.into_iter().find(|&(_, n)| n > max).map(|(a, n)| {
        format!("I23 violated: {n} connections of {a} open at the connector, max_per_address {max}")
    });
    (most, violation)
}

/// When each killed connection was killed, on the round's own clock: a hand-out is judged only
/// against kills that happened before it began (one racing it may or may not be seen).
#[derive(Default)]
struct Kills {
    clock: AtomicU64,
    /// The most connections of one address seen open at once (coverage, not an invariant).
    most_per_address: AtomicU64,
    at: Mutex<HashMap<u64, u64>>,
}

impl Kills {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst)
    }

    fn kill(&self, pool: &Pool, conn: &BookConn) {
        pool.connector().kill(conn);
        let at = self.tick();
        self.at.lock().unwrap().entry(conn.serial()).or_insert(at);
    }

    fn killed_before(&self, serial: u64, began: u64) -> bool {
        self.at
            .lock()
            .unwrap()
            .get(&serial)
            .is_some_and(|&at| at < began)
    }
}

fn run_thread(
    pool: &Pool,
    rt: &tokio::runtime::Handle,
    kills: &Kills,
    r: &Round,
    steps: &[Step],
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut held: Vec<(PooledConnection<BookConn>, CallGuard)> = Vec::new();
    let handed_out =
        |c: &PooledConnection<BookConn>, began: u64, what: &str, failures: &mut Vec<String>| {
            if kills.killed_before(c.client().serial(), began) {
                failures.push(format!(
                    "I8 violated: {what} handed out #{} of {}, killed before it began",
                    c.client().serial(),
                    c.addr()
                ));
            }
        };
    for &step in steps {
        match step {
            Step::Busy(a) => {
                let began = kills.tick();
                if let Ok(c) = rt.block_on(pool.get_or_connect(addr(a))) {
                    handed_out(&c, began, "get_or_connect", &mut failures);
                    let guard = c.begin();
                    held.push((c, guard));
                }
            }
            Step::Get(a) => {
                let began = kills.tick();
                if let Some(c) = pool.get(addr(a)) {
                    handed_out(&c, began, "get", &mut failures);
                }
            }
            Step::End(i, ok) if !held.is_empty() => {
                let (_c, guard) = held.swap_remove(usize::from(i) % held.len());
                if ok {
                    guard.success();
                } else {
                    guard.failure();
                }
            }
            Step::Kill(i) if !held.is_empty() => {
                let (c, _) = &held[usize::from(i) % held.len()];
                kills.kill(pool, c.client());
            }
            Step::Remove(i) if !held.is_empty() => {
                let (c, _) = &held[usize::from(i) % held.len()];
                pool.remove_connection(c);
            }
            Step::EvictIdle => {
                rt.block_on(pool.evict_idle());
            }
            Step::EvictUnhealthy => {
                rt.block_on(pool.evict_unhealthy());
            }
            Step::End(..) | Step::Kill(_) | Step::Remove(_) => {}
        }
        let (most, violation) = per_address_check(pool, r.per_address);
        kills.most_per_address.fetch_max(most as u64, SeqCst);
        failures.extend(violation);
    }
    failures
}

fn play(rt: &Runtime, seed: u64, r: &Round) -> (u64, Vec<String>) {
    let books = BooksConnector::new(
        BooksConfig {
            cap: Some(r.cap),
            addrs: (0..r.addrs).map(addr).collect(),
            per_address: Some(r.per_address),
            plan_weights: [6, 2, 1],
            plan_seed: seed,
            slow: Duration::from_millis(2),
            close_takes: Duration::ZERO,
        },
        Arc::new(AtomicU64::new(0)),
    );
    let pool: Pool = {
        let _enter = rt.enter();
        ConnectionPool::builder()
            .connector(books)
            .max_connections(r.cap)
            .max_per_address(r.per_address)
            .busy_in_flight(r.busy_at)
            .max_idle(Duration::from_millis(1))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a valid config")
    };
    let handle = rt.handle();
    let kills = Kills::default();
    let mut failures: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> = r
            .programs
            .iter()
            .map(|steps| s.spawn(|| run_thread(&pool, handle, &kills, r, steps)))
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a program thread panicked"))
            .collect()
    });
    rt.block_on(pool.close());
    let books = pool.connector();
    failures.extend(books.violations().into_iter().map(|v| v.message));
    if books.open() != 0 {
        failures.push(format!(
            "I17 violated: {} connections open at the connector after close()",
            books.open()
        ));
    }
    for e in books.entries() {
        if e.standing == Standing::Accepted && e.closes != 1 {
            failures.push(format!(
                "I17 violated: #{} of {} closed {} times after close()",
                e.serial, e.addr, e.closes
            ));
        }
    }
    (kills.most_per_address.load(SeqCst), failures)
}

#[test]
fn i1_i4_i23_several_shared_connections_under_real_threads() {
    let rt = runtime();
    let seeds = threaded_seeds(DEFAULT_ROUNDS);
    let start = Instant::now();
    let mut failed: Vec<(u64, Round, Vec<String>)> = Vec::new();
    let mut grew = 0;
    for &seed in &seeds {
        let r = round(seed);
        let (most, failures) = play(&rt, seed, &r);
        grew += u64::from(most >= 2);
        if !failures.is_empty() {
            failed.push((seed, r, failures));
        }
    }
    eprintln!(
        "threaded_shared: {} rounds in {:.2} s; {} failed; an address grew past one connection in {grew}",
        seeds.len(),
        start.elapsed().as_secs_f64(),
        failed.len()
    );
    if let Some((seed, r, failures)) = failed.first() {
        panic!(
            "{}\n  in {} of {} rounds; first at seed {seed} (addresses {}, cap {}, max_per_address {}, \
             busy_in_flight {}, {} threads)\n  replay: THREADED_SEED={seed} cargo test -p \
             keyed-pool-proptests --test threaded_shared",
            failures.join("\n"),
            failed.len(),
            seeds.len(),
            r.addrs,
            r.cap,
            r.per_address,
            r.busy_at,
            r.programs.len()
        );
    }
    assert!(
        grew * 4 >= seeds.len() as u64,
        "the tier did not test I23: an address grew past one connection in only {grew} of {} rounds",
        seeds.len()
    );
}
