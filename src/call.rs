//! Calls that record their own outcome: [`ConnectionPool::call`] (get or connect, then call) and
//! [`PooledConnection::call`] (on a connection already in hand). Both run the call under a
//! [`CallGuard`](crate::CallGuard) and finish it from the call's `Result`, so no early return can
//! leave a failure unrecorded; one implementation serves both.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use cheetah_string::CheetahString;

use crate::ConnectionPool;
use crate::connection::PooledConnection;
use crate::connector::Connector;
use crate::error::{PoolError, human};

/// How a finished call counts toward its connection's health.
///
/// A call made with [`ConnectionPool::call`] records [`Success`](Self::Success) for an `Ok`, and
/// for an `Err` whatever its classifier says ([`Call::failure_if`], [`Call::classify`]; by default
/// every error is a [`Failure`](Self::Failure)). An error that does not count against the server
/// (an application's "not found") is a success of the transport: the server answered.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use keyed_pool::{CallOutcome, ConnectionPool};
///
/// #[derive(Debug)]
/// enum Error { Unavailable, NotFound, TooLarge }
///
/// fn counts(e: &Error) -> CallOutcome {
///     match e {
///         Error::Unavailable => CallOutcome::Failure, // the server is in trouble
///         Error::NotFound => CallOutcome::Success,    // the server answered
///         Error::TooLarge => CallOutcome::Neither,    // never reached the server
///     }
/// }
///
/// let pool: ConnectionPool<()> = ConnectionPool::new(8, Duration::ZERO);
/// let conn = pool.try_insert("127.0.0.1:9876", ()).unwrap();
/// for e in [Error::Unavailable, Error::NotFound, Error::TooLarge] {
///     let _ = conn.call(|_| async { Err::<(), _>(e) }).classify(counts).await;
/// }
/// let m = conn.metrics();
/// assert_eq!((m.total_errors(), m.success_count(), m.cancelled_count()), (1, 1, 1));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallOutcome {
    /// The server did its part: latency recorded, the failure run (I10) ends.
    Success,
    /// Counts against the connection's health (I9–I11).
    Failure,
    /// Says nothing about the server (say, a request the client could not encode): counted as
    /// cancelled, like a call dropped unfinished, but without its warning.
    Neither,
}

/// Why a call made with [`ConnectionPool::call`] or [`PooledConnection::call`] failed.
///
/// Each variant's source chain has each cause once: [`Pool`](Self::Pool) and
/// [`Call`](Self::Call) display as the error they carry (they are transparent), and
/// [`TimedOut`](Self::TimedOut) has no cause. The three variants are the whole story of a call
/// (no connection, its own error, out of time), so the enum is exhaustive: match all three.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::{CallError, PoolError};
/// let err: CallError<std::io::Error> = CallError::TimedOut {
///     addr: "10.0.0.1:6379".into(),
///     timeout: Duration::from_millis(250),
/// };
/// assert_eq!(err.to_string(), "call to 10.0.0.1:6379 timed out after 250 ms");
/// assert!(err.is_timeout());
/// let err: CallError<std::io::Error> = CallError::Pool(PoolError::Closed);
/// assert_eq!(err.to_string(), "the pool is closed");
/// assert!(matches!(err.pool_error(), Some(PoolError::Closed)));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError<E> {
    /// No connection could be had (backoff, capacity, a failed connect, a closed pool); the call
    /// was not made and nothing was recorded.
    #[error(transparent)]
    Pool(PoolError),
    /// The call's own error, recorded as its classifier said.
    #[error(transparent)]
    Call(E),
    /// The call did not finish within its timeout; it was dropped and recorded as a failure.
    #[error("call to {addr} timed out after {}", human(*timeout))]
    TimedOut {
        /// The connection's address.
        addr: CheetahString,
        /// The timeout that elapsed.
        timeout: Duration,
    },
}

impl<E> CallError<E> {
    /// The pool's error, if no connection could be had.
    pub fn pool_error(&self) -> Option<&PoolError> {
        match self {
            Self::Pool(err) => Some(err),
            _ => None,
        }
    }

    /// The call's own error, if it returned one.
    ///
    /// ```
    /// use keyed_pool::CallError;
    /// let err = CallError::Call("not found");
    /// assert_eq!(err.call_error(), Some(&"not found"));
    /// assert_eq!(err.into_call_error(), Some("not found"));
    /// ```
    pub fn call_error(&self) -> Option<&E> {
        match self {
            Self::Call(err) => Some(err),
            _ => None,
        }
    }

    /// The call's own error, by value, if it returned one.
    pub fn into_call_error(self) -> Option<E> {
        match self {
            Self::Call(err) => Some(err),
            _ => None,
        }
    }

    /// `true` if the call timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::TimedOut { .. })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// Where a [`Call`] gets its connection: a pool with a connector ([`FromPool`]), or a
/// [`PooledConnection`] already in hand. Sealed.
///
/// ```
/// use keyed_pool::{CallTarget, PooledConnection};
/// fn calls_on<T: CallTarget<Conn = String>>() {}
/// calls_on::<PooledConnection<String>>();
/// ```
pub trait CallTarget: sealed::Sealed {
    /// The connection type.
    type Conn: Send + Sync + 'static;
    #[doc(hidden)]
    fn connection(
        self,
    ) -> impl Future<Output = Result<PooledConnection<Self::Conn>, PoolError>> + Send;
}

/// The target of [`ConnectionPool::call`]: the pool and the address, connected on demand with
/// [`get_or_connect`](ConnectionPool::get_or_connect).
///
/// A call's type names it, for a call kept in a variable or a field before it is awaited:
///
/// ```
/// use keyed_pool::{Call, ConnectionPool, EveryErrorFails, FromPool};
/// use keyed_pool::tcp::{TcpConnection, TcpConnector};
/// # async fn f() {
/// let pool = ConnectionPool::builder().connector(TcpConnector).build().unwrap();
/// let call: Call<'_, FromPool<'_, TcpConnection, TcpConnector>, _, EveryErrorFails<std::io::Error>> =
///     pool.call("127.0.0.1:6379", |_conn| async { Ok(()) });
/// let _ = call.await;
/// # }
/// ```
#[derive(Debug)]
pub struct FromPool<'a, C, K: Connector<Conn = C>> {
    pool: &'a ConnectionPool<C, K>,
    addr: CheetahString,
}

impl<C, K: Connector<Conn = C>> sealed::Sealed for FromPool<'_, C, K> {}

impl<C: Send + Sync + 'static, K: Connector<Conn = C>> CallTarget for FromPool<'_, C, K> {
    type Conn = C;

    #[allow(clippy::manual_async_fn)]
    fn connection(self) -> impl Future<Output = Result<PooledConnection<C>, PoolError>> + Send {
        async move { self.pool.get_or_connect(&self.addr).await }
    }
}

impl<C> sealed::Sealed for PooledConnection<C> {}

impl<C: Send + Sync + 'static> CallTarget for PooledConnection<C> {
    type Conn = C;

    fn connection(self) -> impl Future<Output = Result<PooledConnection<C>, PoolError>> + Send {
        std::future::ready(Ok(self))
    }
}

/// The classifier a [`Call`] starts with: every error is a [`CallOutcome::Failure`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// let pool: ConnectionPool<()> = ConnectionPool::new(8, Duration::ZERO);
/// let conn = pool.try_insert("127.0.0.1:9876", ()).unwrap();
/// let _ = conn.call(|_| async { Err::<(), _>("not found") }).await; // no classifier: a failure
/// assert_eq!(conn.metrics().total_errors(), 1);
/// # }
/// ```
pub type EveryErrorFails<E> = fn(&E) -> CallOutcome;

/// The default classifier: every error counts against the connection.
fn every_error_fails<E>(_: &E) -> CallOutcome {
    CallOutcome::Failure
}

/// A call that records its own outcome, made by [`ConnectionPool::call`] or
/// [`PooledConnection::call`]. Set it up with [`failure_if`](Self::failure_if) (or
/// [`classify`](Self::classify)) and [`timeout`](Self::timeout), then `.await` it (or
/// [`run`](Self::run) it, for a call future that is not `Send`). A `Call` is
/// [`IntoFuture`], not a `Future`: where a `Future` is asked for (`select!`, a `join_all`,
/// madsim's `timeout`), pass `call.into_future()` or `call.run()`.
///
/// Awaited, it:
/// 1. gets the connection (a pool call connects if needed; a [`PoolError`] ends it as
///    [`CallError::Pool`], recording nothing);
/// 2. starts a [`CallGuard`](crate::CallGuard), so the connection counts as in use (I5);
/// 3. runs the closure on a handle to the connection, bounded by the timeout if there is one;
/// 4. records the outcome: `Ok` → success (with its latency); `Err(e)` → as the classifier says
///    (by default a failure); timed out → a failure, as [`CallError::TimedOut`].
///
/// Failures feed the connection's health (I9–I11): enough of them and the connection is never
/// handed out again, is evicted, and its address backs off (I12).
///
/// # Cancel safety
/// Cancel safe. Dropping the future before the call ends drops the closure's future and records
/// the call as cancelled (neither success nor failure; logged at `debug`); dropping it while it
/// connects leaves the connect to its own task (see
/// [`get_or_connect`](ConnectionPool::get_or_connect)). Nothing leaks.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use std::time::Duration;
/// use keyed_pool::{CallError, ConnectionPool};
///
/// #[derive(Debug, PartialEq)]
/// enum Error { NotFound, Reset }
///
/// let pool: ConnectionPool<()> = ConnectionPool::new(8, Duration::ZERO);
/// let conn = pool.try_insert("127.0.0.1:9876", ()).unwrap();
/// let result: Result<u32, _> = conn
///     .call(|_conn| async { Err(Error::NotFound) })
///     .failure_if(|e| *e == Error::Reset) // "not found": the server answered
///     .timeout(Duration::from_millis(500))
///     .await;
/// assert!(matches!(result, Err(CallError::Call(Error::NotFound))));
/// assert_eq!(conn.metrics().success_count(), 1);
///
/// // Dropped by its caller mid-call: cancelled, neither success nor failure.
/// let slow = conn.call(|_conn| async {
///     tokio::time::sleep(Duration::from_secs(10)).await;
///     Ok::<_, Error>(1)
/// });
/// assert!(tokio::time::timeout(Duration::from_millis(10), slow.run()).await.is_err());
/// assert_eq!(conn.metrics().cancelled_count(), 1);
/// assert_eq!(conn.metrics().in_flight(), 0);
/// # }
/// ```
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<'a, S, F, G> {
    target: S,
    make: F,
    classify: G,
    /// `None`: the connection's default ([`PooledConnection::call_timeout`]).
    timeout: Option<Option<Duration>>,
    _borrow: PhantomData<&'a ()>,
}

impl<S, F, G> std::fmt::Debug for Call<'_, S, F, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<'a, S, F, G, Fut, T, E> Call<'a, S, F, G>
where
    S: CallTarget,
    F: FnOnce(PooledConnection<S::Conn>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    G: FnOnce(&E) -> CallOutcome,
{
    /// Counts an error against the connection only if `is_failure` says so; any other error is a
    /// success of the transport (the server answered). By default every error counts.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::{CallError, ConnectionPool};
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::ZERO);
    /// let conn = pool.try_insert("127.0.0.1:6379", "a client").unwrap();
    /// #[derive(Debug, PartialEq)]
    /// enum Error { NotFound, Io }
    /// let result: Result<(), _> = conn
    ///     .call(|_conn| async { Err(Error::NotFound) })
    ///     .failure_if(|e| *e == Error::Io)
    ///     .await;
    /// assert!(matches!(result, Err(CallError::Call(Error::NotFound))));
    /// assert_eq!(conn.metrics().total_errors(), 0, "the server answered");
    /// assert_eq!(conn.metrics().success_count(), 1);
    /// # }
    /// ```
    pub fn failure_if(
        self,
        is_failure: impl FnOnce(&E) -> bool,
    ) -> Call<'a, S, F, impl FnOnce(&E) -> CallOutcome> {
        self.classify(move |err: &E| {
            if is_failure(err) {
                CallOutcome::Failure
            } else {
                CallOutcome::Success
            }
        })
    }

    /// Says how an error counts, with the full choice of [`CallOutcome`] (including
    /// [`Neither`](CallOutcome::Neither), for an error that says nothing about the server).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::{CallOutcome, ConnectionPool};
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::ZERO);
    /// let conn = pool.try_insert("127.0.0.1:6379", "a client").unwrap();
    /// let result: Result<(), _> = conn
    ///     .call(|_conn| async { Err("request too large to encode") })
    ///     .classify(|_| CallOutcome::Neither)
    ///     .await;
    /// assert!(result.is_err());
    /// assert_eq!(conn.metrics().request_count(), 0);
    /// assert_eq!(conn.metrics().cancelled_count(), 1);
    /// # }
    /// ```
    pub fn classify<G2>(self, classify: G2) -> Call<'a, S, F, G2>
    where
        G2: FnOnce(&E) -> CallOutcome,
    {
        Call {
            target: self.target,
            make: self.make,
            classify,
            timeout: self.timeout,
            _borrow: PhantomData,
        }
    }

    /// Bounds this call by `timeout`, replacing the pool's
    /// [`call_timeout`](crate::PoolConfig::call_timeout). The bound covers the closure only: a
    /// connect is bounded by the connect timeout. A call that times out is dropped, recorded as a
    /// failure, and returns [`CallError::TimedOut`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::ZERO);
    /// let conn = pool.try_insert("127.0.0.1:6379", "a client").unwrap();
    /// let result: Result<(), keyed_pool::CallError<std::io::Error>> = conn
    ///     .call(|_conn| std::future::pending())
    ///     .timeout(Duration::from_millis(100))
    ///     .await;
    /// assert!(result.unwrap_err().is_timeout());
    /// assert_eq!(conn.metrics().total_errors(), 1);
    /// # }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(Some(timeout));
        self
    }

    /// Lets this call run unbounded, whatever the pool's
    /// [`call_timeout`](crate::PoolConfig::call_timeout).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool = ConnectionPool::builder()
    ///     .call_timeout(Duration::from_secs(1))
    ///     .build::<&str>()
    ///     .unwrap();
    /// let conn = pool.try_insert("127.0.0.1:6379", "a client").unwrap();
    /// let n: Result<u32, keyed_pool::CallError<std::io::Error>> =
    ///     conn.call(|_conn| async { Ok(7) }).no_timeout().await;
    /// assert_eq!(n.unwrap(), 7);
    /// # }
    /// ```
    pub fn no_timeout(mut self) -> Self {
        self.timeout = Some(None);
        self
    }

    /// Runs the call. `.await` on the call does the same through a boxed, `Send` future; `run`
    /// needs no allocation and no `Send` (for a `LocalSet`).
    ///
    /// # Errors
    /// [`CallError::Pool`] if no connection could be had, [`CallError::Call`] with the call's own
    /// error, [`CallError::TimedOut`] if it did not finish within its timeout.
    ///
    /// # Cancel safety
    /// Cancel safe: see [`Call`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::rc::Rc;
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<&str> = ConnectionPool::new(8, Duration::ZERO);
    /// let conn = pool.try_insert("127.0.0.1:6379", "a client").unwrap();
    /// let local = Rc::new(5); // not Send
    /// let n: Result<u32, keyed_pool::CallError<std::io::Error>> = conn
    ///     .call(|_conn| async move { Ok(*local + 1) })
    ///     .run()
    ///     .await;
    /// assert_eq!(n.unwrap(), 6);
    /// # }
    /// ```
    pub async fn run(self) -> Result<T, CallError<E>> {
        let conn = self.target.connection().await.map_err(CallError::Pool)?;
        let timeout = self.timeout.unwrap_or_else(|| conn.call_timeout());
        // Quiet: if this future is dropped, its caller chose to cancel the call.
        let guard = conn.begin_quiet();
        let call = (self.make)(conn);
        let result = match timeout {
            None => call.await,
            Some(timeout) => match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_elapsed) => {
                    let addr = guard.addr().clone();
                    tracing::debug!(addr = %addr, conn = %guard.conn_id(), ?timeout, "call timed out");
                    guard.failure();
                    return Err(CallError::TimedOut { addr, timeout });
                }
            },
        };
        match result {
            Ok(value) => {
                guard.success();
                Ok(value)
            }
            Err(err) => {
                guard.finish((self.classify)(&err));
                Err(CallError::Call(err))
            }
        }
    }
}

impl<'a, S, F, G, Fut, T, E> IntoFuture for Call<'a, S, F, G>
where
    S: CallTarget + Send + 'a,
    F: FnOnce(PooledConnection<S::Conn>) -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, E>> + Send + 'a,
    G: FnOnce(&E) -> CallOutcome + Send + 'a,
    T: 'a,
    E: Send + 'a,
{
    type Output = Result<T, CallError<E>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<Conn = C>,
{
    /// A call to `addr` that records its own outcome: gets or connects the address's connection
    /// ([`get_or_connect`](Self::get_or_connect)), runs `f` on it under a
    /// [`CallGuard`](crate::CallGuard), and records success or failure from its `Result`. Await
    /// the returned [`Call`]; set it up first with [`Call::failure_if`] (which errors count against
    /// the server; by default all) and [`Call::timeout`] (default: the pool's
    /// [`call_timeout`](crate::PoolConfig::call_timeout)).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyed_pool::{CallError, ConnectionPool};
    /// use keyed_pool::tcp::TcpConnector;
    /// use tokio::io::AsyncWriteExt;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let addr = listener.local_addr().unwrap().to_string();
    /// tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    ///
    /// let pool = ConnectionPool::builder().connector(TcpConnector).build().unwrap();
    /// let sent = pool
    ///     .call(&addr, |conn| async move {
    ///         conn.client().lock().await.write_all(b"ping\n").await?;
    ///         Ok::<_, std::io::Error>(5)
    ///     })
    ///     .await;
    /// assert_eq!(sent.unwrap(), 5);
    /// assert_eq!(pool.get_metrics(&addr).unwrap().success_count(), 1);
    ///
    /// let refused = pool.call("127.0.0.1:1", |_conn| async { Ok::<_, std::io::Error>(()) }).await;
    /// assert!(matches!(refused, Err(CallError::Pool(_))));
    /// # }
    /// ```
    pub fn call<F, Fut, T, E>(
        &self,
        addr: impl AsRef<str>,
        f: F,
    ) -> Call<'_, FromPool<'_, C, K>, F, EveryErrorFails<E>>
    where
        F: FnOnce(PooledConnection<C>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        Call {
            target: FromPool {
                pool: self,
                addr: crate::pool::key(addr.as_ref()),
            },
            make: f,
            classify: every_error_fails::<E>,
            timeout: None,
            _borrow: PhantomData,
        }
    }
}

impl<C: Send + Sync + 'static> PooledConnection<C> {
    /// A call on this connection that records its own outcome, as
    /// [`ConnectionPool::call`] does for a pool with a connector: for a connection in hand (a
    /// pool filled by hand with [`insert`](ConnectionPool::insert), or one already fetched). Its
    /// default timeout is [`call_timeout`](Self::call_timeout).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::{CallError, ConnectionPool};
    /// let pool: ConnectionPool<String> = ConnectionPool::new(8, Duration::ZERO);
    /// assert!(pool.insert("127.0.0.1:9876", "a client".to_string()));
    /// let conn = pool.get("127.0.0.1:9876").unwrap();
    /// let len: Result<usize, CallError<std::io::Error>> =
    ///     conn.call(|conn| async move { Ok(conn.client().len()) }).await;
    /// assert_eq!(len.unwrap(), 8);
    /// let failed: Result<(), _> = conn.call(|_| async { Err("reset") }).await;
    /// assert!(matches!(failed, Err(CallError::Call("reset"))));
    /// assert_eq!((conn.metrics().success_count(), conn.metrics().total_errors()), (1, 1));
    /// # }
    /// ```
    pub fn call<'a, F, Fut, T, E>(
        &self,
        f: F,
    ) -> Call<'a, PooledConnection<C>, F, EveryErrorFails<E>>
    where
        F: FnOnce(PooledConnection<C>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        Call {
            target: self.clone(),
            make: f,
            classify: every_error_fails::<E>,
            timeout: None,
            _borrow: PhantomData,
        }
    }
}
