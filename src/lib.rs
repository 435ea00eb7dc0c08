#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod bounded;
mod call;
mod checkout;
mod cleanup;
mod config;
mod connect;
mod connection;
mod connector;
pub mod core;
mod error;
mod events;
#[cfg(feature = "metrics")]
mod export;
mod metrics;
mod pool;
mod probe;
mod slot;
mod sweep;
mod sync;
mod warmup;
// tokio compiles `tokio::net` out under `cfg(loom)` (its own loom switch, which the `--cfg loom`
// of `scripts/loom.sh` also turns on), so the TCP connector is left out there. The loom tier
// checks the core and the metrics, which use no socket.
#[cfg(all(feature = "tcp", not(loom)))]
pub mod tcp;

pub use call::{Call, CallError, CallOutcome, CallTarget, EveryErrorFails, FromPool};
pub use checkout::{Checkout, CheckoutError};
pub use cheetah_string::CheetahString;
pub use config::{MAX_SHARDS, PoolConfig, WhenFull};
pub use connection::{CallGuard, ConnId, PooledConnection, SharedMetrics};
pub use connector::{Connector, ManagesConnections, NoConnector};
pub use error::{Cause, ConfigError, PoolError};
pub use events::PoolEvents;
#[cfg(feature = "metrics")]
pub use export::{DEFAULT_EXPORTED_ADDRESSES, describe_metrics};
pub use metrics::{
    AddressState, ConnectStats, ConnectionMetrics, ConnectionState, EvictionReason, EvictionStats,
    ExclusiveState, PoolStats,
};
pub use pool::{ConnectionPool, PoolBuilder};
pub use probe::ProbeRound;
pub use warmup::WarmUpReport;

/// Proof, in CI, that the madsim build really is one: `.ci/run` requires this test to have passed.
#[cfg(all(test, madsim))]
mod madsim_guard {
    #[test]
    fn built_with_cfg_madsim() {
        // Under madsim, the runtime's clock is the simulated one: a 1-hour sleep takes no real time.
        let real = std::time::Instant::now();
        madsim_tokio_sleep_an_hour();
        assert!(real.elapsed() < std::time::Duration::from_secs(60));
    }

    #[tokio::main(flavor = "current_thread")]
    async fn madsim_tokio_sleep_an_hour() {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
