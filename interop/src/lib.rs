//! [`keyed-pool`](keyed_pool) with a real client: a [`Connector`] for Redis's
//! [`MultiplexedConnection`] and [`call`], a command made through the pool whose outcome feeds the
//! connection's health.
//!
//! A multiplexed connection is already shared: clones of it pipeline their commands over one
//! socket. The pool keeps one per address and adds what the client lacks: a cap, one connect at a
//! time per address (I4), health (I9), backoff from a failing address (I12) and stats. See
//! `tests/redis.rs` for it against real `redis-server`s, one of them killed and restarted.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! use keyed_pool::ConnectionPool;
//! use keyed_pool_interop::{RedisConnector, call};
//! let pool = ConnectionPool::builder()
//!     .max_connections(16)
//!     .connector(RedisConnector::default())
//!     .build()
//!     .unwrap();
//! let addr = "127.0.0.1:6379".into();
//! call::<()>(&pool, &addr, redis::cmd("SET").arg("greeting").arg("hello")).await.unwrap();
//! let value: String = call(&pool, &addr, redis::cmd("GET").arg("greeting")).await.unwrap();
//! assert_eq!(value, "hello");
//! # }
//! ```

pub mod server;

use std::time::Duration;

use keyed_pool::{CheetahString, ConnectionPool, Connector, PoolError};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError};

/// Connects a [`MultiplexedConnection`] to `redis://{addr}/` for the pool.
///
/// The client cannot tell whether its connection is still open, so `is_open` keeps its default
/// (`true`): [`call`] marks a connection closed when a command fails on it, and the pool then stops
/// handing it out (I8). Nor can it be closed while other clones live: a connection the pool lets
/// go closes when its last handle is dropped (the trait's default `close`).
#[derive(Clone, Copy, Debug)]
pub struct RedisConnector {
    /// How long a command waits for its reply; `None` waits for ever. Default: 1 s.
    pub response_timeout: Option<Duration>,
}

impl Default for RedisConnector {
    fn default() -> Self {
        Self {
            response_timeout: Some(Duration::from_secs(1)),
        }
    }
}

impl Connector for RedisConnector {
    type Conn = MultiplexedConnection;
    type Error = RedisError;

    async fn connect(&self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        let mut config = AsyncConnectionConfig::new();
        if let Some(timeout) = self.response_timeout {
            config = config.set_response_timeout(timeout);
        }
        let client = Client::open(format!("redis://{addr}/"))?;
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    async fn probe(&self, conn: &MultiplexedConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query_async(&mut conn.clone()).await
    }
}

/// Why a [`call`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The pool had no connection to give (backoff, capacity, connect failure...).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The command failed: on the connection, or with an error reply from the server.
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// `true` for an error that says the connection failed (I/O, a dropped or unusable connection),
/// not the command: a timeout, a reset, a refused or closed socket, a reply that could not be
/// parsed.
pub fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error()
}

/// Runs `cmd` on `addr` through the pool: takes (or connects) the pooled connection, runs the
/// command inside the connection's in-flight guard, and records the outcome on it:
///
/// - a reply is a success, and so is an error reply (`WRONGTYPE`...) or a reply that does not fit
///   `T`: the server answered;
/// - a connection error ([`is_connection_error`]) is a failure; unless it is a timeout, the
///   connection is also marked closed, so the pool never hands it out again (I8), evicts it, and
///   backs the address off if it died young (I12). Repeated timeouts make it unhealthy (I9).
///
/// # Errors
/// [`CallError::Pool`] if no connection could be had, [`CallError::Redis`] if the command failed.
///
/// # Cancel safety
/// Cancel safe: a dropped call is recorded as cancelled; the command may still reach the server.
pub async fn call<T: FromRedisValue>(
    pool: &ConnectionPool<MultiplexedConnection, impl Connector<Conn = MultiplexedConnection>>,
    addr: &CheetahString,
    cmd: &Cmd,
) -> Result<T, CallError> {
    let conn = pool.get_or_connect(addr).await?;
    let guard = conn.begin();
    let result = cmd.query_async(&mut conn.client().clone()).await;
    match &result {
        Err(err) if is_connection_error(err) => {
            guard.failure();
            if !err.is_timeout() {
                conn.mark_closed();
            }
        }
        _ => guard.success(),
    }
    Ok(result?)
}
