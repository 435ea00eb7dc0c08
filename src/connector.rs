//! The [`Connector`] trait: how the pool creates, checks and closes connections. Creation and
//! checking are the connector's; policy (when to connect, keep, evict, back off) is the pool's.

use std::future::Future;

use cheetah_string::CheetahString;

/// Creates, checks and closes connections of type `C` for the pool (in the spirit of bb8's
/// `ManageConnection` and deadpool's `Manager`).
///
/// Only [`connect`](Self::connect) is required. The pool calls
/// - [`validate`](Self::validate) before anything else, so a malformed address is refused with
///   [`PoolError::InvalidAddress`](crate::PoolError::InvalidAddress) without a connect attempt;
/// - [`is_open`](Self::is_open) on every `get` (keep it cheap: a flag read, no I/O);
/// - [`probe`](Self::probe) only when asked to check a connection actively;
/// - [`close`](Self::close) when it evicts a connection or is closed (keep it quick: signal, do not
///   wait).
///
/// `validate`, `is_open` and `close` may be called while the pool holds a shard lock of its map:
/// they must not call back into the pool (that could deadlock) and must not block.
pub trait Connector<C>: Send + Sync + 'static {
    /// The connector's error; shared by every caller that waited on the failed connect.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Opens a connection to `addr`. The pool bounds it with its connect timeout and may drop the
    /// future at any await point, so it must be cancel safe.
    fn connect(&self, addr: &CheetahString) -> impl Future<Output = Result<C, Self::Error>> + Send;

    /// Checks `addr` before any connect; an `Err` carries the reason it is malformed.
    fn validate(&self, addr: &CheetahString) -> Result<(), String> {
        let _ = addr;
        Ok(())
    }

    /// Cheap check that the transport is still open. A `false` keeps `get` from returning the
    /// connection (I8) and gets it evicted as closed.
    fn is_open(&self, conn: &C) -> bool {
        let _ = conn;
        true
    }

    /// An active check (a cheap request). The default does nothing and succeeds.
    fn probe(&self, conn: &C) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = conn;
        async { Ok(()) }
    }

    /// Closes a connection the pool has let go of. Other handles to it may still exist; after this
    /// their calls may fail. The default does nothing (the connection closes when its last handle
    /// is dropped).
    fn close(&self, conn: &C) {
        let _ = conn;
    }
}

/// The connector of a pool filled by hand with [`insert`](crate::ConnectionPool::insert), as the
/// original pool was: it cannot connect, every connection counts as open unless marked closed.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoConnector;

/// The error of [`NoConnector::connect`].
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("this pool has no connector: fill it with insert(), or build it with a connector")]
pub struct NoConnectorError;

impl<C: Send + Sync + 'static> Connector<C> for NoConnector {
    type Error = NoConnectorError;

    #[allow(clippy::manual_async_fn)]
    fn connect(
        &self,
        _addr: &CheetahString,
    ) -> impl Future<Output = Result<C, Self::Error>> + Send {
        async { Err(NoConnectorError) }
    }
}
