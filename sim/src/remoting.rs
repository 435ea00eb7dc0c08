//! The `remoting` scenario: the library's own RocketMQ remoting transport (`RemotingClient`,
//! `RemotingConnector`) against `MiniServer`s on broker nodes, under restarts, partitions, slow,
//! silent, failing and connection-dropping servers. The connector is wrapped in [`Booked`], which
//! keeps the same books as the sim's own connector (connections open, connects in progress, closes
//! per connection), so the checks are judged from outside the pool: I1 (open + connecting at the
//! connector), I3 (a refusal for capacity with free slots), I8, I9, I15, I16, every connection
//! closed exactly once, and from the servers' side, connector count = server count at quiescence and
//! zero open connections once the pool is dropped (I17).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::{CheetahString, ConnectionPool, Connector, PoolError, WhenFull};
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

/// The books of [`Booked`]: what the connector has seen, kept outside the pool.
#[derive(Default)]
struct ConnectorBooks {
    open: AtomicI64,
    connecting: AtomicI64,
    /// Connections that exist (not yet dropped).
    live: AtomicI64,
    next_serial: AtomicU64,
    /// Connections open per server address.
    per_addr: StdMutex<std::collections::BTreeMap<String, i64>>,
    /// Set by the first violation found inside a connector callback (no recorder there).
    problem: StdMutex<Option<(&'static str, String)>>,
}

impl ConnectorBooks {
    fn opened(&self, addr: &str, by: i64) {
        self.open.fetch_add(by, Ordering::SeqCst);
        *self
            .per_addr
            .lock()
            .expect("books lock")
            .entry(addr.to_string())
            .or_default() += by;
    }

    fn open_to(&self, addr: &str) -> i64 {
        self.per_addr
            .lock()
            .expect("books lock")
            .get(addr)
            .copied()
            .unwrap_or(0)
    }

    fn fail(&self, inv: &'static str, msg: String) {
        let mut p = self.problem.lock().expect("books lock");
        if p.is_none() {
            *p = Some((inv, msg));
        }
    }
}

/// A connection made through [`Booked`]: the library's client and its serial.
struct Tagged {
    serial: u64,
    addr: String,
    client: RemotingClient,
    closed: AtomicBool,
    books: Arc<ConnectorBooks>,
}

impl Drop for Tagged {
    fn drop(&mut self) {
        self.books.live.fetch_sub(1, Ordering::SeqCst);
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.books.opened(&self.addr, -1);
            self.books.fail(
                "I17",
                format!(
                    "connection r{} dropped without the pool ever closing it",
                    self.serial
                ),
            );
        }
    }
}

/// The library's `RemotingConnector`, unchanged, behind a thin layer that keeps the books.
struct Booked {
    inner: RemotingConnector,
    books: Arc<ConnectorBooks>,
    max: usize,
}

/// Counts a connect in progress however it ends (the pool may drop the future).
struct Connecting(Arc<ConnectorBooks>);

impl Drop for Connecting {
    fn drop(&mut self) {
        self.0.connecting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Booked {
    /// I1 as the connector sees it.
    fn check_cap(&self, what: &str) {
        let open = self.books.open.load(Ordering::SeqCst);
        let connecting = self.books.connecting.load(Ordering::SeqCst);
        if self.max > 0 && open + connecting > self.max as i64 {
            self.books.fail(
                "I1",
                format!(
                    "{what}: {open} connections open and {connecting} connects in progress at the \
                     connector; max {}",
                    self.max
                ),
            );
        }
    }
}

impl Connector for Booked {
    type Conn = Tagged;
    type Error = keyed_pool_remoting::RemotingError;

    async fn connect(&self, addr: &str) -> Result<Tagged, Self::Error> {
        self.books.connecting.fetch_add(1, Ordering::SeqCst);
        let connecting = Connecting(Arc::clone(&self.books));
        self.check_cap(&format!("connect to {addr}"));
        let client = self.inner.connect(addr).await?;
        drop(connecting);
        self.books.opened(addr, 1);
        self.books.live.fetch_add(1, Ordering::SeqCst);
        Ok(Tagged {
            serial: self.books.next_serial.fetch_add(1, Ordering::SeqCst),
            addr: addr.to_string(),
            client,
            closed: AtomicBool::new(false),
            books: Arc::clone(&self.books),
        })
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        self.inner.validate(addr)
    }

    fn is_open(&self, conn: &Tagged) -> bool {
        self.inner.is_open(&conn.client)
    }

    async fn probe(&self, conn: &Tagged) -> Result<(), Self::Error> {
        self.inner.probe(&conn.client).await
    }

    fn close(&self, conn: &Tagged) {
        if conn.closed.swap(true, Ordering::SeqCst) {
            self.books.fail(
                "ACC",
                format!("the pool closed connection r{} twice", conn.serial),
            );
        } else {
            self.books.opened(&conn.addr, -1);
        }
        self.inner.close(&conn.client);
    }
}

type Pool = ConnectionPool<Tagged, Booked>;

struct Run {
    rec: Arc<Recorder>,
    books: Arc<ConnectorBooks>,
    pool_max: usize,
    connect_timeout: Duration,
    request_timeout: Duration,
    threshold: u32,
    /// Servers a `get_or_connect` is waiting for (for I3's refusal check).
    waiting: StdMutex<Vec<CheetahString>>,
    /// Per connection (serial): its trailing run of failed requests and whether a verdict said
    /// unhealthy: the model I9 is judged from.
    model: StdMutex<std::collections::BTreeMap<u64, (u32, bool)>>,
}

impl Run {
    /// I1 at the connector (open + connecting), the violations found inside the connector, and
    /// the pool's `len()` against the connector's count (ACC).
    fn check(&self, pool: &Pool) {
        if let Some((inv, msg)) = self.books.problem.lock().expect("books lock").take() {
            self.rec.fail(inv, msg);
        }
        let open = self.books.open.load(Ordering::SeqCst);
        let connecting = self.books.connecting.load(Ordering::SeqCst);
        if self.pool_max > 0 && open + connecting > self.pool_max as i64 {
            self.rec.fail(
                "I1",
                format!(
                    "{open} open and {connecting} connecting at the connector, max {}",
                    self.pool_max
                ),
            );
        }
        if pool.len() as i64 != open {
            self.rec.fail(
                "ACC",
                format!(
                    "the pool holds {} connections but {open} are open at the connector",
                    pool.len()
                ),
            );
        }
    }

    /// Once the pool is gone: nothing open at the connector, no connection left on the client, and
    /// none was dropped unclosed (I17).
    fn check_dropped(&self) {
        if let Some((inv, msg)) = self.books.problem.lock().expect("books lock").take() {
            self.rec.fail(inv, msg);
        }
        let open = self.books.open.load(Ordering::SeqCst);
        let live = self.books.live.load(Ordering::SeqCst);
        if open != 0 || live != 0 {
            self.rec.fail(
                "I17",
                format!(
                    "after the pool was dropped {open} connection(s) are open at the connector and \
                     {live} still exist"
                ),
            );
        }
    }

    /// One request through the pool, as `pool_request` makes it, with the checks on what the pool
    /// handed out (I8, I9) and on every wait (I16).
    async fn request(&self, pool: &Pool, addr: &CheetahString) -> Result<(), String> {
        let started = Instant::now();
        self.waiting
            .lock()
            .expect("waiting lock")
            .push(addr.clone());
        let conn = pool.get_or_connect(addr).await;
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            if let Some(i) = waiting.iter().position(|a| a == addr) {
                waiting.swap_remove(i);
            }
        }
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
            Err(PoolError::AtCapacity { max, .. }) => {
                // I3 from outside: refused for capacity, so every slot holds a connection or a
                // connect the connector sees, or one a caller of another server waits for.
                let open = self.books.open.load(Ordering::SeqCst);
                let connecting = self.books.connecting.load(Ordering::SeqCst);
                let waiting = self.waiting.lock().expect("waiting lock").clone();
                let others = waiting.iter().filter(|a| *a != addr).count() as i64;
                if open + connecting + others < max as i64 {
                    self.rec.fail(
                        "I3",
                        format!(
                            "get_or_connect({addr}) refused at capacity (max {max}) with {open} \
                             open, {connecting} connecting and {others} other caller(s) waiting"
                        ),
                    );
                }
                return Err("at capacity".into());
            }
            Err(err) => return Err(err.to_string()),
        };
        if !conn.client().client.is_open() {
            self.rec.fail(
                "I8",
                format!(
                    "{addr} ({}) handed out with its transport closed",
                    conn.id()
                ),
            );
        }
        let serial = conn.client().serial;
        let (trailing, condemned) = self
            .model
            .lock()
            .expect("model lock")
            .get(&serial)
            .copied()
            .unwrap_or_default();
        if condemned || (self.threshold > 0 && trailing >= self.threshold) {
            self.rec.fail(
                "I9",
                format!(
                    "{addr} ({}) handed out after it was judged unhealthy ({trailing} failed \
                     requests in a row)",
                    conn.id()
                ),
            );
        }
        let call = conn.begin();
        let started = Instant::now();
        let result = conn
            .client()
            .client
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
                Err(format!("server failure {}", resp.code))
            }
            Ok(_) => Ok(()),
            Err(err) => Err(err.to_string()),
        };
        let verdict = match &outcome {
            Ok(()) => {
                call.success();
                None
            }
            Err(_) => Some(call.failure()),
        };
        if outcome.is_err() && !conn.client().client.is_open() {
            conn.mark_closed();
        }
        {
            let mut model = self.model.lock().expect("model lock");
            let m = model.entry(serial).or_default();
            match verdict {
                None => m.0 = 0,
                Some(v) => {
                    m.0 += 1;
                    m.1 |= v.is_unhealthy();
                }
            }
        }
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
    let books = Arc::new(ConnectorBooks::default());
    let run = Arc::new(Run {
        rec: Arc::clone(&rec),
        books: Arc::clone(&books),
        waiting: StdMutex::new(Vec::new()),
        model: StdMutex::new(std::collections::BTreeMap::new()),
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
                .connector(Booked {
                    inner: RemotingConnector::new(ClientConfig::default().request_timeout(request_timeout)),
                    books: Arc::clone(&run.books),
                    max: pool_max,
                })
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
            run.check(&pool);
            for s in servers.iter() {
                let open = u64::try_from(run.books.open_to(s.addr.as_str())).unwrap_or(u64::MAX);
                match s.stats().await {
                    Some(st) if st.open != open => run.rec.fail(
                        "ACC",
                        format!("the connector has {open} connection(s) open to {} but the server sees {} open", s.addr, st.open),
                    ),
                    Some(_) => {}
                    None => run.rec.fail("SIM", format!("no stats from {}", s.addr)),
                }
            }
            drop(pool);
            sleep(Duration::from_secs(11)).await;
            run.check_dropped();
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
        also: rec.also(),
        virtual_time: started.elapsed(),
        trace: rec.trace(),
        info,
    }
}
