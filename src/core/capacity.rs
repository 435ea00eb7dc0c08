use std::sync::Arc;

use crate::sync::atomic::{AtomicUsize, Ordering};

/// The slot count behind I1–I3: one slot per live connection or connect in flight.
///
/// A slot is a value, a [`Permit`]: [`try_acquire`](Self::try_acquire) takes one with a
/// compare-and-swap that never lets the count pass `max` (I1), and the permit gives it back when it
/// is dropped, exactly once. There is no other way to release a slot. The pool moves a permit from
/// the connect that reserved it to the connection it paid for, and drops it only after that
/// connection is out of the map and closed, so connections open at the connector never outnumber
/// the permits, and permits never outnumber `max`.
///
/// ```
/// use std::sync::Arc;
/// use keyed_pool::core::CapacityLedger;
/// let ledger = Arc::new(CapacityLedger::new(2));
/// let a = ledger.try_acquire().expect("a free slot");
/// let b = ledger.try_acquire().expect("a free slot");
/// assert!(ledger.try_acquire().is_none(), "the third slot does not exist");
/// drop(a);
/// assert_eq!(ledger.used(), 1);
/// drop(b);
/// assert_eq!(ledger.used(), 0);
/// ```
pub struct CapacityLedger {
    max: usize,
    /// The slots held, and in its top bit ([`LAST_SLOT_RESERVED`]) whether the last free slot is
    /// kept for the holder of a [`LastSlot`]: one word, so that every acquire decides against both
    /// at once.
    used: AtomicUsize,
    /// How many of the `used` slots are reserved by connects in flight (for error messages and
    /// stats: the cap is held against `used` alone).
    connecting: AtomicUsize,
    /// Called after a slot is released (a permit dropped, or the kept last slot given back), so
    /// that callers waiting for capacity elsewhere can try again (issue 13: a checkout waiting at
    /// the global cap). The core knows no runtime: the async layer passes a function that wakes
    /// its waiters, and keeps it cheap when nobody waits.
    on_release: Option<ReleaseHook>,
}

/// What [`CapacityLedger::with_release_hook`] calls after each release.
pub type ReleaseHook = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for CapacityLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapacityLedger")
            .field("max", &self.max)
            .field("used", &self.used())
            .field("connecting", &self.connecting())
            .field("on_release", &self.on_release.is_some())
            .finish()
    }
}

/// One capacity slot, held until dropped. Not `Clone`: a slot is released exactly once.
#[derive(Debug)]
#[must_use = "dropping a permit releases its slot at once"]
pub struct Permit {
    ledger: Arc<CapacityLedger>,
    /// 0 or 1. A byte, not a `bool`: a `bool`'s unused values would be where an
    /// `Option` of a struct holding a permit says "none", and the pool's map bucket wants that
    /// said by the connection's handle, on the cache line `get` reads anyway (issue 16; see the
    /// pool's `Slot`).
    connecting: u8,
}

impl Permit {
    /// Marks this slot as reserved by a connect in flight (counted in
    /// [`CapacityLedger::connecting`]) until [`mark_live`](Self::mark_live) or drop.
    pub fn mark_connecting(&mut self) {
        if self.connecting == 0 {
            self.connecting = 1;
            self.ledger.connecting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Marks this slot as held by a live connection.
    pub fn mark_live(&mut self) {
        if self.connecting != 0 {
            self.connecting = 0;
            self.ledger.connecting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.mark_live();
        // Every permit was counted by an acquire, so the count is at least 1 here, and the
        // subtraction leaves the reservation bit as it is.
        let prev = self.ledger.used.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev & COUNT > 0, "a capacity slot was released twice");
        self.ledger.released();
    }
}

impl CapacityLedger {
    /// A ledger of `max` slots; `0` means unlimited.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
            connecting: AtomicUsize::new(0),
            on_release: None,
        }
    }

    /// A ledger of `max` slots that calls `hook` after every release: a [`Permit`] dropped, or a
    /// [`LastSlot`] given back. The hook runs on the releasing thread, possibly under a lock of the
    /// caller's, so it must be quick and must not take slots itself.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use keyed_pool::core::CapacityLedger;
    /// let released = Arc::new(AtomicUsize::new(0));
    /// let seen = Arc::clone(&released);
    /// let hook = Arc::new(move || {
    ///     seen.fetch_add(1, Ordering::SeqCst);
    /// });
    /// let ledger = Arc::new(CapacityLedger::with_release_hook(1, hook));
    /// drop(ledger.try_acquire().expect("a free slot"));
    /// assert_eq!(released.load(Ordering::SeqCst), 1);
    /// ```
    pub fn with_release_hook(max: usize, hook: ReleaseHook) -> Self {
        Self {
            on_release: Some(hook),
            ..Self::new(max)
        }
    }

    fn released(&self) {
        if let Some(hook) = &self.on_release {
            hook();
        }
    }

    /// The configured maximum; `0` means unlimited.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots held now (live connections plus connects in flight).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire) & COUNT
    }

    /// Slots reserved by connects in flight now (a part of [`used`](Self::used); the two are
    /// read apart, so under concurrent change they may disagree for a moment).
    pub fn connecting(&self) -> usize {
        self.connecting.load(Ordering::Acquire)
    }

    /// Takes one slot if one is free. Never lets the count exceed `max`. While a [`LastSlot`]
    /// is held, the last free slot is not free for this: only the holder takes it.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.acquire(false)
    }

    /// Keeps the last free slot for the caller until the returned [`LastSlot`] is dropped: every
    /// other [`try_acquire`](Self::try_acquire) then leaves one slot free, and only
    /// [`LastSlot::try_acquire`] takes it. A caller that must make room (evict a connection to
    /// take its slot) holds one, so that a slot freed meanwhile comes to it rather than to a
    /// racer, and making room ends (I1, linearizable under churn). `None` while another
    /// `LastSlot` is held: there is one last slot.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keyed_pool::core::CapacityLedger;
    /// let ledger = Arc::new(CapacityLedger::new(2));
    /// let a = ledger.try_acquire().expect("a free slot");
    /// let last = ledger.reserve_last().expect("nobody else holds it");
    /// assert!(ledger.try_acquire().is_none(), "the last slot is kept");
    /// let b = last.try_acquire().expect("the holder takes it");
    /// assert_eq!(ledger.used(), 2);
    /// # drop((a, b));
    /// ```
    pub fn reserve_last(self: &Arc<Self>) -> Option<LastSlot<'_>> {
        let prev = self.used.fetch_or(LAST_SLOT_RESERVED, Ordering::AcqRel);
        // `then`, not `then_some`: a guard built and dropped here would clear the holder's bit.
        (prev & LAST_SLOT_RESERVED == 0).then(|| LastSlot { ledger: self })
    }

    fn acquire(self: &Arc<Self>, holds_last: bool) -> Option<Permit> {
        let taken = if self.max == 0 {
            self.used.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            self.used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                    let kept = usize::from(word & LAST_SLOT_RESERVED != 0 && !holds_last);
                    ((word & COUNT) + kept < self.max).then_some(word + 1)
                })
                .is_ok()
        };
        taken.then(|| Permit {
            ledger: Arc::clone(self),
            connecting: 0,
        })
    }
}

/// The bit of [`CapacityLedger::used`]'s word that says a [`LastSlot`] is held.
const LAST_SLOT_RESERVED: usize = 1 << (usize::BITS - 1);
/// The bits of that word that count slots.
const COUNT: usize = !LAST_SLOT_RESERVED;

/// The last free slot of a [`CapacityLedger`], kept for the holder of this guard (see
/// [`CapacityLedger::reserve_last`]); dropping it gives the slot back to everyone.
#[derive(Debug)]
#[must_use = "dropping it stops keeping the last slot"]
pub struct LastSlot<'a> {
    ledger: &'a Arc<CapacityLedger>,
}

impl LastSlot<'_> {
    /// Takes one slot if one is free, the kept one included.
    pub fn try_acquire(&self) -> Option<Permit> {
        self.ledger.acquire(true)
    }
}

impl Drop for LastSlot<'_> {
    fn drop(&mut self) {
        let prev = self.ledger.used.fetch_and(COUNT, Ordering::AcqRel);
        // The kept slot is everyone's again: a caller refused by it may take it now, if it is
        // free. Only then: a room-maker that found the pool full and gave up must not wake the
        // callers waiting for room, which would make room again, find it full again, and wake
        // them again, for ever.
        if self.ledger.max == 0 || prev & COUNT < self.ledger.max {
            self.ledger.released();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn i1_i3_ledger_hands_out_exactly_max_permits_and_takes_them_back() {
        let ledger = Arc::new(CapacityLedger::new(2));
        assert_eq!(ledger.max(), 2);
        let mut a = ledger.try_acquire().expect("first of two");
        assert_eq!(ledger.used(), 1);
        let b = ledger.try_acquire().expect("second of two");
        assert_eq!(ledger.used(), 2);
        assert!(
            ledger.try_acquire().is_none(),
            "I1 violated: a third permit of two"
        );
        assert_eq!(ledger.used(), 2, "a refused acquire takes nothing");
        a.mark_connecting();
        a.mark_connecting();
        assert_eq!(ledger.connecting(), 1, "marking twice counts once");
        a.mark_live();
        a.mark_live();
        assert_eq!(ledger.connecting(), 0);
        a.mark_connecting();
        drop(a);
        assert_eq!((ledger.used(), ledger.connecting()), (1, 0), "I3 violated");
        drop(b);
        assert_eq!(ledger.used(), 0);
        let c = ledger.try_acquire().expect("room again");
        assert_eq!(ledger.used(), 1);
        drop(c);
    }

    #[test]
    fn i1_the_last_slot_kept_goes_only_to_its_holder() {
        let ledger = Arc::new(CapacityLedger::new(3));
        let a = ledger.try_acquire().expect("first of three");
        let last = ledger.reserve_last().expect("nobody holds it yet");
        assert!(
            ledger.reserve_last().is_none(),
            "there is one last slot to keep"
        );
        let b = ledger.try_acquire().expect("second of three: not the last");
        assert!(
            ledger.try_acquire().is_none(),
            "I1 violated: the kept last slot went to a racer"
        );
        assert_eq!(ledger.used(), 2, "a refused acquire takes nothing");
        let c = last.try_acquire().expect("the holder takes the last slot");
        assert_eq!(ledger.used(), 3);
        assert!(
            last.try_acquire().is_none(),
            "I1 violated: a fourth of three"
        );
        drop(c);
        drop(b);
        assert_eq!(ledger.used(), 1, "releases under a reservation count right");
        drop(last);
        let b = ledger.try_acquire().expect("second again");
        let c = ledger
            .try_acquire()
            .expect("the last slot is everyone's once the holder lets go");
        assert!(ledger.reserve_last().is_some(), "free to keep again");
        drop((a, b, c));
        assert_eq!(ledger.used(), 0, "I3 violated");
    }

    #[test]
    fn the_release_hook_runs_after_every_release_and_sees_the_slot_free() {
        use std::sync::Mutex;
        let ledger_cell: Arc<Mutex<Option<std::sync::Weak<CapacityLedger>>>> = Arc::default();
        let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (cell, log) = (Arc::clone(&ledger_cell), Arc::clone(&seen));
        let hook: ReleaseHook = Arc::new(move || {
            let ledger = cell.lock().unwrap().as_ref().and_then(|w| w.upgrade());
            log.lock()
                .unwrap()
                .push(ledger.map_or(usize::MAX, |l| l.used()));
        });
        let ledger = Arc::new(CapacityLedger::with_release_hook(2, hook));
        *ledger_cell.lock().unwrap() = Some(Arc::downgrade(&ledger));
        let a = ledger.try_acquire().unwrap();
        let b = ledger.try_acquire().unwrap();
        assert!(
            seen.lock().unwrap().is_empty(),
            "acquiring releases nothing"
        );
        drop(a);
        let last = ledger.reserve_last().unwrap();
        drop(last);
        drop(b);
        // The hook runs after the count dropped: a waiter it wakes finds the slot free (I1 holds:
        // it never sees a slot that is not there).
        assert_eq!(*seen.lock().unwrap(), [1, 1, 0]);
        // A kept last slot given back while the ledger is full frees nothing: no wake-up (a
        // room-maker that found no room would otherwise wake the waiters for ever).
        let a = ledger.try_acquire().unwrap();
        let last = ledger.reserve_last().unwrap();
        let b = last.try_acquire().unwrap();
        drop(last);
        assert_eq!(seen.lock().unwrap().len(), 3, "nothing was freed");
        drop((a, b));
    }

    #[test]
    fn i1_zero_max_is_unbounded() {
        let ledger = Arc::new(CapacityLedger::new(0));
        assert_eq!(ledger.max(), 0);
        let permits: Vec<_> = (0..5)
            .map(|_| ledger.try_acquire().expect("unbounded"))
            .collect();
        assert_eq!(ledger.used(), 5);
        drop(permits);
        assert_eq!(ledger.used(), 0);
    }
}
