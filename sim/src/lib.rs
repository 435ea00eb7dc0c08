//! Deterministic simulation scenarios for keyed-pool (see sim/README.md).
