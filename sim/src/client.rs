//! The client side: [`SimConn`], one TCP connection to a broker with one request in flight at a
//! time (behind a tokio mutex), and [`SimConnector`], the pool's connector for it. Everything the
//! client sees goes into the connector's books ([`Registry`], `books.rs`), from which the pool is
//! judged: connects per address (I4), connects against the backoff schedule (I12), connections
//! open (I1), closes (I5 audit, exactly once, I17).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keyed_pool::Connector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::books::{ConnBook, ConnectAttempt, Registry};
use crate::broker::{REQ_LEN, RESP_LEN};
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
    /// What the client knows of it (shared with the connector's books).
    pub book: Arc<ConnBook>,
    io: Mutex<Io>,
    reg: Arc<Registry>,
}

impl std::fmt::Debug for SimConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn s{}→{}", self.book.serial, self.book.addr)
    }
}

impl SimConn {
    /// Client-side serial number.
    pub fn serial(&self) -> u64 {
        self.book.serial
    }

    /// `false` once the transport failed or the pool closed it.
    pub fn is_open(&self) -> bool {
        self.book.open.load(Ordering::SeqCst)
    }

    /// `true` once the pool called `close` on it.
    pub fn closed_by_pool(&self) -> bool {
        self.book.closed_by_pool.load(Ordering::SeqCst)
    }

    /// Moves the client's own idle clock.
    pub fn touch(&self) {
        self.book
            .last_use_ns
            .fetch_max(self.reg.rec.now_ns(), Ordering::SeqCst);
    }

    /// Records that the pool's verdict on this connection was "unhealthy".
    pub fn condemn(&self) {
        let now = self.reg.rec.now_ns().max(1);
        let _ = self
            .book
            .condemned_ns
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// `true` once condemned.
    pub fn is_condemned(&self) -> bool {
        self.book.condemned()
    }

    /// A call is starting (the client's own in-flight count).
    pub fn call_started(&self) {
        self.touch();
        self.book.calls_started.fetch_add(1, Ordering::SeqCst);
        self.book.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// A call ended.
    pub fn call_ended(&self) {
        self.touch();
        self.book.in_flight.fetch_sub(1, Ordering::SeqCst);
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
            self.book.open.store(false, Ordering::SeqCst);
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
        self.reg.dropped(&self.book);
    }
}

/// The books of one liveness probe, kept however it ends: a probe the pool dropped at its
/// timeout failed (the pool records a failure); one dropped sooner was cancelled (nothing).
struct ProbeTally<'a> {
    conn: &'a SimConn,
    started: tokio::time::Instant,
    timeout: Duration,
    done: bool,
}

impl ProbeTally<'_> {
    fn failed(&self) {
        self.conn.book.probes_failed.fetch_add(1, Ordering::SeqCst);
        if self.conn.is_open() {
            self.conn.condemn();
        }
    }
}

impl Drop for ProbeTally<'_> {
    fn drop(&mut self) {
        if !self.done && self.started.elapsed() >= self.timeout {
            self.failed();
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
    /// TCP connect, then (unless the books say otherwise) a ping with id 0: any answer, even an
    /// application error, means the broker is there. `socket` learns the local address as soon as
    /// the TCP connect is through.
    async fn dial(&self, addr: &str, socket: impl FnOnce(SocketAddr)) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr).await?;
        socket(stream.local_addr()?);
        if self.reg.handshake.load(Ordering::SeqCst) {
            stream.write_all(&[0u8; REQ_LEN]).await?;
            stream.flush().await?;
            let mut resp = [0u8; RESP_LEN];
            stream.read_exact(&mut resp).await?;
        }
        Ok(stream)
    }

    /// A connection made outside the pool's connect path (for scenarios that `insert` by hand);
    /// not logged as a pool connect (I4, I12 do not apply to it), and the pool owns it only once
    /// `insert` accepts it (mark `book.pooled` then).
    pub async fn connect_by_hand(&self, addr: &str) -> io::Result<SimConn> {
        let stream = self.dial(addr, |_| {}).await?;
        Ok(self.adopt(addr, stream, true))
    }

    fn adopt(&self, addr: &str, stream: TcpStream, by_hand: bool) -> SimConn {
        let local = stream.local_addr().ok();
        SimConn {
            book: self.reg.made(addr, local, by_hand),
            io: Mutex::new(Io {
                stream: Some(stream),
                rbuf: Vec::with_capacity(64),
                next_id: 0,
            }),
            reg: Arc::clone(&self.reg),
        }
    }
}

impl Connector for SimConnector {
    type Conn = SimConn;
    type Error = io::Error;

    async fn connect(&self, addr: &str) -> io::Result<SimConn> {
        let attempt: ConnectAttempt = self.reg.begin_connect(addr);
        let dialed = self.dial(addr, |local| attempt.socket(local)).await;
        match dialed {
            Ok(stream) => {
                attempt.finish(true);
                Ok(self.adopt(addr, stream, false))
            }
            Err(err) => {
                attempt.finish(false);
                Err(err)
            }
        }
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    fn is_open(&self, conn: &SimConn) -> bool {
        conn.is_open()
    }

    /// A ping on the connection, unbounded (the pool bounds it). It leaves the client's idle clock
    /// and in-flight count alone: a probe is not a use (I5, I6), so the close audit and the I6
    /// check judge the connection by its calls only. Its outcome goes into the books (I13), and a
    /// probe the broker did not answer while the transport worked condemns the connection, as
    /// the pool's verdict does.
    async fn probe(&self, conn: &SimConn) -> io::Result<()> {
        let mut tally = ProbeTally {
            conn,
            started: tokio::time::Instant::now(),
            timeout: self.reg.probe_timeout,
            done: false,
        };
        let result = conn.exchange(0, 0).await;
        tally.done = true;
        trace!(self.reg.rec, "probe s{} {result:?}", conn.serial());
        match result {
            // An application error is an answer: the broker is there.
            Ok(()) | Err(CallError::Remote) => {
                conn.book.probes_ok.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(err) => {
                tally.failed();
                Err(io::Error::other(format!("probe: {err:?}")))
            }
        }
    }

    fn close(&self, conn: &SimConn) {
        let reg = &self.reg;
        let book = &conn.book;
        trace!(reg.rec, "close s{}", book.serial);
        // The close audit (I5): a connection the client sees as healthy may only leave the pool
        // as idle (nothing in flight, unused for longer than max_idle), to make room (nothing in
        // flight), or by a manual removal / close.
        let healthy = conn.is_open() && !conn.is_condemned();
        // A connect to the same address that completed at this very instant replaces the
        // connection (the pool pools what its connect produced): not an idle eviction.
        let replaced = reg.connected_now(&book.addr);
        trace!(
            reg.rec,
            "close-audit s{} healthy={healthy} replaced={replaced} last_use_ns={}",
            book.serial,
            book.last_use_ns.load(Ordering::SeqCst)
        );
        if healthy && !replaced && !reg.manual.load(Ordering::SeqCst) {
            let in_flight = book.in_flight.load(Ordering::SeqCst);
            let since = Duration::from_nanos(
                reg.rec
                    .now_ns()
                    .saturating_sub(book.last_use_ns.load(Ordering::SeqCst)),
            );
            if in_flight > 0 {
                reg.rec.fail(
                    "I5",
                    format!(
                        "the pool closed healthy connection s{} to {} with {in_flight} call(s) in flight",
                        book.serial, book.addr
                    ),
                );
            } else if !reg.lru && reg.max_idle.is_some_and(|max| since <= max) {
                reg.rec.fail(
                    "I5",
                    format!(
                        "the pool closed healthy connection s{} to {} used {since:?} ago (max_idle {:?})",
                        book.serial,
                        book.addr,
                        reg.max_idle.unwrap_or_default()
                    ),
                );
            }
        }
        // Exactly once; judged (ejection or not) before the transport is marked closed.
        reg.closed(book);
        book.open.store(false, Ordering::SeqCst);
        if let Ok(mut io) = conn.io.try_lock() {
            io.stream = None;
        }
    }
}
