//! Memory per pooled connection, counted by a global allocator (`stats_alloc`, so no `unsafe` here):
//! net heap bytes of a pool holding N connections, per connection, against a raw
//! `DashMap<CheetahString, Arc<u64>>` (the floor) holding the same keys. Keys are real-sized
//! `ip:port` strings, stored inline by `CheetahString`; the connection itself is a `u64` handle, so
//! the figure is the pool's own overhead. Also printed: the size of each part of an entry, and the
//! growth of the resident set (which includes malloc's per-chunk overhead the counter cannot see),
//! and the same count for the keyed peer, hyper-util's `Map` of `Singleton`s.
//!
//! Then the same for exclusive connections (issue 13: [`ConnectionPool::checkout`]), with the
//! 24-byte payload: N idle connections, one per address (as the shared figure) and 100 per
//! address (N / 100 addresses, so the address's own state is shared by many connections), against
//! the keyed pool built from deadpool today: a `HashMap` of one managed deadpool pool per address,
//! holding the same connections.
//!
//! Run: `cargo bench -p keyed-pool-benches --bench memory`

use std::alloc::System;
use std::collections::HashMap;
use std::future::Future;
use std::hash::RandomState;
use std::mem::size_of;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use cheetah_string::CheetahString;
use dashmap::DashMap;
use hyper_util::client::pool::singleton::Singleton;
use keyed_pool::core::{HealthPolicy, HealthWindow};
use keyed_pool::{ConnectionMetrics, ConnectionPool, PooledConnection};
use keyed_pool_benches::{DefaultConnector, FixedManager, MakeConn, addrs, warm_deadpool};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower_service::Service;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SIZES: [usize; 2] = [10_000, 100_000];

/// Resident set size in bytes, from `/proc/self/statm` (0 where unavailable).
fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Net heap bytes (allocated minus freed) and RSS growth while `build` runs; what it returns is
/// kept alive until after the count.
fn measure<T>(build: impl FnOnce() -> T) -> (i64, i64, T) {
    let rss_before = rss();
    let region = Region::new(GLOBAL);
    let kept = build();
    let change = region.change();
    let net = change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64;
    (net, rss() - rss_before, kept)
}

fn main() {
    if !keyed_pool_benches::run_by_cargo_bench("memory") {
        return;
    }
    println!("memory per pooled connection (net heap bytes counted by the global allocator)");
    println!(
        "  sizes: CheetahString {} B, PooledConnection {} B, ConnectionMetrics {} B (of which the pool's shared part's Arc {} B, HealthWindow {} B, CallRecord {} B)",
        size_of::<CheetahString>(),
        size_of::<PooledConnection<u64>>(),
        size_of::<ConnectionMetrics>(),
        size_of::<std::sync::Arc<HealthPolicy>>(),
        size_of::<HealthWindow>(),
        size_of::<keyed_pool::core::CallRecord>(),
    );
    // One allocation per connection (issue 16): Arc header 16 + id 8 + addr 24 + metrics + the
    // connection; plus one map slot (the key and the address's `Slot`, 40 B with the connect in
    // flight and the ejection state out of line) with its control byte, in a table kept at most
    // 7/8 full. The latency histogram (456 B + malloc's 16) comes with a connection's first
    // success, the failure side of its record (80 B + malloc's 16) with its first failure or
    // cancel. The health policy, the pool's totals and the call timeout are the pool's, behind
    // one `Arc` in the metrics.
    let entry_alloc = 16 + 8 + size_of::<CheetahString>() + size_of::<ConnectionMetrics>();
    println!(
        "  expected per connection: entry {entry_alloc} B + the connection + map slot x table headroom"
    );
    for n in SIZES {
        let keys = addrs(n);
        let (floor, floor_rss, floor_map) = measure(|| {
            let map: DashMap<CheetahString, Arc<u64>> =
                DashMap::with_hasher_and_shard_amount(RandomState::new(), 32);
            for (i, k) in keys.iter().enumerate() {
                map.insert(k.clone(), Arc::new(i as u64));
            }
            map
        });
        drop(floor_map);
        let (pool_bytes, pool_rss, pool) = measure(|| {
            let pool: ConnectionPool<u64> = ConnectionPool::new(0, Duration::from_secs(300));
            for (i, k) in keys.iter().enumerate() {
                assert!(pool.insert(k.clone(), i as u64));
            }
            pool
        });
        assert_eq!(pool.len(), n);
        let per = |b: i64| b as f64 / n as f64;
        println!(
            "  {n:>7} connections: pool {:6.1} B/conn (RSS growth {:6.1} B/conn)   floor DashMap<CheetahString, Arc<u64>> {:6.1} B/entry (RSS {:6.1})   ratio {:.2}x   goal < 200 B: {}",
            per(pool_bytes),
            per(pool_rss),
            per(floor),
            per(floor_rss),
            pool_bytes as f64 / floor as f64,
            if per(pool_bytes) < 200.0 {
                "met"
            } else {
                "NOT met"
            },
        );
        drop(pool);
        // The payload: 24 bytes, as the original pool's figure was measured with.
        let (pool24, _, pool) = measure(|| {
            let pool: ConnectionPool<[u64; 3]> = ConnectionPool::new(0, Duration::from_secs(300));
            for (i, k) in keys.iter().enumerate() {
                assert!(pool.insert(k.clone(), [i as u64; 3]));
            }
            pool
        });
        // Every connection has completed one call: its latency histogram is allocated.
        let (called, _, ()) = measure(|| {
            for k in &keys {
                pool.get(k).unwrap().begin().success();
            }
        });
        // Then one failed call on each: the failure side of its record is allocated (issue 16:
        // a connection that never failed keeps no failure-side state).
        let (failed, _, ()) = measure(|| {
            for k in &keys {
                pool.get(k).unwrap().begin().failure();
            }
        });
        println!(
            "           24-byte payload: pool {:6.1} B/conn (goal <= 134 B: {}); after one call on each, +{:6.1} B/conn (the latency histogram); after one failure on each, +{:6.1} B/conn (the record's failure side)",
            per(pool24),
            if per(pool24) <= 134.0 {
                "met"
            } else {
                "NOT met"
            },
            per(called),
            per(failed),
        );
        drop(pool);
        let (hyper_bytes, _, hyper) = measure(|| {
            let mut map = hyper_util::client::pool::map::Map::builder()
                .keys(|addr: &CheetahString| addr.clone())
                .values(|_addr: &CheetahString| Singleton::new(MakeConn))
                .build();
            let mut cx = Context::from_waker(Waker::noop());
            for k in &keys {
                let svc = map.service(k);
                assert!(svc.poll_ready(&mut cx).is_ready());
                let mut fut = svc.call(k.clone());
                assert!(Pin::new(&mut fut).poll(&mut cx).is_ready(), "made at once");
            }
            map
        });
        println!(
            "           peer: hyper-util Map of Singletons (no metrics, no health) {:6.1} B/entry ({:.2}x the floor)",
            per(hyper_bytes),
            hyper_bytes as f64 / floor as f64
        );
        drop(hyper);
    }
    exclusive();
}

/// The payload, 24 bytes.
type Payload = [u64; 3];

/// Memory per idle exclusive connection, ours against a `HashMap` of deadpool pools.
fn exclusive() {
    println!(
        "memory per idle exclusive connection (checkout, issue 13), 24-byte payload (net heap bytes)"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    for n in SIZES {
        for per_key in [1, 100] {
            let keys = addrs(n / per_key);
            // (No RSS growth here: the earlier measurements freed memory that these reuse.)
            let (ours, _, pool) = measure(|| {
                let pool = ConnectionPool::builder()
                    .connector(DefaultConnector::<Payload>::default())
                    .max_per_address(per_key)
                    .build()
                    .expect("valid config");
                rt.block_on(async {
                    for k in &keys {
                        // Held at once, so the address makes `per_key` connections.
                        let mut held = Vec::with_capacity(per_key);
                        for _ in 0..per_key {
                            held.push(pool.checkout(k).await.expect("an instant connect"));
                        }
                    }
                });
                pool
            });
            let stats = pool.stats();
            assert_eq!((stats.total, stats.idle), (n, n), "all idle, none lost");
            drop(pool);
            let (dead, _, map) = measure(|| {
                let map: HashMap<CheetahString, deadpool::managed::Pool<FixedManager<Payload>>> =
                    keys.iter()
                        .map(|k| (k.clone(), warm_deadpool(&rt, k, per_key)))
                        .collect();
                map
            });
            let idle: usize = map.values().map(|p| p.status().available).sum();
            assert_eq!(idle, n, "all idle");
            drop(map);
            let per = |b: i64| b as f64 / n as f64;
            println!(
                "  {n:>7} connections, {per_key:>3} per address: pool {:6.1} B/conn   HashMap of deadpool managed pools {:6.1} B/conn   ratio ours / deadpool {:.2}x",
                per(ours),
                per(dead),
                ours as f64 / dead as f64,
            );
        }
    }
}
