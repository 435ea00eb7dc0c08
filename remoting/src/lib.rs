//! A RocketMQ remoting transport for [keyed-pool](keyed_pool): the frame [`codec`], a multiplexed
//! [`RemotingClient`], the pool's [`RemotingConnector`], and, with the `test-util` feature, a small
//! `server` for tests and demos.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyed_pool_remoting::CallError> {
//! use keyed_pool::ConnectionPool;
//! use keyed_pool_remoting::{pool_request, RemotingCommand, RemotingConnector};
//! use keyed_pool_remoting::codec::code;
//!
//! let pool = ConnectionPool::builder()
//!     .connector(RemotingConnector::default())
//!     .build()
//!     .expect("valid config");
//! let get = RemotingCommand::request(code::GET_KV_CONFIG)
//!     .with_field("namespace", "demo")
//!     .with_field("key", "greeting");
//! let response = pool_request(&pool, "127.0.0.1:9876", get).await?;   // connects on first use
//! println!("{:?}", response.field("value"));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
// tokio compiles `tokio::net` out under `cfg(loom)`; the loom tier of keyed-pool builds this crate
// (a dev-dependency of the demo) but checks only the pool's core, so the crate is empty there.
#![cfg(not(loom))]

pub mod client;
pub mod codec;
pub mod connector;
#[cfg(feature = "test-util")]
pub mod server;

pub use client::{ClientConfig, RemotingClient, RemotingError};
pub use codec::{CodecError, FrameDecoder, RemotingCommand};
pub use connector::{CallError, RemotingConnector, is_server_failure, pool_request};
#[cfg(feature = "test-util")]
pub use server::{MiniServer, ServerBehaviour, ServerStats};
