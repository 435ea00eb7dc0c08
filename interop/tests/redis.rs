//! Interop: the pool with `redis::aio::MultiplexedConnection` against three real `redis-server`s on
//! loopback (Debian's package; `scripts/install-redis.sh` installs it). One of them is killed twice
//! mid-traffic and restarted on its port: once the pool finds it again when its backoff passes
//! (I15), once at once after `mark_up`. Real processes and real time, so not under madsim.
//!
//! The binary is `KEYED_POOL_REDIS_BIN`, else `redis-server` on `PATH`. Without it (as the build
//! script finds it) the test is reported as ignored, with the command that installs it; `.ci/run`
//! installs it and requires the test to have run. If it disappears between the build and the run,
//! the test fails under `KEYED_POOL_REQUIRE_REDIS=1`.
#![cfg(not(madsim))]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyed_pool::{CallError, CheetahString, ConnId, ConnectionPool, PoolError, PoolStats};
use keyed_pool_interop::server::{RedisServer, find_redis_server};
use keyed_pool_interop::{RedisConnector, call};
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

type Pool = ConnectionPool<MultiplexedConnection, RedisConnector>;

const TASKS: usize = 4;
/// Each traffic task stops after this many rounds (one SET and one GET per server per round), or
/// when the test says so, or at `TRAFFIC_LIMIT`, whichever comes first.
const MAX_ROUNDS: u64 = 20_000;
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound on every command (the pool's `call_timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const JITTER: f64 = 0.2;

/// What the traffic saw at one address. Counts are of commands (a SET or a GET).
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    /// The command failed on its connection (reset, closed...) or timed out.
    redis_errors: AtomicU64,
    /// `PoolError::Backoff`: refused without a connect.
    backoffs: AtomicU64,
    /// `PoolError::Connect` / `ConnectTimeout`: a connect was made and failed.
    connect_errors: AtomicU64,
    /// Any other pool error, or a GET that did not read back its SET.
    other: AtomicU64,
    /// Nanoseconds since `epoch` of the first success after the test last set it to 0.
    first_ok: AtomicU64,
}

impl Seen {
    fn failures(&self) -> u64 {
        self.redis_errors.load(Ordering::Relaxed)
            + self.backoffs.load(Ordering::Relaxed)
            + self.connect_errors.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }

    /// Redis errors, backoffs, connect errors, others.
    fn by_kind(&self) -> [u64; 4] {
        [
            self.redis_errors.load(Ordering::Relaxed),
            self.backoffs.load(Ordering::Relaxed),
            self.connect_errors.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed),
        ]
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn record<T>(&self, result: &Result<T, CallError<redis::RedisError>>, epoch: Instant) {
        let counter = match result {
            Ok(_) => {
                let now = u64::try_from(epoch.elapsed().as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let _ =
                    self.first_ok
                        .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
                &self.ok
            }
            Err(CallError::Call(_) | CallError::TimedOut { .. }) => &self.redis_errors,
            Err(CallError::Pool(PoolError::Backoff { .. })) => &self.backoffs,
            Err(CallError::Pool(PoolError::Connect { .. } | PoolError::ConnectTimeout { .. })) => {
                &self.connect_errors
            }
            Err(_) => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Traffic {
    seen: Vec<Seen>,
    stop: AtomicBool,
    epoch: Instant,
}

impl Traffic {
    /// The instant of the first success at `server` since its `first_ok` was reset.
    fn first_ok(&self, server: usize) -> Option<Instant> {
        match self.seen[server].first_ok.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.epoch + Duration::from_nanos(nanos)),
        }
    }
}

/// One traffic task: round after round, a SET and a GET of its own key at every server, bounded in
/// rounds and time.
async fn drive(pool: Pool, addrs: Vec<CheetahString>, traffic: Arc<Traffic>, task: usize) -> u64 {
    let deadline = Instant::now() + TRAFFIC_LIMIT;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && !traffic.stop.load(Ordering::Relaxed) && Instant::now() < deadline
    {
        let key = format!("task{task}:{}", rounds % 8);
        let value = format!("{task}-{rounds}");
        for (server, addr) in addrs.iter().enumerate() {
            let seen = &traffic.seen[server];
            let set = call::<()>(&pool, addr, redis::cmd("SET").arg(&key).arg(&value)).await;
            seen.record(&set, traffic.epoch);
            if set.is_err() {
                continue;
            }
            let get = call::<Option<String>>(&pool, addr, redis::cmd("GET").arg(&key)).await;
            seen.record(&get, traffic.epoch);
            // A restart between the SET and the GET loses the key (no persistence): only then may
            // the value be missing, never wrong.
            if let Ok(got) = get
                && got.as_ref().is_some_and(|got| *got != value)
            {
                seen.other.fetch_add(1, Ordering::Relaxed);
            }
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rounds
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn id_at(pool: &Pool, addr: &CheetahString) -> Option<ConnId> {
    pool.peek(addr).map(|c| c.id())
}

/// The books when a server was killed.
struct Killed {
    before: PoolStats,
    /// The victim's failures by kind ([`Seen::by_kind`]).
    failures: [u64; 4],
    others_ok: u64,
    /// The victim's successes once its death was seen (evicted, backing off).
    ok_when_dead: u64,
}

/// The figures of one outage.
struct Outage {
    failed: u64,
    backoffs: u64,
    connect_errors: u64,
    redis_errors: u64,
    others_ok: u64,
    connects_attempted: u64,
    since_spawn: Duration,
    since_ready: Duration,
}

/// Kills `servers[victim]` mid-traffic and checks, from outside the pool, that its connection is
/// evicted and that its address backs off. (That the other servers saw no failure is checked at
/// the end, over the whole run.)
async fn kill_and_check(
    pool: &Pool,
    servers: &mut [RedisServer],
    victim: usize,
    traffic: &Traffic,
) -> Killed {
    let addr = servers[victim].addr();
    let killed = Killed {
        before: pool.stats(),
        failures: traffic.seen[victim].by_kind(),
        others_ok: (0..servers.len())
            .filter(|&s| s != victim)
            .map(|s| traffic.seen[s].ok())
            .sum(),
        ok_when_dead: 0,
    };
    let old = pool.get(&addr).expect("the victim is connected");
    servers[victim].kill();

    // The dead connection: marked closed by the first command that fails on it, never handed out
    // again (I8), evicted by the next caller for its address.
    wait_until(
        "the dead connection is marked closed",
        Duration::from_secs(5),
        || old.metrics().is_closed(),
    )
    .await;
    assert!(
        pool.get(&addr).is_none_or(|c| c.id() != old.id()),
        "I8: a connection known closed is never handed out"
    );
    wait_until(
        "the dead connection is evicted",
        Duration::from_secs(5),
        || id_at(pool, &addr) != Some(old.id()),
    )
    .await;
    let evicted = pool.stats().evictions;
    assert!(
        evicted.closed + evicted.unhealthy
            > killed.before.evictions.closed + killed.before.evictions.unhealthy,
        "evicted as closed or unhealthy: {evicted:?}"
    );

    // The address backs off (I12): callers are refused at once, without a connect.
    wait_until("the address backs off", Duration::from_secs(5), || {
        pool.backoff_until(&addr).is_some()
    })
    .await;
    assert!(pool.ejection_count(&addr) >= 1);
    // A caller of our own meets the backoff too. (Should this thread be descheduled past the
    // backoff's end, its connect is refused; then it tries again at the next backoff.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            Instant::now() < deadline,
            "no PoolError::Backoff within 5 s"
        );
        if let Some(until) = pool.backoff_until(&addr)
            && until > Instant::now() + Duration::from_millis(50)
        {
            match pool.get_or_connect(&addr).await {
                Err(PoolError::Backoff { retry_after, .. }) => {
                    assert!(retry_after <= BACKOFF_MAX.mul_f64(1.0 + JITTER));
                    break;
                }
                Err(PoolError::Connect { .. } | PoolError::ConnectTimeout { .. }) => {}
                other => panic!(
                    "expected PoolError::Backoff, got {:?}",
                    other.map(|c| c.id())
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Killed {
        ok_when_dead: traffic.seen[victim].ok(),
        ..killed
    }
}

/// Restarts the victim on its port; returns when it was spawned and when it answered. Successes
/// are counted from the spawn: none since the kill was seen.
async fn restart(server: &mut RedisServer, seen: &Seen, killed: &Killed) -> (Instant, Instant) {
    assert_eq!(
        seen.ok(),
        killed.ok_when_dead,
        "no success while the server is dead"
    );
    seen.first_ok.store(0, Ordering::Relaxed);
    let spawned = Instant::now();
    server.restart().expect("restart");
    server.wait_ready().await.expect("restarted");
    (spawned, Instant::now())
}

/// Waits (at most `limit`) for the victim's first success after its restart (`spawned`, then
/// `ready` when it answered) and gathers the outage's figures.
async fn recovered(
    pool: &Pool,
    victim: usize,
    traffic: &Traffic,
    killed: Killed,
    (spawned, ready): (Instant, Instant),
    limit: Duration,
) -> Outage {
    wait_until("the pool reconnects after the restart", limit, || {
        traffic.first_ok(victim).is_some()
    })
    .await;
    let first_ok = traffic.first_ok(victim).expect("a success");
    let now = traffic.seen[victim].by_kind();
    let others_ok: u64 = (0..traffic.seen.len())
        .filter(|&s| s != victim)
        .map(|s| traffic.seen[s].ok())
        .sum();
    Outage {
        redis_errors: now[0] - killed.failures[0],
        backoffs: now[1] - killed.failures[1],
        connect_errors: now[2] - killed.failures[2],
        failed: now.iter().sum::<u64>() - killed.failures.iter().sum::<u64>(),
        others_ok: others_ok - killed.others_ok,
        connects_attempted: pool.stats().connects.attempted - killed.before.connects.attempted,
        since_spawn: first_ok.saturating_duration_since(spawned),
        since_ready: first_ok.saturating_duration_since(ready),
    }
}

fn report(label: &str, o: &Outage) {
    eprintln!(
        "interop_redis: {label}: first success {:.1} ms after the restart ({:.1} ms after the \
         server answered); {} commands failed during the outage ({} on the dead connection, {} \
         refused by backoff, {} on a refused connect); {} connect(s) made; {} commands to the other two \
         servers meanwhile, all ok",
        o.since_spawn.as_secs_f64() * 1e3,
        o.since_ready.as_secs_f64() * 1e3,
        o.failed,
        o.redis_errors,
        o.backoffs,
        o.connect_errors,
        o.connects_attempted,
        o.others_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(redis_found),
    ignore = "redis-server not found: run `bash scripts/install-redis.sh` to run this test"
)]
async fn the_pool_survives_a_redis_server_killed_and_restarted() {
    let Some(binary) = find_redis_server() else {
        let required = std::env::var("KEYED_POOL_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "KEYED_POOL_REQUIRE_REDIS=1 but redis-server was not found (KEYED_POOL_REDIS_BIN, \
             PATH); run `bash scripts/install-redis.sh`"
        );
        eprintln!(
            "SKIPPED interop_redis: redis-server not found (run `bash scripts/install-redis.sh`; \
             KEYED_POOL_REQUIRE_REDIS=1 makes this a failure)"
        );
        return;
    };
    let started = Instant::now();
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(RedisServer::start(&binary).await.expect("redis-server"));
    }
    let addrs: Vec<CheetahString> = servers.iter().map(RedisServer::addr).collect();
    eprintln!(
        "interop_redis: {} ({}) on {addrs:?}",
        binary.display(),
        String::from_utf8_lossy(
            &Command::new(&binary)
                .arg("--version")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    );

    let pool: Pool = ConnectionPool::builder()
        .max_connections(8)
        .connect_timeout(CONNECT_TIMEOUT)
        .call_timeout(CALL_TIMEOUT)
        .backoff(BACKOFF_BASE, BACKOFF_MAX, JITTER)
        .connector(RedisConnector)
        .build()
        .expect("valid config");

    // One connection per server, shared by every task.
    for addr in &addrs {
        let pong: String = call(&pool, addr, &redis::cmd("PING")).await.expect("ping");
        assert_eq!(pong, "PONG");
    }
    // An error reply is the command's failure, not the connection's: it counts as a success.
    let list = &addrs[0];
    call::<()>(&pool, list, redis::cmd("RPUSH").arg("a-list").arg(1))
        .await
        .expect("rpush");
    let err = call::<Option<String>>(&pool, list, redis::cmd("GET").arg("a-list"))
        .await
        .expect_err("GET of a list");
    assert!(
        matches!(&err, CallError::Call(e) if e.code() == Some("WRONGTYPE")),
        "expected WRONGTYPE, got {err}"
    );
    let conn = pool.get(list).expect("still pooled and healthy");
    assert_eq!(
        (
            conn.metrics().success_count(),
            conn.metrics().total_errors()
        ),
        (3, 0),
        "PING, RPUSH and the WRONGTYPE reply: three successes"
    );
    drop(conn);
    let ids: Vec<ConnId> = addrs
        .iter()
        .map(|a| id_at(&pool, a).expect("pooled"))
        .collect();
    let traffic = Arc::new(Traffic {
        seen: (0..3).map(|_| Seen::default()).collect(),
        stop: AtomicBool::new(false),
        epoch: Instant::now(),
    });
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            tokio::spawn(drive(
                pool.clone(),
                addrs.clone(),
                Arc::clone(&traffic),
                task,
            ))
        })
        .collect();
    let victim = 2;
    let others = [0, 1];
    wait_until("warm-up traffic", Duration::from_secs(5), || {
        traffic.seen.iter().all(|s| s.ok() >= 200)
    })
    .await;
    assert_eq!(
        traffic.seen.iter().map(Seen::failures).sum::<u64>(),
        0,
        "no failure before the kill"
    );
    assert_eq!(
        pool.stats().connects.attempted,
        3,
        "one connect per server, multiplexed"
    );

    // --- Outage 1: recovery when the backoff passes (I15), with no help.
    let killed = kill_and_check(&pool, &mut servers, victim, &traffic).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // a second of outage, traffic going on
    let (spawned, ready) = restart(&mut servers[victim], &traffic.seen[victim], &killed).await;
    let backoff_left = pool
        .backoff_until(&addrs[victim])
        .map(|u| u.saturating_duration_since(ready));
    // I15: once the fault stops, within the longest backoff plus one connect timeout (and slack
    // for a loaded machine).
    let bound = BACKOFF_MAX.mul_f64(1.0 + JITTER) + CONNECT_TIMEOUT + Duration::from_secs(1);
    let first = recovered(&pool, victim, &traffic, killed, (spawned, ready), bound).await;
    if let Some(left) = backoff_left {
        // I12: no connect before the backoff's end (timer rounding aside).
        assert!(
            first.since_ready + Duration::from_millis(5) >= left,
            "reconnected {:?} after the server was ready, before the backoff's end ({left:?})",
            first.since_ready
        );
    }
    report("outage 1 (recovery when the backoff passes)", &first);
    eprintln!(
        "interop_redis: outage 1: backoff left when the server answered: {:?}; ejection count {}",
        backoff_left,
        pool.ejection_count(&addrs[victim])
    );

    // Steady again: the victim's new connection serves every command.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let victim_failures = traffic.seen[victim].failures();
    let victim_ok = traffic.seen[victim].ok();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        traffic.seen[victim].failures(),
        victim_failures,
        "no failure once recovered"
    );
    assert!(
        traffic.seen[victim].ok() > victim_ok + 50,
        "traffic flows to the restarted server"
    );

    // --- Outage 2: recovery at once after `mark_up`, while the backoff still has long to run.
    let killed = kill_and_check(&pool, &mut servers, victim, &traffic).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_until(
        "a backoff with more than 1 s left",
        Duration::from_secs(5),
        || {
            pool.backoff_until(&addrs[victim])
                .is_some_and(|u| u > Instant::now() + Duration::from_secs(1))
        },
    )
    .await;
    let (spawned, ready) = restart(&mut servers[victim], &traffic.seen[victim], &killed).await;
    let skipped = pool
        .backoff_until(&addrs[victim])
        .map(|u| u.saturating_duration_since(ready));
    assert!(
        skipped.is_some(),
        "still backing off when the server is back"
    );
    pool.mark_up(&addrs[victim]);
    assert!(
        pool.backoff_until(&addrs[victim]).is_none(),
        "mark_up ends the backoff"
    );
    assert_eq!(
        pool.ejection_count(&addrs[victim]),
        0,
        "mark_up resets the ejection count"
    );
    let limit = CONNECT_TIMEOUT + Duration::from_secs(1);
    let second = recovered(&pool, victim, &traffic, killed, (spawned, ready), limit).await;
    assert!(
        Some(second.since_ready) < skipped,
        "mark_up: reconnected after {:?}, not before the backoff's end ({skipped:?})",
        second.since_ready
    );
    report("outage 2 (recovery after mark_up)", &second);
    eprintln!("interop_redis: outage 2: mark_up skipped {skipped:?} of backoff");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // --- The end: stop the traffic, then the books.
    traffic.stop.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    for task in tasks {
        rounds += task.await.expect("traffic task");
    }
    for &s in &others {
        let seen = &traffic.seen[s];
        assert_eq!(
            seen.failures(),
            0,
            "server {s}: every command succeeded, outages included"
        );
        assert_eq!(
            id_at(&pool, &addrs[s]),
            Some(ids[s]),
            "server {s}: its first connection still"
        );
    }
    for (o, outage) in [&first, &second].into_iter().enumerate() {
        assert!(
            outage.failed > 0,
            "outage {}: the dead server's commands failed",
            o + 1
        );
        assert!(
            outage.backoffs > 0,
            "outage {}: callers met the backoff",
            o + 1
        );
        assert!(
            outage.others_ok > 100,
            "outage {}: traffic went on to the others",
            o + 1
        );
    }
    let stats = pool.stats();
    assert_eq!(
        stats.connects.succeeded, 5,
        "3 + one reconnect per restart: {stats:?}"
    );
    assert_eq!(stats.total, 3);
    assert_eq!(stats.healthy, 3);
    assert!(
        stats.evictions.closed + stats.evictions.unhealthy >= 2,
        "{stats:?}"
    );
    eprintln!(
        "interop_redis: {rounds} rounds in {:.1} s; ok {:?}; failed {:?}; connects {:?}; \
         evictions closed {} unhealthy {}",
        started.elapsed().as_secs_f64(),
        traffic.seen.iter().map(Seen::ok).collect::<Vec<_>>(),
        traffic.seen.iter().map(Seen::failures).collect::<Vec<_>>(),
        stats.connects,
        stats.evictions.closed,
        stats.evictions.unhealthy
    );
    pool.close().await;
    drop(servers); // killed and their directories removed
}
