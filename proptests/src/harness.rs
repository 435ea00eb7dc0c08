//! The executor: applies a [`Scenario`] to a real pool and to the [`Model`] side by side, on paused
//! virtual time, and checks the invariants by number after every op.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyed_pool::core::UnhealthyReason;
use keyed_pool::{
    CallGuard, Checkout, CheckoutError, ConnectionPool, Connector, PoolError, PooledConnection,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::model::{
    ConnectPlan, Ended, HealthEviction, InsertPlan, MCause, Model, Settings, Tripped,
};
use crate::ops::{ADDRS, ConnectScript, Finish, Op, Scenario, Step, addr};

/// Sequences longer than this are cut (fuzz inputs can be long; the checks are O(n) per op).
pub const MAX_OPS: usize = 1024;

/// A connection of the scripted connector: a transport flag the test can kill, and a count of the
/// connector's `close` calls on it.
#[derive(Debug)]
pub struct FakeConn {
    /// Creation order within the run.
    pub serial: u64,
    /// What `Connector::is_open` reports.
    pub transport_open: AtomicBool,
    /// How many times the pool closed it through the connector.
    pub closes: AtomicU32,
}

impl FakeConn {
    /// A fresh open connection.
    pub fn new(serial: u64) -> Self {
        Self {
            serial,
            transport_open: AtomicBool::new(true),
            closes: AtomicU32::new(0),
        }
    }
}

/// The error of a scripted connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptedError {
    /// Scripted to fail.
    Refused,
    /// A connect the script did not expect (the model said none would be made).
    Unscripted,
}

impl std::fmt::Display for ScriptedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused (scripted)",
            Self::Unscripted => "unexpected connect (not scripted)",
        })
    }
}

impl std::error::Error for ScriptedError {}

/// A connector whose next connect does what the test scripted, and which counts connects (made,
/// and still running: a connect future the pool dropped is no longer running).
#[derive(Debug)]
pub struct ScriptedConnector {
    next: Mutex<Option<ConnectScript>>,
    every: Mutex<Option<ConnectScript>>,
    /// Addresses whose server refuses the connects nobody scripted (the others accept them).
    down: Mutex<HashSet<String>>,
    /// The books: the address of every connect, in the order they began; and the closes of
    /// every connection by serial (a checkout's connection is owned by value, so its own count
    /// goes with it).
    log: Mutex<Vec<String>>,
    closed: Closes,
    connects: AtomicU64,
    running: AtomicU64,
    serial: AtomicU64,
    slow: Duration,
}

/// Closes per connection serial, shared with whoever reads the books.
pub type Closes = Arc<Mutex<HashMap<u64, u32>>>;

/// How many times the connection with `serial` was closed, by these books.
pub fn closes(book: &Closes, serial: u64) -> u32 {
    book.lock()
        .expect("books lock")
        .get(&serial)
        .copied()
        .unwrap_or(0)
}

/// Counts a connect as running from its first poll until its future completes or is dropped.
struct Running<'a>(&'a AtomicU64);

impl<'a> Running<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ScriptedConnector {
    /// `slow` is how long a [`ConnectScript::Slow`] connect takes.
    pub fn new(slow: Duration) -> Self {
        Self {
            next: Mutex::new(None),
            every: Mutex::new(None),
            down: Mutex::new(HashSet::new()),
            log: Mutex::new(Vec::new()),
            closed: Closes::default(),
            connects: AtomicU64::new(0),
            running: AtomicU64::new(0),
            serial: AtomicU64::new(1 << 32),
            slow,
        }
    }

    /// What the next connect does.
    pub fn script(&self, script: Option<ConnectScript>) {
        *self.next.lock().expect("script lock") = script;
    }

    /// What every connect does until this is set to `None` (a warm-up's several connects); a
    /// script for the next connect alone ([`script`](Self::script)) goes first.
    pub fn script_every(&self, script: Option<ConnectScript>) {
        *self.every.lock().expect("script lock") = script;
    }

    /// Whether the server at `addr` accepts the connects nobody scripted (all do at first).
    pub fn server(&self, addr: &str, up: bool) {
        let mut down = self.down.lock().expect("server lock");
        if up {
            down.remove(addr);
        } else {
            down.insert(addr.to_owned());
        }
    }

    /// The addresses connected to so far, in the order the connects began.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// How many times the pool closed the connection with this serial.
    pub fn closes(&self, serial: u64) -> u32 {
        closes(&self.closed, serial)
    }

    /// The books of closes, to read after the pool (and this connector) are gone.
    pub fn closes_book(&self) -> Closes {
        Arc::clone(&self.closed)
    }

    /// Connects made so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }

    /// Connects running now: begun, neither finished nor dropped by the pool.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::SeqCst)
    }
}

impl Connector for ScriptedConnector {
    type Conn = FakeConn;
    type Error = ScriptedError;

    async fn connect(&self, addr: &str) -> Result<FakeConn, ScriptedError> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.log.lock().expect("log lock").push(addr.to_owned());
        let _running = Running::new(&self.running);
        let next = self.next.lock().expect("script lock").take();
        // Nobody scripted it (a checkout's connect, made in the pool's own task): the server's
        // state says.
        let server = || {
            if self.down.lock().expect("server lock").contains(addr) {
                ConnectScript::Fail
            } else {
                ConnectScript::Ok
            }
        };
        let script = next
            .or(*self.every.lock().expect("script lock"))
            .or_else(|| Some(server()));
        let conn = FakeConn::new(self.serial.fetch_add(1, Ordering::Relaxed));
        match script {
            Some(ConnectScript::Ok) => Ok(conn),
            Some(ConnectScript::Slow) => {
                if !self.slow.is_zero() {
                    tokio::time::sleep(self.slow).await;
                }
                Ok(conn)
            }
            Some(ConnectScript::Fail) => Err(ScriptedError::Refused),
            Some(ConnectScript::Hang) => std::future::pending().await,
            None => Err(ScriptedError::Unscripted),
        }
    }

    fn is_open(&self, conn: &FakeConn) -> bool {
        conn.transport_open.load(Ordering::SeqCst)
    }

    fn close(&self, conn: &FakeConn) {
        conn.closes.fetch_add(1, Ordering::SeqCst);
        *self
            .closed
            .lock()
            .expect("books lock")
            .entry(conn.serial)
            .or_default() += 1;
    }
}

/// The pool type under test.
pub type Pool = ConnectionPool<FakeConn, ScriptedConnector>;

/// Runs `scenario` (at most [`MAX_OPS`] ops) on a fresh current-thread runtime with paused time.
///
/// # Errors
/// The first invariant violated, as `"I<n> violated: ..."` with the op that broke it.
pub fn run(scenario: &Scenario) -> Result<(), String> {
    run_counting_growths(scenario).map(|_| ())
}

/// [`run`], returning how many background connects hits started on busy addresses (I23), so that
/// a test can check that its scenario reaches several shared connections per address.
///
/// # Errors
/// As [`run`].
pub fn run_counting_growths(scenario: &Scenario) -> Result<u64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    rt.block_on(async {
        let mut h = Harness::new(Settings::from(scenario.knobs))?;
        for (n, op) in scenario.ops.iter().take(MAX_OPS).enumerate() {
            h.step_op(*op)
                .await
                .and_then(|()| h.check())
                .map_err(|e| format!("{e}\n  at op #{n}: {op:?}\n  settings: {:?}", h.m.s))?;
        }
        let growths = h.m.growths;
        h.finish().await.map(|()| growths)
    })
}

/// A pool and its model, side by side.
struct Harness {
    pool: Pool,
    m: Model,
    /// Every connection the run has seen, index = model index.
    conns: Vec<PooledConnection<FakeConn>>,
    by_id: HashMap<u64, usize>,
    /// Calls in flight: guard, connection index, start.
    calls: Vec<(CallGuard, usize, Duration)>,
    start: Instant,
    serial: u64,
    /// Checkouts in their own tasks, not yet ended: the model's waiter id and the task.
    waiting: Vec<(usize, CheckoutTask)>,
    /// Checkouts held, in the model's order ([`Model::held`]).
    held: Vec<Checkout<FakeConn>>,
    /// The connector's serial of every exclusive connection, index = the model's (each is handed
    /// to a caller as it is made, when the harness learns it).
    xserials: Vec<u64>,
    /// How much of the connector's log of connects the model has accounted for.
    log_seen: usize,
}

type CheckoutTask = JoinHandle<Result<Checkout<FakeConn>, CheckoutError>>;

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(msg()) }
}

impl Harness {
    fn new(s: Settings) -> Result<Self, String> {
        let connector = ScriptedConnector::new(s.timeout.saturating_sub(Duration::from_millis(1)));
        let pool = ConnectionPool::builder()
            .config(s.pool_config())
            .connector(connector)
            .build::<FakeConn>()
            .map_err(|e| format!("config rejected: {e}"))?;
        Ok(Self {
            pool,
            m: Model::new(s),
            conns: Vec::new(),
            by_id: HashMap::new(),
            calls: Vec::new(),
            start: Instant::now(),
            serial: 0,
            waiting: Vec::new(),
            held: Vec::new(),
            xserials: Vec::new(),
            log_seen: 0,
        })
    }

    fn now(&self) -> Duration {
        Instant::now() - self.start
    }

    fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// A connection the pool just created for `a`: its id must be new (I14 needs unique ids).
    /// `first`: it replaced the first of the address's shared connections (an insert by hand).
    fn adopt(
        &mut self,
        a: u8,
        conn: PooledConnection<FakeConn>,
        first: bool,
    ) -> Result<(), String> {
        let id = conn.id().get();
        ensure(!self.by_id.contains_key(&id), || {
            format!("I14 violated: id {id} handed out twice")
        })?;
        let i = self.m.add_conn(a, id, first);
        self.by_id.insert(id, i);
        self.conns.push(conn);
        Ok(())
    }

    fn idx(&self, conn: &PooledConnection<FakeConn>) -> Option<usize> {
        self.by_id.get(&conn.id().get()).copied()
    }

    fn handle(&self, h: u8) -> Option<usize> {
        (!self.conns.is_empty()).then(|| usize::from(h) % self.conns.len())
    }

    /// Lets spawned connect tasks finish (they run on this thread); bounded (I16).
    async fn settle(&self) -> Result<(), String> {
        for _ in 0..1_000 {
            if self.pool.stats().reserved == 0 {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
        Err("I16 violated: a connect is still in flight after its caller returned".into())
    }

    /// The rises of ejection counts the model made in this op (I12): each address now backs off
    /// for a delay the pool drew within the model's bounds for its count; the model adopts the
    /// draw.
    fn check_rises(&mut self) -> Result<(), String> {
        let now = self.m.now;
        let mut rises = std::mem::take(&mut self.m.rises);
        // Several rises of one address in one op (its several unfit shared connections evicted,
        // I23): the pool's backoff is the last one's draw.
        let mut seen = Vec::new();
        rises.reverse();
        rises.retain(|r| {
            let first = !seen.contains(&r.addr);
            seen.push(r.addr);
            first
        });
        rises.reverse();
        for rise in rises {
            let a = rise.addr;
            let Some(until) = self
                .pool
                .backoff_until(addr(a))
                .map(|t| self.since_start(t))
            else {
                return Err(format!(
                    "I12 violated: {} of {} (count {}) left no backoff",
                    rise.why,
                    addr(a),
                    rise.count
                ));
            };
            let delay = until - now;
            ensure(rise.lo <= delay && delay <= rise.hi, || {
                format!(
                    "I12 violated: the backoff after {} of {} (count {}) is {delay:?}, not in [{:?}, {:?}]",
                    rise.why,
                    addr(a),
                    rise.count,
                    rise.lo,
                    rise.hi
                )
            })?;
            self.m.set_backoff_until(a, until);
        }
        Ok(())
    }

    /// `close()` with a cleanup task running: the task ends (I17); the model closes too.
    async fn close(&mut self) -> Result<(), String> {
        self.m.close();
        let task = self.pool.start_cleanup_task(Duration::from_secs(1));
        self.pool.close().await;
        for _ in 0..100 {
            if task.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        ensure(task.is_finished(), || {
            "I17 violated: the cleanup task still runs after close()".into()
        })?;
        let (len, used, tracked) = (
            self.pool.len(),
            self.pool.used_slots(),
            self.pool.tracked_addresses(),
        );
        let out = self.held.len();
        ensure(len == 0 && used == out && tracked == 0, || {
            format!(
                "I17 violated: after close() the pool holds {len} connection(s), {used} slot(s) ({out} checked out), {tracked} address(es)"
            )
        })
    }

    async fn apply(&mut self, op: Op) -> Result<(), String> {
        match op {
            Op::Insert { addr: a } => {
                let a = a % ADDRS;
                self.serial += 1;
                let before = self.pool.len();
                let replacing = self.m.first(a).is_some();
                let plan = self.m.insert(a);
                let got = self.pool.try_insert(addr(a), FakeConn::new(self.serial));
                match (plan, got) {
                    (InsertPlan::Placed, Ok(conn)) => {
                        if replacing {
                            ensure(self.pool.len() == before, || {
                                format!(
                                    "I2 violated: re-insert changed the count {before} -> {}",
                                    self.pool.len()
                                )
                            })?;
                        }
                        self.adopt(a, conn, replacing)?;
                    }
                    (InsertPlan::Closed, Err(PoolError::Closed)) => {}
                    (
                        InsertPlan::Rejected,
                        Err(PoolError::AtCapacity {
                            max,
                            live,
                            connecting,
                        }),
                    ) if max == self.m.s.max && live + connecting == max => {}
                    (InsertPlan::Placed, Err(e)) if replacing => {
                        return Err(format!(
                            "I2 violated: re-inserting a present address failed: {e}"
                        ));
                    }
                    (InsertPlan::Rejected, Ok(_)) => {
                        return Err(format!(
                            "I1 violated: insert accepted beyond max_connections = {}",
                            self.m.s.max
                        ));
                    }
                    (plan, got) => {
                        let n = if plan == InsertPlan::Closed
                            || matches!(got, Err(PoolError::Closed))
                        {
                            17
                        } else {
                            1
                        };
                        return Err(format!(
                            "I{n} violated: insert({}): model says {plan:?}, pool gave {got:?}",
                            addr(a)
                        ));
                    }
                }
            }
            Op::Get { addr: a } => {
                let a = a % ADDRS;
                let want = self.m.get(a);
                let got = self.pool.get(addr(a));
                self.compare_get(a, want, got.as_ref())?;
            }
            Op::Remove { addr: a } => {
                let a = a % ADDRS;
                let want = self.m.remove(a);
                let got = self.pool.take_unclosed(addr(a));
                let got_idx = got.as_ref().and_then(|c| self.idx(c));
                ensure(want == got_idx, || {
                    format!(
                        "I14 violated: remove({}) gave {got_idx:?}, model {want:?}",
                        addr(a)
                    )
                })?;
            }
            Op::RemoveConnection { handle } => {
                let Some(i) = self.handle(handle) else {
                    return Ok(());
                };
                let want = self.m.remove_connection(i);
                let got = self.pool.remove_connection(&self.conns[i]);
                ensure(want == got, || {
                    if got {
                        format!(
                            "I14 violated: remove_connection(#{}) removed a connection that is no longer pooled",
                            self.conns[i].id()
                        )
                    } else {
                        format!(
                            "I14 violated: remove_connection(#{}) refused to remove the pooled connection",
                            self.conns[i].id()
                        )
                    }
                })?;
            }
            Op::Begin { handle } => {
                let Some(i) = self.handle(handle) else {
                    return Ok(());
                };
                self.m.begin(i);
                let guard = self.conns[i].begin();
                self.calls.push((guard, i, self.m.now));
            }
            Op::Finish { call, how } => {
                if self.calls.is_empty() {
                    return Ok(());
                }
                let (guard, i, started) = self.calls.remove(usize::from(call) % self.calls.len());
                match how {
                    Finish::Success => {
                        self.m.success(i, self.m.now - started);
                        guard.success();
                    }
                    Finish::Failure => {
                        let want = self.m.failure(i);
                        let got = guard.failure().is_unhealthy();
                        ensure(want == got, || self.verdict_msg(i, want, got))?;
                    }
                    Finish::Cancel => {
                        self.m.cancel(i);
                        drop(guard);
                    }
                }
                self.m.end_call(i);
            }
            Op::MarkClosed { handle } => {
                let Some(i) = self.handle(handle) else {
                    return Ok(());
                };
                self.m.conns[i].marked_closed = true;
                self.conns[i].mark_closed();
            }
            Op::DropTransport { handle } => {
                let Some(i) = self.handle(handle) else {
                    return Ok(());
                };
                self.m.conns[i].transport_dead = true;
                self.conns[i]
                    .client()
                    .transport_open
                    .store(false, Ordering::SeqCst);
            }
            Op::RecordSuccess {
                addr: a,
                latency_ms,
            } => {
                let a = a % ADDRS;
                let latency = Duration::from_millis(u64::from(latency_ms));
                if let Some(i) = self.m.first(a) {
                    self.m.success(i, latency);
                }
                self.pool.record_success(addr(a), latency);
            }
            Op::RecordError { addr: a } => {
                let a = a % ADDRS;
                if let Some(i) = self.m.first(a) {
                    self.m.failure(i);
                }
                self.pool.record_error(addr(a));
            }
            Op::Advance(step) => {
                let d = self.step(step);
                let target = self.m.now + d;
                // Stopping at every timer of a waiting checkout (deadlines, backoffs ending), so
                // the model plays each at its instant.
                while let Some(t) = self.m.next_timer(target) {
                    tokio::time::advance(t - self.m.now).await;
                    self.m.now = t;
                    self.m.expire();
                    self.m.retry();
                    self.round().await?;
                }
                tokio::time::advance(target - self.m.now).await;
                self.m.now = target;
            }
            Op::EvictIdle => {
                let want = self.m.evict_idle();
                let exclusive = self.m.evict_idle_exclusive();
                let got = self.pool.evict_idle().await;
                for &i in &want {
                    let c = &self.m.conns[i];
                    // Never early, against every use (a `get` included), not the folded clock.
                    ensure(
                        self.m
                            .s
                            .max_idle
                            .is_some_and(|max| self.m.now - c.exact_last_use > max),
                        || {
                            format!(
                                "I5 violated: #{} evicted as idle {:?} after its last use (max_idle {:?})",
                                c.id,
                                self.m.now - c.exact_last_use,
                                self.m.s.max_idle
                            )
                        },
                    )?;
                    ensure(!self.pooled(i), || {
                        format!(
                            "I6 violated: #{} idle for {:?} > max_idle {:?} survived the sweep",
                            c.id,
                            self.m.now - c.last_used,
                            self.m.s.max_idle
                        )
                    })?;
                }
                self.check_live_kept("evict_idle", |c, now| {
                    if c.in_flight > 0 {
                        format!(
                            "I5 violated: #{} evicted as idle with {} call(s) in flight",
                            c.id, c.in_flight
                        )
                    } else if c.last_used == now {
                        format!(
                            "I7 violated: #{} evicted as idle though used at the sweep's instant",
                            c.id
                        )
                    } else {
                        format!(
                            "I5 violated: #{} evicted as idle after {:?} unused (max_idle {:?})",
                            c.id,
                            now - c.last_used,
                            c.s_max_idle
                        )
                    }
                })?;
                ensure(got == want.len() + exclusive, || {
                    format!(
                        "I6 violated: evict_idle reported {got}, model evicted {} shared and {exclusive} exclusive",
                        want.len()
                    )
                })?;
            }
            Op::EvictUnhealthy => {
                let want = self.m.evict_unhealthy();
                let got = self.pool.evict_unhealthy().await;
                for &(i, why) in &want {
                    let c = &self.m.conns[i];
                    ensure(!self.pooled(i), || match why {
                        HealthEviction::Closed => format!(
                            "I8 violated: #{} with a closed transport survived evict_unhealthy",
                            c.id
                        ),
                        HealthEviction::Unhealthy => format!(
                            "I9 violated: unhealthy #{} (run {}, window {:?}) survived evict_unhealthy",
                            c.id,
                            c.run,
                            c.window_counts(&self.m.s, self.m.now)
                        ),
                    })?;
                }
                self.check_live_kept("evict_unhealthy", |c, _| {
                    format!("I9 violated: healthy #{} evicted by evict_unhealthy", c.id)
                })?;
                ensure(got == want.len(), || {
                    format!(
                        "I9 violated: evict_unhealthy reported {got}, model evicted {}",
                        want.len()
                    )
                })?;
            }
            Op::GetOrConnect { addr: a, script } => {
                let a = a % ADDRS;
                let plan = self.m.get_or_connect(a, script, false);
                self.pool.connector().script(Some(script));
                let got = self.pool.get_or_connect(&addr(a)).await;
                // Unscripted before settling: a checkout's connect woken meanwhile must not take it.
                self.pool.connector().script(None);
                self.settle().await?;
                self.compare_connect(a, plan, got)?;
                self.end_growth().await?;
            }
            Op::GetOrConnectTwice { addr: a, script } => {
                let a = a % ADDRS;
                let key = addr(a);
                self.pool.connector().script(Some(script));
                let (first, second) = tokio::join!(
                    self.pool.get_or_connect(&key),
                    self.pool.get_or_connect(&key)
                );
                self.pool.connector().script(None);
                self.settle().await?;
                // The model, in the order the two calls ran: the first to its first await, then
                // the second, which joins the first's flight if it started one.
                let plan = self.m.get_or_connect(a, script, false);
                if matches!(
                    plan,
                    ConnectPlan::Connected | ConnectPlan::Failed | ConnectPlan::TimedOut
                ) {
                    self.m.counters.shared += 1;
                    ensure(same_result(&first, &second), || {
                        format!(
                            "I4 violated: two callers of one connect got {first:?} and {second:?}"
                        )
                    })?;
                    self.compare_connect(a, plan, first)?;
                } else {
                    self.compare_connect(a, plan, first)?;
                    self.check_rises()?;
                    let plan = self.m.get_or_connect(a, script, false);
                    self.compare_connect(a, plan, second)?;
                }
                // I4: the two hits started one background connect at most.
                self.end_growth().await?;
            }
            Op::WarmUp {
                addrs: given,
                script,
            } => {
                let given = given.map(|a| a % ADDRS);
                // Instant connects only (see `ops::op`): a fuzzer's slow or hung script is played
                // as its instant outcome, so the backoffs are still running when compared.
                let script = match script {
                    ConnectScript::Ok | ConnectScript::Slow => ConnectScript::Ok,
                    ConnectScript::Fail | ConnectScript::Hang => ConnectScript::Fail,
                };
                self.pool.connector().script_every(Some(script));
                let report = self.pool.warm_up(given.map(addr), 1).await;
                self.settle().await?;
                self.pool.connector().script_every(None);
                let mut distinct: Vec<u8> = Vec::new();
                for a in given {
                    if !distinct.contains(&a) {
                        distinct.push(a);
                    }
                }
                let results = report.into_results();
                ensure(results.len() == distinct.len(), || {
                    format!(
                        "warm-up of {given:?} reported {} results, one per distinct address is {}",
                        results.len(),
                        distinct.len()
                    )
                })?;
                // With one connect at a time, the warm-up is a `get_or_connect` of each distinct
                // address in the order given: the model plays them so, every rule included.
                for (&a, (key, got)) in distinct.iter().zip(results) {
                    ensure(key.as_str() == addr(a), || {
                        format!("warm-up reported {key} where {} was next", addr(a))
                    })?;
                    let plan = self.m.get_or_connect(a, script, false);
                    self.compare_connect(a, plan, got)?;
                    self.check_rises()?;
                }
            }
            Op::Clear => {
                self.m.clear();
                self.pool.clear();
            }
            Op::Close => self.close().await?,
            Op::PruneAddresses => {
                let want = self.m.prune();
                let got = self.pool.prune_addresses().await;
                ensure(got == want, || {
                    format!("I18 violated: prune_addresses forgot {got} address(es), model {want}")
                })?;
                // After a prune the bound is exact: what holds a connection or an unsettled ejection
                // state, nothing else.
                let holding: Vec<u8> = (0..ADDRS).filter(|&a| self.m.holds(a)).collect();
                let tracked = self.pool.tracked_addresses();
                ensure(tracked == holding.len(), || {
                    format!(
                        "I18 violated: after prune_addresses the pool tracks {tracked} address(es); {} hold a connection or an unsettled ejection state ({holding:?})",
                        holding.len()
                    )
                })?;
            }
            Op::MarkUp { addr: a } => {
                let a = a % ADDRS;
                self.m.mark_up(a);
                self.pool.mark_up(addr(a));
            }
            Op::CloseWhileConnecting { addr: a, script } => {
                self.close_while_connecting(a % ADDRS, script).await?;
            }
            Op::Checkout { addr: a } => {
                let a = a % ADDRS;
                let w = self.m.checkout(a);
                let (pool, key) = (self.pool.clone(), addr(a));
                let task = tokio::spawn(async move { pool.checkout(key).await });
                self.waiting.push((w, task));
            }
            Op::Return {
                held,
                broken,
                cancel_first,
            } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let h = usize::from(held) % self.held.len();
                let a = self.m.xconns[self.m.held[h]].addr;
                let first = cancel_first.then(|| self.m.first_waiter(a)).flatten();
                // The model: the first caller gone, then the connection placed; the pool: the
                // connection handed to that caller, who is dropped before it could take it (I22).
                match first {
                    // Handed the connection: it comes back as the caller's, waking nobody.
                    Some(w) if !broken => self.m.drop_handed(w),
                    // Nothing handed: the caller leaves the line.
                    Some(w) => self.m.drop_waiter(w),
                    None => {}
                }
                self.m.give_back(h, broken);
                let mut checkout = self.held.remove(h);
                if broken {
                    checkout.mark_broken();
                }
                drop(checkout);
                if let Some(w) = first {
                    self.abort(w).await?;
                }
            }
            Op::DropWaiter { waiter } => {
                let waiting = self.m.waiting();
                if waiting.is_empty() {
                    return Ok(());
                }
                let w = waiting[usize::from(waiter) % waiting.len()];
                self.m.drop_waiter(w);
                self.abort(w).await?;
            }
            Op::Server { addr: a, up } => {
                let a = a % ADDRS;
                if up {
                    self.m.down.remove(&a);
                } else {
                    self.m.down.insert(a);
                }
                self.pool.connector().server(&addr(a), up);
            }
        }
        self.check_rises()
    }

    /// One op, then the checkouts it woke: the model plays the connects the pool made for the
    /// lines (in the pool's order) and every checkout that ended is compared.
    async fn step_op(&mut self, op: Op) -> Result<(), String> {
        let op = self.coerce(op);
        let Some(op) = op else {
            return Ok(());
        };
        let before = self.m.counters.attempted;
        self.m.hidden = None;
        let shared = !matches!(
            op,
            Op::Advance(_)
                | Op::Checkout { .. }
                | Op::Return { .. }
                | Op::DropWaiter { .. }
                | Op::Server { .. }
        );
        self.apply(op).await?;
        if shared {
            // The op's own connects come first in the connector's log: a checkout woken by the
            // op dials from its own task, which runs after the op's connect began.
            self.log_seen += usize::try_from(self.m.counters.attempted - before).unwrap_or(0);
        }
        self.round().await
    }

    /// While checkouts wait, ops whose connects take time would move the clock under them (and a
    /// warm-up's scripts would reach their connects): such connects are played as their instant
    /// outcome, a warm-up is skipped, a close racing a connect is a plain close.
    fn coerce(&self, op: Op) -> Option<Op> {
        // A hit that starts a background connect (I23) inside a warm-up or a call racing
        // `close()` would race that op's own awaits (which of them the connect runs before is
        // the runtime's choice, not a rule of the pool): such a warm-up is skipped, such a race
        // is a plain close.
        match op {
            Op::WarmUp { addrs, .. } if addrs.iter().any(|&a| self.m.may_grow(a % ADDRS)) => {
                return None;
            }
            Op::CloseWhileConnecting { addr: a, .. } if self.m.may_grow(a % ADDRS) => {
                return Some(Op::Close);
            }
            _ => {}
        }
        if self.m.waiters.is_empty() {
            return Some(op);
        }
        let instant = |script| match script {
            ConnectScript::Ok | ConnectScript::Slow => ConnectScript::Ok,
            ConnectScript::Fail | ConnectScript::Hang => ConnectScript::Fail,
        };
        Some(match op {
            Op::GetOrConnect { addr, script } => Op::GetOrConnect {
                addr,
                script: instant(script),
            },
            Op::GetOrConnectTwice { addr, script } => Op::GetOrConnectTwice {
                addr,
                script: instant(script),
            },
            Op::WarmUp { .. } => return None,
            Op::CloseWhileConnecting { .. } => Op::Close,
            op => op,
        })
    }

    /// Lets every task that can run do so: checkouts, their connects, the hand-overs.
    async fn drain(&self) -> Result<(), String> {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        self.settle().await?;
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// The checkouts' side of an op: the connects the lines made, in the connector's order, played
    /// by the model; then every checkout that ended compared with the model's.
    async fn round(&mut self) -> Result<(), String> {
        self.drain().await?;
        let log = self.pool.connector().log();
        let mut made: VecDeque<u8> = log
            .get(self.log_seen..)
            .unwrap_or_default()
            .iter()
            .map(|key| {
                (0..ADDRS)
                    .find(|&a| addr(a).as_str() == key)
                    .unwrap_or(u8::MAX)
            })
            .collect();
        self.log_seen = self.log_seen.max(log.len());
        self.m.settle(&mut made)?;
        ensure(made.is_empty(), || {
            format!(
                "I19 violated: connects to {made:?} the model does not expect (no line wants them)"
            )
        })?;
        self.collect().await?;
        self.check_rises()
    }

    /// Drops the future of waiting checkout `w` (its task aborted): it must end as cancelled,
    /// never with a result (the model has it in line).
    async fn abort(&mut self, w: usize) -> Result<(), String> {
        let Some(at) = self.waiting.iter().position(|(id, _)| *id == w) else {
            return Err(format!(
                "I21 violated: checkout #{w} ended; model: still in line"
            ));
        };
        let (_, task) = self.waiting.remove(at);
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => Ok(()),
            got => Err(format!(
                "I21 violated: checkout #{w} ended with {got:?} before it was dropped; model: still in line"
            )),
        }
    }

    /// Compares the checkouts that ended with the model's, in waiter order; the connections
    /// handed out join `held` in the model's order.
    async fn collect(&mut self) -> Result<(), String> {
        let ended = self.m.take_ended();
        let (mut finished, mut still) = (Vec::new(), Vec::new());
        for (w, task) in self.waiting.drain(..) {
            if task.is_finished() {
                finished.push((w, task));
            } else {
                still.push((w, task));
            }
        }
        self.waiting = still;
        for (w, _) in &self.waiting {
            if let Some((_, how)) = ended.iter().find(|(id, _)| id == w) {
                return Err(format!(
                    "I21 violated: checkout #{w} still waits; model: it ended with {how:?}"
                ));
            }
        }
        for (w, task) in finished {
            let got = task
                .await
                .map_err(|e| format!("checkout #{w} panicked: {e}"))?;
            let Some(&(_, how)) = ended.iter().find(|(id, _)| *id == w) else {
                return Err(format!(
                    "I21 violated: checkout #{w} ended with {got:?}; model: still in line"
                ));
            };
            self.compare_checkout(w, how, got)?;
        }
        Ok(())
    }

    fn compare_checkout(
        &mut self,
        w: usize,
        how: Ended,
        got: Result<Checkout<FakeConn>, CheckoutError>,
    ) -> Result<(), String> {
        let s = self.m.s;
        let ok = match (&how, &got) {
            (Ended::Conn(x), Ok(c)) => {
                let (x, id) = (*x, c.id().get());
                let want = self.m.xconns[x].id;
                if want == 0 {
                    let seen =
                        self.by_id.contains_key(&id) || self.m.xconns.iter().any(|mx| mx.id == id);
                    ensure(!seen, || {
                        format!("I20 violated: checkout #{w} got #{id}, an id handed out before")
                    })?;
                    self.m.xconns[x].id = id;
                    if self.xserials.len() <= x {
                        self.xserials.resize(x + 1, 0);
                    }
                    self.xserials[x] = c.serial;
                } else {
                    ensure(id == want, || {
                        format!(
                            "I21 violated: checkout #{w} got #{id}; model: #{want} (returned to the oldest caller, or the most recently returned idle one)"
                        )
                    })?;
                }
                true
            }
            (Ended::Closed, Err(CheckoutError::Pool(PoolError::Closed))) => true,
            (
                Ended::Backoff {
                    retry_after,
                    failures,
                    cause,
                },
                Err(CheckoutError::Pool(PoolError::Backoff {
                    retry_after: r,
                    failures: f,
                    cause: c,
                    ..
                })),
            ) => r == retry_after && f == failures && same_cause(c, *cause),
            (Ended::Refused, Err(CheckoutError::Pool(PoolError::Connect { cause, .. }))) => {
                cause.downcast_ref::<ScriptedError>() == Some(&ScriptedError::Refused)
            }
            (
                Ended::TimedOut(n),
                Err(CheckoutError::TimedOut {
                    timeout,
                    checked_out,
                    ..
                }),
            ) => *timeout == s.checkout_timeout && checked_out == n,
            (Ended::AtCapacity, Err(CheckoutError::AtCapacity { timeout, max, .. })) => {
                *timeout == s.checkout_timeout && *max == s.max
            }
            _ => false,
        };
        if !ok {
            let n = match how {
                Ended::Conn(_) | Ended::Refused => 21,
                Ended::Closed => 17,
                Ended::Backoff { .. } => 12,
                Ended::TimedOut(_) => 16,
                Ended::AtCapacity => 1,
            };
            return Err(format!(
                "I{n} violated: checkout #{w} ended with {got:?}; model: {how:?}"
            ));
        }
        if let Ok(c) = got {
            self.held.push(c);
        }
        Ok(())
    }

    /// `get_or_connect(a)` runs until it returns or its connect is under way at the connector;
    /// then `close()` cuts it (I17): the connect is dropped, the caller gets `Closed`, nothing was
    /// made.
    async fn close_while_connecting(&mut self, a: u8, script: ConnectScript) -> Result<(), String> {
        let plan = self.m.get_or_connect(a, script, true);
        self.pool.connector().script(Some(script));
        let (pool, key) = (self.pool.clone(), addr(a));
        let call = tokio::spawn(async move { pool.get_or_connect(&key).await });
        for _ in 0..1_000 {
            if call.is_finished() || self.pool.connector().running() > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if call.is_finished() {
            let got = call
                .await
                .map_err(|e| format!("get_or_connect panicked: {e}"))?;
            self.pool.connector().script(None);
            self.compare_connect(a, plan, got)?;
            self.check_rises()?;
            self.close().await?;
        } else {
            self.close().await?;
            let got = call
                .await
                .map_err(|e| format!("get_or_connect panicked: {e}"))?;
            self.pool.connector().script(None);
            match (plan, got) {
                (ConnectPlan::Abandoned, Err(PoolError::Closed)) => {}
                (ConnectPlan::Abandoned, got) => {
                    return Err(format!(
                        "I17 violated: get_or_connect whose connect close() cut got {got:?}, not Closed"
                    ));
                }
                (plan, got) => {
                    return Err(format!(
                        "I17 violated: get_or_connect racing close(): model {plan:?} before the close, pool still waiting then gave {got:?}"
                    ));
                }
            }
            let running = self.pool.connector().running();
            ensure(running == 0, || {
                format!(
                    "I17 violated: {running} connect(s) still running at the connector after close()"
                )
            })?;
        }
        Ok(())
    }

    /// Ends the background connect a hit started (I23), if any: the pool's task has run (the
    /// caller settled); the model says whether it made a connection. A new one is the least
    /// loaded of its address (every other had `busy_in_flight` calls in flight), so the next
    /// `get` hands it out: the harness takes its handle so (and the model marks it used, as
    /// that `get` does).
    async fn end_growth(&mut self) -> Result<(), String> {
        let Some((a, made)) = self.m.end_growth() else {
            return Ok(());
        };
        if !made {
            return Ok(());
        }
        let Some(conn) = self.pool.get(addr(a)) else {
            return Err(format!(
                "I23 violated: every shared connection of {} was busy and the background connect succeeded, but get() finds nothing",
                addr(a)
            ));
        };
        ensure(self.idx(&conn).is_none(), || {
            format!(
                "I23 violated: after a background connect for {} (every connection busy), get() gave the old #{} with {} call(s) in flight, not the new one",
                addr(a),
                conn.id(),
                conn.metrics().in_flight()
            )
        })?;
        self.adopt(a, conn, false)?;
        let i = self.conns.len() - 1;
        let want = self.m.get(a);
        ensure(want == Some(i), || {
            format!(
                "I23 violated: the model's least-loaded connection of {} is {want:?}, the pool handed out the new #{}",
                addr(a),
                self.m.conns[i].id
            )
        })
    }

    /// The shared connections of `a` (I23): no more than `max_per_address`, and, when no
    /// pending `get` mark would be folded by looking (`address()` reports idle times), exactly
    /// the model's, in the pool's order (the first, then the others oldest first: a removed
    /// first promotes the oldest, I14 by id).
    fn check_shared(&self, a: u8) -> Result<(), String> {
        let m = &self.m;
        let list = m.shared(a);
        ensure(list.len() <= m.s.per_address, || {
            format!(
                "I23 violated: the model holds {} shared connections for {}, max_per_address {}",
                list.len(),
                addr(a),
                m.s.per_address
            )
        })?;
        if list.iter().any(|&i| m.conns[i].used) {
            return Ok(());
        }
        let got: Vec<u64> = self
            .pool
            .address(addr(a))
            .map(|st| {
                st.connection
                    .iter()
                    .chain(&st.more_connections)
                    .map(|c| c.id.get())
                    .collect()
            })
            .unwrap_or_default();
        let want: Vec<u64> = list.iter().map(|&i| m.conns[i].id).collect();
        ensure(got.len() <= m.s.per_address, || {
            format!(
                "I23 violated: {} has {} shared connections, max_per_address {}",
                addr(a),
                got.len(),
                m.s.per_address
            )
        })?;
        ensure(got == want, || {
            format!(
                "I23 violated: {} has shared connections {got:?}, model {want:?} (first, then the oldest; removals by id, I14)",
                addr(a)
            )
        })
    }

    fn step(&self, step: Step) -> Duration {
        let s = &self.m.s;
        match step {
            Step::Millis(ms) => Duration::from_millis(u64::from(ms)),
            Step::MaxIdle(edge) => s.max_idle.map_or(Duration::ZERO, |d| edge.apply(d)),
            Step::ConnectTimeout => s.timeout,
            Step::WindowBucket => s.window / 8,
            Step::Backoff { addr: a, edge } => {
                let e = self.m.ejection(a % ADDRS);
                if e.backing_off(self.m.now) {
                    edge.apply(e.until - self.m.now)
                } else {
                    Duration::ZERO
                }
            }
            Step::Decay { addr: a, edge } => {
                let (e, now) = (self.m.ejection(a % ADDRS), self.m.now);
                if e.count_at(s.decay, now) == 0 {
                    return Duration::ZERO;
                }
                // The next whole decay interval after the end of the backoff.
                let steps = now.saturating_sub(e.until).as_nanos() / s.decay.as_nanos();
                let next = e.until.as_nanos() + s.decay.as_nanos() * (steps + 1);
                edge.apply(Duration::from_nanos(next as u64) - now)
            }
            Step::ShortLived { handle, edge } => {
                let Some(i) = self.handle(handle) else {
                    return Duration::ZERO;
                };
                let grown_up = self.m.conns[i].created + s.short_lived;
                if grown_up > self.m.now {
                    edge.apply(grown_up - self.m.now)
                } else {
                    Duration::ZERO
                }
            }
        }
    }

    /// Whether connection `i` is still pooled for its address: the first (`peek`), or, of
    /// several (I23), one the pool has not closed (`address()` would name them all, but it folds
    /// pending `get` marks; `check` compares the full lists whenever no mark is pending).
    fn pooled(&self, i: usize) -> bool {
        self.pool
            .peek(addr(self.m.conns[i].addr))
            .is_some_and(|c| c.id().get() == self.m.conns[i].id)
            || self.conns[i].client().closes.load(Ordering::SeqCst) == 0
    }

    /// After a sweep: every connection the model keeps is still pooled; else `why` says which
    /// invariant the sweep broke.
    fn check_live_kept(
        &self,
        _sweep: &str,
        why: impl Fn(&Kept, Duration) -> String,
    ) -> Result<(), String> {
        for i in self.m.all_live() {
            if !self.pooled(i) {
                let c = &self.m.conns[i];
                return Err(why(
                    &Kept {
                        id: c.id,
                        in_flight: c.in_flight,
                        last_used: c.last_used,
                        s_max_idle: self.m.s.max_idle,
                    },
                    self.m.now,
                ));
            }
        }
        Ok(())
    }

    fn verdict_msg(&self, i: usize, want: bool, got: bool) -> String {
        let c = &self.m.conns[i];
        let window = c.window_counts(&self.m.s, self.m.now);
        let total = window.0 + window.1;
        if got && !want && total < u64::from(self.m.s.min_requests) {
            format!(
                "I11 violated: #{} judged unhealthy with {total} call(s) in the window, below the minimum volume {} (run {})",
                c.id, self.m.s.min_requests, c.run
            )
        } else {
            format!(
                "I9 violated: #{} verdict unhealthy={got}, model {want} (run {}, window {window:?}, settings {:?})",
                c.id, c.run, self.m.s
            )
        }
    }

    fn compare_get(
        &self,
        a: u8,
        want: Option<usize>,
        got: Option<&PooledConnection<FakeConn>>,
    ) -> Result<(), String> {
        let got_idx = got.and_then(|c| self.idx(c));
        if want == got_idx && got.is_some() == got_idx.is_some() {
            return Ok(());
        }
        let Some(conn) = got else {
            return Err(format!(
                "I14 violated: get({}) gave nothing; model: the usable #{}",
                addr(a),
                self.m.conns[want.unwrap_or_default()].id
            ));
        };
        let Some(i) = got_idx else {
            return Err(format!(
                "I14 violated: get gave #{} the run never saw",
                conn.id()
            ));
        };
        let c = &self.m.conns[i];
        Err(if c.marked_closed || c.transport_dead {
            format!(
                "I8 violated: get({}) returned #{} whose transport is known closed",
                addr(a),
                c.id
            )
        } else if c.unhealthy {
            format!("I9 violated: get({}) returned unhealthy #{}", addr(a), c.id)
        } else if self.m.s.per_address > 1 {
            format!(
                "I23 violated: get({}) returned #{} ({} in flight); model: the least loaded, first of equals, {:?}",
                addr(a),
                c.id,
                c.in_flight,
                want.map(|w| (self.m.conns[w].id, self.m.conns[w].in_flight))
            )
        } else {
            format!(
                "I14 violated: get({}) returned #{}; model {want:?}",
                addr(a),
                c.id
            )
        })
    }

    fn compare_connect(
        &mut self,
        a: u8,
        plan: ConnectPlan,
        got: Result<PooledConnection<FakeConn>, PoolError>,
    ) -> Result<(), String> {
        let s = self.m.s;
        match (plan, got) {
            (ConnectPlan::Closed, Err(PoolError::Closed)) => Ok(()),
            (ConnectPlan::Existing(i), Ok(conn)) if self.idx(&conn) == Some(i) => Ok(()),
            (ConnectPlan::Existing(i), Ok(conn)) => {
                let c = self.idx(&conn).map(|j| &self.m.conns[j]);
                if c.is_some_and(|c| c.marked_closed || c.transport_dead) {
                    Err(format!(
                        "I8 violated: get_or_connect returned #{} whose transport is closed",
                        conn.id()
                    ))
                } else if c.is_some_and(|c| c.unhealthy) {
                    Err(format!(
                        "I9 violated: get_or_connect returned unhealthy #{}",
                        conn.id()
                    ))
                } else if s.per_address > 1 {
                    Err(format!(
                        "I23 violated: get_or_connect gave #{} ({} in flight), model: the least loaded, first of equals, #{} ({} in flight)",
                        conn.id().get(),
                        conn.metrics().in_flight(),
                        self.m.conns[i].id,
                        self.m.conns[i].in_flight
                    ))
                } else {
                    Err(format!(
                        "I14 violated: get_or_connect gave #{}, model #{}",
                        conn.id(),
                        self.m.conns[i].id
                    ))
                }
            }
            (
                ConnectPlan::Backoff {
                    retry_after,
                    failures,
                    cause,
                },
                Err(PoolError::Backoff {
                    retry_after: r,
                    failures: f,
                    cause: c,
                    ..
                }),
            ) => ensure(
                r == retry_after && f == failures && same_cause(&c, cause),
                || {
                    format!(
                        "I12 violated: backoff says retry in {r:?} at count {f} ({c}); model {retry_after:?} at count {failures} ({cause:?})"
                    )
                },
            ),
            (
                ConnectPlan::FreshBackoff {
                    failures,
                    cause,
                    lo,
                    hi,
                },
                Err(PoolError::Backoff {
                    retry_after: r,
                    failures: f,
                    cause: c,
                    ..
                }),
            ) => ensure(
                lo <= r && r <= hi && f == failures && same_cause(&c, cause),
                || {
                    format!(
                        "I12 violated: evicting an unfit connection backed off {r:?} at count {f} ({c}); model [{lo:?}, {hi:?}] at count {failures} ({cause:?})"
                    )
                },
            ),
            (
                ConnectPlan::AtCapacity,
                Err(PoolError::AtCapacity {
                    max,
                    live,
                    connecting,
                }),
            ) if max == s.max && live + connecting == max => Ok(()),
            (ConnectPlan::Connected, Ok(conn)) => {
                ensure(self.idx(&conn).is_none(), || {
                    format!(
                        "I4 violated: get_or_connect returned the old #{} instead of a new connection",
                        conn.id()
                    )
                })?;
                self.adopt(a, conn, false)
            }
            (ConnectPlan::Failed, Err(PoolError::Connect { .. })) => Ok(()),
            (ConnectPlan::TimedOut, Err(PoolError::ConnectTimeout { timeout, .. }))
                if timeout == s.timeout =>
            {
                Ok(())
            }
            (ConnectPlan::Backoff { .. } | ConnectPlan::FreshBackoff { .. }, got) => Err(format!(
                "I12 violated: get_or_connect during backoff gave {got:?}"
            )),
            (plan, Err(e @ PoolError::Backoff { .. })) => Err(format!(
                "I12 violated: get_or_connect refused by backoff ({e}); model {plan:?}"
            )),
            (ConnectPlan::AtCapacity, Ok(_)) => Err(format!(
                "I1 violated: get_or_connect connected beyond max_connections = {}",
                s.max
            )),
            (plan, got) => {
                // Named by what went wrong: a close, the cap, a wait, or the connect itself.
                let n = match (&plan, &got) {
                    (ConnectPlan::Closed | ConnectPlan::Abandoned, _)
                    | (_, Err(PoolError::Closed)) => 17,
                    (ConnectPlan::AtCapacity, _) | (_, Err(PoolError::AtCapacity { .. })) => 1,
                    (ConnectPlan::TimedOut, _) | (_, Err(PoolError::ConnectTimeout { .. })) => 16,
                    _ => 4,
                };
                Err(format!(
                    "I{n} violated: get_or_connect({}): model {plan:?}, pool {got:?}",
                    addr(a)
                ))
            }
        }
    }

    /// The invariants that hold after every op.
    fn check(&self) -> Result<(), String> {
        let m = &self.m;
        let s = &m.s;
        let now = self.now();
        ensure(now == m.now, || {
            format!(
                "I16 violated: the clock is at {now:?}, the model at {:?} (a wait overran its deadline)",
                m.now
            )
        })?;
        let (len, used) = (self.pool.len(), self.pool.used_slots());
        if s.max > 0 {
            ensure(len <= s.max && used <= s.max, || {
                format!("I1 violated: {len} live, {used} slots used, max {}", s.max)
            })?;
        }
        let ex_idle: usize = m.lines.values().map(|l| l.idle.len()).sum();
        let ex_out: usize = m.lines.values().map(|l| l.out).sum();
        ensure(len == m.shared_count() + ex_idle + ex_out, || {
            format!(
                "I1 violated: {len} live connections, model {} shared, {ex_idle} idle and {ex_out} checked out exclusive (I2: a replacement keeps the count)",
                m.shared_count()
            )
        })?;
        let stats = self.pool.stats();
        let out_closed = m.out_closed();
        ensure(used == len + out_closed && stats.reserved == 0, || {
            format!(
                "I3 violated: {used} slots used ({} reserved) for {len} live connections, {out_closed} checked out past close() and no connect in flight",
                stats.reserved
            )
        })?;
        let (want, made) = (m.counters.attempted, self.pool.connector().connects());
        ensure(want == made, || {
            format!("I4 violated: {made} connects made, model expects {want}")
        })?;
        self.check_exclusive(&stats)?;
        for a in 0..ADDRS {
            let got = self.pool.peek(addr(a)).map(|c| c.id().get());
            let want = m.first(a).map(|i| m.conns[i].id);
            ensure(got == want, || {
                format!(
                    "I14 violated: {} holds {got:?} first, model {want:?}",
                    addr(a)
                )
            })?;
            self.check_shared(a)?;
            let e = m.ejection(a);
            let (count, failures) = (
                self.pool.ejection_count(addr(a)),
                self.pool.backoff_failures(addr(a)),
            );
            let want = m.count(a);
            ensure(count == want && failures == want, || {
                format!(
                    "I12 violated: {} has ejection count {count} (backoff_failures {failures}), model {want} ({e:?}, decay {:?})",
                    addr(a),
                    s.decay
                )
            })?;
            let until = self
                .pool
                .backoff_until(addr(a))
                .map(|t| self.since_start(t));
            let want_until = e.backing_off(m.now).then_some(e.until);
            ensure(until == want_until, || {
                format!(
                    "I12 violated: {} backs off until {until:?}, model {want_until:?}",
                    addr(a)
                )
            })?;
        }
        // I18: the pool keeps exactly the addresses the model does: every one holding a connection
        // or an unsettled ejection state, plus those that settled since the pool last looked.
        let tracked = self.pool.tracked_addresses();
        ensure(tracked == m.slots.len(), || {
            let holding: Vec<u8> = (0..ADDRS).filter(|&a| m.holds(a)).collect();
            format!(
                "I18 violated: the pool tracks {tracked} address(es), model {:?} (holding state: {holding:?})",
                m.slots
            )
        })?;
        let running = self.pool.connector().running();
        ensure(running == 0, || {
            format!("I16 violated: {running} connect(s) still running after their callers returned")
        })?;
        for (i, conn) in self.conns.iter().enumerate() {
            let c = &m.conns[i];
            let mx = conn.metrics();
            let live = m.is_live(i);
            let whose = if live { "live" } else { "removed/replaced" };
            let counts = (
                mx.success_count(),
                mx.total_errors(),
                mx.cancelled_count(),
                mx.in_flight(),
            );
            let want = (c.successes, c.errors, c.cancelled, c.in_flight);
            ensure(counts == want, || {
                format!(
                    "I13 violated: {whose} #{} has (ok, err, cancelled, in flight) = {counts:?}, model {want:?}",
                    c.id
                )
            })?;
            ensure(
                mx.max_latency() == Duration::from_micros(c.max_latency_us),
                || {
                    format!(
                        "I13 violated: #{} max latency {:?}, model {} us",
                        c.id,
                        mx.max_latency(),
                        c.max_latency_us
                    )
                },
            )?;
            ensure(mx.consecutive_errors() == c.run, || {
                format!(
                    "I10 violated: #{} counts {} consecutive failures, trailing run is {}",
                    c.id,
                    mx.consecutive_errors(),
                    c.run
                )
            })?;
            let closed = mx.is_closed();
            ensure(closed == c.marked_closed, || {
                format!(
                    "I13 violated: {whose} #{} is marked closed = {closed}, model {} (a mark on another connection reached it)",
                    c.id, c.marked_closed
                )
            })?;
            let reason = mx.unusable_reason();
            // The latch's reason first; a closed transport only for a connection still healthy.
            let want_reason = c
                .tripped
                .map(|t| match t {
                    Tripped::Run(count) => UnhealthyReason::ConsecutiveFailures { count },
                    Tripped::Ratio(failures, total) => {
                        UnhealthyReason::FailureRatio { failures, total }
                    }
                })
                .or(c.marked_closed.then_some(UnhealthyReason::Closed));
            ensure(reason == want_reason, || {
                format!(
                    "I9 violated: {whose} #{} is unusable for {reason:?}, model {want_reason:?} (the latch stores the reason it closed on)",
                    c.id
                )
            })?;
            let healthy = conn.is_healthy();
            ensure(healthy == c.healthy(), || {
                self.verdict_msg(i, !c.healthy(), !healthy)
            })?;
            let last_used = self.since_start(mx.last_used());
            let pending = mx.pending_use();
            ensure(last_used == c.last_used && pending == c.used, || {
                format!(
                    "I5 violated: #{} last used at {last_used:?} (a get pending: {pending}), model {:?} ({}) (the idle clock is wrong)",
                    c.id, c.last_used, c.used
                )
            })?;
            let closes = conn.client().closes.load(Ordering::SeqCst);
            ensure(closes == u32::from(c.closed_by_pool), || {
                format!(
                    "I17 violated: {whose} #{} closed {closes} time(s) by the pool, model {} (every connection the pool lets go of is closed once, I9)",
                    c.id,
                    u32::from(c.closed_by_pool)
                )
            })?;
        }
        let all = m.all_live();
        let live = || all.iter().map(|&i| &m.conns[i]);
        let idle = live().filter(|c| c.idle(s, m.now)).count() + ex_idle;
        let healthy = live().filter(|c| c.healthy()).count() + ex_idle + ex_out;
        let in_flight: u64 = live().map(|c| c.in_flight).sum();
        ensure(
            (stats.total, stats.idle, stats.healthy, stats.in_flight)
                == (len, idle, healthy, in_flight),
            || {
                format!(
                    "I13 violated: stats (total, idle, healthy, in flight) = {:?}, model {:?}",
                    (stats.total, stats.idle, stats.healthy, stats.in_flight),
                    (len, idle, healthy, in_flight)
                )
            },
        )?;
        let c = &m.counters;
        let e = &stats.evictions;
        let got = [
            e.idle,
            e.unhealthy,
            e.closed,
            e.replaced,
            e.manual,
            e.make_room,
            e.broken,
            // `max_lifetime` is not modelled (never set): nothing may retire for it.
            e.lifetime,
            stats.rejected_capacity,
        ];
        let want = [
            c.idle,
            c.unhealthy,
            c.closed,
            c.replaced,
            c.manual,
            c.make_room,
            c.broken,
            0,
            c.rejected,
        ];
        ensure(got == want, || {
            format!(
                "I13 violated: stats: evictions (idle, unhealthy, closed, replaced, manual, make room, broken, lifetime, rejected) = {got:?}, model {want:?}"
            )
        })?;
        let k = &stats.connects;
        let got = [
            k.attempted,
            k.succeeded,
            k.failed,
            k.timed_out,
            k.shared,
            k.backoff_rejections,
        ];
        let want = [
            c.attempted,
            c.succeeded,
            c.failed,
            c.timed_out,
            c.shared,
            c.backoff_rejections,
        ];
        ensure(got == want, || {
            format!(
                "I13 violated: stats: connects (attempted, ok, failed, timed out, shared, backoff) = {got:?}, model {want:?}"
            )
        })?;
        Ok(())
    }

    /// The exclusive side after every op: each address's line and connections (I19, I21), the
    /// checkouts held (I20), the connector's books of every exclusive connection (I22), and the
    /// gauges.
    fn check_exclusive(&self, stats: &keyed_pool::PoolStats) -> Result<(), String> {
        let m = &self.m;
        for a in 0..ADDRS {
            // `address()` folds a pending `get` of the shared connection into its idle clock (it
            // reports `idle_for`): not looked at then, so that looking does not move the clock.
            if m.shared(a).iter().any(|&i| m.conns[i].used) {
                continue;
            }
            let got = self.pool.address(addr(a)).map(|st| {
                let e = st.exclusive;
                (e.idle, e.checked_out, e.connecting, e.waiting)
            });
            let want = m
                .lines
                .get(&a)
                .map(|l| (l.idle.len(), l.out, 0, l.line.len()));
            let got = got.filter(|&g| g != (0, 0, 0, 0));
            let want = want.filter(|&w| w != (0, 0, 0, 0));
            ensure(got == want, || {
                format!(
                    "I21 violated: {} has exclusive (idle, checked out, connecting, waiting) = {got:?}, model {want:?}",
                    addr(a)
                )
            })?;
            if let Some((idle, out, connecting, waiting)) = got {
                ensure(idle + out + connecting <= m.s.per_address, || {
                    format!(
                        "I19 violated: {} has {} exclusive connections, max_per_address {}",
                        addr(a),
                        idle + out + connecting,
                        m.s.per_address
                    )
                })?;
                ensure(idle == 0 || waiting == 0, || {
                    format!(
                        "I21 violated: {} has {idle} idle connection(s) while {waiting} caller(s) wait",
                        addr(a)
                    )
                })?;
            }
        }
        let ex_idle: usize = m.lines.values().map(|l| l.idle.len()).sum();
        let ex_out: usize = m.lines.values().map(|l| l.out).sum();
        let waiting: usize = m.lines.values().map(|l| l.line.len()).sum();
        ensure(
            (stats.checked_out, stats.waiting) == (ex_out, waiting),
            || {
                format!(
                    "I13 violated: stats (checked out, waiting) = {:?}, model {:?}",
                    (stats.checked_out, stats.waiting),
                    (ex_out, waiting)
                )
            },
        )?;
        let _ = ex_idle;
        for (h, c) in self.held.iter().enumerate() {
            let x = m.held[h];
            let (id, want) = (c.id().get(), m.xconns[x].id);
            ensure(id == want, || {
                format!("I20 violated: held checkout {h} is #{id}, model #{want}")
            })?;
            ensure(
                self.held[..h].iter().all(|other| other.id() != c.id()),
                || format!("I20 violated: #{id} is checked out to two callers"),
            )?;
        }
        let connector = self.pool.connector();
        for (x, &serial) in self.xserials.iter().enumerate() {
            let mx = &m.xconns[x];
            let closes = connector.closes(serial);
            ensure(closes == u32::from(mx.closed_by_pool), || {
                format!(
                    "I22 violated: exclusive #{} closed {closes} time(s) at the connector, model {} (every connection made is idle, checked out, or closed once)",
                    mx.id,
                    u32::from(mx.closed_by_pool)
                )
            })?;
        }
        Ok(())
    }

    /// End of the run: dropping the last handle of the pool ends its cleanup task and closes every
    /// connection it held (I17).
    async fn finish(mut self) -> Result<(), String> {
        self.settle().await?;
        self.calls.clear();
        // Checkouts: the waiting ones dropped, the held ones given back (they idle, or are
        // closed if the pool closed); then the pool's drop closes what idles.
        for (_, task) in std::mem::take(&mut self.waiting) {
            task.abort();
            let _ = task.await;
        }
        self.held.clear();
        self.drain().await?;
        let task = self.pool.start_cleanup_task(Duration::from_secs(1));
        let held: Vec<usize> = self.m.all_live();
        let book = self.pool.connector().closes_book();
        drop(self.pool);
        for _ in 0..100 {
            if task.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        ensure(task.is_finished(), || {
            "I17 violated: the cleanup task outlived the pool".into()
        })?;
        for i in held {
            let closes = self.conns[i].client().closes.load(Ordering::SeqCst);
            ensure(closes == 1, || {
                format!(
                    "I17 violated: dropping the pool closed #{} {closes} time(s)",
                    self.conns[i].id()
                )
            })?;
        }
        for (x, &serial) in self.xserials.iter().enumerate() {
            let n = closes(&book, serial);
            ensure(n == 1, || {
                format!(
                    "I22 violated: exclusive #{} closed {n} time(s) once every checkout was given back and the pool dropped",
                    self.m.xconns[x].id
                )
            })?;
        }
        Ok(())
    }
}

/// Whether the cause a `PoolError::Backoff` reports is the model's cause of the last rise.
fn same_cause(got: &keyed_pool::Cause, want: MCause) -> bool {
    let reason = got.downcast_ref::<UnhealthyReason>();
    match want {
        MCause::Refused => got.downcast_ref::<ScriptedError>() == Some(&ScriptedError::Refused),
        MCause::TimedOut => matches!(
            got.downcast_ref::<PoolError>(),
            Some(PoolError::ConnectTimeout { .. })
        ),
        MCause::Closed => reason == Some(&UnhealthyReason::Closed),
        MCause::Tripped(Tripped::Run(count)) => {
            reason == Some(&UnhealthyReason::ConsecutiveFailures { count })
        }
        MCause::Tripped(Tripped::Ratio(failures, total)) => {
            reason == Some(&UnhealthyReason::FailureRatio { failures, total })
        }
    }
}

/// Whether two callers got one result: the same connection, or the same error.
fn same_result(
    a: &Result<PooledConnection<FakeConn>, PoolError>,
    b: &Result<PooledConnection<FakeConn>, PoolError>,
) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x.id() == y.id(),
        (Err(PoolError::Connect { cause: x, .. }), Err(PoolError::Connect { cause: y, .. })) => {
            std::sync::Arc::ptr_eq(x, y)
        }
        (Err(PoolError::ConnectTimeout { .. }), Err(PoolError::ConnectTimeout { .. })) => true,
        _ => false,
    }
}

/// What a sweep check reports about a connection it should have kept.
struct Kept {
    id: u64,
    in_flight: u64,
    last_used: Duration,
    s_max_idle: Option<Duration>,
}
