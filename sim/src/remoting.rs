//! The `remoting` scenario: the library's own RocketMQ remoting transport (`RemotingClient`,
//! `RemotingConnector`) against `MiniServer`s on broker nodes, under restarts, partitions, slow,
//! silent, failing and connection-dropping servers. Checks I1, I3, I8, I9, I15, I16 and, from the
//! servers' side, pool count = server count at quiescence and zero open connections once the pool
//! is dropped (I17).

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::{CheetahString, ConnectionPool, PoolError, WhenFull};
use keyed_pool_remoting::codec::code;
use keyed_pool_remoting::{
    ClientConfig, MiniServer, RemotingClient, RemotingCommand, RemotingConnector, ServerBehaviour,
    ServerStats, is_server_failure,
};
use tokio::madsim::net::NetSim;
use tokio::madsim::runtime::Handle;
use tokio::madsim::task::NodeId;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep};

use crate::record::Recorder;
use crate::scenarios::Outcome;
use crate::trace;
use crate::world::{chance, draw, ms};

const PORT: u16 = 10911;

enum Cmd {
    Restart,
    Delay(Duration),
    Behaviour(ServerBehaviour),
    Stats(oneshot::Sender<ServerStats>),
}

struct Server {
    node: NodeId,
    addr: CheetahString,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl Server {
    async fn stats(&self) -> Option<ServerStats> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Stats(tx)).ok()?;
        tokio::time::timeout(ms(100), rx).await.ok()?.ok()
    }
}

/// The control task of a broker node: owns the `MiniServer`, obeys the supervisor.
async fn control(slot: Arc<StdMutex<Option<mpsc::UnboundedReceiver<Cmd>>>>) {
    let Some(mut rx) = slot.lock().expect("slot").take() else {
        return;
    };
    let mut server = MiniServer::start(&format!("0.0.0.0:{PORT}"))
        .await
        .expect("mini server binds");
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Cmd::Restart => {
                if server.restart().await.is_err() {
                    panic!("mini server could not listen again");
                }
            }
            Cmd::Delay(d) => server.set_delay(d),
            Cmd::Behaviour(b) => server.set_behaviour(b),
            Cmd::Stats(reply) => {
                let _ = reply.send(server.stats());
            }
        }
    }
}

type Pool = ConnectionPool<RemotingClient, RemotingConnector>;

struct Run {
    rec: Arc<Recorder>,
    pool_max: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    threshold: u32,
}

impl Run {
    fn check(&self, pool: &Pool) {
        let (len, used, reserved) = (pool.len(), pool.used_slots(), pool.stats().reserved);
        if self.pool_max > 0 && (len > self.pool_max || used > self.pool_max) {
            self.rec.fail(
                "I1",
                format!("{len} pooled, {used} slots used, max {}", self.pool_max),
            );
        }
        if used < len || used > len + reserved {
            self.rec.fail(
                "I3",
                format!("{used} slots for {len} connections and {reserved} connects"),
            );
        }
    }

    /// One request through the pool, as `pool_request` makes it, with the checks on what the pool
    /// handed out (I8, I9) and on every wait (I16).
    async fn request(&self, pool: &Pool, addr: &CheetahString) -> Result<(), String> {
        let started = Instant::now();
        let conn = pool.get_or_connect(addr).await;
        if started.elapsed() > self.connect_timeout + ms(1) {
            self.rec.fail(
                "I16",
                format!("get_or_connect({addr}) took {:?}", started.elapsed()),
            );
        }
        let conn = match conn {
            Ok(conn) => conn,
            Err(PoolError::Backoff { retry_after, .. }) => {
                return Err(format!("backoff {retry_after:?}"));
            }
            Err(err) => return Err(err.to_string()),
        };
        if !conn.client().is_open() {
            self.rec.fail(
                "I8",
                format!(
                    "{addr} ({}) handed out with its transport closed",
                    conn.id()
                ),
            );
        }
        if !conn.is_healthy()
            || (self.threshold > 0 && conn.metrics().consecutive_errors() >= self.threshold)
        {
            self.rec.fail(
                "I9",
                format!(
                    "{addr} ({}) handed out after it was judged unhealthy",
                    conn.id()
                ),
            );
        }
        let call = conn.begin();
        let started = Instant::now();
        let result = conn
            .client()
            .request(RemotingCommand::request(code::GET_NAMESRV_CONFIG))
            .await;
        if started.elapsed() > self.request_timeout + ms(1) {
            self.rec.fail(
                "I16",
                format!("a request to {addr} took {:?}", started.elapsed()),
            );
        }
        let outcome = match result {
            Ok(resp) if is_server_failure(resp.code) => {
                call.failure();
                Err(format!("server failure {}", resp.code))
            }
            Ok(_) => {
                call.success();
                Ok(())
            }
            Err(err) => {
                call.failure();
                if !conn.client().is_open() {
                    conn.mark_closed();
                }
                Err(err.to_string())
            }
        };
        trace!(
            self.rec,
            "remoting {addr} {} {:?}",
            conn.id(),
            outcome.is_ok()
        );
        outcome
    }
}

/// The scenario.
pub async fn remoting() -> Outcome {
    let rec = Arc::new(Recorder::new());
    let started = Instant::now();
    let handle = Handle::current();
    let n = draw(2..5) as usize;
    let pool_max = if chance(0.5) {
        0
    } else {
        draw(1..n as u64 + 1) as usize
    };
    let request_timeout = ms(draw(50..500));
    let connect_timeout = ms(draw(50..800));
    let interval = ms(draw(5..200));
    let threshold = draw(1..6) as u32;
    let info = format!(
        "servers={n} max_connections={pool_max} request_timeout={request_timeout:?} \
         connect_timeout={connect_timeout:?} cleanup={interval:?} consecutive_failures={threshold}"
    );
    trace!(rec, "setup {info}");
    let mut servers = Vec::new();
    for i in 0..n {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = Arc::new(StdMutex::new(Some(rx)));
        let ip: std::net::IpAddr = [10, 0, 2, u8::try_from(i + 1).expect("few")].into();
        let node = handle
            .create_node()
            .name(format!("rs{i}"))
            .ip(ip)
            .init(move || control(Arc::clone(&slot)))
            .build();
        servers.push(Server {
            node: node.id(),
            addr: format!("{ip}:{PORT}").into(),
            cmd: tx,
        });
    }
    let client = handle
        .create_node()
        .name("client")
        .ip([10, 0, 3, 1].into())
        .build();
    let run = Arc::new(Run {
        rec: Arc::clone(&rec),
        pool_max,
        connect_timeout,
        request_timeout,
        threshold,
    });
    let servers = Arc::new(servers);
    let task = client.spawn({
        let run = Arc::clone(&run);
        let servers = Arc::clone(&servers);
        async move {
            sleep(ms(5)).await; // servers bind
            let pool: Pool = ConnectionPool::builder()
                .max_connections(pool_max)
                .when_full(if pool_max > 0 && pool_max < servers.len() {
                    WhenFull::EvictLeastRecentlyUsed
                } else {
                    WhenFull::Reject
                })
                .max_idle(ms(draw(50..3000)))
                .connect_timeout(connect_timeout)
                .consecutive_failures(threshold)
                .backoff(ms(draw(5..100)), ms(draw(100..1000)), 0.2)
                .connector(RemotingConnector::new(ClientConfig::default().request_timeout(request_timeout)))
                .build()
                .expect("valid config");
            let cleanup = pool.start_cleanup_task(interval);
            let until = Instant::now() + ms(draw(1000..5000));
            let mut workers = Vec::new();
            for _ in 0..draw(1..8) {
                let (run, pool, servers) = (Arc::clone(&run), pool.clone(), Arc::clone(&servers));
                workers.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        let s = &servers[draw(0..servers.len() as u64) as usize];
                        let _ = run.request(&pool, &s.addr).await;
                        run.check(&pool);
                        sleep(ms(draw(1..30))).await;
                    }
                }));
            }
            // Faults until the traffic ends.
            let net = NetSim::current();
            while Instant::now() < until {
                sleep(ms(draw(20..600))).await;
                let s = &servers[draw(0..servers.len() as u64) as usize];
                match draw(0..6) {
                    0 => drop(s.cmd.send(Cmd::Restart)),
                    1 => net.clog_node(s.node),
                    2 => drop(s.cmd.send(Cmd::Delay(ms(draw(0..1000))))),
                    3 => drop(s.cmd.send(Cmd::Behaviour(ServerBehaviour::Silent))),
                    4 => drop(s.cmd.send(Cmd::Behaviour(ServerBehaviour::SystemError))),
                    _ => drop(s.cmd.send(Cmd::Behaviour(ServerBehaviour::DropConnections))),
                }
                trace!(run.rec, "fault on {}", s.addr);
                run.check(&pool);
            }
            let bound = connect_timeout + request_timeout + ms(40);
            for w in workers {
                if tokio::time::timeout(bound, w).await.is_err() {
                    run.rec.fail("I16", "a worker did not end");
                }
            }
            // Liveness: faults off, then a request to every server works in bounded time.
            for s in servers.iter() {
                net.unclog_node(s.node);
                let _ = s.cmd.send(Cmd::Delay(Duration::ZERO));
                let _ = s.cmd.send(Cmd::Behaviour(ServerBehaviour::Normal));
            }
            let t0 = Instant::now();
            let e2e = Duration::from_secs(11)
                + request_timeout * (threshold + 1)
                + interval
                + ms(1000) * 2
                + connect_timeout * 2;
            for s in servers.iter() {
                loop {
                    let Err(last) = run.request(&pool, &s.addr).await else {
                        break;
                    };
                    if t0.elapsed() > e2e {
                        run.rec.fail("I15", format!("no working request to {} within {e2e:?} (last: {last})", s.addr));
                        break;
                    }
                    sleep(ms(1)).await;
                }
            }
            run.check(&pool);
            // Quiescence: pool count = server count.
            pool.shutdown().await;
            if tokio::time::timeout(ms(10), cleanup).await.is_err() {
                run.rec.fail("I17", "the cleanup task did not end after shutdown()");
            }
            sleep(Duration::from_secs(11)).await;
            for s in servers.iter() {
                let pooled = u64::from(pool.peek(&s.addr).is_some());
                match s.stats().await {
                    Some(st) if st.open != pooled => run.rec.fail(
                        "ACC",
                        format!("the pool holds {pooled} connection(s) to {} but the server sees {} open", s.addr, st.open),
                    ),
                    Some(_) => {}
                    None => run.rec.fail("SIM", format!("no stats from {}", s.addr)),
                }
            }
            drop(pool);
            sleep(Duration::from_secs(11)).await;
            for s in servers.iter() {
                if let Some(st) = s.stats().await
                    && st.open != 0
                {
                    run.rec.fail("I17", format!("{} still sees {} open connection(s) after the pool was dropped", s.addr, st.open));
                }
            }
        }
    });
    if let Err(err) = task.await {
        rec.fail("SIM", format!("the scenario task failed: {err}"));
    }
    Outcome {
        violation: rec.first(),
        virtual_time: started.elapsed(),
        trace: rec.trace(),
        info,
    }
}
