//! Fuzz target `config`: see `keyed_pool_proptests::targets::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyed_pool_proptests::targets::config(data));
