//! The concurrent tier: operations from several tasks on a multi-thread runtime, checking what must
//! hold in every interleaving: I1 (the slot count sampled continuously by a watcher task), I3, I4,
//! I5/I7 and I14.
//! Real time, bounded by iteration counts; no sleeps for synchronisation (tasks wait on each other
//! through the pool's own counters or channels, polled with `yield_now`, with a deadline).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyed_pool::{ConnectionPool, Connector, PoolError, WhenFull};
use keyed_pool_proptests::{ConnectScript, FakeConn, ScriptedConnector, addr};
use tokio::sync::watch;
use tokio::time::Instant;

/// Every test ends by this, or fails.
const DEADLINE: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("multi-thread runtime")
}

fn block_on<F: Future<Output = ()>>(f: F) {
    runtime().block_on(async {
        tokio::time::timeout(DEADLINE, f)
            .await
            .expect("the test outlived its deadline");
    });
}

/// The base of every task's seed: `CONCURRENT_SEED` (default 0), printed by every test so a
/// failure names it. The tasks' choices replay from it; the interleaving is the OS's.
fn seed_base(test: &str) -> u64 {
    let base = std::env::var("CONCURRENT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "{test}: CONCURRENT_SEED={base} (replay the same choices: CONCURRENT_SEED={base} cargo test -p keyed-pool-proptests --test concurrent {test})"
    );
    base
}

/// A small deterministic generator per task (no `rand` needed).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Polls `cond` with `yield_now` until it holds; panics after `DEADLINE`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// I1 and I3 in every interleaving: tasks insert, connect (succeeding, failing and yielding
/// mid-connect), remove, sweep and use connections while a watcher samples the counts; at the
/// end no slot is leaked.
#[test]
fn i1_i3_cap_holds_at_every_instant() {
    let base = seed_base("i1_i3_cap_holds_at_every_instant");
    for (max, lru) in [(3usize, false), (3, true), (1, true)] {
        block_on(async move {
            let pool = ConnectionPool::builder()
                .max_connections(max)
                .max_idle(Duration::from_millis(2))
                .consecutive_failures(2)
                .backoff(Duration::from_millis(1), Duration::from_millis(2), 0.0)
                .when_full(if lru {
                    WhenFull::EvictLeastRecentlyUsed
                } else {
                    WhenFull::Reject
                })
                .connector(YieldingConnector::default())
                .build::<FakeConn>()
                .expect("valid config");
            let done = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (pool, done) = (pool.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    let mut samples = 0u64;
                    while !done.load(Ordering::Acquire) {
                        // The slot count is one atomic and bounds the live connections (a slot is
                        // taken before a connection is pooled and given back after it is gone).
                        // `len()` is not sampled here: it sums the map's shards one at a time, so
                        // under concurrent removal and insertion it can count a connection that
                        // is gone together with its successor in another shard.
                        let used = pool.used_slots();
                        assert!(used <= max, "I1 violated: {used} slots used, max {max}");
                        samples += 1;
                        tokio::task::yield_now().await;
                    }
                    samples
                })
            };
            let workers: Vec<_> = (0..6u64)
                .map(|seed| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let mut rng = XorShift::new(base + seed + 1);
                        let mut held = Vec::new();
                        for n in 0..1_500u64 {
                            let a = addr(rng.below(6) as u8);
                            match rng.below(9) {
                                0 | 1 => {
                                    if let Ok(c) = pool.try_insert(a, FakeConn::new(n)) {
                                        held.push(c);
                                    }
                                }
                                2 | 3 => {
                                    if let Ok(c) = pool.get_or_connect(&a).await {
                                        held.push(c);
                                    }
                                }
                                4 => drop(pool.take_unclosed(&a)),
                                5 => {
                                    if let Some(c) = held.pop() {
                                        pool.remove_connection(&c);
                                    }
                                }
                                6 => drop(pool.evict_idle().await + pool.evict_unhealthy().await),
                                7 => {
                                    if let Some(c) = pool.get(&a) {
                                        let call = c.begin();
                                        tokio::task::yield_now().await;
                                        if rng.below(2) == 0 {
                                            call.success();
                                        } else {
                                            let _ = call.failure();
                                        }
                                    }
                                }
                                _ => tokio::task::yield_now().await,
                            }
                            if held.len() > 8 {
                                held.remove(0);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.expect("worker panicked");
            }
            until("connects in flight to end", || pool.stats().reserved == 0).await;
            done.store(true, Ordering::Release);
            let samples = watcher.await.expect("I1 violated (watcher)");
            assert!(samples > 0, "the watcher never sampled");
            assert_eq!(
                pool.used_slots(),
                pool.len(),
                "I3 violated: slots leaked with no connect in flight (max {max}, lru {lru})"
            );
            assert!(pool.len() <= max, "I1 violated at rest");
            let stats = pool.stats();
            assert!(stats.connects.attempted > 0, "no connect was exercised");
        });
    }
}

/// Connects that yield mid-way (so other tasks interleave with a reservation held) and fail one
/// time in three.
#[derive(Debug, Default)]
struct YieldingConnector {
    n: AtomicU64,
}

impl Connector for YieldingConnector {
    type Conn = FakeConn;
    type Error = std::io::Error;

    async fn connect(&self, _addr: &str) -> Result<FakeConn, std::io::Error> {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        tokio::task::yield_now().await;
        if n % 3 == 2 {
            Err(std::io::Error::other("refused"))
        } else {
            Ok(FakeConn::new(n))
        }
    }

    fn is_open(&self, conn: &FakeConn) -> bool {
        conn.transport_open.load(Ordering::SeqCst)
    }

    fn close(&self, conn: &FakeConn) {
        conn.closes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A connector whose connects wait at a gate the test opens, so every caller provably arrives
/// while the one connect is in flight.
#[derive(Debug)]
struct GatedConnector {
    gate: watch::Receiver<bool>,
    connects: AtomicU64,
    fail: bool,
}

impl Connector for GatedConnector {
    type Conn = FakeConn;
    type Error = std::io::Error;

    async fn connect(&self, _addr: &str) -> Result<FakeConn, std::io::Error> {
        let n = self.connects.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(std::io::Error::other)?;
        if self.fail {
            Err(std::io::Error::other("refused"))
        } else {
            Ok(FakeConn::new(n))
        }
    }
}

/// I4 (and I3): concurrent `get_or_connect` on a cold address makes exactly one connect, and every
/// caller gets its result: the same connection, or the same error.
#[test]
fn i4_one_connect_per_cold_address_shared_result() {
    for fail in [false, true] {
        for callers in [2u64, 8, 32] {
            block_on(async move {
                let (open, gate) = watch::channel(false);
                let pool = ConnectionPool::builder()
                    .max_connections(1)
                    .connect_timeout(Duration::from_secs(30))
                    .connector(GatedConnector {
                        gate,
                        connects: AtomicU64::new(0),
                        fail,
                    })
                    .build::<FakeConn>()
                    .expect("valid config");
                let a = addr(0);
                let tasks: Vec<_> = (0..callers)
                    .map(|_| {
                        let (pool, a) = (pool.clone(), a.clone());
                        tokio::spawn(async move { pool.get_or_connect(&a).await })
                    })
                    .collect();
                until("every caller to join the flight", || {
                    let c = pool.stats().connects;
                    c.attempted + c.shared == callers
                })
                .await;
                assert_eq!(
                    pool.used_slots(),
                    1,
                    "I3 violated: the flight holds one slot"
                );
                open.send_replace(true);
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await.expect("caller panicked"));
                }
                assert_eq!(
                    pool.connector().connects.load(Ordering::SeqCst),
                    1,
                    "I4 violated: {callers} concurrent callers made more than one connect"
                );
                match &results[0] {
                    Ok(first) => assert!(
                        results
                            .iter()
                            .all(|r| r.as_ref().is_ok_and(|c| c.id() == first.id())),
                        "I4 violated: callers got different results: {results:?}"
                    ),
                    Err(PoolError::Connect { cause, .. }) => assert!(
                        results.iter().all(|r| matches!(r, Err(PoolError::Connect { cause: c, .. }) if Arc::ptr_eq(c, cause))),
                        "I4 violated: callers did not share one error: {results:?}"
                    ),
                    Err(e) => panic!("unexpected error {e}"),
                }
                assert_eq!(
                    pool.used_slots(),
                    usize::from(!fail),
                    "I3 violated: slot not returned after a failed connect"
                );
            });
        }
    }
}

/// I5 and I7 against a sweeper that runs without pause: a connection seen by `get` is not evicted
/// within `max_idle` of that get, and a connection with a call in flight is never evicted.
#[test]
fn i5_i7_sweeps_never_take_a_connection_in_use() {
    let base = seed_base("i5_i7_sweeps_never_take_a_connection_in_use");
    const MAX_IDLE: Duration = Duration::from_millis(20);
    block_on(async {
        let pool: ConnectionPool<u64> = ConnectionPool::new(0, MAX_IDLE);
        let done = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (pool, done) = (pool.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let mut evicted = 0;
                while !done.load(Ordering::Acquire) {
                    evicted += pool.evict_idle().await;
                    tokio::task::yield_now().await;
                }
                evicted
            })
        };
        let users: Vec<_> = (0..3u8)
            .map(|u| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let a = addr(u);
                    let mut rng = XorShift::new(base + u64::from(u) + 7);
                    let mut checked = 0u32;
                    for n in 0..3_000u64 {
                        let before = Instant::now();
                        let Some(conn) = pool.get(&a) else {
                            pool.insert(a.clone(), n);
                            continue;
                        };
                        let still = pool.peek(&a).is_some_and(|c| c.id() == conn.id());
                        if !still && before.elapsed() + Duration::from_millis(1) < MAX_IDLE {
                            panic!("I7 violated: evicted {:?} after get", before.elapsed());
                        }
                        let call = conn.begin();
                        let pooled_at_begin = pool.peek(&a).is_some_and(|c| c.id() == conn.id());
                        for _ in 0..rng.below(4) {
                            tokio::task::yield_now().await;
                        }
                        if pooled_at_begin {
                            checked += 1;
                            assert!(
                                pool.peek(&a).is_some_and(|c| c.id() == conn.id()),
                                "I5 violated: evicted with a call in flight"
                            );
                        }
                        call.success();
                        if rng.below(50) == 0 {
                            // Let it go idle now and then, so the sweeper has work.
                            let idle_from = Instant::now();
                            until("the connection to go idle", || {
                                idle_from.elapsed() > MAX_IDLE
                            })
                            .await;
                        }
                    }
                    checked
                })
            })
            .collect();
        let mut checked = 0;
        for u in users {
            checked += u.await.expect("I5/I7 violated (user task)");
        }
        done.store(true, Ordering::Release);
        let evicted = sweeper.await.expect("sweeper panicked");
        assert!(checked > 1_000, "only {checked} calls were checked");
        assert!(
            evicted > 0,
            "the sweeper never evicted anything: the test is vacuous"
        );
    });
}

/// I14 (and I7 for health sweeps): a writer keeps replacing the connection of one address and
/// sometimes marks the current one closed; a remover tries to remove every replaced handle; a
/// sweeper evicts closed connections without pause. A stale handle never removes its successor,
/// and a sweep never removes the fresh replacement of what it looked at.
#[test]
fn i14_stale_handles_never_remove_a_successor() {
    let base = seed_base("i14_stale_handles_never_remove_a_successor");
    block_on(async {
        let pool = ConnectionPool::builder()
            .connector(ScriptedConnector::new(Duration::from_millis(1)))
            .build::<FakeConn>()
            .expect("valid config");
        pool.connector().script(Some(ConnectScript::Ok));
        let a = addr(0);
        let (stale_tx, mut stale_rx) = tokio::sync::mpsc::unbounded_channel();
        let done = Arc::new(AtomicBool::new(false));
        let sweeper = {
            let (pool, done) = (pool.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let mut evicted = 0;
                while !done.load(Ordering::Acquire) {
                    evicted += pool.evict_unhealthy().await;
                    tokio::task::yield_now().await;
                }
                evicted
            })
        };
        let remover = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut tried = 0u32;
                while let Some(stale) = stale_rx.recv().await {
                    assert!(
                        !pool.remove_connection(&stale),
                        "I14 violated: removing stale #{} removed a connection",
                        stale.id()
                    );
                    tried += 1;
                }
                tried
            })
        };
        let mut all = Vec::new();
        let mut rng = XorShift::new(base + 99);
        let mut current = None;
        let mut waited_once = false;
        for n in 0..5_000u64 {
            let fresh = pool
                .try_insert(a.clone(), FakeConn::new(n))
                .expect("unlimited pool accepts");
            for _ in 0..rng.below(3) {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                pool.peek(&a).map(|c| c.id()),
                Some(fresh.id()),
                "I7/I14 violated: the fresh replacement was removed"
            );
            if rng.below(2) == 0 {
                fresh.mark_closed();
                // Give the sweeper a chance to look at it before it is replaced.
                for _ in 0..rng.below(3) {
                    tokio::task::yield_now().await;
                }
                if !waited_once || n % 500 == 0 {
                    // The first time and now and then, wait for the sweeper to take it: whatever
                    // the OS schedules, sweeps then race replacements, so the test is never
                    // vacuous by chance.
                    waited_once = true;
                    let waited = Instant::now();
                    while pool.peek(&a).is_some_and(|c| c.id() == fresh.id()) {
                        assert!(
                            waited.elapsed() < Duration::from_secs(10),
                            "the sweeper did not evict a closed connection within 10 s"
                        );
                        tokio::task::yield_now().await;
                    }
                }
            }
            all.push(fresh.clone());
            if let Some(old) = current.replace(fresh) {
                stale_tx.send(old).expect("remover alive");
            }
        }
        drop(stale_tx);
        let tried = remover.await.expect("I14 violated (remover)");
        done.store(true, Ordering::Release);
        let evicted = sweeper.await.expect("sweeper panicked");
        assert_eq!(tried, 4_999);
        assert!(
            evicted > 0,
            "the sweeper never evicted: the test is vacuous"
        );
        for c in &all {
            let closes = c.client().closes.load(Ordering::SeqCst);
            assert!(closes <= 1, "#{} closed {closes} times", c.id());
        }
    });
}
