//! The synchronisation primitives of the pure core, in one place, so that a model checker can
//! stand in for them (as `tokio` stands in for madsim's runtime under `cfg(madsim)`).
//!
//! Under `cfg(loom)` (see `scripts/loom.sh`) the atomics and the mutex are loom's, and loom explores
//! every interleaving of the threads that share them; otherwise they are std's, at no cost.
//!
//! `Arc` is not switched: loom needs its own `Arc` only to check reference counts and leaks, and
//! [`CapacityLedger::try_acquire`](crate::core::CapacityLedger::try_acquire) takes
//! `self: &std::sync::Arc<Self>`, a receiver loom's `Arc` cannot be. The count a
//! [`Permit`](crate::core::Permit) releases is the ledger's atomic, which is loom's.

pub(crate) mod atomic {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
}

#[cfg(loom)]
use loom::sync as inner;
#[cfg(not(loom))]
use std::sync as inner;

/// The guard of [`Mutex::lock`]: std's, or loom's under `cfg(loom)`.
pub(crate) type MutexGuard<'a, T> = inner::MutexGuard<'a, T>;

/// A mutex that ignores poisoning: the data it guards stays consistent at every statement (each
/// update is a few plain writes that cannot panic), so a panic elsewhere while it was held leaves
/// nothing half-done.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(inner::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(inner::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
