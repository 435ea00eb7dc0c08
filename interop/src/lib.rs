//! [`keyed-pool`](keyed_pool) with a real client: a [`Connector`] for Redis's
//! [`MultiplexedConnection`] and [`call`], a command made through the pool whose outcome feeds the
//! connection's health.
//!
//! A multiplexed connection is already shared: clones of it pipeline their commands over one
//! socket. The pool keeps one per address and adds what the client lacks: a cap, one connect at a
//! time per address (I4), health (I9), backoff from a failing address (I12) and stats. See
//! `tests/redis.rs` for it against real `redis-server`s, one of them killed and restarted.
//!
//! [`http1`] holds the other kind of protocol, one request at a time per connection: HTTP/1.1
//! keep-alive through exclusive checkout ([`ConnectionPool::checkout`], several connections per
//! address), tested against nginx in `tests/nginx.rs` and measured in `examples/http1.rs`.
//!
//! ```no_run
//! # #[tokio::main] async fn main() {
//! use keyed_pool::ConnectionPool;
//! use keyed_pool_interop::{RedisConnector, call};
//! let pool = ConnectionPool::builder()
//!     .max_connections(16)
//!     .call_timeout(std::time::Duration::from_secs(1))
//!     .connector(RedisConnector)
//!     .build()
//!     .unwrap();
//! let addr = "127.0.0.1:6379";
//! call::<()>(&pool, addr, redis::cmd("SET").arg("greeting").arg("hello")).await.unwrap();
//! let value: String = call(&pool, addr, redis::cmd("GET").arg("greeting")).await.unwrap();
//! assert_eq!(value, "hello");
//! # }
//! ```

pub mod http1;
pub mod server;

use keyed_pool::{CallError, ConnectionPool, Connector};
use redis::aio::MultiplexedConnection;
use redis::{Client, Cmd, FromRedisValue, RedisError};

/// Connects a [`MultiplexedConnection`] to `redis://{addr}/` for the pool.
///
/// Bound commands with the pool's [`call_timeout`](keyed_pool::PoolConfig::call_timeout): a
/// command past it is dropped (the connection discards its late reply) and counts as a failure.
/// The client cannot tell whether its connection is still open, so `is_open` keeps its default
/// (`true`): [`call`] marks a connection closed when a command fails on it, and the pool then stops
/// handing it out (I8). Nor can it be closed while other clones live: a connection the pool lets
/// go closes when its last handle is dropped (the trait's default `close`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisConnector;

impl Connector for RedisConnector {
    type Conn = MultiplexedConnection;
    type Error = RedisError;

    async fn connect(&self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        let client = Client::open(format!("redis://{addr}/"))?;
        client.get_multiplexed_async_connection().await
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    async fn probe(&self, conn: &MultiplexedConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query_async(&mut conn.clone()).await
    }
}

/// `true` for an error that says the connection failed (I/O, a dropped or unusable connection),
/// not the command: a timeout, a reset, a refused or closed socket, a reply that could not be
/// parsed.
pub fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error()
}

/// Runs `cmd` on `addr` with [`ConnectionPool::call`], which gets or connects the connection and
/// records the outcome: a connection error ([`is_connection_error`]) or a command past the pool's
/// call timeout is a failure (I9), and a connection error other than a timeout also marks the
/// connection closed (I8); an error reply (`WRONGTYPE`...) or a reply
/// that does not fit `T` is a success: the server answered.
///
/// # Errors
/// [`CallError::Pool`] if no connection could be had, [`CallError::Call`] if the command failed,
/// [`CallError::TimedOut`] past the pool's call timeout.
///
/// # Cancel safety
/// Cancel safe: a dropped call is recorded as cancelled; the command may still reach the server.
pub async fn call<T: FromRedisValue + Send>(
    pool: &ConnectionPool<MultiplexedConnection, impl Connector<Conn = MultiplexedConnection>>,
    addr: impl AsRef<str>,
    cmd: &Cmd,
) -> Result<T, CallError<RedisError>> {
    pool.call(addr, |conn| async move {
        let result = cmd.query_async(&mut conn.client().clone()).await;
        if let Err(err) = &result
            && is_connection_error(err)
            && !err.is_timeout()
        {
            conn.mark_closed();
        }
        result
    })
    .failure_if(is_connection_error)
    .await
}
