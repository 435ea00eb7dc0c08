//! The [`Connector`] trait: how the pool creates, checks and closes connections. Creation and
//! checking are the connector's; policy (when to connect, keep, evict, back off) is the pool's.

use std::future::Future;

/// Creates, checks and closes connections for the pool (in the spirit of bb8's
/// `ManageConnection` and deadpool's `Manager`). It names its connection type, so a pool built
/// with it is typed without annotations.
///
/// Only [`connect`](Self::connect) is required. The pool calls
/// - [`validate`](Self::validate) before anything else, so a malformed address is refused with
///   [`PoolError::InvalidAddress`](crate::PoolError::InvalidAddress) without a connect attempt;
/// - [`is_open`](Self::is_open) on every `get` (keep it cheap: a flag read, no I/O);
/// - [`probe`](Self::probe) when it checks a connection actively: on demand
///   ([`ConnectionPool::probe`](crate::ConnectionPool::probe)), in the cleanup task for connections
///   quiet longer than [`PoolConfig::probe_idle`](crate::PoolConfig::probe_idle), and before
///   handing out one quiet longer than
///   [`PoolConfig::check_idle_before_use`](crate::PoolConfig::check_idle_before_use);
/// - [`close`](Self::close) when it evicts a connection or is closed (keep it quick: signal, do not
///   wait).
///
/// `validate`, `is_open` and `close` may be called while the pool holds a shard lock of its map:
/// they must not call back into the pool (that could deadlock) and must not block.
///
/// # Example
///
/// A connector for plain TCP streams (the crate's own [`tcp::TcpConnector`](crate::tcp) is a
/// fuller one):
///
/// ```
/// use keyed_pool::{ConnectionPool, Connector};
/// use tokio::net::TcpStream;
///
/// struct Tcp;
///
/// impl Connector for Tcp {
///     type Conn = tokio::sync::Mutex<TcpStream>;
///     type Error = std::io::Error;
///
///     async fn connect(&self, addr: &str) -> Result<Self::Conn, Self::Error> {
///         Ok(tokio::sync::Mutex::new(TcpStream::connect(addr).await?))
///     }
/// }
///
/// // The connection type comes from the connector: no turbofish.
/// let pool = ConnectionPool::builder().connector(Tcp).build().unwrap();
/// assert_eq!(pool.len(), 0);
/// ```
pub trait Connector: Send + Sync + 'static {
    /// The connection this connector makes; the pool hands out shared handles to it.
    type Conn: Send + Sync + 'static;

    /// The connector's error; shared by every caller that waited on the failed connect.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens a connection to `addr`. The pool bounds it with its connect timeout and may drop the
    /// future at any await point, so it must be cancel safe.
    fn connect(&self, addr: &str) -> impl Future<Output = Result<Self::Conn, Self::Error>> + Send;

    /// Checks `addr` before any connect; an `Err` carries the reason it is malformed.
    fn validate(&self, addr: &str) -> Result<(), String> {
        let _ = addr;
        Ok(())
    }

    /// Cheap check that the transport is still open. A `false` keeps `get` from returning the
    /// connection (I8) and gets it evicted as closed.
    fn is_open(&self, conn: &Self::Conn) -> bool {
        let _ = conn;
        true
    }

    /// An active check (a cheap request, such as a Redis `PING`), bounded by the pool's probe
    /// timeout. An error (or no answer in time) while [`is_open`](Self::is_open) still says open
    /// means the server does not answer: the connection is evicted as unhealthy and its address
    /// backs off. Must be cancel safe. The default does nothing and succeeds.
    fn probe(&self, conn: &Self::Conn) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = conn;
        async { Ok(()) }
    }

    /// Closes a connection the pool has let go of. Other handles to it may still exist; after this
    /// their calls may fail. The default does nothing (the connection closes when its last handle
    /// is dropped).
    fn close(&self, conn: &Self::Conn) {
        let _ = conn;
    }
}

/// The connector of a pool filled by hand with [`insert`](crate::ConnectionPool::insert), as the
/// original pool was: it cannot connect, so such a pool has no `get_or_connect` (a compile-time
/// error, not a run-time one), and every connection counts as open unless marked closed.
///
/// ```compile_fail
/// # async fn f() {
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// let pool: ConnectionPool<String> = ConnectionPool::new(8, Duration::ZERO);
/// // error[E0599]: `get_or_connect` exists only for pools built with a `Connector`.
/// let _ = pool.get_or_connect("127.0.0.1:1").await;
/// # }
/// ```
///
/// The same pool filled by hand:
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// let pool: ConnectionPool<String> = ConnectionPool::new(8, Duration::ZERO);
/// assert!(pool.insert("127.0.0.1:1", "a client".to_string()));
/// assert!(pool.get("127.0.0.1:1").is_some());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct NoConnector;

/// What the pool needs of its connector to keep connections (check, probe, close), whether or not
/// it can make them: every [`Connector`] with `Conn = C`, and [`NoConnector`] for any `C`.
///
/// Sealed: implement [`Connector`] instead.
pub trait ManagesConnections<C>: sealed::Sealed<C> + Send + Sync + 'static {
    #[doc(hidden)]
    fn validate_addr(&self, addr: &str) -> Result<(), String>;
    #[doc(hidden)]
    fn is_conn_open(&self, conn: &C) -> bool;
    #[doc(hidden)]
    fn probe_conn(&self, conn: &C) -> impl Future<Output = Result<(), crate::Cause>> + Send;
    #[doc(hidden)]
    fn close_conn(&self, conn: &C);
}

mod sealed {
    pub trait Sealed<C> {}
    impl<K: super::Connector> Sealed<K::Conn> for K {}
    impl<C> Sealed<C> for super::NoConnector {}
}

impl<K: Connector> ManagesConnections<K::Conn> for K {
    #[inline]
    fn validate_addr(&self, addr: &str) -> Result<(), String> {
        self.validate(addr)
    }

    #[inline]
    fn is_conn_open(&self, conn: &K::Conn) -> bool {
        self.is_open(conn)
    }

    #[allow(clippy::manual_async_fn)]
    fn probe_conn(&self, conn: &K::Conn) -> impl Future<Output = Result<(), crate::Cause>> + Send {
        async move {
            self.probe(conn)
                .await
                .map_err(|e| std::sync::Arc::new(e) as crate::Cause)
        }
    }

    #[inline]
    fn close_conn(&self, conn: &K::Conn) {
        self.close(conn);
    }
}

impl<C: Send + Sync + 'static> ManagesConnections<C> for NoConnector {
    #[inline]
    fn validate_addr(&self, _addr: &str) -> Result<(), String> {
        Ok(())
    }

    #[inline]
    fn is_conn_open(&self, _conn: &C) -> bool {
        true
    }

    #[allow(clippy::manual_async_fn)]
    fn probe_conn(&self, _conn: &C) -> impl Future<Output = Result<(), crate::Cause>> + Send {
        async { Ok(()) }
    }

    #[inline]
    fn close_conn(&self, _conn: &C) {}
}
