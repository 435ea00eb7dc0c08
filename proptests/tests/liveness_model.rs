//! Liveness between uses against a reference model: random sequences of uses, server deaths
//! (silent, or a reset the probe finds), probing rounds, checks before use and idle sweeps, on
//! paused virtual time, with every figure compared after every op. The model restates the rules
//! of `docs/DESIGN.md` ("Liveness between uses") and shares no code with the pool:
//!
//! - a probe is due when a connection has been neither used nor probed for longer than
//!   `probe_idle`; a probe is not a use (the idle clock stays: I5, I6);
//! - an answered probe is a success and moves the probe clock; an unanswered one ends at the probe
//!   timeout (I16), is a failure and evicts the connection as unhealthy, backing the address off
//!   (I9, I12); one that finds the transport closed evicts it as closed, an ejection only if the
//!   connection was younger than `short_lived` (I12);
//! - a check before use probes a connection quiet longer than its threshold and connects afresh
//!   (or meets the backoff) if the probe fails (I8);
//! - an idle sweep evicts what has been unused longer than `max_idle`, probed or not (I6).
//!
//! Sequences are at most 20 ops of at most 1.5 s, so no ejection count decays (the first decay
//! step is 30 s after a backoff ends): the model need not restate decay, which `tests/model.rs`
//! covers. A failure is shrunk and saved in `liveness_model.proptest-regressions`; replay with
//! `PROPTEST_RNG_SEED=<seed> cargo test -p keyed-pool-proptests --test liveness_model` (CI fixes
//! the seed the same way).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyed_pool::core::BackoffPolicy;
use keyed_pool::{ConnectionPool, Connector, PoolError};
use proptest::prelude::*;
use tokio::time::Instant;

const ADDRS: usize = 3;
const MAX_IDLE: Duration = Duration::from_secs(10);
const PROBE_IDLE: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const CHECK_BEFORE_USE: Duration = Duration::from_secs(3);
const SHORT_LIVED: Duration = Duration::from_secs(5);

fn addr(i: usize) -> String {
    format!("10.0.0.{}:1", i + 1)
}

/// How the server behind an address treats a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Answers,
    /// Never answers (hung, or the host vanished): the transport still looks open.
    Silent,
    /// The peer is gone: the probe finds the transport closed.
    Reset,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Advance(u64),
    /// `get`: a use.
    Use(usize),
    GetOrConnect(usize),
    SetServer(usize, Server),
    ProbeRound,
    EvictIdle,
}

fn op() -> impl Strategy<Value = Op> {
    let a = 0..ADDRS;
    prop_oneof![
        3 => (1u64..=1500).prop_map(Op::Advance),
        2 => a.clone().prop_map(Op::Use),
        3 => a.clone().prop_map(Op::GetOrConnect),
        2 => (a, prop_oneof![Just(Server::Answers), Just(Server::Silent), Just(Server::Reset)])
            .prop_map(|(a, s)| Op::SetServer(a, s)),
        3 => Just(Op::ProbeRound),
        1 => Just(Op::EvictIdle),
    ]
}

// ---- the connector -------------------------------------------------------------------------

struct Conn {
    serial: u64,
    addr: usize,
    open: AtomicBool,
}

#[derive(Default)]
struct Books {
    servers: [Option<Server>; ADDRS],
    connects: u64,
    closes: u64,
}

#[derive(Clone, Default)]
struct Servers(Arc<Mutex<Books>>);

impl Servers {
    fn server(&self, a: usize) -> Server {
        self.0.lock().unwrap().servers[a].unwrap_or(Server::Answers)
    }
}

#[derive(Debug)]
struct ProbeFailed;

impl std::fmt::Display for ProbeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probe failed")
    }
}

impl std::error::Error for ProbeFailed {}

impl Connector for Servers {
    type Conn = Conn;
    type Error = ProbeFailed;

    async fn connect(&self, addr: &str) -> Result<Conn, ProbeFailed> {
        let a = (0..ADDRS)
            .find(|&i| self::addr(i) == addr)
            .expect("a known address");
        let mut books = self.0.lock().unwrap();
        books.connects += 1;
        Ok(Conn {
            serial: books.connects,
            addr: a,
            open: AtomicBool::new(true),
        })
    }

    fn is_open(&self, conn: &Conn) -> bool {
        conn.open.load(Ordering::SeqCst)
    }

    async fn probe(&self, conn: &Conn) -> Result<(), ProbeFailed> {
        match self.server(conn.addr) {
            Server::Answers => Ok(()),
            Server::Silent => std::future::pending().await,
            Server::Reset => {
                conn.open.store(false, Ordering::SeqCst);
                Err(ProbeFailed)
            }
        }
    }

    fn close(&self, conn: &Conn) {
        conn.open.store(false, Ordering::SeqCst);
        self.0.lock().unwrap().closes += 1;
    }
}

// ---- the model -----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MConn {
    serial: u64,
    created: Duration,
    last_used: Duration,
    /// A `get` marked it used since the last fold (it reads no clock); the next observer of the
    /// idle clock (a probe round's look, a checked `get_or_connect`, an idle sweep) folds it in.
    used: bool,
    last_probed: Option<Duration>,
    successes: u64,
}

#[derive(Default, Debug)]
struct Model {
    now: Duration,
    check_before_use: bool,
    servers: [Option<Server>; ADDRS],
    conns: BTreeMap<usize, MConn>,
    /// Ejection count and backoff deadline per address.
    k: [u32; ADDRS],
    backoff_until: [Option<Duration>; ADDRS],
    connects: u64,
    closes: u64,
    evicted_idle: u64,
    evicted_unhealthy: u64,
    evicted_closed: u64,
}

fn backoff() -> BackoffPolicy {
    BackoffPolicy {
        base: Duration::from_secs(1),
        multiplier: 2.0,
        max: Duration::from_secs(8),
        jitter: 0.0,
    }
}

impl Model {
    fn server(&self, a: usize) -> Server {
        self.servers[a].unwrap_or(Server::Answers)
    }

    /// `min(1 s · 2^(k−1), 8 s)`, restated.
    fn delay(k: u32) -> Duration {
        Duration::from_secs(1u64 << (k - 1).min(3))
    }

    fn eject(&mut self, a: usize) {
        self.k[a] += 1;
        self.backoff_until[a] = Some(self.now + Self::delay(self.k[a]));
    }

    fn backing_off(&self, a: usize) -> bool {
        self.backoff_until[a].is_some_and(|t| self.now < t)
    }

    fn quiet(&self, c: &MConn) -> Duration {
        self.now - c.last_used.max(c.last_probed.unwrap_or(c.created))
    }

    /// Folds a pending `get` into the idle clock at now (`ConnectionMetrics`' fold).
    fn fold(&mut self, a: usize) {
        let now = self.now;
        if let Some(c) = self.conns.get_mut(&a)
            && std::mem::take(&mut c.used)
        {
            c.last_used = c.last_used.max(now);
        }
    }

    fn fold_all(&mut self) {
        let all: Vec<usize> = self.conns.keys().copied().collect();
        for a in all {
            self.fold(a);
        }
    }

    /// One probe of `a`'s connection, started now; returns whether it failed. An unanswered one
    /// ends at the timeout (the caller moves the clock).
    fn probe_ends(&mut self, a: usize, at: Duration) -> bool {
        let server = self.server(a);
        let c = self.conns.get_mut(&a).expect("probed");
        match server {
            Server::Answers => {
                c.successes += 1;
                c.last_probed = Some(at);
                false
            }
            Server::Silent => {
                self.conns.remove(&a);
                self.closes += 1;
                self.evicted_unhealthy += 1;
                let now = self.now;
                self.now = at;
                self.eject(a);
                self.now = now;
                true
            }
            Server::Reset => {
                let c = self.conns.remove(&a).expect("probed");
                self.closes += 1;
                self.evicted_closed += 1;
                if at - c.created < SHORT_LIVED {
                    let now = self.now;
                    self.now = at;
                    self.eject(a);
                    self.now = now;
                }
                true
            }
        }
    }

    /// What `get_or_connect(a)` returns: the serial of the connection, or `None` for the backoff.
    fn get_or_connect(&mut self, a: usize) -> Option<u64> {
        if self.check_before_use {
            self.fold(a);
        }
        if let Some(c) = self.conns.get(&a) {
            if !(self.check_before_use && self.quiet(c) > CHECK_BEFORE_USE) {
                let check = self.check_before_use;
                let c = self.conns.get_mut(&a).expect("pooled");
                if check {
                    c.last_used = self.now;
                } else {
                    c.used = true; // a `get`
                }
                return Some(c.serial);
            }
            let silent = self.server(a) == Server::Silent;
            let end = self.now
                + if silent {
                    PROBE_TIMEOUT
                } else {
                    Duration::ZERO
                };
            let failed = self.probe_ends(a, end);
            self.now = end;
            if !failed {
                let c = self.conns.get_mut(&a).expect("answered");
                c.last_used = self.now;
                return Some(c.serial);
            }
        }
        if self.backing_off(a) {
            return None;
        }
        self.connects += 1;
        self.conns.insert(
            a,
            MConn {
                serial: self.connects,
                created: self.now,
                last_used: self.now,
                used: false,
                last_probed: None,
                successes: 0,
            },
        );
        Some(self.connects)
    }

    /// A probing round: `(probed, failed)`; it lasts the probe timeout if any probe is unanswered.
    fn probe_round(&mut self) -> (usize, usize) {
        self.fold_all();
        let due: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| self.quiet(c) > PROBE_IDLE)
            .map(|(&a, _)| a)
            .collect();
        let start = self.now;
        let mut failed = 0;
        let mut longest = Duration::ZERO;
        for &a in &due {
            let took = if self.server(a) == Server::Silent {
                PROBE_TIMEOUT
            } else {
                Duration::ZERO
            };
            longest = longest.max(took);
            failed += usize::from(self.probe_ends(a, start + took));
        }
        self.now = start + longest;
        (due.len(), failed)
    }

    fn evict_idle(&mut self) -> usize {
        self.fold_all();
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| self.now - c.last_used > MAX_IDLE)
            .map(|(&a, _)| a)
            .collect();
        for a in &idle {
            self.conns.remove(a);
        }
        self.closes += idle.len() as u64;
        self.evicted_idle += idle.len() as u64;
        idle.len()
    }
}

// ---- the run -------------------------------------------------------------------------------

fn run(check_before_use: bool, ops: &[Op]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let servers = Servers::default();
        let mut builder = ConnectionPool::builder()
            .max_idle(MAX_IDLE)
            .probe_idle(PROBE_IDLE)
            .probe_timeout(PROBE_TIMEOUT)
            .backoff_policy(backoff())
            .connector(servers.clone());
        if check_before_use {
            builder = builder.check_idle_before_use(CHECK_BEFORE_USE);
        }
        let pool = builder.build().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut model = Model {
            check_before_use,
            ..Model::default()
        };
        for (i, op) in ops.iter().enumerate() {
            let started = model.now;
            let at = |what: String| format!("op {i} {op:?} (at {started:?}): {what}");
            match *op {
                Op::Advance(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    model.now += Duration::from_millis(ms);
                }
                Op::Use(a) => {
                    let got = pool.get(addr(a)).map(|c| c.client().serial);
                    let want = model.conns.get_mut(&a).map(|c| {
                        c.used = true; // `get` marks, reads no clock
                        c.serial
                    });
                    if got != want {
                        return Err(at(format!("I8 violated: get gave {got:?}, the model {want:?}")));
                    }
                }
                Op::GetOrConnect(a) => {
                    let got = match pool.get_or_connect(addr(a)).await {
                        Ok(c) => Some(c.client().serial),
                        Err(PoolError::Backoff { .. }) => None,
                        Err(e) => return Err(at(format!("unexpected error {e}"))),
                    };
                    let want = model.get_or_connect(a);
                    if got != want {
                        return Err(at(format!(
                            "I8/I12 violated: get_or_connect gave {got:?} (None: backoff), the model {want:?}"
                        )));
                    }
                }
                Op::SetServer(a, s) => {
                    servers.0.lock().unwrap().servers[a] = Some(s);
                    model.servers[a] = Some(s);
                }
                Op::ProbeRound => {
                    let round = pool.probe_idle().await;
                    let (probed, failed) = model.probe_round();
                    if (round.probed, round.failed, round.evicted) != (probed, failed, failed) {
                        return Err(at(format!(
                            "probing round {round:?}, the model probed {probed} and {failed} failed"
                        )));
                    }
                }
                Op::EvictIdle => {
                    let got = pool.evict_idle().await;
                    let want = model.evict_idle();
                    if got != want {
                        return Err(at(format!("I5/I6 violated: evict_idle took {got}, the model {want}")));
                    }
                }
            }
            check(&pool, &servers, &model, t0).map_err(at)?;
        }
        Ok(())
    })
}

fn check(
    pool: &ConnectionPool<Conn, Servers>,
    servers: &Servers,
    model: &Model,
    t0: Instant,
) -> Result<(), String> {
    let now = Instant::now() - t0;
    if now != model.now {
        return Err(format!(
            "I16 violated: the clock is at {now:?}, the model at {:?}",
            model.now
        ));
    }
    for a in 0..ADDRS {
        let got = pool.peek(addr(a));
        let want = model.conns.get(&a);
        match (got, want) {
            (None, None) => {}
            (Some(c), Some(m)) => {
                let metrics = c.metrics();
                if c.client().serial != m.serial {
                    return Err(format!(
                        "{}: pooled s{}, the model s{}",
                        addr(a),
                        c.client().serial,
                        m.serial
                    ));
                }
                if metrics.pending_use() != m.used {
                    return Err(format!(
                        "I5 violated: {} has a get pending: {}, the model {}",
                        addr(a),
                        metrics.pending_use(),
                        m.used
                    ));
                }
                if metrics.last_used() - t0 != m.last_used {
                    return Err(format!(
                        "I6 violated: {} last used at {:?}, the model {:?} (a probe is not a use)",
                        addr(a),
                        metrics.last_used() - t0,
                        m.last_used
                    ));
                }
                if metrics.last_probed().map(|t| t - t0) != m.last_probed {
                    return Err(format!(
                        "{}: last probed {:?}, the model {:?}",
                        addr(a),
                        metrics.last_probed().map(|t| t - t0),
                        m.last_probed
                    ));
                }
                if metrics.in_flight() != 0 {
                    return Err(format!(
                        "I5 violated: {} has {} call(s) in flight at rest",
                        addr(a),
                        metrics.in_flight()
                    ));
                }
                if (metrics.success_count(), metrics.total_errors()) != (m.successes, 0) {
                    return Err(format!(
                        "I13 violated: {} records {} ok / {} failed, the model {} answered probes",
                        addr(a),
                        metrics.success_count(),
                        metrics.total_errors(),
                        m.successes
                    ));
                }
            }
            (got, want) => {
                return Err(format!(
                    "I6/I9 violated: {} pooled {:?}, the model {:?}",
                    addr(a),
                    got.map(|c| c.client().serial),
                    want.map(|m| m.serial)
                ));
            }
        }
        if pool.ejection_count(addr(a)) != model.k[a] {
            return Err(format!(
                "I12 violated: ejection_count({}) = {}, the model {}",
                addr(a),
                pool.ejection_count(addr(a)),
                model.k[a]
            ));
        }
        let until = pool.backoff_until(addr(a)).map(|t| t - t0);
        let want = model.backoff_until[a].filter(|_| model.backing_off(a));
        if until != want {
            return Err(format!(
                "I12 violated: {} backs off until {until:?}, the model {want:?}",
                addr(a)
            ));
        }
    }
    let stats = pool.stats();
    let e = stats.evictions;
    if (e.idle, e.unhealthy, e.closed)
        != (
            model.evicted_idle,
            model.evicted_unhealthy,
            model.evicted_closed,
        )
    {
        return Err(format!(
            "evictions idle/unhealthy/closed {}/{}/{}, the model {}/{}/{}",
            e.idle,
            e.unhealthy,
            e.closed,
            model.evicted_idle,
            model.evicted_unhealthy,
            model.evicted_closed
        ));
    }
    let books = servers.0.lock().unwrap();
    if (books.connects, books.closes) != (model.connects, model.closes) {
        return Err(format!(
            "the connector saw {} connects and {} closes, the model {} and {}",
            books.connects, books.closes, model.connects, model.closes
        ));
    }
    Ok(())
}

/// `PROPTEST_CASES` or `default` cases; the RNG seed from proptest's environment-aware default
/// (CI fixes it with `PROPTEST_RNG_SEED`).
fn cases(default: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config {
        cases,
        ..proptest::test_runner::Config::default()
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// Probing rounds, checks before use and idle sweeps against the model, after every op
    /// (I5, I6, I8, I9, I12, I13, I16).
    #[test]
    fn liveness_matches_model(check_before_use in any::<bool>(), ops in prop::collection::vec(op(), 1..=20)) {
        if let Err(violation) = run(check_before_use, &ops) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

/// The case the feature exists for, stated outright: a server goes silent while its connection
/// is quiet; the probing round finds it (500 ms), evicts it and backs the address off, before
/// any caller; a healthy neighbour is probed and kept.
#[test]
fn a_silent_server_is_found_by_the_round_not_by_a_caller() {
    use Op::*;
    run(
        false,
        &[
            GetOrConnect(0),
            GetOrConnect(1),
            SetServer(0, Server::Silent),
            Advance(1500),
            Advance(1000),
            ProbeRound,
            GetOrConnect(0),
            Use(1),
        ],
    )
    .unwrap();
}
