//! The simulated world of one seed: broker nodes, a client node with the pool, the connector's
//! books, a model of every connection's call outcomes, the fault switches, and the invariant checks
//! run after every step, by a monitor every few milliseconds, and at the end (liveness, quiescence).
//!
//! The checks judge the pool from outside: from the connector's books (`books.rs`), the brokers'
//! books (`broker.rs`) and the model of the calls made here. The few that read the pool's own
//! counters say why in a comment: they check a figure the pool reports (its metrics, `len()`,
//! `ejection_count`, `tracked_addresses`) against the outside books, or a fact nothing outside can
//! see.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::{CheetahString, ConnId, ConnectionPool, PoolConfig, PoolError, PooledConnection};
use tokio::madsim::net::NetSim;
use tokio::madsim::rand::{Rng, thread_rng};
use tokio::madsim::runtime::Handle;
use tokio::madsim::task::NodeId;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use crate::books::{Registry, decay_interval};
use crate::broker::{self, BrokerState};
use crate::client::{CallError, SimConn, SimConnector};
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
    /// Workers remove a connection they found broken (`remove_connection`, a manual removal).
    /// Off where the pool must find dead connections by itself (their eviction is an ejection).
    pub tidy: AtomicBool,
    /// The monitor's tick while a phase wants it slower than the monitor was started with
    /// (ns; 0 = as started).
    slow_tick_ns: AtomicU64,
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
        let reg = Arc::new(Registry::new(
            Arc::clone(&rec),
            &setup.config,
            brokers
                .iter()
                .map(|b| (b.addr.to_string(), Arc::clone(&b.state)))
                .collect(),
        ));
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
            tidy: AtomicBool::new(true),
            slow_tick_ns: AtomicU64::new(0),
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

    /// Forgets the model of the calls made so far, for a scenario that runs a second pool in the
    /// same world once the first is closed: the model is keyed by connection id, and the new
    /// pool's ids start again from 1.
    pub fn forget_calls(&self) {
        self.model.lock().expect("model lock").clear();
    }

    /// Starts the cleanup task if the setup has one.
    pub fn start_cleanup(&self, pool: &Pool) -> Option<JoinHandle<()>> {
        let task = self.setup.cleanup.map(|i| pool.start_cleanup_task(i));
        self.reg
            .set_sweeping(self.setup.cleanup.filter(|_| task.is_some()));
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
            b.state.set_close_mode(broker::CloseMode::Serve);
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

    /// Every invariant that can be checked at any instant, judged from the connector's books
    /// (I1, I6, I9, I12 at the brokers, I18) and, where the pool reports a figure, that figure
    /// against the books (ACC, I10, I13, I18).
    pub fn check(&self, pool: &Pool) {
        let rec = &self.rec;
        // I1: open + connecting at the connector (also checked at every connect, where it grows).
        self.reg.check_cap("sample");
        // I19: open + connecting per address at the connector (scenarios that use only checkout).
        self.reg.check_per_address("sample");
        // ACC: the pool's own count against the connector's (a check of what `len()` reports).
        let len = pool.len();
        let open = self.reg.open();
        if open != len {
            rec.fail(
                "ACC",
                format!("the pool holds {len} connections but {open} are open at the connector"),
            );
        }
        let now_ns = self.rec.now_ns();
        let sweep = self.reg.sweeping();
        for book in self.reg.open_books() {
            // I6: nothing open at the connector stays idle (by the client's own clock and call
            // count) longer than max_idle + one sweep interval.
            let idle = Duration::from_nanos(
                now_ns.saturating_sub(book.last_use_ns.load(Ordering::SeqCst)),
            );
            if let (Some(interval), Some(max_idle)) = (sweep, self.setup.config.max_idle)
                && book.in_flight.load(Ordering::SeqCst) == 0
                && idle > max_idle + interval + ms(2)
            {
                rec.fail(
                    "I6",
                    format!(
                        "connection s{} to {} idle for {idle:?} by the client's clock, still open \
                         at the connector (max_idle {max_idle:?}, interval {interval:?})",
                        book.serial, book.addr
                    ),
                );
            }
            // I9: a connection a call's verdict condemned is closed by the next sweep.
            let condemned = book.condemned_ns.load(Ordering::SeqCst);
            if let Some(interval) = sweep
                && condemned != 0
                && Duration::from_nanos(now_ns.saturating_sub(condemned)) > interval + ms(2)
            {
                rec.fail(
                    "I9",
                    format!(
                        "connection s{} to {} judged unhealthy {:?} ago, still open at the \
                         connector after the next sweep",
                        book.serial,
                        book.addr,
                        Duration::from_nanos(now_ns - condemned)
                    ),
                );
            }
        }
        // I12 measured at the brokers: gaps between accepts after an ejection.
        self.reg.settle_gaps(false);
        // I18: the pool's state (`tracked_addresses`, the only way to see it) within the books'
        // bound.
        self.check_tracked(pool);
        // I10/I13: the pool's per-connection metrics (a figure only the pool has) against the
        // model of the calls made on that connection.
        let model = self.model.lock().expect("model lock");
        for b in &self.brokers {
            let Some(conn) = pool.peek(&b.addr) else {
                continue;
            };
            let m = conn.metrics();
            if let Some(cm) = model.get(&conn.id().get()) {
                // Liveness probes are recorded as calls too: the books count them (by outcome,
                // not in order with the calls, so the trailing run is not judged once probed).
                let book = &conn.client().book;
                let probes_ok = book.probes_ok.load(Ordering::SeqCst);
                let probes_failed = book.probes_failed.load(Ordering::SeqCst);
                if probes_ok + probes_failed == 0 && m.consecutive_errors() != cm.trailing {
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
                if m.success_count() != cm.successes + probes_ok
                    || m.total_errors() != cm.failures + probes_failed
                {
                    rec.fail(
                        "I13",
                        format!(
                            "{} ({}): metrics say {} ok / {} failed, its own calls were {} / {} \
                             and its probes {probes_ok} / {probes_failed}",
                            b.addr,
                            conn.id(),
                            m.success_count(),
                            m.total_errors(),
                            cm.successes,
                            cm.failures
                        ),
                    );
                }
            }
        }
    }

    /// I18: `tracked_addresses()` never exceeds the addresses the books say may still be tracked:
    /// live ones (a connection open, a connect in progress, a caller waiting) plus those that may
    /// still be backing off or have an ejection count not yet decayed to 0 (from the failures the
    /// books saw, with full jitter and one decay interval per possible ejection), one sweep later.
    pub fn check_tracked(&self, pool: &Pool) {
        let Some((live, pending)) = self.reg.tracked_bound() else {
            return;
        };
        let tracked = pool.tracked_addresses() as u64;
        if tracked > live + pending {
            self.rec.fail(
                "I18",
                format!(
                    "the pool tracks {tracked} addresses; the books allow {} ({live} live, {pending} \
                     that may still back off or have an ejection count above 0)",
                    live + pending
                ),
            );
        }
    }

    /// I12 as the pool reports it: `ejection_count(addr)` is at least the count the books prove
    /// (ejections decayed as fast as the schedule allows) and at most every failure they saw.
    pub fn check_ejections(&self, pool: &Pool, addr: &CheetahString) {
        let k = pool.ejection_count(addr);
        let lower = self.reg.k_lower(addr.as_str());
        let upper = self.reg.k_upper(addr.as_str());
        if k < lower {
            self.rec.fail(
                "I12",
                format!(
                    "ejection_count({addr}) = {k}, but the books prove at least {lower} ejections \
                     (failed connects, connections dead within short_lived or evicted unhealthy, \
                     less decay)"
                ),
            );
        } else if k > upper {
            self.rec.fail(
                "I12",
                format!("ejection_count({addr}) = {k}, but the books saw at most {upper} failures"),
            );
        }
    }

    /// `mark_up(addr)` and its checks (I12): the ejection count is 0 at once, and the next
    /// `get_or_connect` is not refused for backoff (unless it met a new ejection).
    pub async fn mark_up(&self, pool: &Pool, addr: &CheetahString) {
        self.reg.marked_up(addr.as_str());
        pool.mark_up(addr);
        let k = pool.ejection_count(addr);
        if k != 0 {
            self.rec.fail(
                "I12",
                format!("ejection_count({addr}) = {k} right after mark_up"),
            );
        }
        // Unless that very call met a new ejection (a dead connection still pooled, evicted on
        // the way: the books saw the pool let go of it), it must not be refused for backoff.
        if let Err(PoolError::Backoff { retry_after, .. }) = self.get_or_connect(pool, addr).await
            && self.reg.k_upper(addr.as_str()) == 0
        {
            self.rec.fail(
                "I12",
                format!("get_or_connect({addr}) right after mark_up backs off for {retry_after:?}"),
            );
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
        // I9 judged from the model of the calls made on this connection: a verdict that said
        // unhealthy, or a trailing run of failures at the threshold.
        let (condemned, trailing) = self
            .model
            .lock()
            .expect("model lock")
            .get(&conn.id().get())
            .map_or((false, 0), |m| (m.condemned_at.is_some(), m.trailing));
        let threshold = self.setup.config.health.consecutive_failures;
        if condemned || conn.client().is_condemned() || (threshold > 0 && trailing >= threshold) {
            self.rec.fail(
                "I9",
                format!(
                    "{} ({}) handed out after it was judged unhealthy ({trailing} consecutive \
                     failures of its calls)",
                    conn.addr(),
                    conn.id(),
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
        // The books count the address as live while a caller waits (I3's refusal check, I18).
        let _waiting = Waiting::new(&self.reg, addr.as_str());
        let result = pool.get_or_connect(addr).await;
        if let Err(PoolError::AtCapacity { .. }) = &result {
            self.reg.check_refusal(addr.as_str());
        }
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
                    conn.client().serial()
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
            client.serial(),
            result
        );
        result
    }

    /// Removes a connection the caller found broken, and checks I14: it never removes a successor.
    /// Judged from the connector: the stale connection is closed, a successor stays open. (The
    /// pool's answer and what it holds after are checked too: that is the API under test.)
    pub fn remove_stale(&self, pool: &Pool, conn: &PooledConnection<SimConn>) {
        // Every shared connection of the address (several with `max_per_address` > 1, I23): the
        // removal takes `conn` alone, if it is one of them, and leaves the rest.
        let shared_ids = |pool: &Pool| -> BTreeSet<ConnId> {
            pool.address(conn.addr()).map_or_else(BTreeSet::new, |s| {
                s.connection
                    .iter()
                    .chain(&s.more_connections)
                    .map(|c| c.id)
                    .collect()
            })
        };
        let before = pool.peek(conn.addr());
        let before_ids = shared_ids(pool);
        self.reg.manual.store(true, Ordering::SeqCst);
        let removed = pool.remove_connection(conn);
        self.reg.manual.store(false, Ordering::SeqCst);
        let after = shared_ids(pool);
        let mut expected_after = before_ids.clone();
        let expected = (expected_after.remove(&conn.id()), expected_after);
        if (removed, &after) != (expected.0, &expected.1) {
            self.rec.fail(
                "I14",
                format!(
                    "remove_connection({}, {}) with {before_ids:?} pooled: removed={removed}, now {after:?}",
                    conn.addr(),
                    conn.id()
                ),
            );
        }
        if let Some(successor) = before.filter(|c| c.id() != conn.id())
            && successor.client().closed_by_pool()
        {
            self.rec.fail(
                "I14",
                format!(
                    "remove_connection({}, {}) closed its successor s{} at the connector",
                    conn.addr(),
                    conn.id(),
                    successor.client().serial()
                ),
            );
        }
        if removed && !conn.client().closed_by_pool() {
            self.rec.fail(
                "I17",
                format!(
                    "remove_connection({}, {}) removed it without closing it at the connector",
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
                                    && ctx.tidy.load(Ordering::SeqCst)
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
                let slow = ctx.slow_tick_ns.load(Ordering::SeqCst);
                sleep(if slow == 0 {
                    tick
                } else {
                    Duration::from_nanos(slow)
                })
                .await;
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
            // The most ejections the books saw (not decayed): the pool's count is at most this.
            let k = self.reg.k_upper(addr.as_str());
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

    /// The decay phase (I12, I18), after the liveness phase: no fault and no failure for as long
    /// as the largest ejection count needs to decay to 0, with one light worker calling every
    /// target once a second (the addresses stay connected, not backing off, without failure).
    /// Then every target's `ejection_count` is 0 and the pool tracks exactly the live addresses.
    pub async fn decay_phase(self: &Arc<Self>, pool: &Pool, targets: &[usize]) {
        let Some(interval) = self.reg.sweeping() else {
            return;
        };
        // The starting point is the pool's own count: nothing outside sees it (the books only
        // bound it), and the phase checks how it falls from there.
        let k0 = targets
            .iter()
            .map(|&b| pool.ejection_count(&self.brokers[b].addr))
            .max()
            .unwrap_or(0);
        let span = decay_interval() * (k0 + 1) + interval * 2 + ms(10);
        self.step(
            pool,
            format_args!("decay phase: max ejection count {k0}, {span:?} without failure"),
        );
        let until = Instant::now() + span;
        let failed = Arc::new(AtomicBool::new(false));
        let worker = {
            let ctx = Arc::clone(self);
            let pool = pool.clone();
            let targets = targets.to_vec();
            let failed = Arc::clone(&failed);
            tokio::spawn(async move {
                while Instant::now() < until {
                    for &b in &targets {
                        let addr = ctx.brokers[b].addr.clone();
                        let ok = match ctx.get_or_connect(&pool, &addr).await {
                            Ok(conn) => ctx.call(&conn, 0, 0).await.is_ok(),
                            Err(_) => false,
                        };
                        if !ok {
                            failed.store(true, Ordering::SeqCst);
                        }
                    }
                    sleep(Duration::from_secs(1)).await;
                }
            })
        };
        // A long phase without faults: the monitor samples every 500 ms meanwhile.
        self.slow_tick_ns.store(500_000_000, Ordering::SeqCst);
        tokio::time::sleep_until(until).await;
        self.join("decay worker", vec![worker], Duration::from_secs(5))
            .await;
        self.slow_tick_ns.store(0, Ordering::SeqCst);
        if failed.load(Ordering::SeqCst) {
            // A failure restarts the decay: nothing to judge (the liveness phase made sure the
            // faults are off, so this is rare and traced).
            trace!(self.rec, "decay phase saw a failure; decay not judged");
            return;
        }
        for &b in targets {
            let addr = &self.brokers[b].addr;
            let k = pool.ejection_count(addr);
            if k != 0 {
                self.rec.fail(
                    "I12",
                    format!(
                        "ejection_count({addr}) = {k} after {span:?} without failure or backoff \
                         (it was at most {k0}; it decays one step per {:?})",
                        decay_interval()
                    ),
                );
            }
        }
        self.check_tracked_exact(pool);
    }

    /// I18 at rest: once no address may still be backing off or have an ejection count above 0
    /// (by the books), the pool tracks exactly the addresses the books see live.
    pub fn check_tracked_exact(&self, pool: &Pool) {
        let Some((live, pending)) = self.reg.tracked_bound() else {
            return;
        };
        if pending != 0 {
            return;
        }
        let tracked = pool.tracked_addresses() as u64;
        if tracked != live {
            self.rec.fail(
                "I18",
                format!(
                    "the pool tracks {tracked} addresses once every backoff has expired and every \
                     ejection count has decayed; the connector sees {live} live"
                ),
            );
        }
    }

    /// Quiescence: the cleanup task stopped (it must end, I17), all messages delivered; then the
    /// pool, the connector and every broker agree on the connections that exist, and no slot is
    /// held by nothing (I3).
    pub async fn quiesce(&self, pool: &Pool, cleanup: Option<JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        self.reg.set_sweeping(None);
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

    /// At rest: the connector and every broker agree on the connections open (the brokers'
    /// books confirm what the connector's say), the cap holds at the brokers too (I1), every
    /// connection still existing on the client is open, and the pool's count agrees (ACC).
    pub fn agree(&self, pool: &Pool) {
        self.check(pool);
        self.reg.settle_gaps(true);
        let len = pool.len();
        // I3 (pool-side, kept on purpose): a slot leaked by the pool is visible outside only when
        // a later caller is refused for capacity with fewer connections open (checked where it
        // happens, `check_refusal`); at rest the pool's own ledger shows the leak at once.
        if pool.used_slots() != len {
            self.rec.fail(
                "I3",
                format!(
                    "at quiescence {} slots used for {len} connections",
                    pool.used_slots()
                ),
            );
        }
        let open = self.reg.open();
        if self.reg.live() != open as i64 {
            self.rec.fail(
                "ACC",
                format!(
                    "at quiescence {} connections exist on the client but {open} are open at the connector",
                    self.reg.live()
                ),
            );
        }
        let mut at_brokers = 0;
        for b in &self.brokers {
            let client = i64::from(self.reg.open_to(b.addr.as_str()));
            let seen = b.state.open();
            at_brokers += seen.max(0) as usize;
            if client != seen {
                self.rec.fail(
                    "ACC",
                    format!(
                        "at quiescence the connector has {client} connection(s) open to {} but \
                         the broker sees {seen}",
                        b.addr
                    ),
                );
            }
        }
        let max = self.setup.config.max_connections;
        if max > 0 && at_brokers > max {
            self.rec.fail(
                "I1",
                format!("at quiescence the brokers see {at_brokers} connections open; max {max}"),
            );
        }
        let s = pool.stats();
        trace!(
            self.rec,
            "final len={len} connects={:?} evictions={:?}", s.connects, s.evictions
        );
    }
}

/// Counts a caller of `get_or_connect` in the books for as long as it waits (also if cancelled).
struct Waiting<'a> {
    reg: &'a Registry,
    addr: &'a str,
}

impl<'a> Waiting<'a> {
    fn new(reg: &'a Registry, addr: &'a str) -> Self {
        reg.call_begin(addr);
        Self { reg, addr }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.reg.call_end(self.addr);
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
