//! [`Slot`]: everything the pool keeps for one address, in one map entry, decided under that
//! entry's lock: the pooled connection with the capacity permit it holds, the connect in flight,
//! and the address's ejection state. There is no second map to keep in step, and no lock-order rule.
//! The last two, and the exclusive checkouts of the address (issue 13), live out of line,
//! allocated only while an address has one of them.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::checkout::Exclusive;
use crate::connection::{ConnId, PooledConnection};
use crate::core::{BackoffPolicy, Ejection, EjectionPolicy, Permit};
use crate::error::{Cause, PoolError};

/// A pooled connection and the capacity slot it holds. The permit is released only when the pool
/// retires the connection (after closing it, under the entry's lock) or hands it back unclosed.
///
/// `repr(C)`, the handle first: see [`Slot`].
#[repr(C)]
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

/// Everything the pool keeps for one address. Sized for the common case, an address with a
/// connection and nothing else: what only a connecting or failing address needs lives in
/// [`Cold`], out of line, so every map bucket pays one pointer for it instead of its full size.
///
/// `repr(C)`, in this order: `get` reads the out-of-line pointer (is there more than one
/// connection?) and the first connection's handle, which is also where `Option` keeps "no
/// connection" (the permit holds no spare byte for it: [`Permit`]). With the key first in the
/// map's bucket, those are bytes 24–40 of 64. A large table's buckets start 16 bytes into a cache
/// line (its allocation comes from `mmap`, after malloc's 16-byte header), so bytes 0–48 share the
/// key's line: `get` reads one line of the bucket, where with the fields in the compiler's order it
/// read "none?" from byte 56, on the next line, and missed the cache once more than the floor per
/// `get` at 100,000 addresses (issue 16; callgrind's cache simulation in BENCHMARKS.md).
#[repr(C)]
pub(crate) struct Slot<C> {
    /// `None` while the address has no connect in flight and a settled ejection state; allocated by
    /// the first connect or failure, dropped by [`tidy`](Self::tidy) once both are over again.
    cold: Option<Box<Cold<C>>>,
    /// The address's first shared connection. Further ones (up to
    /// [`max_per_address`](crate::PoolConfig::max_per_address), issue 13) live out of line in
    /// [`Cold::more`]: an address has some there only while it has one here (taking this one
    /// moves the oldest of them here), so the common case, one connection, costs `get` nothing more.
    pub(crate) conn: Option<Pooled<C>>,
}

/// The parts of a [`Slot`] that almost every address lacks at any moment (issue 16).
struct Cold<C> {
    flight: Option<Flight<C>>,
    ejection: Ejection,
    /// The failure behind the current backoff, for [`PoolError::Backoff`].
    cause: Option<Cause>,
    /// The address's exclusive connections and its line of checkout callers, allocated by its
    /// first checkout and freed once it holds nothing (no connection, no connect, nobody in line).
    /// Inline, not boxed again: an address with exclusive connections pays one allocation for this
    /// part, not two (issue 13's memory per idle connection); an address that only connects or
    /// fails (the shared mode) carries the empty state (~120 B) while its connect or backoff lasts.
    exclusive: Option<Exclusive<C>>,
    /// The address's shared connections after the first ([`Slot::conn`]), oldest first.
    more: Vec<Pooled<C>>,
}

impl<C> Default for Slot<C> {
    fn default() -> Self {
        Self {
            conn: None,
            cold: None,
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
        self.conn.is_none() && self.cold_is_settled(now, policy)
    }

    /// `true` when the out-of-line part is absent or holds nothing worth keeping at `now`.
    fn cold_is_settled(&self, now: Duration, policy: &EjectionPolicy) -> bool {
        // The ejection state last: its decay is arithmetic on the clock, the rest are loads, and
        // an address in use (an idle exclusive connection, a connect) answers before it (this
        // runs on every checkout and return).
        self.cold.as_ref().is_none_or(|c| {
            c.flight.is_none()
                && c.exclusive.as_ref().is_none_or(|e| e.is_empty())
                && c.more.is_empty()
                && c.ejection.is_settled(now, policy)
        })
    }

    /// `true` when [`tidy`](Self::tidy) would free something: the out-of-line part is allocated
    /// but holds nothing worth keeping at `now`.
    pub(crate) fn needs_tidy(&self, now: Duration, policy: &EjectionPolicy) -> bool {
        self.cold
            .as_ref()
            .is_some_and(|c| c.exclusive.as_ref().is_some_and(|e| e.is_empty()))
            || (self.cold.is_some() && self.cold_is_settled(now, policy))
    }

    /// Frees the out-of-line part once it holds nothing worth keeping at `now`: no connect in
    /// flight and a settled ejection state (whose cause no error can report any more).
    pub(crate) fn tidy(&mut self, now: Duration, policy: &EjectionPolicy) {
        if self.cold.is_some() && self.cold_is_settled(now, policy) {
            self.cold = None;
        } else if let Some(cold) = self.cold.as_mut()
            && cold.exclusive.as_ref().is_some_and(|e| e.is_empty())
        {
            cold.exclusive = None;
        }
    }

    /// Whether the out-of-line part is allocated (for tests of when it is freed).
    #[cfg(test)]
    pub(crate) fn has_cold(&self) -> bool {
        self.cold.is_some()
    }

    fn cold_mut(&mut self) -> &mut Cold<C> {
        self.cold.get_or_insert_with(|| {
            Box::new(Cold {
                flight: None,
                ejection: Ejection::default(),
                cause: None,
                exclusive: None,
                more: Vec::new(),
            })
        })
    }

    /// The shared connections after the first, oldest first (empty for most addresses).
    pub(crate) fn more(&self) -> &[Pooled<C>] {
        self.cold.as_ref().map_or(&[], |c| &c.more)
    }

    /// Whether the address has more than one shared connection: `get`'s one extra branch.
    #[inline]
    pub(crate) fn has_more(&self) -> bool {
        self.cold.as_ref().is_some_and(|c| !c.more.is_empty())
    }

    /// Every shared connection of the address, the first one first.
    pub(crate) fn shared(&self) -> impl Iterator<Item = &Pooled<C>> {
        self.conn.iter().chain(self.more())
    }

    /// How many shared connections the address has.
    pub(crate) fn shared_count(&self) -> usize {
        usize::from(self.conn.is_some()) + self.more().len()
    }

    /// Whether shared connection `id` is one of the address's.
    pub(crate) fn holds_shared(&self, id: ConnId) -> bool {
        self.shared().any(|p| p.conn.id() == id)
    }

    /// Adds a shared connection: the first, or one more.
    pub(crate) fn push_shared(&mut self, pooled: Pooled<C>) {
        if self.conn.is_none() {
            self.conn = Some(pooled);
        } else {
            self.cold_mut().more.push(pooled);
        }
    }

    /// Takes the first shared connection out; the oldest of the others takes its place.
    pub(crate) fn take_first(&mut self) -> Option<Pooled<C>> {
        let first = self.conn.take()?;
        if let Some(cold) = self.cold.as_mut()
            && !cold.more.is_empty()
        {
            self.conn = Some(cold.more.remove(0));
        }
        Some(first)
    }

    /// Takes shared connection `id` out if `still` holds for it (checked only on that one).
    pub(crate) fn take_shared_if(
        &mut self,
        id: ConnId,
        still: impl FnOnce(&Pooled<C>) -> bool,
    ) -> Option<Pooled<C>> {
        if self.conn.as_ref().is_some_and(|p| p.conn.id() == id) {
            return if still(self.conn.as_ref()?) {
                self.take_first()
            } else {
                None
            };
        }
        let more = &mut self.cold.as_mut()?.more;
        let at = more.iter().position(|p| p.conn.id() == id)?;
        still(&more[at]).then(|| more.remove(at))
    }

    /// Runs `f` on every shared connection of the address.
    pub(crate) fn for_each_shared_mut(&mut self, mut f: impl FnMut(&mut Pooled<C>)) {
        self.conn.iter_mut().for_each(&mut f);
        if let Some(cold) = self.cold.as_mut() {
            cold.more.iter_mut().for_each(f);
        }
    }

    /// Takes every shared connection out (`close`).
    pub(crate) fn take_all_shared(&mut self) -> Vec<Pooled<C>> {
        let mut all: Vec<_> = self.conn.take().into_iter().collect();
        if let Some(cold) = self.cold.as_mut() {
            all.append(&mut cold.more);
        }
        all
    }

    /// The address's exclusive checkouts, if it has any state for them.
    pub(crate) fn exclusive(&self) -> Option<&Exclusive<C>> {
        self.cold.as_ref()?.exclusive.as_ref()
    }

    /// The address's exclusive checkouts, if it has any state for them, to change.
    pub(crate) fn exclusive_mut(&mut self) -> Option<&mut Exclusive<C>> {
        self.cold.as_mut()?.exclusive.as_mut()
    }

    /// The address's exclusive checkouts, allocated if it had none.
    pub(crate) fn exclusive_or_new(&mut self) -> &mut Exclusive<C> {
        self.cold_mut().exclusive.get_or_insert_with(Exclusive::new)
    }

    /// Takes the address's exclusive state out (`close`).
    pub(crate) fn take_exclusive(&mut self) -> Option<Exclusive<C>> {
        self.cold.as_mut()?.exclusive.take()
    }

    /// The connect in flight for the address, if any.
    pub(crate) fn flight(&self) -> Option<&Flight<C>> {
        self.cold.as_ref()?.flight.as_ref()
    }

    /// Records a new connect in flight (the caller checked there was none).
    pub(crate) fn start_flight(&mut self, flight: Flight<C>) {
        self.cold_mut().flight = Some(flight);
    }

    /// Forgets the connect in flight if it is still flight `id` (a later one is left alone).
    pub(crate) fn end_flight(&mut self, id: u64) {
        if let Some(cold) = self.cold.as_mut()
            && cold.flight.as_ref().is_some_and(|f| f.id == id)
        {
            cold.flight = None;
        }
    }

    /// The address's ejection state (the default, settled one when it has none).
    pub(crate) fn ejection(&self) -> Ejection {
        self.cold
            .as_ref()
            .map_or_else(Ejection::default, |c| c.ejection)
    }

    /// The failure behind the current backoff, if one was recorded.
    pub(crate) fn cause(&self) -> Option<&Cause> {
        self.cold.as_ref()?.cause.as_ref()
    }

    /// One more failure at `now`, caused by `cause`: see [`Ejection::eject`]. Returns the delay.
    pub(crate) fn eject(
        &mut self,
        now: Duration,
        backoff: &BackoffPolicy,
        policy: &EjectionPolicy,
        unit: f64,
        cause: Cause,
    ) -> Duration {
        let cold = self.cold_mut();
        cold.cause = Some(cause);
        cold.ejection.eject(now, backoff, policy, unit)
    }

    /// Ends the backoff and forgets the count and its cause (`mark_up`).
    pub(crate) fn reset_ejection(&mut self) {
        if let Some(cold) = self.cold.as_mut() {
            cold.ejection.reset();
            cold.cause = None;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::UnhealthyReason;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn cause() -> Cause {
        Arc::new(UnhealthyReason::Closed)
    }

    /// I18: a failure allocates the out-of-line part; it is kept, with its cause, while the
    /// address backs off or its count has not decayed, and freed once both are over.
    #[test]
    fn i18_ejection_state_is_freed_once_settled() {
        let (backoff, policy) = (BackoffPolicy::default(), EjectionPolicy::default());
        let mut slot = Slot::<u64>::default();
        assert!(slot.is_vacant(S(0), &policy));
        assert!(!slot.needs_tidy(S(0), &policy), "nothing allocated yet");
        let delay = slot.eject(S(0), &backoff, &policy, 0.5, cause());
        assert_eq!(slot.ejection().retry_after(S(0)), Some(delay));
        assert!(slot.cause().is_some(), "I12: the backoff keeps its cause");
        assert!(!slot.is_vacant(S(0), &policy), "I18: backing off is state");
        slot.tidy(S(0), &policy);
        assert_eq!(
            slot.ejection().count_at(S(0), &policy),
            1,
            "I18 violated: freed early"
        );
        // Count 1 decays one quiet interval after the backoff ends.
        let settled = delay + policy.decay_interval;
        assert!(!slot.needs_tidy(settled - Duration::from_nanos(1), &policy));
        assert!(slot.needs_tidy(settled, &policy));
        assert!(slot.is_vacant(settled, &policy));
        slot.tidy(settled, &policy);
        assert!(slot.cold.is_none(), "I18 violated: settled state kept");
        assert_eq!(slot.ejection(), Ejection::default());
        assert!(slot.cause().is_none());
    }

    /// I4/I18: a flight keeps the out-of-line part alive; only its own id ends it, and `mark_up`
    /// clears the backoff without ending the flight.
    #[test]
    fn i4_flight_ends_only_by_its_id_and_outlives_a_reset() {
        let (backoff, policy) = (BackoffPolicy::default(), EjectionPolicy::default());
        let mut slot = Slot::<u64>::default();
        let (_tx, rx) = watch::channel(None);
        slot.start_flight(Flight {
            id: 7,
            deadline: Instant::now(),
            rx,
        });
        slot.eject(S(0), &backoff, &policy, 0.5, cause());
        slot.reset_ejection();
        assert_eq!(slot.ejection(), Ejection::default());
        assert!(slot.cause().is_none());
        slot.tidy(S(0), &policy);
        assert_eq!(
            slot.flight().map(|f| f.id),
            Some(7),
            "I4 violated: flight lost"
        );
        slot.end_flight(8);
        assert!(
            slot.flight().is_some(),
            "I4 violated: another flight's end ended this one"
        );
        assert!(!slot.is_vacant(S(0), &policy));
        slot.end_flight(7);
        assert!(slot.flight().is_none());
        assert!(slot.is_vacant(S(0), &policy));
        slot.tidy(S(0), &policy);
        assert!(slot.cold.is_none(), "I18 violated: settled state kept");
    }

    /// Issue 16: what `get` reads of a bucket lies in its first 48 bytes (see [`Slot`]); the
    /// `Option` costs no byte (it says "none" with a pointer, not a flag of its own).
    #[test]
    fn get_reads_the_front_of_the_slot() {
        use std::mem::{offset_of, size_of};
        assert_eq!(offset_of!(Slot<u64>, cold), 0);
        assert_eq!(offset_of!(Slot<u64>, conn), 8);
        assert_eq!(offset_of!(Pooled<u64>, conn), 0);
        assert_eq!(size_of::<Option<Pooled<u64>>>(), size_of::<Pooled<u64>>());
        assert_eq!(size_of::<Slot<u64>>(), 40);
    }
}
