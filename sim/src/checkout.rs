//! Exclusive checkout under simulation (issue 13): `pool.checkout(addr)` driven by many tasks
//! against brokers that are slow or get killed, judged from outside the pool.
//!
//! The connector's and brokers' books (`books.rs`, `broker.rs`) judge what they judge everywhere
//! (I1 open + connecting ≤ cap, I4, I6, I9, I12, I17, ACC), plus I19 per address
//! ([`Registry::set_per_address`](crate::books::Registry::set_per_address)). The scenario's own
//! books of its callers ([`Callers`]) judge what only a caller sees:
//! - **I20**: a connection (by the client's serial) is never held by two callers at once; what is
//!   handed out is a connection of the address asked for, open at the connector, never one marked
//!   broken before;
//! - **I21**: callers of an address are served in arrival order. Arrival is the first poll of
//!   `checkout` (it joins the line without an `.await` before), so the order the tasks start their
//!   checkouts is the line's order; and a task handed a connection runs in the same virtual
//!   instant as the hand-over (madsim runs every ready task before the clock moves). So caller B
//!   served at `t` while an older caller A of the same address was still waiting and went on
//!   waiting past `t` (it ended strictly later, however) is a violation. Also: a caller that gives
//!   up (`TimedOut`, `AtCapacity`) while a connection of its own address has sat idle for over a
//!   millisecond (no connection idles while a caller waits);
//! - **FAIR** (issue 13's "no waiter starves while capacity exists elsewhere", which DESIGN.md
//!   gives no number): a caller that gives up while its address is below `max_per_address` at the
//!   connector, while a connection of another address has sat idle for over a millisecond (the
//!   pool closes an idle one to make room);
//! - **I16**: every checkout ends within `checkout_timeout`, with a typed error if unserved;
//! - **I22**: a connection handed back is closed when it must be (marked broken, dead transport,
//!   condemned); a caller cancelled at a random instant leaves nothing counted: once traffic is
//!   over, every address can again check out `max_per_address` connections at once, the pool's
//!   slots equal the connections open at the connector, and after `close()` every connection the
//!   connector opened is closed (and, once the messages land, gone at the brokers).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::{Checkout, CheckoutError, CheetahString, PoolError, WhenFull};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use crate::client::{CallError, SimConn};
use crate::scenarios::{Outcome, world};
use crate::trace;
use crate::world::{Ctx, Pool, Setup, chance, draw, ms};

/// How a checkout ended, as the scenario counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Served,
    TimedOut,
    AtCapacity,
    Backoff,
    ConnectFailed,
    Closed,
    Cancelled,
}

/// One caller waiting, by arrival.
#[derive(Default)]
struct Line {
    /// Callers arrived and not ended: their sequence numbers.
    waiting: BTreeSet<u64>,
    /// Callers served that an older caller still waiting may yet judge: `(seq, served at ns)`.
    served: Vec<(u64, u64)>,
}

#[derive(Default)]
struct CallerBooks {
    next_seq: u64,
    /// Client serial → the caller holding it (I20).
    held: BTreeMap<u64, u64>,
    /// Serials a caller marked broken: never handed out again (I20).
    broken: BTreeSet<u64>,
    lines: BTreeMap<String, Line>,
    ends: BTreeMap<&'static str, u64>,
    /// Served after waiting (the scenario must show waiting, else it judged nothing).
    waited: u64,
    /// `close()` has begun: `Closed` is a legitimate answer from now on.
    closing: bool,
}

/// The scenario's books of its checkout callers (see the module docs).
pub struct Callers {
    books: StdMutex<CallerBooks>,
    max_per_address: usize,
    timeout: Duration,
}

/// A connection a caller holds.
pub struct Holding {
    co: Checkout<SimConn>,
    seq: u64,
    serial: u64,
}

impl Holding {
    fn conn(&self) -> &SimConn {
        &self.co
    }
}

impl Callers {
    fn new(max_per_address: usize, timeout: Duration) -> Self {
        Self {
            books: StdMutex::new(CallerBooks::default()),
            max_per_address,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CallerBooks> {
        self.books.lock().expect("callers lock")
    }

    /// Held by callers right now, per address.
    fn held_to(&self, ctx: &Ctx) -> Vec<usize> {
        let books = self.lock();
        let held: BTreeSet<u64> = books.held.keys().copied().collect();
        drop(books);
        let mut per = vec![0; ctx.brokers.len()];
        for book in ctx.reg.open_books() {
            if held.contains(&book.serial)
                && let Some(i) = ctx
                    .brokers
                    .iter()
                    .position(|b| b.addr.as_str() == book.addr)
            {
                per[i] += 1;
            }
        }
        per
    }

    /// A caller arrives: its place in the line's order.
    fn arrive(&self, addr: &str) -> u64 {
        let mut books = self.lock();
        books.next_seq += 1;
        let seq = books.next_seq;
        books
            .lines
            .entry(addr.to_string())
            .or_default()
            .waiting
            .insert(seq);
        seq
    }

    /// A caller's checkout ended (`served` or not) at `now_ns`: I21 against the callers served
    /// before it that arrived after it.
    fn end(&self, ctx: &Ctx, addr: &str, seq: u64, end: End, waited: bool) {
        let now_ns = ctx.rec.now_ns();
        let mut books = self.lock();
        *books.ends.entry(end_name(end)).or_default() += 1;
        books.waited += u64::from(end == End::Served && waited);
        let line = books.lines.entry(addr.to_string()).or_default();
        line.waiting.remove(&seq);
        for &(younger, at) in &line.served {
            if younger > seq && at < now_ns {
                ctx.rec.fail(
                    "I21",
                    format!(
                        "caller #{younger} of {addr} was served at t={:.3}ms while the older caller \
                         #{seq} still waited (it ended at t={:.3}ms: {end:?})",
                        at as f64 / 1e6,
                        now_ns as f64 / 1e6
                    ),
                );
            }
        }
        if end == End::Served && line.waiting.iter().next().is_some_and(|&o| o < seq) {
            line.served.push((seq, now_ns));
        }
        let oldest = line.waiting.iter().next().copied().unwrap_or(u64::MAX);
        line.served.retain(|&(s, _)| s > oldest);
    }
}

fn end_name(end: End) -> &'static str {
    match end {
        End::Served => "served",
        End::TimedOut => "timed-out",
        End::AtCapacity => "at-capacity",
        End::Backoff => "backoff",
        End::ConnectFailed => "connect-failed",
        End::Closed => "closed",
        End::Cancelled => "cancelled",
    }
}

/// What a checkout gave the caller.
enum Got {
    /// Boxed: a checkout carries the whole connection.
    Held(Box<Holding>),
    /// Unserved; for a backoff, how long the pool said to wait.
    Refused(End, Option<Duration>),
}

/// `pool.checkout(addr)` with the caller's books and checks; `cancel_after`: the caller drops the
/// checkout's future then if it is still waiting (I22).
async fn checkout(
    ctx: &Arc<Ctx>,
    pool: &Pool,
    callers: &Callers,
    addr: &CheetahString,
    cancel_after: Option<Duration>,
) -> Got {
    // The books count the address as live while a caller waits (I18).
    ctx.reg.call_begin(addr.as_str());
    let started = Instant::now();
    // No `.await` between the sequence number and the checkout's first poll, where it arrives.
    let seq = callers.arrive(addr.as_str());
    let fut = pool.checkout(addr);
    let result = match cancel_after {
        Some(after) => tokio::time::timeout(after, fut).await.ok(),
        None => Some(fut.await),
    };
    ctx.reg.call_end(addr.as_str());
    let took = started.elapsed();
    // One timer tick of slack, as for `get_or_connect` (a timer armed less than 1 ms ahead fires
    // 1 ms ahead, in madsim as in tokio's wheel). A wait that re-arms its deadline timer at every
    // wake-up overshoots by a tick per wake-up in its last millisecond: that is caught here.
    let bound = callers.timeout + ms(1);
    if took > bound {
        ctx.rec.fail(
            "I16",
            format!("checkout({addr}) took {took:?}, checkout_timeout {bound:?}"),
        );
    }
    let waited = !took.is_zero();
    let Some(result) = result else {
        trace!(
            ctx.rec,
            "checkout {addr} #{seq} cancelled after {took:?} of {cancel_after:?}"
        );
        callers.end(ctx, addr.as_str(), seq, End::Cancelled, waited);
        return Got::Refused(End::Cancelled, None);
    };
    match result {
        Ok(co) => {
            let serial = co.serial();
            let conn: &SimConn = &co;
            trace!(ctx.rec, "checkout {addr} #{seq} s{serial} {}", co.id());
            {
                let mut books = callers.lock();
                if let Some(other) = books.held.insert(serial, seq) {
                    ctx.rec.fail(
                        "I20",
                        format!(
                            "s{serial} ({}) handed to caller #{seq} of {addr} while caller \
                             #{other} holds it",
                            co.id()
                        ),
                    );
                }
                if books.broken.contains(&serial) {
                    ctx.rec.fail(
                        "I20",
                        format!(
                            "s{serial} handed to caller #{seq} after a caller marked it broken"
                        ),
                    );
                }
            }
            if conn.book.addr != addr.as_str() || co.addr() != addr {
                ctx.rec.fail(
                    "I20",
                    format!(
                        "checkout({addr}) handed out s{serial}, a connection to {}",
                        conn.book.addr
                    ),
                );
            }
            if conn.closed_by_pool() {
                ctx.rec.fail(
                    "I22",
                    format!("checkout({addr}) handed out s{serial}, which the pool had closed"),
                );
            } else if !conn.is_open() {
                ctx.rec.fail(
                    "I8",
                    format!(
                        "checkout({addr}) handed out s{serial} although its transport is known \
                         closed"
                    ),
                );
            }
            if conn.is_condemned() {
                ctx.rec.fail(
                    "I9",
                    format!("checkout({addr}) handed out s{serial} after it was judged unhealthy"),
                );
            }
            conn.touch();
            callers.end(ctx, addr.as_str(), seq, End::Served, waited);
            Got::Held(Box::new(Holding { co, seq, serial }))
        }
        Err(err) => {
            let end = judge_refusal(ctx, callers, addr, &err);
            trace!(ctx.rec, "checkout {addr} #{seq} err {end:?} after {took:?}");
            callers.end(ctx, addr.as_str(), seq, end, waited);
            let retry = match &err {
                CheckoutError::Pool(PoolError::Backoff { retry_after, .. }) => Some(*retry_after),
                _ => None,
            };
            Got::Refused(end, retry)
        }
    }
}

/// The checks of an unserved checkout: its error says something true (I19, I1, I12, I17), and a
/// caller that gave up waiting did not while a connection idled that it should have had (I21,
/// FAIR).
fn judge_refusal(ctx: &Ctx, callers: &Callers, addr: &CheetahString, err: &CheckoutError) -> End {
    let cfg = &ctx.setup.config;
    let end = match err {
        CheckoutError::TimedOut { checked_out, .. } => {
            if *checked_out > callers.max_per_address {
                ctx.rec.fail(
                    "I19",
                    format!(
                        "checkout({addr}) timed out with {checked_out} connections checked out; \
                         max_per_address {}",
                        callers.max_per_address
                    ),
                );
            }
            End::TimedOut
        }
        CheckoutError::AtCapacity { max, .. } => {
            if *max != cfg.max_connections {
                ctx.rec.fail(
                    "I1",
                    format!(
                        "checkout({addr}) AtCapacity says max {max}, the cap is {}",
                        cfg.max_connections
                    ),
                );
            }
            End::AtCapacity
        }
        CheckoutError::Pool(PoolError::Backoff { retry_after, .. }) => {
            let longest = cfg.backoff.max.mul_f64(1.0 + cfg.backoff.jitter) + ms(1);
            if *retry_after > longest {
                ctx.rec.fail(
                    "I12",
                    format!("checkout({addr}): retry_after {retry_after:?} beyond the schedule's cap {longest:?}"),
                );
            }
            End::Backoff
        }
        CheckoutError::Pool(PoolError::Connect { .. } | PoolError::ConnectTimeout { .. }) => {
            End::ConnectFailed
        }
        CheckoutError::Pool(PoolError::Closed) => End::Closed,
        other => {
            ctx.rec.fail(
                "SIM",
                format!("checkout({addr}) failed with an error the scenario cannot cause: {other}"),
            );
            End::ConnectFailed
        }
    };
    if end == End::Closed && !callers.lock().closing {
        ctx.rec.fail(
            "I17",
            format!("checkout({addr}) said Closed before close() was called"),
        );
    }
    if matches!(end, End::TimedOut | End::AtCapacity) {
        let now_ns = ctx.rec.now_ns();
        let held: BTreeSet<u64> = callers.lock().held.keys().copied().collect();
        let mine = ctx.reg.open_to(addr.as_str()) + ctx.reg.connecting_to(addr.as_str());
        // Room is owed only to an address that could start a connect: below its
        // max_per_address, no connect of its own in flight for over a millisecond (one at a time,
        // I4), and never a failure the pool may still be backing it off for (the books' upper
        // bound on its ejections is 0).
        let quiet = ctx
            .reg
            .last_connect_end(addr.as_str())
            .is_none_or(|at| at.elapsed() > ms(1));
        let below = (mine as usize) < callers.max_per_address
            && ctx.reg.connecting_to(addr.as_str()) == 0
            && quiet
            && ctx.reg.k_upper(addr.as_str()) == 0;
        for book in ctx.reg.open_books() {
            let idle = Duration::from_nanos(
                now_ns.saturating_sub(book.last_use_ns.load(Ordering::SeqCst)),
            );
            if held.contains(&book.serial)
                || book.in_flight.load(Ordering::SeqCst) > 0
                || idle <= ms(1)
                || !book.open.load(Ordering::SeqCst)
            {
                continue;
            }
            if book.addr == addr.as_str() {
                ctx.rec.fail(
                    "I21",
                    format!(
                        "checkout({addr}) gave up ({}) while its own connection s{} sat idle for \
                         {idle:?}",
                        end_name(end),
                        book.serial
                    ),
                );
                break;
            }
            if below {
                ctx.rec.fail(
                    "FAIR",
                    format!(
                        "checkout({addr}) gave up ({}) with {mine} of its {} connections while \
                         s{} to {} sat idle for {idle:?}: a waiter starved while capacity existed \
                         elsewhere",
                        end_name(end),
                        callers.max_per_address,
                        book.serial,
                        book.addr
                    ),
                );
                break;
            }
        }
    }
    end
}

/// Calls on a held connection through its in-flight guard (the pool's health verdict sees them).
/// Stops at the first failure.
async fn use_it(
    ctx: &Ctx,
    h: &Holding,
    calls: u64,
    work: std::ops::Range<u64>,
) -> Result<(), CallError> {
    for _ in 0..calls {
        let conn = h.conn();
        let guard = h.co.begin();
        conn.call_started();
        let arg = draw(work.clone()) as u32;
        let result = conn
            .call(u8::from(arg > 0), arg, ctx.setup.call_timeout)
            .await;
        match result {
            Ok(()) => guard.success(),
            Err(_) => {
                if guard.failure().is_unhealthy() {
                    conn.condemn();
                }
            }
        }
        conn.call_ended();
        trace!(ctx.rec, "call s{} {result:?}", h.serial);
        result?;
    }
    Ok(())
}

/// Gives a held connection back (`broken`: marked broken first) and checks what the pool did with
/// it: a connection marked broken, with a dead transport or judged unhealthy is closed on its
/// return (I22: handed back to be closed); none was closed while the caller held it (I17).
fn release(ctx: &Ctx, callers: &Callers, h: Box<Holding>, broken: bool) {
    let Holding {
        mut co,
        seq,
        serial,
    } = *h;
    let conn: &SimConn = &co;
    conn.touch();
    if conn.closed_by_pool() {
        ctx.rec.fail(
            "I17",
            format!("s{serial} was closed by the pool while caller #{seq} had it checked out"),
        );
    }
    let must_close = broken || !conn.is_open() || conn.is_condemned();
    let book = Arc::clone(&conn.book);
    {
        let mut books = callers.lock();
        if books.held.remove(&serial) != Some(seq) {
            ctx.rec.fail(
                "I20",
                format!(
                    "s{serial} returned by caller #{seq}, which the books did not see holding it"
                ),
            );
        }
        if broken {
            books.broken.insert(serial);
        }
    }
    if broken {
        // A healthy connection closed because its holder said so: a manual removal (I5's audit).
        co.mark_broken();
        ctx.reg.manual.store(true, Ordering::SeqCst);
        drop(co);
        ctx.reg.manual.store(false, Ordering::SeqCst);
    } else {
        drop(co);
    }
    trace!(ctx.rec, "return s{serial} broken={broken}");
    if must_close && !book.closed_by_pool.load(Ordering::SeqCst) {
        ctx.rec.fail(
            "I22",
            format!(
                "s{serial} came back {} and was not closed",
                if broken {
                    "marked broken"
                } else if !book.open.load(Ordering::SeqCst) {
                    "with a dead transport"
                } else {
                    "judged unhealthy"
                }
            ),
        );
    }
}

/// The drawn shape of a checkout scenario.
struct Shape {
    max_per_address: usize,
    timeout: Duration,
    workers: usize,
    length: Duration,
    /// Calls per checkout, and the broker's work per call (ms).
    calls: std::ops::Range<u64>,
    work: std::ops::Range<u64>,
    /// Chance a checkout is cancelled at a random instant of its wait.
    cancel: f64,
    /// Chance a holder marks a working connection broken.
    mark_broken: f64,
    /// Chance a worker goes to broker 0 (the slow one, in the storm) rather than any.
    first: f64,
}

/// A setup for `brokers` brokers under checkout: `max_per_address` 2–4, a global cap at least one
/// address's worth and below their sum, a checkout timeout of 100–800 ms. Room-making closes
/// healthy idle connections, so the books treat closes as under LRU (the shared mode's setting,
/// which the exclusive mode does always).
fn checkout_setup(brokers: usize) -> (Setup, usize) {
    let mut setup = Setup::new(brokers);
    let mpa = draw(2..5) as usize;
    let sum = (brokers * mpa) as u64;
    let max = draw(mpa as u64..sum) as usize;
    setup.config.max_per_address = mpa;
    setup.config.max_connections = max;
    setup.config.when_full = WhenFull::EvictLeastRecentlyUsed;
    setup.config.checkout_timeout = Some(ms(draw(100..800)));
    setup.config.max_idle = Some(ms(draw(800..2000)));
    (setup, mpa)
}

/// Workers: each checks out (sometimes cancelling at a random instant), calls, returns (sometimes
/// marked broken), thinks, until `until`.
fn workers(
    ctx: &Arc<Ctx>,
    pool: &Pool,
    callers: &Arc<Callers>,
    shape: &Shape,
    until: Instant,
) -> Vec<JoinHandle<()>> {
    (0..shape.workers)
        .map(|_| {
            let (ctx, pool, callers) = (Arc::clone(ctx), pool.clone(), Arc::clone(callers));
            let (calls, work) = (shape.calls.clone(), shape.work.clone());
            let (cancel, mark_broken, first) = (shape.cancel, shape.mark_broken, shape.first);
            let timeout_ms = u64::try_from(shape.timeout.as_millis()).unwrap_or(1000);
            tokio::spawn(async move {
                while Instant::now() < until {
                    let b = if chance(first) {
                        0
                    } else {
                        draw(0..ctx.brokers.len() as u64) as usize
                    };
                    let addr = ctx.brokers[b].addr.clone();
                    let cancel_after = chance(cancel).then(|| ms(draw(1..timeout_ms)));
                    match checkout(&ctx, &pool, &callers, &addr, cancel_after).await {
                        Got::Held(h) => {
                            let result = use_it(&ctx, &h, draw(calls.clone()), work.clone()).await;
                            let broken = match result {
                                Ok(()) => chance(mark_broken),
                                Err(CallError::Broken | CallError::Closed) => chance(0.5),
                                Err(_) => chance(0.2),
                            };
                            release(&ctx, &callers, h, broken);
                        }
                        Got::Refused(End::Closed, _) => break,
                        Got::Refused(_, _) => {}
                    }
                    sleep(ms(draw(1..20))).await;
                }
            })
        })
        .collect()
}

/// After the traffic: faults off, the connects of cancelled callers landed; then nothing is
/// counted (I22), every address can check out `max_per_address` connections at once, one after
/// the other (so no count leaked, and the waiters of a broker that was down are served by
/// reconnects after its backoff), and the books agree with the pool.
async fn settle_and_fill(ctx: &Arc<Ctx>, pool: &Pool, callers: &Callers) {
    ctx.faults_off().await;
    sleep(ctx.setup.config.connect_timeout + ms(20)).await;
    ctx.step(pool, format_args!("settled"));
    let stats = pool.stats();
    if stats.checked_out != 0 || stats.waiting != 0 || !callers.lock().held.is_empty() {
        ctx.rec.fail(
            "I22",
            format!(
                "with every caller gone the pool counts {} checked out and {} waiting (the \
                 callers hold {})",
                stats.checked_out,
                stats.waiting,
                callers.lock().held.len()
            ),
        );
    }
    // I22 (pool-side, on purpose): a permit a cancelled caller leaked is visible outside only
    // when the cap is reached with a slot held by nothing, which the fill below may not provoke.
    let open = ctx.reg.open() as i64 + ctx.reg.connecting();
    if pool.used_slots() as i64 != open {
        ctx.rec.fail(
            "I22",
            format!(
                "at rest the pool holds {} slots for {open} connections open or connecting at the \
                 connector",
                pool.used_slots()
            ),
        );
    }
    let cfg = &ctx.setup.config;
    let bound =
        cfg.backoff.delay(u32::MAX, 1.0) + cfg.connect_timeout * 2 + callers.timeout + ms(50);
    for b in 0..ctx.brokers.len() {
        let addr = ctx.brokers[b].addr.clone();
        let t0 = Instant::now();
        let mut held = Vec::new();
        let mut last = End::Served;
        while held.len() < callers.max_per_address {
            if t0.elapsed() > bound {
                ctx.rec.fail(
                    "I22",
                    format!(
                        "{addr} holds only {} of its {} connections {bound:?} after the traffic \
                         (last: {last:?}): a count leaked, or its waiters were not served after \
                         its backoff",
                        held.len(),
                        callers.max_per_address
                    ),
                );
                break;
            }
            match checkout(ctx, pool, callers, &addr, None).await {
                Got::Held(h) => held.push(h),
                Got::Refused(end, retry) => {
                    last = end;
                    sleep(retry.unwrap_or(ms(1)).max(ms(1))).await;
                }
            }
        }
        let at_connector = ctx.reg.open_to(addr.as_str()) as usize;
        if held.len() == callers.max_per_address && at_connector != held.len() {
            ctx.rec.fail(
                "I19",
                format!(
                    "{addr}: {} checked out, {at_connector} open at the connector",
                    held.len()
                ),
            );
        }
        ctx.step(pool, format_args!("{addr} full"));
        for h in held {
            release(ctx, callers, h, false);
        }
    }
}

/// `close()` with nothing held: every connection the connector opened is closed when it returns
/// (I17, I22), a checkout after it says `Closed`, and once the messages land nothing exists on
/// the client nor at any broker.
async fn close_and_count(
    ctx: &Arc<Ctx>,
    pool: &Pool,
    callers: &Callers,
    cleanup: Option<JoinHandle<()>>,
) {
    callers.lock().closing = true;
    ctx.reg.manual.store(true, Ordering::SeqCst);
    ctx.step(pool, format_args!("closing"));
    pool.close().await;
    if ctx.reg.open() != 0 {
        ctx.rec.fail(
            "I22",
            format!(
                "{} connection(s) open at the connector after close() returned with nothing \
                 checked out",
                ctx.reg.open()
            ),
        );
    }
    match checkout(ctx, pool, callers, &ctx.brokers[0].addr, None).await {
        Got::Refused(End::Closed, _) => {}
        Got::Held(h) => {
            ctx.rec
                .fail("I17", "checkout after close() handed out a connection");
            release(ctx, callers, h, false);
        }
        Got::Refused(end, _) => ctx
            .rec
            .fail("I17", format!("checkout after close(): {end:?}")),
    }
    finish(ctx, pool, cleanup).await;
}

/// The end of a run: the cleanup task ended, messages landed, nothing exists anywhere.
async fn finish(ctx: &Arc<Ctx>, pool: &Pool, cleanup: Option<JoinHandle<()>>) {
    ctx.stop.store(true, Ordering::SeqCst);
    ctx.reg.set_sweeping(None);
    if let Some(task) = cleanup
        && tokio::time::timeout(ms(10), task).await.is_err()
    {
        ctx.rec
            .fail("I17", "the cleanup task still runs after close()");
    }
    sleep(Duration::from_secs(11)).await;
    ctx.agree(pool);
    if ctx.reg.live() != 0 || ctx.reg.open() != 0 {
        ctx.rec.fail(
            "I22",
            format!(
                "{} connection(s) still exist on the client ({} open at the connector) after \
                 close() and every checkout returned",
                ctx.reg.live(),
                ctx.reg.open()
            ),
        );
    }
    for b in &ctx.brokers {
        if b.state.open() != 0 {
            ctx.rec.fail(
                "I22",
                format!(
                    "{} still sees {} open connection(s) after close()",
                    b.addr,
                    b.state.open()
                ),
            );
        }
    }
}

/// What the run did, for the trace and `--verbose`; and a run that never made a caller wait
/// judged nothing (SIM).
fn tally(ctx: &Ctx, callers: &Callers) -> String {
    let books = callers.lock();
    let ends: Vec<String> = books.ends.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!("waited={} {}", books.waited, ends.join(" "));
    trace!(ctx.rec, "tally {line}");
    if books.waited == 0 {
        ctx.rec.fail(
            "SIM",
            format!("no caller was ever served after waiting: {line}"),
        );
    }
    line
}

/// What both checkout scenarios start with: the registry told the cap per address, then the pool,
/// its cleanup task, the monitor of its books and the callers' books.
fn start(
    ctx: &Arc<Ctx>,
    shape: &Shape,
) -> (Pool, Option<JoinHandle<()>>, JoinHandle<()>, Arc<Callers>) {
    ctx.reg.set_per_address(shape.max_per_address);
    let pool = ctx.pool();
    let cleanup = ctx.start_cleanup(&pool);
    let monitor = ctx.monitor(&pool, ms(5));
    let callers = Arc::new(Callers::new(shape.max_per_address, shape.timeout));
    (pool, cleanup, monitor, callers)
}

/// The settings both scenarios print first.
fn describe(setup: &Setup, shape: &Shape) -> String {
    format!(
        "max_per_address={} max_connections={} checkout_timeout={:?} max_idle={:?} workers={}",
        shape.max_per_address,
        setup.config.max_connections,
        shape.timeout,
        setup.config.max_idle,
        shape.workers
    )
}

/// The end of a run whose traffic is over: settle, fill, tally, close and count.
async fn settle_and_close(
    ctx: &Arc<Ctx>,
    pool: &Pool,
    callers: &Callers,
    cleanup: Option<JoinHandle<()>>,
) {
    settle_and_fill(ctx, pool, callers).await;
    tally(ctx, callers);
    close_and_count(ctx, pool, callers, cleanup).await;
}

/// checkout-storm: many tasks check out from three brokers, one slow, with `max_per_address` > 1
/// and a global cap below their sum.
pub async fn checkout_storm() -> Outcome {
    let (setup, mpa) = checkout_setup(3);
    let slow = ms(draw(20..400));
    let shape = Shape {
        max_per_address: mpa,
        timeout: setup.config.checkout_timeout.expect("set"),
        workers: draw(20..60) as usize,
        length: ms(3000),
        calls: 1..4,
        work: 0..30,
        cancel: 0.15,
        mark_broken: 0.03,
        first: 0.4,
    };
    let info = format!("{} slow b0={slow:?}", describe(&setup, &shape));
    world(setup, info, move |ctx| async move {
        let (pool, cleanup, monitor, callers) = start(&ctx, &shape);
        ctx.slow(0, slow);
        let until = Instant::now() + shape.length;
        let tasks = workers(&ctx, &pool, &callers, &shape, until);
        let bound = shape.length + shape.timeout + ctx.setup.call_timeout * 4 + ms(100);
        ctx.join("checkout worker", tasks, bound).await;
        ctx.step(&pool, format_args!("storm over"));
        settle_and_close(&ctx, &pool, &callers, cleanup).await;
        let _ = monitor.await;
    })
    .await
}

/// checkout-broker-killed: the broker with the most checkouts outstanding is killed mid-traffic,
/// restarted later; holders see their calls fail and return or mark broken, waiters fail or are
/// served by reconnects after backoff. Then either the settle-and-fill checks and `close()`, or
/// (one run in three) `close()` while holders still hold and waiters wait.
pub async fn checkout_broker_killed() -> Outcome {
    let (setup, mpa) = checkout_setup(3);
    let shape = Shape {
        max_per_address: mpa,
        timeout: setup.config.checkout_timeout.expect("set"),
        workers: draw(10..30) as usize,
        length: ms(4000),
        calls: 1..6,
        work: 10..100,
        cancel: 0.1,
        mark_broken: 0.02,
        first: 0.0,
    };
    let kill_at = ms(draw(300..1500));
    let down = ms(draw(200..2000));
    let close_mid = chance(1.0 / 3.0);
    let info = format!(
        "{} kill at {kill_at:?} for {down:?} close_mid={close_mid}",
        describe(&setup, &shape)
    );
    world(setup, info, move |ctx| async move {
        let (pool, cleanup, monitor, callers) = start(&ctx, &shape);
        let until = Instant::now() + shape.length;
        let tasks = workers(&ctx, &pool, &callers, &shape, until);
        sleep(kill_at).await;
        let held = callers.held_to(&ctx);
        let victim = (0..held.len())
            .max_by_key(|&i| (held[i], usize::MAX - i))
            .unwrap_or(0);
        ctx.step(
            &pool,
            format_args!("killing b{victim} with {} checked out", held[victim]),
        );
        ctx.kill(victim);
        sleep(down).await;
        ctx.restart(victim);
        ctx.step(&pool, format_args!("b{victim} restarted"));
        let bound = shape.timeout + ctx.setup.call_timeout * 6 + ms(200);
        if close_mid {
            sleep_until_or_now(until).await;
            let (held, waiting) = {
                let books = callers.lock();
                (
                    books.held.len(),
                    books.lines.values().map(|l| l.waiting.len()).sum::<usize>(),
                )
            };
            ctx.step(
                &pool,
                format_args!("closing with {held} held, {waiting} waiting"),
            );
            // The monitor stops: between close() and their return, the connections still checked
            // out are open at the connector and no longer the pool's (`len()`), as I17 allows.
            ctx.stop.store(true, Ordering::SeqCst);
            callers.lock().closing = true;
            ctx.reg.manual.store(true, Ordering::SeqCst);
            pool.close().await;
            // I17: what is still checked out is open until it comes back, and closed then.
            ctx.join("checkout worker", tasks, bound).await;
            if ctx.reg.open() != 0 || !callers.lock().held.is_empty() {
                ctx.rec.fail(
                    "I22",
                    format!(
                        "{} connection(s) open at the connector after close() and every holder \
                         returned",
                        ctx.reg.open()
                    ),
                );
            }
            tally(&ctx, &callers);
            finish(&ctx, &pool, cleanup).await;
        } else {
            let left = until.saturating_duration_since(Instant::now());
            ctx.join("checkout worker", tasks, left + bound).await;
            ctx.step(&pool, format_args!("traffic over"));
            settle_and_close(&ctx, &pool, &callers, cleanup).await;
        }
        let _ = monitor.await;
    })
    .await
}

async fn sleep_until_or_now(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}
