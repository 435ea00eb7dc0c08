//! The synchronisation primitives of the pure core, in one place, so that a model checker can
//! stand in for them (as `tokio` stands in for madsim's runtime under `cfg(madsim)`).

pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
}

/// A mutex that ignores poisoning: the data it guards stays consistent at every statement (each
/// update is a few plain writes that cannot panic), so a panic elsewhere while it was held leaves
/// nothing half-done.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
