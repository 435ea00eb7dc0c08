//! `cargo sim`: the deterministic simulation runner (see sim/README.md).

fn main() {
    if !keyed_pool_sim::BUILT_WITH_MADSIM {
        eprintln!(
            "error: keyed-pool-sim was built without `--cfg madsim`, so it would simulate nothing.\n\
             Run it with `cargo sim` (and make sure no RUSTFLAGS environment variable overrides \
             the alias's rustflags)."
        );
        std::process::exit(2);
    }
    #[cfg(madsim)]
    {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some("--child") {
            let (Some(name), Some(seed)) = (args.get(1), args.get(2).and_then(|s| s.parse().ok()))
            else {
                eprintln!("usage: keyed-pool-sim --child SCENARIO SEED");
                std::process::exit(2);
            };
            std::process::exit(keyed_pool_sim::runner::child(name, seed));
        }
        let opts = match keyed_pool_sim::runner::Options::parse(args) {
            Ok(Some(opts)) => opts,
            Ok(None) => return,
            Err(msg) => {
                eprintln!("{msg}");
                std::process::exit(2);
            }
        };
        std::process::exit(keyed_pool_sim::runner::run(&opts));
    }
}
