//! Fuzz target `addresses`: see `keyed_pool_proptests::targets::addresses`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyed_pool_proptests::targets::addresses(data));
