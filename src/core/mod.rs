//! The pure core: no runtime, no I/O. Time comes in as an argument, so property tests, fuzz targets
//! and the simulation drive these pieces with exact instants (the sans-IO style of `quinn-proto`).
//!
//! - [`CapacityLedger`] and its [`Permit`]: the slot count behind I1–I3, a slot as a value; an
//!   optional hook after each release wakes callers waiting for capacity.
//! - [`CallClaim`], [`CallRecord`]: the state machine of one connection (calls in flight and the
//!   sweep's claim, I5; outcomes, the failure run, the window and the unhealthy latch, I9–I11).
//! - [`HealthPolicy`], [`HealthWindow`], [`Verdict`]: when a connection is unhealthy (I9–I11).
//! - [`BackoffPolicy`], [`EjectionPolicy`], [`Ejection`]: the backoff of an address and the count
//!   that learns (I12, I18).
//! - [`CheckoutQueue`]: the exclusive-checkout state of one address: idle connections, checkouts,
//!   connects and a FIFO line of waiters (I19–I22; issue 13), which `ConnectionPool::checkout`
//!   drives.
//! - [`is_idle`]: the idle predicate (I5, I6).
//! - [`LatencyHistogram`], [`LatencySnapshot`]: a latency distribution in fixed memory, with
//!   quantiles within [`MAX_RELATIVE_ERROR`].
//!
//! See `docs/DESIGN.md` for how the pool composes them.

mod backoff;
mod capacity;
mod checkout;
mod conn;
mod ejection;
mod health;
mod idle;
mod latency;
#[cfg(all(test, loom))]
mod loom_tests;

pub use backoff::BackoffPolicy;
pub use capacity::{CapacityLedger, LastSlot, Permit, ReleaseHook};
pub use checkout::{Acquired, CheckoutLimits, CheckoutQueue, Placed, WaiterId};
pub use conn::{CallClaim, CallRecord};
pub use ejection::{Ejection, EjectionPolicy};
pub use health::{HealthPolicy, HealthWindow, UnhealthyReason, Verdict, WINDOW_BUCKETS};
pub use idle::is_idle;
pub use latency::{
    LATENCY_BUCKETS, LatencyHistogram, LatencySnapshot, MAX_RELATIVE_ERROR, MAX_TRACKED,
};
