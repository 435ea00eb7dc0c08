//! Fuzz target `ops`: see `keyed_pool_proptests::targets::ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyed_pool_proptests::targets::ops(data));
