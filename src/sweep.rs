//! Sweeps: idle eviction (I5–I7), health eviction (I8, I9, I12) and making room under
//! [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed).
//!
//! Each sweep first looks (under shard read locks, one shard at a time), then removes candidates one
//! by one, re-checking each under its shard's write lock: a connection inserted, replaced or used
//! after the look is never removed (I7).
//!
//! A sweep gives its runtime thread back as it goes (issue 16: at most ~1 ms at a time at 100,000
//! connections): the remove phase yields every [`SWEEP_CHUNK`] candidates, and the look of a map
//! larger than [`LOOK_INLINE_MAX`] (also the probing round's, in `src/probe.rs`) runs on the
//! runtime's blocking pool (see [`ConnectionPool::look`]).

use std::time::Duration;

use cheetah_string::CheetahString;
use dashmap::mapref::multiple::RefMulti;
use tokio::time::Instant;

use crate::connection::ConnId;
use crate::connector::ManagesConnections;
use crate::metrics::{ConnectionMetrics, EvictionReason, MarkFolds, SweepInstant};

/// Evictions a sweep makes before it yields to the other tasks of its runtime thread: a sweep of a
/// very large pool must not hold the thread for its whole length (tens of ms at 100,000
/// connections). Each eviction is atomic on its own, so yielding between them is safe.
const SWEEP_CHUNK: usize = 256;

/// The most addresses a sweep looks at on its own task; a larger map is looked at on the runtime's
/// blocking pool. A look costs 20–60 ns per address (the floor, iterating the map and touching each
/// entry, is ~25 ns), so this bounds the inline look to about 0.1–0.25 ms.
const LOOK_INLINE_MAX: usize = 4096;

/// Candidates in the order of their connections' ids: an order that does not depend on the map's
/// hasher (so a simulation seed replays exactly, see docs/DESIGN.md) and is cheap to sort (a `u64`
/// each; sorting 100,000 addresses as strings was half of a sweep's instructions).
///
/// Ids are handed out in sequence, so a large sweep's candidates usually fill most of the range
/// between their least and greatest id: then each is placed at its id's offset in one pass, no
/// comparison sort (which was still 313 instructions per candidate at 100,000, a sixth of a sweep
/// that evicts all). A sparse or small set is sorted as before. Same order either way.
fn by_id(mut candidates: Vec<(CheetahString, ConnId)>) -> Vec<(CheetahString, ConnId)> {
    /// Below this many, a comparison sort is as cheap as the placement's extra pass.
    const PLACE_MIN: usize = 64;
    /// Placement allocates 4 bytes per id in the range: at most this many per candidate.
    const SPAN_PER_CANDIDATE: u64 = 4;
    let n = candidates.len();
    let span = candidates
        .iter()
        .map(|&(_, id)| id)
        .fold(None, |range: Option<(ConnId, ConnId)>, id| {
            Some(range.map_or((id, id), |(lo, hi)| (lo.min(id), hi.max(id))))
        })
        .map(|(lo, hi)| (lo, hi.0 - lo.0));
    let dense = span.filter(|&(_, width)| {
        n >= PLACE_MIN
            && u32::try_from(n).is_ok()
            && width < SPAN_PER_CANDIDATE.saturating_mul(n as u64)
    });
    let Some((lo, width)) = dense else {
        candidates.sort_unstable_by_key(|&(_, id)| id);
        return candidates;
    };
    // `at[id - lo]` is the index of the candidate with that id, or `u32::MAX` for none.
    let Ok(width) = usize::try_from(width) else {
        candidates.sort_unstable_by_key(|&(_, id)| id);
        return candidates;
    };
    let mut at = vec![u32::MAX; width + 1];
    for (i, &(_, id)) in candidates.iter().enumerate() {
        let place = &mut at[(id.0 - lo.0) as usize];
        if *place != u32::MAX {
            // Two candidates with one id cannot come from one look (ids are unique in a pool),
            // but sorting keeps both rather than losing one.
            candidates.sort_unstable_by_key(|&(_, id)| id);
            return candidates;
        }
        *place = i as u32;
    }
    at.into_iter()
        .filter(|&i| i != u32::MAX)
        .map(|i| {
            std::mem::replace(
                &mut candidates[i as usize],
                (CheetahString::empty(), ConnId(0)),
            )
        })
        .collect()
}

/// The metrics of the connection a map entry holds, if it holds one: how [`MarkFolds`] reaches
/// the connections whose entries it keeps.
fn entry_metrics<'a, C>(
    e: &'a RefMulti<'_, CheetahString, Slot<C>>,
) -> Option<&'a ConnectionMetrics> {
    Some(e.value().conn.as_ref()?.conn.metrics())
}

/// The remove phase of a sweep, `SWEEP_CHUNK` candidates at a time with a yield between chunks.
async fn in_chunks<T>(candidates: &[T], mut evict: impl FnMut(&[T]) -> usize) -> usize {
    let mut evicted = 0;
    for (i, chunk) in candidates.chunks(SWEEP_CHUNK).enumerate() {
        if i > 0 {
            tokio::task::yield_now().await;
        }
        evicted += evict(chunk);
    }
    evicted
}
use crate::ConnectionPool;
use crate::core::Permit;
use crate::slot::Slot;

/// What one attempt at making room found.
pub(crate) enum LruTake {
    /// A victim was closed; its slot is the caller's.
    Taken(Permit),
    /// The candidates changed under the attempt, or room appeared: look again.
    Raced,
    /// Nothing can be evicted: every other connection has a call in flight or is being handed out.
    Nothing,
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: ManagesConnections<C>,
{
    /// Evicts and closes every connection that is idle now: no call in flight and unused for longer
    /// than `max_idle` (I6). Never evicts a connection with a call in flight or used within
    /// `max_idle` (I5), nor one inserted or used after the sweep looked at it (I7). Returns how many
    /// it evicted.
    ///
    /// On a large pool it gives its runtime thread back as it goes: it looks at more than 4,096
    /// addresses on the runtime's blocking pool, and yields every 256 evictions.
    ///
    /// # Cancel safety
    /// Each eviction is atomic; dropping the future part-way leaves the rest pooled.
    pub async fn evict_idle(&self) -> usize {
        let now = Instant::now();
        let candidates = self.look(move |pool| pool.idle_candidates(now)).await;
        in_chunks(&candidates, |chunk| self.evict_idle_candidates(now, chunk)).await
            + self.sweep_exclusive(now, true)
    }

    /// Runs a sweep's look phase (a pass over the whole map under shard read locks, then a sort):
    /// on the calling task for a map of up to [`LOOK_INLINE_MAX`] addresses, and for a larger one
    /// on the runtime's blocking pool, so that the sweep gives its runtime thread back meanwhile
    /// (4–12 ms at 100,000 connections, measured in `benches/benches/sweeps.rs`). Under madsim the
    /// blocking pool is a task of the simulation like any other.
    ///
    /// Why not in chunks with a yield between them, like the remove phase: dashmap 6 offers no
    /// iteration of one shard, or from a position, without its `raw-api` feature, whose shard
    /// tables iterate only through `unsafe`; and a pass cannot pause at an `.await` without holding
    /// a shard lock across it (which could deadlock a writer on the same thread).
    ///
    /// A sweep dropped while its look runs on the blocking pool leaves the look to finish and drop
    /// its result (it only reads); the pool lives until then.
    pub(crate) async fn look<T, F>(&self, look: F) -> T
    where
        F: Fn(&Self) -> T + Clone + Send + 'static,
        T: Send + 'static,
    {
        // Outside a runtime (a sweep polled by another executor) there is no blocking pool:
        // look here, as before issue 16.
        if self.inner.map.len() <= LOOK_INLINE_MAX || tokio::runtime::Handle::try_current().is_err()
        {
            return look(self);
        }
        let pool = self.clone();
        let elsewhere = look.clone();
        // madsim marks its `spawn_blocking` deprecated (a simulation has no blocking threads); it
        // spawns the closure as an ordinary task of the simulation, which is what a sweep wants
        // there: the look stays one step of the seeded schedule.
        #[allow(deprecated)]
        let handle = tokio::task::spawn_blocking(move || elsewhere(&pool));
        match handle.await {
            Ok(found) => found,
            // The runtime is shutting down and refused the blocking task: look here instead.
            Err(e) if e.is_cancelled() => look(self),
            Err(e) => panic!("a sweep's look phase panicked: {e}"),
        }
    }

    /// The look phase of an idle sweep: `(addr, id)` of the connections idle at `now`, sorted.
    pub(crate) fn idle_candidates(&self, now: Instant) -> Vec<(CheetahString, ConnId)> {
        let Some(max_idle) = self.inner.config.max_idle else {
            return Vec::new();
        };
        // A connection marked used by a `get` is not idle at `now`: its mark is taken here and
        // folded into its clock with its chunk's, at one clock reading (see `MarkFolds`), while
        // the entry, held in `folds`, keeps its shard read-locked until then.
        let mut folds = MarkFolds::new(now, entry_metrics::<C>);
        let at = SweepInstant::new(&self.inner.conns, now);
        let mut candidates = Vec::new();
        for e in self.inner.map.iter() {
            // The further shared connections of an address (issue 13): few, so each folds its
            // own mark here, under this shard's read lock, as `MarkFolds` does for the first.
            // Judged before `folds.take`, which keeps the entry (and skips the rest of this pass
            // over it) when the first connection has a mark: judged after, the others of an
            // address whose first was just used were never evicted (I6; found by the model).
            for pooled in e.value().more() {
                if pooled.conn.metrics().is_idle_at(now, Some(max_idle)) {
                    candidates.push((e.key().clone(), pooled.conn.id()));
                }
            }
            let Some(e) = folds.take(e) else { continue };
            let Some(pooled) = e.value().conn.as_ref() else {
                continue;
            };
            if pooled.conn.metrics().seems_idle_at_sweep(&at, max_idle) {
                candidates.push((e.key().clone(), pooled.conn.id()));
            }
        }
        folds.fold();
        by_id(candidates)
    }

    /// The remove phase: each candidate goes only if it is still the same connection and, claimed
    /// against calls starting, still idle at `now` (I5, I7).
    pub(crate) fn evict_idle_candidates(
        &self,
        now: Instant,
        candidates: &[(CheetahString, ConnId)],
    ) -> usize {
        let Some(max_idle) = self.inner.config.max_idle else {
            return 0;
        };
        let sweep = SweepInstant::new(&self.inner.conns, now);
        let at = Instant::now();
        let vacant_at = self.inner.offset(at);
        candidates
            .iter()
            .filter(|(addr, id)| {
                self.evict_candidate(addr, *id, vacant_at, |slot| {
                    let Some(pooled) = slot.take_shared_if(*id, |pooled| {
                        pooled
                            .conn
                            .metrics()
                            .try_retire_idle_sweep(&sweep, max_idle)
                    }) else {
                        return false;
                    };
                    self.inner
                        .retire(slot, pooled, EvictionReason::Idle, None, at);
                    true
                })
            })
            .count()
    }

    /// Runs `evict` on the slot of `(addr, id)` under its entry's write lock if it still holds that
    /// connection (I7, I14), and removes the slot if it is left vacant (I18). Returns what `evict`
    /// returned, or `false` when the connection is gone or was replaced.
    ///
    /// One hash and one lock per candidate, and no copy of the key; `vacant_at` is the sweep's
    /// clock as the core's offset, read once per chunk of candidates instead of twice per eviction.
    fn evict_candidate(
        &self,
        addr: &CheetahString,
        id: ConnId,
        vacant_at: Duration,
        evict: impl FnOnce(&mut Slot<C>) -> bool,
    ) -> bool {
        let policy = &self.inner.config.ejection;
        let mut evicted = false;
        // The removed slot (if any) is dropped here, after the lock: it holds no connection and no
        // permit any more (`retire` closed the one and dropped the other under the lock).
        self.inner.map.remove_if_mut(addr, |_, slot| {
            if slot.holds_shared(id) {
                evicted = evict(slot);
            }
            evicted && slot.is_vacant(vacant_at, policy)
        });
        evicted
    }

    /// Evicts and closes every connection judged unhealthy (its failures tripped the health policy,
    /// I9) or whose transport is closed (`is_open` false or `mark_closed`, I8). An address whose
    /// connection was evicted as unhealthy, or closed younger than
    /// [`EjectionPolicy::short_lived`](crate::core::EjectionPolicy::short_lived), backs off before
    /// the next connect (I12). Returns how many it evicted. Gives its runtime thread back as it goes,
    /// like [`evict_idle`](Self::evict_idle).
    ///
    /// # Cancel safety
    /// Each eviction is atomic; dropping the future part-way leaves the rest pooled.
    pub async fn evict_unhealthy(&self) -> usize {
        let now = Instant::now();
        let candidates = self.look(Self::unhealthy_candidates).await;
        in_chunks(&candidates, |chunk| {
            self.evict_unhealthy_candidates(now, chunk)
        })
        .await
            + self.sweep_exclusive(now, false)
    }

    /// The look phase of a health sweep: `(addr, id)` of the connections not fit for use, sorted.
    pub(crate) fn unhealthy_candidates(&self) -> Vec<(CheetahString, ConnId)> {
        // Pushed straight into one list: collecting each entry's into a `Vec` of its own first
        // (the entry's guard cannot outlive `flat_map`'s closure) was an allocation per unfit
        // connection.
        let mut candidates = Vec::new();
        for e in self.inner.map.iter() {
            for p in e.value().shared() {
                if !self.usable(&p.conn) {
                    candidates.push((e.key().clone(), p.conn.id()));
                }
            }
        }
        by_id(candidates)
    }

    /// The remove phase: each candidate goes only if it is still the same connection and still
    /// unfit, re-checked under the shard's write lock (I7, I14).
    pub(crate) fn evict_unhealthy_candidates(
        &self,
        now: Instant,
        candidates: &[(CheetahString, ConnId)],
    ) -> usize {
        let vacant_at = self.inner.offset(now);
        candidates
            .iter()
            .filter(|(addr, id)| {
                self.evict_candidate(addr, *id, vacant_at, |slot| {
                    self.evict_unfit(slot, Some(*id), now) > 0
                })
            })
            .count()
    }

    /// Makes room for a connection to `except`: closes the least-recently-used connection of another
    /// address that nobody holds, and hands its capacity slot over to the caller (so no racer
    /// takes the freed slot first): an idle exclusive connection (issue 13), or, if `shared_too`, a
    /// shared one with no call in flight that is not being handed to the callers that waited for
    /// its connect. A victim is taken only while the pool is still full, checked under the
    /// victim's entry lock. Called with the pool's room lock held (see [`Inner::room`]).
    pub(crate) fn take_lru_permit(&self, except: &CheetahString, shared_too: bool) -> LruTake {
        let max = self.inner.ledger.max();
        // Least recently used first: connections with no `get` since the last fold (their clock
        // is exact; an idle exclusive connection's return time is exact too), then by the clock.
        // A `get`'s mark sorts as newer than any clock. The last field says which kind it is.
        let mut candidates: Vec<(bool, Instant, CheetahString, ConnId, bool)> = Vec::new();
        for e in self.inner.map.iter().filter(|e| e.key() != except) {
            let slot = e.value();
            if let Some((id, at)) = slot.exclusive().and_then(|ex| ex.least_recently_used()) {
                candidates.push((false, self.inner.instant_at(at), e.key().clone(), id, true));
            }
            if !shared_too {
                continue;
            }
            for pooled in slot.shared() {
                let m = pooled.conn.metrics();
                if m.in_flight() == 0 && !pooled.in_handoff() {
                    candidates.push((
                        m.pending_use(),
                        m.last_used(),
                        e.key().clone(),
                        pooled.conn.id(),
                        false,
                    ));
                }
            }
        }
        if candidates.is_empty() {
            // Nothing to evict, unless room appeared since the caller found the pool full.
            return if self.inner.ledger.used() < max {
                LruTake::Raced
            } else {
                LruTake::Nothing
            };
        }
        candidates.sort_unstable();
        for (_, _, addr, id, exclusive) in candidates.into_iter().take(8) {
            let taken = self.with_existing_slot(&addr, |slot| {
                if self.inner.ledger.used() < max {
                    return None;
                }
                if exclusive {
                    return self.take_idle_exclusive_for_room(slot, id);
                }
                let pooled = slot.take_shared_if(id, |pooled| {
                    !pooled.in_handoff() && pooled.conn.metrics().try_retire_unused()
                })?;
                Some(self.inner.retire_for_room(pooled))
            });
            if let Some(Some(permit)) = taken {
                return LruTake::Taken(permit);
            }
            if self.inner.ledger.used() < max {
                return LruTake::Raced; // room appeared meanwhile
            }
        }
        LruTake::Raced
    }

    /// Forgets the addresses that hold nothing any more: no connection, no connect in flight, and
    /// an ejection count decayed to zero (I18). The cleanup task runs it every round; addresses
    /// whose state empties during an operation leave at once without it. Also lets go of the
    /// result channels of connects whose waiters have all had their connection, and of the
    /// backoff state of addresses that keep a connection once that state has decayed (I18).
    /// Returns how many
    /// addresses it forgot. Gives its runtime thread back as it goes, like
    /// [`evict_idle`](Self::evict_idle).
    ///
    /// # Cancel safety
    /// Each removal is atomic; dropping the future part-way leaves the rest for the next sweep.
    pub async fn prune_addresses(&self) -> usize {
        let now = self.inner.offset(Instant::now());
        let policy = self.inner.config.ejection;
        let (vacant, to_tidy) = self
            .look(move |pool| {
                let mut vacant = Vec::new();
                let mut to_tidy = Vec::new();
                for e in pool.inner.map.iter() {
                    let slot = e.value();
                    if slot.is_vacant(now, &policy) {
                        vacant.push(e.key().clone());
                    } else if slot.needs_tidy(now, &policy)
                        || slot
                            .shared()
                            .any(|p| p.handoff.is_some() && !p.in_handoff())
                    {
                        to_tidy.push(e.key().clone());
                    }
                }
                vacant.sort_unstable();
                to_tidy.sort_unstable();
                (vacant, to_tidy)
            })
            .await;
        in_chunks(&to_tidy, |chunk| {
            for addr in chunk {
                if let Some(mut slot) = self.inner.map.get_mut(addr) {
                    slot.tidy(now, &policy);
                    slot.for_each_shared_mut(|pooled| {
                        if !pooled.in_handoff() {
                            pooled.handoff = None;
                        }
                    });
                }
            }
            0
        })
        .await;
        in_chunks(&vacant, |chunk| {
            chunk
                .iter()
                .filter(|addr| {
                    self.inner
                        .map
                        .remove_if(*addr, |_, slot| slot.is_vacant(now, &policy))
                        .is_some()
                })
                .count()
        })
        .await
    }
}

/// I7 at the seam: a sweep's look phase, then the world changes, then its removal phase.
// Not under loom: the tests start a runtime with tokio's I/O driver, which tokio refuses under
// `cfg(loom)`, and the pool's metrics use loom's atomics, which exist only inside `loom::model`.
#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::ConnectionPool;

    const MAX_IDLE: Duration = Duration::from_secs(10);

    fn addr(i: u8) -> cheetah_string::CheetahString {
        format!("10.0.0.{i}:1").into()
    }

    /// The sweep's idle predicate, compared in the clock's nanoseconds at one instant per sweep,
    /// agrees with the general one at every instant around the edge (I5: not idle at exactly
    /// `max_idle`; I6: idle 1 ns later), for a connection of the pool and for one counting from
    /// another origin (judged the general way), marked or not, with a call in flight or not.
    #[test]
    fn i5_i6_sweep_instant_agrees_with_the_idle_predicate() {
        use crate::metrics::{ConnectionMetrics, PoolShared, SweepInstant};
        let origin = Instant::now();
        let shared = std::sync::Arc::new(PoolShared::for_pool(
            origin,
            crate::core::HealthPolicy::default(),
            None,
            None,
        ));
        let born = origin + Duration::from_millis(5);
        let ours = ConnectionMetrics::in_pool(&shared, born);
        let foreign = ConnectionMetrics::new(born, crate::core::HealthPolicy::default());
        for m in [&ours, &foreign] {
            m.touch(born + Duration::from_secs(1));
        }
        let edge = born + Duration::from_secs(1) + MAX_IDLE;
        let instants = [
            origin,
            born,
            edge - Duration::from_nanos(1),
            edge,
            edge + Duration::from_nanos(1),
            edge + Duration::from_secs(3600),
        ];
        for (name, m) in [("pool's", &ours), ("foreign", &foreign)] {
            for now in instants {
                let at = SweepInstant::new(&shared, now);
                assert_eq!(
                    m.seems_idle_at_sweep(&at, MAX_IDLE),
                    m.seems_idle_at(now, Some(MAX_IDLE)),
                    "I5/I6 violated: the sweep's predicate differs for the {name} connection at {:?} past its edge",
                    now.checked_duration_since(edge)
                );
            }
            let at = SweepInstant::new(&shared, edge);
            assert!(
                !m.seems_idle_at_sweep(&at, MAX_IDLE),
                "I5 violated at max_idle"
            );
            let after = SweepInstant::new(&shared, edge + Duration::from_nanos(1));
            assert!(
                m.seems_idle_at_sweep(&after, MAX_IDLE),
                "I6 violated 1 ns past max_idle"
            );
            m.mark_used();
            assert!(
                !m.seems_idle_at_sweep(&after, MAX_IDLE),
                "I5 violated: a marked connection seemed idle"
            );
            assert!(
                !m.try_retire_idle_sweep(&after, MAX_IDLE),
                "I5 violated: the mark folds at the sweep's instant or later"
            );
        }
    }

    /// The candidates' order (by id, so a seed replays) is the same whether `by_id` places them
    /// by id (a dense range) or sorts them (sparse, small, or an id twice), and nothing is lost.
    #[test]
    fn by_id_orders_like_a_sort_dense_or_sparse() {
        use crate::connection::ConnId;
        let cases: Vec<Vec<u64>> = vec![
            vec![],
            vec![7],
            (1..=50).rev().collect(), // small: sorted
            (0..1000).map(|i| (i * 7919) % 1000 + 5).collect(), // dense, shuffled: placed
            (0..1000).map(|i| ((i * 7919) % 1000) * 3).collect(), // gaps within 4x: placed
            (0..1000).map(|i| ((i * 7919) % 1000) * 10).collect(), // sparse: sorted
            (0..500).chain(0..500).collect(), // an id twice: sorted, both kept
            vec![u64::MAX, 0, u64::MAX - 1, 1], // the widest range: no overflow
        ];
        for ids in cases {
            let candidates: Vec<_> = ids
                .iter()
                .map(|&id| {
                    (
                        cheetah_string::CheetahString::from(format!("a{id}")),
                        ConnId(id),
                    )
                })
                .collect();
            let mut want = candidates.clone();
            want.sort_by_key(|&(_, id)| id);
            let got = super::by_id(candidates);
            assert_eq!(
                got.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
                want.iter().map(|(_, id)| *id).collect::<Vec<_>>(),
                "the sweep's order is not by id for {} candidates",
                ids.len()
            );
            for (addr, id) in &got {
                assert_eq!(
                    addr.as_str(),
                    format!("a{}", id.0),
                    "a candidate lost its address"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn i7_idle_sweep_never_removes_what_was_used_or_replaced_after_it_looked() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        for i in 0..3 {
            pool.insert(addr(i), u32::from(i));
        }
        tokio::time::sleep(MAX_IDLE + Duration::from_millis(1)).await;
        let now = Instant::now();
        let looked = pool.idle_candidates(now);
        assert_eq!(looked.len(), 3, "all three are idle when the sweep looks");
        // After the look: addr(0) is used, addr(1) is replaced, addr(2) is left alone.
        pool.get(addr(0)).unwrap();
        pool.insert(addr(1), 100);
        let removed = pool.evict_idle_candidates(now, &looked);
        assert_eq!(
            removed, 1,
            "I7 violated: the sweep removed a connection used or replaced after it looked"
        );
        assert!(
            pool.peek(addr(0)).is_some(),
            "I7 violated: used after the look, yet evicted"
        );
        assert_eq!(
            pool.peek(addr(1)).map(|c| *c.client()),
            Some(100),
            "I7/I14 violated: the replacement was evicted"
        );
        assert!(pool.peek(addr(2)).is_none());
    }

    /// The exact edge, with explicit instants: at `last_used + max_idle` a connection is still
    /// fresh (I5); one microsecond later it is idle and the sweep takes it (I6). A call moves the
    /// clock exactly (a bare `get` only marks it: `i5_i6_a_get_is_folded_in_by_the_sweep`).
    #[tokio::test(start_paused = true)]
    async fn i5_i6_idle_edge_is_exactly_max_idle() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        pool.insert(addr(0), 0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let conn = pool.peek(addr(0)).unwrap();
        conn.begin().success();
        let last_used = conn.metrics().last_used();
        assert_eq!(last_used, Instant::now(), "a call moves the clock exactly");
        let edge = last_used + MAX_IDLE;
        assert!(
            pool.idle_candidates(edge).is_empty(),
            "I5 violated at exactly max_idle"
        );
        let after = edge + Duration::from_micros(1);
        let looked = pool.idle_candidates(after);
        assert_eq!(
            looked.len(),
            1,
            "I6 violated: idle 1 µs past max_idle not seen"
        );
        assert_eq!(
            pool.evict_idle_candidates(edge, &looked),
            0,
            "I5: re-check at the edge"
        );
        assert_eq!(pool.evict_idle_candidates(after, &looked), 1, "I6 violated");
    }

    /// A bare `get` reads no clock: it marks the connection, and the sweep folds the mark in at
    /// its own instant. Never early (I5): a sweep at any instant after the `get` keeps it. Late by
    /// at most the time to that fold (I6's `max_idle + 2 × interval`): idle `max_idle` after it.
    #[tokio::test(start_paused = true)]
    async fn i5_i6_a_get_is_folded_in_by_the_sweep() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        pool.insert(addr(0), 0);
        tokio::time::sleep(MAX_IDLE).await;
        let conn = pool.get(addr(0)).unwrap();
        let created = conn.metrics().created_at();
        assert!(conn.metrics().pending_use(), "get marks the connection");
        assert_eq!(conn.metrics().last_used(), created, "and reads no clock");
        // The sweep looks long after the get (say the cleanup task's interval later).
        let sweep = Instant::now() + 3 * MAX_IDLE;
        assert!(
            pool.idle_candidates(sweep).is_empty(),
            "I5 violated: a get's mark was not counted as a use"
        );
        assert!(!conn.metrics().pending_use(), "the sweep folded the mark");
        assert_eq!(conn.metrics().last_used(), sweep, "at the sweep's instant");
        let edge = sweep + MAX_IDLE;
        assert!(
            pool.idle_candidates(edge).is_empty(),
            "I5 violated at the edge"
        );
        let after = edge + Duration::from_nanos(1);
        let looked = pool.idle_candidates(after);
        assert_eq!(looked.len(), 1, "I6 violated: idle past the folded edge");
        assert_eq!(pool.evict_idle_candidates(after, &looked), 1, "I6 violated");
    }

    /// The remove phase folds too: a `get` between the look and the removal keeps the connection
    /// even when the sweep's instant is older than the clock (I7), and the fold is at the clock's
    /// instant then, not the sweep's older one, so the `get` is never taken for an older use (I5).
    #[tokio::test(start_paused = true)]
    async fn i7_a_get_after_the_look_is_folded_at_no_earlier_instant() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        pool.insert(addr(0), 0);
        tokio::time::sleep(MAX_IDLE * 2).await;
        let looked_at = Instant::now();
        let looked = pool.idle_candidates(looked_at);
        assert_eq!(looked.len(), 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let conn = pool.get(addr(0)).unwrap();
        assert_eq!(
            pool.evict_idle_candidates(looked_at, &looked),
            0,
            "I7 violated: used after the look, yet evicted"
        );
        assert_eq!(
            conn.metrics().last_used(),
            Instant::now(),
            "I5: the get was folded in at the clock read after the mark, not the sweep's instant"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn i7_idle_sweep_never_removes_a_connection_whose_call_began_after_it_looked() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        pool.insert(addr(0), 0);
        let held = pool.peek(addr(0)).unwrap();
        tokio::time::sleep(MAX_IDLE * 2).await;
        let now = Instant::now();
        let looked = pool.idle_candidates(now);
        let call = held.begin();
        assert_eq!(
            pool.evict_idle_candidates(now, &looked),
            0,
            "I5/I7 violated"
        );
        call.success();
    }

    #[tokio::test(start_paused = true)]
    async fn i7_health_sweep_never_removes_a_replacement() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
        pool.insert(addr(0), 0);
        pool.insert(addr(1), 1);
        pool.peek(addr(0)).unwrap().mark_closed();
        pool.peek(addr(1)).unwrap().mark_closed();
        let looked = pool.unhealthy_candidates();
        assert_eq!(looked.len(), 2);
        pool.insert(addr(0), 100);
        let removed = pool.evict_unhealthy_candidates(Instant::now(), &looked);
        assert_eq!(removed, 1, "I7 violated: a healthy replacement was removed");
        assert_eq!(pool.peek(addr(0)).map(|c| *c.client()), Some(100));
        assert!(pool.peek(addr(1)).is_none());
    }

    /// I18: an address that keeps its connection lets go of its backoff state once that has
    /// decayed: `prune_addresses` frees the slot's out-of-line part and keeps the connection.
    #[tokio::test(start_paused = true)]
    async fn i18_prune_frees_the_decayed_backoff_state_of_a_connected_address() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(3600));
        pool.insert(addr(0), 1);
        let failure: crate::error::Cause = std::sync::Arc::new(std::io::Error::other("refused"));
        pool.with_existing_slot(&addr(0), |slot| {
            pool.inner.eject(&addr(0), slot, Instant::now(), failure);
        })
        .unwrap();
        assert_eq!(pool.ejection_count(addr(0)), 1);
        let kept = |pool: &ConnectionPool<u32>| pool.inner.map.get(&addr(0)).unwrap().has_cold();
        assert!(kept(&pool), "a backoff is state");
        assert_eq!(pool.prune_addresses().await, 0);
        assert!(
            kept(&pool),
            "I18 violated: backoff state freed before it decayed"
        );
        // The backoff ends, then one quiet interval takes the count to 0.
        let until = pool.backoff_until(addr(0)).expect("backing off");
        tokio::time::sleep_until(until + pool.inner.config.ejection.decay_interval).await;
        assert_eq!(pool.ejection_count(addr(0)), 0);
        assert_eq!(
            pool.prune_addresses().await,
            0,
            "the address keeps its connection"
        );
        assert!(!kept(&pool), "I18 violated: decayed backoff state kept");
        assert_eq!(pool.get(addr(0)).map(|c| *c.client()), Some(1));
    }

    /// `prune_addresses` lets go of the result channel of a connect once every waiter has had its
    /// connection, and keeps it while one has not (LRU must not take that connection, defect 4).
    #[tokio::test(start_paused = true)]
    async fn i4_prune_releases_only_finished_handoffs() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(3600));
        let mut waiting = Vec::new();
        for i in 0..2 {
            pool.insert(addr(i), 1);
            let (tx, rx) = tokio::sync::watch::channel(None);
            pool.inner
                .map
                .get_mut(&addr(i))
                .unwrap()
                .conn
                .as_mut()
                .unwrap()
                .handoff = Some(tx);
            if i == 1 {
                waiting.push(rx); // addr(1)'s waiter has not had its connection yet
            }
        }
        let handoff = |i: u8| {
            let slot = pool.inner.map.get(&addr(i)).unwrap();
            let pooled = slot.conn.as_ref().unwrap();
            (pooled.handoff.is_some(), pooled.in_handoff())
        };
        assert_eq!((handoff(0), handoff(1)), ((true, false), (true, true)));
        assert_eq!(pool.prune_addresses().await, 0);
        assert_eq!(
            handoff(0),
            (false, false),
            "a finished handoff's channel is released"
        );
        assert_eq!(
            handoff(1),
            (true, true),
            "I4: a handoff still waited on is kept"
        );
        drop(waiting);
        pool.prune_addresses().await;
        assert_eq!(handoff(1), (false, false));
    }

    /// `prune_addresses` returns how many addresses it forgot: none while they back off, each
    /// once its count decays (I18), and none after.
    #[tokio::test(start_paused = true)]
    async fn i18_prune_counts_the_addresses_it_forgets() {
        let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::from_secs(3600));
        for i in 0..2 {
            pool.insert(addr(i), 1);
            let failure: crate::error::Cause =
                std::sync::Arc::new(std::io::Error::other("refused"));
            pool.with_existing_slot(&addr(i), |slot| {
                pool.inner.eject(&addr(i), slot, Instant::now(), failure);
            })
            .unwrap();
            assert!(pool.take_unclosed(addr(i)).is_some());
        }
        assert_eq!(pool.prune_addresses().await, 0, "I18: backing off, kept");
        // The later of the two jittered backoffs, then one quiet interval.
        let until = (0..2)
            .filter_map(|i| pool.backoff_until(addr(i)))
            .max()
            .expect("backing off");
        tokio::time::sleep_until(until + pool.inner.config.ejection.decay_interval).await;
        assert_eq!(
            pool.prune_addresses().await,
            2,
            "I18: both decayed, both forgotten"
        );
        assert_eq!(pool.prune_addresses().await, 0, "nothing left to forget");
        assert!(pool.inner.map.is_empty());
    }
}
