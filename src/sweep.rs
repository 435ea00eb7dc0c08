//! Sweeps: idle eviction (I5–I7), health eviction (I8, I9, I12) and making room under
//! [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed).
//!
//! Each sweep first looks (under shard read locks, one shard at a time), then removes candidates one
//! by one through [`ConnectionPool::remove_if`], which re-checks the predicate under the shard's
//! write lock: a connection inserted, replaced or used after the look is never removed (I7).

use std::sync::Arc;

use cheetah_string::CheetahString;
use tokio::time::Instant;

use crate::ConnectionPool;
use crate::connection::ConnId;
use crate::connector::Connector;
use crate::core::UnhealthyReason;
use crate::metrics::EvictionReason;

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<C>,
{
    /// Evicts and closes every connection that is idle now: no call in flight and unused for longer
    /// than `max_idle` (I6). Never evicts a connection with a call in flight or used within
    /// `max_idle` (I5), nor one inserted or used after the sweep looked at it (I7). Returns how many
    /// it evicted.
    ///
    /// Cancel safety: each eviction is atomic; dropping the future part-way leaves the rest pooled.
    pub async fn evict_idle(&self) -> usize {
        let Some(max_idle) = self.inner.config.max_idle else {
            return 0;
        };
        let now = Instant::now();
        let mut candidates: Vec<(CheetahString, ConnId)> = self
            .inner
            .map
            .iter()
            .filter(|e| e.value().metrics().is_idle_at(now, Some(max_idle)))
            .map(|e| (e.key().clone(), e.value().id()))
            .collect();
        candidates.sort_unstable();
        candidates
            .into_iter()
            .filter(|(addr, id)| {
                self.remove_if(addr, *id, EvictionReason::Idle, |conn| {
                    conn.metrics().try_retire_idle(now, Some(max_idle))
                })
            })
            .count()
    }

    /// Evicts and closes every connection judged unhealthy (its failures tripped the health policy,
    /// I9) or whose transport is closed (`is_open` false or `mark_closed`, I8). An address whose
    /// connection was evicted as unhealthy backs off before the next connect (I12); a closed one
    /// does not (the next connect fails and backs off by itself if the server is really gone).
    /// Returns how many it evicted.
    pub async fn evict_unhealthy(&self) -> usize {
        let now = Instant::now();
        let mut candidates: Vec<(CheetahString, ConnId)> = self
            .inner
            .map
            .iter()
            .filter(|e| !self.usable(e.value()))
            .map(|e| (e.key().clone(), e.value().id()))
            .collect();
        candidates.sort_unstable();
        let mut evicted = 0;
        for (addr, id) in candidates {
            let mut why = None;
            let reason_of = |conn: &crate::PooledConnection<C>| {
                conn.metrics().unusable_reason(now).or_else(|| {
                    (!self.inner.connector.is_open(conn.client()))
                        .then_some(UnhealthyReason::Closed)
                })
            };
            let removed = self.inner.map.remove_if(&addr, |_, conn| {
                why = (conn.id() == id).then(|| reason_of(conn)).flatten();
                why.is_some()
            });
            let (Some((_, conn)), Some(why)) = (removed, why) else {
                continue;
            };
            self.inner.ledger.release();
            evicted += 1;
            if why == UnhealthyReason::Closed {
                self.inner.retire(&conn, EvictionReason::Closed);
            } else {
                tracing::info!(addr = %addr, conn = %id, cause = %why, "evicting unhealthy connection");
                self.inner.retire(&conn, EvictionReason::Unhealthy);
                self.record_backoff(&addr, Arc::new(why));
            }
        }
        evicted
    }

    /// Makes room for a connection to `except` by evicting the least-recently-used connection of
    /// another address that has no call in flight. Returns whether it freed a slot.
    pub(crate) fn evict_lru_except(&self, except: &CheetahString) -> bool {
        let mut candidates: Vec<(Instant, CheetahString, ConnId)> = self
            .inner
            .map
            .iter()
            .filter(|e| e.key() != except && e.value().metrics().in_flight() == 0)
            .map(|e| {
                (
                    e.value().metrics().last_used(),
                    e.key().clone(),
                    e.value().id(),
                )
            })
            .collect();
        candidates.sort_unstable();
        candidates.into_iter().take(8).any(|(_, addr, id)| {
            self.remove_if(&addr, id, EvictionReason::Manual, |conn| {
                conn.metrics().try_retire_unused()
            })
        })
    }
}
