//! The background cleanup task and the pool's orderly ends: [`ConnectionPool::shutdown`] (stop the
//! cleanup tasks and wait for them) and [`ConnectionPool::close`] (refuse new work, stop the tasks,
//! close every connection). I17.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ConnectionPool;
use crate::connector::ManagesConnections;
use crate::metrics::EvictionReason;

/// Stop signal and bookkeeping of the cleanup tasks. Each task is started in the current
/// *generation*; [`ConnectionPool::shutdown`] moves to the next one, which stops every task of the
/// earlier ones, and waits until none of them runs.
pub(crate) struct CleanupControl {
    generation: watch::Sender<u64>,
    /// Generations of the tasks still running (few: usually one).
    running: Arc<watch::Sender<Vec<u64>>>,
}

impl CleanupControl {
    pub(crate) fn new() -> Self {
        Self {
            generation: watch::Sender::new(0),
            running: Arc::new(watch::Sender::new(Vec::new())),
        }
    }
}

/// Takes a task off the running list however it ends: finished, stopped, aborted or dropped with
/// its runtime.
struct RunningGuard {
    running: Arc<watch::Sender<Vec<u64>>>,
    generation: u64,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let generation = self.generation;
        self.running.send_modify(|gens| {
            if let Some(i) = gens.iter().position(|&g| g == generation) {
                gens.swap_remove(i);
            }
        });
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// Starts a task that runs [`evict_idle`](Self::evict_idle),
    /// [`evict_unhealthy`](Self::evict_unhealthy), [`probe_idle`](Self::probe_idle) (when
    /// [`PoolConfig::probe_idle`](crate::PoolConfig::probe_idle) is set) and
    /// [`prune_addresses`](Self::prune_addresses) every `interval` (so an idle connection is gone
    /// by `max_idle + interval`, I6, a dead one found by `probe_idle + interval + probe timeout`,
    /// and a settled address by one interval after it settles, I18). An interval under 1 ms is
    /// raised to 1 ms.
    ///
    /// The task holds only a weak reference between rounds: it ends when the last handle of the
    /// pool is dropped (after the round under way, which a probing round can stretch by up to one
    /// probe timeout), or on [`shutdown`](Self::shutdown) / [`close`](Self::close), which stop it
    /// at once and wait for it (I17).
    /// Aborting the returned handle stops it too. Must be called inside a runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::time::Duration;
    /// use keyed_pool::ConnectionPool;
    /// let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(10));
    /// pool.insert("a:1", 1);
    /// let task = pool.start_cleanup_task(Duration::from_secs(1));
    /// tokio::time::sleep(Duration::from_secs(12)).await;
    /// assert!(pool.is_empty(), "evicted as idle by the cleanup task");
    /// drop(pool);
    /// task.await.unwrap(); // ends once the pool is gone
    /// # }
    /// ```
    pub fn start_cleanup_task(&self, interval: Duration) -> JoinHandle<()> {
        let interval = if interval < Duration::from_millis(1) {
            tracing::warn!(?interval, "cleanup interval below 1 ms; using 1 ms");
            Duration::from_millis(1)
        } else {
            interval
        };
        let weak = Arc::downgrade(&self.inner);
        let control = &self.inner.cleanup;
        let mut stop = control.generation.subscribe();
        let generation = *stop.borrow_and_update();
        control.running.send_modify(|gens| gens.push(generation));
        let guard = RunningGuard {
            running: Arc::clone(&control.running),
            generation,
        };
        let closed = self.is_closed();
        tokio::spawn(async move {
            let _guard = guard;
            if closed {
                return;
            }
            tracing::debug!(?interval, "cleanup task started");
            loop {
                // `biased`: no random branch order (tokio draws it from an RNG madsim does not
                // seed, which would make a simulation seed replay differently), and a stop wins.
                tokio::select! {
                    biased;
                    // A new generation, or the pool dropped (the sender goes with it): stop.
                    _ = stop.wait_for(|g| *g != generation) => break,
                    _ = tokio::time::sleep(interval) => {}
                }
                let Some(inner) = weak.upgrade() else { break };
                let pool = ConnectionPool { inner };
                if pool.is_closed() {
                    break;
                }
                let idle = pool.evict_idle().await;
                let unhealthy = pool.evict_unhealthy().await;
                // After the idle sweep, so nothing about to be evicted as idle is probed. A
                // probing round waits on the network (up to one probe timeout): a stop ends it
                // at once, dropping the probes in flight (they record nothing).
                let probes = tokio::select! {
                    biased;
                    _ = stop.wait_for(|g| *g != generation) => break,
                    round = pool.probe_idle() => round,
                };
                let forgotten = pool.prune_addresses().await;
                #[cfg(feature = "metrics")]
                pool.export_metrics();
                if idle + unhealthy + forgotten + probes.evicted > 0 {
                    tracing::debug!(
                        idle,
                        unhealthy,
                        forgotten,
                        probed = probes.probed,
                        probe_evictions = probes.evicted,
                        "cleanup sweep"
                    );
                }
            }
            tracing::debug!("cleanup task stopped");
        })
    }

    /// Stops every cleanup task started so far and waits until they have ended. Connections stay
    /// pooled; a new cleanup task may be started afterwards.
    ///
    /// Cancel safety: the tasks are told to stop at the first poll; dropping the future only stops
    /// the waiting.
    pub async fn shutdown(&self) {
        let control = &self.inner.cleanup;
        let mut ended = 0;
        control.generation.send_modify(|g| {
            ended = *g;
            *g += 1;
        });
        let mut running = control.running.subscribe();
        // The sender lives in `self`, so this cannot fail; either way nothing is left to wait for.
        let _ = running
            .wait_for(|gens| gens.iter().all(|&g| g > ended))
            .await;
    }

    /// Closes the pool, as a cut (I17): from its first poll every operation returns
    /// [`PoolError::Closed`](crate::PoolError::Closed) (or `None`/`false`), connects in flight stop
    /// and close what they made, the cleanup tasks stop; once it returns, nothing is pooled and every
    /// connection the pool made has been closed through the connector (except those handed back
    /// by [`remove`](Self::remove), which are the caller's). A caller racing it gets `Closed` or a
    /// connection that the close then closes. Idempotent.
    ///
    /// # Cancel safety
    /// The pool is closed from the first poll; dropping the future part-way may leave connections
    /// to close: call `close` again (or drop the pool) to finish.
    pub async fn close(&self) {
        // SeqCst: every operation checks the flag under its address's entry lock; the sweep below
        // takes each of those locks after this store.
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.closing.send_replace(true);
        self.shutdown().await;
        // Connect tasks see `closing` at once; wait until each has retired its flight, closing
        // the connection it may have made.
        let flights: Vec<_> = self
            .inner
            .map
            .iter()
            .filter_map(|e| e.value().flight().map(|f| f.rx.clone()))
            .collect();
        for mut rx in flights {
            // Err: the task ended without publishing (its runtime shut down); nothing to wait for.
            let _ = rx.wait_for(Option::is_some).await;
        }
        let now = tokio::time::Instant::now();
        self.inner.map.retain(|_, slot| {
            for pooled in slot.take_all_shared() {
                self.inner
                    .retire(slot, pooled, EvictionReason::Manual, None, now);
            }
            // Checkouts in line get `Closed`, idle exclusive connections are closed; those
            // checked out are closed when they come back (they find no line).
            self.close_exclusive(slot);
            false
        });
        // Exclusive connects: each either started before the sweep took its address's lock (and
        // is counted here) or saw the flag. Each stops at `closing` and closes what it made.
        let mut connects = self.inner.ex_connects.subscribe();
        let _ = connects.wait_for(|n| *n == 0).await;
        tracing::debug!("pool closed");
    }
}
