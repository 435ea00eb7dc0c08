use std::sync::atomic::{AtomicUsize, Ordering};

/// The slot count behind I1–I3: one slot per live connection or reserved connect.
///
/// A slot is taken with a compare-and-swap that never lets the count pass `max`, so the cap holds at
/// every instant under any concurrency (I1). The pool takes a slot *before* a connection becomes
/// visible and gives it back only *after* the connection is gone, so `live ≤ used ≤ max` always.
///
/// ```
/// use keyed_pool::core::CapacityLedger;
/// let ledger = CapacityLedger::new(2);
/// assert!(ledger.try_acquire());
/// assert!(ledger.try_acquire());
/// assert!(!ledger.try_acquire(), "the third slot does not exist");
/// ledger.release();
/// assert_eq!(ledger.used(), 1);
/// ```
#[derive(Debug)]
pub struct CapacityLedger {
    max: usize,
    used: AtomicUsize,
}

impl CapacityLedger {
    /// A ledger of `max` slots; `0` means unlimited.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// The configured maximum; `0` means unlimited.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots in use (live connections plus reserved connects).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes one slot if one is free. Never lets `used` exceed `max`.
    pub fn try_acquire(&self) -> bool {
        if self.max == 0 {
            self.used.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .is_ok()
    }

    /// Gives one slot back. Releasing more slots than were taken is a bug in the caller; the count
    /// saturates at zero instead of wrapping (and debug builds assert).
    pub fn release(&self) {
        let prev = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(1))
            })
            .unwrap_or(0);
        debug_assert!(prev > 0, "capacity slot released twice");
    }
}
