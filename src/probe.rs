//! Liveness between uses: probing connections through the connector's
//! [`probe`](crate::Connector::probe), so a connection whose server died is found by the pool, not
//! by a caller (deadpool #191, hyper #2136; see `docs/DESIGN.md`, "Liveness between uses").
//!
//! One probe, three users: [`ConnectionPool::probe`] (on demand), [`ConnectionPool::probe_idle`]
//! (each round of the cleanup task, under [`PoolConfig::probe_idle`](crate::PoolConfig::probe_idle))
//! and the check before use of `get_or_connect` (under
//! [`PoolConfig::check_idle_before_use`](crate::PoolConfig::check_idle_before_use)).
//!
//! A probe is not a use: it never moves the idle clock, so a connection nobody uses is still
//! evicted as idle at `max_idle` however often it answers (I5, I6). While it runs it counts as a
//! call in flight, so no sweep evicts the connection under it (I5).

use std::sync::Arc;
use std::time::Duration;

use cheetah_string::CheetahString;
use tokio::time::Instant;

use crate::ConnectionPool;
use crate::connection::{PooledConnection, SharedMetrics};
use crate::connector::ManagesConnections;
use crate::error::PoolError;
use crate::metrics::ProbeEnd;

/// What one round of [`ConnectionPool::probe_idle`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProbeRound {
    /// Connections probed.
    pub probed: usize,
    /// Probes that failed (an error, the timeout, or a closed transport).
    pub failed: usize,
    /// Connections evicted because their probe failed (a failed probe's connection may have been
    /// removed or replaced meanwhile, so this can be below `failed`).
    pub evicted: usize,
}

/// A probe in flight on one connection: counted as a call in flight from creation, and recorded
/// as dropped if it ends without an outcome (a cancelled caller, a stopped cleanup task), so a
/// dropped probe leaks no in-flight count.
struct ProbeClaim {
    metrics: SharedMetrics,
    ended: bool,
}

impl ProbeClaim {
    fn new(metrics: SharedMetrics) -> Self {
        metrics.probe_started();
        Self {
            metrics,
            ended: false,
        }
    }

    fn end(mut self, end: ProbeEnd) {
        self.ended = true;
        self.metrics.probe_ended(Instant::now(), end);
    }
}

impl Drop for ProbeClaim {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.probe_ended(Instant::now(), ProbeEnd::Dropped);
        }
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// Checks `conn` now with the connector's [`probe`](crate::Connector::probe), bounded by
    /// [`probe_timeout`](crate::PoolConfig::probe_timeout) (by default the connect timeout), and
    /// records the outcome as a call on it, without moving its idle clock (a probe is not a use).
    ///
    /// A probe that fails or times out while the transport looks open means the server does not
    /// answer: the connection is judged unhealthy at once
    /// ([`UnhealthyReason::ProbeFailed`](crate::core::UnhealthyReason::ProbeFailed)), evicted, and
    /// its address backs off (I12). A probe that finds the transport closed marks the connection
    /// closed and evicts it as closed (which backs the address off only if the connection died
    /// young).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(60));
    /// pool.insert("10.0.0.1:1", 7);
    /// let conn = pool.get("10.0.0.1:1").unwrap();
    /// // A pool without a connector has nothing to ask: every probe succeeds.
    /// pool.probe(&conn).await.unwrap();
    /// assert_eq!(conn.metrics().success_count(), 1);
    /// assert!(conn.metrics().last_probed().is_some());
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`PoolError::Connect`] with the probe's error (or, for a closed transport, the reason),
    /// [`PoolError::ConnectTimeout`] if it did not answer in time.
    ///
    /// # Cancel safety
    /// Cancel safe: dropped part-way, nothing is recorded and the connection no longer counts the
    /// probe as in flight.
    pub async fn probe(&self, conn: &PooledConnection<C>) -> Result<(), PoolError> {
        let result = self.probe_recorded(conn).await;
        if result.is_err() {
            self.evict_probed(conn);
        }
        result
    }

    /// The probe and its record, without the eviction.
    async fn probe_recorded(&self, conn: &PooledConnection<C>) -> Result<(), PoolError> {
        self.probe_client(conn.client(), conn).await
    }

    /// The probe of `client`, recorded in the metrics of `conn` (the connection itself, or, for a
    /// checked-out connection, the handle that carries its id, address and metrics).
    pub(crate) async fn probe_client<T>(
        &self,
        client: &C,
        conn: &PooledConnection<T>,
    ) -> Result<(), PoolError>
    where
        T: Send + Sync + 'static,
    {
        let timeout = self.inner.config.effective_probe_timeout();
        let claim = ProbeClaim::new(conn.shared_metrics());
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, self.inner.connector.probe_conn(client)).await;
        let addr = conn.addr();
        // Asked after the probe: a probe that failed because the peer closed the transport is a
        // closed connection, not a silent server.
        let open = self.inner.connector.is_conn_open(client) && !conn.metrics().is_closed();
        let (end, result) = match answer {
            Ok(Ok(())) if open => (
                ProbeEnd::Answered(Instant::now().saturating_duration_since(started)),
                Ok(()),
            ),
            Ok(Ok(())) => (ProbeEnd::Closed, Err(closed(addr))),
            Ok(Err(cause)) => {
                let end = if open {
                    ProbeEnd::Silent
                } else {
                    ProbeEnd::Closed
                };
                let err = PoolError::Connect {
                    addr: addr.clone(),
                    cause,
                };
                (end, Err(err))
            }
            Err(_elapsed) => {
                let end = if open {
                    ProbeEnd::Silent
                } else {
                    ProbeEnd::Closed
                };
                (
                    end,
                    Err(PoolError::ConnectTimeout {
                        addr: addr.clone(),
                        timeout,
                    }),
                )
            }
        };
        claim.end(end);
        match &result {
            Ok(()) => tracing::trace!(addr = %addr, conn = %conn.id(), "probe answered"),
            Err(err) => {
                tracing::info!(addr = %addr, conn = %conn.id(), error = %err, "probe failed")
            }
        }
        result
    }

    /// Evicts `conn` if it is still pooled for its address and its probe left it unfit (I14): as
    /// unhealthy (backing the address off, I12) or as closed.
    fn evict_probed(&self, conn: &PooledConnection<C>) -> bool {
        let now = Instant::now();
        self.with_existing_slot(conn.addr(), |slot| {
            self.evict_unfit(slot, Some(conn.id()), now) > 0
        })
        .unwrap_or(false)
    }

    /// One probing round, as the cleanup task runs it when
    /// [`probe_idle`](crate::PoolConfig::probe_idle) is set (without it, does nothing): probes
    /// every pooled connection that is fit for use, has no call in flight, and has been neither
    /// used nor probed for longer than `probe_idle`, at most
    /// [`probe_concurrency`](crate::PoolConfig::probe_concurrency) at once, each bounded by the
    /// probe timeout, and evicts those whose probe failed (see [`probe`](Self::probe)). Another
    /// probe of a connection that answered waits until it has again been quiet for `probe_idle`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool = ConnectionPool::builder()
    ///     .max_idle(Duration::from_secs(300))
    ///     .probe_idle(Duration::from_secs(30))
    ///     .build::<u32>()
    ///     .unwrap();
    /// pool.insert("10.0.0.1:1", 1);
    /// assert_eq!(pool.probe_idle().await.probed, 0, "used just now");
    /// tokio::time::sleep(Duration::from_secs(31)).await;
    /// assert_eq!(pool.probe_idle().await.probed, 1);
    /// assert_eq!(pool.probe_idle().await.probed, 0, "probed just now");
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe: the probes run in the caller's task and are dropped with it; a dropped probe
    /// records nothing. Evictions already made stay made.
    pub async fn probe_idle(&self) -> ProbeRound {
        let Some(quiet) = self.inner.config.probe_idle else {
            return ProbeRound::default();
        };
        let now = Instant::now();
        let candidates = self
            .look(move |pool| pool.probe_candidates(now, quiet))
            .await;
        let probed = candidates.len();
        let concurrency = self.inner.config.probe_concurrency;
        let outcomes = crate::bounded::run_bounded(candidates, concurrency, |conn| async move {
            match self.probe_recorded(&conn).await {
                Ok(()) => (false, false),
                Err(_) => (true, self.evict_probed(&conn)),
            }
        })
        .await;
        let round = ProbeRound {
            probed,
            failed: outcomes.iter().filter(|(failed, _)| *failed).count(),
            evicted: outcomes.iter().filter(|(_, evicted)| *evicted).count(),
        };
        if round.failed > 0 {
            tracing::debug!(
                probed,
                failed = round.failed,
                evicted = round.evicted,
                "probing round"
            );
        }
        round
    }

    /// The connections due a probe at `now`, sorted by address (a seed replays the same).
    fn probe_candidates(&self, now: Instant, quiet: Duration) -> Vec<PooledConnection<C>> {
        let mut due: Vec<(CheetahString, PooledConnection<C>)> = self
            .inner
            .map
            .iter()
            .flat_map(|e| {
                let addr = e.key();
                e.value()
                    .shared()
                    .map(|p| &p.conn)
                    .filter(|conn| {
                        let m = conn.metrics();
                        m.in_flight() == 0 && m.since_last_checked(now) > quiet && self.usable(conn)
                    })
                    .map(|conn| (addr.clone(), conn.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        // By address, then by connection: a seed replays the same.
        due.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.id().cmp(&b.1.id())));
        due.into_iter().map(|(_, conn)| conn).collect()
    }

    /// The hit path of `get_or_connect` under
    /// [`check_idle_before_use`](crate::PoolConfig::check_idle_before_use): like
    /// [`get`](Self::get), but a connection neither used nor probed for longer than `quiet` is
    /// probed first, and evicted instead of handed out if the probe fails (`None`: connect).
    pub(crate) async fn get_checked(
        &self,
        addr: &str,
        quiet: Duration,
    ) -> Option<PooledConnection<C>> {
        let now = Instant::now();
        let conn = {
            let slot = self.inner.map.get(addr)?;
            let conn = self.least_loaded(slot.value())?;
            if conn.metrics().since_last_checked(now) <= quiet {
                // As `get`: touched under the shard's read lock (I7).
                conn.metrics().touch(now);
                return Some(conn.clone());
            }
            conn.clone()
        };
        // The map guard is gone: never held across an await.
        if self.probe(&conn).await.is_err() || !self.usable(&conn) {
            return None;
        }
        conn.metrics().touch(Instant::now());
        Some(conn)
    }
}

/// The error of a probe that found the transport closed.
fn closed(addr: &CheetahString) -> PoolError {
    PoolError::Connect {
        addr: addr.clone(),
        cause: Arc::new(crate::core::UnhealthyReason::Closed),
    }
}
