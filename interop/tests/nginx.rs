//! Interop: the pool with HTTP/1.1 keep-alive connections ([`Http1Connector`]) against a real nginx
//! on loopback (Debian's `nginx-light`; `scripts/install-nginx.sh` installs it), which closes
//! connections the two ways real servers do: silently after its keep-alive timeout, and with
//! `Connection: close` after its keep-alive request limit: in shared mode (one connection per
//! address) and through exclusive checkout with 1 and 8 connections per address (issue 13).
//!
//! The binary is `KEYED_POOL_NGINX_BIN`, else `nginx` on `PATH` or in `/usr/sbin`. Without it (as
//! the build script finds it) the tests are reported as ignored, with the command that installs it;
//! `.ci/run` installs it and requires them to have run. Real processes and real time, so not under
//! madsim: the sleeps below are the scenario (a connection left idle past the server's own timer),
//! each bounded.
#![cfg(not(madsim))]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyed_pool::{CallError, CheetahString, ConnId, ConnectionPool};
use keyed_pool_interop::http1::{
    Books, Http1Conn, Http1Connector, Http1Error, Response, Tally, checkout_get,
};
use keyed_pool_interop::server::{KeepAlive, NginxServer, find_nginx};

type Pool = ConnectionPool<Http1Conn, Http1Connector>;

/// nginx's keep-alive timeout in these tests, and how long a connection is left idle to outlive it.
const SERVER_IDLE: Duration = Duration::from_millis(300);
const LEFT_IDLE: Duration = Duration::from_millis(700);

/// The binary, or `None` after saying the test is skipped (a failure under
/// `KEYED_POOL_REQUIRE_NGINX=1`, which `.ci/run` sets).
fn nginx_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_nginx();
    if found.is_none() {
        let required = std::env::var("KEYED_POOL_REQUIRE_NGINX").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "KEYED_POOL_REQUIRE_NGINX=1 but nginx was not found (KEYED_POOL_NGINX_BIN, PATH, \
             /usr/sbin); run `bash scripts/install-nginx.sh`"
        );
        eprintln!("SKIPPED {test}: nginx not found (run `bash scripts/install-nginx.sh`)");
    }
    found
}

/// A pool for one nginx, with the default ejection policy: a server closing a keep-alive
/// connection after answering on it is no fault of the address (I12: only a connection that dies
/// young without ever serving counts), so nothing here backs off.
fn pool(connector: Http1Connector) -> Pool {
    ConnectionPool::builder()
        .max_connections(4)
        .connect_timeout(Duration::from_secs(2))
        .call_timeout(Duration::from_secs(2))
        .connector(connector)
        .build()
        .expect("a valid config")
}

async fn get(pool: &Pool, addr: &str) -> Result<(Response, ConnId), CallError<Http1Error>> {
    pool.call(addr, |conn| async move {
        let response = conn.client().get_shared("/").await?;
        Ok((response, conn.id()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nginx_found),
    ignore = "nginx not found: run `bash scripts/install-nginx.sh` to run this test"
)]
async fn a_keep_alive_the_server_closed_while_idle_is_never_handed_out_i8() {
    let Some(binary) = nginx_or_skip("a_keep_alive_the_server_closed_while_idle") else {
        return;
    };
    let keep_alive = KeepAlive {
        timeout: SERVER_IDLE,
        requests: 1000,
    };
    let server = NginxServer::start(&binary, keep_alive)
        .await
        .expect("nginx");
    let addr = server.addr();

    // Shared mode, no check before use: the connector's `is_open` finds nginx's FIN (a read that
    // must not block), so the pool never hands out the connection nginx closed (I8) and connects
    // afresh; no request meets it.
    let connector = Http1Connector::new();
    let books = connector.books();
    let shared = pool(connector);
    let (first, id) = get(&shared, &addr).await.expect("the first GET");
    assert_eq!((first.status, first.body.as_slice()), (200, &b"ok\n"[..]));
    tokio::time::sleep(LEFT_IDLE).await;
    let (again, next_id) = get(&shared, &addr)
        .await
        .expect("I8: no request reaches the closed connection");
    assert_eq!(again.status, 200);
    assert_ne!(
        id, next_id,
        "I8: the closed connection is not handed out again"
    );
    let stats = shared.stats();
    assert_eq!(stats.connects.succeeded, 2, "{stats:?}");
    assert_eq!(stats.total_errors, 0, "{stats:?}");
    let t = books.tally(&addr);
    assert_eq!(
        (t.made, t.found_closed, t.stale, t.open),
        (2, 1, 0, 1),
        "{t:?}"
    );
    shared.close().await;

    // Exclusive checkout, the same: the idle connection is judged on hand-out, closed, and the
    // caller gets a fresh one, with no retry needed.
    let connector = Http1Connector::new();
    let books = connector.books();
    let exclusive = pool(connector);
    let first = {
        let mut conn = exclusive.checkout(&addr).await.expect("a checkout");
        assert_eq!(conn.get("/").await.expect("the first GET").status, 200);
        conn.id()
    };
    tokio::time::sleep(LEFT_IDLE).await;
    let mut conn = exclusive.checkout(&addr).await.expect("a checkout");
    assert_ne!(
        conn.id(),
        first,
        "I8: the closed connection is not handed out"
    );
    assert_eq!(conn.get("/").await.expect("a fresh connection").status, 200);
    drop(conn);
    let t = books.tally(&addr);
    assert_eq!(
        (t.made, t.found_closed, t.stale, t.open),
        (2, 1, 0, 1),
        "{t:?}"
    );
    assert_eq!(exclusive.stats().total_errors, 0);
    exclusive.close().await;
    assert_eq!(books.tally(&addr).open, 0, "I17: nothing left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nginx_found),
    ignore = "nginx not found: run `bash scripts/install-nginx.sh` to run this test"
)]
async fn connection_close_after_the_request_limit_is_seen_and_no_request_fails() {
    let Some(binary) = nginx_or_skip("connection_close_after_the_request_limit") else {
        return;
    };
    const LIMIT: u32 = 10;
    const REQUESTS: u32 = 95;
    let keep_alive = KeepAlive {
        timeout: Duration::from_secs(10),
        requests: LIMIT,
    };
    let server = NginxServer::start(&binary, keep_alive)
        .await
        .expect("nginx");
    let addr = server.addr();
    let pool = pool(Http1Connector::new());
    let mut ids = Vec::new();
    for i in 0..REQUESTS {
        let (response, id) = get(&pool, &addr)
            .await
            .unwrap_or_else(|err| panic!("request {i}: {err}"));
        assert_eq!(response.status, 200, "request {i}");
        ids.push(id);
    }
    // nginx's books: each connection served exactly LIMIT requests, its last one saying
    // `Connection: close`, which the pool heeded (I8) before the next request.
    let mut runs: Vec<usize> = Vec::new();
    for pair in ids.chunk_by(|a, b| a == b) {
        runs.push(pair.len());
    }
    let expected: Vec<usize> = (0..REQUESTS.div_ceil(LIMIT))
        .map(|k| (REQUESTS - k * LIMIT).min(LIMIT) as usize)
        .collect();
    assert_eq!(runs, expected, "requests per connection");
    let stats = pool.stats();
    assert_eq!(
        stats.connects.succeeded,
        u64::from(REQUESTS.div_ceil(LIMIT)),
        "{stats:?}"
    );
    assert_eq!(stats.total_errors, 0, "{stats:?}");
    pool.close().await;
}

/// The exclusive-checkout test's load: `CALLERS` tasks share `REQUESTS` GETs over two nginx hosts,
/// in `ROUNDS` rounds with an idle gap between them longer than the servers' keep-alive timeout.
const CALLERS: usize = 32;
const REQUESTS: usize = 4_000;
const ROUNDS: usize = 4;
/// nginx's `keepalive_requests`: a connection's 25th response says `Connection: close`.
const CLOSE_AFTER: u32 = 25;
/// nginx's `keepalive_timeout`, and the pause between rounds that outlives it: every idle
/// connection the pool keeps over a pause has been closed by the server when the next round starts.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(100);
const GAP: Duration = Duration::from_millis(250);

/// One run of the load through `checkout` with `per_host` connections per host.
struct Phase {
    failed: usize,
    /// The first few failures, for the assertion message.
    errors: Vec<String>,
    /// Time spent in the rounds (the idle gaps excluded).
    busy: Duration,
    /// The connector's books for each host after the rounds, and after `close`.
    during: Vec<Tally>,
    after_close: Vec<Tally>,
}

impl Phase {
    fn rate(&self) -> f64 {
        REQUESTS as f64 / self.busy.as_secs_f64()
    }
}

async fn exclusive_phase(addrs: &[CheetahString], per_host: usize) -> Phase {
    let connector = Http1Connector::new();
    let books: Arc<Books> = connector.books();
    let pool = ConnectionPool::builder()
        .max_connections(64)
        .max_per_address(per_host)
        .checkout_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        // The default ejection policy (see `pool`): nginx closes connections young, after
        // answering on them, which is no failure of the address (I12).
        .connector(connector)
        .build()
        .expect("a valid config");
    let mut busy = Duration::ZERO;
    let mut errors = Vec::new();
    let mut failed = 0;
    for round in 0..ROUNDS {
        let tickets = Arc::new(AtomicUsize::new(0));
        let per_round = REQUESTS / ROUNDS;
        let started = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (pool, tickets) = (pool.clone(), Arc::clone(&tickets));
                let addr = addrs[caller % addrs.len()].clone();
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    // Bounded: each ticket is taken once, `per_round` in all.
                    while tickets.fetch_add(1, Ordering::Relaxed) < per_round {
                        match checkout_get(&pool, &addr, "/").await {
                            Ok(r) if r.status == 200 && r.body == b"ok\n" => {}
                            Ok(r) => errors.push(format!("{addr}: unexpected {r:?}")),
                            Err(err) => errors.push(format!("{addr}: {err}")),
                        }
                    }
                    errors
                })
            })
            .collect();
        for caller in callers {
            let mut lost = caller.await.expect("a caller panicked");
            failed += lost.len();
            lost.truncate(5 - errors.len().min(5));
            errors.append(&mut lost);
        }
        busy += started.elapsed();
        if round + 1 < ROUNDS {
            // The scenario, not a race cover: idle connections outlive the server's timer.
            tokio::time::sleep(GAP).await;
        }
    }
    let during = addrs.iter().map(|a| books.tally(a)).collect();
    pool.close().await;
    let after_close = addrs.iter().map(|a| books.tally(a)).collect();
    Phase {
        failed,
        errors,
        busy,
        during,
        after_close,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nginx_found),
    ignore = "nginx not found: run `bash scripts/install-nginx.sh` to run this test"
)]
async fn checkout_with_1_and_8_connections_per_host_fails_no_request_on_server_closed_keep_alives_i19()
 {
    let Some(binary) = nginx_or_skip("checkout_with_1_and_8_connections_per_host") else {
        return;
    };
    let keep_alive = KeepAlive {
        timeout: KEEPALIVE_TIMEOUT,
        requests: CLOSE_AFTER,
    };
    let (a, b) = (
        NginxServer::start(&binary, keep_alive)
            .await
            .expect("nginx"),
        NginxServer::start(&binary, keep_alive)
            .await
            .expect("nginx"),
    );
    let addrs = [a.addr(), b.addr()];
    let mut rates = Vec::new();
    for per_host in [1, 8] {
        let phase = exclusive_phase(&addrs, per_host).await;
        assert_eq!(
            phase.failed, 0,
            "{per_host} per host: no request may fail on a keep-alive the server closed; first \
             failures: {:#?}",
            phase.errors
        );
        for (addr, t) in addrs.iter().zip(&phase.during) {
            // Judged from the connector's books (connections open at once), not the pool's gauges.
            assert!(
                t.peak <= per_host,
                "I19 violated: {} connections open at once to {addr}, max_per_address {per_host}: \
                 {t:?}",
                t.peak
            );
            if per_host > 1 {
                assert!(
                    t.peak > 1,
                    "{addr}: 16 callers with 8 connections allowed never had two open: {t:?}"
                );
            }
            // The scenario happened: the server closed connections both ways, and the pool saw it.
            assert!(
                t.server_closes > 0 && t.made >= t.server_closes,
                "{addr}: nginx never said `Connection: close` (keepalive_requests \
                 {CLOSE_AFTER}): {t:?}"
            );
        }
        // Over both hosts: a host whose rounds each ended exactly on its connection's last
        // request (a multiple of CLOSE_AFTER, with 1 per host) keeps nothing idle over a gap.
        assert!(
            phase.during.iter().any(|t| t.found_closed > 0),
            "no idle connection was found closed by the server after the {GAP:?} gaps \
             (keepalive_timeout {KEEPALIVE_TIMEOUT:?}): {:?}",
            phase.during
        );
        for (addr, t) in addrs.iter().zip(&phase.after_close) {
            assert_eq!(
                t.open, 0,
                "I17 violated: {addr} still has connections open after close: {t:?}"
            );
        }
        let (made, closes, fins, stale) = phase.during.iter().fold((0, 0, 0, 0), |acc, t| {
            (
                acc.0 + t.made,
                acc.1 + t.server_closes,
                acc.2 + t.found_closed,
                acc.3 + t.stale,
            )
        });
        eprintln!(
            "checkout, {per_host} per host, 2 hosts, {CALLERS} callers: {REQUESTS} GETs in {:?} \
             ({:.0} req/s), 0 failed; peaks {:?}; {made} connections made, {closes} \
             `Connection: close`, {fins} found closed idle, {stale} stale mid-request (retried)",
            phase.busy,
            phase.rate(),
            phase.during.iter().map(|t| t.peak).collect::<Vec<_>>(),
        );
        rates.push(phase.rate());
    }
    // Printed, not asserted: throughput is a benchmark's business (BENCHMARKS.md, issue 13).
    eprintln!(
        "8 vs 1 connection per host: {:.2}x (debug build; see examples/http1.rs)",
        rates[1] / rates[0]
    );
}
