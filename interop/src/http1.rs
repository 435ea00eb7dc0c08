//! [`Http1Connector`]: HTTP/1.1 keep-alive connections for the pool, the protocol that is *not*
//! multiplexed: a connection carries one request at a time.
//!
//! Its mode is exclusive checkout ([`ConnectionPool::checkout`]): a caller holds a connection
//! alone, so [`Http1Conn::get`] writes through `&mut` and takes no lock, and an address has up to
//! [`max_per_address`](keyed_pool::PoolConfig::max_per_address) connections, one caller on each.
//! [`checkout_get`] is the whole user pattern (below). Shared mode
//! ([`ConnectionPool::call`], `get_or_connect`) works too, through [`Http1Conn::get_shared`], which
//! holds the connection's lock for the whole exchange: every caller of the address queues on its
//! one shared connection (the baseline issue 13 measured against; `examples/http1.rs` compares the
//! two). The client is deliberately small: `GET` only, bodies framed by `Content-Length` (what
//! nginx sends for the tests' fixed responses), parsed with `httparse`.
//!
//! # A connection the server let go
//!
//! HTTP/1.1 servers close keep-alive connections on their own, three ways a client sees:
//!
//! - **`Connection: close` on a response** (nginx's `keepalive_requests`): the connection reports
//!   not open ([`Http1Conn::is_open`]) as soon as the response is read, so the pool discards it
//!   when the checkout comes back (I8), and [`checkout_get`] marks it broken first.
//! - **Closed while idle** (nginx's `keepalive_timeout`): the server's FIN is already on the
//!   socket when the pool next looks. [`is_open`](Connector::is_open) (which the pool asks before
//!   handing out an idle connection, and on its return) finds it with a read that must not block,
//!   and the pool closes that connection and tries the next (I8). Cheap: tokio answers a read on a
//!   socket its reactor has not seen become readable without a system call.
//! - **Closed while the request was on its way** (the server's timer fired just before the request
//!   arrived): nothing can see that in advance. The request fails with [`Http1Error::Closed`] (the
//!   server closed before any byte of an answer); for a `GET`, which is safe to repeat, the right
//!   move is to mark the checkout broken and retry once on a fresh checkout, which
//!   [`checkout_get`] does.
//!
//! Why [`Checkout::mark_broken`](keyed_pool::Checkout::mark_broken) as well as `is_open`: it
//! says what happened (evicted as `Broken`, closed on return, no backoff) instead of leaving the
//! pool to find the closed transport. Either way no backoff follows a server's close after an
//! answer: a connection that dies younger than
//! [`EjectionPolicy::short_lived`](keyed_pool::core::EjectionPolicy::short_lived) counts against
//! its address only if it never served a call (I12), which tells a keep-alive's end from an
//! accept-then-close server.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};

use keyed_pool::{CallOutcome, Checkout, CheckoutError, ConnectionPool, Connector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// The most header bytes read before a response is refused as malformed.
const MAX_HEAD: usize = 16 * 1024;
/// The largest body read.
const MAX_BODY: usize = 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    /// The server closed the connection before any byte of the answer: a keep-alive connection the
    /// server had already let go (its `keepalive_timeout` or `keepalive_requests`). The request
    /// may or may not have been seen (HTTP/1.1 cannot tell); a `GET` is safe to retry.
    #[error("the server closed the connection before answering (a stale keep-alive connection)")]
    Closed,
    /// The socket failed.
    #[error("i/o error on the connection: {0}")]
    Io(#[from] io::Error),
    /// The answer is not an HTTP/1.1 response this client reads.
    #[error("malformed response: {0}")]
    Malformed(String),
}

/// A response: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// One HTTP/1.1 connection. Exclusive use ([`get`](Self::get), through `&mut`, as a
/// [`Checkout`] gives) needs no lock; shared use ([`get_shared`](Self::get_shared), through `&`,
/// as the pool's shared mode gives) takes the connection's lock for the whole exchange, since a
/// request and its response must not interleave with another's.
#[derive(Debug)]
pub struct Http1Conn {
    host: String,
    /// A tokio mutex for shared use; exclusive use reaches the socket with `get_mut` (no locking:
    /// `&mut` already proves nobody else holds it).
    io: Mutex<Io>,
    /// Set once the connection must not be used again: the server said `Connection: close` or
    /// closed the socket, a request failed on it, or an exchange was found cut short. Never set
    /// for an exchange merely in flight: in shared mode the pool asks `is_open` of a connection
    /// other callers are using.
    closed: AtomicBool,
    /// The connector's books for its address; counts the connection open until it is dropped.
    books: OpenConn,
}

#[derive(Debug)]
struct Io {
    stream: TcpStream,
    /// Bytes read past the last response (none with a well-behaved server: it does not pipeline).
    buf: Vec<u8>,
    /// An exchange started and has not completed: if the lock is free (or the caller holds
    /// `&mut`) meanwhile, the exchange was cut short (its future dropped) and the socket may be
    /// mid-response.
    mid_exchange: bool,
}

impl Http1Conn {
    /// Sends `GET path` and reads the response, on a connection held alone (a [`Checkout`]
    /// dereferences to `&mut Http1Conn`): no lock.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// use keyed_pool::ConnectionPool;
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let pool = ConnectionPool::builder()
    ///     .connector(Http1Connector::new())
    ///     .max_per_address(8)
    ///     .build()
    ///     .unwrap();
    /// let mut conn = pool.checkout("127.0.0.1:8080").await.unwrap();
    /// let response = conn.get("/").await.unwrap();
    /// assert_eq!(response.status, 200);
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Http1Error::Closed`] on a keep-alive connection the server already closed,
    /// [`Http1Error::Io`] or [`Http1Error::Malformed`] otherwise. After any error the connection is
    /// marked closed ([`is_open`](Self::is_open) is `false`).
    ///
    /// # Cancel safety
    /// Not cancel safe on the wire: a dropped request may leave a response half read. The
    /// connection notes an exchange in flight, and one found cut short reports not open, so the
    /// pool discards it on return ([`checkout_get`] also marks the checkout broken).
    pub async fn get(&mut self, path: &str) -> Result<Response, Http1Error> {
        let io = self.io.get_mut();
        run(io, &self.host, &self.closed, &self.books.0, path).await
    }

    /// Sends `GET path` and reads the response on a connection shared between callers (the
    /// pool's shared mode): holds the connection's lock until the response is read, so the
    /// callers of one connection take turns.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// use keyed_pool::ConnectionPool;
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let pool = ConnectionPool::builder()
    ///     .connector(Http1Connector::new())
    ///     .build()
    ///     .unwrap();
    /// let response = pool
    ///     .call("127.0.0.1:8080", |conn| async move { conn.client().get_shared("/").await })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(response.status, 200);
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`get`](Self::get).
    ///
    /// # Cancel safety
    /// As [`get`](Self::get): a dropped exchange leaves the connection marked closed. Dropped while
    /// waiting for the lock, it changes nothing.
    pub async fn get_shared(&self, path: &str) -> Result<Response, Http1Error> {
        let mut io = self.io.lock().await;
        run(&mut io, &self.host, &self.closed, &self.books.0, path).await
    }

    /// `false` once the connection must not be used again: the server said `Connection: close`
    /// or closed the socket (its FIN is on the socket), or a request failed or was cut short on
    /// it. Cheap: a flag, then, if nobody is mid-exchange, a read that must not block, which tokio
    /// answers without a system call unless the socket became readable.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// use keyed_pool::Connector;
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let mut conn = Http1Connector::new().connect("127.0.0.1:8080").await.unwrap();
    /// assert!(conn.is_open());
    /// conn.get("/").await.unwrap();
    /// // Still open unless the server answered with `Connection: close`.
    /// println!("open after one request: {}", conn.is_open());
    /// # }
    /// ```
    pub fn is_open(&self) -> bool {
        self.check().is_ok()
    }

    /// `Ok` while usable; else why not (and the connection is marked closed).
    fn check(&self) -> Result<(), Http1Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Http1Error::Closed);
        }
        // An exchange in flight holds the lock (shared use): the server is answering it.
        let Ok(io) = self.io.try_lock() else {
            return Ok(());
        };
        let verdict = usable(&io);
        if let Err(err) = &verdict {
            close_on(&self.closed, &self.books.0, err);
        }
        verdict
    }
}

/// One exchange on a connection's socket, with its flags kept: mid-exchange until the response is
/// read (a cut exchange leaves the socket mid-response), closed after it if the server said so or
/// it failed.
async fn run(
    io: &mut Io,
    host: &str,
    closed: &AtomicBool,
    books: &AddrBooks,
    path: &str,
) -> Result<Response, Http1Error> {
    if closed.load(Ordering::Acquire) {
        return Err(Http1Error::Closed);
    }
    // The pool looked (`is_open`) before handing the connection out; a FIN that came since is
    // still found here for the price of a flag read, and the request never leaves.
    if let Err(err) = usable(io) {
        close_on(closed, books, &err);
        return Err(err);
    }
    io.mid_exchange = true;
    match exchange(io, host, path).await {
        Ok((response, keep_alive)) => {
            io.mid_exchange = false;
            if !keep_alive {
                closed.store(true, Ordering::Release);
                books.server_closes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response)
        }
        Err(err) => {
            closed.store(true, Ordering::Release);
            if matches!(err, Http1Error::Closed) {
                books.stale.fetch_add(1, Ordering::Relaxed);
            }
            Err(err)
        }
    }
}

/// Marks a connection closed after an idle check found `err`, counting a FIN once.
fn close_on(closed: &AtomicBool, books: &AddrBooks, err: &Http1Error) {
    if !closed.swap(true, Ordering::AcqRel) && matches!(err, Http1Error::Closed) {
        books.found_closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection between exchanges: the last one completed, and its socket has nothing to say.
fn usable(io: &Io) -> Result<(), Http1Error> {
    if io.mid_exchange {
        return Err(Http1Error::Malformed(
            "an exchange was cut short: the socket may be mid-response".into(),
        ));
    }
    idle_check(&io.stream)
}

/// An idle connection's socket, between exchanges: nothing to read (`Ok`), or the server's FIN
/// (`Closed`), bytes nobody asked for, or an error. Never waits.
fn idle_check(stream: &TcpStream) -> Result<(), Http1Error> {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err(Http1Error::Closed),
        Ok(_) => Err(Http1Error::Malformed(
            "bytes from the server before any request".into(),
        )),
        Err(err) => Err(Http1Error::Io(err)),
    }
}

async fn exchange(io: &mut Io, host: &str, path: &str) -> Result<(Response, bool), Http1Error> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    match io.stream.write_all(request.as_bytes()).await {
        // The server's reset already came back: the same stale connection, nothing sent.
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(Http1Error::Closed);
        }
        other => other?,
    }
    let (status, head_len, body_len, keep_alive) = loop {
        if let Some(head) = parse_head(&io.buf)? {
            break head;
        }
        if io.buf.len() > MAX_HEAD {
            return Err(Http1Error::Malformed(format!(
                "no end of headers in {MAX_HEAD} bytes"
            )));
        }
        if read_more(io).await? == 0 {
            return Err(if io.buf.is_empty() {
                Http1Error::Closed
            } else {
                Http1Error::Malformed("the connection closed mid-headers".into())
            });
        }
    };
    while io.buf.len() < head_len + body_len {
        if read_more(io).await? == 0 {
            return Err(Http1Error::Malformed(
                "the connection closed mid-body".into(),
            ));
        }
    }
    let body = io.buf[head_len..head_len + body_len].to_vec();
    io.buf.drain(..head_len + body_len);
    Ok((Response { status, body }, keep_alive))
}

async fn read_more(io: &mut Io) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = match io.stream.read(&mut chunk).await {
        // A server that closes with our request unread sends a reset, not a FIN: the same stale
        // connection, seen before any byte of an answer.
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset && io.buf.is_empty() => 0,
        other => other?,
    };
    io.buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Parses a response head: `(status, head length, body length, keep-alive)`, or `None` if more
/// bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(u16, usize, usize, bool)>, Http1Error> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(Http1Error::Malformed(err.to_string())),
    };
    let status = response.code.unwrap_or(0);
    let mut body_len = None;
    let mut keep_alive = response.version == Some(1);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| Http1Error::Malformed(format!("content-length {value:?}")))?;
            if len > MAX_BODY {
                return Err(Http1Error::Malformed(format!("a body of {len} bytes")));
            }
            body_len = Some(len);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Http1Error::Malformed(format!(
                "transfer-encoding {value:?} (only content-length is read)"
            )));
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    let body_len = body_len.ok_or_else(|| Http1Error::Malformed("no content-length".into()))?;
    Ok(Some((status, head_len, body_len, keep_alive)))
}

/// What the connections to one address saw, counted by the connector, outside the pool.
#[derive(Debug, Default)]
struct AddrBooks {
    open: AtomicUsize,
    peak: AtomicUsize,
    made: AtomicUsize,
    server_closes: AtomicUsize,
    found_closed: AtomicUsize,
    stale: AtomicUsize,
}

/// Counts a connection open from its connect until it is dropped (its socket closed).
#[derive(Debug)]
struct OpenConn(Arc<AddrBooks>);

impl OpenConn {
    fn new(books: Arc<AddrBooks>) -> Self {
        books.made.fetch_add(1, Ordering::Relaxed);
        let open = books.open.fetch_add(1, Ordering::AcqRel) + 1;
        books.peak.fetch_max(open, Ordering::AcqRel);
        Self(books)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connector's books: per address, the connections it made and those still open (a
/// connection counts as open until it is dropped, which closes its socket), the most open at
/// once, and how the server let connections go. Kept by the connector, not the pool, so a test can
/// judge the pool from outside (I1, I19).
///
/// ```
/// use keyed_pool_interop::http1::{Http1Connector, Tally};
/// let connector = Http1Connector::new();
/// assert_eq!(connector.books().tally("127.0.0.1:8080"), Tally::default());
/// ```
#[derive(Debug, Default)]
pub struct Books {
    addrs: std::sync::Mutex<HashMap<String, Arc<AddrBooks>>>,
}

/// One address's books at one instant (see [`Books`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Connections open now.
    pub open: usize,
    /// The most open at once (since the last [`Books::reset_peak`]).
    pub peak: usize,
    /// Connections made.
    pub made: usize,
    /// Responses that said `Connection: close`.
    pub server_closes: usize,
    /// Idle connections found closed by the server (its FIN on the socket) before a request.
    pub found_closed: usize,
    /// Requests that met a connection the server had closed ([`Http1Error::Closed`] mid-request).
    pub stale: usize,
}

impl Books {
    /// The books of `addr`, created at its first connect.
    fn of(&self, addr: &str) -> Arc<AddrBooks> {
        let mut addrs = self.addrs.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(addrs.entry(addr.to_owned()).or_default())
    }

    /// `addr`'s books now (all zero for an address never connected to).
    ///
    /// ```
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let connector = Http1Connector::new();
    /// assert_eq!(connector.books().tally("127.0.0.1:8080").made, 0);
    /// ```
    pub fn tally(&self, addr: &str) -> Tally {
        let addrs = self.addrs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(b) = addrs.get(addr) else {
            return Tally::default();
        };
        let load = |n: &AtomicUsize| n.load(Ordering::Acquire);
        Tally {
            open: load(&b.open),
            peak: load(&b.peak),
            made: load(&b.made),
            server_closes: load(&b.server_closes),
            found_closed: load(&b.found_closed),
            stale: load(&b.stale),
        }
    }

    /// Starts `addr`'s peak afresh from the connections open now (between two phases of a test).
    ///
    /// ```
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let connector = Http1Connector::new();
    /// connector.books().reset_peak("127.0.0.1:8080");
    /// assert_eq!(connector.books().tally("127.0.0.1:8080").peak, 0);
    /// ```
    pub fn reset_peak(&self, addr: &str) {
        let b = self.of(addr);
        b.peak
            .store(b.open.load(Ordering::Acquire), Ordering::Release);
    }
}

/// Opens [`Http1Conn`]s to `host:port` addresses for the pool, and keeps [`Books`] of them.
///
/// `is_open` reports what the connection learned (a `Connection: close` from the server, a failed
/// or cut request) and what its socket says now (the server's FIN, found by a read that must not
/// block); [`probe`](Connector::probe) is the same check. So an idle connection the server
/// closed is not handed out once its FIN has arrived, with or without
/// [`check_idle_before_use`](keyed_pool::PoolConfig::check_idle_before_use).
///
/// A request can still meet a connection the server closes while the request is on its way (its
/// keep-alive timer fired first): it fails with [`Http1Error::Closed`]. The pattern for exclusive
/// checkout, which [`checkout_get`] implements:
///
/// - after a response, if the connection is no longer open (`Connection: close`), call
///   [`mark_broken`](keyed_pool::Checkout::mark_broken) so the pool closes it without counting it
///   against the address;
/// - on `Closed`, mark it broken, drop the checkout and retry a `GET` (or any idempotent request)
///   once on a fresh checkout; on any other error, mark it broken and fail.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// use keyed_pool::ConnectionPool;
/// use keyed_pool_interop::http1::{Http1Connector, checkout_get};
/// let connector = Http1Connector::new();
/// let books = connector.books();
/// let pool = ConnectionPool::builder()
///     .connector(connector)
///     .max_per_address(8)
///     .build()
///     .unwrap();
/// let response = checkout_get(&pool, "127.0.0.1:8080", "/").await.unwrap();
/// assert_eq!(response.status, 200);
/// assert_eq!(books.tally("127.0.0.1:8080").made, 1);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Http1Connector {
    books: Arc<Books>,
}

impl Http1Connector {
    /// A connector with empty books.
    ///
    /// ```
    /// use keyed_pool_interop::http1::Http1Connector;
    /// assert_eq!(Http1Connector::new().books().tally("127.0.0.1:80").open, 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Its books, shared with its clones (keep a handle before giving the connector to a pool).
    ///
    /// ```
    /// use keyed_pool_interop::http1::Http1Connector;
    /// let connector = Http1Connector::new();
    /// let books = connector.books();
    /// assert_eq!(books.tally("127.0.0.1:80"), connector.clone().books().tally("127.0.0.1:80"));
    /// ```
    pub fn books(&self) -> Arc<Books> {
        Arc::clone(&self.books)
    }
}

impl Connector for Http1Connector {
    type Conn = Http1Conn;
    type Error = Http1Error;

    async fn connect(&self, addr: &str) -> Result<Http1Conn, Http1Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http1Conn {
            host: addr.to_owned(),
            io: Mutex::new(Io {
                stream,
                buf: Vec::new(),
                mid_exchange: false,
            }),
            closed: AtomicBool::new(false),
            books: OpenConn::new(self.books.of(addr)),
        })
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    fn is_open(&self, conn: &Http1Conn) -> bool {
        conn.is_open()
    }

    async fn probe(&self, conn: &Http1Conn) -> Result<(), Http1Error> {
        conn.check()
    }
}

/// Why [`checkout_get`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// No connection: the checkout's own error (timed out in line, at capacity, backoff, a
    /// failed connect, the pool closed).
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    /// The request failed: any error but a first [`Http1Error::Closed`], which is retried.
    #[error(transparent)]
    Http(#[from] Http1Error),
}

/// A checkout that is marked broken if dropped before its exchange completed (a cut exchange
/// leaves the socket mid-response): the pool then closes it without counting it against the
/// address.
struct InExchange {
    conn: Checkout<Http1Conn>,
    done: bool,
}

impl Drop for InExchange {
    fn drop(&mut self) {
        if !self.done {
            self.conn.mark_broken();
        }
    }
}

/// `GET path` at `addr` on a connection checked out for this request alone: the user pattern for
/// HTTP/1.1 with [`ConnectionPool::checkout`] (see [`Http1Connector`]). The outcome is recorded on
/// the connection ([`Checkout::begin`]): a response is a success (whatever its status: the server
/// answered), a stale connection neither, any other error a failure.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// use keyed_pool_interop::http1::{Http1Connector, checkout_get};
/// let pool = ConnectionPool::builder()
///     .connector(Http1Connector::new())
///     .max_per_address(8)
///     .checkout_timeout(Duration::from_secs(1))
///     .build()
///     .unwrap();
/// let response = checkout_get(&pool, "127.0.0.1:8080", "/").await.unwrap();
/// println!("{} {:?}", response.status, String::from_utf8_lossy(&response.body));
/// # }
/// ```
///
/// # Errors
/// [`GetError::Checkout`] when no connection came; [`GetError::Http`] when the request failed
/// ([`Http1Error::Closed`] only if the retry met a closed connection too).
///
/// # Cancel safety
/// Cancel safe for the pool: dropped while waiting for a checkout, nothing happens (the
/// checkout is cancel safe); dropped mid-exchange, the connection is marked broken and closed.
/// Whether the server saw the request is unknown, as with any request cut short.
pub async fn checkout_get(
    pool: &ConnectionPool<Http1Conn, Http1Connector>,
    addr: &str,
    path: &str,
) -> Result<Response, GetError> {
    let mut retried = false;
    loop {
        let mut held = InExchange {
            conn: pool.checkout(addr).await?,
            done: false,
        };
        let call = held.conn.begin();
        let result = held.conn.get(path).await;
        held.done = true;
        match result {
            Ok(response) => {
                call.success();
                if !held.conn.is_open() {
                    // `Connection: close`: the server's own choice, not the address's fault.
                    held.conn.mark_broken();
                }
                return Ok(response);
            }
            Err(Http1Error::Closed) => {
                // A keep-alive the server let go: says nothing about the server's health.
                call.finish(CallOutcome::Neither);
                held.conn.mark_broken();
                if retried {
                    return Err(Http1Error::Closed.into());
                }
                retried = true;
            }
            Err(err) => {
                call.failure();
                held.conn.mark_broken();
                return Err(err.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyed_pool::core::EjectionPolicy;
    use tokio::net::TcpListener;

    /// What the fake server does with one accepted connection.
    #[derive(Clone, Copy, Debug)]
    enum Plan {
        /// Answers every request `200 ok`; the first answer says `Connection: close` and the
        /// server closes after it, if `close`.
        Answer { close: bool },
        /// Reads the request and closes without a byte of answer: the race a keep-alive timer
        /// wins while the request is on its way.
        HangUp,
        /// Answers one request keep-alive, then closes (a FIN), as a keep-alive timeout does.
        AnswerThenClose,
        /// Reads requests and never answers (nor closes).
        Silent,
    }

    /// A server on loopback that handles the connections it accepts by `plans`, in order (and
    /// refuses nothing: connections past the plans are answered).
    async fn fake_server(plans: Vec<Plan>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut plans = plans.into_iter();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let plan = plans.next().unwrap_or(Plan::Answer { close: false });
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Bounded by the client: it sends one small request at a time.
                        let mut chunk = [0u8; 1024];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        buf.drain(..end + 4);
                        match plan {
                            Plan::HangUp => return,
                            Plan::Silent => {}
                            Plan::AnswerThenClose => {
                                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                                let _ = socket.write_all(answer.as_bytes()).await;
                                return;
                            }
                            Plan::Answer { close } => {
                                let head = if close { "Connection: close\r\n" } else { "" };
                                let answer = format!(
                                    "HTTP/1.1 200 OK\r\n{head}Content-Length: 3\r\n\r\nok\n"
                                );
                                if socket.write_all(answer.as_bytes()).await.is_err() || close {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn pool(connector: Http1Connector) -> ConnectionPool<Http1Conn, Http1Connector> {
        ConnectionPool::builder()
            .connector(connector)
            .max_per_address(1)
            .checkout_timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_the_server_hangs_up_on_is_retried_once_on_a_fresh_checkout() {
        let addr = fake_server(vec![Plan::HangUp]).await;
        let connector = Http1Connector::new();
        let books = connector.books();
        let pool = pool(connector);
        let response = checkout_get(&pool, &addr, "/")
            .await
            .expect("the retry answered");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"ok\n"[..])
        );
        let t = books.tally(&addr);
        assert_eq!((t.made, t.stale, t.open), (2, 1, 1), "{t:?}");
        // A stale keep-alive says nothing of the server: recorded as neither outcome.
        let stats = pool.stats();
        assert_eq!(
            (stats.total_errors, stats.total_successes),
            (0, 1),
            "{stats:?}"
        );
        pool.close().await;
        assert_eq!(books.tally(&addr).open, 0, "I17: nothing left open");
    }

    #[tokio::test]
    async fn a_second_hang_up_fails_with_closed_after_exactly_one_retry() {
        let addr = fake_server(vec![Plan::HangUp, Plan::HangUp]).await;
        let connector = Http1Connector::new();
        let books = connector.books();
        let pool = pool(connector);
        let err = checkout_get(&pool, &addr, "/").await.unwrap_err();
        assert!(matches!(err, GetError::Http(Http1Error::Closed)), "{err:?}");
        let t = books.tally(&addr);
        assert_eq!((t.made, t.stale), (2, 2), "one retry, no more: {t:?}");
        // Marked broken: closed on return, without backing the address off.
        assert_eq!(t.open, 0, "{t:?}");
        assert!(checkout_get(&pool, &addr, "/").await.is_ok());
    }

    #[tokio::test]
    async fn connection_close_is_seen_and_does_not_back_the_address_off_i8_i12() {
        let addr = fake_server(vec![Plan::Answer { close: true }]).await;
        let connector = Http1Connector::new();
        let books = connector.books();
        // The default ejection policy: a connection closed younger than 5 s would count against
        // the address unless marked broken.
        let pool = pool(connector);
        assert_eq!(pool.config().ejection, EjectionPolicy::default());
        checkout_get(&pool, &addr, "/").await.expect("answered");
        let t = books.tally(&addr);
        assert_eq!(
            (t.server_closes, t.open),
            (1, 0),
            "I8: closed on return: {t:?}"
        );
        let next = pool
            .checkout(&addr)
            .await
            .expect("I12: no backoff after a server's close");
        assert!(next.is_open());
        assert_eq!(books.tally(&addr).made, 2);
    }

    #[tokio::test]
    async fn the_servers_fin_on_an_idle_connection_is_seen_without_a_request_i8() {
        let addr = fake_server(vec![Plan::AnswerThenClose]).await;
        let connector = Http1Connector::new();
        let books = connector.books();
        let mut conn = connector.connect(&addr).await.unwrap();
        assert_eq!(conn.get("/").await.unwrap().status, 200);
        // The server closed its side after a keep-alive answer, as at the end of its keep-alive
        // timeout. Polled until seen, bounded (the FIN crosses loopback in microseconds).
        let mut polls = 0;
        while conn.is_open() {
            polls += 1;
            assert!(polls < 2000, "I8: the server's FIN was never seen");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(matches!(conn.get("/").await, Err(Http1Error::Closed)));
        let t = books.tally(&addr);
        assert_eq!(
            (t.found_closed, t.stale),
            (1, 0),
            "found idle, so no request was sent: {t:?}"
        );
        assert!(matches!(
            connector.probe(&conn).await,
            Err(Http1Error::Closed)
        ));
        drop(conn);
        assert_eq!(books.tally(&addr).open, 0);
    }

    /// I12 with the default ejection policy: a connection the server closed while idle, after
    /// answering on it (a keep-alive timeout), is found closed on hand-out and replaced, and the
    /// address does not back off. Before the pool told this apart from accept-then-close, the
    /// second checkout failed with `Backoff` (found by this crate's nginx tests, issue 13).
    #[tokio::test]
    async fn a_keep_alive_the_server_ended_while_idle_does_not_back_the_address_off_i12() {
        let addr = fake_server(vec![Plan::AnswerThenClose]).await;
        let connector = Http1Connector::new();
        let books = connector.books();
        let pool = pool(connector);
        {
            let mut conn = pool.checkout(&addr).await.unwrap();
            let call = conn.begin();
            assert_eq!(conn.get("/").await.unwrap().status, 200);
            call.success();
        }
        // The server's FIN reaches the idle connection (bounded: loopback takes microseconds); a
        // health sweep (ours, or the cleanup task's) finds it closed and evicts it, as a hand-out
        // would.
        for _ in 0..2000 {
            if pool.evict_unhealthy().await > 0 || pool.stats().evictions.closed > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(
            pool.stats().evictions.closed,
            1,
            "I8: the server's FIN was never seen"
        );
        let next = pool.checkout(&addr).await;
        assert!(next.is_ok(), "I12 violated: {:?}", next.err());
        assert_eq!(pool.ejection_count(&addr), 0, "I12 violated");
        assert_eq!(books.tally(&addr).made, 2);
    }

    #[tokio::test]
    async fn an_exchange_in_flight_is_open_and_one_cut_short_is_not() {
        let addr = fake_server(vec![Plan::Silent]).await;
        let conn = Arc::new(Http1Connector::new().connect(&addr).await.unwrap());
        let in_flight = tokio::spawn({
            let conn = Arc::clone(&conn);
            async move { conn.get_shared("/").await }
        });
        // Bounded: until the exchange holds the connection's lock.
        let mut polls = 0;
        while conn.io.try_lock().is_ok() {
            polls += 1;
            assert!(polls < 2000, "the exchange never started");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Shared mode asks this of a connection other callers are using: in use is not closed.
        assert!(
            conn.is_open(),
            "I8: an exchange in flight is not a closed connection"
        );
        in_flight.abort();
        assert!(in_flight.await.unwrap_err().is_cancelled());
        assert!(
            !conn.is_open(),
            "an exchange cut short leaves the socket mid-response"
        );
        assert!(matches!(
            conn.get_shared("/").await,
            Err(Http1Error::Closed)
        ));
    }

    #[test]
    fn a_head_is_parsed_with_its_length_and_keep_alive() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(
            parse_head(head).unwrap(),
            Some((200, head.len() - 3, 3, true))
        );
        let close = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_head(close).unwrap(),
            Some((503, close.len(), 0, false))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
    }

    #[test]
    fn bad_heads_are_typed_errors() {
        for head in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"SMTP ready\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head), Err(Http1Error::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
}
