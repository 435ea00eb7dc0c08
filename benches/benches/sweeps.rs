//! Sweeps over 10,000 and 100,000 connections, and what a running sweep does to concurrent readers.
//!
//! Part 1, the cost of one sweep (median of a few, ns per connection), against a floor measured in
//! the same process on a raw `DashMap<CheetahString, Arc<u64>>` of the same size:
//! - `evict_idle` / `evict_unhealthy` that find nothing (the steady state of the cleanup task),
//!   against iterating the floor map and collecting its keys; and `evict_idle` finding nothing on a
//!   pool whose every connection had a `get` since the last sweep (a busy pool's steady state: the
//!   look folds every "used" mark);
//! - `evict_idle` / `evict_unhealthy` that evict everything, against collecting, sorting and
//!   removing every key of the floor map.
//!
//! Part 2, a reader thread doing `get` hits on 100,000 warm connections and timing each one, alone
//! and while another thread sweeps back to back: p50, p99, p99.9 and max of the `get` latency.
//!
//! Part 3, the longest hold of the runtime thread while a sweep of 100,000 runs: the longest wait of
//! another task on the same single-threaded runtime (a sweep that never yields holds its worker
//! thread throughout), for each sweep finding nothing and evicting everything, and for a whole
//! cleanup round; then the longest single poll of each sweep in the runtime thread's CPU time,
//! which a loaded machine does not inflate.
//!
//! Run: `cargo bench -p keyed-pool-benches --bench sweeps`

use std::future::Future;
use std::hash::RandomState;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cheetah_string::CheetahString;
use dashmap::DashMap;
use keyed_pool::ConnectionPool;
use keyed_pool_benches::{Percentiles, Scatter, addrs, median};

const SIZES: [usize; 2] = [10_000, 100_000];
const REPEATS: usize = 5;
const READ_FOR: Duration = Duration::from_millis(1500);
const MAX_SAMPLES: usize = 4_000_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn pool_with(keys: &[CheetahString], max_idle: Duration) -> ConnectionPool<u64> {
    let pool = ConnectionPool::new(0, max_idle);
    for (i, k) in keys.iter().enumerate() {
        assert!(pool.insert(k.clone(), i as u64));
    }
    pool
}

fn floor_map(keys: &[CheetahString]) -> DashMap<CheetahString, Arc<u64>> {
    let map = DashMap::with_hasher_and_shard_amount(RandomState::new(), 32);
    for (i, k) in keys.iter().enumerate() {
        map.insert(k.clone(), Arc::new(i as u64));
    }
    map
}

/// Median over `REPEATS` of `run`, in ns per connection; `setup` (untimed) prepares each run.
fn per_conn<S>(n: usize, mut setup: impl FnMut() -> S, mut run: impl FnMut(S)) -> f64 {
    median(
        (0..REPEATS)
            .map(|_| {
                let state = setup();
                let start = Instant::now();
                run(state);
                start.elapsed().as_nanos() as f64 / n as f64
            })
            .collect(),
    )
}

fn sweep_costs(rt: &tokio::runtime::Runtime) {
    println!("one sweep, median of {REPEATS}, ns per connection (ratio to the floor in brackets)");
    for n in SIZES {
        let keys = addrs(n);
        let floor = floor_map(&keys);
        let scan_floor = per_conn(
            n,
            || (),
            |()| {
                let keys: Vec<_> = floor.iter().map(|e| e.key().clone()).collect();
                black_box(keys);
            },
        );
        let keep = pool_with(&keys, Duration::from_secs(3600));
        let idle_none = per_conn(n, || (), |()| assert_eq!(rt.block_on(keep.evict_idle()), 0));
        // The cleanup task's steady state on a busy pool: every connection had a `get` since the
        // last sweep, so the look folds every "used" mark (issue 16: one clock read per mark was
        // 20 ms of a sweep of 100,000 on a VM whose clock read costs ~200 ns).
        let idle_marked = per_conn(
            n,
            || {
                for k in &keys {
                    keep.get(k).expect("pooled");
                }
            },
            |()| assert_eq!(rt.block_on(keep.evict_idle()), 0),
        );
        let unhealthy_none = per_conn(
            n,
            || (),
            |()| assert_eq!(rt.block_on(keep.evict_unhealthy()), 0),
        );
        drop(keep);
        let remove_floor = per_conn(n, || floor_map(&keys), |map| floor_remove_all(&map));
        let idle_all = per_conn(
            n,
            || {
                let pool = pool_with(&keys, Duration::from_millis(1));
                std::thread::sleep(Duration::from_millis(5));
                pool
            },
            |pool| assert_eq!(rt.block_on(pool.evict_idle()), n),
        );
        let unhealthy_all = per_conn(
            n,
            || {
                let pool = pool_with(&keys, Duration::from_secs(3600));
                for k in &keys {
                    pool.peek(k).expect("pooled").mark_closed();
                }
                pool
            },
            |pool| assert_eq!(rt.block_on(pool.evict_unhealthy()), n),
        );
        println!("  {n:>7} connections:");
        println!(
            "    finds nothing: floor (iterate + collect keys) {scan_floor:6.1}   evict_idle {idle_none:6.1} [{:.2}x]   evict_unhealthy {unhealthy_none:6.1} [{:.2}x]",
            idle_none / scan_floor,
            unhealthy_none / scan_floor
        );
        println!(
            "    finds nothing, every connection marked by a get: evict_idle {idle_marked:6.1} [{:.2}x the floor]",
            idle_marked / scan_floor
        );
        println!(
            "    evicts all:    floor (collect, sort, remove) {remove_floor:6.1}   evict_idle {idle_all:6.1} [{:.2}x]   evict_unhealthy {unhealthy_all:6.1} [{:.2}x]",
            idle_all / remove_floor,
            unhealthy_all / remove_floor
        );
        println!(
            "    one sweep of all {n}: evict_idle {:.2} ms (finds nothing) / {:.2} ms (finds nothing, all marked) / {:.2} ms (evicts all)",
            idle_none * n as f64 / 1e6,
            idle_marked * n as f64 / 1e6,
            idle_all * n as f64 / 1e6
        );
    }
}

/// What runs beside the reader.
#[derive(Clone, Copy, Debug)]
enum Beside {
    Nothing,
    IdleSweepFindsNothing,
    HealthSweepFindsNothing,
    /// Inserts 10,000 more connections, marks them closed, and lets `evict_unhealthy` remove them.
    HealthSweepEvicting,
    /// The same inserts and removals without a sweep (`remove` one by one): what the writes alone
    /// cost the reader.
    WritesWithoutSweep,
    /// `WritesWithoutSweep` on a third thread while the second sweeps (idle, finds nothing): a
    /// writer queued behind a sweep's shard read lock must not hold readers up for long.
    WritesDuringIdleSweep,
}

/// One writer round: inserts the doomed connections, then removes them one by one.
fn churn(pool: &ConnectionPool<u64>, doomed: &[CheetahString]) {
    for (i, k) in doomed.iter().enumerate() {
        pool.insert(k.clone(), i as u64);
    }
    for k in doomed {
        pool.take_unclosed(k).expect("just inserted");
    }
}

fn reader_latency(rt: &tokio::runtime::Runtime) {
    let n = 100_000;
    let keys = addrs(n);
    let doomed: Vec<CheetahString> = addrs(n + 10_000).split_off(n);
    let pool = pool_with(&keys, Duration::from_secs(3600));
    println!(
        "\nget latency on one reader thread over {n} warm connections, {} ms per scenario, while another thread ...",
        READ_FOR.as_millis()
    );
    let mut baseline_p99 = None;
    for beside in [
        Beside::Nothing,
        Beside::IdleSweepFindsNothing,
        Beside::HealthSweepFindsNothing,
        Beside::HealthSweepEvicting,
        Beside::WritesWithoutSweep,
        Beside::WritesDuringIdleSweep,
    ] {
        let stop = AtomicBool::new(false);
        let rounds = AtomicU64::new(0);
        let mut samples = Vec::with_capacity(MAX_SAMPLES);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match beside {
                        Beside::Nothing => {
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        Beside::IdleSweepFindsNothing => {
                            assert_eq!(rt.block_on(pool.evict_idle()), 0);
                        }
                        Beside::HealthSweepFindsNothing => {
                            assert_eq!(rt.block_on(pool.evict_unhealthy()), 0);
                        }
                        Beside::HealthSweepEvicting => {
                            for (i, k) in doomed.iter().enumerate() {
                                let conn = pool.try_insert(k.clone(), i as u64).expect("room");
                                conn.mark_closed();
                            }
                            assert_eq!(rt.block_on(pool.evict_unhealthy()), doomed.len());
                        }
                        Beside::WritesWithoutSweep => churn(&pool, &doomed),
                        Beside::WritesDuringIdleSweep => {
                            assert_eq!(rt.block_on(pool.evict_idle()), 0);
                        }
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
            if matches!(beside, Beside::WritesDuringIdleSweep) {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        churn(&pool, &doomed);
                    }
                });
            }
            let mut walk = Scatter::new(n, 0, 1);
            let start = Instant::now();
            while samples.len() < MAX_SAMPLES && start.elapsed() < READ_FOR {
                for _ in 0..64 {
                    let key = &keys[walk.next_index()];
                    let t0 = Instant::now();
                    let hit = pool.get(key);
                    let ns = t0.elapsed().as_nanos() as u64;
                    assert!(hit.is_some(), "a warm connection went missing");
                    samples.push(ns);
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        let over_100us = samples.iter().filter(|&&ns| ns > 100_000).count();
        let p = Percentiles::of(&mut samples);
        let base = *baseline_p99.get_or_insert(p.p99);
        println!(
            "    {:<24} p50 {:5} ns  p99 {:6} ns [{:.2}x]  p99.9 {:7} ns  max {:6.1} ms  >100us: {:3} of {:7} gets  ({} rounds beside)",
            format!("{beside:?}"),
            p.p50,
            p.p99,
            p.p99 as f64 / base as f64,
            p.p999,
            p.max as f64 / 1e6,
            over_100us,
            p.count,
            rounds.load(Ordering::Relaxed)
        );
    }
}

/// The longest gap between two turns of a task that only yields, on a single-threaded runtime,
/// while `work` runs in another task of the same runtime (in ms). A sweep that never yields holds
/// its worker thread for its whole duration: every other task on that worker waits that long.
fn neighbour_gap_ms<Fut: Future<Output = ()>>(work: Fut) -> f64 {
    let rt = rt();
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let neighbour = tokio::spawn(async move {
            let mut last = Instant::now();
            let mut worst = Duration::ZERO;
            while !stop2.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
                let now = Instant::now();
                worst = worst.max(now - last);
                last = now;
            }
            worst
        });
        tokio::task::yield_now().await;
        work.await;
        tokio::task::yield_now().await;
        stop.store(true, Ordering::Relaxed);
        neighbour.await.expect("neighbour").as_secs_f64() * 1e3
    })
}

/// The CPU time of the calling thread: unlike wall time, it does not count the time the thread
/// waits for a core on a loaded machine.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Runs `work` to the end on a single-threaded runtime and returns the longest single poll of it in
/// the runtime thread's CPU time (ms): the most work it does before giving the thread back.
fn longest_poll_ms<Fut: Future<Output = ()>>(work: Fut) -> f64 {
    rt().block_on(async {
        let mut work = std::pin::pin!(work);
        let mut longest = Duration::ZERO;
        std::future::poll_fn(|cx| {
            let t0 = thread_cpu();
            let polled = work.as_mut().poll(cx);
            longest = longest.max(thread_cpu() - t0);
            polled
        })
        .await;
        longest.as_secs_f64() * 1e3
    })
}

/// The longest hold of the runtime thread during each sweep of 100,000, in the thread's CPU time
/// (ms): the longest single poll of the sweep.
fn longest_holds() {
    let n = 100_000;
    let keys = addrs(n);
    println!(
        "\nlongest hold of the runtime thread by a sweep of {n} (its longest poll, in the thread's CPU time), ms; median of {REPEATS}:"
    );
    let keep = pool_with(&keys, Duration::from_secs(3600));
    let held = |f: &dyn Fn() -> f64| median((0..REPEATS).map(|_| f()).collect());
    let idle_none = held(&|| {
        longest_poll_ms(async {
            assert_eq!(keep.evict_idle().await, 0);
        })
    });
    let unhealthy_none = held(&|| {
        longest_poll_ms(async {
            assert_eq!(keep.evict_unhealthy().await, 0);
        })
    });
    let prune_none = held(&|| {
        longest_poll_ms(async {
            assert_eq!(keep.prune_addresses().await, 0);
        })
    });
    drop(keep);
    let idle_all = held(&|| {
        let doomed = pool_with(&keys, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        longest_poll_ms(async {
            assert_eq!(doomed.evict_idle().await, n);
        })
    });
    let unhealthy_all = held(&|| {
        let closed = pool_with(&keys, Duration::from_secs(3600));
        for k in &keys {
            closed.peek(k).expect("pooled").mark_closed();
        }
        longest_poll_ms(async {
            assert_eq!(closed.evict_unhealthy().await, n);
        })
    });
    println!(
        "    finds nothing: evict_idle {idle_none:6.3}   evict_unhealthy {unhealthy_none:6.3}   prune_addresses {prune_none:6.3}"
    );
    println!("    evicts all:    evict_idle {idle_all:6.3}   evict_unhealthy {unhealthy_all:6.3}");
}

fn async_neighbours() {
    let n = 100_000;
    let keys = addrs(n);
    println!(
        "\nlongest hold of the runtime thread (the longest wait of another task on the same single-threaded runtime) while a sweep of {n} runs, ms:"
    );
    let base = neighbour_gap_ms(async { tokio::time::sleep(Duration::from_millis(20)).await });
    let keep = pool_with(&keys, Duration::from_secs(3600));
    let idle_none = neighbour_gap_ms(async {
        assert_eq!(keep.evict_idle().await, 0);
    });
    let unhealthy_none = neighbour_gap_ms(async {
        assert_eq!(keep.evict_unhealthy().await, 0);
    });
    let prune_none = neighbour_gap_ms(async {
        assert_eq!(keep.prune_addresses().await, 0);
    });
    // What the cleanup task runs each round (without probes, which are off by default).
    let round = neighbour_gap_ms(async {
        assert_eq!(keep.evict_idle().await, 0);
        assert_eq!(keep.evict_unhealthy().await, 0);
        assert_eq!(keep.prune_addresses().await, 0);
    });
    drop(keep);
    let doomed = pool_with(&keys, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(5));
    let idle_all = neighbour_gap_ms(async {
        assert_eq!(doomed.evict_idle().await, n);
    });
    let closed = pool_with(&keys, Duration::from_secs(3600));
    for k in &keys {
        closed.peek(k).expect("pooled").mark_closed();
    }
    let unhealthy_all = neighbour_gap_ms(async {
        assert_eq!(closed.evict_unhealthy().await, n);
    });
    println!("    no sweep (a 20 ms sleep instead) {base:6.2}");
    println!(
        "    finds nothing: evict_idle {idle_none:6.2}   evict_unhealthy {unhealthy_none:6.2}   prune_addresses {prune_none:6.2}   a cleanup round (all three) {round:6.2}"
    );
    println!("    evicts all:    evict_idle {idle_all:6.2}   evict_unhealthy {unhealthy_all:6.2}");
}

/// The evicts-all floor: collect the keys of a bare map, sort them, remove each.
#[inline(never)]
fn floor_remove_all(map: &DashMap<CheetahString, Arc<u64>>) {
    let mut ks: Vec<_> = map.iter().map(|e| e.key().clone()).collect();
    ks.sort_unstable();
    for k in &ks {
        black_box(map.remove(k));
    }
    assert!(map.is_empty());
}

/// One sweep of 100,000 and nothing else, for a profiler
/// (`SWEEPS_PROFILE=idle_none|idle_marked|idle_all|unhealthy_all|floor_all`):
/// `valgrind --tool=callgrind target/release/deps/sweeps-* --bench` with it set.
fn profile_one(rt: &tokio::runtime::Runtime, what: &str) {
    let n = 100_000;
    let keys = addrs(n);
    match what {
        "idle_none" => {
            let pool = pool_with(&keys, Duration::from_secs(3600));
            // `SWEEPS_PROFILE_REPEAT=N`: N sweeps, so that they outweigh the setup in a cycle
            // count (`perf stat -e cycles:u`), which a loaded machine disturbs less than a time.
            let repeat =
                std::env::var("SWEEPS_PROFILE_REPEAT").map_or(1, |n| n.parse().unwrap_or(1));
            for _ in 0..repeat {
                assert_eq!(rt.block_on(pool.evict_idle()), 0);
            }
        }
        "idle_marked" => {
            let pool = pool_with(&keys, Duration::from_secs(3600));
            for k in &keys {
                pool.get(k).expect("pooled");
            }
            assert_eq!(rt.block_on(pool.evict_idle()), 0);
        }
        "idle_all" => {
            let pool = pool_with(&keys, Duration::from_millis(1));
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(rt.block_on(pool.evict_idle()), n);
        }
        "unhealthy_all" => {
            let pool = pool_with(&keys, Duration::from_secs(3600));
            for k in &keys {
                pool.peek(k).expect("pooled").mark_closed();
            }
            assert_eq!(rt.block_on(pool.evict_unhealthy()), n);
        }
        // The evicts-all floor of part 1 (collect, sort, remove), to set instruction counts
        // against: `floor_remove_all` in the profile.
        "floor_all" => floor_remove_all(&floor_map(&keys)),
        other => panic!(
            "SWEEPS_PROFILE: idle_none, idle_marked, idle_all, unhealthy_all or floor_all, not {other:?}"
        ),
    }
}

fn main() {
    if !keyed_pool_benches::run_by_cargo_bench("sweeps") {
        return;
    }
    let rt = rt();
    if let Ok(what) = std::env::var("SWEEPS_PROFILE") {
        profile_one(&rt, &what);
        return;
    }
    // `SWEEPS_PARTS=13` runs parts 1 and 3 only (part 2 reads for 9 s).
    let parts = std::env::var("SWEEPS_PARTS").unwrap_or_else(|_| "123".into());
    if parts.contains('1') {
        sweep_costs(&rt);
    }
    if parts.contains('2') {
        reader_latency(&rt);
    }
    if parts.contains('3') {
        async_neighbours();
        longest_holds();
    }
}
