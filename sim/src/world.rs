//! The simulated world of one seed: broker nodes, a client node with the pool, the connector's
//! books, a model of every connection's call outcomes, the fault switches, and the invariant checks
//! run after every step, by a monitor every few milliseconds, and at the end (liveness, quiescence).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::{
    CheetahString, ConnectionPool, PoolConfig, PoolError, PooledConnection, WhenFull,
};
use tokio::madsim::net::NetSim;
use tokio::madsim::rand::{Rng, thread_rng};
use tokio::madsim::runtime::Handle;
use tokio::madsim::task::NodeId;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use crate::broker::{self, BrokerState};
use crate::client::{CallError, Registry, SimConn, SimConnector};
use crate::record::Recorder;
use crate::trace;

/// The pool under test.
pub type Pool = ConnectionPool<SimConn, SimConnector>;

/// A uniform draw in `range` from the simulation's seeded generator.
pub fn draw(range: std::ops::Range<u64>) -> u64 {
    if range.is_empty() {
        return range.start;
    }
    thread_rng().gen_range(range)
}

/// `true` with probability `p`.
pub fn chance(p: f64) -> bool {
    thread_rng().gen_bool(p.clamp(0.0, 1.0))
}

/// Milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One broker node.
pub struct Broker {
    /// What it has seen.
    pub state: Arc<BrokerState>,
    /// Its node.
    pub node: NodeId,
    /// `ip:port` as a pool key.
    pub addr: CheetahString,
}

/// What a scenario sets up.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Broker nodes.
    pub brokers: usize,
    /// The pool's configuration.
    pub config: PoolConfig,
    /// Cleanup task interval; `None` = no cleanup task.
    pub cleanup: Option<Duration>,
    /// Bound of every call.
    pub call_timeout: Duration,
}

impl Setup {
    /// Defaults for the sim: small backoff so a seed covers many cycles.
    pub fn new(brokers: usize) -> Self {
        let config = ConnectionPool::builder()
            .max_idle(Duration::from_secs(2))
            .backoff(ms(100), Duration::from_secs(2), 0.2)
            .connect_timeout(ms(500))
            .health_window(Duration::from_secs(2))
            .build::<SimConn>()
            .expect("valid default config")
            .config()
            .clone();
        Self {
            brokers,
            config,
            cleanup: Some(ms(50)),
            call_timeout: ms(300),
        }
    }
}

#[derive(Default, Debug)]
struct ConnModel {
    successes: u64,
    failures: u64,
    trailing: u32,
    condemned_at: Option<Instant>,
}

/// The world of one seed. Everything here is shared by the scenario's tasks.
pub struct Ctx {
    /// Violations and the trace.
    pub rec: Arc<Recorder>,
    /// The connector's books.
    pub reg: Arc<Registry>,
    /// The brokers.
    pub brokers: Vec<Broker>,
    /// The node the pool runs on.
    pub client: NodeId,
    /// The setup.
    pub setup: Setup,
    model: StdMutex<BTreeMap<u64, ConnModel>>,
    /// Workers stop when set.
    pub stop: AtomicBool,
    /// The cleanup task runs (I6 and the sweep part of I9 apply).
    sweeping: AtomicBool,
    paused: StdMutex<Vec<bool>>,
}

impl Ctx {
    /// Creates the broker nodes (10.0.0.1…) and the client node (10.0.1.1). Call from the
    /// supervisor (the future given to `block_on`).
    pub fn build(
        setup: Setup,
        rec: Arc<Recorder>,
    ) -> (Arc<Ctx>, tokio::madsim::runtime::NodeHandle) {
        let handle = Handle::current();
        let reg = Arc::new(Registry::new(
            Arc::clone(&rec),
            setup.config.backoff,
            setup.config.max_idle,
            setup.config.when_full == WhenFull::EvictLeastRecentlyUsed,
        ));
        let brokers = (0..setup.brokers)
            .map(|i| {
                let ip: IpAddr = [10, 0, 0, u8::try_from(i + 1).expect("< 255 brokers")].into();
                let state = Arc::new(BrokerState::new(ip));
                let init_state = Arc::clone(&state);
                let node = handle
                    .create_node()
                    .name(format!("b{i}"))
                    .ip(ip)
                    .init(move || broker::serve(Arc::clone(&init_state)))
                    .build();
                Broker {
                    addr: state.addr.to_string().into(),
                    state,
                    node: node.id(),
                }
            })
            .collect::<Vec<_>>();
        let client = handle
            .create_node()
            .name("client")
            .ip([10, 0, 1, 1].into())
            .build();
        let n = brokers.len();
        let ctx = Arc::new(Ctx {
            rec,
            reg,
            brokers,
            client: client.id(),
            setup,
            model: StdMutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            sweeping: AtomicBool::new(false),
            paused: StdMutex::new(vec![false; n]),
        });
        (ctx, client)
    }

    /// The pool, built from the setup with this world's connector (inside the client node).
    pub fn pool(&self) -> Pool {
        ConnectionPool::builder()
            .config(self.setup.config.clone())
            .connector(SimConnector {
                reg: Arc::clone(&self.reg),
            })
            .build()
            .expect("scenario config is valid")
    }

    /// Starts the cleanup task if the setup has one.
    pub fn start_cleanup(&self, pool: &Pool) -> Option<JoinHandle<()>> {
        let task = self.setup.cleanup.map(|i| pool.start_cleanup_task(i));
        self.sweeping.store(task.is_some(), Ordering::SeqCst);
        task
    }

    /// Waits until every broker listens (bounded); a broker that never does is a harness failure.
    pub async fn brokers_ready(&self) {
        let handle = Handle::current();
        for _ in 0..1000 {
            if self
                .brokers
                .iter()
                .all(|b| handle.is_exit(b.node) || b.state.listening.load(Ordering::SeqCst))
            {
                return;
            }
            sleep(ms(1)).await;
        }
        self.rec.fail("SIM", "a broker never started listening");
    }

    // ---- faults -------------------------------------------------------------------------

    /// Kills broker `i` (its connections close, new connects are refused).
    pub fn kill(&self, i: usize) {
        trace!(self.rec, "kill b{i}");
        self.paused.lock().expect("lock")[i] = false;
        Handle::current().kill(self.brokers[i].node);
    }

    /// Restarts broker `i` (kills it first if it runs).
    pub fn restart(&self, i: usize) {
        trace!(self.rec, "restart b{i}");
        self.paused.lock().expect("lock")[i] = false;
        // madsim's `restart` alone keeps the old incarnation's sockets bound; `kill` clears them.
        let handle = Handle::current();
        handle.kill(self.brokers[i].node);
        handle.restart(self.brokers[i].node);
    }

    /// Pauses broker `i` (connects succeed, nothing is answered).
    pub fn pause(&self, i: usize) {
        trace!(self.rec, "pause b{i}");
        self.paused.lock().expect("lock")[i] = true;
        Handle::current().pause(self.brokers[i].node);
    }

    /// Resumes broker `i`.
    pub fn resume(&self, i: usize) {
        trace!(self.rec, "resume b{i}");
        self.paused.lock().expect("lock")[i] = false;
        Handle::current().resume(self.brokers[i].node);
    }

    /// Cuts broker `i` off the network both ways.
    pub fn clog(&self, i: usize) {
        trace!(self.rec, "clog b{i}");
        NetSim::current().clog_node(self.brokers[i].node);
    }

    /// Heals broker `i`'s network.
    pub fn unclog(&self, i: usize) {
        trace!(self.rec, "unclog b{i}");
        NetSim::current().unclog_node(self.brokers[i].node);
    }

    /// One-way partition: drops traffic client → broker `i` (`to_broker`) or broker → client.
    pub fn clog_one_way(&self, i: usize, to_broker: bool) {
        trace!(self.rec, "clog-link b{i} to_broker={to_broker}");
        let net = NetSim::current();
        if to_broker {
            net.clog_link(self.client, self.brokers[i].node);
        } else {
            net.clog_link(self.brokers[i].node, self.client);
        }
    }

    /// Makes broker `i` answer `delay` later.
    pub fn slow(&self, i: usize, delay: Duration) {
        trace!(self.rec, "slow b{i} {delay:?}");
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.brokers[i]
            .state
            .delay_ms
            .store(delay_ms, Ordering::SeqCst);
    }

    /// Makes broker `i` fail `permille`/1000 of its requests.
    pub fn errors(&self, i: usize, permille: u32) {
        trace!(self.rec, "errors b{i} {permille}");
        self.brokers[i]
            .state
            .error_permille
            .store(permille, Ordering::SeqCst);
    }

    /// Packet loss and latency for the whole network.
    pub fn net(&self, loss: f64, latency: std::ops::Range<Duration>) {
        trace!(self.rec, "net loss={loss} latency={latency:?}");
        NetSim::current().update_config(|c| {
            c.packet_loss_rate = loss;
            c.send_latency = latency;
        });
    }

    /// Every fault off: brokers up, answering, fast; the network whole and at default latency.
    pub async fn faults_off(&self) {
        trace!(self.rec, "faults off");
        let handle = Handle::current();
        let net = NetSim::current();
        net.update_config(|c| {
            c.packet_loss_rate = 0.0;
            c.send_latency = ms(1)..ms(10);
        });
        for (i, b) in self.brokers.iter().enumerate() {
            net.unclog_node(b.node);
            net.unclog_link(self.client, b.node);
            net.unclog_link(b.node, self.client);
            b.state.delay_ms.store(0, Ordering::SeqCst);
            b.state.error_permille.store(0, Ordering::SeqCst);
            let paused = std::mem::take(&mut self.paused.lock().expect("lock")[i]);
            if paused {
                handle.resume(b.node);
            }
            if handle.is_exit(b.node) || !b.state.listening.load(Ordering::SeqCst) {
                handle.kill(b.node);
                handle.restart(b.node);
            }
        }
        self.brokers_ready().await;
    }

    // ---- invariants ---------------------------------------------------------------------

    /// Every invariant that can be checked at any instant (I1, I3, I6, I9, I10, I13, accounting).
    pub fn check(&self, pool: &Pool) {
        let rec = &self.rec;
        let max = self.setup.config.max_connections;
        let len = pool.len();
        let used = pool.used_slots();
        let stats = pool.stats();
        let open = self.reg.open();
        if max > 0 && (len > max || used > max || open > max as i64) {
            rec.fail(
                "I1",
                format!("{len} pooled, {used} slots used, {open} open at the connector; max {max}"),
            );
        }
        if used < len || used > len + stats.reserved {
            rec.fail(
                "I3",
                format!(
                    "{used} slots used for {len} connections and {} connects in flight",
                    stats.reserved
                ),
            );
        }
        if open != len as i64 {
            rec.fail(
                "ACC",
                format!("the pool holds {len} connections but {open} are open at the connector"),
            );
        }
        let now = Instant::now();
        let sweeping = self.sweeping.load(Ordering::SeqCst);
        let model = self.model.lock().expect("model lock");
        for b in &self.brokers {
            let Some(conn) = pool.peek(&b.addr) else {
                continue;
            };
            let m = conn.metrics();
            if let (true, Some(interval), Some(max_idle)) =
                (sweeping, self.setup.cleanup, self.setup.config.max_idle)
                && m.in_flight() == 0
                && m.since_last_use(now) > max_idle + interval + ms(2)
            {
                rec.fail(
                    "I6",
                    format!(
                        "{} ({}) idle for {:?}, still pooled (max_idle {max_idle:?}, interval {interval:?})",
                        b.addr,
                        conn.id(),
                        m.since_last_use(now)
                    ),
                );
            }
            if let Some(cm) = model.get(&conn.id().get()) {
                if m.consecutive_errors() != cm.trailing {
                    rec.fail(
                        "I10",
                        format!(
                            "{} ({}): consecutive failures {} but the trailing run is {}",
                            b.addr,
                            conn.id(),
                            m.consecutive_errors(),
                            cm.trailing
                        ),
                    );
                }
                if m.success_count() != cm.successes || m.total_errors() != cm.failures {
                    rec.fail(
                        "I13",
                        format!(
                            "{} ({}): metrics say {} ok / {} failed, its own calls were {} / {}",
                            b.addr,
                            conn.id(),
                            m.success_count(),
                            m.total_errors(),
                            cm.successes,
                            cm.failures
                        ),
                    );
                }
                if let (true, Some(at), Some(interval)) =
                    (sweeping, cm.condemned_at, self.setup.cleanup)
                    && now > at + interval + ms(2)
                {
                    rec.fail(
                        "I9",
                        format!(
                            "{} ({}) judged unhealthy {:?} ago, still pooled after the next sweep",
                            b.addr,
                            conn.id(),
                            now - at
                        ),
                    );
                }
            }
        }
    }

    /// A step of the scenario: traced, then checked.
    pub fn step(&self, pool: &Pool, what: std::fmt::Arguments<'_>) {
        trace!(self.rec, "step {what}");
        self.check(pool);
    }

    /// Checks a connection the pool just handed out (I8, I9).
    pub fn check_handed_out(&self, conn: &PooledConnection<SimConn>) {
        if !conn.client().is_open() {
            self.rec.fail(
                "I8",
                format!(
                    "{} ({}) handed out although its transport is known closed",
                    conn.addr(),
                    conn.id()
                ),
            );
        }
        let condemned = self
            .model
            .lock()
            .expect("model lock")
            .get(&conn.id().get())
            .is_some_and(|m| m.condemned_at.is_some());
        let threshold = self.setup.config.health.consecutive_failures;
        if condemned
            || conn.client().is_condemned()
            || !conn.is_healthy()
            || (threshold > 0 && conn.metrics().consecutive_errors() >= threshold)
        {
            self.rec.fail(
                "I9",
                format!(
                    "{} ({}) handed out after it was judged unhealthy ({} consecutive failures)",
                    conn.addr(),
                    conn.id(),
                    conn.metrics().consecutive_errors()
                ),
            );
        }
    }

    /// `get_or_connect` with its checks: bounded by the connect timeout (I16), and what it hands
    /// out is fit (I8, I9).
    pub async fn get_or_connect(
        &self,
        pool: &Pool,
        addr: &CheetahString,
    ) -> Result<PooledConnection<SimConn>, PoolError> {
        let started = Instant::now();
        let result = pool.get_or_connect(addr).await;
        let took = started.elapsed();
        let bound = self.setup.config.connect_timeout + ms(1);
        if took > bound {
            self.rec.fail(
                "I16",
                format!("get_or_connect({addr}) took {took:?}, bound {bound:?}"),
            );
        }
        match &result {
            Ok(conn) => {
                self.check_handed_out(conn);
                conn.client().touch();
                trace!(
                    self.rec,
                    "got {addr} {} s{}",
                    conn.id(),
                    conn.client().serial
                );
            }
            Err(err) => {
                if let PoolError::Backoff { retry_after, .. } = err {
                    let b = self.setup.config.backoff;
                    let longest = b.max.mul_f64(1.0 + b.jitter) + ms(1);
                    if *retry_after > longest {
                        self.rec.fail(
                            "I12",
                            format!(
                                "retry_after {retry_after:?} beyond the schedule's cap {longest:?}"
                            ),
                        );
                    }
                }
                trace!(self.rec, "get {addr} err {}", short(err));
            }
        }
        result
    }

    /// One call on `conn` through the pool's in-flight guard, recorded in the model.
    pub async fn call(
        &self,
        conn: &PooledConnection<SimConn>,
        op: u8,
        arg: u32,
    ) -> Result<(), CallError> {
        let client = conn.client();
        let guard = conn.begin();
        client.call_started();
        let started = Instant::now();
        let result = client.call(op, arg, self.setup.call_timeout).await;
        let took = started.elapsed();
        if took > self.setup.call_timeout + ms(1) {
            self.rec
                .fail("I16", format!("a call on {} took {took:?}", conn.addr()));
        }
        let id = conn.id().get();
        match result {
            Ok(()) => {
                guard.success();
                let mut model = self.model.lock().expect("model lock");
                let m = model.entry(id).or_default();
                m.successes += 1;
                m.trailing = 0;
            }
            Err(_) => {
                let verdict = guard.failure();
                let mut model = self.model.lock().expect("model lock");
                let m = model.entry(id).or_default();
                m.failures += 1;
                m.trailing += 1;
                if verdict.is_unhealthy() && m.condemned_at.is_none() {
                    m.condemned_at = Some(Instant::now());
                    client.condemn();
                }
            }
        }
        client.call_ended();
        trace!(
            self.rec,
            "call {} s{} {:?}",
            conn.id(),
            client.serial,
            result
        );
        result
    }

    /// Removes a connection the caller found broken, and checks I14: it never removes a successor.
    pub fn remove_stale(&self, pool: &Pool, conn: &PooledConnection<SimConn>) {
        let before = pool.peek(conn.addr()).map(|c| c.id());
        self.reg.manual.store(true, Ordering::SeqCst);
        let removed = pool.remove_connection(conn);
        self.reg.manual.store(false, Ordering::SeqCst);
        let after = pool.peek(conn.addr()).map(|c| c.id());
        let expected = if before == Some(conn.id()) {
            (true, None)
        } else {
            (false, before)
        };
        if (removed, after) != expected {
            self.rec.fail(
                "I14",
                format!(
                    "remove_connection({}, {}) with {before:?} pooled: removed={removed}, now {after:?}",
                    conn.addr(),
                    conn.id()
                ),
            );
        }
        trace!(self.rec, "remove-stale {} {removed}", conn.id());
    }

    // ---- tasks --------------------------------------------------------------------------

    /// Starts `n` workers that call random brokers from `targets` until `until` or [`Ctx::stop`].
    /// Each call asks the broker to work `work` ms (a range), then thinks `think` ms.
    pub fn workers(
        self: &Arc<Self>,
        pool: &Pool,
        n: usize,
        targets: &[usize],
        until: Instant,
        work: std::ops::Range<u64>,
        think: std::ops::Range<u64>,
    ) -> Vec<JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let ctx = Arc::clone(self);
                let pool = pool.clone();
                let targets = targets.to_vec();
                let (work, think) = (work.clone(), think.clone());
                tokio::spawn(async move {
                    while Instant::now() < until && !ctx.stop.load(Ordering::SeqCst) {
                        let b = targets[draw(0..targets.len() as u64) as usize];
                        let addr = ctx.brokers[b].addr.clone();
                        match ctx.get_or_connect(&pool, &addr).await {
                            Ok(conn) => {
                                let arg = draw(work.clone()) as u32;
                                let op = u8::from(arg > 0);
                                let result = ctx.call(&conn, op, arg).await;
                                if matches!(result, Err(CallError::Broken | CallError::Closed))
                                    && chance(0.5)
                                {
                                    ctx.remove_stale(&pool, &conn);
                                }
                            }
                            Err(PoolError::Closed) => break,
                            Err(_) => {}
                        }
                        sleep(ms(draw(think.clone()).max(1))).await;
                    }
                })
            })
            .collect()
    }

    /// Checks the invariants every `tick` until [`Ctx::stop`] (the "at every instant" part).
    pub fn monitor(self: &Arc<Self>, pool: &Pool, tick: Duration) -> JoinHandle<()> {
        let ctx = Arc::clone(self);
        let pool = pool.clone();
        tokio::spawn(async move {
            while !ctx.stop.load(Ordering::SeqCst) {
                ctx.check(&pool);
                sleep(tick).await;
            }
        })
    }

    /// Waits for `tasks` to end by `deadline` (I16/I17: every task ends); aborts stragglers.
    pub async fn join(&self, what: &str, tasks: Vec<JoinHandle<()>>, deadline: Duration) {
        let until = Instant::now() + deadline;
        for task in tasks {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, task).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => self.rec.fail("SIM", format!("{what} task failed: {err}")),
                Err(_) => {
                    self.rec.fail(
                        "I16",
                        format!("a {what} task did not end within {deadline:?}"),
                    );
                    return;
                }
            }
        }
    }

    // ---- the end of every run ------------------------------------------------------------

    /// The liveness phase: faults off, then for every broker in `targets`, `get_or_connect`
    /// succeeds within the backoff bound plus one connect timeout (I15), and a call through the
    /// pool works within a bound that also covers detecting and replacing a stale connection.
    pub async fn liveness(self: &Arc<Self>, pool: &Pool, targets: &[usize]) {
        self.faults_off().await;
        let t0 = Instant::now();
        self.step(pool, format_args!("liveness"));
        let cfg = &self.setup.config;
        let interval = self.setup.cleanup.unwrap_or(Duration::ZERO);
        let mut tasks = Vec::new();
        for &b in targets {
            let ctx = Arc::clone(self);
            let pool = pool.clone();
            let addr = self.brokers[b].addr.clone();
            let k = pool.backoff_failures(&addr);
            // A connect begun before the faults stopped may still fail (one connect timeout) and
            // add one more failure; then the backoff for k+1 (at most, with full jitter), then one
            // connect. (No cleanup interval: `get_or_connect` evicts the address's own unfit
            // connection itself, so it never waits for a sweep to free that slot.)
            let bound = cfg.connect_timeout
                + cfg.backoff.delay(k.saturating_add(1), 1.0)
                + cfg.connect_timeout
                + ms(2);
            // End to end: a stale connection must first fail its calls until it is judged
            // unhealthy, and madsim may hold a message sent into a partition up to 10 s after
            // the heal.
            let calls = u64::from(cfg.health.consecutive_failures.max(1));
            let e2e = bound
                + Duration::from_secs(11)
                + self.setup.call_timeout * u32::try_from(calls + 1).unwrap_or(u32::MAX)
                + interval
                + cfg.backoff.delay(u32::MAX, 1.0)
                + cfg.connect_timeout;
            tasks.push(tokio::spawn(async move {
                let mut got = false;
                let mut last = String::new();
                loop {
                    let elapsed = t0.elapsed();
                    if !got && elapsed > bound {
                        ctx.rec.fail(
                            "I15",
                            format!(
                                "no connection to {addr} within {bound:?} after the faults stopped (last: {last})"
                            ),
                        );
                        return;
                    }
                    if elapsed > e2e {
                        ctx.rec.fail(
                            "I15",
                            format!("no working call to {addr} within {e2e:?} after the faults stopped (last: {last})"),
                        );
                        return;
                    }
                    match ctx.get_or_connect(&pool, &addr).await {
                        Ok(conn) => {
                            got = true;
                            match ctx.call(&conn, 0, 0).await {
                                Ok(()) => return,
                                Err(e) => last = format!("call: {e:?}"),
                            }
                        }
                        Err(PoolError::Backoff { retry_after, .. }) => {
                            last = "backoff".into();
                            sleep(retry_after.max(ms(1))).await;
                        }
                        Err(e) => {
                            last = short(&e);
                            sleep(ms(1)).await;
                        }
                    }
                }
            }));
        }
        let longest = Duration::from_secs(120);
        self.join("liveness", tasks, longest).await;
        self.step(pool, format_args!("liveness done"));
    }

    /// Quiescence: the cleanup task stopped (it must end, I17), all messages delivered; then the
    /// pool, the connector and every broker agree on the connections that exist, and no slot is
    /// held by nothing (I3).
    pub async fn quiesce(&self, pool: &Pool, cleanup: Option<JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        self.sweeping.store(false, Ordering::SeqCst);
        pool.shutdown().await;
        if let Some(task) = cleanup
            && tokio::time::timeout(ms(10), task).await.is_err()
        {
            self.rec
                .fail("I17", "the cleanup task did not end after shutdown()");
        }
        sleep(Duration::from_secs(11)).await;
        self.agree(pool);
    }

    /// Pool count = connector count = broker count, per broker.
    pub fn agree(&self, pool: &Pool) {
        self.check(pool);
        let len = pool.len();
        if pool.used_slots() != len {
            self.rec.fail(
                "I3",
                format!(
                    "at quiescence {} slots used for {len} connections",
                    pool.used_slots()
                ),
            );
        }
        if self.reg.live() != len as i64 {
            self.rec.fail(
                "ACC",
                format!(
                    "at quiescence the pool holds {len} connections but {} exist on the client",
                    self.reg.live()
                ),
            );
        }
        for b in &self.brokers {
            let pooled = i64::from(pool.peek(&b.addr).is_some());
            let seen = b.state.open();
            if pooled != seen {
                self.rec.fail(
                    "ACC",
                    format!("at quiescence the pool holds {pooled} connection(s) to {} but the broker sees {seen} open", b.addr),
                );
            }
        }
        let s = pool.stats();
        trace!(
            self.rec,
            "final len={len} connects={:?} evictions={:?}", s.connects, s.evictions
        );
    }
}

/// A short name for an error in traces and messages.
pub fn short(err: &PoolError) -> String {
    match err {
        PoolError::AtCapacity { .. } => "at-capacity".into(),
        PoolError::Backoff { failures, .. } => format!("backoff({failures})"),
        PoolError::Connect { cause, .. } => format!("connect({cause})"),
        PoolError::ConnectTimeout { .. } => "connect-timeout".into(),
        PoolError::InvalidAddress { .. } => "invalid-address".into(),
        PoolError::Closed => "closed".into(),
        _ => "other".into(),
    }
}
