//! `get_or_connect` storm: 1,000 concurrent callers on a cold address with an instant connector.
//! Measures the time until every caller is served and counts the connects made (I4: exactly one).
//! The callers are spawned first and parked on a gate; the time runs from opening the gate until the
//! last caller is served. Baseline, in the same process: the same 1,000 parked tasks released the same
//! way, each doing a `get` hit on a warm address (the cost of the task storm itself).
//!
//! A second run uses a connector that takes 1 ms, so that every caller finds the connect in flight.
//!
//! Run: `cargo bench -p keyed-pool-benches --bench storm`

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyed_pool::{ConnId, ConnectionPool, Connector};
use keyed_pool_benches::{Percentiles, addrs};
use tokio::sync::watch;

const CALLERS: usize = 1_000;
const ROUNDS: usize = 200;

/// Connects at once (or after `delay`) and counts its connects (the count is shared with the bench).
#[derive(Clone, Default)]
struct CountingConnector {
    connects: Arc<AtomicU64>,
    delay: Option<Duration>,
}

impl Connector for CountingConnector {
    type Conn = u64;
    type Error = Infallible;

    async fn connect(&self, _addr: &str) -> Result<u64, Infallible> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        Ok(self.connects.fetch_add(1, Ordering::Relaxed))
    }
}

/// Spawns `CALLERS` tasks, waits until every one is parked on a gate, then opens it and returns the
/// time from the opening until the last task finished, with what each returned.
async fn storm_round<F, Fut>(task: F) -> (u64, Vec<ConnId>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ConnId> + Send + 'static,
{
    let (open, gate) = watch::channel(false);
    let parked = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let mut gate = gate.clone();
            let parked = Arc::clone(&parked);
            let work = task();
            tokio::spawn(async move {
                parked.fetch_add(1, Ordering::AcqRel);
                gate.wait_for(|open| *open).await.expect("gate");
                work.await
            })
        })
        .collect();
    while parked.load(Ordering::Acquire) < CALLERS {
        tokio::task::yield_now().await;
    }
    let start = Instant::now();
    open.send_replace(true);
    let mut ids = Vec::with_capacity(CALLERS);
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    (start.elapsed().as_nanos() as u64, ids)
}

fn storm(rt: &tokio::runtime::Runtime, workers: usize, delay: Option<Duration>) {
    let connector = CountingConnector {
        delay,
        ..CountingConnector::default()
    };
    let pool = ConnectionPool::builder()
        .connector(connector.clone())
        .build::<u64>()
        .expect("valid config");
    let cold = addrs(ROUNDS + 1);
    let warm = cold[ROUNDS].clone();
    rt.block_on(pool.get_or_connect(&warm))
        .expect("warm address");

    let mut storm_ns = Vec::with_capacity(ROUNDS);
    let mut baseline_ns = Vec::with_capacity(ROUNDS);
    let mut shared_total = 0;
    for addr in cold.iter().take(ROUNDS) {
        // Baseline: the same storm of parked tasks, released together, on a warm address.
        let p = pool.clone();
        let w = warm.clone();
        let (elapsed, _) = rt.block_on(storm_round(move || {
            let (p, w) = (p.clone(), w.clone());
            async move { p.get(&w).expect("warm").id() }
        }));
        baseline_ns.push(elapsed);

        let before = pool.stats().connects;
        let connects_before = connector.connects.load(Ordering::Relaxed);
        let p = pool.clone();
        let a = addr.clone();
        let (elapsed, ids) = rt.block_on(storm_round(move || {
            let (p, a) = (p.clone(), a.clone());
            async move { p.get_or_connect(&a).await.expect("served").id() }
        }));
        let after = pool.stats().connects;
        let made = connector.connects.load(Ordering::Relaxed) - connects_before;
        assert_eq!(made, 1, "I4 violated: {made} connects for one cold address");
        assert_eq!(after.attempted - before.attempted, 1);
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "every caller got the one connection"
        );
        shared_total += after.shared - before.shared;
        storm_ns.push(elapsed);
    }
    let storm = Percentiles::of(&mut storm_ns);
    let base = Percentiles::of(&mut baseline_ns);
    let us = |ns: u64| ns as f64 / 1_000.0;
    println!(
        "get_or_connect storm: {CALLERS} callers on a cold address, {ROUNDS} rounds, {workers} worker threads, connector {}",
        delay.map_or("instant".to_string(), |d| format!("taking {d:?}"))
    );
    println!(
        "  storm (cold address):            median {:8.1} us  p99 {:8.1} us  max {:8.1} us",
        us(storm.p50),
        us(storm.p99),
        us(storm.max)
    );
    println!(
        "  baseline (same tasks, warm get): median {:8.1} us  p99 {:8.1} us  max {:8.1} us",
        us(base.p50),
        us(base.p99),
        us(base.max)
    );
    println!(
        "  ratio storm / baseline (median): {:.2}x",
        storm.p50 as f64 / base.p50 as f64
    );
    println!(
        "  connects made per cold address: exactly 1 in each of {ROUNDS} rounds (asserted); callers that joined the connect in flight: {:.1} per round on average (the rest found it pooled)",
        shared_total as f64 / ROUNDS as f64
    );
}

fn main() {
    if !keyed_pool_benches::run_by_cargo_bench("storm") {
        return;
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    storm(&rt, workers, None);
    // A connect that takes a millisecond: every caller arrives while it is in flight and shares it.
    storm(&rt, workers, Some(Duration::from_millis(1)));
}
