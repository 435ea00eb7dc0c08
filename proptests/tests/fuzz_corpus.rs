//! Replays every committed fuzz input on stable, inside `cargo test`: the seed corpora
//! (`fuzz/corpus/<target>/`) and the crashes fuzzing once found (`fuzz/regressions/<target>/`).
//! Each input goes through `keyed_pool_proptests::targets`, the very function the fuzz target calls
//! on the same raw bytes, so a crash found once stays a regression test.

use std::path::{Path, PathBuf};

use keyed_pool_proptests::targets::{self, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, files: &[PathBuf]) {
    for file in files {
        let data = std::fs::read(file).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| targets::by_name(target, &data));
        assert!(
            outcome.is_ok(),
            "fuzz input {} of target {target} fails; reproduce with `cargo +nightly fuzz run {target} {}`",
            file.display(),
            file.display()
        );
    }
}

#[test]
fn every_target_has_a_seed_corpus_and_it_passes() {
    for &target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let files = inputs(&dir);
        assert!(
            !files.is_empty(),
            "no seed corpus for fuzz target {target} in {}",
            dir.display()
        );
        replay(target, &files);
    }
}

#[test]
fn crashes_found_by_fuzzing_stay_fixed() {
    let root = fuzz_dir().join("regressions");
    for &target in TARGETS {
        replay(target, &inputs(&root.join(target)));
    }
    for entry in std::fs::read_dir(&root).into_iter().flatten() {
        let name = entry.expect("readable entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            TARGETS.contains(&name.as_ref()),
            "fuzz/regressions/{name} names no fuzz target"
        );
    }
}

/// The seeds are what libFuzzer kept: each must still decode into something (a corpus of inputs
/// that no longer parse would silently test nothing).
#[test]
fn ops_seeds_still_decode_to_scenarios() {
    use arbitrary::{Arbitrary, Unstructured};
    let files = inputs(&fuzz_dir().join("corpus").join("ops"));
    let decoded = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).expect("readable");
            keyed_pool_proptests::Scenario::arbitrary_take_rest(Unstructured::new(&data))
                .is_ok_and(|s| !s.ops.is_empty())
        })
        .count();
    assert!(
        decoded * 2 >= files.len(),
        "only {decoded} of {} ops seeds decode to a non-empty scenario",
        files.len()
    );
}

/// A regression stays a regression only while its bytes still decode to the input that found the
/// bug: fields added to `RawConfig` since must decode as their defaults from it.
#[test]
fn config_regression_still_decodes_to_its_bug() {
    use arbitrary::{Arbitrary, Unstructured};
    use keyed_pool_proptests::config_check::RawConfig;
    let path = fuzz_dir().join("regressions/config/connect-timeout-duration-max");
    let data = std::fs::read(&path).expect("the regression is committed");
    let raw = RawConfig::arbitrary_take_rest(Unstructured::new(&data)).expect("decodes");
    let config = raw.config();
    assert!(
        std::time::Instant::now()
            .checked_add(config.connect_timeout)
            .is_none(),
        "the regression's connect timeout must overflow `Instant + timeout`: {raw:?}"
    );
    assert!(
        config.validate().is_ok(),
        "the regression must build a pool (its bug was in get_or_connect): {raw:?}"
    );
}

/// The hand-encoded checkout seeds (`corpus/ops/checkout-*`, issue 13) start the fuzzer inside the
/// exclusive side: each must still decode to a scenario that checks out, and returns, drops or
/// outwaits what it holds or waits for. `Op` is decoded by variant count, so a variant added later changes what these
/// bytes mean: then re-encode them.
#[test]
fn checkout_seeds_still_decode_to_checkouts() {
    use arbitrary::{Arbitrary, Unstructured};
    use keyed_pool_proptests::ops::Op;
    let files: Vec<PathBuf> = inputs(&fuzz_dir().join("corpus").join("ops"))
        .into_iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkout-"))
        })
        .collect();
    assert!(files.len() >= 5, "the checkout seeds are missing");
    for file in files {
        let data = std::fs::read(&file).expect("readable");
        let scenario =
            keyed_pool_proptests::Scenario::arbitrary_take_rest(Unstructured::new(&data))
                .expect("decodes");
        let checkouts = scenario
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Checkout { .. }))
            .count();
        let gives_back = scenario.ops.iter().any(|op| {
            matches!(
                op,
                Op::Return { .. } | Op::DropWaiter { .. } | Op::Close | Op::Advance(_)
            )
        });
        assert!(
            checkouts >= 2 && gives_back,
            "{} no longer decodes to checkouts: {scenario:?}",
            file.display()
        );
    }
}

/// The hand-encoded seeds of several shared connections per address (`corpus/ops/grow-*`, issue
/// 13, I23) start the fuzzer where addresses grow: each must still decode to a scenario with
/// growth on (`max_per_address` above 1, `busy_in_flight` not `u64::MAX`) whose run starts at
/// least one background connect on a busy address. Like the checkout seeds, they were encoded
/// by hand against `arbitrary`'s layout (a byte per knob; per op a continuation byte, a `u32`
/// tag scaled by the variant count, then the fields): a field or variant added later changes
/// what they mean, and this test says so.
#[test]
fn grow_seeds_still_reach_several_shared_connections() {
    use arbitrary::{Arbitrary, Unstructured};
    use keyed_pool_proptests::Settings;
    let files: Vec<PathBuf> = inputs(&fuzz_dir().join("corpus").join("ops"))
        .into_iter()
        .filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("grow-"))
        })
        .collect();
    assert!(files.len() >= 5, "the grow seeds are missing");
    for file in files {
        let data = std::fs::read(&file).expect("readable");
        let scenario =
            keyed_pool_proptests::Scenario::arbitrary_take_rest(Unstructured::new(&data))
                .expect("decodes");
        let s = Settings::from(scenario.knobs);
        assert!(
            s.per_address > 1 && s.busy < u64::MAX,
            "{} no longer turns growth on: {s:?}",
            file.display()
        );
        let growths = keyed_pool_proptests::run_counting_growths(&scenario).unwrap_or_else(|e| {
            panic!("{} fails: {e}", file.display());
        });
        assert!(
            growths >= 1,
            "I23: {} no longer makes an address grow: {scenario:?}",
            file.display()
        );
    }
}
