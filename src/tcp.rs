//! [`TcpConnector`]: plain TCP connections over `tokio::net::TcpStream` (madsim's simulated TCP
//! under `--cfg madsim`), with address validation.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::connector::Connector;

/// Checks that `addr` is `host:port` (or `[v6]:port`) with a non-empty host free of whitespace and a
/// port in `1..=65535`. Returns the reason it is not.
///
/// ```
/// use keyed_pool::tcp::validate_addr;
/// assert!(validate_addr("127.0.0.1:9876").is_ok());
/// assert!(validate_addr("[::1]:9876").is_ok());
/// assert!(validate_addr("broker-a.internal:10911").is_ok());
/// assert!(validate_addr("127.0.0.1").is_err());
/// assert!(validate_addr("127.0.0.1:0").is_err());
/// assert!(validate_addr("127.0.0.1:000").is_err(), "port 0 in any spelling");
/// assert!(validate_addr("[::1]:0000").is_err());
/// assert!(validate_addr(":9876").is_err());
/// assert!(validate_addr("a b:1").is_err());
/// ```
pub fn validate_addr(addr: &str) -> Result<(), String> {
    if let Ok(parsed) = addr.parse::<SocketAddr>() {
        // The parsed port, not the text: `:00` and `:0000` are port 0 too.
        return if parsed.port() == 0 {
            Err("port 0 cannot be connected to".into())
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    if host.contains(':') || host.starts_with('[') {
        return Err("an IPv6 address must be written [addr]:port".into());
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("host contains whitespace or control characters".into());
    }
    match port.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be connected to".into()),
        Ok(_) => Ok(()),
        Err(_) => Err(format!("port {port:?} is not a number in 1..=65535")),
    }
}

/// A pooled TCP connection: the stream behind an async mutex (one user at a time) and an open flag
/// the user clears on an I/O error with [`TcpConnection::mark_broken`].
#[derive(Debug)]
pub struct TcpConnection {
    stream: Mutex<TcpStream>,
    open: AtomicBool,
}

impl TcpConnection {
    /// Exclusive access to the stream for one exchange.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, TcpStream> {
        self.stream.lock().await
    }

    /// Records that the stream failed: [`Connector::is_open`] turns false and the pool stops
    /// handing the connection out.
    pub fn mark_broken(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// `false` once marked broken or closed by the pool.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

/// Connects plain TCP streams (with `TCP_NODELAY`). See the crate docs for an example.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    type Conn = TcpConnection;
    type Error = io::Error;

    async fn connect(&self, addr: &str) -> io::Result<TcpConnection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(TcpConnection {
            stream: Mutex::new(stream),
            open: AtomicBool::new(true),
        })
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        validate_addr(addr)
    }

    fn is_open(&self, conn: &TcpConnection) -> bool {
        conn.is_open()
    }

    fn close(&self, conn: &TcpConnection) {
        // The stream itself closes when its last handle drops; from now on nobody is handed it.
        conn.mark_broken();
    }
}
