//! Shared helpers of the keyed-pool benchmarks in `benches/benches/` (figures in `BENCHMARKS.md`).
//!
//! Every figure is reported next to a baseline measured in the same process, because the machine is
//! shared and absolute times drift; ratios drift much less.

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use cheetah_string::CheetahString;

/// `n` distinct broker-like addresses (`10.a.b.c:10911`), short enough to be stored inline by
/// `CheetahString` (as real `ip:port` addresses are).
pub fn addrs(n: usize) -> Vec<CheetahString> {
    (0..n)
        .map(|i| {
            let i = u32::try_from(i).expect("fewer than 2^24 addresses");
            let [_, a, b, c] = i.to_be_bytes();
            CheetahString::from(format!("10.{a}.{b}.{c}:10911"))
        })
        .collect()
}

/// Walks `0..n` in a scattered order (a stride coprime with `n`), so consecutive lookups do not hit
/// neighbouring keys, and without a division per step (the floor would pay for it too).
#[derive(Clone, Copy, Debug)]
pub struct Scatter {
    n: usize,
    stride: usize,
    at: usize,
}

impl Scatter {
    /// Starts the walk of thread `thread` of `threads` at its own offset.
    pub fn new(n: usize, thread: usize, threads: usize) -> Self {
        assert!(n > 0);
        let stride = (1..=n)
            .map(|k| (7919 * k) % n)
            .find(|&s| gcd(s, n) == 1)
            .unwrap_or(0);
        Self {
            n,
            stride,
            at: thread * n / threads.max(1),
        }
    }

    /// The next index.
    #[inline]
    pub fn next_index(&mut self) -> usize {
        let at = self.at;
        self.at += self.stride;
        if self.at >= self.n {
            self.at -= self.n;
        }
        at
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Runs `work(thread, iters)` on `threads` OS threads released together by a barrier, and returns
/// the mean over threads of the time each took: the time per `iters` operations of one thread while
/// `threads` threads run the same loop. Thread start-up is outside the timed region.
pub fn run_threads<F>(threads: usize, iters: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    run_threads_with(threads, iters, |_| (), |(), t, iters| work(t, iters))
}

/// [`run_threads`] with a per-thread `setup` run before the barrier, outside the timed region.
pub fn run_threads_with<S, F, W>(threads: usize, iters: u64, setup: F, work: W) -> Duration
where
    F: Fn(usize) -> S + Sync,
    W: Fn(&mut S, usize, u64) + Sync,
{
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, setup, work) = (&barrier, &setup, &work);
                s.spawn(move || {
                    let mut state = setup(t);
                    barrier.wait();
                    let start = Instant::now();
                    work(&mut state, t, iters);
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .sum()
    });
    total / u32::try_from(threads).expect("a few threads")
}

/// `true` when run by `cargo bench` (which passes `--bench`). Run any other way (`cargo test
/// --benches`, a bare binary), the plain benchmark binaries only say how to run them and exit, so
/// that a test run of all targets stays fast.
pub fn run_by_cargo_bench(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        println!("{name}: run with `cargo bench -p keyed-pool-benches --bench {name}`");
    }
    yes
}

/// `true` on a full `cargo bench` run of a criterion bench: not with a filter, `--list` or in
/// criterion's test mode (for the extra, slower passes such as the interleaved ratios).
pub fn is_full_bench_run() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    args.iter().any(|a| a == "--bench")
        && args
            .iter()
            .all(|a| a.starts_with("--") || a.parse::<f64>().is_ok())
        && !args.iter().any(|a| a == "--list" || a == "--test")
}

/// Latency percentiles of a set of samples in nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Percentiles {
    /// Sorts `samples` and reads the percentiles off them.
    pub fn of(samples: &mut [u64]) -> Self {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: *samples.last().expect("not empty"),
        }
    }
}

/// Median of a few repeated measurements.
pub fn median(mut xs: Vec<f64>) -> f64 {
    assert!(!xs.is_empty());
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Where criterion writes its results, found as criterion finds it (`CRITERION_HOME`, else
/// `CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`).
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_visits_every_index_once_per_round() {
        for n in [1, 2, 10, 1_000, 100_000] {
            let mut walk = Scatter::new(n, 1, 4);
            let mut seen = vec![false; n];
            for _ in 0..n {
                let i = walk.next_index();
                assert!(!seen[i], "index {i} of {n} visited twice");
                seen[i] = true;
            }
        }
    }

    #[test]
    fn addresses_are_distinct_and_inline_sized() {
        let a = addrs(70_000);
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(a.iter().all(|s| s.len() <= 23));
    }

    #[test]
    fn percentiles_read_the_sorted_samples() {
        let mut xs: Vec<u64> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut xs);
        assert_eq!((p.p50, p.p99, p.max), (501, 990, 1000));
    }
}

/// Makes the one shared "connection" of an address for hyper-util's `Singleton` (the keyed peer of
/// the `hot_path` and `memory` benches), at once.
#[derive(Clone, Copy, Debug)]
pub struct MakeConn;

impl tower_service::Service<cheetah_string::CheetahString> for MakeConn {
    type Response = std::sync::Arc<u64>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<std::sync::Arc<u64>, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _addr: cheetah_string::CheetahString) -> Self::Future {
        std::future::ready(Ok(std::sync::Arc::new(7)))
    }
}

/// A connector that validates addresses as the crate's TCP and remoting connectors do, and is
/// never asked to connect in the benches that use it (every address is pooled by hand): what a
/// `get` on a pool with a connector costs, shared by the time and instruction benches.
pub struct ValidatingConnector;

impl keyed_pool::Connector for ValidatingConnector {
    type Conn = u64;
    type Error = std::convert::Infallible;

    async fn connect(&self, _addr: &str) -> Result<u64, Self::Error> {
        Ok(0)
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }
}

/// deadpool's connection maker for one address, as a keyed deadpool (one pool per address) needs:
/// it holds its address, makes a `T::default()` at once and recycles without a check (so a
/// checkout costs the pool's own work, as the pool's connectors in these benches do). Shared by the
/// `checkout` and `memory` benches.
#[derive(Debug)]
pub struct FixedManager<T> {
    /// The address the pool's connections are to.
    pub addr: cheetah_string::CheetahString,
    _conn: std::marker::PhantomData<fn() -> T>,
}

impl<T> FixedManager<T> {
    /// A manager for `addr`.
    pub fn new(addr: cheetah_string::CheetahString) -> Self {
        Self {
            addr,
            _conn: std::marker::PhantomData,
        }
    }
}

impl<T: Default + Send> deadpool::managed::Manager for FixedManager<T> {
    type Type = T;
    type Error = std::convert::Infallible;

    async fn create(&self) -> Result<T, Self::Error> {
        Ok(T::default())
    }

    async fn recycle(
        &self,
        _conn: &mut T,
        _metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Self::Error> {
        Ok(())
    }
}

/// A connector whose connections are `T::default()`, made at once, and which validates addresses
/// as the crate's TCP and remoting connectors do: what a checkout on a real connector's pool pays,
/// without the network. (`ValidatingConnector` is this for `u64`, for the shared-mode benches.)
#[derive(Debug)]
pub struct DefaultConnector<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Default for DefaultConnector<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T: Default + Send + Sync + 'static> keyed_pool::Connector for DefaultConnector<T> {
    type Conn = T;
    type Error = std::convert::Infallible;

    async fn connect(&self, _addr: &str) -> Result<T, Self::Error> {
        Ok(T::default())
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }
}

/// A managed deadpool pool for `addr` with `per_key` idle objects, made up front on `rt`: one
/// address of a keyed deadpool (a map of such pools), the peer of our exclusive checkout. The one
/// home of that setup for the `checkout` and `memory` benches.
pub fn warm_deadpool<T: Default + Send>(
    rt: &tokio::runtime::Runtime,
    addr: &CheetahString,
    per_key: usize,
) -> deadpool::managed::Pool<FixedManager<T>> {
    let pool = deadpool::managed::Pool::builder(FixedManager::new(addr.clone()))
        .max_size(per_key)
        .build()
        .expect("no runtime needed without timeouts");
    rt.block_on(async {
        let mut held = Vec::with_capacity(per_key);
        for _ in 0..per_key {
            held.push(pool.get().await.expect("an instant create"));
        }
    });
    assert_eq!(pool.status().available, per_key, "every object idle");
    pool
}

/// A bb8 manager whose connections are plain numbers: the pool's own checkout cost only. Shared
/// by the `hot_path` and `checkout` benches.
#[derive(Debug)]
pub struct NumberManager;

impl bb8::ManageConnection for NumberManager {
    type Connection = u64;
    type Error = std::convert::Infallible;

    async fn connect(&self) -> Result<u64, Self::Error> {
        Ok(7)
    }

    async fn is_valid(&self, _conn: &mut u64) -> Result<(), Self::Error> {
        Ok(())
    }

    fn has_broken(&self, _conn: &mut u64) -> bool {
        false
    }
}

/// A foldhash `BuildHasher` seeded as the pool seeds its map's (`keyed_pool::pool::AddrHasher`,
/// private): for the floor with the pool's hasher, which separates what the pool's `get` costs
/// beyond a lookup from what the hasher saves over SipHash (issue 16).
pub fn fold_hasher() -> foldhash::fast::FixedState {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(std::hash::RandomState::new().hash_one(0_u64))
}
