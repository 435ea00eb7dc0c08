//! The remoting transport over one pooled connection on loopback: requests per second and latency
//! percentiles with 1, 16 and 256 concurrent callers, through the pool (`pool_request`:
//! `get_or_connect` + `begin` + request + outcome) and, as the baseline in the same process, through
//! the same kind of `RemotingClient` used directly (no pool). The server is the crate's
//! `MiniServer` on 127.0.0.1, answering `GET_KV_CONFIG`. Both sides run twice, alternating; each
//! keeps its better run.
//!
//! Run: `cargo bench -p keyed-pool-benches --bench remoting`

use std::sync::Arc;
use std::time::{Duration, Instant};

use cheetah_string::CheetahString;
use keyed_pool::ConnectionPool;
use keyed_pool_benches::Percentiles;
use keyed_pool_remoting::codec::code;
use keyed_pool_remoting::{
    ClientConfig, MiniServer, RemotingClient, RemotingCommand, RemotingConnector, pool_request,
};

const CALLERS: [usize; 3] = [1, 16, 256];
/// Each scenario runs this long (and at most `MAX_REQUESTS` requests).
const RUN_FOR: Duration = Duration::from_millis(1000);
const MAX_REQUESTS: usize = 2_000_000;

fn request() -> RemotingCommand {
    RemotingCommand::request(code::GET_KV_CONFIG)
        .with_field("namespace", "bench")
        .with_field("key", "k")
}

/// Runs `callers` tasks that each call `call` in a loop until the time is up; returns requests per
/// second and the latency percentiles.
async fn drive<F, Fut>(callers: usize, call: F) -> (f64, Percentiles)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let per_caller = MAX_REQUESTS / callers;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let call = Arc::clone(&call);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                while start.elapsed() < RUN_FOR && lat.len() < per_caller {
                    let t0 = Instant::now();
                    call().await;
                    lat.push(t0.elapsed().as_nanos() as u64);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("caller"));
    }
    let secs = start.elapsed().as_secs_f64();
    (all.len() as f64 / secs, Percentiles::of(&mut all))
}

async fn run() {
    let server = MiniServer::start("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr: CheetahString = server.addr().to_string().into();
    let pool = ConnectionPool::builder()
        .connector(RemotingConnector::default())
        .build::<RemotingClient>()
        .expect("valid config");
    // Warm: the one pooled connection exists before timing starts.
    let warm = pool_request(&pool, &addr, request())
        .await
        .expect("server answers");
    assert!(warm.is_response());
    let direct = Arc::new(
        RemotingClient::connect(addr.as_str(), ClientConfig::default())
            .await
            .expect("connect"),
    );
    println!(
        "remoting over loopback, one connection, best of 2 alternating runs of {} ms per side",
        RUN_FOR.as_millis()
    );
    for callers in CALLERS {
        // Direct, pooled, direct, pooled: each side keeps its better run, so a burst of load from
        // other processes does not decide the ratio.
        let mut best: [Option<(f64, Percentiles)>; 2] = [None, None];
        for round in 0..4 {
            let side = round % 2;
            let (rps, lat) = if side == 0 {
                let client = Arc::clone(&direct);
                drive(callers, move || {
                    let client = Arc::clone(&client);
                    async move {
                        client.request(request()).await.expect("direct request");
                    }
                })
                .await
            } else {
                let (p, a) = (pool.clone(), addr.clone());
                drive(callers, move || {
                    let (p, a) = (p.clone(), a.clone());
                    async move {
                        pool_request(&p, &a, request())
                            .await
                            .expect("pooled request");
                    }
                })
                .await
            };
            if best[side].is_none_or(|(b, _)| rps > b) {
                best[side] = Some((rps, lat));
            }
        }
        let [Some((base_rps, base)), Some((pool_rps, pooled))] = best else {
            unreachable!("both sides ran");
        };
        let us = |ns: u64| ns as f64 / 1_000.0;
        println!(
            "  {callers:>3} callers: pooled {pool_rps:9.0} req/s  p50 {:7.1} us  p99 {:7.1} us  |  direct client {base_rps:9.0} req/s  p50 {:7.1} us  p99 {:7.1} us  |  pooled/direct: throughput {:.2}x, p99 {:.2}x",
            us(pooled.p50),
            us(pooled.p99),
            us(base.p50),
            us(base.p99),
            pool_rps / base_rps,
            pooled.p99 as f64 / base.p99 as f64,
        );
    }
    let stats = pool.stats();
    assert_eq!(
        stats.connects.attempted, 1,
        "one pooled connection for the whole run"
    );
    assert_eq!(stats.total_errors, 0);
    // The pool's connection and the direct client's.
    assert_eq!(server.stats().accepted, 2);
    println!(
        "  pool: {} connect, {} requests recorded, 0 errors; server accepted {} connections (pool + direct)",
        stats.connects.attempted,
        stats.total_requests,
        server.stats().accepted
    );
}

fn main() {
    if !keyed_pool_benches::run_by_cargo_bench("remoting") {
        return;
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}
