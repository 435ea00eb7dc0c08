//! Interop: the pool and its remoting transport against a real RocketMQ name server
//! (`rocketmq-namesrv-rust` from the `rocketmq-namesrv` crate; `scripts/install-namesrv.sh`
//! installs it). Real processes and real time, so not under madsim.
//!
//! The binary is looked up in `KEYED_POOL_NAMESRV_BIN`, then on `PATH`, then in `$CARGO_HOME/bin`.
//! Without it (as the build script finds it) the test is reported as ignored, with the command that
//! installs it; `.ci/run` installs it and requires the test to have run. If it disappears between
//! the build and the run, the test fails under `KEYED_POOL_REQUIRE_NAMESRV=1`.
#![cfg(not(madsim))]

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyed_pool::core::EjectionPolicy;
use keyed_pool::{CheetahString, ConnectionPool, PoolError};
use keyed_pool_remoting::codec::code;
use keyed_pool_remoting::{
    CallError, ClientConfig, RemotingClient, RemotingCommand, RemotingConnector, pool_request,
};

const BINARY: &str = "rocketmq-namesrv-rust";
const NAMESPACE: &str = "keyed-pool-interop";

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEYED_POOL_NAMESRV_BIN") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(BINARY));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join(BINARY));
    on_path.chain(cargo_home).find(|p| p.is_file())
}

/// A name server child process in its own temporary home; killed and cleaned up on drop.
struct NameServer {
    binary: PathBuf,
    home: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl NameServer {
    fn start(binary: &Path) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let home = std::env::temp_dir().join(format!(
            "keyed-pool-namesrv-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&home).expect("temp dir");
        // A free port: bind port 0, note it, release it for the child.
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            binary: binary.to_path_buf(),
            home,
            port,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("namesrv.log"))
            .expect("log file");
        let child = Command::new(&self.binary)
            .arg("--listenPort")
            .arg(self.port.to_string())
            .arg("--bindAddress")
            .arg("127.0.0.1")
            .arg("--rocketmqHome")
            .arg(&self.home)
            .arg("--kvConfigPath")
            .arg(self.home.join("kvConfig.json"))
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start the name server");
        self.child = Some(child);
    }

    fn addr(&self) -> CheetahString {
        format!("127.0.0.1:{}", self.port).into()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.home.join("namesrv.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits (bounded) until the server answers a probe on a connection of its own.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let config = ClientConfig::default().request_timeout(Duration::from_secs(2));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the name server exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(client) = RemotingClient::connect(self.addr().as_str(), config.clone()).await
                && client.probe().await.is_ok()
            {
                client.close();
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the name server did not come up within 30 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn put(key: &str, value: &str) -> RemotingCommand {
    RemotingCommand::request(code::PUT_KV_CONFIG)
        .with_field("namespace", NAMESPACE)
        .with_field("key", key)
        .with_field("value", value)
}

fn get(key: &str) -> RemotingCommand {
    RemotingCommand::request(code::GET_KV_CONFIG)
        .with_field("namespace", NAMESPACE)
        .with_field("key", key)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(namesrv_found),
    ignore = "rocketmq-namesrv-rust not found: run `bash scripts/install-namesrv.sh` to run this test"
)]
async fn the_pool_works_against_a_real_name_server() {
    let Some(binary) = find_binary() else {
        let required = std::env::var("KEYED_POOL_REQUIRE_NAMESRV").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "KEYED_POOL_REQUIRE_NAMESRV=1 but {BINARY} was not found (KEYED_POOL_NAMESRV_BIN, \
             PATH, $CARGO_HOME/bin); run scripts/install-namesrv.sh"
        );
        eprintln!(
            "SKIPPED interop_namesrv: {BINARY} not found (set KEYED_POOL_NAMESRV_BIN or run \
             scripts/install-namesrv.sh; KEYED_POOL_REQUIRE_NAMESRV=1 makes this a failure)"
        );
        return;
    };
    eprintln!("interop_namesrv: using {}", binary.display());
    let mut server = NameServer::start(&binary);
    server.wait_ready().await;
    let addr = server.addr();

    let backoff_base = Duration::from_millis(200);
    let pool = ConnectionPool::builder()
        .max_connections(4)
        .consecutive_failures(3)
        .backoff(backoff_base, Duration::from_secs(1), 0.0)
        // However young the connection is when the server is killed below, its death is not
        // counted as the address's failure here, so the refused connect that follows is the
        // first failure (the short-lived rule is checked in the crate's own tests and the
        // simulation).
        .ejection(EjectionPolicy {
            short_lived: Duration::ZERO,
            ..EjectionPolicy::default()
        })
        .connect_timeout(Duration::from_secs(2))
        .connector(RemotingConnector::new(
            ClientConfig::default().request_timeout(Duration::from_secs(5)),
        ))
        .build::<RemotingClient>()
        .expect("valid config");

    // --- KV config: put, get, and an application-level "not found".
    let value = format!("hello from pid {}", std::process::id());
    let response = pool_request(&pool, &addr, put("greeting", &value))
        .await
        .expect("put");
    assert!(response.is_success(), "put answered {response:?}");
    let response = pool_request(&pool, &addr, get("greeting"))
        .await
        .expect("get");
    assert!(response.is_success(), "get answered {response:?}");
    assert_eq!(response.field("value"), Some(value.as_str()));
    let missing = pool_request(&pool, &addr, get("no-such-key"))
        .await
        .expect("get missing");
    assert_eq!(missing.code, code::QUERY_NOT_FOUND, "{missing:?}");

    // --- Topic list: a JSON body with a topicList array.
    let topics = pool_request(
        &pool,
        &addr,
        RemotingCommand::request(code::GET_ALL_TOPIC_LIST_FROM_NAMESERVER),
    )
    .await
    .expect("topic list");
    assert!(topics.is_success(), "{topics:?}");
    let body = String::from_utf8_lossy(&topics.body);
    assert!(body.contains("\"topicList\""), "topic list body: {body}");

    // --- The probe, through the pool.
    let conn = pool.get(&addr).expect("pooled");
    pool.probe(&conn).await.expect("probe");
    let first_id = conn.id();
    let calls_before = conn.metrics().success_count();
    assert_eq!(
        calls_before, 5,
        "every call above was recorded as a success"
    );

    // --- Many concurrent requests over one pooled connection.
    let peak = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let pool = pool.clone();
        let addr = addr.clone();
        let value = value.clone();
        let peak = Arc::clone(&peak);
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = if i % 4 == 0 {
                RemotingCommand::request(code::GET_NAMESRV_CONFIG)
            } else {
                get("greeting")
            };
            let response = pool_request(&pool, &addr, cmd).await;
            peak.fetch_max(conn.metrics().in_flight(), Ordering::Relaxed);
            let response = response.expect("concurrent request");
            assert!(response.is_success(), "{response:?}");
            if i % 4 != 0 {
                assert_eq!(response.field("value"), Some(value.as_str()));
            }
        }));
    }
    for task in tasks {
        task.await.expect("request task");
    }
    assert_eq!(conn.metrics().success_count(), calls_before + 200);
    assert_eq!(conn.metrics().total_errors(), 0);
    assert_eq!(pool.get(&addr).map(|c| c.id()), Some(first_id));
    let stats = pool.stats();
    assert_eq!(
        (stats.total, stats.connects.succeeded),
        (1, 1),
        "one connection, multiplexed"
    );
    eprintln!(
        "interop_namesrv: 200 concurrent requests over connection {first_id}, peak in flight {}",
        peak.load(Ordering::Relaxed)
    );
    assert!(peak.load(Ordering::Relaxed) > 1, "requests overlapped");

    // --- Kill the server: the connection is known closed, never handed out, and evicted.
    server.kill();
    wait_until(
        "the client sees the connection die",
        Duration::from_secs(5),
        || !conn.client().is_open(),
    )
    .await;
    assert!(
        pool.get(&addr).is_none(),
        "I8: a closed transport is never handed out"
    );
    assert_eq!(pool.evict_unhealthy().await, 1);
    let stats = pool.stats();
    assert_eq!(stats.total, 0);
    assert_eq!(stats.evictions.closed + stats.evictions.unhealthy, 1);
    // A call now fails to connect (refused), and the address backs off (I12).
    let err = pool_request(&pool, &addr, get("greeting"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Connect { .. })),
        "expected a refused connect, got {err}"
    );
    assert!(
        pool.backoff_until(&addr).is_some(),
        "I12: the failed connect backs off"
    );
    // The next call is refused without a connect: the connect task retires its flight and records
    // the backoff in one step before it publishes, so no caller can join the finished flight.
    match pool_request(&pool, &addr, get("greeting")).await {
        Err(CallError::Pool(PoolError::Backoff { failures: 1, .. })) => {}
        other => panic!("expected backoff, got {other:?}"),
    }
    let stats = pool.stats();
    assert_eq!(
        (stats.connects.failed, stats.connects.shared),
        (1, 0),
        "no second connect while backing off"
    );
    assert!(stats.connects.backoff_rejections >= 1);

    // --- Restart it on the same port: the pool reconnects once its backoff has passed (I15).
    server.spawn();
    let restarted = Instant::now();
    let mut refused = 0;
    let response = loop {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "no reconnect within 30 s of the restart:\n{}",
            server.log_tail()
        );
        match pool_request(&pool, &addr, get("greeting")).await {
            Ok(response) => break response,
            Err(CallError::Pool(PoolError::Backoff { retry_after, .. })) => {
                assert!(
                    retry_after <= Duration::from_millis(1200),
                    "{retry_after:?}"
                );
                tokio::time::sleep(retry_after).await;
            }
            Err(CallError::Pool(PoolError::Connect { .. })) => refused += 1,
            Err(other) => panic!("unexpected error while reconnecting: {other}"),
        }
    };
    assert!(response.code == code::SUCCESS || response.code == code::QUERY_NOT_FOUND);
    let fresh = pool.get(&addr).expect("reconnected");
    assert_ne!(fresh.id(), first_id);
    assert!(
        pool.ejection_count(&addr) >= 1,
        "I12: a successful connect does not reset the ejection count (it decays when quiet)"
    );
    assert_eq!(pool.stats().connects.succeeded, 2);
    eprintln!(
        "interop_namesrv: reconnected as {} after {:?} ({refused} refused connect(s) while it \
         started)",
        fresh.id(),
        restarted.elapsed()
    );
    pool.close().await;
    assert!(
        !fresh.client().is_open(),
        "I17: close closes every connection"
    );
}
