//! Finds the RocketMQ servers that the interop tests run against, so that without them the tests
//! are reported as *ignored* (with the command that installs them), not as passed:
//! `cfg(namesrv_found)` for `tests/interop_namesrv.rs`, `cfg(broker_found)` (the name server *and*
//! the broker) for `tests/interop_broker.rs`.

use std::path::PathBuf;

/// (binary, the environment variable naming it, the cfg set when found)
const NAMESRV: (&str, &str) = ("rocketmq-namesrv-rust", "KEYED_POOL_NAMESRV_BIN");
const BROKER: (&str, &str) = ("rocketmq-broker-rust", "KEYED_POOL_BROKER_BIN");

fn main() {
    println!("cargo::rustc-check-cfg=cfg(namesrv_found)");
    println!("cargo::rustc-check-cfg=cfg(broker_found)");
    for var in ["PATH", "CARGO_HOME", "HOME", NAMESRV.1, BROKER.1] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let namesrv = found(NAMESRV);
    if namesrv {
        println!("cargo::rustc-cfg=namesrv_found");
    }
    if namesrv && found(BROKER) {
        println!("cargo::rustc-cfg=broker_found");
    }
}

/// Whether `binary` is at `$env_var`, on `PATH` or in `$CARGO_HOME/bin`.
fn found((binary, env_var): (&str, &str)) -> bool {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os(env_var) {
        candidates.push(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|dir| dir.join(binary)));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let installed = home.join("bin").join(binary);
        // Re-run once it appears (a missing path counts as changed, so this re-checks each build
        // until it is installed).
        println!("cargo::rerun-if-changed={}", installed.display());
        candidates.push(installed);
    }
    candidates.iter().any(|p| p.is_file())
}
