//! Fuzz target `frames`: see `keyed_pool_proptests::targets::frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyed_pool_proptests::targets::frames(data));
