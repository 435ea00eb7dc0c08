//! Model-based property tests for keyed-pool.
