//! [`Slot`]: everything the pool keeps for one address, in one map entry, decided under that
//! entry's lock: the pooled connection with the capacity permit it holds, the connect in flight,
//! and the address's ejection state. There is no second map to keep in step, and no lock-order rule.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::connection::PooledConnection;
use crate::core::{Ejection, EjectionPolicy, Permit};
use crate::error::{Cause, PoolError};

/// A pooled connection and the capacity slot it holds. The permit is released only when the pool
/// retires the connection (after closing it, under the entry's lock) or hands it back unclosed.
pub(crate) struct Pooled<C> {
    pub(crate) conn: PooledConnection<C>,
    pub(crate) permit: Permit,
    /// The result channel of the connect that made this connection, while callers that waited on
    /// it may still be looking at it: such a connection is not taken to make room for another
    /// address before they have had it (each waiter holds its receiver until it has checked the
    /// connection and returned).
    pub(crate) handoff: Option<watch::Sender<FlightResult<C>>>,
}

pub(crate) type FlightResult<C> = Option<Result<PooledConnection<C>, PoolError>>;

/// A connect in flight for the address; its result is published once on the watch channel. The
/// permit it reserved travels with the connect task, not with this record.
pub(crate) struct Flight<C> {
    pub(crate) id: u64,
    /// When the connect gives up; every waiter's wait is bounded by it (I16).
    pub(crate) deadline: Instant,
    pub(crate) rx: watch::Receiver<FlightResult<C>>,
}

/// Everything the pool keeps for one address.
pub(crate) struct Slot<C> {
    /// One connection per address today; a later issue makes this several.
    pub(crate) conn: Option<Pooled<C>>,
    pub(crate) flight: Option<Flight<C>>,
    pub(crate) ejection: Ejection,
    /// The failure behind the current backoff, for [`PoolError::Backoff`].
    pub(crate) cause: Option<Cause>,
}

impl<C> Default for Slot<C> {
    fn default() -> Self {
        Self {
            conn: None,
            flight: None,
            ejection: Ejection::default(),
            cause: None,
        }
    }
}

impl<C> Pooled<C> {
    /// `true` while callers that waited for this connection's connect have not all had it.
    pub(crate) fn in_handoff(&self) -> bool {
        self.handoff
            .as_ref()
            .is_some_and(|tx| tx.receiver_count() > 0)
    }
}

impl<C> Slot<C> {
    /// `true` when the slot holds nothing worth keeping at `now` (offset since the pool's origin):
    /// no connection, no connect in flight, and an ejection state fully decayed (I18).
    pub(crate) fn is_vacant(&self, now: Duration, policy: &EjectionPolicy) -> bool {
        self.conn.is_none() && self.flight.is_none() && self.ejection.is_settled(now, policy)
    }
}
