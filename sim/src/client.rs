//! The client side: [`SimConn`], one TCP connection to a broker with one request in flight at a
//! time (behind a tokio mutex), and [`SimConnector`], the pool's connector for it. The connector
//! keeps its own books ([`Registry`]) so the pool is checked from outside: concurrent connects per
//! address (I4), connects against the backoff schedule (I12), connections the pool closes while
//! they are in use (I5), and how many connections exist at all (I1, accounting).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use keyed_pool::core::BackoffPolicy;
use keyed_pool::{CheetahString, Connector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::broker::{REQ_LEN, RESP_LEN};
use crate::record::Recorder;
use crate::trace;

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// No answer within the call timeout (the transport stays usable: a late answer is skipped).
    Timeout,
    /// The broker answered with an application error.
    Remote,
    /// The transport failed (EOF, reset); the connection is marked broken.
    Broken,
    /// The stream was already closed (by the pool or an earlier failure).
    Closed,
}

struct Io {
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    next_id: u64,
}

/// One connection to a broker.
pub struct SimConn {
    /// Client-side serial number (unique within a simulation).
    pub serial: u64,
    /// The address it was connected to.
    pub addr: String,
    io: Mutex<Io>,
    open: AtomicBool,
    closed_by_pool: AtomicBool,
    /// Calls in flight as the client counts them (the oracle for I5).
    in_flight: AtomicU64,
    /// Last use as the client sees it, in virtual nanoseconds (the oracle for I5).
    last_use_ns: AtomicU64,
    /// The pool's health verdict on a call of this connection said unhealthy.
    condemned: AtomicBool,
    reg: Arc<Registry>,
}

impl std::fmt::Debug for SimConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn s{}→{}", self.serial, self.addr)
    }
}

impl SimConn {
    /// `false` once the transport failed or the pool closed it.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    /// `true` once the pool called `close` on it.
    pub fn closed_by_pool(&self) -> bool {
        self.closed_by_pool.load(Ordering::SeqCst)
    }

    /// Moves the client's own idle clock.
    pub fn touch(&self) {
        self.last_use_ns
            .fetch_max(self.reg.rec.now_ns(), Ordering::SeqCst);
    }

    /// Records that the pool's verdict on this connection was "unhealthy".
    pub fn condemn(&self) {
        self.condemned.store(true, Ordering::SeqCst);
    }

    /// `true` once condemned.
    pub fn is_condemned(&self) -> bool {
        self.condemned.load(Ordering::SeqCst)
    }

    /// A call is starting (the client's own in-flight count).
    pub fn call_started(&self) {
        self.touch();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// A call ended.
    pub fn call_ended(&self) {
        self.touch();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// One request/response exchange bounded by `timeout` (I16). Cancel safe: a late answer is
    /// recognised by its id and skipped by the next call.
    pub async fn call(&self, op: u8, arg: u32, timeout: Duration) -> Result<(), CallError> {
        match tokio::time::timeout(timeout, self.exchange(op, arg)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn exchange(&self, op: u8, arg: u32) -> Result<(), CallError> {
        let mut guard = self.io.lock().await;
        let io = &mut *guard;
        let result = async {
            let Some(stream) = io.stream.as_mut() else {
                return Err(CallError::Closed);
            };
            io.next_id += 1;
            let id = io.next_id;
            let mut req = [0u8; REQ_LEN];
            req[0..8].copy_from_slice(&id.to_be_bytes());
            req[8] = op;
            req[9..13].copy_from_slice(&arg.to_be_bytes());
            if stream.write_all(&req).await.is_err() || stream.flush().await.is_err() {
                return Err(CallError::Broken);
            }
            loop {
                while io.rbuf.len() >= RESP_LEN {
                    let got = u64::from_be_bytes(io.rbuf[0..8].try_into().expect("8 bytes"));
                    let status = io.rbuf[8];
                    io.rbuf.drain(..RESP_LEN);
                    if got == id {
                        return if status == 0 {
                            Ok(())
                        } else {
                            Err(CallError::Remote)
                        };
                    }
                }
                match stream.read_buf(&mut io.rbuf).await {
                    Ok(0) | Err(_) => return Err(CallError::Broken),
                    Ok(_) => {}
                }
            }
        }
        .await;
        if result == Err(CallError::Broken) {
            self.open.store(false, Ordering::SeqCst);
            io.stream = None;
        }
        if self.closed_by_pool() {
            // The pool closed it while this call held the stream: close it now.
            io.stream = None;
        }
        result
    }
}

impl Drop for SimConn {
    fn drop(&mut self) {
        self.reg.live.fetch_sub(1, Ordering::SeqCst);
        if !self.closed_by_pool.swap(true, Ordering::SeqCst) {
            self.reg.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[derive(Default, Debug)]
struct AddrLog {
    in_progress: u32,
    /// Consecutive failed connects since the last success, as the connector saw them.
    failures: u32,
    last_fail: Option<Instant>,
    last_ok: Option<Instant>,
    attempts: u64,
}

/// The connector's books, shared with the scenario.
pub struct Registry {
    /// Where violations and trace events go.
    pub rec: Arc<Recorder>,
    /// The pool's backoff policy (for the I12 check).
    pub backoff: BackoffPolicy,
    /// The pool's `max_idle` (for the I5 check); `None` = no idle eviction.
    pub max_idle: Option<Duration>,
    /// The pool may evict least-recently-used connections to make room (they may be fresh).
    pub lru: bool,
    /// While set, the pool may close healthy connections (close, drop, clear, manual removal).
    pub manual: AtomicBool,
    next_serial: AtomicU64,
    live: AtomicI64,
    open: AtomicI64,
    addrs: StdMutex<BTreeMap<String, AddrLog>>,
    connects: AtomicU64,
}

impl Registry {
    /// Books for a pool with this backoff and idle configuration.
    pub fn new(
        rec: Arc<Recorder>,
        backoff: BackoffPolicy,
        max_idle: Option<Duration>,
        lru: bool,
    ) -> Self {
        Self {
            rec,
            backoff,
            max_idle,
            lru,
            manual: AtomicBool::new(false),
            next_serial: AtomicU64::new(1),
            live: AtomicI64::new(0),
            open: AtomicI64::new(0),
            addrs: StdMutex::new(BTreeMap::new()),
            connects: AtomicU64::new(0),
        }
    }

    /// Connections that exist on the client side (not yet dropped).
    pub fn live(&self) -> i64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections that exist and the pool has not closed.
    pub fn open(&self) -> i64 {
        self.open.load(Ordering::SeqCst)
    }

    /// Connect attempts so far (all addresses).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }

    /// Connect attempts to `addr` so far.
    pub fn connects_to(&self, addr: &str) -> u64 {
        self.addrs
            .lock()
            .expect("registry lock")
            .get(addr)
            .map_or(0, |l| l.attempts)
    }

    /// Consecutive failed connects to `addr` as the connector saw them.
    pub fn connect_failures(&self, addr: &str) -> u32 {
        self.addrs
            .lock()
            .expect("registry lock")
            .get(addr)
            .map_or(0, |l| l.failures)
    }

    fn begin_connect(self: &Arc<Self>, addr: &str) -> ConnectAttempt {
        let now = Instant::now();
        self.connects.fetch_add(1, Ordering::SeqCst);
        let mut addrs = self.addrs.lock().expect("registry lock");
        let log = addrs.entry(addr.to_string()).or_default();
        log.attempts += 1;
        if log.in_progress > 0 {
            self.rec.fail(
                "I4",
                format!(
                    "a second connect to {addr} started while {} was in flight",
                    log.in_progress
                ),
            );
        }
        if let (k @ 1.., Some(failed_at)) = (log.failures, log.last_fail) {
            // The pool's own failure count is at least ours (it also counts unhealthy
            // evictions), and the delay grows with it, so the jitter-free lower bound for our
            // count is a lower bound for the pool's schedule.
            let lower = self.backoff.delay(k, 0.0);
            let waited = now.saturating_duration_since(failed_at);
            if waited + Duration::from_micros(1) < lower {
                self.rec.fail(
                    "I12",
                    format!(
                        "connect to {addr} only {waited:?} after its failure #{k}; the backoff \
                         schedule requires at least {lower:?}"
                    ),
                );
            }
        }
        log.in_progress += 1;
        trace!(self.rec, "connect {addr} #{}", log.attempts);
        ConnectAttempt {
            reg: Arc::clone(self),
            addr: addr.to_string(),
            done: false,
        }
    }

    fn end_connect(&self, addr: &str, ok: bool) {
        let mut addrs = self.addrs.lock().expect("registry lock");
        let log = addrs.entry(addr.to_string()).or_default();
        log.in_progress = log.in_progress.saturating_sub(1);
        if ok {
            log.failures = 0;
            log.last_fail = None;
            log.last_ok = Some(Instant::now());
        } else {
            log.failures += 1;
            log.last_fail = Some(Instant::now());
        }
        trace!(self.rec, "connect {addr} ok={ok}");
    }
}

/// One connect in progress; dropped unfinished = timed out or cancelled (a failure).
struct ConnectAttempt {
    reg: Arc<Registry>,
    addr: String,
    done: bool,
}

impl ConnectAttempt {
    fn finish(mut self, ok: bool) {
        self.done = true;
        self.reg.end_connect(&self.addr, ok);
    }
}

impl Drop for ConnectAttempt {
    fn drop(&mut self) {
        if !self.done {
            self.reg.end_connect(&self.addr, false);
        }
    }
}

/// The pool's connector: TCP connect plus a ping handshake (so a paused or partitioned broker makes
/// the connect time out, as a real client's handshake would).
#[derive(Clone)]
pub struct SimConnector {
    /// The books.
    pub reg: Arc<Registry>,
}

impl SimConnector {
    async fn dial(&self, addr: &str) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr).await?;
        // A ping with id 0; any answer (even an application error) means the broker is there.
        stream.write_all(&[0u8; REQ_LEN]).await?;
        stream.flush().await?;
        let mut resp = [0u8; RESP_LEN];
        stream.read_exact(&mut resp).await?;
        Ok(stream)
    }
}

impl SimConnector {
    /// A connection made outside the pool's connect path (for scenarios that `insert` by hand);
    /// not logged as a pool connect (I4, I12 do not apply to it).
    pub async fn connect_by_hand(&self, addr: &str) -> io::Result<SimConn> {
        let stream = self.dial(addr).await?;
        Ok(self.adopt(addr, stream))
    }

    fn adopt(&self, addr: &str, stream: TcpStream) -> SimConn {
        let serial = self.reg.next_serial.fetch_add(1, Ordering::SeqCst);
        self.reg.live.fetch_add(1, Ordering::SeqCst);
        self.reg.open.fetch_add(1, Ordering::SeqCst);
        trace!(self.reg.rec, "conn s{serial} {addr}");
        SimConn {
            serial,
            addr: addr.to_string(),
            io: Mutex::new(Io {
                stream: Some(stream),
                rbuf: Vec::with_capacity(64),
                next_id: 0,
            }),
            open: AtomicBool::new(true),
            closed_by_pool: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            last_use_ns: AtomicU64::new(self.reg.rec.now_ns()),
            condemned: AtomicBool::new(false),
            reg: Arc::clone(&self.reg),
        }
    }
}

impl Connector<SimConn> for SimConnector {
    type Error = io::Error;

    async fn connect(&self, addr: &CheetahString) -> io::Result<SimConn> {
        let attempt = self.reg.begin_connect(addr.as_str());
        match self.dial(addr.as_str()).await {
            Ok(stream) => {
                attempt.finish(true);
                Ok(self.adopt(addr.as_str(), stream))
            }
            Err(err) => {
                attempt.finish(false);
                Err(err)
            }
        }
    }

    fn validate(&self, addr: &CheetahString) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr.as_str())
    }

    fn is_open(&self, conn: &SimConn) -> bool {
        conn.is_open()
    }

    fn close(&self, conn: &SimConn) {
        let reg = &self.reg;
        trace!(reg.rec, "close s{}", conn.serial);
        if conn.closed_by_pool.swap(true, Ordering::SeqCst) {
            reg.rec.fail(
                "ACC",
                format!("the pool closed connection s{} twice", conn.serial),
            );
        } else {
            reg.open.fetch_sub(1, Ordering::SeqCst);
        }
        // The close audit (I5): a connection the client sees as healthy may only leave the pool
        // as idle (nothing in flight, unused for longer than max_idle), to make room (nothing in
        // flight), or by a manual removal / close.
        let healthy = conn.is_open() && !conn.is_condemned();
        // A connect to the same address that completed at this very instant replaces the
        // connection (the pool pools what its connect produced): not an idle eviction.
        let replaced = reg
            .addrs
            .lock()
            .expect("registry lock")
            .get(&conn.addr)
            .and_then(|l| l.last_ok)
            == Some(Instant::now());
        trace!(
            reg.rec,
            "close-audit s{} healthy={healthy} replaced={replaced} last_use_ns={}",
            conn.serial,
            conn.last_use_ns.load(Ordering::SeqCst)
        );
        if healthy && !replaced && !reg.manual.load(Ordering::SeqCst) {
            let in_flight = conn.in_flight.load(Ordering::SeqCst);
            let since = Duration::from_nanos(
                reg.rec
                    .now_ns()
                    .saturating_sub(conn.last_use_ns.load(Ordering::SeqCst)),
            );
            if in_flight > 0 {
                reg.rec.fail(
                    "I5",
                    format!(
                        "the pool closed healthy connection s{} to {} with {in_flight} call(s) in flight",
                        conn.serial, conn.addr
                    ),
                );
            } else if !reg.lru && reg.max_idle.is_some_and(|max| since <= max) {
                reg.rec.fail(
                    "I5",
                    format!(
                        "the pool closed healthy connection s{} to {} used {since:?} ago (max_idle {:?})",
                        conn.serial,
                        conn.addr,
                        reg.max_idle.unwrap_or_default()
                    ),
                );
            }
        }
        conn.open.store(false, Ordering::SeqCst);
        if let Ok(mut io) = conn.io.try_lock() {
            io.stream = None;
        }
    }
}
