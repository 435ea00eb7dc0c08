//! Deterministic simulation scenarios for keyed-pool (see sim/README.md).
//!
//! Everything here is built only under `--cfg madsim` (`cargo sim`); under the normal build this
//! crate is empty and its binary refuses to run.

/// `true` when this crate was built under `--cfg madsim`: the runner refuses to run otherwise.
pub const BUILT_WITH_MADSIM: bool = cfg!(madsim);

#[cfg(madsim)]
pub mod books;
#[cfg(madsim)]
pub mod broker;
#[cfg(madsim)]
pub mod checkout;
#[cfg(madsim)]
pub mod client;
#[cfg(madsim)]
pub mod record;
#[cfg(madsim)]
pub mod remoting;
#[cfg(madsim)]
pub mod runner;
#[cfg(madsim)]
pub mod scenarios;
#[cfg(madsim)]
pub mod world;
