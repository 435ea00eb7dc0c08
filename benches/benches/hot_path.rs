//! The hot path, side by side with its floor and with single-target pools, in one process.
//!
//! - `get_hit/{floor,pool}/a{addrs}_t{threads}`: a hit on a warm pool against a raw
//!   `DashMap<CheetahString, Arc<_>>` lookup + clone (same shard count, same hasher).
//! - `get_hit/peek/...`: `peek` (no health check, no idle-clock touch), to split `get`'s cost;
//!   `get_hit/sketch/...`: the entry layout proposed in BENCHMARKS.md, to measure what it buys.
//! - `clock/tokio_instant_now`: one read of the runtime's clock.
//! - `call/pool/a{addrs}_t{threads}`: `get` + `begin()` + `success()`, against the bare `get` above.
//! - `get_hit/hyper_util/...`: hyper-util's composable keyed pool (`Map` of `Singleton`s, the same
//!   model as ours: one shared service per key), behind the mutex its `&mut self` API needs.
//! - `call/get_or_connect_hit/...`: `get_or_connect` on a hit with a connector that validates
//!   addresses as the TCP and remoting connectors do (what `remoting::pool_request` pays per request).
//! - `one_target/{keyed_pool_call,deadpool,bb8}/t{threads}`: one address; our shared handle against
//!   the exclusive checkout + return of deadpool (unmanaged) and bb8.
//!
//! Multi-threaded figures are the time per operation of one thread while all threads run the same
//! loop (see `run_threads`). At the end the ratios are printed from criterion's estimates.
//!
//! Run: `cargo bench -p keyed-pool-benches --bench hot_path -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::RandomState;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cheetah_string::CheetahString;
use criterion::{BenchmarkId, Criterion};
use dashmap::DashMap;
use hyper_util::client::pool::singleton::Singleton;
use keyed_pool::ConnectionPool;
use keyed_pool_benches::{
    MakeConn, NumberManager, Scatter, ValidatingConnector, addrs, criterion_dir, median,
    run_threads, run_threads_with,
};
use tower_service::Service;

const ADDRS: [usize; 3] = [1, 1_000, 100_000];
const THREADS: [usize; 3] = [1, 2, 4];
/// The pool's default shard amount; the floor map gets the same.
const SHARDS: usize = 32;

fn warm_pool(keys: &[CheetahString]) -> ConnectionPool<u64> {
    let pool = ConnectionPool::new(0, Duration::from_secs(3600));
    for (i, k) in keys.iter().enumerate() {
        assert!(pool.insert(k.clone(), i as u64));
    }
    pool
}

fn floor_map(keys: &[CheetahString]) -> DashMap<CheetahString, Arc<u64>> {
    let map = DashMap::with_hasher_and_shard_amount(RandomState::new(), SHARDS);
    for (i, k) in keys.iter().enumerate() {
        map.insert(k.clone(), Arc::new(i as u64));
    }
    map
}

/// A sketch of the entry layout proposed in BENCHMARKS.md, to measure what it would buy: the
/// health flags, a "used since the last sweep" bit and the metrics live in the same allocation as
/// the reference count (one cache line for `get`), and `get` reads no clock and writes nothing
/// when the bit is already set. The padding stands for the rest of the metrics, so the entry is
/// as large as today's entry and metrics together; `repr(C)` keeps the hot fields first, in the
/// reference count's cache line.
#[repr(C)]
struct SketchEntry {
    flags: AtomicU8,
    used: AtomicBool,
    conn: u64,
    _rest_of_metrics: [AtomicU64; 24],
}

fn sketch_get(
    map: &DashMap<CheetahString, Arc<SketchEntry>>,
    key: &CheetahString,
) -> Option<Arc<SketchEntry>> {
    let entry = map.get(key)?;
    let e = entry.value();
    if e.flags.load(Ordering::Acquire) != 0 {
        return None;
    }
    if !e.used.load(Ordering::Relaxed) {
        e.used.store(true, Ordering::Relaxed);
    }
    Some(Arc::clone(e))
}

fn sketch_map(keys: &[CheetahString]) -> DashMap<CheetahString, Arc<SketchEntry>> {
    let map = DashMap::with_hasher_and_shard_amount(RandomState::new(), SHARDS);
    for (i, k) in keys.iter().enumerate() {
        map.insert(
            k.clone(),
            Arc::new(SketchEntry {
                flags: AtomicU8::new(0),
                used: AtomicBool::new(false),
                conn: i as u64,
                _rest_of_metrics: Default::default(),
            }),
        );
    }
    map
}

/// hyper-util's keyed pool as its docs compose it: a `Map` from key to a `Singleton` that hands
/// out clones of one shared service. `Map::service` takes `&mut self`, so concurrent callers share
/// it behind a mutex. (Its type cannot be named, hence macros rather than functions.)
macro_rules! hyper_map {
    ($keys:expr) => {{
        let mut map = hyper_util::client::pool::map::Map::builder()
            .keys(|addr: &CheetahString| addr.clone())
            .values(|_addr: &CheetahString| Singleton::new(MakeConn))
            .build();
        for k in $keys {
            assert!(hyper_get!(&mut map, k).is_some(), "made at once");
        }
        Mutex::new(map)
    }};
}

/// A hit: the address's singleton hands out a clone of its one service, without waiting.
macro_rules! hyper_get {
    ($map:expr, $addr:expr) => {{
        let mut cx = Context::from_waker(Waker::noop());
        let svc = $map.service($addr);
        if svc.poll_ready(&mut cx).is_pending() {
            None
        } else {
            let mut fut = svc.call($addr.clone());
            match Pin::new(&mut fut).poll(&mut cx) {
                Poll::Ready(Ok(shared)) => Some(shared),
                _ => None,
            }
        }
    }};
}

fn get_hit_and_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_hit");
    let mut call_group_inputs = Vec::new();
    for n in ADDRS {
        let keys = addrs(n);
        let floor = floor_map(&keys);
        let pool = warm_pool(&keys);
        let sketch = sketch_map(&keys);
        let hyper = hyper_map!(&keys);
        for t in THREADS {
            let id = format!("a{n}_t{t}");
            group.bench_function(BenchmarkId::new("hyper_util", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            let key = &keys[walk.next_index()];
                            let mut map = hyper.lock().expect("not poisoned");
                            black_box(hyper_get!(&mut *map, key));
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::new("floor", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            let key = &keys[walk.next_index()];
                            black_box(floor.get(key).map(|e| Arc::clone(e.value())));
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::new("pool", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            black_box(pool.get(&keys[walk.next_index()]));
                        }
                    })
                })
            });
            group.bench_function(BenchmarkId::new("sketch", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            let hit = sketch_get(&sketch, &keys[walk.next_index()]);
                            black_box(hit.map(|e| e.conn));
                        }
                    })
                })
            });
            // `peek` is `get` without the health check and the idle-clock touch: the difference
            // between the two is what those cost.
            group.bench_function(BenchmarkId::new("peek", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            black_box(pool.peek(&keys[walk.next_index()]));
                        }
                    })
                })
            });
        }
        if n <= 1_000 {
            call_group_inputs.push((n, keys, pool));
        }
    }
    group.finish();

    // The runtime's clock, read once per `get` (and twice more per call).
    group_clock(c);
    let mut group = c.benchmark_group("call");
    for (n, keys, pool) in &call_group_inputs {
        let n = *n;
        let validating = ConnectionPool::builder()
            .connector(ValidatingConnector)
            .build::<u64>()
            .expect("valid config");
        for (i, k) in keys.iter().enumerate() {
            assert!(validating.insert(k.clone(), i as u64));
        }
        for t in THREADS {
            // `get_or_connect` on a hit, as `remoting::pool_request` makes it on every request.
            group.bench_function(
                BenchmarkId::new("get_or_connect_hit", format!("a{n}_t{t}")),
                |b| {
                    b.iter_custom(|iters| {
                        run_threads(t, iters, |tid, iters| {
                            let mut walk = Scatter::new(n, tid, t);
                            for _ in 0..iters {
                                let key = &keys[walk.next_index()];
                                black_box(ready_now(validating.get_or_connect(key)).expect("hit"));
                            }
                        })
                    })
                },
            );
            group.bench_function(BenchmarkId::new("pool", format!("a{n}_t{t}")), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |tid, iters| {
                        let mut walk = Scatter::new(n, tid, t);
                        for _ in 0..iters {
                            let conn = pool.get(&keys[walk.next_index()]).expect("warm");
                            let call = conn.begin();
                            black_box(conn.client());
                            call.success();
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

fn group_clock(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    group.finish();
}

/// Polls a future once; a pool hit never waits.
fn ready_now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a hit never waits"),
    }
}

fn one_target(c: &mut Criterion) {
    let mut group = c.benchmark_group("one_target");
    let keys = addrs(1);
    let pool = warm_pool(&keys);
    for t in THREADS {
        let id = format!("t{t}");
        group.bench_function(BenchmarkId::new("keyed_pool_call", &id), |b| {
            b.iter_custom(|iters| {
                run_threads(t, iters, |_, iters| {
                    for _ in 0..iters {
                        let conn = pool.get(&keys[0]).expect("warm");
                        let call = conn.begin();
                        black_box(conn.client());
                        call.success();
                    }
                })
            })
        });

        // deadpool's unmanaged pool with one object per thread: `try_get` never finds it empty.
        let dead: deadpool::unmanaged::Pool<u64> = deadpool::unmanaged::Pool::new(t);
        for i in 0..t {
            dead.try_add(i as u64)
                .expect("room for one object per thread");
        }
        group.bench_function(BenchmarkId::new("deadpool", &id), |b| {
            b.iter_custom(|iters| {
                run_threads(t, iters, |_, iters| {
                    for _ in 0..iters {
                        let obj = dead.try_get().expect("one object per thread");
                        black_box(*obj);
                    }
                })
            })
        });

        // bb8 with one connection per thread, no reaper, no check on checkout (our `get` only
        // runs the connector's cheap `is_open`, which bb8's `has_broken` matches and still runs).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let bb = rt
            .block_on(
                bb8::Pool::builder()
                    .max_size(u32::try_from(t).expect("small"))
                    .min_idle(Some(u32::try_from(t).expect("small")))
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .test_on_check_out(false)
                    .build(NumberManager),
            )
            .expect("bb8 pool");
        group.bench_function(BenchmarkId::new("bb8", &id), |b| {
            b.iter_custom(|iters| {
                run_threads_with(
                    t,
                    iters,
                    |_| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                            .expect("runtime")
                    },
                    |rt, _, iters| {
                        rt.block_on(async {
                            for _ in 0..iters {
                                let conn = bb.get().await.expect("one connection per thread");
                                black_box(*conn);
                            }
                        });
                    },
                )
            })
        });
        drop(bb);
        drop(rt);
    }
    group.finish();
}

/// Criterion's estimate (slope if fitted, else mean) of one benchmark of this run, in ns.
fn estimate(group: &str, function: &str, param: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(function)
        .join(param)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pick = |k: &str| json.get(k)?.get("point_estimate")?.as_f64();
    pick("slope").or_else(|| pick("mean"))
}

fn print_ratios() {
    let mut rows: BTreeMap<(usize, usize, usize), String> = BTreeMap::new();
    println!("\n== ratios (criterion estimates of this run; ns per operation per thread) ==");
    println!("get hit vs floor (goal <= 1.3x):");
    for (order, n) in ADDRS.iter().enumerate() {
        for t in THREADS {
            let id = format!("a{n}_t{t}");
            if let (Some(f), Some(p)) = (
                estimate("get_hit", "floor", &id),
                estimate("get_hit", "pool", &id),
            ) {
                let vs_floor = |name: &str| {
                    estimate("get_hit", name, &id)
                        .map_or("-".to_string(), |k| format!("{k:6.1} ns ({:.2}x)", k / f))
                };
                rows.insert(
                    (0, order, t),
                    format!(
                        "  addrs={n:>6} threads={t}: floor {f:6.1} ns  get {p:6.1} ns  ratio {:.2}x   (peek {}, sketch {}, hyper-util map+singleton {})",
                        p / f,
                        vs_floor("peek"),
                        vs_floor("sketch"),
                        vs_floor("hyper_util")
                    ),
                );
            }
        }
    }
    println!("{}", rows.values().cloned().collect::<Vec<_>>().join("\n"));
    if let Some(clock) = estimate("clock", "tokio_instant_now", "") {
        println!("  (one read of the runtime clock: {clock:.1} ns)");
    }
    println!("full call (get+begin+success) vs bare get (goal <= 2x):");
    for n in [1, 1_000] {
        for t in THREADS {
            let id = format!("a{n}_t{t}");
            if let (Some(g), Some(c)) = (
                estimate("get_hit", "pool", &id),
                estimate("call", "pool", &id),
            ) {
                let goc = estimate("call", "get_or_connect_hit", &id)
                    .map_or("-".to_string(), |x| format!("{x:7.1} ns ({:.2}x)", x / g));
                println!(
                    "  addrs={n:>6} threads={t}: get {g:7.1} ns  call {c:7.1} ns  ratio {:.2}x   (get_or_connect hit {goc})",
                    c / g
                );
            }
        }
    }
    println!("one target: peers vs our full call (ratio = peer / ours):");
    for t in THREADS {
        let id = format!("t{t}");
        if let Some(ours) = estimate("one_target", "keyed_pool_call", &id) {
            let peer = |name: &str| {
                estimate("one_target", name, &id).map_or("-".to_string(), |p| {
                    format!("{p:7.1} ns ({:.2}x)", p / ours)
                })
            };
            println!(
                "  threads={t}: keyed-pool call {ours:7.1} ns  deadpool {}  bb8 {}",
                peer("deadpool"),
                peer("bb8")
            );
        }
    }
}

/// Runs the variants in alternation, `ROUNDS` times, each for about `SLICE`, and returns for each
/// variant the median over rounds of its time divided by variant 0's time in the same round. Load
/// from other processes that drifts over seconds hits both sides of each ratio alike.
fn interleaved(threads: usize, variants: &[&(dyn Fn(usize, u64) + Sync)]) -> Vec<f64> {
    const ROUNDS: usize = 15;
    const SLICE: Duration = Duration::from_millis(15);
    let probe = run_threads(threads, 10_000, variants[0]);
    let iters =
        (10_000.0 * SLICE.as_secs_f64() / probe.as_secs_f64().max(1e-9)).max(1_000.0) as u64;
    let mut ratios = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        let times: Vec<f64> = variants
            .iter()
            .map(|v| run_threads(threads, iters, v).as_secs_f64())
            .collect();
        for (i, t) in times.iter().enumerate() {
            ratios[i].push(t / times[0]);
        }
    }
    ratios.into_iter().map(median).collect()
}

/// The same comparisons as the criterion groups, interleaved (see [`interleaved`]).
fn interleaved_ratios() {
    println!(
        "\n== interleaved ratios (median over 15 alternating rounds of ~15 ms each; robust to drifting load) =="
    );
    println!(
        "get hit / floor (goal <= 1.3x), with peek, the sketch and hyper-util's map + singleton / floor:"
    );
    let mut call_rows = Vec::new();
    for n in ADDRS {
        let keys = addrs(n);
        let floor = floor_map(&keys);
        let pool = warm_pool(&keys);
        let sketch = sketch_map(&keys);
        let hyper = hyper_map!(&keys);
        let validating = ConnectionPool::builder()
            .connector(ValidatingConnector)
            .build::<u64>()
            .expect("valid config");
        if n <= 1_000 {
            for (i, k) in keys.iter().enumerate() {
                assert!(validating.insert(k.clone(), i as u64));
            }
        }
        for t in THREADS {
            let hyper_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    let key = &keys[walk.next_index()];
                    let mut map = hyper.lock().expect("not poisoned");
                    black_box(hyper_get!(&mut *map, key));
                }
            };
            let floor_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    let key = &keys[walk.next_index()];
                    black_box(floor.get(key).map(|e| Arc::clone(e.value())));
                }
            };
            let get_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    black_box(pool.get(&keys[walk.next_index()]));
                }
            };
            let peek_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    black_box(pool.peek(&keys[walk.next_index()]));
                }
            };
            let sketch_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    black_box(sketch_get(&sketch, &keys[walk.next_index()]).map(|e| e.conn));
                }
            };
            let call_v = |tid: usize, iters: u64| {
                let mut walk = Scatter::new(n, tid, t);
                for _ in 0..iters {
                    let conn = pool.get(&keys[walk.next_index()]).expect("warm");
                    let call = conn.begin();
                    black_box(conn.client());
                    call.success();
                }
            };
            let r = interleaved(t, &[&floor_v, &get_v, &peek_v, &sketch_v, &hyper_v]);
            println!(
                "  addrs={n:>6} threads={t}: get {:.2}x {}  peek {:.2}x  sketch {:.2}x  hyper-util {:.2}x",
                r[1],
                if r[1] <= 1.3 { "(met)" } else { "(NOT met)" },
                r[2],
                r[3],
                r[4]
            );
            if n <= 1_000 {
                let goc_v = |tid: usize, iters: u64| {
                    let mut walk = Scatter::new(n, tid, t);
                    for _ in 0..iters {
                        let key = &keys[walk.next_index()];
                        black_box(ready_now(validating.get_or_connect(key)).expect("hit"));
                    }
                };
                let r = interleaved(t, &[&get_v, &call_v, &goc_v]);
                call_rows.push(format!(
                    "  addrs={n:>6} threads={t}: call {:.2}x {}   get_or_connect hit {:.2}x",
                    r[1],
                    if r[1] <= 2.0 { "(met)" } else { "(NOT met)" },
                    r[2]
                ));
            }
        }
    }
    println!(
        "full call (get + begin + success) / bare get (goal <= 2x), and get_or_connect on a hit / get:"
    );
    println!("{}", call_rows.join("\n"));
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    get_hit_and_call(&mut c);
    one_target(&mut c);
    c.final_summary();
    print_ratios();
    if keyed_pool_benches::is_full_bench_run() {
        interleaved_ratios();
    }
}
