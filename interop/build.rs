//! Finds the `redis-server` that `tests/redis.rs` runs against (`KEYED_POOL_REDIS_BIN`, else
//! `PATH`), so that without it the test is reported as *ignored*, with the command that installs
//! it, not as passed.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(redis_found)");
    for var in ["KEYED_POOL_REDIS_BIN", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let found = match std::env::var_os("KEYED_POOL_REDIS_BIN") {
        Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        None => dirs
            .iter()
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file()),
    };
    match found {
        Some(binary) => {
            // Re-run if it goes away.
            println!("cargo::rerun-if-changed={}", binary.display());
            println!("cargo::rustc-cfg=redis_found");
        }
        None => {
            // Re-run once it appears: installing it changes a directory of PATH.
            for dir in dirs.iter().filter(|d| d.is_dir()) {
                println!("cargo::rerun-if-changed={}", dir.display());
            }
        }
    }
}
