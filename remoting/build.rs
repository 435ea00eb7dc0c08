//! Finds the RocketMQ name server that `tests/interop_namesrv.rs` runs against, so that without it
//! the test is reported as *ignored* (with the command that installs it), not as passed.

use std::path::PathBuf;

const BINARY: &str = "rocketmq-namesrv-rust";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(namesrv_found)");
    for var in ["KEYED_POOL_NAMESRV_BIN", "PATH", "CARGO_HOME", "HOME"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("KEYED_POOL_NAMESRV_BIN") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|dir| dir.join(BINARY)));
    }
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let installed = home.join("bin").join(BINARY);
        // Re-run once it appears (a missing path counts as changed, so this re-checks each build
        // until it is installed).
        println!("cargo::rerun-if-changed={}", installed.display());
        candidates.push(installed);
    }
    if candidates.iter().any(|p| p.is_file()) {
        println!("cargo::rustc-cfg=namesrv_found");
    }
}
