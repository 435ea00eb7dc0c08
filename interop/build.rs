//! Finds the servers the interop tests run against, as `src/server.rs` does (`$VAR`, else `PATH`,
//! then `/usr/sbin`): `redis-server` for `tests/redis.rs` (cfg `redis_found`) and `nginx` for
//! `tests/nginx.rs` (cfg `nginx_found`). Without its server a test is reported as *ignored*, with
//! the command that installs it, not as passed.

use std::path::PathBuf;

/// (cfg, variable naming the binary, binary name).
const SERVERS: [(&str, &str, &str); 2] = [
    ("redis_found", "KEYED_POOL_REDIS_BIN", "redis-server"),
    ("nginx_found", "KEYED_POOL_NGINX_BIN", "nginx"),
];

fn main() {
    println!("cargo::rerun-if-env-changed=PATH");
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .collect();
    for (cfg, var, name) in SERVERS {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={var}");
        let found = match std::env::var_os(var) {
            Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
            None => dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()),
        };
        match found {
            Some(binary) => {
                // Re-run if it goes away.
                println!("cargo::rerun-if-changed={}", binary.display());
                println!("cargo::rustc-cfg={cfg}");
            }
            None => {
                // Re-run once it appears: installing it changes a directory of PATH.
                for dir in dirs.iter().filter(|d| d.is_dir()) {
                    println!("cargo::rerun-if-changed={}", dir.display());
                }
            }
        }
    }
}
