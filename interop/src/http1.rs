//! [`Http1Connector`]: HTTP/1.1 keep-alive connections for the pool, the protocol that is *not*
//! multiplexed: a connection carries one request at a time.
//!
//! Today the pool keeps one connection per address and shares it, so every caller of an address
//! queues on that connection's lock ([`Http1Conn::get`] holds it for the whole exchange). That is the
//! baseline issue 13 measures against (several connections per address, exclusive checkout): see
//! `tests/nginx.rs`. The client is deliberately small: `GET` only, bodies framed by
//! `Content-Length` (what nginx sends for the test's fixed responses), parsed with `httparse`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use keyed_pool::Connector;
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

/// One HTTP/1.1 connection: a socket behind a lock, since a request and its response must not
/// interleave with another's.
#[derive(Debug)]
pub struct Http1Conn {
    host: String,
    io: Mutex<Io>,
    /// Set once the connection must not be used again: the server said `Connection: close`, or a
    /// request failed on it.
    closed: AtomicBool,
}

#[derive(Debug)]
struct Io {
    stream: TcpStream,
    /// Bytes read past the last response (none with a well-behaved server: it does not pipeline).
    buf: Vec<u8>,
}

impl Http1Conn {
    /// Sends `GET path` and reads the response.
    ///
    /// # Errors
    /// [`Http1Error::Closed`] on a keep-alive connection the server already closed,
    /// [`Http1Error::Io`] or [`Http1Error::Malformed`] otherwise. After any error the connection is
    /// marked closed ([`is_open`](Self::is_open) is `false`).
    ///
    /// # Cancel safety
    /// Not cancel safe on the wire: a dropped request may leave a response half read, so the
    /// connection is marked closed first and reopened for use only once the exchange completes.
    pub async fn get(&self, path: &str) -> Result<Response, Http1Error> {
        let mut io = self.io.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Http1Error::Closed);
        }
        // Closed until the exchange completes: a cancelled exchange leaves the socket mid-response.
        self.closed.store(true, Ordering::Release);
        let (response, keep_alive) = exchange(&mut io, &self.host, path).await?;
        self.closed.store(!keep_alive, Ordering::Release);
        Ok(response)
    }

    /// `false` once the connection must not be used again.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

async fn exchange(io: &mut Io, host: &str, path: &str) -> Result<(Response, bool), Http1Error> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    io.stream.write_all(request.as_bytes()).await?;
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
    let n = io.stream.read(&mut chunk).await?;
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

/// Opens [`Http1Conn`]s to `host:port` addresses for the pool.
///
/// `is_open` reports what the connection learned: a `Connection: close` from the server or a failed
/// request. A keep-alive connection the server closed while it sat idle is found by the next request
/// on it ([`Http1Error::Closed`]), or before it by the probe: a read that must not block finds the
/// server's FIN without sending anything. With
/// [`check_idle_before_use`](keyed_pool::PoolConfig::check_idle_before_use) shorter than the
/// server's keep-alive timeout, the pool probes a quiet connection before handing it out.
#[derive(Clone, Copy, Debug, Default)]
pub struct Http1Connector;

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
            }),
            closed: AtomicBool::new(false),
        })
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    fn is_open(&self, conn: &Http1Conn) -> bool {
        conn.is_open()
    }

    async fn probe(&self, conn: &Http1Conn) -> Result<(), Http1Error> {
        // A request in flight holds the lock: the connection is in use and answered lately enough.
        let Ok(io) = conn.io.try_lock() else {
            return Ok(());
        };
        if !conn.is_open() {
            return Err(Http1Error::Closed);
        }
        let mut byte = [0u8; 1];
        let verdict = match io.stream.try_read(&mut byte) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Ok(0) => Http1Error::Closed,
            Ok(_) => Http1Error::Malformed("bytes from the server before any request".into()),
            Err(err) => Http1Error::Io(err),
        };
        conn.closed.store(true, Ordering::Release);
        Err(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
