//! Exclusive checkout (issue 13): checkout + return, side by side with the single-target pools and
//! with a keyed pool built from deadpool, in one process.
//!
//! - `checkout/one_key/{keyed_pool,keyed_pool_novalidate,deadpool_managed,deadpool_unmanaged,bb8}/t{threads}`: one
//!   address; each pool warmed with one connection per thread, so a checkout never waits. Ours
//!   with a connector that validates addresses as the TCP connector does (`DefaultConnector`);
//!   `keyed_pool_novalidate` is the same pool with a connector that validates nothing, to show
//!   what that part costs. deadpool managed (a manager makes the connections and `recycle`s each
//!   one before handing it out: the same jobs as our connector and our fitness check) is the fair
//!   peer; unmanaged (a bare object pool: no making, no check, no metrics) is the floor of an
//!   exclusive pool. bb8 without `test_on_check_out` and without a reaper.
//! - `checkout/keys1000/{keyed_pool,hashmap_of_deadpool}/t{threads}`: 1,000 addresses, each warmed
//!   with one connection per thread, checkouts scattered over them; the peer is how a keyed pool
//!   is built from deadpool today: a `HashMap<CheetahString, deadpool::managed::Pool>` filled in
//!   advance and only read (a lower bound for it: a real one also needs a lock, or a concurrent
//!   map, to add addresses as they come, and has no cap across addresses).
//!
//! Every variant runs the same loop, `checkout().await` + drop, in a current-thread tokio runtime of
//! its own per thread (bb8 and deadpool's `get` are async too; none of them waits here). The figure
//! is the time per checkout + return of one thread while all threads run (see `run_threads`). At
//! the end the ratios to our checkout are printed from criterion's estimates, then (on a full run)
//! an interleaved check of the same ratios, robust to load that drifts over seconds, in wall time
//! and in each thread's CPU time (which leaves out the time a thread waited for a core: on a
//! shared machine the steadier figure).
//!
//! Run: `cargo bench -p keyed-pool-benches --bench checkout -- --warm-up-time 1 --measurement-time 3`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cheetah_string::CheetahString;
use criterion::{BenchmarkId, Criterion};
use keyed_pool::{ConnectionPool, Connector};
use keyed_pool_benches::{
    DefaultConnector, FixedManager, NumberManager, Scatter, addrs, criterion_dir, median,
    run_threads_with, warm_deadpool,
};
use tokio::runtime::Runtime;

const THREADS: [usize; 2] = [1, 2];
const KEYS: usize = 1_000;

type Ours = ConnectionPool<u64, DefaultConnector<u64>>;
type DeadManaged = deadpool::managed::Pool<FixedManager<u64>>;

/// A connector that validates nothing (the trait's default), to split the validation's cost off.
struct NoValidate;

impl Connector for NoValidate {
    type Conn = u64;
    type Error = std::convert::Infallible;

    async fn connect(&self, _addr: &str) -> Result<u64, Self::Error> {
        Ok(0)
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// The time per `iters` operations of one thread (mean over the threads): wall time, and the
/// thread's CPU time, which leaves out the time it waited for a core on a loaded machine (but also
/// the time it was blocked: none of these loops blocks, since no checkout waits).
#[derive(Clone, Copy, Debug)]
struct Times {
    wall: Duration,
    cpu: Duration,
}

/// The CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Runs `work` on `threads` threads, each in a current-thread runtime built before the timed region.
fn run_async<W, F>(threads: usize, iters: u64, work: W) -> Times
where
    W: Fn(usize, u64) -> F + Sync,
    F: Future<Output = ()>,
{
    let cpu_ns = AtomicU64::new(0);
    let wall = run_threads_with(
        threads,
        iters,
        |_| runtime(),
        |rt, tid, iters| {
            let start = thread_cpu();
            rt.block_on(work(tid, iters));
            let spent = u64::try_from((thread_cpu() - start).as_nanos()).unwrap_or(u64::MAX);
            cpu_ns.fetch_add(spent, Ordering::Relaxed);
        },
    );
    let threads = u64::try_from(threads).expect("a few threads");
    Times {
        wall,
        cpu: Duration::from_nanos(cpu_ns.into_inner() / threads),
    }
}

/// Our pool, with `per_key` idle connections on each of `keys` (made by holding that many
/// checkouts of the address at once, then dropping them).
fn warm_ours<K: Connector<Conn = u64>>(
    connector: K,
    keys: &[CheetahString],
    per_key: usize,
) -> ConnectionPool<u64, K> {
    let pool = ConnectionPool::builder()
        .connector(connector)
        .max_per_address(per_key)
        .build()
        .expect("valid config");
    runtime().block_on(async {
        for k in keys {
            let mut held = Vec::with_capacity(per_key);
            for _ in 0..per_key {
                held.push(pool.checkout(k).await.expect("an instant connect"));
            }
        }
    });
    let stats = pool.stats();
    assert_eq!(
        (stats.idle, stats.checked_out),
        (keys.len() * per_key, 0),
        "every address has {per_key} idle connections"
    );
    pool
}

/// `iters` checkouts + returns per thread on our pool, scattered over `keys`.
fn ours_loop<K: Connector<Conn = u64>>(
    pool: &ConnectionPool<u64, K>,
    keys: &[CheetahString],
    threads: usize,
    iters: u64,
) -> Times {
    run_async(threads, iters, |tid, iters| async move {
        let mut walk = Scatter::new(keys.len(), tid, threads);
        for _ in 0..iters {
            let conn = pool.checkout(&keys[walk.next_index()]).await;
            black_box(*conn.expect("warm: a checkout never waits"));
        }
    })
}

/// The same on a keyed deadpool: a map of managed pools, looked up, then checked out.
fn deadpool_map_loop(
    map: &HashMap<CheetahString, DeadManaged>,
    keys: &[CheetahString],
    threads: usize,
    iters: u64,
) -> Times {
    run_async(threads, iters, |tid, iters| async move {
        let mut walk = Scatter::new(keys.len(), tid, threads);
        for _ in 0..iters {
            let pool = map.get(&keys[walk.next_index()]).expect("every key");
            black_box(*pool.get().await.expect("warm"));
        }
    })
}

fn deadpool_managed_loop(pool: &DeadManaged, threads: usize, iters: u64) -> Times {
    run_async(threads, iters, |_, iters| async move {
        for _ in 0..iters {
            black_box(*pool.get().await.expect("warm"));
        }
    })
}

fn deadpool_unmanaged_loop(
    pool: &deadpool::unmanaged::Pool<u64>,
    threads: usize,
    iters: u64,
) -> Times {
    run_async(threads, iters, |_, iters| async move {
        for _ in 0..iters {
            black_box(*pool.get().await.expect("one per thread"));
        }
    })
}

fn bb8_loop(pool: &bb8::Pool<NumberManager>, threads: usize, iters: u64) -> Times {
    run_async(threads, iters, |_, iters| async move {
        for _ in 0..iters {
            black_box(*pool.get().await.expect("one per thread"));
        }
    })
}

/// deadpool's unmanaged pool with one object per thread.
fn unmanaged_pool(threads: usize) -> deadpool::unmanaged::Pool<u64> {
    let pool = deadpool::unmanaged::Pool::new(threads);
    for i in 0..threads {
        pool.try_add(i as u64).expect("room for one per thread");
    }
    pool
}

fn one_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkout/one_key");
    let keys = addrs(1);
    let rt = runtime();
    for t in THREADS {
        let id = format!("t{t}");
        let ours: Ours = warm_ours(DefaultConnector::default(), &keys, t);
        group.bench_function(BenchmarkId::new("keyed_pool", &id), |b| {
            b.iter_custom(|iters| ours_loop(&ours, &keys, t, iters).wall)
        });
        drop(ours);
        let plain = warm_ours(NoValidate, &keys, t);
        group.bench_function(BenchmarkId::new("keyed_pool_novalidate", &id), |b| {
            b.iter_custom(|iters| ours_loop(&plain, &keys, t, iters).wall)
        });
        drop(plain);
        let managed = warm_deadpool(&rt, &keys[0], t);
        group.bench_function(BenchmarkId::new("deadpool_managed", &id), |b| {
            b.iter_custom(|iters| deadpool_managed_loop(&managed, t, iters).wall)
        });
        drop(managed);
        let unmanaged = unmanaged_pool(t);
        group.bench_function(BenchmarkId::new("deadpool_unmanaged", &id), |b| {
            b.iter_custom(|iters| deadpool_unmanaged_loop(&unmanaged, t, iters).wall)
        });
        drop(unmanaged);
        let bb = bb8_pool(&rt, t);
        group.bench_function(BenchmarkId::new("bb8", &id), |b| {
            b.iter_custom(|iters| bb8_loop(&bb, t, iters).wall)
        });
        drop(bb);
    }
    group.finish();
}

/// bb8 with one connection per thread, made up front; no reaper, no check on checkout (its
/// `has_broken` still runs on return, as our connector's `is_open` does).
fn bb8_pool(rt: &Runtime, threads: usize) -> bb8::Pool<NumberManager> {
    let n = u32::try_from(threads).expect("a few threads");
    rt.block_on(
        bb8::Pool::builder()
            .max_size(n)
            .min_idle(Some(n))
            .idle_timeout(None)
            .max_lifetime(None)
            .test_on_check_out(false)
            .build(NumberManager),
    )
    .expect("bb8 pool")
}

fn keys1000(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkout/keys1000");
    let keys = addrs(KEYS);
    let rt = runtime();
    for t in THREADS {
        let id = format!("t{t}");
        let ours: Ours = warm_ours(DefaultConnector::default(), &keys, t);
        group.bench_function(BenchmarkId::new("keyed_pool", &id), |b| {
            b.iter_custom(|iters| ours_loop(&ours, &keys, t, iters).wall)
        });
        drop(ours);
        let map = deadpool_map(&rt, &keys, t);
        group.bench_function(BenchmarkId::new("hashmap_of_deadpool", &id), |b| {
            b.iter_custom(|iters| deadpool_map_loop(&map, &keys, t, iters).wall)
        });
    }
    group.finish();
}

/// A keyed deadpool: one managed pool per address, each with `per_key` idle objects.
fn deadpool_map(
    rt: &Runtime,
    keys: &[CheetahString],
    per_key: usize,
) -> HashMap<CheetahString, DeadManaged> {
    keys.iter()
        .map(|k| (k.clone(), warm_deadpool(rt, k, per_key)))
        .collect()
}

/// Criterion's estimate (slope if fitted, else mean) of one benchmark of this run, in ns.
fn estimate(group: &str, function: &str, param: &str) -> Option<f64> {
    // Criterion makes a group's name safe for a directory name: `/` becomes `_`.
    let path = criterion_dir()
        .join(group.replace('/', "_"))
        .join(function)
        .join(param)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pick = |k: &str| json.get(k)?.get("point_estimate")?.as_f64();
    pick("slope").or_else(|| pick("mean"))
}

fn print_ratios() {
    println!(
        "\n== ratios (criterion estimates of this run; ns per checkout + return per thread; ratio = peer / ours) =="
    );
    let groups: [(&str, &[&str]); 2] = [
        (
            "checkout/one_key",
            &[
                "keyed_pool_novalidate",
                "deadpool_managed",
                "deadpool_unmanaged",
                "bb8",
            ],
        ),
        ("checkout/keys1000", &["hashmap_of_deadpool"]),
    ];
    for (group, peers) in groups {
        for t in THREADS {
            let id = format!("t{t}");
            let Some(ours) = estimate(group, "keyed_pool", &id) else {
                continue;
            };
            let cells: Vec<String> = peers
                .iter()
                .map(|p| {
                    estimate(group, p, &id).map_or(format!("{p} -"), |x| {
                        format!("{p} {x:6.1} ns ({:.2}x)", x / ours)
                    })
                })
                .collect();
            println!(
                "  {group} threads={t}: keyed_pool {ours:6.1} ns   {}",
                cells.join("   ")
            );
        }
    }
}

/// Runs the variants in alternation, `ROUNDS` times, each for about `SLICE`, and returns for each
/// variant the median over rounds of its time divided by variant 0's time in the same round, in
/// wall time and in CPU time, with variant 0's median time per operation. Load from other
/// processes that drifts over seconds hits both sides of each ratio alike; CPU time leaves out the
/// waits for a core. A variant runs `iters` checkouts per thread.
fn interleaved(variants: &[&dyn Fn(u64) -> Times]) -> (Vec<f64>, Vec<f64>, Times) {
    const ROUNDS: usize = 15;
    const SLICE: Duration = Duration::from_millis(15);
    let probe = variants[0](10_000).wall;
    let iters =
        (10_000.0 * SLICE.as_secs_f64() / probe.as_secs_f64().max(1e-9)).max(1_000.0) as u64;
    let mut wall = vec![Vec::with_capacity(ROUNDS); variants.len()];
    let mut cpu = vec![Vec::with_capacity(ROUNDS); variants.len()];
    let (mut base_wall, mut base_cpu) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let times: Vec<Times> = variants.iter().map(|v| v(iters)).collect();
        for (i, t) in times.iter().enumerate() {
            wall[i].push(t.wall.as_secs_f64() / times[0].wall.as_secs_f64());
            cpu[i].push(t.cpu.as_secs_f64() / times[0].cpu.as_secs_f64());
        }
        base_wall.push(times[0].wall.as_secs_f64() / iters as f64);
        base_cpu.push(times[0].cpu.as_secs_f64() / iters as f64);
    }
    let wall: Vec<f64> = wall.into_iter().map(median).collect();
    let cpu: Vec<f64> = cpu.into_iter().map(median).collect();
    let base = Times {
        wall: Duration::from_secs_f64(median(base_wall)),
        cpu: Duration::from_secs_f64(median(base_cpu)),
    };
    (wall, cpu, base)
}

/// One line of ratios: each peer's wall-time ratio, then its CPU-time ratio.
fn ratio_line(what: &str, names: &[&str], (wall, cpu, base): (Vec<f64>, Vec<f64>, Times)) {
    let cells: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n} {:.2}x / {:.2}x", wall[i + 1], cpu[i + 1]))
        .collect();
    println!(
        "  {what}: keyed_pool {:.0} / {:.0} ns   {}",
        base.wall.as_secs_f64() * 1e9,
        base.cpu.as_secs_f64() * 1e9,
        cells.join("   ")
    );
}

/// The same comparisons as the criterion groups, interleaved (see [`interleaved`]).
fn interleaved_ratios() {
    println!(
        "\n== interleaved, peer / ours, wall time / thread CPU time (median over 15 alternating rounds of ~15 ms each; ours in ns per checkout + return) =="
    );
    let rt = runtime();
    let keys = addrs(1);
    for t in THREADS {
        let ours: Ours = warm_ours(DefaultConnector::default(), &keys, t);
        let plain = warm_ours(NoValidate, &keys, t);
        let managed = warm_deadpool(&rt, &keys[0], t);
        let unmanaged = unmanaged_pool(t);
        let bb = bb8_pool(&rt, t);
        let r = interleaved(&[
            &|iters| ours_loop(&ours, &keys, t, iters),
            &|iters| ours_loop(&plain, &keys, t, iters),
            &|iters| deadpool_managed_loop(&managed, t, iters),
            &|iters| deadpool_unmanaged_loop(&unmanaged, t, iters),
            &|iters| bb8_loop(&bb, t, iters),
        ]);
        ratio_line(
            &format!("one key, threads={t}"),
            &[
                "keyed_pool_novalidate",
                "deadpool_managed",
                "deadpool_unmanaged",
                "bb8",
            ],
            r,
        );
    }
    let keys = addrs(KEYS);
    for t in THREADS {
        let ours: Ours = warm_ours(DefaultConnector::default(), &keys, t);
        let map = deadpool_map(&rt, &keys, t);
        let r = interleaved(&[&|iters| ours_loop(&ours, &keys, t, iters), &|iters| {
            deadpool_map_loop(&map, &keys, t, iters)
        }]);
        ratio_line(
            &format!("{KEYS} keys, threads={t}"),
            &["hashmap_of_deadpool"],
            r,
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    one_key(&mut c);
    keys1000(&mut c);
    c.final_summary();
    print_ratios();
    if keyed_pool_benches::is_full_bench_run() {
        interleaved_ratios();
    }
}
