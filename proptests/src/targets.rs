//! The bodies of the fuzz targets. Each takes the raw bytes libFuzzer hands over and decodes them
//! here, so `fuzz/fuzz_targets/*.rs` and the corpus replay in `tests/fuzz_corpus.rs` run exactly
//! the same code on exactly the same decoding. Each panics on a violation.

use arbitrary::{Arbitrary, Unstructured};

use crate::ops::Scenario;

/// The names of the fuzz targets, as directories of `fuzz/corpus/`.
pub const TARGETS: &[&str] = &["ops", "config", "addresses", "frames"];

/// Runs the fuzz target `name` on `data`.
///
/// # Panics
/// On an unknown name, and wherever the target itself panics (a violation).
pub fn by_name(name: &str, data: &[u8]) {
    match name {
        "ops" => ops(data),
        "config" => config(data),
        "addresses" => addresses(data),
        "frames" => frames(data),
        _ => panic!("no fuzz target named {name:?}"),
    }
}

/// `ops`: a [`Scenario`] decoded as libfuzzer-sys decodes a typed input
/// (`arbitrary_take_rest`), run against the model.
///
/// # Panics
/// With the violated invariant and the scenario.
pub fn ops(data: &[u8]) {
    let Ok(scenario) = Scenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if let Err(violation) = crate::run(&scenario) {
        panic!("{violation}\nscenario: {scenario:?}");
    }
}

/// `config`: arbitrary configuration values (see [`crate::config_check`]): validation must return a typed error exactly when a rule is broken, never panic, and a
/// pool built from a valid config must survive a short workout.
pub fn config(data: &[u8]) {
    let Ok(input) = crate::config_check::RawConfig::arbitrary_take_rest(Unstructured::new(data))
    else {
        return;
    };
    crate::config_check::check(&input);
}

/// `addresses`: arbitrary strings as addresses: `validate_addr` never panics and agrees with its
/// spec, and `get_or_connect` refuses a malformed one with `InvalidAddress` without connecting.
pub fn addresses(data: &[u8]) {
    crate::addr_check::check(&String::from_utf8_lossy(data));
}

/// `frames`: arbitrary bytes from the network into the remoting codec's `FrameDecoder` (raw bytes,
/// no decoding of the input).
pub fn frames(data: &[u8]) {
    crate::frames_check::check(data);
}
