//! Instruction counts of the hot path under valgrind's callgrind (gungraun), gated in CI: counts are
//! repeatable on a shared machine where times are not. `scripts/instructions.sh` runs this bench,
//! compares each count with its record in `benches/instructions.toml`, and fails when one grew more
//! than 5 %; `scripts/instructions.sh --record` rewrites the records (BENCHMARKS.md, "Instruction
//! counts (CI gate)").
//!
//! Every benchmark runs [`OPS`] operations on a map filled by its setup (not counted), walking
//! [`OPS`] of its addresses in a scattered order computed by the setup too. Many operations per
//! count, because a `DashMap` seeds its hasher at random: one lookup's probe length, and so its
//! count, changes from run to run, while the mean over a thousand addresses does not. The per-op
//! figure (count / [`OPS`]) includes the loop, a few instructions, for the floor too.
//!
//! - `floor`: `DashMap<CheetahString, Arc<u64>>` get + clone, the floor of a keyed lookup (same
//!   shard count as the pool's map, std's default hasher, SipHash-1-3, as issue 16 defines it).
//! - `floor_fold_get`: the same with the pool's own hasher (foldhash): the floor of a lookup in
//!   the pool's map, so `get_hit` over it is what the pool adds beyond the lookup.
//! - `get_hit`: `ConnectionPool::get` on a warm pool.
//! - `call_by_hand`: `get` + `begin()` + `success()`, a call recorded by hand.
//! - `pool_call`: `pool.call(addr, f).run()` on a hit, `f` ready at once: what a call costs through
//!   the pool's own API (its `get_or_connect`, the guard, the outcome).
//! - `get_or_connect_hit`: `get_or_connect` on a hit, with a connector that validates addresses as
//!   the TCP and remoting connectors do.
//! - `checkout_hit`: `checkout` + return (issue 13) on an address with an idle exclusive
//!   connection, same connector; at 1 and 1,000 addresses only (its setup connects each address
//!   on a runtime, slow under valgrind at 100,000).
//!
//! Each at 1, 1,000 and 100,000 addresses (the floor too, so the ratio comes from one run).
//!
//! Run: `bash scripts/instructions.sh` (installs valgrind and gungraun-runner when missing).

use std::future::Future;
use std::hash::RandomState;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cheetah_string::CheetahString;
use dashmap::DashMap;
use gungraun::{
    Callgrind, EventKind, LibraryBenchmarkConfig, library_benchmark, library_benchmark_group, main,
};
use keyed_pool::ConnectionPool;
use keyed_pool_benches::{Scatter, ValidatingConnector, addrs, fold_hasher};

/// Operations per benchmark; `scripts/instructions.sh` reads this line to print counts per op.
const OPS: usize = 1_000;
/// The pool's default shard amount; the floor map gets the same.
const SHARDS: usize = 32;

/// A filled map and the addresses to look up, in the order the benchmark walks them.
struct Fixture<M> {
    map: M,
    walk: Vec<CheetahString>,
}

/// `OPS` of the `keys`, scattered (so consecutive lookups do not hit neighbouring keys), repeated
/// when there are fewer keys than operations.
fn walk(keys: &[CheetahString]) -> Vec<CheetahString> {
    let mut scatter = Scatter::new(keys.len(), 0, 1);
    (0..OPS)
        .map(|_| keys[scatter.next_index()].clone())
        .collect()
}

type FloorMap<S = RandomState> = DashMap<CheetahString, Arc<u64>, S>;

fn floor(n: usize) -> Fixture<FloorMap> {
    floor_with(n, RandomState::new())
}

fn floor_fold(n: usize) -> Fixture<FloorMap<foldhash::fast::FixedState>> {
    floor_with(n, fold_hasher())
}

fn floor_with<S: std::hash::BuildHasher + Clone>(n: usize, hasher: S) -> Fixture<FloorMap<S>> {
    let keys = addrs(n);
    let map = DashMap::with_hasher_and_shard_amount(hasher, SHARDS);
    for (i, k) in keys.iter().enumerate() {
        map.insert(k.clone(), Arc::new(i as u64));
    }
    Fixture {
        map,
        walk: walk(&keys),
    }
}

/// A pool filled by hand, as `hot_path`'s `get_hit` uses it; one pass of `get`s first, so nothing
/// lazily set up on a first use is counted.
fn warm_pool(n: usize) -> Fixture<ConnectionPool<u64>> {
    let keys = addrs(n);
    let pool = ConnectionPool::new(0, Duration::from_secs(3600));
    for (i, k) in keys.iter().enumerate() {
        assert!(pool.insert(k.clone(), i as u64));
    }
    let walk = walk(&keys);
    for k in &walk {
        // One call each: a connection's first success allocates its latency histogram (once in
        // its life), which would otherwise be counted in every call at 1,000 and 100,000
        // addresses, where each connection sees one call per pass.
        pool.get(k).expect("warm").begin().success();
    }
    Fixture { map: pool, walk }
}

type ConnectingPool = ConnectionPool<u64, ValidatingConnector>;

/// A pool with a connector, filled by hand, warmed by one call per connection (see [`warm_pool`]).
fn connecting_pool(n: usize) -> Fixture<ConnectingPool> {
    let keys = addrs(n);
    let pool = ConnectionPool::builder()
        .connector(ValidatingConnector)
        .build::<u64>()
        .expect("valid config");
    for (i, k) in keys.iter().enumerate() {
        assert!(pool.insert(k.clone(), i as u64));
    }
    let walk = walk(&keys);
    for k in &walk {
        let conn = ready_now(pool.get_or_connect(k)).expect("warm");
        conn.begin().success();
    }
    Fixture { map: pool, walk }
}

/// A pool with one idle exclusive connection per address, and the runtime that connected them
/// (kept alive: the pool's connect tasks ran on it; a hit spawns nothing).
struct CheckoutFixture {
    pool: ConnectingPool,
    walk: Vec<CheetahString>,
    _rt: tokio::runtime::Runtime,
}

fn checkout_pool(n: usize) -> CheckoutFixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let keys = addrs(n);
    let pool = rt.block_on(async {
        let pool = ConnectionPool::builder()
            .connector(ValidatingConnector)
            .build::<u64>()
            .expect("valid config");
        for k in &keys {
            // Connected and returned: idle, its first call recorded (see `warm_pool`).
            pool.checkout(k).await.expect("connects").begin().success();
        }
        pool
    });
    let walk = walk(&keys);
    for k in &walk {
        drop(ready_now(pool.checkout(k)).expect("warm"));
    }
    CheckoutFixture {
        pool,
        walk,
        _rt: rt,
    }
}

/// Polls a future once; a pool hit never waits.
fn ready_now<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a hit never waits"),
    }
}

// Each benchmark returns its fixture, so dropping the map is not counted.

#[library_benchmark]
#[bench::a1(args = (1), setup = floor)]
#[bench::a1000(args = (1_000), setup = floor)]
#[bench::a100000(args = (100_000), setup = floor)]
fn floor_get(f: Fixture<FloorMap>) -> Fixture<FloorMap> {
    for k in &f.walk {
        black_box(f.map.get(k).map(|e| Arc::clone(e.value())));
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = floor_fold)]
#[bench::a1000(args = (1_000), setup = floor_fold)]
#[bench::a100000(args = (100_000), setup = floor_fold)]
fn floor_fold_get(
    f: Fixture<FloorMap<foldhash::fast::FixedState>>,
) -> Fixture<FloorMap<foldhash::fast::FixedState>> {
    for k in &f.walk {
        black_box(f.map.get(k).map(|e| Arc::clone(e.value())));
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = warm_pool)]
#[bench::a1000(args = (1_000), setup = warm_pool)]
#[bench::a100000(args = (100_000), setup = warm_pool)]
fn get_hit(f: Fixture<ConnectionPool<u64>>) -> Fixture<ConnectionPool<u64>> {
    for k in &f.walk {
        black_box(f.map.get(k));
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = warm_pool)]
#[bench::a1000(args = (1_000), setup = warm_pool)]
#[bench::a100000(args = (100_000), setup = warm_pool)]
fn call_by_hand(f: Fixture<ConnectionPool<u64>>) -> Fixture<ConnectionPool<u64>> {
    for k in &f.walk {
        let conn = f.map.get(k).expect("warm");
        let call = conn.begin();
        black_box(conn.client());
        call.success();
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = connecting_pool)]
#[bench::a1000(args = (1_000), setup = connecting_pool)]
#[bench::a100000(args = (100_000), setup = connecting_pool)]
fn pool_call(f: Fixture<ConnectingPool>) -> Fixture<ConnectingPool> {
    for k in &f.walk {
        let made = f
            .map
            .call(k, |conn| async move {
                Ok::<_, std::convert::Infallible>(*conn.client())
            })
            .run();
        black_box(ready_now(made).expect("hit"));
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = connecting_pool)]
#[bench::a1000(args = (1_000), setup = connecting_pool)]
#[bench::a100000(args = (100_000), setup = connecting_pool)]
fn get_or_connect_hit(f: Fixture<ConnectingPool>) -> Fixture<ConnectingPool> {
    for k in &f.walk {
        black_box(ready_now(f.map.get_or_connect(k)).expect("hit"));
    }
    f
}

#[library_benchmark]
#[bench::a1(args = (1), setup = checkout_pool)]
#[bench::a1000(args = (1_000), setup = checkout_pool)]
fn checkout_hit(f: CheckoutFixture) -> CheckoutFixture {
    for k in &f.walk {
        drop(black_box(ready_now(f.pool.checkout(k)).expect("hit")));
    }
    f
}

library_benchmark_group!(
    name = hot_path,
    benchmarks = [
        floor_get,
        floor_fold_get,
        get_hit,
        call_by_hand,
        pool_call,
        get_or_connect_hit,
        checkout_hit
    ]
);

// Instructions only: the gate compares them alone, and without the cache simulation the run is
// about twice as fast.
main!(
    config = LibraryBenchmarkConfig::default()
        .tool(Callgrind::with_args(["--cache-sim=no"]).format([EventKind::Ir]));
    library_benchmark_groups = hot_path
);
