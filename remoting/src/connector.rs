//! [`RemotingConnector`]: the pool's [`Connector`] for [`RemotingClient`]s, and [`pool_request`],
//! a request made through the pool whose outcome feeds the connection's health.

use crate::client::{ClientConfig, RemotingClient, RemotingError};
use crate::codec::{RemotingCommand, code};
use keyed_pool::ConnectionPool;
use keyed_pool::Connector;
use keyed_pool::PoolError;

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
}

/// `true` for response codes that say the *server* failed (`SYSTEM_ERROR`, `SYSTEM_BUSY`): those
/// count against the connection's health in [`pool_request`]. Every other code is an
/// application-level answer (not found, not supported...) from a server that works, and counts as
/// a success.
pub fn is_server_failure(response_code: i32) -> bool {
    matches!(response_code, code::SYSTEM_ERROR | code::SYSTEM_BUSY)
}

/// Sends `cmd` to `addr` through the pool: takes (or connects) the pooled client with
/// [`get_or_connect`](ConnectionPool::get_or_connect), makes the request inside the connection's
/// in-flight guard, and records the outcome on that connection:
///
/// - a response counts as a success with its latency, unless its code is a server failure
///   ([`is_server_failure`]);
/// - a timeout or a dead connection counts as a failure (the connection's `is_open` is then false,
///   so `get` stops returning it and the next sweep evicts it);
/// - an encoding error is the caller's and records nothing (the guard is dropped: cancelled).
///
/// A response with a non-success code is returned as `Ok`: look at its `code`.
///
/// # Errors
/// [`CallError::Pool`] if no connection could be had, [`CallError::Remoting`] if the request
/// failed.
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
    let conn = pool.get_or_connect(addr).await?;
    let call = conn.begin();
    match conn.client().request(cmd).await {
        Ok(response) if is_server_failure(response.code) => {
            call.failure();
            Ok(response)
        }
        Ok(response) => {
            call.success();
            Ok(response)
        }
        Err(err) if err.is_transport() => {
            call.failure();
            if !conn.client().is_open() {
                conn.mark_closed();
            }
            Err(err.into())
        }
        Err(err) => {
            drop(call);
            Err(err.into())
        }
    }
}
