//! Model-based checking of keyed-pool: one operation model shared by proptest (this crate's tests)
//! and cargo-fuzz (`../fuzz`, whose targets call [`targets`] so fuzzing and the corpus replays in
//! `cargo test` cannot drift apart).
//!
//! - [`ops`]: the inputs ([`Scenario`], [`Op`]) with `Arbitrary` impls and proptest strategies.
//! - [`model`]: the reference model, restating from docs/DESIGN.md what the pool must do.
//! - [`harness`]: runs a scenario against a real pool and the model on paused virtual time and
//!   checks the invariants by number (I1–I23) after every op.
//! - [`targets`]: the fuzz targets' bodies, one per input kind.
//! - [`books`] and [`linearize`]: the threaded tier's connector that keeps its own books, and its
//!   histories with a linearizability checker (`tests/threaded.rs`).

pub mod harness;
pub mod model;
pub mod ops;
pub mod targets;

pub use harness::{FakeConn, Pool, ScriptedConnector, run, run_counting_growths};
pub use model::{Model, Settings};
pub use ops::{ConnectScript, Edge, Finish, Knobs, Op, Scenario, Step, addr};
pub mod addr_check;
pub mod books;
pub mod config_check;
pub mod frames_check;
pub mod linearize;
