//! HTTP/1.1 keep-alive through the pool against a real nginx: throughput with 1 vs 8 connections
//! per host, shared mode vs exclusive checkout, and the requests that failed while nginx closed
//! connections under the callers (issue 13).
//!
//! ```sh
//! bash scripts/install-nginx.sh        # Debian's nginx-light, only when missing
//! cargo run --release -p keyed-pool-interop --example http1
//! HTTP1_REQUESTS=2000 cargo run -p keyed-pool-interop --example http1   # a quick run
//! ```
//!
//! It starts one nginx on 127.0.0.1 (`keepalive_requests 90`, `keepalive_timeout 200ms`) and
//! runs the same load through each pool: 32 callers share the GETs, in 4 rounds with a 300 ms pause
//! between them, so every connection kept over a pause has been closed by nginx when the next
//! round starts, and every 90th response on a connection says `Connection: close`. Each mode runs
//! 5 times, interleaved (the four modes back to back, five times over); the table gives each
//! mode's median throughput over the rounds (pauses excluded) and the median over the five
//! repeats of its ratio to the shared baseline run just before it, so that load which drifts over
//! seconds (a shared machine) hits both sides of a ratio alike.
//!
//! - **shared, 1** and **shared, 8**: the shared mode with `max_per_address` 1 and 8 (I23: each
//!   caller gets the least-loaded connection, and another is opened while every one is busy);
//!   every caller takes its turn on a connection's lock ([`Http1Conn::get_shared`] through [`ConnectionPool::call`]). When nginx
//!   closes the connection, every caller queued on its lock meets the close (`Http1Error::Closed`,
//!   without sending), and a retry may queue behind the next close: a GET is tried up to
//!   `SHARED_ATTEMPTS` times.
//! - **checkout, 1** and **checkout, 8**: [`checkout_get`] with `max_per_address` 1 and 8.
//!
//! The connector's books (connections made, most open at once, closes seen) are counted outside
//! the pool. Exits non-zero if a request failed or a cap was exceeded.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyed_pool::{CallError, CheetahString, ConnectionPool};
use keyed_pool_interop::http1::{
    GetError, Http1Conn, Http1Connector, Http1Error, Response, Tally, checkout_get,
};
use keyed_pool_interop::server::{KeepAlive, NginxServer, find_nginx};

type Pool = ConnectionPool<Http1Conn, Http1Connector>;

const CALLERS: usize = 32;
const ROUNDS: usize = 4;
const REPEATS: usize = 5;
/// How many times shared mode tries a GET that meets a closed connection.
const SHARED_ATTEMPTS: usize = 3;
const GAP: Duration = Duration::from_millis(300);
const KEEP_ALIVE: KeepAlive = KeepAlive {
    timeout: Duration::from_millis(200),
    requests: 90,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Shared(usize),
    Checkout(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Shared(n) => format!("shared, {n}"),
            Mode::Checkout(n) => format!("checkout, {n}"),
        }
    }

    fn per_host(self) -> usize {
        match self {
            Mode::Shared(n) => n,
            Mode::Checkout(n) => n,
        }
    }
}

/// One run of the load through one mode.
struct Run {
    rate: f64,
    failed: usize,
    first_error: Option<String>,
    tally: Tally,
    /// GETs tried again after meeting a connection nginx closed.
    retries: usize,
    open_after_close: usize,
}

/// A GET in shared mode: the pool's `call`, tried again (at most `SHARED_ATTEMPTS` times in all)
/// while it meets a connection nginx closed (the connection then reports itself closed, so the
/// pool hands out a fresh one). Counts the retries in `retries`.
async fn shared_get(
    pool: &Pool,
    addr: &str,
    retries: &AtomicUsize,
) -> Result<Response, CallError<Http1Error>> {
    let mut attempt = 1;
    loop {
        let answer = pool
            .call(
                addr,
                |conn| async move { conn.client().get_shared("/").await },
            )
            .await;
        match answer {
            Err(CallError::Call(Http1Error::Closed)) if attempt < SHARED_ATTEMPTS => {
                retries.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn run(mode: Mode, addr: &CheetahString, requests: usize) -> Run {
    let connector = Http1Connector::new();
    let books = connector.books();
    let pool: Pool = ConnectionPool::builder()
        .max_connections(64)
        .max_per_address(mode.per_host())
        .connect_timeout(Duration::from_secs(2))
        .checkout_timeout(Duration::from_secs(5))
        // Shared mode: a connection with a caller on its lock is busy, so up to `per_host`
        // connections are opened under load (I23).
        .busy_in_flight(1)
        .connector(connector)
        .build()
        .expect("a valid config");
    let mut busy = Duration::ZERO;
    let mut failed = 0;
    let mut first_error = None;
    let retries = Arc::new(AtomicUsize::new(0));
    for round in 0..ROUNDS {
        let tickets = Arc::new(AtomicUsize::new(0));
        let per_round = requests / ROUNDS;
        let started = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (pool, tickets, addr) = (pool.clone(), Arc::clone(&tickets), addr.clone());
                let retries = Arc::clone(&retries);
                tokio::spawn(async move {
                    let mut errors: Vec<String> = Vec::new();
                    while tickets.fetch_add(1, Ordering::Relaxed) < per_round {
                        let answer = match mode {
                            Mode::Shared(_) => shared_get(&pool, &addr, &retries)
                                .await
                                .map_err(|e| e.to_string()),
                            Mode::Checkout(_) => checkout_get(&pool, &addr, "/")
                                .await
                                .map_err(|e: GetError| e.to_string()),
                        };
                        match answer {
                            Ok(r) if r.status == 200 && r.body == b"ok\n" => {}
                            Ok(r) => errors.push(format!("unexpected {r:?}")),
                            Err(err) => errors.push(err),
                        }
                    }
                    errors
                })
            })
            .collect();
        for caller in callers {
            let errors = caller.await.expect("a caller panicked");
            failed += errors.len();
            if first_error.is_none() {
                first_error = errors.into_iter().next();
            }
        }
        busy += started.elapsed();
        if round + 1 < ROUNDS {
            tokio::time::sleep(GAP).await;
        }
    }
    let tally = books.tally(addr);
    pool.close().await;
    Run {
        rate: (requests / ROUNDS * ROUNDS) as f64 / busy.as_secs_f64(),
        failed,
        first_error,
        tally,
        // `checkout_get` retries each stale request once (the books count them).
        retries: match mode {
            Mode::Shared(_) => retries.load(Ordering::Relaxed),
            Mode::Checkout(_) => tally.stale,
        },
        open_after_close: books.tally(addr).open,
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() {
    let Some(binary) = find_nginx() else {
        eprintln!("nginx not found: run `bash scripts/install-nginx.sh`");
        std::process::exit(2);
    };
    let requests: usize = match std::env::var("HTTP1_REQUESTS") {
        Ok(n) => match n.parse() {
            Ok(n) if n >= ROUNDS => n,
            _ => {
                eprintln!("HTTP1_REQUESTS={n:?}: a number of requests, at least {ROUNDS}");
                std::process::exit(2);
            }
        },
        Err(_) => 12_000,
    };
    let server = match NginxServer::start(&binary, KEEP_ALIVE).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("nginx did not start: {err}");
            std::process::exit(1);
        }
    };
    let addr = server.addr();
    let modes = [
        Mode::Shared(1),
        Mode::Shared(8),
        Mode::Checkout(1),
        Mode::Checkout(8),
    ];
    println!(
        "nginx at {addr} (keepalive_requests {}, keepalive_timeout {:?}); {CALLERS} callers, \
         {requests} GETs per run in {ROUNDS} rounds, {GAP:?} pauses; {REPEATS} runs per mode, \
         interleaved",
        KEEP_ALIVE.requests, KEEP_ALIVE.timeout
    );
    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
    for _ in 0..REPEATS {
        for (i, mode) in modes.iter().enumerate() {
            runs[i].push(run(*mode, &addr, requests).await);
        }
    }

    println!(
        "\n| mode, conns/host | req/s (median; runs) | vs shared (median of ratios) | failed | made | most open | \
         `Connection: close` | found closed idle | retried |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut ok = true;
    let runs_by_mode = &runs;
    for (mode, runs) in modes.iter().zip(runs_by_mode) {
        let rate = median(runs.iter().map(|r| r.rate).collect());
        let all: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.rate)).collect();
        let sum = |f: fn(&Tally) -> usize| runs.iter().map(|r| f(&r.tally)).sum::<usize>();
        let failed: usize = runs.iter().map(|r| r.failed).sum();
        let peak = runs.iter().map(|r| r.tally.peak).max().unwrap_or(0);
        println!(
            "| {} | {rate:.0} ({}) | {:.2}x | {failed} | {} | {peak} | {} | {} | {} |",
            mode.name(),
            all.join(", "),
            median(
                runs.iter()
                    .zip(&runs_by_mode[0])
                    .map(|(r, base)| r.rate / base.rate)
                    .collect()
            ),
            sum(|t| t.made),
            sum(|t| t.server_closes),
            sum(|t| t.found_closed),
            runs.iter().map(|r| r.retries).sum::<usize>(),
        );
        if failed > 0 {
            ok = false;
            let first = runs.iter().find_map(|r| r.first_error.clone());
            eprintln!(
                "{}: {failed} failed requests; first: {first:?}",
                mode.name()
            );
        }
        // Exclusive connections only: a shared connection's handles may outlive its eviction (a
        // caller still finishing its call on it), so the books may see two at once.
        if matches!(mode, Mode::Checkout(_)) && peak > mode.per_host() {
            ok = false;
            eprintln!(
                "{}: I19 violated: {peak} connections open at once, cap {}",
                mode.name(),
                mode.per_host()
            );
        }
        if runs.iter().any(|r| r.open_after_close > 0) {
            ok = false;
            eprintln!(
                "{}: I17 violated: connections open after close",
                mode.name()
            );
        }
    }
    let failed: usize = runs.iter().flatten().map(|r| r.failed).sum();
    println!(
        "\nfailed requests in all: {failed} of {}",
        requests / ROUNDS * ROUNDS * REPEATS * modes.len()
    );
    drop(server);
    if !ok {
        std::process::exit(1);
    }
}
