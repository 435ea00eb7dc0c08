//! The pure core: no runtime, no I/O. Time comes in as an argument, so property tests, fuzz targets
//! and the simulation drive these pieces with exact instants (the sans-IO style of `quinn-proto`).
//!
//! - [`CapacityLedger`]: the slot count behind I1–I3.
//! - [`HealthPolicy`], [`HealthWindow`], [`Verdict`]: the health state of one connection (I9–I11).
//! - [`BackoffPolicy`]: the reconnect schedule of an address (I12).
//! - [`is_idle`]: the idle predicate (I5, I6).

mod backoff;
mod capacity;
mod health;
mod idle;

pub use backoff::BackoffPolicy;
pub use capacity::CapacityLedger;
pub use health::{HealthPolicy, HealthWindow, UnhealthyReason, Verdict, WINDOW_BUCKETS};
pub use idle::is_idle;
