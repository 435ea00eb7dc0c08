//! Benchmarks for keyed-pool live in `benches/benches/`.
