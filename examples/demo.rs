//! The pool at work against real servers on loopback, with a live table.
//!
//! ```sh
//! cargo run --release --example demo            # about 15 s
//! DEMO_SECONDS=8 cargo run --release --example demo
//! ```
//!
//! Five tiny remoting servers ([`MiniServer`]) listen on 127.0.0.1. Client tasks send requests to
//! them through one [`ConnectionPool`] with [`pool_request`], while a script misbehaves:
//!
//! - `steady`   answers everything, all along;
//! - `restart`  is killed, then restarted: its connection is evicted as closed, connects are
//!   refused and back off, then the pool reconnects;
//! - `slow`     gets slow (latency climbs), then slower than the request timeout (requests time
//!   out, the connection turns unhealthy and is evicted), then recovers;
//! - `failing`  accepts connections but answers every request with SYSTEM_ERROR for a while: each
//!   connection dies unhealthy, the ejection count grows with each one (a successful connect does
//!   not reset it) and so does the backoff; once it recovers the count decays, one step per quiet
//!   interval (shortened here to fit the demo);
//! - `idle`     gets traffic only at the start: its connection is evicted as idle.
//!
//! Every second it prints, per address: the state, the pooled connection's id, calls in flight,
//! requests/s, error %, p50/p99 latency, evictions so far (idle/unhealthy/closed), the ejection
//! count and the backoff left; then the latest lifecycle events. At the end, a summary. On a terminal the table redraws in
//! place; otherwise (piped, CI) each table is printed in turn, without control codes.
//!
//! Exits 0 once every lifecycle event (idle eviction, health eviction, closed eviction, backoff,
//! the backoff growing, the ejection count decaying, reconnect) has been seen; 1 if one never happened (e.g. with a very short `DEMO_SECONDS`).

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyed_pool::core::EjectionPolicy;
use keyed_pool::{CheetahString, ConnectionPool, PoolError, PooledConnection};
use keyed_pool_remoting::codec::code;
use keyed_pool_remoting::{
    CallError, ClientConfig, MiniServer, RemotingClient, RemotingCommand, RemotingConnector,
    ServerBehaviour, pool_request,
};
use tokio::time::Instant;

type Pool = ConnectionPool<RemotingClient, RemotingConnector>;

const ROLES: [&str; 5] = ["steady", "restart", "slow", "failing", "idle"];
const WORKERS_PER_ADDR: usize = 4;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

/// What one address's client tasks saw during the current one-second window, and in total.
#[derive(Default)]
struct Window {
    ok: u64,
    errors: u64,
    latencies_us: Vec<u64>,
}

#[derive(Default)]
struct Totals {
    ok: u64,
    errors: u64,
}

/// Evictions of one address, as the watcher classified them.
#[derive(Default, Clone, Copy)]
struct Evictions {
    idle: u64,
    unhealthy: u64,
    closed: u64,
}

struct Lane {
    role: &'static str,
    addr: CheetahString,
    window: Mutex<Window>,
    totals: Mutex<Totals>,
    /// Client tasks send only while this is set.
    active: AtomicBool,
    evictions: Mutex<Evictions>,
    /// The connection the watcher last saw pooled for this address.
    last_seen: Mutex<Option<PooledConnection<RemotingClient>>>,
    reconnects: AtomicU64,
}

/// Lifecycle events, newest last, for the table and the summary.
struct Journal {
    start: Instant,
    recent: Mutex<VecDeque<String>>,
    seen: Mutex<BTreeMap<&'static str, u64>>,
}

impl Journal {
    fn note(&self, kind: &'static str, text: String) {
        let t = self.start.elapsed().as_secs_f64();
        let mut recent = self.recent.lock().unwrap();
        recent.push_back(format!("{t:6.1}s  {text}"));
        while recent.len() > 8 {
            recent.pop_front();
        }
        *self.seen.lock().unwrap().entry(kind).or_default() += 1;
    }
}

fn seconds_from_env() -> f64 {
    std::env::var("DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .unwrap_or(15.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = Duration::from_secs_f64(seconds_from_env());
    let at = |fraction: f64| total.mul_f64(fraction);
    let max_idle = at(0.2).clamp(Duration::from_millis(500), Duration::from_secs(3));

    let mut servers = Vec::new();
    for _ in ROLES {
        servers.push(
            MiniServer::start("127.0.0.1:0")
                .await
                .expect("bind loopback"),
        );
    }
    let pool: Pool = ConnectionPool::builder()
        .max_connections(16)
        .max_idle(max_idle)
        .consecutive_failures(5)
        .backoff(Duration::from_millis(400), Duration::from_secs(3), 0.2)
        // Minutes compressed into seconds: a quiet interval takes one step off an ejection count.
        .ejection(EjectionPolicy {
            decay_interval: at(0.08).clamp(Duration::from_millis(400), Duration::from_secs(2)),
            ..EjectionPolicy::default()
        })
        .connect_timeout(Duration::from_millis(500))
        .connector(RemotingConnector::new(
            ClientConfig::default().request_timeout(REQUEST_TIMEOUT),
        ))
        .build()
        .expect("a valid configuration");
    let cleanup = pool.start_cleanup_task(Duration::from_millis(200));

    let journal = Arc::new(Journal {
        start: Instant::now(),
        recent: Mutex::new(VecDeque::new()),
        seen: Mutex::new(BTreeMap::new()),
    });
    let lanes: Arc<Vec<Lane>> = Arc::new(
        ROLES
            .iter()
            .zip(&servers)
            .map(|(role, server)| Lane {
                role,
                addr: server.addr().to_string().into(),
                window: Mutex::new(Window::default()),
                totals: Mutex::new(Totals::default()),
                active: AtomicBool::new(true),
                evictions: Mutex::new(Evictions::default()),
                last_seen: Mutex::new(None),
                reconnects: AtomicU64::new(0),
            })
            .collect(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for lane in 0..lanes.len() {
        for worker in 0..WORKERS_PER_ADDR {
            tasks.push(tokio::spawn(client_task(
                pool.clone(),
                Arc::clone(&lanes),
                lane,
                worker,
                Arc::clone(&stop),
            )));
        }
    }
    tasks.push(tokio::spawn(watcher(
        pool.clone(),
        Arc::clone(&lanes),
        Arc::clone(&stop),
        Arc::clone(&journal),
    )));

    // The script: (when, what). Server indexes follow ROLES.
    let script: Vec<(Duration, &str)> = vec![
        (at(0.15), "idle: traffic stops"),
        (at(0.20), "restart: killed"),
        (at(0.25), "slow: +80 ms per answer"),
        (at(0.35), "failing: answers SYSTEM_ERROR"),
        (at(0.50), "restart: restarted"),
        (
            at(0.55),
            "slow: +600 ms per answer (beyond the 300 ms timeout)",
        ),
        (at(0.75), "failing: recovers"),
        (at(0.80), "slow: recovers"),
    ];
    let mut script = script.into_iter().peekable();
    let tty = std::io::stdout().is_terminal();
    let started = journal.start;
    let mut next_table = started + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        while let Some((when, _)) = script.peek() {
            if started + *when > now {
                break;
            }
            let (_, what) = script.next().unwrap();
            match what {
                "idle: traffic stops" => lanes[4].active.store(false, Ordering::Relaxed),
                "restart: killed" => servers[1].stop().await,
                "restart: restarted" => servers[1].restart().await.expect("rebind"),
                "slow: +80 ms per answer" => servers[2].set_delay(Duration::from_millis(80)),
                "slow: +600 ms per answer (beyond the 300 ms timeout)" => {
                    servers[2].set_delay(Duration::from_millis(600))
                }
                "slow: recovers" => servers[2].set_delay(Duration::ZERO),
                "failing: answers SYSTEM_ERROR" => {
                    servers[3].set_behaviour(ServerBehaviour::SystemError)
                }
                "failing: recovers" => servers[3].set_behaviour(ServerBehaviour::Normal),
                _ => unreachable!("unknown step {what}"),
            }
            journal.note("script", format!("SCRIPT  {what}"));
        }
        if now >= next_table {
            print_table(&pool, &lanes, &journal, &servers, tty);
            next_table += Duration::from_secs(1);
        }
        if now >= started + total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let ok = summary(&pool, &lanes, &journal, &servers);
    pool.close().await;
    let _ = cleanup.await;
    std::process::exit(if ok { 0 } else { 1 });
}

async fn client_task(
    pool: Pool,
    lanes: Arc<Vec<Lane>>,
    lane: usize,
    worker: usize,
    stop: Arc<AtomicBool>,
) {
    let lane = &lanes[lane];
    let key = format!("key-{worker}");
    // Seed the key so gets find it (ignored if the server is down at that moment).
    let put = RemotingCommand::request(code::PUT_KV_CONFIG)
        .with_field("namespace", "demo")
        .with_field("key", key.clone())
        .with_field("value", format!("value-{worker}"));
    let _ = pool_request(&pool, &lane.addr, put).await;
    while !stop.load(Ordering::Relaxed) {
        if !lane.active.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let get = RemotingCommand::request(code::GET_KV_CONFIG)
            .with_field("namespace", "demo")
            .with_field("key", key.clone());
        let began = Instant::now();
        let outcome = pool_request(&pool, &lane.addr, get).await;
        let latency = began.elapsed();
        let pause = match &outcome {
            Ok(response) if response.code != code::SYSTEM_ERROR => {
                let mut w = lane.window.lock().unwrap();
                w.ok += 1;
                w.latencies_us.push(latency.as_micros() as u64);
                lane.totals.lock().unwrap().ok += 1;
                Duration::from_millis(10)
            }
            Err(CallError::Pool(PoolError::Backoff { retry_after, .. })) => {
                // Refused at once, without a connect: not a request, not counted.
                (*retry_after).min(Duration::from_millis(100))
            }
            _ => {
                count_error(lane);
                Duration::from_millis(20)
            }
        };
        tokio::time::sleep(pause).await;
    }
}

fn count_error(lane: &Lane) {
    lane.window.lock().unwrap().errors += 1;
    lane.totals.lock().unwrap().errors += 1;
}

/// Watches each address's pooled connection every 20 ms and journals what changed: a connection
/// that disappeared was evicted (the reason read off its own metrics: closed transport, unhealthy,
/// or idle), a new one is a (re)connect.
async fn watcher(pool: Pool, lanes: Arc<Vec<Lane>>, stop: Arc<AtomicBool>, journal: Arc<Journal>) {
    let max_idle = pool.config().max_idle;
    let mut failures_seen: Vec<u32> = vec![0; lanes.len()];
    while !stop.load(Ordering::Relaxed) {
        for (i, lane) in lanes.iter().enumerate() {
            let current = pool.peek(&lane.addr);
            let mut last = lane.last_seen.lock().unwrap();
            let changed = match (&*last, &current) {
                (Some(a), Some(b)) => a.id() != b.id(),
                (None, None) => false,
                _ => true,
            };
            if changed {
                if let Some(old) = last.as_ref() {
                    let m = old.metrics();
                    let mut ev = lane.evictions.lock().unwrap();
                    // Read off the connection's own metrics, not its client: the pool closes the
                    // client of every connection it evicts.
                    let (kind, why) = if m.is_closed() {
                        ev.closed += 1;
                        ("closed", "transport closed")
                    } else if !m.is_healthy() {
                        ev.unhealthy += 1;
                        ("unhealthy", "unhealthy")
                    } else if m.is_idle_at(Instant::now(), max_idle) {
                        ev.idle += 1;
                        ("idle", "idle")
                    } else {
                        ("other", "removed")
                    };
                    journal.note(
                        kind,
                        format!(
                            "{:<8} connection {} evicted: {why} (after {} ok, {} errors)",
                            lane.role,
                            old.id(),
                            m.success_count(),
                            m.total_errors()
                        ),
                    );
                }
                if let Some(new) = current.as_ref() {
                    if last.is_some() || lane.reconnects.load(Ordering::Relaxed) > 0 {
                        journal.note(
                            "reconnect",
                            format!("{:<8} reconnected as {}", lane.role, new.id()),
                        );
                    }
                    lane.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                *last = current;
            }
            drop(last);
            // A new failure of the address (failed connect, unhealthy eviction, a connection that
            // died young) raises its ejection count and backs it off for longer; quiet time lowers
            // the count again.
            let ejections = pool.ejection_count(&lane.addr);
            if ejections > failures_seen[i]
                && let Some(until) = pool.backoff_until(&lane.addr)
            {
                let left = until.saturating_duration_since(Instant::now());
                journal.note(
                    if ejections > 1 { "growing" } else { "backoff" },
                    format!(
                        "{:<8} ejection {ejections}: backing off {:.1}s",
                        lane.role,
                        left.as_secs_f64(),
                    ),
                );
            } else if ejections < failures_seen[i] {
                journal.note(
                    "decay",
                    format!(
                        "{:<8} quiet: ejection count {} -> {ejections}",
                        lane.role, failures_seen[i]
                    ),
                );
            }
            failures_seen[i] = ejections;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[rank.min(sorted.len() - 1)])
}

fn ms(us: Option<u64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{:.1}ms", us as f64 / 1000.0))
}

fn print_table(pool: &Pool, lanes: &[Lane], journal: &Journal, servers: &[MiniServer], tty: bool) {
    let mut out = String::new();
    let t = journal.start.elapsed().as_secs_f64();
    if tty {
        out.push_str("\x1b[H\x1b[2J");
    } else {
        out.push('\n');
    }
    out.push_str(&format!(
        "keyed-pool demo  t={t:5.1}s  max_idle={:?}  request timeout={REQUEST_TIMEOUT:?}\n",
        pool.config().max_idle.unwrap_or_default()
    ));
    out.push_str(
        "CONN = pooled connection id, INFL = calls in flight, EVICT = evictions so far \
         (idle/unhealthy/closed), EJ = ejection count, BACKOFF = time until the next connect may be \
         tried\n",
    );
    out.push_str(&format!(
        "{:<8} {:<16} {:<12} {:>5} {:>5} {:>6} {:>6} {:>8} {:>8} {:>13} {:>3} {:>8}\n",
        "ROLE",
        "ADDRESS",
        "STATE",
        "CONN",
        "INFL",
        "REQ/S",
        "ERR%",
        "P50",
        "P99",
        "EVICT i/u/c",
        "EJ",
        "BACKOFF"
    ));
    let now = Instant::now();
    for (lane, server) in lanes.iter().zip(servers) {
        let window = std::mem::take(&mut *lane.window.lock().unwrap());
        let mut latencies = window.latencies_us;
        latencies.sort_unstable();
        let calls = window.ok + window.errors;
        let err_pct = if calls == 0 {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * window.errors as f64 / calls as f64)
        };
        let conn = pool.peek(&lane.addr);
        let backoff = pool.backoff_until(&lane.addr);
        let state = match (&conn, backoff) {
            (Some(c), _) if !c.is_healthy() => "unhealthy",
            (Some(c), _) if c.is_idle(pool.config().max_idle.unwrap_or(Duration::MAX)) => "idle",
            (Some(_), _) => "connected",
            (None, Some(_)) => "backoff",
            (None, None) if !server.is_running() => "server down",
            (None, None) => "no conn",
        };
        let ev = *lane.evictions.lock().unwrap();
        out.push_str(&format!(
            "{:<8} {:<16} {:<12} {:>5} {:>5} {:>6} {:>6} {:>8} {:>8} {:>13} {:>3} {:>8}\n",
            lane.role,
            lane.addr.as_str(),
            state,
            conn.as_ref().map_or("-".into(), |c| c.id().to_string()),
            conn.as_ref().map_or(0, |c| c.metrics().in_flight()),
            calls,
            err_pct,
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            format!("{}/{}/{}", ev.idle, ev.unhealthy, ev.closed),
            pool.ejection_count(&lane.addr),
            backoff.map_or("-".into(), |b| format!(
                "{:.1}s",
                b.saturating_duration_since(now).as_secs_f64()
            )),
        ));
    }
    let stats = pool.stats();
    out.push_str(&format!(
        "pool: {} connections, {} in flight | connects {} ok / {} failed | {} calls refused by backoff\n",
        stats.total,
        stats.in_flight,
        stats.connects.succeeded,
        stats.connects.failed,
        stats.connects.backoff_rejections
    ));
    out.push_str("recent events:\n");
    for line in journal.recent.lock().unwrap().iter() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

fn summary(pool: &Pool, lanes: &[Lane], journal: &Journal, servers: &[MiniServer]) -> bool {
    let stats = pool.stats();
    println!(
        "\n=== summary after {:.1}s ===",
        journal.start.elapsed().as_secs_f64()
    );
    println!(
        "{:<8} {:>9} {:>8} {:>13} {:>10} {:>16}",
        "ROLE", "requests", "errors", "EVICT i/u/c", "connects", "server accepted"
    );
    for (lane, server) in lanes.iter().zip(servers) {
        let totals = lane.totals.lock().unwrap();
        let ev = *lane.evictions.lock().unwrap();
        println!(
            "{:<8} {:>9} {:>8} {:>13} {:>10} {:>16}",
            lane.role,
            totals.ok + totals.errors,
            totals.errors,
            format!("{}/{}/{}", ev.idle, ev.unhealthy, ev.closed),
            lane.reconnects.load(Ordering::Relaxed),
            server.stats().accepted
        );
    }
    let e = stats.evictions;
    println!(
        "pool evictions: idle {} unhealthy {} closed {} replaced {} manual {} make room {}",
        e.idle, e.unhealthy, e.closed, e.replaced, e.manual, e.make_room
    );
    let c = stats.connects;
    println!(
        "pool connects: attempted {} succeeded {} failed {} timed out {} shared {}; refused by backoff {}",
        c.attempted, c.succeeded, c.failed, c.timed_out, c.shared, c.backoff_rejections
    );
    let seen = journal.seen.lock().unwrap();
    let mut all = true;
    println!("lifecycle events seen:");
    for (kind, label) in [
        ("idle", "idle eviction"),
        ("unhealthy", "health eviction"),
        ("closed", "closed-transport eviction"),
        ("backoff", "backoff"),
        ("growing", "backoff growing"),
        ("decay", "ejection count decaying"),
        ("reconnect", "reconnect"),
    ] {
        let n = seen.get(kind).copied().unwrap_or(0);
        all &= n > 0;
        println!(
            "  {label:<26} {}",
            if n > 0 {
                format!("yes ({n})")
            } else {
                "NO".into()
            }
        );
    }
    if !all {
        println!("some lifecycle event never happened (DEMO_SECONDS too short?)");
    }
    all
}
