//! The pool's metrics served to Prometheus: a pool under simulated traffic, exported through the
//! `metrics` facade into `metrics-exporter-prometheus`, and served in Prometheus' text format on a
//! plain HTTP/1.1 endpoint that `curl`, a browser or a Prometheus server can read.
//!
//! ```sh
//! cargo run --example prometheus --features metrics
//! curl -s http://127.0.0.1:9898/metrics | grep keyed_pool_
//! PROMETHEUS_ADDR=127.0.0.1:0 PROMETHEUS_SECONDS=3 cargo run --example prometheus --features metrics
//! ```
//!
//! - `PROMETHEUS_ADDR`: where to listen (default `127.0.0.1:9898`; port 0 picks a free one, printed
//!   at start).
//! - `PROMETHEUS_SECONDS`: how long it serves before stopping by itself (default 60).
//!
//! Four addresses get traffic through an in-memory connector: `fast` and `slow` answer (about 1 ms
//! and 20 ms), `flaky` fails three calls in five (its connection turns unhealthy and is evicted),
//! `down` refuses every connect (it backs off, further and further). The cleanup task exports the
//! pool's figures every round; each scrape exports once more first, so it reads figures of that
//! instant.
//!
//! Before it exits it stops the traffic, scrapes its own endpoint over TCP, and checks that the
//! numbers served are the pool's `stats()`: it exits 1 if one differs (or the endpoint did not
//! answer), so CI can run it as a test.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyed_pool::{ConnectionPool, Connector, PoolError};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A connection of the in-memory connector: a name that says how it behaves.
struct Backend {
    addr: String,
}

#[derive(Debug, thiserror::Error)]
#[error("connection refused by {0}")]
struct Refused(String);

#[derive(Debug, thiserror::Error)]
#[error("{0} failed the call")]
struct CallFailed(String);

/// Connects to anything but `down`.
struct InMemory;

impl Connector for InMemory {
    type Conn = Backend;
    type Error = Refused;

    async fn connect(&self, addr: &str) -> Result<Backend, Refused> {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if addr.starts_with("down") {
            return Err(Refused(addr.to_string()));
        }
        Ok(Backend {
            addr: addr.to_string(),
        })
    }
}

type Pool = ConnectionPool<Backend, InMemory>;

/// A draw in `[0, 1)`, different every call.
fn unit(seed: &RandomState, n: &AtomicU64) -> f64 {
    (seed.hash_one(n.fetch_add(1, Ordering::Relaxed)) >> 11) as f64 / (1u64 << 53) as f64
}

/// One call on a backend: its latency and whether it failed.
async fn call(conn: &Backend, draw: f64) -> Result<(), CallFailed> {
    let (ms, fails) = match conn.addr.split(':').next().unwrap_or("") {
        "slow" => (15.0 + 10.0 * draw, false),
        "flaky" => (2.0 + 3.0 * draw, draw < 0.6),
        _ => (0.5 + draw, false),
    };
    tokio::time::sleep(Duration::from_secs_f64(ms / 1e3)).await;
    if fails {
        Err(CallFailed(conn.addr.clone()))
    } else {
        Ok(())
    }
}

/// A client task: calls `addr` over and over until `stop`, through the pool.
async fn traffic(pool: Pool, addr: &'static str, stop: Instant) {
    let seed = RandomState::new();
    let draws = AtomicU64::new(0);
    while Instant::now() < stop {
        match pool.get_or_connect(addr).await {
            Ok(conn) => {
                let guard = conn.begin();
                match call(conn.client(), unit(&seed, &draws)).await {
                    Ok(()) => guard.success(),
                    Err(_) => {
                        guard.failure();
                    }
                }
            }
            Err(PoolError::Backoff { retry_after, .. }) => {
                tokio::time::sleep(retry_after.min(stop - Instant::now())).await;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Answers one HTTP/1.1 request with the metrics, exported at this instant.
async fn serve(mut stream: TcpStream, pool: Pool, handle: PrometheusHandle) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read the request head (bounded: 8 KiB, 2 s), whatever it asks: every path gets the metrics.
    let head = tokio::time::timeout(Duration::from_secs(2), async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(head, Ok(Ok(()))) {
        return Ok(());
    }
    pool.export_metrics();
    let body = handle.render();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// GETs `/metrics` from `addr` and returns the body.
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status: {head}")));
    }
    Ok(body.to_string())
}

/// The value of `series` (name and labels, as rendered) in a Prometheus text body.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let listen: String = env_or("PROMETHEUS_ADDR", "127.0.0.1:9898".to_string());
    let seconds: u64 = env_or("PROMETHEUS_SECONDS", 60);

    // Series not updated for 5 minutes (an address gone from the pool) leave the endpoint.
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::ALL, Some(Duration::from_secs(300)))
        .install_recorder()
        .expect("no other recorder is installed");
    keyed_pool::describe_metrics();

    let pool: Pool = ConnectionPool::builder()
        .connector(InMemory)
        .name("example")
        .max_connections(16)
        .backoff(Duration::from_millis(200), Duration::from_secs(5), 0.2)
        .build()
        .expect("a valid configuration");
    let cleanup = pool.start_cleanup_task(Duration::from_secs(1));

    let listener = match TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("cannot listen on {listen}: {err} (set PROMETHEUS_ADDR)");
            std::process::exit(1);
        }
    };
    let local = listener
        .local_addr()
        .expect("a bound socket has an address");
    println!("serving http://{local}/metrics for {seconds} s (PROMETHEUS_SECONDS)");

    let stop = Instant::now() + Duration::from_secs(seconds);
    let clients: Vec<_> = ["fast:1", "fast:1", "slow:2", "flaky:3", "down:4"]
        .into_iter()
        .map(|addr| tokio::spawn(traffic(pool.clone(), addr, stop)))
        .collect();

    let server = {
        let pool = pool.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, pool.clone(), handle.clone()));
            }
        })
    };

    tokio::time::sleep_until(stop).await;
    for client in clients {
        let _ = client.await;
    }

    // The self-check: with the traffic stopped, what the endpoint serves is what stats() says.
    let body = match scrape(local).await {
        Ok(body) => body,
        Err(err) => {
            eprintln!("scraping our own endpoint failed: {err}");
            std::process::exit(1);
        }
    };
    let stats = pool.stats();
    let p = r#"pool="example""#;
    let checks = [
        ("keyed_pool_requests_total", stats.total_requests),
        ("keyed_pool_request_errors_total", stats.total_errors),
        ("keyed_pool_requests_cancelled_total", stats.total_cancelled),
        ("keyed_pool_connections", stats.total as u64),
        (
            "keyed_pool_backoff_rejections_total",
            stats.connects.backoff_rejections,
        ),
    ];
    let mut ok = stats.total_requests > 0;
    for (name, want) in checks {
        let got = value(&body, &format!("{name}{{{p}}}"));
        let same = got == Some(want as f64);
        ok &= same;
        println!(
            "{} {name}: served {got:?}, stats() {want}",
            if same { "ok  " } else { "DIFF" }
        );
    }
    println!(
        "{} requests ({} failed, mean {:?}), {} unhealthy evictions, {} failed connects",
        stats.total_requests,
        stats.total_errors,
        stats.avg_latency(),
        stats.evictions.unhealthy,
        stats.connects.failed,
    );
    server.abort();
    pool.close().await;
    let _ = cleanup.await;
    if !ok {
        eprintln!("the served metrics differ from stats() (or no request was made)");
        std::process::exit(1);
    }
}
