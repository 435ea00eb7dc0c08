//! [`RemotingConnector`]: the pool's [`Connector`] for [`RemotingClient`]s, and [`pool_request`],
//! a request made through the pool whose outcome feeds the connection's health.

use crate::client::{ClientConfig, RemotingClient, RemotingError};
use crate::codec::{RemotingCommand, code};
use std::time::Duration;

use keyed_pool::{
    CallError as PoolCallError, CallOutcome, CheetahString, ConnectionPool, Connector, PoolError,
};

/// Connects [`RemotingClient`]s for a [`ConnectionPool`].
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::ConnectionPool;
/// use keyed_pool_remoting::{ClientConfig, RemotingClient, RemotingConnector};
/// let pool = ConnectionPool::builder()
///     .max_connections(16)
///     .connector(RemotingConnector::new(
///         ClientConfig::default().request_timeout(Duration::from_secs(1)),
///     ))
///     .build::<RemotingClient>()
///     .unwrap();
/// # drop(pool);
/// ```
#[derive(Debug, Clone, Default)]
pub struct RemotingConnector {
    config: ClientConfig,
}

impl RemotingConnector {
    /// A connector whose clients use `config`.
    pub fn new(config: ClientConfig) -> Self {
        Self { config }
    }

    /// The clients' settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }
}

impl Connector for RemotingConnector {
    type Conn = RemotingClient;
    type Error = RemotingError;

    async fn connect(&self, addr: &str) -> Result<RemotingClient, RemotingError> {
        RemotingClient::connect(addr, self.config.clone()).await
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    fn is_open(&self, conn: &RemotingClient) -> bool {
        conn.is_open()
    }

    async fn probe(&self, conn: &RemotingClient) -> Result<(), RemotingError> {
        conn.probe().await
    }

    fn close(&self, conn: &RemotingClient) {
        conn.close();
    }
}

/// Why a [`pool_request`] failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The pool had no connection to give (backoff, capacity, connect failure...).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The request failed on the connection.
    #[error(transparent)]
    Remoting(#[from] RemotingError),
    /// No response within the pool's [`call_timeout`](keyed_pool::PoolConfig::call_timeout)
    /// (only when the pool sets one; the client's own request timeout is a
    /// [`RemotingError::Timeout`]).
    #[error("request to {addr} timed out after {} ms", timeout.as_millis())]
    TimedOut {
        /// The connection's address.
        addr: CheetahString,
        /// The pool's call timeout.
        timeout: Duration,
    },
}

/// `true` for response codes that say the *server* failed (`SYSTEM_ERROR`, `SYSTEM_BUSY`): those
/// count against the connection's health in [`pool_request`]. Every other code is an
/// application-level answer (not found, not supported...) from a server that works, and counts as
/// a success.
pub fn is_server_failure(response_code: i32) -> bool {
    matches!(response_code, code::SYSTEM_ERROR | code::SYSTEM_BUSY)
}

/// What a request through the pool ended with, as the pool's call API classifies it.
enum Failed {
    /// A response whose code says the server failed: returned to the caller as `Ok`.
    Server(RemotingCommand),
    Request(RemotingError),
}

/// Sends `cmd` to `addr` with [`ConnectionPool::call`], which gets or connects the pooled client
/// and records the outcome on that connection:
///
/// - a response counts as a success with its latency, unless its code is a server failure
///   ([`is_server_failure`]);
/// - a timeout or a dead connection counts as a failure (a dead connection is also marked closed,
///   so `get` stops returning it and the next sweep evicts it);
/// - an encoding error is the caller's and says nothing about the server: counted as cancelled
///   ([`CallOutcome::Neither`]).
///
/// A response with a non-success code is returned as `Ok`: look at its `code`.
///
/// # Errors
/// [`CallError::Pool`] if no connection could be had, [`CallError::Remoting`] if the request
/// failed, [`CallError::TimedOut`] past the pool's call timeout.
///
/// # Cancel safety
/// Cancel safe: a dropped call is recorded as cancelled, the request is forgotten.
pub async fn pool_request<K>(
    pool: &ConnectionPool<RemotingClient, K>,
    addr: impl AsRef<str>,
    cmd: RemotingCommand,
) -> Result<RemotingCommand, CallError>
where
    K: Connector<Conn = RemotingClient>,
{
    let result = pool
        .call(addr, |conn| async move {
            match conn.client().request(cmd).await {
                Ok(response) if is_server_failure(response.code) => Err(Failed::Server(response)),
                Ok(response) => Ok(response),
                Err(err) => {
                    if err.is_transport() && !conn.client().is_open() {
                        conn.mark_closed();
                    }
                    Err(Failed::Request(err))
                }
            }
        })
        .classify(|failed| match failed {
            Failed::Request(err) if !err.is_transport() => CallOutcome::Neither,
            _ => CallOutcome::Failure,
        })
        .await;
    match result {
        Ok(response) | Err(PoolCallError::Call(Failed::Server(response))) => Ok(response),
        Err(PoolCallError::Call(Failed::Request(err))) => Err(CallError::Remoting(err)),
        Err(PoolCallError::Pool(err)) => Err(CallError::Pool(err)),
        Err(PoolCallError::TimedOut { addr, timeout }) => {
            Err(CallError::TimedOut { addr, timeout })
        }
    }
}
